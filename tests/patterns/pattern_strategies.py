"""Hypothesis strategies shared by the pattern tests (small lengths: the naive reference is O(Lq * Lk))."""
from __future__ import annotations

import math

from hypothesis import strategies as st

from attnzoo.patterns import (Causal, Chunked, Dilated, Document, Full, Mask, Neighborhood, PerHead,
                              PowerAttention, PrefixLM, Sinks, SlidingWindow, Strided)

MAX_LEN = 48


# FlexAttention-style mask functions (b, h, q_idx, kv_idx) on tensors, for `Mask`.
def mod3(b, h, q, k):
    return (q + 2 * k) % 3 != 0


def band2(b, h, q, k):
    return (q - k).abs() <= 2


def lower_even(b, h, q, k):
    return (k <= q) & (k % 2 == 0)


def head_stripes(b, h, q, k):
    return ((q + k + h) % (h + 2) == 0) | (k == h)


def head_causal_shift(b, h, q, k):
    return k <= q + h


HEAD_FREE_FNS = (mod3, band2, lower_even)
HEAD_FNS = (head_stripes, head_causal_shift)


@st.composite
def qkv_lengths(draw, max_len: int = MAX_LEN):
    """(q_len, kv_len) with q_len == kv_len, q_len < kv_len, q_len > kv_len or q_len == 1."""
    kind = draw(st.sampled_from(["eq", "q<kv", "q>kv", "q1"]))
    if kind == "eq":
        n = draw(st.integers(1, max_len))
        return n, n
    if kind == "q1":
        return 1, draw(st.integers(1, max_len))
    a = draw(st.integers(1, max_len - 1))
    b = draw(st.integers(a + 1, max_len))
    return (a, b) if kind == "q<kv" else (b, a)


@st.composite
def documents(draw, kv_len: int):
    cuts = draw(st.sets(st.integers(1, kv_len - 1), max_size=6)) if kv_len > 1 else set()
    bounds = [0, *sorted(cuts), kv_len]
    return Document([b - a for a, b in zip(bounds, bounds[1:])])


def leaf_strategies(kv_len: int) -> dict:
    """One strategy per head-independent pattern class, for any (q_len, kv_len) (Document: sum == kv_len)."""
    n = st.integers
    return {
        "SlidingWindow": st.one_of(st.builds(SlidingWindow, n(0, 50), n(0, 50)), st.builds(SlidingWindow, n(0, 8))),
        "Sinks": st.builds(Sinks, n(1, 50)),
        "Chunked": st.builds(Chunked, n(1, 50)),
        "Dilated": st.builds(Dilated, n(1, 12), n(1, 6)),
        "Strided": st.builds(Strided, n(1, 20)),
        "PrefixLM": st.builds(PrefixLM, n(0, 50)),
        "Document": documents(kv_len),
        "PowerAttention": st.builds(PowerAttention, n(0, 20), n(0, 8)),
        "Mask": st.builds(Mask, st.sampled_from(HEAD_FREE_FNS)),
        "Causal": st.just(Causal()),
        "Full": st.just(Full()),
    }


LEAF_CLASSES = tuple(leaf_strategies(1))


def base_patterns(kv_len: int):
    """Head-independent leaf patterns of every class."""
    return st.one_of(*leaf_strategies(kv_len).values())


def _or(pair):
    return pair[0] | pair[1]


def _and(pair):
    return pair[0] & pair[1]


def _combine(kids):
    return st.one_of(st.tuples(kids, kids).map(_or), st.tuples(kids, kids).map(_and))


def composite_patterns(kv_len: int, max_leaves: int = 4):
    """Leaves combined with | and & (head-independent)."""
    return st.recursive(base_patterns(kv_len), _combine, max_leaves=max_leaves)


@st.composite
def head_patterns(draw, kv_len: int):
    """(pattern, num_heads) for a head-dependent pattern: PerHead, Mask(per_head=True), composites."""
    kind = draw(st.sampled_from(["perhead", "perhead_op", "mask", "mask_op", "both"]))
    h = draw(st.integers(1, 4))
    per_head = PerHead(draw(st.lists(composite_patterns(kv_len, 2), min_size=h, max_size=h)))
    mask = Mask(draw(st.sampled_from(HEAD_FNS)), per_head=True)
    other = draw(composite_patterns(kv_len, 2))
    or_ = draw(st.booleans())

    def op(a, b):
        return (a | b) if or_ else (a & b)

    if kind == "perhead":
        return per_head, h
    if kind == "perhead_op":
        return (op(per_head, other) if draw(st.booleans()) else op(other, per_head)), h
    if kind == "mask":
        return mask, h
    if kind == "mask_op":
        return op(mask, other), h
    return op(per_head, mask), h


@st.composite
def neighborhoods(draw, max_tokens: int = MAX_LEN, ndim=None):
    """(Neighborhood, n_tokens) over a 1-D, 2-D or 3-D grid with prod(grid) <= max_tokens."""
    ndim = ndim or draw(st.integers(1, 3))
    grid, budget = [], max_tokens
    for a in range(ndim):
        rest = ndim - a - 1
        hi = max(1, budget // (2 ** rest))
        L = draw(st.integers(1 if hi < 2 else 2, hi))
        grid.append(L)
        budget //= L
    ks, ds, ss, cs = [], [], [], []
    for L in grid:
        k = draw(st.integers(1, L))
        d = draw(st.integers(1, L // k))
        s = draw(st.integers(1, k))
        ks.append(k), ds.append(d), ss.append(s), cs.append(draw(st.booleans()))

    def arg(vals):
        # sometimes give a scalar when every axis agrees (the constructor broadcasts it)
        if len(set(vals)) == 1 and draw(st.booleans()):
            return vals[0]
        return tuple(vals)

    n = math.prod(grid)
    if ndim == 1:
        g = draw(st.sampled_from([None, grid[0], tuple(grid)]))
    else:
        g = tuple(grid)
    return Neighborhood(arg(ks), dilation=arg(ds), stride=arg(ss), causal=arg(cs), grid=g), n
