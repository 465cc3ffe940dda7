"""`Pattern.mask` against the loop-based reference in naive.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.patterns import (Causal, Chunked, Dilated, Document, Full, Mask, Neighborhood, PerHead,
                              PowerAttention, PrefixLM, Sinks, SlidingWindow, Strided)
from naive import (natten_axis_keys, natten_classic_axis_keys, natten_classic_window_start, naive_mask,
                   visible)
from pattern_strategies import (LEAF_CLASSES, base_patterns, composite_patterns, head_patterns, leaf_strategies,
                                neighborhoods, qkv_lengths)


def lib_mask(pattern, q_len, kv_len, head=None):
    q = torch.arange(q_len)[:, None]
    k = torch.arange(kv_len)[None, :]
    out = pattern.mask(q, k, q_len, kv_len, head=head)
    assert out.dtype == torch.bool
    return out.expand(q_len, kv_len)


def lib_mask_mod(pattern, q_len, kv_len, head=None):
    """The same matrix through ``pattern.mask_mod`` (FlexAttention's (b, h, q_idx, kv_idx) signature)."""
    fn = pattern.mask_mod(q_len, kv_len)
    out = fn(torch.tensor(0), torch.tensor(head or 0), torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])
    return torch.as_tensor(out).to(torch.bool).expand(q_len, kv_len)


def assert_same(pattern, q_len, kv_len, head=None):
    want = naive_mask(pattern, q_len, kv_len, head)
    for how, got in (("mask", lib_mask(pattern, q_len, kv_len, head)),
                     ("mask_mod", lib_mask_mod(pattern, q_len, kv_len, head))):
        if not torch.equal(got, want):
            bad = (got != want).nonzero().tolist()[:5]
            raise AssertionError(f"{pattern!r} q_len={q_len} kv_len={kv_len} head={head}: {how} differs from "
                                 f"the naive reference at (q, k) = {bad} (lib={[bool(got[i, j]) for i, j in bad]})")


# -- sanity anchors for the reference itself (hand-computed) ----------------------------------------
def test_naive_hand_examples():
    # bottom-right alignment: q_len=2, kv_len=4 -> queries sit at positions 2 and 3
    assert naive_mask(Causal(), 2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    # q_len > kv_len: the first query sits at a negative position and sees nothing
    assert naive_mask(Causal(), 3, 2).tolist() == [[False, False], [True, False], [True, True]]
    assert naive_mask(SlidingWindow(1), 4, 4).tolist() == [
        [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert naive_mask(Chunked(2), 3, 4).tolist() == [[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert naive_mask(Chunked(2), 5, 4).tolist()[0] == [0, 0, 0, 0]  # p = -1 is in chunk -1
    assert naive_mask(Dilated(2, 2), 5, 5)[4].tolist() == [0, 0, 1, 0, 1]
    assert naive_mask(Strided(3), 8, 8)[7].tolist() == [0, 1, 0, 0, 1, 1, 1, 1]
    assert naive_mask(Document([2, 3]), 5, 5)[2].tolist() == [0, 0, 1, 1, 1]
    assert naive_mask(PowerAttention(0), 9, 9)[8].tolist() == [1, 0, 0, 0, 1, 0, 1, 1, 1]
    assert naive_mask(PowerAttention(0, sinks=2), 9, 9)[8].tolist() == [1, 1, 0, 0, 1, 0, 1, 1, 1]
    assert naive_mask(Sinks(2), 3, 3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert naive_mask(PrefixLM(2), 3, 3).tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]


def test_naive_natten_anchors():
    # 1-D, L=7, K=3: windows shift inward at the borders, every query sees exactly K keys
    assert [natten_axis_keys(x, 7, 3, 1, 1, False) for x in (0, 3, 6)] == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    # even kernel K=4: [c - 2, c + 1]
    assert natten_axis_keys(3, 8, 4, 1, 1, False) == [1, 2, 3, 4]
    # dilation 2 on L=7: group 0 = {0,2,4,6}, group 1 = {1,3,5}
    assert natten_axis_keys(1, 7, 3, 2, 1, False) == [1, 3, 5]
    assert natten_axis_keys(6, 7, 3, 2, 1, False) == [2, 4, 6]
    # causal: the K previous keys of the group, clipped at 0
    assert natten_axis_keys(1, 7, 3, 1, 1, True) == [0, 1]
    assert natten_axis_keys(5, 7, 3, 1, 1, True) == [3, 4, 5]
    # stride 2: queries 2 and 3 share the window of their tile leader (2 + 1 = 3)
    assert natten_axis_keys(2, 8, 3, 1, 2, False) == natten_axis_keys(3, 8, 3, 1, 2, False) == [2, 3, 4]
    # classic formula, same examples
    assert natten_classic_window_start(0, 7, 3, 1) == 0
    assert natten_classic_window_start(6, 7, 3, 1) == 4
    assert natten_classic_window_start(6, 7, 3, 2) == 2
    # 2-D: a 3x3 neighborhood of a corner token of a 4x4 grid is the top-left 3x3 square
    nb = Neighborhood(3, grid=(4, 4))
    seen = {j for j in range(16) if visible(nb, 0, j, 16, 16)}
    assert seen == {0, 1, 2, 4, 5, 6, 8, 9, 10}


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.data())
def test_naive_natten_window_sizes(L, data):
    """Facts about NATTEN windows the reference must satisfy: a non-causal query sees exactly K keys of its own
    dilation group (itself included when stride is 1); a causal one sees min(i + 1, K) keys at or before it."""
    K = data.draw(st.integers(1, L))
    d = data.draw(st.integers(1, L // K))
    s = data.draw(st.integers(1, K))
    for x in range(L):
        keys = natten_axis_keys(x, L, K, d, s, False)
        assert len(set(keys)) == K and all(k % d == x % d for k in keys)
        if s == 1:
            assert x in keys
        causal = natten_axis_keys(x, L, K, d, 1, True)
        assert sorted(causal) == [x - t * d for t in range(min(x // d + 1, K))][::-1]


def test_natten_naive_forms_agree():
    """The group-coordinate form and NATTEN's classic get_window_start agree (stride 1, odd K)."""
    checked = 0
    for L in range(1, 40):
        for K in range(1, L + 1, 2):
            for d in range(1, L // K + 1):
                for x in range(L):
                    a = natten_axis_keys(x, L, K, d, 1, False)
                    b = natten_classic_axis_keys(x, L, K, d)
                    assert a == b, (x, L, K, d, a, b)
                    checked += 1
    assert checked > 10000


# -- every pattern class, explicitly --------------------------------------------------------------
@settings(max_examples=180, deadline=None)
@given(qkv_lengths(), st.data())
def test_base_patterns(lengths, data):
    q_len, kv_len = lengths
    pattern = data.draw(base_patterns(kv_len))
    assert_same(pattern, q_len, kv_len)


@pytest.mark.parametrize("cls", LEAF_CLASSES)
@settings(max_examples=45, deadline=None)
@given(lengths=qkv_lengths(), data=st.data())
def test_each_class(cls, lengths, data):
    q_len, kv_len = lengths
    pattern = data.draw(leaf_strategies(kv_len)[cls])
    assert type(pattern).__name__ == cls
    assert_same(pattern, q_len, kv_len)


@settings(max_examples=150, deadline=None)
@given(qkv_lengths(), st.data())
def test_compositions(lengths, data):
    q_len, kv_len = lengths
    pattern = data.draw(composite_patterns(kv_len))
    assert_same(pattern, q_len, kv_len)


@settings(max_examples=120, deadline=None)
@given(qkv_lengths(max_len=24), st.data())
def test_head_dependent(lengths, data):
    q_len, kv_len = lengths
    pattern, h = data.draw(head_patterns(kv_len))
    for head in range(h):
        assert_same(pattern, q_len, kv_len, head=head)
    # a head tensor broadcasts like q_idx / kv_idx (FlexAttention calls mask_mod that way)
    heads = torch.arange(h)[:, None, None]
    got = pattern.mask(torch.arange(q_len)[None, :, None], torch.arange(kv_len)[None, None, :], q_len, kv_len,
                       head=heads).expand(h, q_len, kv_len)
    want = torch.stack([naive_mask(pattern, q_len, kv_len, head=i) for i in range(h)])
    assert torch.equal(got, want)


def test_perhead_selects_head():
    pat = PerHead([Causal(), Full(), SlidingWindow(1)])
    for h, inner in enumerate(pat.patterns):
        assert torch.equal(lib_mask(pat, 5, 7, head=h), naive_mask(inner, 5, 7))


def test_mask_gets_raw_query_index():
    # Mask's fn sees the query *index*, not its bottom-right position
    pat = Mask(lambda b, h, q, k: k == q)
    assert torch.equal(lib_mask(pat, 3, 6), torch.eye(3, 6, dtype=torch.bool))


# -- Neighborhood (self-attention, 1-D / 2-D / 3-D grids) ------------------------------------------
@pytest.mark.parametrize("ndim", [1, 2, 3])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_neighborhood(ndim, data):
    pattern, n = data.draw(neighborhoods(ndim=ndim))
    assert_same(pattern, n, n)


@settings(max_examples=75, deadline=None)
@given(st.data())
def test_neighborhood_composed(data):
    nb, n = data.draw(neighborhoods())
    other = data.draw(base_patterns(n))
    assert_same(nb | other, n, n)
    assert_same(other & nb, n, n)


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 40), st.data())
def test_neighborhood_stride1_matches_classic_natten(L, data):
    """1-D, stride 1, odd kernel: the library's mask equals NATTEN's classic get_window_start windows."""
    K = data.draw(st.integers(0, (L - 1) // 2)) * 2 + 1
    d = data.draw(st.integers(1, L // K))
    got = lib_mask(Neighborhood(K, dilation=d), L, L)
    want = torch.zeros(L, L, dtype=torch.bool)
    for x in range(L):
        want[x, natten_classic_axis_keys(x, L, K, d)] = True
    assert torch.equal(got, want)
