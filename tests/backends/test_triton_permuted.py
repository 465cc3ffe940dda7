"""The Triton kernel with `TiledNeighborhood` (tile-major token order, the mask computed from positions by
arithmetic) against the float64 reference with the plain `Neighborhood` in row-major order: inputs are
permuted with ``perm``, the kernel's output and lse are put back with ``inv``. Run by Triton's CPU
interpreter (TRITON_INTERPRET=1, tests/conftest.py); outputs are poisoned with NaN before each launch."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close

from common import inputs
from tiers import tiered

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops  # noqa: E402
from attnzoo.backends.triton.codegen import generate, supports  # noqa: E402

CFG16 = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
CASES = {  # neighborhood_tiling(nb, 16) picks the tile noted
    "2d": az.Neighborhood((5, 5), grid=(12, 32)),                                            # 4x4
    "2d-rows": az.Neighborhood((3, 5), grid=(8, 32)),                                        # 8x2
    "2d-dil-causal": az.Neighborhood((3, 3), dilation=(1, 2), causal=(True, False), grid=(8, 32)),  # 1x16 / group
    "2d-stride": az.Neighborhood((5, 3), stride=(2, 1), grid=(16, 16)),                      # 16x1
    "3d": az.Neighborhood((3, 3, 3), grid=(4, 8, 8)),                                        # 4x1x4
    "3d-dil-stride": az.Neighborhood((3, 3, 5), dilation=(1, 2, 1), stride=(1, 1, 2), grid=(4, 8, 16)),  # 4x4x1
    "3d-causal": az.Neighborhood((2, 3, 3), causal=(True, False, False), grid=(4, 8, 12)),   # 2x8x1
}


def _run(nb, tiled, perm, inv, shape, cfg, seed=0):
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))        # float64
    ref_o, ref_l = reference_attention(q, k, v, nb)
    qp, kp, vp = (t.float().index_select(2, perm) for t in (q, k, v))
    out, lse = ops.attention_fwd(qp, kp, vp, tiled, shape[5] ** -0.5, poison=True, cfg=cfg)
    out, lse = out.index_select(2, inv), lse.index_select(2, inv)
    check_close("out", out, ref_o)
    check_close("lse", lse, ref_l)
    torch.testing.assert_close(lse.double(), ref_l.double(), rtol=1e-5, atol=1e-5)
    return out, lse


@pytest.mark.parametrize("name", CASES)
def test_tiled_forward_matches_reference(name):
    nb = CASES[name]
    tiling = az.neighborhood_tiling(nb, 16)
    assert tiling is not None
    perm, inv, tiled = tiling
    n = perm.numel()
    _run(nb, tiled, perm, inv, (1, 2, 1, n, n, 32, 32), CFG16, seed=n)


@pytest.mark.parametrize("tile, cfg", [
    ((4, 4), dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)),    # blocks of two tiles / of one
    ((2, 8), dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1)),
    ((4, 4), dict(BLOCK_M=64, BLOCK_N=64, num_warps=1, num_stages=1)),    # the GPU's tile size
])
def test_blocks_other_than_the_tile(tile, cfg):
    """Blocks that are not the tile: the layout comes from the window enumeration, same results (GQA)."""
    nb = az.Neighborhood((3, 5), dilation=(2, 1), grid=(16, 16))
    tiled = az.TiledNeighborhood(nb, tile)
    perm, inv = tiled.permutation()
    _run(nb, tiled, perm, inv, (1, 4, 2, 256, 256, 32, 32), cfg, seed=7)


def test_generated_mask_has_no_loads_and_is_supported():
    tiled = az.neighborhood_tiling(CASES["3d-dil-stride"], 16)[2]
    assert supports(tiled) == (True, "")
    assert supports(tiled | az.Sinks(2)) == (True, "")
    lines, aux = generate(tiled, 512, 512)
    assert aux is None and not any("tl.load" in line for line in lines)


def test_through_the_attention_api():
    nb = CASES["2d"]
    perm, inv, tiled = az.neighborhood_tiling(nb, 16)
    n = perm.numel()
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, n, n, 32, 32, seed=3))
    out = az.attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], tiled, backend="triton")[:, :, inv]
    torch.testing.assert_close(out, az.attention(q, k, v, nb, backend="reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hasattr(ops, "attention_bwd"), reason="no Triton backward yet")
def test_tiled_backward_matches_reference():
    nb = CASES["2d-dil-causal"]
    perm, inv, tiled = az.neighborhood_tiling(nb, 16)
    n = perm.numel()
    q, k, v = (t.detach() for t in inputs(1, 2, 1, n, n, 32, 32, seed=5))
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(1, 2, n, 32, generator=gen, dtype=torch.float64)
    wl = torch.randn(1, 2, n, generator=gen, dtype=torch.float64).float().double()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_o, ref_l = reference_attention(qr, kr, vr, nb)
    loss = (ref_o * w).sum() + (torch.where(torch.isfinite(ref_l), ref_l, 0.0) * wl).sum()
    ref = torch.autograd.grad(loss, (qr, kr, vr))
    qp, kp, vp = (t.float().index_select(2, perm) for t in (q, k, v))
    scale = 32 ** -0.5
    out, lse = ops.attention_fwd(qp, kp, vp, tiled, scale, cfg=CFG16)
    got = ops.attention_bwd(w.float().index_select(2, perm), wl.float().index_select(2, perm), qp, kp, vp, out,
                            lse, tiled, scale, cfg=CFG16)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        check_close(name, g.index_select(2, inv), r)


def _request(nb, n):
    from attnzoo.backends.base import Request

    q = torch.zeros(1, 2, n, 32)
    return Request(q, q, q, nb, 32 ** -0.5, False)


def _grads_vs_reference(nb, fn, shape, seed):
    """fn(q, k, v) -> (out, lse) in row-major order; checks out, lse and dq/dk/dv (the loss reads the lse too)
    against the float64 reference with ``nb``."""
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(*shape[:2], shape[3], shape[6], generator=gen, dtype=torch.float64)
    wl = torch.randn(*shape[:2], shape[3], generator=gen, dtype=torch.float64)

    def loss_of(o, l):
        return (o.double() * w).sum() + (torch.where(torch.isfinite(l), l, 0.0).double() * wl).sum()

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_o, ref_l = reference_attention(qr, kr, vr, nb)
    ref = torch.autograd.grad(loss_of(ref_o, ref_l), (qr, kr, vr))
    qt, kt, vt = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = fn(qt, kt, vt)
    got = torch.autograd.grad(loss_of(out, lse), (qt, kt, vt))
    check_close("out", out, ref_o)
    check_close("lse", lse, ref_l)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        check_close(name, g, r)


SMALL_3D = az.Neighborhood((3, 3, 3), dilation=(1, 1, 2), stride=(1, 2, 1), grid=(4, 4, 8))


@pytest.mark.parametrize("order, name", tiered([("in-place", "2d-dil-causal"), ("in-place-q", "2d-dil-causal"),
                                                 ("gather", "2d-dil-causal"), ("in-place", "3d-small"),
                                                 ("in-place-q", "3d-small")],
                                                {"gather-2d-dil-causal", "in-place-q-3d-small"}))
def test_every_tile_order_through_the_api(order, name, monkeypatch):
    """attention(backend='triton') on an N-D neighborhood, each way of running it in tile order (the row maps
    of `InPlaceTiled`, K / V gathered with the query side mapped, or every tensor gathered): outputs, lse and
    gradients against the float64 reference in row-major order (GQA, 2 query heads per KV head)."""
    from attnzoo.backends import triton as tb

    monkeypatch.setattr(tb, "NBHD_ORDER", order)
    monkeypatch.delenv("ATTNZOO_NBHD_ORDER", raising=False)
    nb = SMALL_3D if name == "3d-small" else CASES[name]
    n = math.prod(nb.grid)
    assert ops.tiled_neighborhood(_request(nb, n)) is not None
    _grads_vs_reference(nb, lambda q, k, v: az.attention(q, k, v, nb, backend="triton", return_lse=True),
                        (1, 4, 2, n, n, 32, 32), seed=n)


@pytest.mark.parametrize("kv, cfg", [
    (True, dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1, PACK=2, PACK_DQ=2)),    # 2 / 1 tiles, packed
    (True, dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, MERGE=True, KT=True)),  # merged loops, KT
    (True, dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, ATOMIC_DQ=True, TMA=True)),
    (False, dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1, TMA=True)),            # K / V descriptors
    (True, dict(BLOCK_M=64, BLOCK_N=32, num_warps=1, num_stages=1, GRID=(8, 12))),         # 96 tokens: ragged blocks
])
def test_in_place_kernels_every_variant(kv, cfg):
    """`InPlaceTiled` straight through the launchers, on the kernels' other paths: blocks that are not the
    tile with two query heads per program, lengths that are not block multiples, merged loops, the dk/dv
    kernel keys by queries, dq by atomics, and with ``kv=False`` K / V in tile order read through tensor
    descriptors while q / dO rows are mapped (their descriptors are off)."""
    from attnzoo.backends.triton.codegen import InPlaceTiled

    cfg = dict(cfg)
    nb = az.Neighborhood((3, 5), dilation=(2, 1), grid=cfg.pop("GRID", (8, 16)))
    n = math.prod(nb.grid)
    tiled = az.TiledNeighborhood(nb, (4, 4))
    perm, _ = tiled.permutation()
    pat = InPlaceTiled(tiled, kv=kv)
    scale = 32 ** -0.5
    kv_in = (lambda t: t) if kv else (lambda t: t.index_select(2, perm))

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = ops.attention_fwd(q, kv_in(k), kv_in(v), pat, scale, poison=True, cfg=cfg)
            ctx.save_for_backward(q, k, v, out, lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = ops.attention_bwd(dout, dlse, q, kv_in(k), kv_in(v), out, lse, pat, scale, cfg=cfg,
                                           poison=True)
            if not kv:  # back from tile order
                dk, dv = (torch.zeros_like(t).index_copy_(2, perm, g) for t, g in ((k, dk), (v, dv)))
            return dq, dk, dv

    _grads_vs_reference(nb, F.apply, (1, 4, 2, n, n, 32, 32), seed=11)


def test_in_place_pattern_is_its_own_kernel():
    """The in-place pattern differs from its tiled twin as a cache key and in its row maps (one per side)."""
    from attnzoo.backends.triton.codegen import InPlaceTiled, row_maps

    tiled = az.neighborhood_tiling(CASES["3d-dil-stride"], 16)[2]
    a, b = InPlaceTiled(tiled), InPlaceTiled(tiled, kv=False)
    assert a != tiled and a != b and a == InPlaceTiled(tiled) and hash(a) == hash(InPlaceTiled(tiled))
    assert row_maps(tiled) is None and row_maps(b)[1] is None and row_maps(a)[0] == row_maps(a)[1]
    perm, _ = tiled.permutation()
    ns = {}
    exec("def f(x):\n" + "\n".join("    " + line for line in row_maps(a)[0]), ns)
    assert torch.equal(ns["f"](torch.arange(perm.numel())), perm)
    with pytest.raises(TypeError, match="TiledNeighborhood"):
        InPlaceTiled(CASES["2d"])


def test_in_place_batch_and_strided_inputs():
    """The in-place order on a batch of two with q / k / v as transposed views of (B, T, H, D) tensors (row
    strides that are not D): the row maps multiply the tensors' own strides."""
    nb = az.Neighborhood((3, 3), grid=(8, 16))
    assert ops.tiled_neighborhood(_request(nb, 128)) is not None
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 128, h, 32, generator=gen, dtype=torch.float64).transpose(1, 2) for h in (4, 2, 2))
    assert not q.is_contiguous()
    ref = reference_attention(q, k, v, nb)[0]
    out = az.attention(q.float(), k.float(), v.float(), nb, backend="triton")
    check_close("out", out, ref)


def test_in_place_under_torch_compile():
    """torch.compile(fullgraph=True) traces attention(backend='triton') on an N-D neighborhood: the tiling is
    chosen once at trace time (no graph break in its search) and the kernels run in place through the custom
    ops; outputs and gradients against float64."""
    torch._dynamo.reset()
    nb = az.Neighborhood((3, 3), grid=(8, 16))
    f = torch.compile(lambda q, k, v: az.attention(q, k, v, nb, backend="triton", return_lse=True),
                      backend="aot_eager", fullgraph=True)
    _grads_vs_reference(nb, f, (1, 2, 1, 128, 128, 32, 32), seed=31)


def test_kv_tiles_never_fewer_query_rows_than_keys_on_gpu():
    """The dk/dv kernel's tiles: on the GPU, fewer query rows per step than keys per program (which raced on
    the H200) become square tiles, or KT for routed patterns whose two kernels share one tile; KT configs and
    the interpreter keep what they ask."""
    from attnzoo.backends.triton.codegen import InPlaceTiled

    tiled = InPlaceTiled(az.neighborhood_tiling(CASES["2d"], 16)[2])
    routed = az.RoutedBlocks(torch.ones(2, 2, dtype=torch.bool), 32)
    rect = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, BM_KV=32, BN_KV=64)
    for pat in (az.SlidingWindow(16), tiled):
        cfg, bm2, bn2 = ops.kv_tiles(rect, pat, gpu=True)
        assert (bm2, bn2) == (64, 64) and not cfg.get("KT")
        assert ops.kv_tiles(rect, pat, gpu=False)[1:] == (32, 64)
        assert ops.kv_tiles(dict(rect, KT=True), pat, gpu=True)[1:] == (32, 64)
        assert ops.kv_tiles(dict(rect, BM_KV=64, BN_KV=32), pat, gpu=True)[1:] == (64, 32)
    cfg, bm2, bn2 = ops.kv_tiles(dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2), routed, gpu=True)
    assert cfg["KT"] and (bm2, bn2) == (32, 64)
