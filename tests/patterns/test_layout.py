"""`block_layout` and `density` against the naive reference, and the `BlockLayout` field format."""
from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.patterns import (BlockLayout, Causal, Chunked, Document, Full, Mask, Neighborhood, PerHead,
                              PowerAttention, Sinks, SlidingWindow, Strided)
from naive import head_dependent, naive_masks, naive_neighborhood_mask_kron
from pattern_strategies import (LEAF_CLASSES, composite_patterns, head_patterns, head_stripes, leaf_strategies,
                                mod3, neighborhoods, qkv_lengths)

blocks = st.integers(1, 20)


def block_counts(masks: torch.Tensor, block_q: int, block_k: int):
    """Visible pairs and area (valid pairs) of every block: masks (H, Lq, Lk) -> (H, nq, nk) x 2."""
    h, lq, lk = masks.shape
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    padded = torch.zeros(h, nq * block_q, nk * block_k, dtype=torch.int64)
    padded[:, :lq, :lk] = masks.long()
    valid = torch.zeros(1, nq * block_q, nk * block_k, dtype=torch.int64)
    valid[:, :lq, :lk] = 1
    count = padded.view(h, nq, block_q, nk, block_k).sum((2, 4))
    area = valid.view(1, nq, block_q, nk, block_k).sum((2, 4))
    return count, area


def check_layout(pattern, q_len, kv_len, block_q, block_k, num_heads=None):
    masks = naive_masks(pattern, q_len, kv_len, num_heads)           # (H, Lq, Lk)
    lay = pattern.block_layout(q_len, kv_len, block_q, block_k, num_heads=num_heads)
    full, partial = lay.full_blocks(), lay.partial_blocks()
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    H = masks.shape[0]
    assert full.dtype == partial.dtype == torch.bool
    assert full.shape[1:] == partial.shape[1:] == (nq, nk)
    assert full.shape[0] == partial.shape[0] and full.shape[0] in (1, H)
    assert (lay.num_q_blocks, lay.num_kv_blocks) == (nq, nk)
    full, partial = full.expand(H, nq, nk), partial.expand(H, nq, nk)
    count, area = block_counts(masks, block_q, block_k)
    assert (area > 0).all()
    ctx = f"{pattern!r} Lq={q_len} Lk={kv_len} block=({block_q},{block_k}) H={num_heads}"
    assert not (full & partial).any(), f"{ctx}: a block is both full and partial"
    bad = full & (count != area)
    assert not bad.any(), f"{ctx}: full blocks with an invisible pair: {bad.nonzero().tolist()[:5]}"
    bad = partial & (count == 0)
    assert not bad.any(), f"{ctx}: partial blocks with no visible pair: {bad.nonzero().tolist()[:5]}"
    bad = partial & (count == area)
    assert not bad.any(), f"{ctx}: partial blocks that are entirely visible: {bad.nonzero().tolist()[:5]}"
    bad = (count > 0) & ~full & ~partial
    assert not bad.any(), f"{ctx}: visible pairs in blocks that are not visited: {bad.nonzero().tolist()[:5]}"
    return lay, masks


def check_density(pattern, q_len, kv_len, num_heads=None):
    masks = naive_masks(pattern, q_len, kv_len, num_heads)
    want = int(masks.sum()) / masks.numel()
    got = pattern.density(q_len, kv_len, num_heads=num_heads)
    assert isinstance(got, float)
    assert abs(got - want) <= 1e-12, f"{pattern!r} Lq={q_len} Lk={kv_len} H={num_heads}: {got} != {want}"


# -- layout covers exactly the visible pairs ---------------------------------------------------------
@settings(max_examples=240, deadline=None)
@given(qkv_lengths(), blocks, blocks, st.data())
def test_layout_head_independent(lengths, block_q, block_k, data):
    q_len, kv_len = lengths
    pattern = data.draw(composite_patterns(kv_len))
    num_heads = data.draw(st.sampled_from([None, 3]))
    check_layout(pattern, q_len, kv_len, block_q, block_k, num_heads)


@pytest.mark.parametrize("cls", LEAF_CLASSES)
@settings(max_examples=30, deadline=None)
@given(lengths=qkv_lengths(), block_q=blocks, block_k=blocks, data=st.data())
def test_layout_each_class(cls, lengths, block_q, block_k, data):
    q_len, kv_len = lengths
    pattern = data.draw(leaf_strategies(kv_len)[cls])
    check_layout(pattern, q_len, kv_len, block_q, block_k)
    check_density(pattern, q_len, kv_len)


@settings(max_examples=100, deadline=None)
@given(qkv_lengths(max_len=32), blocks, blocks, st.data())
def test_layout_head_dependent(lengths, block_q, block_k, data):
    q_len, kv_len = lengths
    pattern, h = data.draw(head_patterns(kv_len))
    lay, _ = check_layout(pattern, q_len, kv_len, block_q, block_k, h)
    assert lay.num_heads == h


@settings(max_examples=120, deadline=None)
@given(neighborhoods(), blocks, blocks, st.data())
def test_layout_neighborhood(nb_n, block_q, block_k, data):
    nb, n = nb_n
    pattern = data.draw(st.sampled_from([nb, nb | Sinks(3), nb & Causal(), PerHead([nb, Full()])]))
    check_layout(pattern, n, n, block_q, block_k, 2 if isinstance(pattern, PerHead) else None)


@st.composite
def large_neighborhoods(draw):
    ndim = draw(st.integers(1, 3))
    lo, hi = {1: (500, 2000), 2: (20, 60), 3: (6, 16)}[ndim]
    grid = [draw(st.integers(lo, hi)) for _ in range(ndim)]
    ks, ds, ss, cs = [], [], [], []
    for L in grid:
        k = draw(st.integers(1, min(L, 13)))
        ks.append(k), ds.append(draw(st.integers(1, L // k)))
        ss.append(draw(st.integers(1, k))), cs.append(draw(st.booleans()))
    return Neighborhood(tuple(ks), dilation=tuple(ds), stride=tuple(ss), causal=tuple(cs), grid=tuple(grid))


@settings(max_examples=15, deadline=None)
@given(large_neighborhoods(), st.sampled_from([32, 64, 128, 50]), st.sampled_from([32, 64, 128, 33]))
def test_layout_neighborhood_large_grids(nb, block_q, block_k):
    """Grids of up to ~3600 tokens, against the Kronecker product of the naive per-axis windows."""
    n = math.prod(nb.grid)
    m = naive_neighborhood_mask_kron(nb, n)
    count, area = block_counts(m[None], block_q, block_k)
    lay = nb.block_layout(n, n, block_q, block_k)
    assert torch.equal(lay.full_blocks()[0], (count == area)[0])
    assert torch.equal(lay.partial_blocks()[0], ((count > 0) & (count < area))[0])
    assert abs(nb.density(n, n) - int(m.sum()) / m.numel()) <= 1e-12
    i, j = torch.randint(0, n, (4096,)), torch.randint(0, n, (4096,))
    assert torch.equal(nb.mask(i, j, n, n), m[i, j])


@pytest.mark.parametrize("pattern", [Full(), Causal(), SlidingWindow(5), SlidingWindow(3, 2), Sinks(4), Chunked(8),
                                     PowerAttention(2, sinks=3), PowerAttention(11, sinks=4),
                                     SlidingWindow(7) | Sinks(4), SlidingWindow(9) | Sinks(5), Mask(mod3),
                                     Causal() & Mask(mod3)], ids=repr)
@pytest.mark.parametrize("q_len, kv_len, block_q, block_k", [(40, 40, 8, 8), (37, 45, 8, 5), (45, 37, 6, 16),
                                                             (1, 45, 4, 4), (23, 23, 23, 23), (23, 23, 64, 64),
                                                             (16, 16, 8, 8)])
def test_layout_fixed_cases(pattern, q_len, kv_len, block_q, block_k):
    check_layout(pattern, q_len, kv_len, block_q, block_k)


def test_layout_union_completes_a_block():
    """Blocks that neither operand covers alone but their union does are full (settled exactly)."""
    # block (1, 0) with 8x8 blocks: the window misses only keys < 4 of the last queries, the sinks add them
    for pat in (PowerAttention(11, sinks=4), SlidingWindow(11) | Sinks(4), Sinks(4) | PowerAttention(11)):
        lay, _ = check_layout(pat, 16, 16, 8, 8)
        assert bool(lay.full_blocks()[0, 1, 0])


def test_layout_strided_stride1():
    # Strided(1) is exactly Causal(): block (1, 0) of an 8x8 causal mask with 4x4 blocks is fully visible
    # (regression: the closed form once assumed stride >= 2 and reported it partial)
    lay, _ = check_layout(Strided(1), 8, 8, 4, 4)
    assert lay.full_blocks()[0].tolist() == [[False, False], [True, False]]
    for q_len, kv_len, bq, bk in [(40, 40, 8, 8), (37, 45, 8, 5), (45, 37, 6, 16)]:
        s1 = Strided(1).block_layout(q_len, kv_len, bq, bk)
        c = Causal().block_layout(q_len, kv_len, bq, bk)
        assert torch.equal(s1.full_blocks(), c.full_blocks())
        assert torch.equal(s1.partial_blocks(), c.partial_blocks())


@settings(max_examples=60, deadline=None)
@given(qkv_lengths(max_len=32), blocks, blocks, st.integers(1, 8))
def test_layout_strided(lengths, block_q, block_k, stride):
    q_len, kv_len = lengths
    check_layout(Strided(stride), q_len, kv_len, block_q, block_k)


# -- density ---------------------------------------------------------------------------------------
@settings(max_examples=160, deadline=None)
@given(qkv_lengths(), st.data())
def test_density(lengths, data):
    q_len, kv_len = lengths
    check_density(data.draw(composite_patterns(kv_len)), q_len, kv_len)


@settings(max_examples=80, deadline=None)
@given(qkv_lengths(max_len=32), st.data())
def test_density_per_head(lengths, data):
    q_len, kv_len = lengths
    pattern, h = data.draw(head_patterns(kv_len))
    check_density(pattern, q_len, kv_len, num_heads=h)


@settings(max_examples=80, deadline=None)
@given(neighborhoods())
def test_density_neighborhood(nb_n):
    nb, n = nb_n
    check_density(nb, n, n)
    check_density(nb | Sinks(2), n, n)


def test_density_per_head_is_mean_over_heads():
    pat = PerHead([Full(), Causal(), Chunked(4), SlidingWindow(0)])
    # Full: 1; Causal on 8x8: 36/64; Chunked(4): 32/64; SlidingWindow(0): 8/64
    assert abs(pat.density(8, 8, num_heads=4) - (64 + 36 + 32 + 8) / (4 * 64)) <= 1e-12
    pm = Mask(head_stripes, per_head=True)
    check_density(pm, 9, 11, num_heads=3)


# -- field format ------------------------------------------------------------------------------------
def check_csr(num, idx, sel):
    """num (1,H,nq) int32 and idx (1,H,nq,nk) int32 list exactly the blocks of sel, first and ascending."""
    H, nq, nk = sel.shape
    assert num.dtype == idx.dtype == torch.int32
    assert num.shape == (1, H, nq) and idx.shape == (1, H, nq, nk)
    for h in range(H):
        for q in range(nq):
            want = sel[h, q].nonzero().view(-1).tolist()
            n = int(num[0, h, q])
            assert n == len(want)
            assert idx[0, h, q, :n].tolist() == want
            assert ((idx[0, h, q] >= 0) & (idx[0, h, q] < nk)).all()


@settings(max_examples=80, deadline=None)
@given(qkv_lengths(max_len=32), blocks, blocks, st.data())
def test_field_format(lengths, block_q, block_k, data):
    q_len, kv_len = lengths
    if data.draw(st.booleans()):
        pattern, h = data.draw(head_patterns(kv_len))
    else:
        pattern, h = data.draw(composite_patterns(kv_len)), None
    lay = pattern.block_layout(q_len, kv_len, block_q, block_k, num_heads=h)
    H = h if head_dependent(pattern) else 1
    # the naive classification, not the layout's own decoding, is the reference
    count, area = block_counts(naive_masks(pattern, q_len, kv_len, h), block_q, block_k)
    check_csr(lay.kv_num_blocks, lay.kv_indices, ((count > 0) & (count < area)).expand(H, -1, -1))
    check_csr(lay.full_kv_num_blocks, lay.full_kv_indices, (count == area).expand(H, -1, -1))
    assert (lay.block_q, lay.block_k, lay.q_len, lay.kv_len) == (block_q, block_k, q_len, kv_len)
    assert lay.num_heads == H
    visited = int(((count > 0).expand(H, -1, -1)).sum())
    assert abs(lay.block_density() - visited / count.expand(H, -1, -1).numel()) <= 1e-12


@settings(max_examples=50, deadline=None)
@given(qkv_lengths(max_len=40), blocks, blocks, st.data())
def test_block_mask_round_trip(lengths, block_q, block_k, data):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q_len, kv_len = lengths
    if data.draw(st.booleans()):
        pattern, h = data.draw(head_patterns(kv_len))
    else:
        pattern, h = data.draw(composite_patterns(kv_len)), None
    lay = pattern.block_layout(q_len, kv_len, block_q, block_k, num_heads=h)
    bm = lay.to_block_mask()
    assert tuple(bm.seq_lengths) == (q_len, kv_len)
    back = BlockLayout.from_block_mask(bm)
    assert torch.equal(back.partial_blocks(), lay.partial_blocks())
    assert torch.equal(back.full_blocks(), lay.full_blocks())
    assert (back.block_q, back.block_k, back.q_len, back.kv_len) == (block_q, block_k, q_len, kv_len)


def test_from_block_mask_of_create_block_mask():
    """A BlockMask built by FlexAttention itself from the same mask_mod decodes to the same blocks."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    L, B = 48, 16
    for pat in (SlidingWindow(5) | Sinks(2), (Document([20, 28]) & Causal()) | Sinks(2)):
        bm = fa.create_block_mask(pat.mask_mod(L, L), None, None, L, L, device="cpu", BLOCK_SIZE=B)
        got = BlockLayout.from_block_mask(bm)
        lay = pat.block_layout(L, L, B, B)
        assert torch.equal(got.partial_blocks() | got.full_blocks(), lay.partial_blocks() | lay.full_blocks())
        assert torch.equal(got.full_blocks(), lay.full_blocks())


# -- long sequences: closed forms, never N x N --------------------------------------------------------
def _sliding_sinks_block_counts(n: int, block: int, left: int, sinks: int):
    """(partial, full) visited blocks of SlidingWindow(left) | Sinks(sinks), by hand (n % block == 0, 0 <
    sinks < block, left >= block). Block pair (qb, kb) at diagonal offset t = qb - kb spans distances
    [t*B - (B-1), t*B + (B-1)]."""
    B, nb = block, n // block
    t_any = (left + B - 1) // B          # window touches the block: t*B - (B-1) <= left and t*B + B-1 >= 0
    t_all_hi = (left - (B - 1)) // B     # window covers it: t*B + B - 1 <= left and t*B - (B-1) >= 0
    t_all_lo = 1 if B > 1 else 0
    window_any = sum(nb - t for t in range(0, t_any + 1))
    window_full = sum(nb - t for t in range(t_all_lo, t_all_hi + 1))
    # the sink columns (kb = 0) add every query block below the band, always partial (B > sinks)
    sink_only = nb - (t_any + 1)
    visited = window_any + sink_only
    # a band block of column 0 that the window alone leaves partial is completed by the sinks when every
    # key it misses is a sink: its last query minus the first non-sink key is within the window
    completed = sum(1 for t in range(max(t_all_hi + 1, 1), min(t_any, nb - 1) + 1) if t * B + B - 1 - sinks <= left)
    full = window_full + completed
    return visited - full, full


def _sliding_sinks_visible(n: int, left: int, sinks: int) -> int:
    """Visible pairs of SlidingWindow(left) | Sinks(sinks) at q_len = kv_len = n, by hand."""
    window = (left + 1) * (left + 2) // 2 + (n - left - 1) * (left + 1)    # min(p, left) + 1 summed over p
    # sink key k is an extra when k < p - left: sum over t = p - left in 1..n-1-left of min(sinks, t)
    m = n - 1 - left
    extra = m * (m + 1) // 2 if m <= sinks else sinks * (sinks + 1) // 2 + (m - sinks) * sinks
    return window + extra


def test_closed_form_helpers_match_naive():
    """The hand formulas used below, checked against the naive reference on small sizes."""
    for n, B, left, s in [(64, 8, 15, 4), (96, 8, 20, 3), (48, 4, 7, 2), (64, 16, 40, 1), (80, 8, 9, 7)]:
        pat = SlidingWindow(left) | Sinks(s)
        m = naive_masks(pat, n, n)
        count, area = block_counts(m, B, B)
        assert _sliding_sinks_block_counts(n, B, left, s) == (int(((count > 0) & (count < area)).sum()),
                                                              int((count == area).sum()))
        assert _sliding_sinks_visible(n, left, s) == int(m.sum())


def test_long_sequence_layout_is_closed_form(monkeypatch):
    """SlidingWindow(1023) | Sinks(4) at 64K tokens: exact block counts quickly, no N x N evaluation."""
    n, B, left, s = 65536, 128, 1023, 4
    evaluated = [0]
    orig = {cls: cls._mask_pos for cls in (SlidingWindow, Sinks)}

    def counting(cls):
        def _mask_pos(self, p, k, ctx, head):
            out = orig[cls](self, p, k, ctx, head)
            evaluated[0] += out.numel()
            return out
        return _mask_pos

    for cls in orig:
        monkeypatch.setattr(cls, "_mask_pos", counting(cls))
    pat = SlidingWindow(left) | Sinks(s)
    t0 = time.perf_counter()
    lay = pat.block_layout(n, n, B, B)
    elapsed = time.perf_counter() - t0
    evaluated_layout = evaluated[0]
    dens = pat.density(n, n)
    partial, full = _sliding_sinks_block_counts(n, B, left, s)
    assert (partial, full) == (1519, 3556)       # the closed form, evaluated once by hand as well
    assert int(lay.kv_num_blocks.sum()) == partial
    assert int(lay.full_kv_num_blocks.sum()) == full
    assert abs(dens - _sliding_sinks_visible(n, left, s) / (n * n)) <= 1e-12
    # the layout evaluates the mask only on the two blocks where both operands are partial: (0, 0) and (8, 0)
    assert evaluated_layout <= 2 * 2 * B * B, evaluated_layout
    assert elapsed < 5.0, elapsed
    # density counts partial blocks elementwise, O(N * window), still far from N x N
    assert evaluated[0] - evaluated_layout < n * n // 50, evaluated[0]


# -- the sort-free CSR and the launch-light layout path -------------------------------------------------
from attnzoo.patterns import Dilated, PrefixLM  # noqa: E402
from attnzoo.patterns.base import Ctx  # noqa: E402

def _csr_by_sort(sel: torch.Tensor):
    """The reference CSR: a stable sort of "not selected" (selected first, then the rest, each ascending)."""
    num = sel.sum(-1, dtype=torch.int32)
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num, order


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_csr_matches_stable_sort(h, nq, nk, density, seed):
    """`_csr` (cumsum + scatter) gives exactly the stable-sort layout, padding tail included: the selected
    blocks first, ascending, then the unselected ones, ascending (what FlexAttention's own BlockMask holds)."""
    from attnzoo.patterns.layout import _csr, _csr_from_bool

    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(h, nq, nk, generator=g) < density
    sel[0, 0] = True                       # a full row and an empty row, always
    if nq > 1:
        sel[0, 1] = False
    num, idx = _csr(sel)
    want_num, want_idx = _csr_by_sort(sel)
    assert num.dtype == idx.dtype == torch.int32
    assert torch.equal(num, want_num) and torch.equal(idx, want_idx)
    assert num.is_contiguous() and idx.is_contiguous()
    num1, idx1 = _csr_from_bool(sel)
    assert num1.shape == (1, h, nq) and idx1.shape == (1, h, nq, nk)
    assert torch.equal(num1[0], want_num) and torch.equal(idx1[0], want_idx)


def _layout_by_sort(pattern, q_len, kv_len, block_q, block_k, num_heads=None):
    """The layout's four fields from the naive block counts and the stable-sort CSR (the original path)."""
    count, area = block_counts(naive_masks(pattern, q_len, kv_len, num_heads), block_q, block_k)
    full, partial = count == area, (count > 0) & (count < area)
    return (*_csr_by_sort(partial), *_csr_by_sort(full))


def check_same_fields(pattern, q_len, kv_len, block_q, block_k, num_heads=None):
    lay = pattern.block_layout(q_len, kv_len, block_q, block_k, num_heads=num_heads)
    want = _layout_by_sort(pattern, q_len, kv_len, block_q, block_k, num_heads)
    got = (lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks, lay.full_kv_indices)
    ctx = f"{pattern!r} Lq={q_len} Lk={kv_len} block=({block_q},{block_k}) H={num_heads}"
    for name, g, w in zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), got, want):
        assert g.shape[0] == 1 and g.dtype == torch.int32, ctx
        assert torch.equal(g[0], w.expand(g.shape[1:])), f"{ctx}: {name} differs from the sort-based layout"
        assert g.is_contiguous(), f"{ctx}: {name} not contiguous"


@settings(max_examples=150, deadline=None)
@given(qkv_lengths(), blocks, blocks, st.data())
def test_fields_equal_sort_based_layout(lengths, block_q, block_k, data):
    """Every field, padding included, equals what the naive block counts give through the stable sort:
    composites, cross shapes (Lq != Lk) and ragged ends."""
    q_len, kv_len = lengths
    check_same_fields(data.draw(composite_patterns(kv_len)), q_len, kv_len, block_q, block_k)


@settings(max_examples=60, deadline=None)
@given(qkv_lengths(max_len=32), blocks, blocks, st.data())
def test_fields_equal_sort_based_layout_per_head(lengths, block_q, block_k, data):
    q_len, kv_len = lengths
    pattern, h = data.draw(head_patterns(kv_len))
    check_same_fields(pattern, q_len, kv_len, block_q, block_k, h)


@pytest.mark.parametrize("q_len, kv_len, block_q, block_k", [(48, 48, 8, 8), (45, 37, 6, 16), (37, 45, 8, 5),
                                                             (1, 45, 4, 4), (45, 1, 4, 4), (20, 20, 64, 3)])
def test_fields_equal_sort_based_layout_banded(q_len, kv_len, block_q, block_k):
    """The banded patterns of long-context training, on exact grids, ragged ends and cross shapes."""
    doc = Document([kv_len // 3, kv_len - kv_len // 3] if kv_len >= 3 else [kv_len])
    for pat in (SlidingWindow(7), SlidingWindow(3, 5), SlidingWindow(11) | Sinks(4), Causal(), Sinks(3),
                Chunked(8), PrefixLM(10), PrefixLM(0), doc, doc & Causal(), (doc & Causal()) | Sinks(2),
                SlidingWindow(5) & Chunked(16), PerHead([SlidingWindow(3), Causal(), Chunked(5)])):
        check_same_fields(pat, q_len, kv_len, block_q, block_k, 3 if isinstance(pat, PerHead) else None)


class _OpLog:
    """The non-view ATen ops dispatched inside the block, and those of them that touch ``device`` (on a GPU
    each of those is a kernel launch or a copy; on the CPU it would be a CPU op)."""

    def __init__(self, device="meta"):
        self.device = torch.device(device)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log, dev_log = self.ops, self.device_ops = [], []
        dev = self.device

        def on_device(x):
            return isinstance(x, torch.Tensor) and x.device.type == dev.type

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
                    log.append(str(func))
                    flat = list(args) + list((kwargs or {}).values()) + (list(out) if isinstance(out, (tuple, list))
                                                                         else [out])
                    if any(on_device(x) for x in flat):
                        dev_log.append(str(func))
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


_SYNCING = ("nonzero", "_local_scalar_dense", "item", "is_nonzero", "equal", "unique", "masked_select")
_BANDED = [Full(), Causal(), SlidingWindow(1023), SlidingWindow(63, 64), Sinks(4), Sinks(300), Chunked(2048),
           PrefixLM(1000), PrefixLM(0), Document([3000, 5000, 192]), PerHead([Causal(), SlidingWindow(255)]),
           PerHead([Document([8000, 192]), Chunked(512), Full()])]


@pytest.mark.parametrize("pattern", _BANDED, ids=repr)
@pytest.mark.parametrize("shape", [(8192, 8192, 64, 64), (8192, 8192, 128, 128), (1000, 8192, 128, 48),
                                   (8192, 1000 + 7192, 100, 64)], ids=str)
def test_band_path_device_ops(pattern, shape):
    """Banded patterns (and PerHead of them) take the band path: on the device one host->device copy and
    three kernels (fill, scatter-add, cumsum), whatever the lengths; no (nq, nk) classification, no sync."""
    assert pattern._banded
    q_len, kv_len, bq, bk = shape
    h = len(pattern.patterns) if isinstance(pattern, PerHead) else 2
    pattern.block_layout(q_len, kv_len, bq, bk, num_heads=h)       # build any cached lookup table first
    ctx = Ctx(q_len, kv_len, bq, bk, h, torch.device("meta"))
    assert pattern._band_layout(ctx) is None                         # off the CPU: the dense path (measured)
    with _OpLog("meta") as log:
        lay = pattern._band_layout(ctx, force=True)
    assert not [op for op in log.ops if any(s in op for s in _SYNCING)], log.ops
    assert sorted(log.device_ops) == sorted(["aten._to_copy.default", "aten.ones.default",
                                             "aten.scatter_add_.default", "aten.cumsum_.default"]), log.device_ops
    assert lay.kv_indices.device.type == "meta"
    leaves = len(pattern.patterns) if isinstance(pattern, PerHead) else 1
    assert len(log.ops) <= 30 + 25 * leaves, log.ops  # the CPU side: a few dozen ops on (nq,) tensors


@pytest.mark.parametrize("pattern", [Strided(64), Dilated(8, 2), PowerAttention(64),
                                     PerHead([Causal(), Strided(16)])], ids=repr)
def test_dense_exact_patterns_never_sync(pattern):
    """Closed-form patterns without a band form classify every block pair on the device, in a fixed
    number of ops and without any data-dependent one (a device->host synchronisation on a GPU)."""
    assert not pattern._banded
    assert pattern._classify3(Ctx(8192, 8192, 64, 64, 2, torch.device("cpu")))[2] is None
    counts = []
    for shape in [(8192, 8192, 64, 64), (8192, 8192, 256, 128)]:
        with _OpLog("meta") as log:
            pattern.block_layout(*shape, device="meta", num_heads=2)
        assert not [op for op in log.ops if any(s in op for s in _SYNCING)], log.ops
        counts.append(len(log.device_ops))
    assert counts[0] == counts[1]


def test_layout_op_counts():
    """The common long-context layouts stay launch-light (on a GPU every device op is a kernel launch of
    ~5-20 us): 4 for the band path; the composite takes the dense path with one sync."""
    def device_ops(pat, n=65536, force=True):
        with _OpLog("meta") as log:
            if force:
                pat._band_layout(Ctx(n, n, 128, 128, None, torch.device("meta")), force=True)
            else:
                pat.block_layout(n, n, 128, 128, device="meta")
        return log.device_ops

    for pat in (SlidingWindow(1023), SlidingWindow(4095), Causal(), Chunked(2048), Document([4096] * 16)):
        assert len(device_ops(pat)) == 4
        assert len(device_ops(pat, force=False)) <= 30     # the dense path, used on GPUs
    # composites of banded patterns can merge their pieces on the CPU and settle the few blocks partial
    # in both operands there (the CPU device's path): the same four device ops
    for pat in (SlidingWindow(1023) | Sinks(4), Document([4096] * 16) & Causal(), Sinks(4) | SlidingWindow(8, 8)):
        ctx = Ctx(65536, 65536, 128, 128, None, torch.device("meta"))
        with _OpLog("meta") as log:
            assert pat._band_layout(ctx, force=True) is not None
        assert len(log.device_ops) == 4, log.device_ops
        assert pat._band_layout(ctx) is None     # off the CPU: the dense path (faster there, measured)
    with _OpLog("cpu") as log:                    # the general path (meta tensors cannot run nonzero())
        (SlidingWindow(1023) | Sinks(4))._dense_layout(Ctx(65536, 65536, 128, 128, None, torch.device("cpu")))
    assert sum("nonzero" in op for op in log.ops) == 1
    assert len(log.ops) <= 60, log.ops
    with _OpLog("cpu") as log:
        Strided(64).block_layout(65536, 65536, 128, 128)
    assert len(log.ops) <= 40, log.ops


# -- the band path against the dense classification, at sizes the naive reference cannot reach ---------
@st.composite
def banded_patterns(draw, kv_len: int):
    n = st.integers
    leaf = st.one_of(st.builds(SlidingWindow, n(0, 300), n(0, 300)), st.builds(Sinks, n(1, 300)), st.just(Causal()),
                     st.builds(Chunked, n(1, 400)), st.builds(PrefixLM, n(0, 400)), st.just(Full()),
                     _big_documents(kv_len))
    if draw(st.booleans()):
        return draw(leaf), None
    h = draw(n(1, 3))
    return PerHead([draw(leaf) for _ in range(h)]), h


@st.composite
def _big_documents(draw, kv_len: int):
    cuts = draw(st.sets(st.integers(1, kv_len - 1), max_size=12)) if kv_len > 1 else set()
    bounds = [0, *sorted(cuts), kv_len]
    return Document([b - a for a, b in zip(bounds, bounds[1:])])


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1500), st.integers(1, 1500), st.integers(1, 130), st.integers(1, 130), st.data())
def test_band_path_equals_dense_path(q_len, kv_len, block_q, block_k, data):
    """Every field of the band path equals the dense path's (classification + sort-free CSR), on cross
    shapes and ragged ends, per-head too."""
    pattern, h = data.draw(banded_patterns(kv_len))
    ctx = Ctx(q_len, kv_len, block_q, block_k, h, torch.device("cpu"))
    band, dense = pattern._band_layout(ctx), pattern._dense_layout(ctx)
    for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        a, b = getattr(band, f), getattr(dense, f)
        assert a.dtype == b.dtype == torch.int32 and a.is_contiguous()
        assert torch.equal(a, b.expand_as(a)), f"{pattern!r} Lq={q_len} Lk={kv_len} block=({block_q},{block_k}): {f}"


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 1200), st.integers(1, 1200), st.integers(1, 100), st.integers(1, 100), st.data())
def test_band_path_equals_dense_path_composites(q_len, kv_len, block_q, block_k, data):
    """Unions and intersections of banded patterns merge their pieces on the CPU and settle the blocks
    partial in both operands by evaluating the mask there: the same fields as the dense path."""
    pa, ha = data.draw(banded_patterns(kv_len))
    pb, hb = data.draw(banded_patterns(kv_len))
    if ha is not None and hb is not None and ha != hb:
        pb, hb = data.draw(banded_patterns(kv_len).filter(lambda t: t[1] is None))
    pattern = (pa | pb) if data.draw(st.booleans()) else (pa & pb)
    if data.draw(st.booleans()):
        pc, hc = data.draw(banded_patterns(kv_len).filter(lambda t: t[1] is None))
        pattern = (pattern | pc) if data.draw(st.booleans()) else (pattern & pc)
    h = ha or hb
    assert pattern._banded and not pattern._band_leaf
    ctx = Ctx(q_len, kv_len, block_q, block_k, h, torch.device("cpu"))
    band, dense = pattern._band_layout(ctx), pattern._dense_layout(ctx)
    if band is None:                               # too many blocks to settle on the CPU: falls back
        return
    for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        a, b = getattr(band, f), getattr(dense, f)
        assert torch.equal(a, b.expand_as(a)), f"{pattern!r} Lq={q_len} Lk={kv_len} block=({block_q},{block_k}): {f}"


@settings(max_examples=80, deadline=None)
@given(qkv_lengths(), blocks, blocks, st.data())
def test_composite_fallback_to_dense(lengths, block_q, block_k, data):
    """With no CPU evaluation budget a composite with blocks partial in both operands takes the general
    path; the fields are the same either way (naive reference)."""
    import attnzoo.patterns.base as base

    q_len, kv_len = lengths
    pattern = data.draw(composite_patterns(kv_len))
    old = base._BAND_EVAL_BUDGET
    base._BAND_EVAL_BUDGET = 0
    try:
        check_same_fields(pattern, q_len, kv_len, block_q, block_k)
    finally:
        base._BAND_EVAL_BUDGET = old


def test_band_composite_settles_on_cpu():
    """SlidingWindow | Sinks: the sink column's blocks on the window's edge are settled on the CPU (the
    union completes some of them: full), with the same result as the naive reference."""
    for n, bq, bk in [(64, 8, 8), (96, 8, 16), (100, 12, 7)]:
        for pat in (SlidingWindow(11) | Sinks(4), Sinks(4) | SlidingWindow(11), SlidingWindow(20, 3) | Sinks(9),
                    (Document([30, n - 30]) & Causal()) | Sinks(2)):
            assert pat._banded
            check_same_fields(pat, n, n, bq, bk)
            check_same_fields(pat, n - 17, n, bq, bk)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.integers(1, 80), st.integers(1, 80), st.data())
def test_band_rows_numpy_and_torch_agree(q_len, kv_len, block_q, block_k, data):
    """The band leaves' row arithmetic gives the same rows on numpy arrays and on CPU tensors (the
    fallback without numpy), and the CSR built from either is the same."""
    from attnzoo.patterns.base import Rows
    from attnzoo.patterns.layout import _band_csr

    pytest.importorskip("numpy")
    pattern, h = data.draw(banded_patterns(kv_len))
    ctx = Ctx(q_len, kv_len, block_q, block_k, h, torch.device("cpu"))
    a = pattern._band_rows(Rows(ctx, use_numpy=True))
    b = pattern._band_rows(Rows(ctx, use_numpy=False))
    assert isinstance(b, torch.Tensor) and torch.equal(torch.from_numpy(a), b)
    nk = ctx.nk
    for x, y in zip(_band_csr(a, nk, "cpu"), _band_csr(b, nk, "cpu")):
        assert torch.equal(x, y)
