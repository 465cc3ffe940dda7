"""attnzoo's Triton kernels (forward and backward) against the float64 reference, run by Triton's CPU
interpreter (TRITON_INTERPRET=1, set in tests/conftest.py) on small shapes: every pattern class, GQA,
cross attention both ways, odd lengths, padded head dims (Dv != D), fully masked rows; outputs and
gradients are poisoned with NaN before each launch so an unwritten element fails."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close

from common import dense, grads, inputs
from tiers import crossed, tiered

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton.ops import attention_bwd, attention_fwd, triton_attention  # noqa: E402

GRID = (5, 8)
PATTERNS = {
    "full": None,
    "causal": az.Causal(),
    "window": az.SlidingWindow(9, 3),
    "sinks+window": az.SlidingWindow(6) | az.Sinks(3),
    "chunked&causal": az.Chunked(11) & az.Causal(),
    "dilated": az.Dilated(5, 3),
    "strided": az.Strided(7),
    "prefix": az.PrefixLM(13),
    "power": az.PowerAttention(2, sinks=2),
    "document&causal": az.Document([7, 20, 13]) & az.Causal(),
    "nbhd1d-dil-stride": az.Neighborhood(5, dilation=2, stride=2),
    "nbhd2d": az.Neighborhood((3, 5), grid=GRID),
    "nbhd2d-causal-dil": az.Neighborhood((3, 3), dilation=(1, 2), causal=(True, False), grid=GRID),
    "nbhd3d-stride": az.Neighborhood((2, 3, 3), stride=(1, 2, 3), grid=(2, 4, 5)),
    "perhead": az.PerHead([az.Causal(), az.SlidingWindow(4), az.Full(), az.Neighborhood((3, 3), grid=GRID)]),
}
SELF_ONLY = {k for k, p in PATTERNS.items() if "nbhd" in k or k == "perhead" or "document" in k}


def _check(pattern, shape, dtype, seed=0, cfg=None):
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    scale = shape[5] ** -0.5
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out, lse = attention_fwd(ql, kl, vl, pattern, scale, poison=True, cfg=cfg)
    base = dense(ql, kl, vl, pattern)[0] if dtype == torch.float16 else None
    check_close("out", out, ref_o, baseline=base)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "lse: -inf rows differ"
    fin = torch.isfinite(ref_l)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse[fin].double(), ref_l[fin].double(), rtol=tol, atol=tol)
    return out, lse


@pytest.mark.parametrize("pname", PATTERNS)
def test_every_pattern_self_attention_gqa(pname):
    _check(PATTERNS[pname], (2, 4, 2, 40, 40, 32, 32), torch.float32)


@pytest.mark.parametrize("pname", sorted(set(PATTERNS) - SELF_ONLY))
@pytest.mark.parametrize("lq, lk", [(13, 45), (45, 19), (1, 37)])
def test_cross_attention_bottom_right(pname, lq, lk):
    _check(PATTERNS[pname], (1, 2, 1, lq, lk, 32, 32), torch.float32, seed=lq)


@pytest.mark.parametrize("d, dv", [(64, 64), (48, 24), (32, 64)])
def test_head_dims_and_fp16(d, dv):
    _check(az.SlidingWindow(10) | az.Sinks(2), (1, 2, 2, 33, 33, d, dv), torch.float16)


def test_fully_masked_rows():
    out, lse = _check(az.Causal(), (1, 2, 1, 30, 12, 32, 32), torch.float32)
    assert torch.all(out[:, :, :18] == 0) and torch.all(torch.isneginf(lse[:, :, :18]))


def test_through_attention_api_and_declines():
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 20, 20, 32, 32))
    out = az.attention(q, k, v, az.SlidingWindow(5), backend="triton")
    torch.testing.assert_close(out, az.attention(q, k, v, az.SlidingWindow(5), backend="reference"))
    with pytest.raises(ValueError, match="no in-kernel mask"):
        az.attention(q.detach(), k, v, az.Mask(lambda b, h, i, j: i >= j), backend="triton")
    assert az.explain(q.detach(), k, v, az.SlidingWindow(5)).backend == "reference"


@pytest.mark.parametrize("pname", ["full", "causal", "sinks+window", "document&causal", "dilated"])
def test_even_shapes_unmasked_loads(pname):
    """Lengths that are multiples of the block and power-of-two head dims take the unmasked path."""
    p = PATTERNS[pname]
    if pname == "document&causal":
        p = az.Document([7, 20, 37]) & az.Causal()
    _check(p, (1, 4, 2, 64, 64, 32, 32), torch.float32)


@pytest.mark.parametrize("bm, bn", [(32, 16), (16, 32), (64, 64)])
@pytest.mark.parametrize("pname", ["causal", "sinks+window", "nbhd2d", "perhead"])
def test_block_shapes(pname, bm, bn):
    """Rectangular and large tiles (the GPU configs use 128x128, 64x64, 64x32): same results."""
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=1, num_stages=1)
    _check(PATTERNS[pname], (1, 4, 2, 40, 40, 32, 32), torch.float32, seed=bm + bn, cfg=cfg)


@pytest.mark.parametrize(*crossed("pname,pack", ["causal", "sinks+window", "document&causal", "nbhd2d", "perhead"],
                                  [2, 4]))
def test_packed_gqa_heads(pname, pack):
    """Several query heads of a GQA group in one program (PACK): the same results as one head per program
    (equal up to the summation order), and against float64; head-dependent masks fall back to PACK 1."""
    from attnzoo.backends.triton.ops import _module, _pack, _layout
    shape = (2, 4, 1, 40, 40, 32, 32)  # one group of 4
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, PACK=pack)
    out, lse = _check(PATTERNS[pname], shape, torch.float32, seed=pack, cfg=cfg)
    q, k, v = (t.detach().float() for t in inputs(*shape, seed=pack))
    one = attention_fwd(q, k, v, PATTERNS[pname], 32 ** -0.5, cfg=dict(cfg, PACK=1))
    torch.testing.assert_close(out, one[0], rtol=1e-5, atol=1e-6)
    lay = _layout(PATTERNS[pname], 40, 40, 16, 16, 4, "cpu")
    got = _pack(pack, 4, lay, _module(PATTERNS[pname], 40, 40, "cpu")[0])
    assert got == (1 if pname == "perhead" else pack)
    _check_bwd(PATTERNS[pname], shape, torch.float32, seed=pack, cfg=dict(cfg, PACK_DQ=pack), fcfg=cfg)


def test_pack_needs_a_dividing_group_and_fold_needs_a_positive_scale():
    from attnzoo.backends.triton.ops import _module, _pack, _layout
    lay = _layout(az.Causal(), 40, 40, 16, 16, 6, "cpu")
    mod = _module(az.Causal(), 40, 40, "cpu")[0]
    assert [_pack(w, 6, lay, mod) for w in (1, 2, 4, 8)] == [1, 2, 2, 2]
    assert _pack(4, 3, lay, mod) == 1
    # a negative scale cannot be folded into the row maxima: the kernel multiplies each score instead
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 24, 24, 32, 32, seed=3))
    ref = reference_attention(q, k, v, az.Causal(), scale=-0.3)[0]
    got = attention_fwd(q, k, v, az.Causal(), -0.3, cfg=dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1))[0]
    check_close("out", got, ref)


@pytest.mark.parametrize("idx", [1, 2])
@pytest.mark.parametrize("pname", ["causal", "window", "sinks+window", "document&causal", "dilated"])
def test_block_index_modes(pname, idx):
    """IDX 1 (the next block index loaded a step ahead) and 2 (contiguous full lists computed, not loaded):
    the same results as loading each index at its step."""
    from attnzoo.backends.triton.ops import _full_contiguous
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    out, lse = _check(PATTERNS[pname], (1, 4, 2, 40, 40, 32, 32), torch.float32, seed=idx, cfg=dict(cfg, IDX=idx))
    q, k, v = (t.detach().float() for t in inputs(1, 4, 2, 40, 40, 32, 32, seed=idx))
    base = attention_fwd(q, k, v, PATTERNS[pname], 32 ** -0.5, cfg=cfg)
    assert torch.equal(out, base[0]) and torch.equal(lse, base[1])
    if pname in ("causal", "window"):
        assert _full_contiguous(PATTERNS[pname], 40, 40, 16, 16, 4, "cpu")


@pytest.mark.parametrize(*crossed("pname,extra", ["causal", "window", "sinks+window", "chunked&causal", "dilated"],
                                  [dict(IDX=2), dict(IDX=1, PACK=2), dict(IDX=2, TMA=True)]))
def test_merged_block_loop(pname, extra):
    """MERGE (full and partial blocks in one loop, the mask applied past the full ones): correct against
    float64 on lengths that are and are not block multiples (rows with no visible key included through
    the patterns' own empty rows), and equal to the two-loop forward up to rounding."""
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, **extra)
    for shape, seed in (((1, 4, 2, 48, 48, 32, 32), 7), ((1, 4, 2, 40, 40, 32, 32), 8)):
        out, lse = _check(PATTERNS[pname], shape, torch.float32, seed=seed, cfg=dict(cfg, MERGE=True))
        q, k, v = (t.detach().float() for t in inputs(*shape, seed=seed))
        base = attention_fwd(q, k, v, PATTERNS[pname], 32 ** -0.5, cfg=cfg)
        torch.testing.assert_close(out, base[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, base[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(*crossed("pname,extra", ["causal", "sinks+window", "document&causal", "dilated"],
                                  [{}, dict(MERGE=True, IDX=2), dict(PACK=2, FOLD=False)]))
def test_lazy_rescaling(pname, extra):
    """LAZY (the running maxima move only past a threshold): correct against float64, also where a row's
    maximum jumps far beyond the threshold mid-row (scaled-up keys at the end), and equal to the eager forward
    up to rounding; the backward reads its lse."""
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, **extra)
    shape = (1, 4, 2, 40, 40, 32, 32)
    out, lse = _check(PATTERNS[pname], shape, torch.float32, seed=11, cfg=dict(cfg, LAZY=True))
    q, k, v = (t.detach().float() for t in inputs(*shape, seed=11))
    base = attention_fwd(q, k, v, PATTERNS[pname], 32 ** -0.5, cfg=cfg)
    torch.testing.assert_close(out, base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, base[1], rtol=1e-5, atol=1e-6)
    k2 = k.clone()
    k2[:, :, 24:] *= 40  # later blocks' scores far above the first ones': the rescale branch runs
    ref, ref_lse = reference_attention(q.double(), k2.double(), v.double(), PATTERNS[pname], scale=32 ** -0.5)[:2]
    got, got_lse = attention_fwd(q, k2, v, PATTERNS[pname], 32 ** -0.5, cfg=dict(cfg, LAZY=True))
    check_close("out", got, ref.float())
    vis = torch.isfinite(ref_lse)
    torch.testing.assert_close(got_lse[vis], ref_lse[vis].float(), rtol=1e-5, atol=1e-4)
    _check_bwd(PATTERNS[pname], shape, torch.float32, seed=11, fcfg=dict(cfg, LAZY=True))


@pytest.mark.parametrize(*crossed("pname,extra", ["window", "sinks+window", "chunked&causal", "dilated"],
                                  [{}, dict(IDX=2, TMA=True), dict(PACK=2, LAZY=True)]))
def test_pipelined_scores(pname, extra):
    """PIPE (the merged loop with each step's next scores computed before its softmax): correct against float64
    on lengths that are and are not block multiples and on a cross shape whose first rows see no key (rows with
    no block at all), and equal to the merged forward up to rounding."""
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, MERGE=True, **extra)
    for shape, seed in (((1, 4, 2, 48, 48, 32, 32), 12), ((1, 4, 2, 40, 40, 32, 32), 13),
                        ((1, 4, 2, 40, 24, 32, 32), 14)):
        out, lse = _check(PATTERNS[pname], shape, torch.float32, seed=seed, cfg=dict(cfg, PIPE=True))
        q, k, v = (t.detach().float() for t in inputs(*shape, seed=seed))
        base = attention_fwd(q, k, v, PATTERNS[pname], 32 ** -0.5, cfg=cfg)
        torch.testing.assert_close(out, base[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, base[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [{}, dict(MERGE=True, IDX=2, TMA=True), dict(MERGE=True, PIPE=True),
                                   dict(PACK=2, LAZY=True)])
def test_narrow_sink_tile(extra):
    """NARROW (block 0 as a 16-key tile on the query blocks that see only attention sinks in it): correct
    against float64 on block-multiple and odd lengths and a cross shape, equal to the forward without it up to
    rounding; the rows it applies to are the ones past the window's reach of block 0, and a pattern with no
    such row (or sinks wider than the tile) runs the plain forward."""
    from attnzoo.backends.triton.ops import _narrow_rows
    pat = az.Sinks(4) | az.SlidingWindow(40)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1, **extra)
    for shape, seed in (((1, 4, 2, 128, 128, 32, 32), 21), ((1, 4, 2, 100, 100, 32, 32), 22),
                        ((1, 4, 2, 40, 130, 32, 32), 23)):
        lq, lk = shape[3], shape[4]
        rows = _narrow_rows(pat, lq, lk, 32, 32, 4, "cpu", 16)
        # query block i's window starts at key 32 * i + (lk - lq) - 40: block 0's keys >= 16 are out of reach
        want = [int(32 * i + (lk - lq) - 40 >= 32) for i in range(-(-lq // 32))]
        assert rows is not None and rows.tolist() == want
        out, lse = _check(pat, shape, torch.float32, seed=seed, cfg=dict(cfg, NARROW=16))
        q, k, v = (t.detach().float() for t in inputs(*shape, seed=seed))
        base = attention_fwd(q, k, v, pat, 32 ** -0.5, cfg=cfg)
        torch.testing.assert_close(out, base[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, base[1], rtol=1e-5, atol=1e-6)
    assert _narrow_rows(az.Sinks(20) | az.SlidingWindow(40), 128, 128, 32, 32, 4, "cpu", 16) is None
    assert _narrow_rows(az.Causal(), 128, 128, 32, 32, 4, "cpu", 16) is None
    _check(az.Sinks(20) | az.SlidingWindow(40), (1, 4, 2, 128, 128, 32, 32), torch.float32, cfg=dict(cfg, NARROW=16))
    q, k, v = (t.detach().float() for t in inputs(1, 4, 2, 64, 64, 32, 32))
    for bad in (8, 24, True, "16"):
        with pytest.raises(ValueError, match="NARROW"):
            attention_fwd(q, k, v, pat, 32 ** -0.5, cfg=dict(cfg, NARROW=bad))


def _bwd_variant_matches(pname, cfg, variant, cases):
    """The backward with ``variant`` added to ``cfg``: gradients against float64 (`_check_bwd`) and equal to
    ``cfg``'s own backward up to rounding, for each (shape, seed, split cap) of ``cases``."""
    for shape, seed, cap in cases:
        got = _check_bwd(PATTERNS[pname], shape, torch.float32, seed=seed, cfg=dict(cfg, **variant), split_cap=cap)
        base = _check_bwd(PATTERNS[pname], shape, torch.float32, seed=seed, cfg=cfg, split_cap=cap)
        for a, r in zip(got, base):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(*crossed("pname,extra", ["window", "sinks+window", "chunked&causal"],
                                  [{}, dict(TMA=True, PACK_DQ=2)]))
def test_merged_block_loop_backward(pname, extra):
    """MERGE in the backward (dq and dk/dv kernels: full and partial blocks in one loop per head): gradients
    against float64 (lengths that are and are not block multiples, split columns included through a small
    split cap), equal to the two-loop backward up to rounding."""
    _bwd_variant_matches(pname, dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, **extra), dict(MERGE=True),
                         (((1, 4, 2, 48, 48, 32, 32), 9, None), ((1, 4, 2, 40, 40, 32, 32), 10, 1)))


@pytest.mark.parametrize(*crossed("pname,extra", ["causal", "sinks+window", "dilated", "full"],
                                  [{}, dict(MERGE=True, TMA=True), dict(WARPS_KV=2, STAGES_KV=2)]))
def test_keys_by_queries_backward(pname, extra):
    """KT (the dk/dv kernel's tiles computed keys by queries, S^T = K Q^T): gradients against float64 on
    lengths that are and are not block multiples, split columns included (small split cap), GQA; equal to
    the queries-by-keys backward up to rounding."""
    _bwd_variant_matches(pname, dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, **extra), dict(KT=True),
                         (((1, 4, 2, 48, 48, 32, 32), 11, None), ((2, 2, 1, 40, 37, 32, 16), 12, 1)))


@pytest.mark.parametrize(*crossed("pname,extra", ["causal", "sinks+window", "full"],
                                  [{}, dict(KT=True, MERGE=True), dict(BM_KV=16, BN_KV=32, KT=True)]))
def test_atomic_dq_backward(pname, extra):
    """ATOMIC_DQ: no dq kernel, dq summed from the dk/dv kernel's tiles by float32 atomics (delta from its own
    kernel; the lse's gradient included, rows that see nothing in the cross shape): gradients against float64,
    split columns included, equal to the two-kernel backward up to rounding."""
    _bwd_variant_matches(pname, dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, **extra),
                         dict(ATOMIC_DQ=True), (((1, 4, 2, 48, 48, 32, 32), 15, None), ((2, 2, 1, 40, 37, 32, 16), 16, 1)))


@pytest.mark.parametrize(*crossed("pname,extra", ["causal", "sinks+window", "nbhd2d"],
                                  [dict(BM_KV=16, BN_KV=32), dict(BM_KV=32, BN_KV=16, KT=True, TMA=True),
                                   dict(BM_KV=32, BN_KV=32, KT=True, MERGE=True)]))
def test_dkdv_kernel_own_tiles(pname, extra):
    """BM_KV / BN_KV: the dk/dv kernel on its own tiles (its own transposed layout, plan and module), the dq
    kernel on (BLOCK_M, BLOCK_N): gradients against float64, split columns included, equal to the shared
    tiles' backward up to rounding."""
    cases = [((1, 4, 2, 64, 64, 32, 32), 13, None), ((1, 2, 1, 40, 40, 32, 32), 14, 1)]
    if pname == "nbhd2d":  # its grid holds 40 tokens
        cases = [c for c in cases if c[0][3] == GRID[0] * GRID[1]]
    _bwd_variant_matches(pname, dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1), extra, cases)


@pytest.mark.parametrize("extra", [dict(TMA=True), dict(WS=True), dict(TMA=True, WS=True, PACK=2)])
@pytest.mark.parametrize("pname", ["causal", "sinks+window", "dilated"])
def test_tma_and_warp_specialised_forward(pname, extra, monkeypatch):
    """K / V through tensor descriptors (TMA) and the warp-specialised loop: correct against float64, equal to
    the pointer loads up to rounding; lengths that are not block multiples and non-contiguous K / V take
    the pointer loads (a descriptor block would run into the next head's rows)."""
    from attnzoo.backends.triton import ops
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, IDX=2, **extra)
    used = []
    real = ops._kv_descriptors
    monkeypatch.setattr(ops, "_kv_descriptors", lambda *a: used.append(real(*a)) or used[-1])
    out, lse = _check(PATTERNS[pname], (1, 4, 2, 48, 48, 32, 32), torch.float32, seed=5, cfg=cfg)
    assert bool(used and used[-1]) == bool(extra.get("TMA"))
    q, k, v = (t.detach().float() for t in inputs(1, 4, 2, 48, 48, 32, 32, seed=5))
    base = attention_fwd(q, k, v, PATTERNS[pname], 32 ** -0.5, cfg=dict(BLOCK_M=16, BLOCK_N=16, num_warps=1,
                                                                          num_stages=1))
    torch.testing.assert_close(out, base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, base[1], rtol=1e-5, atol=1e-6)
    if extra.get("TMA"):  # the backward through descriptors too: the same gradients as the pointer loads
        do = torch.randn_like(q)
        bcfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        got = attention_bwd(do, None, q, k, v, out, lse, PATTERNS[pname], 32 ** -0.5, cfg=dict(bcfg, TMA=True))
        ref = attention_bwd(do, None, q, k, v, out, lse, PATTERNS[pname], 32 ** -0.5, cfg=bcfg)
        assert used[-1] is not None
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        used.clear()
        _check(PATTERNS[pname], (1, 4, 2, 40, 40, 32, 32), torch.float32, seed=6, cfg=cfg)  # 40: not a multiple
        assert used == [None]
        kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
        assert ops._kv_descriptors(kt, v, 16, True) is None


def test_tma_only_from_hopper_on(monkeypatch):
    """Descriptors are used on sm_90 and later (and in the interpreter), never on older GPUs."""
    from attnzoo.backends.triton import ops
    ops._has_tma.cache_clear()
    for major, want in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        ops._has_tma.cache_clear()
        assert ops._has_tma(torch.device("cuda", 0)) is want
    ops._has_tma.cache_clear()
    assert ops._has_tma(torch.device("cpu"))


def _eval_mask(lines, qp, kk, hq=0):
    # a plain generated mask body (no lookups, no tl.) run in PyTorch: the kernels' helpers on tensors
    env = dict(_fdiv=lambda x, s: torch.div(x, s, rounding_mode="floor"),
               _fmod=lambda x, s: x - torch.div(x, s, rounding_mode="floor") * s,
               tl=type("tl", (), dict(where=staticmethod(lambda c, a, b: torch.where(torch.as_tensor(c), a, b)))))
    exec("def _m(qp, kk, hq):\n" + "\n".join("    " + line for line in lines), env)
    return env["_m"](qp, kk, hq)


@pytest.mark.parametrize("name", ["window|sinks", "prefix", "sinks|chunked", "(window|sinks)&causal",
                                  "dilated|sinks", "long sinks", "sinks alone", "perhead"])
def test_mask_past_kmin_drops_terms_that_cannot_hold(name):
    # generate(..., kmin): the mask for keys >= kmin only (for a kernel that runs block 0 apart from its main loop)
    # equals the whole mask there, and sinks / prefixes shorter than kmin leave no compares behind
    from attnzoo.backends.triton.codegen import generate
    sw, sk = az.SlidingWindow(300), az.Sinks(4)
    pat = {"window|sinks": sw | sk, "prefix": az.PrefixLM(100), "sinks|chunked": sk | az.Chunked(192),
           "(window|sinks)&causal": (sw | sk) & az.Causal(), "dilated|sinks": az.Dilated(96, 3) | sk,
           "long sinks": sw | az.Sinks(200), "sinks alone": sk, "perhead": az.PerHead([sw | sk, az.Causal()])}[name]
    lq = lk = 1024
    full, far = generate(pat, lq, lk, (64, 128))[0], generate(pat, lq, lk, (64, 128), kmin=128)[0]
    g = torch.Generator().manual_seed(5)
    qp = torch.randint(0, lq, (400, 1), generator=g)
    kk = torch.randint(128, lk, (1, 300), generator=g)
    for hq in (0, 1):
        want = pat.mask(qp, kk, lq, lk) if name != "perhead" else pat.patterns[hq].mask(qp, kk, lq, lk)
        assert torch.equal(_eval_mask(full, qp, kk, hq).expand_as(want), want)
        assert torch.equal(_eval_mask(far, qp, kk, hq).expand_as(want), want)
    # the short sinks' (4 keys) and the prefix's (100) compares are gone past key 128; 200 sinks stay
    assert "(kk < 4)" in "\n".join(full) or name in ("prefix", "long sinks")
    assert "(kk < 4)" not in "\n".join(far) and "(kk < 100)" not in "\n".join(far)
    assert ("(kk < 200)" in "\n".join(far)) == (name == "long sinks")
    assert len(far) < len(full) or name in ("long sinks", "prefix", "sinks alone")


@pytest.mark.parametrize("lq, lk", [(64, 64), (48, 80), (80, 48), (40, 56)])
@pytest.mark.parametrize("combine", ["alone", "&causal", "|window", "perhead"])
def test_block_sparse_reads_one_bit_per_nested_tile(combine, lq, lk):
    """Block masks whose blocks hold whole tiles read one bit per tile (the tile's first query and key);
    where tiles straddle blocks (offset Lk - Lq not a multiple of the tile, blocks smaller than tiles)
    the per-element lookup stays. Forward, lse and gradients against float64 either way."""
    from attnzoo.backends.triton.codegen import generate
    bs = az.BlockSparse.random(lq, lk, 0.5, block_size=16, seed=lq + lk)
    pat = {"alone": bs, "&causal": bs & az.Causal(), "|window": bs | az.SlidingWindow(5),
           "perhead": az.PerHead([bs, az.Causal()])}[combine]
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    nested = (lk - lq) % 16 == 0
    assert ("tl.min(qp)" in "\n".join(generate(pat, lq, lk, (16, 16))[0])) == nested
    assert "tl.min(qp)" not in "\n".join(generate(pat, lq, lk, (32, 16))[0])  # tiles larger than the blocks
    assert "tl.min(qp)" not in "\n".join(generate(pat, lq, lk)[0])
    shape = (1, 2, 1, lq, lk, 32, 32)
    _check(pat, shape, torch.float32, seed=3, cfg=cfg)
    _check_bwd(pat, shape, torch.float32, seed=3, cfg=cfg, fcfg=cfg)
    if combine == "&causal" and lq == lk:  # and the packed GQA config, as on the GPU
        _check(pat, (1, 4, 1, lq, lk, 32, 32), torch.float32, seed=4, cfg=dict(cfg, PACK=4, IDX=2))


def test_packed_config_falls_back_to_its_unpacked_alternative(monkeypatch):
    """A packed default on a group that the packing does not divide (here MHA) runs its UNPACKED config."""
    from attnzoo.backends.triton import ops
    seen = []
    real = ops._layout
    monkeypatch.setattr(ops, "_layout", lambda p, lq, lk, bm, bn, *a: seen.append(bm) or real(p, lq, lk, bm, bn, *a))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1, PACK=4,
               UNPACKED=dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1))
    _check(az.SlidingWindow(6) | az.Sinks(3), (1, 2, 2, 40, 40, 32, 32), torch.float32, seed=9, cfg=cfg)
    assert seen == [16, 32]
    seen.clear()
    _check(az.SlidingWindow(6) | az.Sinks(3), (1, 4, 1, 40, 40, 32, 32), torch.float32, seed=9, cfg=cfg)
    assert seen == [16]


# -- backward ----------------------------------------------------------------------------------------
def _weights(out_shape, lse_shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_shape, generator=gen, dtype=torch.float64),
            torch.randn(lse_shape, generator=gen, dtype=torch.float64).float().double())


def _ref_grads(q, k, v, pattern, w, wl, fn=None):
    """Gradients of sum(out * w) + sum(finite lse * wl), by autograd through `fn` (default: reference)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = (fn or reference_attention)(q, k, v, pattern)
    loss = (out * w.to(out.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * wl.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _check_bwd(pattern, shape, dtype, seed=0, cfg=None, fcfg=None, split_cap=None):
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    scale = shape[5] ** -0.5
    b, hq, _, lq, _, _, dv = shape
    w, wl = _weights((b, hq, lq, dv), (b, hq, lq), seed + 1)
    ref = _ref_grads(q, k, v, pattern, w, wl)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out, lse = attention_fwd(ql, kl, vl, pattern, scale, cfg=fcfg)
    got = attention_bwd(w.to(dtype), wl.float(), ql, kl, vl, out, lse, pattern, scale, cfg=cfg, poison=True,
                        split_cap=split_cap)
    base = (_ref_grads(ql, kl, vl, pattern, w, wl, fn=lambda *a: dense(*a)) if dtype == torch.float16
            else (None, None, None))
    for name, g, r, bl in zip(("dq", "dk", "dv"), got, ref, base):
        check_close(name, g, r, baseline=bl)
    return got


@pytest.mark.parametrize("pname", PATTERNS)
def test_backward_every_pattern_gqa(pname):
    _check_bwd(PATTERNS[pname], (2, 4, 2, 40, 40, 32, 32), torch.float32)


@pytest.mark.parametrize("pname", ["full", "causal", "sinks+window", "prefix", "dilated"])
@pytest.mark.parametrize("lq, lk", [(13, 45), (45, 19), (1, 37)])
def test_backward_cross_attention(pname, lq, lk):
    _check_bwd(PATTERNS[pname], (1, 2, 1, lq, lk, 32, 32), torch.float32, seed=lq)


@pytest.mark.parametrize("d, dv", [(64, 64), (48, 24), (32, 64)])
def test_backward_head_dims_and_fp16(d, dv):
    _check_bwd(az.SlidingWindow(10) | az.Sinks(2), (1, 2, 2, 33, 33, d, dv), torch.float16)


def test_backward_fully_masked_rows():
    """Rows that see no key (lse -inf) get zero gradient and give none to k, v; nothing is NaN."""
    dq, dk, dv = _check_bwd(az.Causal(), (1, 2, 1, 30, 12, 32, 32), torch.float32)
    assert torch.all(dq[:, :, :18] == 0)


@pytest.mark.parametrize("bm, bn", [(32, 16), (16, 32)])
@pytest.mark.parametrize("pname", ["causal", "nbhd2d", "perhead"])
def test_backward_block_shapes(pname, bm, bn):
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=1, num_stages=1)
    _check_bwd(PATTERNS[pname], (1, 4, 2, 40, 40, 32, 32), torch.float32, seed=bm + bn, cfg=cfg)


@pytest.mark.parametrize(*crossed("pname,cap", ["causal", "sinks+window", "perhead", "full"],
                                  [1, 2, 3]))
def test_backward_split_columns(pname, cap):
    """Long kv columns split over several work items, partials summed by the reduce kernel."""
    from attnzoo.backends.triton.ops import _bwd_plan
    _check_bwd(PATTERNS[pname], (2, 4, 2, 40, 40, 32, 32), torch.float32, seed=cap, split_cap=cap)
    items, red, nslots = _bwd_plan(PATTERNS[pname], 40, 40, 16, 16, 4, "cpu", cap)
    assert red.shape[0] > 0 or cap > 1
    assert nslots >= 2 * red.shape[0]
    lens = (items[:, 2] - items[:, 1]).tolist()
    assert max(lens) <= cap and lens == sorted(lens, reverse=True)
    assert items.host_steps == tuple(lens)  # (what TAIL_ORDER's schedule reads instead of syncing on the items)


def test_backward_is_deterministic():
    """No atomics: two backward passes give bitwise-equal gradients."""
    q, k, v = (t.detach().float() for t in inputs(1, 4, 1, 37, 37, 32, 32))
    p = az.SlidingWindow(7) | az.Sinks(2)
    out, lse = attention_fwd(q, k, v, p, 0.2)
    do = torch.randn_like(out)
    a = attention_bwd(do, None, q, k, v, out, lse, p, 0.2)
    b = attention_bwd(do, None, q, k, v, out, lse, p, 0.2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_autograd_through_attention_api():
    """backend='triton' is differentiable (custom ops + autograd registration), lse gradient included."""
    q, k, v = inputs(1, 4, 2, 29, 29, 32, 32)
    p = az.Chunked(8) & az.Causal()
    fn = lambda be: (lambda q, k, v: az.attention(q, k, v, p, backend=be, return_lse=True))
    r = grads(fn("reference"), q, k, v)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    t = grads(fn("triton"), q2, k2, v2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), t, r):
        check_close(name, a, b)


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the torch.library ops."""
    from attnzoo.backends.triton import ops

    q, k, v = (t.detach().float().requires_grad_() for t in inputs(1, 2, 1, 17, 17, 32, 32))
    pid = ops.pattern_id(az.SlidingWindow(5))
    torch.library.opcheck(ops._fwd_op, (q, k, v, pid, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = ops._fwd_op(q.detach(), k.detach(), v.detach(), pid, 0.25)
    torch.library.opcheck(ops._bwd_op, (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                                        v.detach(), out, lse, pid, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fq, fk, fv = torch.empty(2, 4, 9, 32), torch.empty(2, 2, 11, 32), torch.empty(2, 2, 11, 16)
        o, l = ops._fwd_op(fq, fk, fv, pid, 0.25)
        assert o.shape == (2, 4, 9, 16) and l.shape == (2, 4, 9) and l.dtype == torch.float32


@pytest.mark.parametrize("pattern", [az.Neighborhood((3, 5), grid=(8, 12)),
                                     az.Neighborhood((3, 3, 3), causal=(True, False, False), grid=(4, 4, 8))])
def test_backend_tiles_nd_neighborhoods(pattern):
    """backend='triton' reorders N-D neighborhoods into tiles and back: same outputs and gradients."""
    from attnzoo.backends.base import Request
    from attnzoo.backends.triton.ops import tiled_neighborhood

    L = math.prod(pattern.grid)
    q, k, v = inputs(1, 4, 2, L, L, 32, 32)
    req = Request(q.detach().float(), k.detach().float(), v.detach().float(), pattern, 32 ** -0.5, False)
    assert tiled_neighborhood(req) is not None
    fn = lambda be: (lambda q, k, v: az.attention(q, k, v, pattern, backend=be, return_lse=True))
    r = grads(fn("reference"), q, k, v)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    t = grads(fn("triton"), q2, k2, v2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), t, r):
        check_close(name, a, b)


def test_auto_prefers_triton_on_cuda_only(monkeypatch):
    from attnzoo.backends.base import Request
    from attnzoo.backends.dispatch import BACKENDS

    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 20, 20, 32, 32))
    req = Request(q, k, v, az.SlidingWindow(5), 0.2, False)
    ok, why = BACKENDS["triton"].auto_ok(req)
    assert not ok and "interpreter" in why
    monkeypatch.setattr(Request, "device", property(lambda self: torch.device("cuda")))
    assert BACKENDS["triton"].auto_ok(req) == (True, "")


def test_torch_compile_fullgraph_no_recompile():
    """torch.compile traces attention(backend='triton') into one graph (custom ops with fake impls),
    gradients flow, and new data of the same shape does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    p = az.SlidingWindow(5) | az.Sinks(2)
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda q, k, v: az.attention(q, k, v, p, backend="triton"), backend=cnt, fullgraph=True)
    for seed in (0, 1):
        q, k, v = (t.detach().float().requires_grad_() for t in inputs(1, 2, 1, 24, 24, 32, 32, seed=seed))
        out = f(q, k, v)
        out.sum().backward()
        q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
        ref = az.attention(q2, k2, v2, p, backend="triton")
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(q.grad, q2.grad)
    assert cnt.frame_count == 1


def test_float32_precision_follows_torch_switch():
    """float32 dots run in full precision by default and as TF32 once PyTorch allows it (the switch SDPA and
    matmul follow); 16-bit inputs are unaffected; the result stays within TF32 error of the reference."""
    from attnzoo.backends.triton.ops import _prec
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _prec(torch.float32) == "ieee" and _prec(torch.bfloat16) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert _prec(torch.float32) == "tf32"
        q, k, v = (t.detach() for t in inputs(1, 2, 2, 64, 64, 32, 32, torch.float32))
        out = attention_fwd(q, k, v, az.Causal(), 32 ** -0.5)[0]
        ref = reference_attention(q.double(), k.double(), v.double(), az.Causal(), 32 ** -0.5)[0]
        assert (out.double() - ref).abs().max() < 5e-2
    finally:
        torch.set_float32_matmul_precision(before)
    assert _prec(torch.float32) == ("ieee" if before == "highest" else "tf32")


@pytest.mark.parametrize("use", ["out", "lse", "both"])
def test_eager_path_matches_custom_ops(use):
    """Eager calls skip the custom ops (an autograd.Function over the same launchers, for host time);
    outputs and gradients equal the custom ops' when the loss uses out, lse or both."""
    from attnzoo.backends.triton import ops

    p = az.SlidingWindow(5)
    base = [t.detach().float() for t in inputs(1, 2, 1, 21, 21, 32, 32, seed=4)]
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1, 2, 21, 32, generator=gen)
    wl = torch.randn(1, 2, 21, generator=gen)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out, lse = fn(q, k, v)
        loss = {"out": (out * w).sum(), "lse": (lse * wl).sum(), "both": (out * w).sum() + (lse * wl).sum()}[use]
        loss.backward()
        return out, lse, q.grad, k.grad, v.grad

    eager = run(lambda q, k, v: ops.triton_attention(q, k, v, p, 0.25))
    op = run(lambda q, k, v: ops._fwd_op(q, k, v, ops.pattern_id(p), 0.25))
    for a, b in zip(eager, op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_falls_back_when_a_config_runs_out_of_shared_memory(monkeypatch):
    """When Triton refuses a config for shared memory (a per-element mask gather multi-buffered by the
    pipeliner), the forward retries with one stage fewer, then unpacked, remembers it, and stays correct."""
    from attnzoo.backends.triton import ops

    class OutOfResources(Exception):
        pass

    real = ops._launch_fwd
    tried = []

    def launch(mod, grid, *args, **kw):
        cfg = args[-1]
        tried.append((cfg["num_stages"], args[-3]))
        if cfg["num_stages"] > 1:
            raise OutOfResources("out of resource: shared memory")
        return real(mod, grid, *args, **kw)

    monkeypatch.setattr(ops, "_launch_fwd", launch)
    monkeypatch.setattr(ops, "_SHRUNK", {})
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=3, PACK=2, UNPACKED=dict(BLOCK_M=16, BLOCK_N=16,
                                                                                         num_warps=1, num_stages=1))
    p = az.SlidingWindow(6) | az.Sinks(3)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 40, 32, generator=gen)
    k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(2))
    out, lse = attention_fwd(q, k, v, p, 32 ** -0.5, cfg=cfg)
    assert [s for s, _ in tried] == [3, 2, 1]
    ref = reference_attention(q.double(), k.double(), v.double(), pattern=p)
    ref = ref[0] if isinstance(ref, tuple) else ref
    check_close("out", out, ref)
    tried.clear()
    attention_fwd(q, k, v, p, 32 ** -0.5, cfg=cfg)  # remembered: straight to the config that fit
    assert [s for s, _ in tried] == [1]
    monkeypatch.setattr(ops, "_launch_fwd", lambda *a, **kw: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):  # other errors are not swallowed
        attention_fwd(q, k, v, p, 32 ** -0.5, cfg=dict(cfg, num_warps=2))


def test_backward_falls_back_when_a_config_runs_out_of_shared_memory(monkeypatch):
    """The backward steps down one pipeline stage at a time on Triton's OutOfResources, remembers it, and its
    gradients stay those of the working config; at one stage it raises."""
    from attnzoo.backends.triton import ops

    class OutOfResources(Exception):
        pass

    real = ops._launch_bwd
    tried = []

    def launch(mod, cfg, *args, **kw):
        tried.append(cfg["num_stages"])
        if cfg["num_stages"] > 1:
            raise OutOfResources("out of resource: shared memory")
        return real(mod, cfg, *args, **kw)

    monkeypatch.setattr(ops, "_launch_bwd", launch)
    monkeypatch.setattr(ops, "_SHRUNK", {})
    p = az.SlidingWindow(6) | az.Sinks(3)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 40, 32, generator=gen)
    k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(2))
    fcfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    out, lse = attention_fwd(q, k, v, p, 32 ** -0.5, cfg=fcfg)
    dout = torch.randn_like(out)
    want = attention_bwd(dout, None, q, k, v, out, lse, p, 32 ** -0.5, cfg=fcfg)
    tried.clear()
    got = attention_bwd(dout, None, q, k, v, out, lse, p, 32 ** -0.5, cfg=dict(fcfg, num_stages=3))
    assert tried == [3, 2, 1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    tried.clear()
    attention_bwd(dout, None, q, k, v, out, lse, p, 32 ** -0.5, cfg=dict(fcfg, num_stages=3))
    assert tried == [1]  # remembered
    monkeypatch.setattr(ops, "_launch_bwd", lambda mod, cfg, *a, **kw: (_ for _ in ()).throw(OutOfResources("smem")))
    with pytest.raises(OutOfResources):  # nothing smaller than one stage
        attention_bwd(dout, None, q, k, v, out, lse, p, 32 ** -0.5, cfg=dict(fcfg, num_warps=2))
