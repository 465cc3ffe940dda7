"""`BlockSparse`: the mask against a dense expansion of the block grid, the block layout for kernel block
sizes that differ from the pattern's, density, per-head masks, `BlockSparse.random`, errors, and the
Triton kernel (Triton's CPU interpreter, TRITON_INTERPRET=1 from tests/conftest.py) against the
reference."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
import test_layout
from attnzoo.patterns import BlockSparse, Causal


def expand(p: BlockSparse, q_len: int, kv_len: int) -> torch.Tensor:
    """(H, Lq, Lk): query i (at key position i + Lk - Lq) sees key j iff its block pair is on, by loops."""
    bm = p.blocks
    if bm.dim() == 2:
        bm = bm[None]
    bq, bk = p.block_size
    out = torch.zeros(bm.shape[0], q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        pos = i + kv_len - q_len
        if pos < 0:
            continue
        for j in range(kv_len):
            out[:, i, j] = bm[:, pos // bq, j // bk]
    return out


def lib_masks(p, q_len, kv_len, num_heads=None):
    qi, ki = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    if p.head_dependent:
        return torch.stack([p.mask(qi, ki, q_len, kv_len, head=h) for h in range(num_heads)])
    return p.mask(qi, ki, q_len, kv_len)[None]


def check_layout(p, q_len, kv_len, block_q, block_k, num_heads=None):
    """tests/patterns/test_layout.py's `check_layout`, with this file's dense expansion as the truth."""
    def truth(pattern, lq, lk, nh=None):
        if isinstance(pattern, BlockSparse):
            return expand(pattern, lq, lk)
        return lib_masks(pattern, lq, lk, nh)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_layout, "naive_masks", truth)
        return test_layout.check_layout(p, q_len, kv_len, block_q, block_k, num_heads)


@st.composite
def block_sparse(draw, kv_len: int, per_head: bool = False):
    bq, bk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    nq = -(-kv_len // bq) + draw(st.integers(0, 2))   # larger masks are allowed (extra blocks unused)
    nk = -(-kv_len // bk) + draw(st.integers(0, 2))
    shape = (draw(st.integers(1, 3)), nq, nk) if per_head else (nq, nk)
    seed, dens = draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]))
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < dens
    return BlockSparse(m, (bq, bk) if bq != bk or draw(st.booleans()) else bq)


lengths = st.tuples(st.integers(1, 40), st.integers(1, 40))


# -- mask --------------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(lengths, st.data())
def test_mask_equals_dense_expansion(lens, data):
    q_len, kv_len = lens
    p = data.draw(block_sparse(kv_len))
    assert torch.equal(lib_masks(p, q_len, kv_len), expand(p, q_len, kv_len))
    # the FlexAttention mask_mod is the same function
    mm = p.mask_mod(q_len, kv_len)
    qi, ki = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    assert torch.equal(mm(0, 0, qi, ki)[None], expand(p, q_len, kv_len))


def test_mask_by_hand():
    # 2 x 3 blocks of 2 x 2: rows are query positions 0-1 / 2-3, columns keys 0-1 / 2-3 / 4-5
    m = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    p = BlockSparse(m, 2)
    got = p.mask(torch.arange(4)[:, None], torch.arange(4)[None, :], 4, 4)
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(got, want)
    # bottom-right alignment: 2 queries over 4 keys sit at positions 2, 3 (block row 1)
    got = p.mask(torch.arange(2)[:, None], torch.arange(4)[None, :], 2, 4)
    assert torch.equal(got, want[2:])
    # more queries than keys: the first ones sit at negative positions and see nothing
    got = p.mask(torch.arange(6)[:, None], torch.arange(4)[None, :], 6, 4)
    assert not got[:2].any() and torch.equal(got[2:], want)


# -- layout ------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(lengths, st.integers(1, 20), st.integers(1, 20), st.data())
def test_layout_exact_any_kernel_block(lens, block_q, block_k, data):
    q_len, kv_len = lens
    check_layout(data.draw(block_sparse(kv_len)), q_len, kv_len, block_q, block_k)


@pytest.mark.parametrize("block_q, block_k", [(16, 16), (32, 16), (16, 64), (64, 64), (128, 128), (48, 80)])
@pytest.mark.parametrize("causal", [False, True])
def test_layout_kernel_blocks_of_the_gpu(block_q, block_k, causal):
    """Pattern blocks of 32 under the kernel's tiles (aligned, multiples, not aligned), alone and & Causal."""
    n = 200
    p = BlockSparse.random(n, n, 0.3, block_size=32, causal=causal, seed=3)
    check_layout(p, n, n, block_q, block_k)
    check_layout(p & Causal(), n, n, block_q, block_k)
    check_layout(p, 77, n, block_q, block_k)


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(1, 12), st.integers(1, 12), st.data())
def test_layout_per_head(lens, block_q, block_k, data):
    q_len, kv_len = lens
    p = data.draw(block_sparse(kv_len, per_head=True))
    h = p.blocks.shape[0]
    assert p.head_dependent
    lay, masks = check_layout(p, q_len, kv_len, block_q, block_k, num_heads=h)
    assert torch.equal(masks, lib_masks(p, q_len, kv_len, h))


def test_layout_on_the_device_path_is_sync_free():
    """The layout needs no evaluation of the mask: `_classify` is exact (uncertain = None)."""
    p = BlockSparse.random(1000, 1000, 0.2, block_size=64, seed=1)
    from attnzoo.patterns.base import Ctx
    any_, all_, unc = p._classify(Ctx(1000, 1000, 128, 96, None, torch.device("cpu")))
    assert unc is None and any_.shape == all_.shape == (1, 8, 11)


# -- density -----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(lengths, st.data())
def test_density_exact(lens, data):
    q_len, kv_len = lens
    p = data.draw(block_sparse(kv_len, per_head=data.draw(st.booleans())))
    h = p.blocks.shape[0] if p.head_dependent else None
    m = expand(p, q_len, kv_len)
    assert p.count_visible(q_len, kv_len, h) == int(m.sum())
    assert p.density(q_len, kv_len, h) == pytest.approx(int(m.sum()) / m.numel(), abs=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.3, 0.5, 1.0])
def test_random_density_and_diagonal(density):
    n, b = 4096, 128
    p = BlockSparse.random(n, n, density, block_size=b, seed=0)
    blocks = p.blocks
    assert blocks.shape == (32, 32) and blocks.diagonal().all()
    assert abs(p.block_density() - density) <= 1 / 32**2
    assert p.density(n, n) == pytest.approx(p.block_density(), abs=1e-12)   # aligned: token = block density
    assert p.density() == p.density(n, n)
    # causal: a fraction of the block triangle (diagonal included), nothing above the diagonal
    c = BlockSparse.random(n, n, density, block_size=b, causal=True, seed=0)
    tri = torch.ones(32, 32, dtype=torch.bool).tril()
    assert not (c.blocks & ~tri).any() and c.blocks.diagonal().all()
    assert int(c.blocks.sum()) == round(density * int(tri.sum()))
    exact = (c & Causal()).density(n, n)
    assert exact == pytest.approx(((c.blocks.float() * 128 * 128).sum() - 32 * (128 * 127 / 2)).item() / n**2)


def test_random_is_deterministic_and_rows_never_empty():
    a = BlockSparse.random(1000, 1000, 0.2, block_size=64, seed=7)
    assert a == BlockSparse.random(1000, 1000, 0.2, block_size=64, seed=7)
    assert hash(a) == hash(BlockSparse.random(1000, 1000, 0.2, block_size=64, seed=7))
    assert a != BlockSparse.random(1000, 1000, 0.2, block_size=64, seed=8)
    # every query sees its own key, so no row is empty, even for tiny densities and odd block shapes
    for q_len, kv_len, bs in [(1000, 1000, 64), (300, 1000, (48, 80)), (37, 37, (5, 3))]:
        for causal in (False, True):
            p = BlockSparse.random(q_len, kv_len, 0.01, block_size=bs, causal=causal, seed=1) & Causal()
            m = lib_masks(p, q_len, kv_len)[0]
            assert m.any(-1).all()


def test_per_head_random():
    p = BlockSparse.random(256, 256, 0.3, block_size=32, num_heads=4, seed=2)
    assert p.head_dependent and p.blocks.shape == (4, 8, 8)
    assert not all(torch.equal(p.blocks[0], p.blocks[h]) for h in range(1, 4))   # heads differ
    m = expand(p, 256, 256)
    assert p.density(256, 256, 4) == pytest.approx(int(m.sum()) / m.numel())
    for h in range(4):
        got = p.mask(torch.arange(256)[:, None], torch.arange(256)[None, :], 256, 256, head=h)
        assert torch.equal(got, m[h])
    check_layout(p, 256, 256, 64, 16, num_heads=4)


# -- values ------------------------------------------------------------------------------------------
def test_hashable_value():
    m = torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    p = BlockSparse(m, (3, 4))
    assert p == BlockSparse(m.clone(), [3, 4]) and hash(p) == hash(BlockSparse(m.clone(), (3, 4)))
    assert p != BlockSparse(m, 3) and p != BlockSparse(~m, (3, 4))
    copy = dataclasses.replace(p)
    assert copy == p and copy is not p and copy in {p}
    assert torch.equal(p.blocks, m)
    assert BlockSparse(m.int(), (3, 4)) == p                          # 0/1 integers are accepted
    text = repr(p)
    assert text.startswith("BlockSparse(<5x6 blocks") and "block_size=(3, 4)" in text
    assert repr(BlockSparse(m, 8)).endswith("block_size=8)")
    with pytest.raises(AttributeError):
        p.block_mask.bits = b""


# -- errors ------------------------------------------------------------------------------------------
def test_errors():
    m = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="BlockSparse block_mask has 4 x 4 blocks of 8 x 8.*kv_len=40 needs"):
        BlockSparse(m, 8).block_layout(40, 40)
    with pytest.raises(ValueError, match="kv_len=33 needs at least 5 x 5"):
        BlockSparse(m, 8).density(33, 33)
    with pytest.raises(ValueError, match="kv_len=33"):
        BlockSparse(torch.ones(5, 4, dtype=torch.bool), 8).check(1, 33)   # too few key blocks
    BlockSparse(m, 8).check(64, 32)                                       # fits (Lq > Lk: some see nothing)
    with pytest.raises(ValueError, match="per-head block mask for 2 heads but the query has 3"):
        BlockSparse(torch.ones(2, 4, 4, dtype=torch.bool), 8).block_layout(32, 32, num_heads=3)
    with pytest.raises(TypeError, match="bool tensor"):
        BlockSparse(torch.rand(4, 4), 8)
    with pytest.raises(TypeError, match="bool tensor"):
        BlockSparse(torch.tensor([[0, 2]]), 8)
    with pytest.raises(TypeError, match="block_mask must be a bool tensor"):
        BlockSparse(object(), 8)
    with pytest.raises(ValueError, match="shape"):
        BlockSparse(torch.ones(4, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="empty"):
        BlockSparse(torch.ones(0, 4, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="block_size"):
        BlockSparse(m, 0)
    with pytest.raises(ValueError, match="block_size"):
        BlockSparse(m, (8, 8, 8))
    with pytest.raises(TypeError, match="block_size"):
        BlockSparse(m, 8.0)
    with pytest.raises(ValueError, match="density"):
        BlockSparse.random(64, 64, 0.0)
    with pytest.raises(ValueError, match="density"):
        BlockSparse.random(64, 64, 1.5)
    with pytest.raises(ValueError, match="q_len"):
        BlockSparse.random(0, 64, 0.5)
    with pytest.raises(ValueError, match="head"):
        BlockSparse(torch.ones(2, 4, 4, dtype=torch.bool), 8).mask(0, 0, 32, 32)
    # through the API: the error names the pattern's problem
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="BlockSparse"):
        az.attention(q, q, q, BlockSparse(m, 8), backend="reference")


# -- the Triton kernel -------------------------------------------------------------------------------
triton_cases = {
    "aligned": (lambda: BlockSparse.random(64, 64, 0.4, block_size=16, seed=1), (1, 4, 2, 64, 64)),
    "odd-blocks": (lambda: BlockSparse.random(45, 45, 0.4, block_size=(7, 5), seed=2), (2, 2, 1, 45, 45)),
    "causal": (lambda: BlockSparse.random(40, 40, 0.5, block_size=8, causal=True, seed=3) & Causal(),
               (1, 4, 2, 40, 40)),
    "cross-q<k": (lambda: BlockSparse.random(13, 45, 0.5, block_size=(6, 9), seed=4), (1, 2, 1, 13, 45)),
    "cross-q>k": (lambda: BlockSparse.random(45, 19, 0.6, block_size=5, seed=5), (1, 2, 1, 45, 19)),
    "per-head": (lambda: BlockSparse.random(40, 40, 0.3, block_size=(8, 6), num_heads=4, seed=6),
                 (1, 4, 2, 40, 40)),
    "sinks|blocks": (lambda: BlockSparse.random(40, 40, 0.2, block_size=10, seed=7) | az.Sinks(3),
                     (1, 2, 1, 40, 40)),
}


@pytest.mark.parametrize("name", triton_cases)
def test_triton_forward_matches_reference(name):
    pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
    from attnzoo.backends import reference_attention
    from attnzoo.backends.triton.ops import attention_fwd
    from attnzoo.testing import check_close

    make, (b, hq, hkv, lq, lk) = triton_cases[name]
    pattern = make()
    d = 32
    gen = torch.Generator().manual_seed(len(name))
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    for cfg in (None, dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)):
        out, lse = attention_fwd(q.float(), k.float(), v.float(), pattern, d ** -0.5, poison=True, cfg=cfg)
        check_close("out", out, ref_o)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "lse: -inf rows differ"
        fin = torch.isfinite(ref_l)
        torch.testing.assert_close(lse[fin].double(), ref_l[fin].double(), rtol=1e-5, atol=1e-5)


def test_triton_codegen_source():
    from attnzoo.backends.triton.codegen import generate, supports
    p = BlockSparse(torch.eye(3, dtype=torch.bool), (4, 2))
    lines, aux = generate(p, 6, 6)
    src = "\n".join(lines)
    assert "// 4" in src and "// 2" in src and "* 3" in src and "tl.load(AUX" in src
    assert aux.dtype == torch.int32 and aux.tolist() == torch.eye(3, dtype=torch.int32).reshape(-1).tolist()
    assert supports(p & Causal()) == (True, "")
    # per head: the head picks its slice of the table
    ph = BlockSparse(torch.ones(2, 3, 3, dtype=torch.bool), 4)
    assert "hq" in "\n".join(generate(ph, 12, 12)[0])


@pytest.mark.parametrize("name", ["causal", "per-head", "odd-blocks"])
def test_triton_backward_matches_reference(name):
    pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
    from attnzoo.backends import reference_attention
    from attnzoo.backends.triton.ops import attention_bwd, attention_fwd
    from attnzoo.testing import check_close

    make, (b, hq, hkv, lq, lk) = triton_cases[name]
    pattern = make()
    d = 32
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).requires_grad_()
               for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    out, _ = reference_attention(q, k, v, pattern)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ref = torch.autograd.grad((out * w).sum(), (q, k, v))
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    o, lse = attention_fwd(qf, kf, vf, pattern, d ** -0.5)
    got = attention_bwd(w.float(), None, qf, kf, vf, o, lse, pattern, d ** -0.5, poison=True)
    for gname, g, r in zip(("dq", "dk", "dv"), got, ref):
        check_close(gname, g, r)
