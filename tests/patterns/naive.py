"""Loop-based, obviously-correct reference definitions of every attnzoo pattern.

Written from the specification (pure Python ints, one branch per pattern class), reading only the
patterns' public fields: nothing here calls a pattern's own ``mask`` / ``_mask_pos`` / ``_classify``.

Query ``i`` of ``q_len`` sits at position ``p = i + kv_len - q_len``; ``j`` is the key index.
"""
from __future__ import annotations

import itertools
import math

import torch

from attnzoo.patterns import (Causal, Chunked, Dilated, Document, Full, Intersection, Mask, Neighborhood,
                              PerHead, PowerAttention, PrefixLM, Sinks, SlidingWindow, Strided, Union)


# --------------------------------------------------------------------------------------------------
# Neighborhood attention, two independent NATTEN formulations
# --------------------------------------------------------------------------------------------------
def natten_axis_keys(x: int, L: int, K: int, d: int, s: int, causal: bool) -> list[int]:
    """The key coordinates query coordinate ``x`` sees on one axis (length L, kernel K, dilation d,
    stride s), computed as NATTEN / GNA do: find the window start in the dilation group, then list it."""
    g = x % d                      # dilation group
    i = x // d                     # coordinate inside the group
    Lg = L // d + (1 if g < L % d else 0)
    if causal:
        leader = min((i // s) * s + s - 1, Lg - 1)
        group_keys = [j for j in range(0, i + 1) if j > leader - K]
    else:
        leader = min((i // s) * s + s // 2, Lg - 1)
        lo_c, hi_c = K // 2, Lg - 1 - (K - 1) // 2
        c = max(lo_c, min(leader, hi_c))
        start = c - K // 2
        group_keys = [start + t for t in range(K)]
    keys = [j * d + g for j in group_keys]
    for k in keys:
        assert 0 <= k < L, (x, L, K, d, s, causal, keys)
    return keys


def natten_classic_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """NATTEN's original (v0.14-era CPU/CUDA kernel) ``get_window_start``; stride 1, non-causal."""
    neighborhood_size = kernel_size // 2
    if dilation <= 1:
        return (max(index - neighborhood_size, 0)
                + (1 if index + neighborhood_size >= length else 0) * (length - index - neighborhood_size - 1))
    ni = index - neighborhood_size * dilation
    if ni < 0:
        return index % dilation
    if index + neighborhood_size * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * neighborhood_size * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_classic_axis_keys(x: int, L: int, K: int, d: int) -> list[int]:
    start = natten_classic_window_start(x, L, K, d)
    return [start + t * d for t in range(K)]


def _unflatten(idx: int, grid) -> list[int]:
    coords = []
    for n in reversed(grid):
        coords.append(idx % n)
        idx //= n
    assert idx == 0
    return coords[::-1]


def _neighborhood_visible(pat: Neighborhood, p: int, j: int, kv_len: int) -> bool:
    grid = tuple(pat.grid) if pat.grid is not None else (kv_len,)
    assert math.prod(grid) == kv_len
    qc, kc = _unflatten(p, grid), _unflatten(j, grid)
    for a, L in enumerate(grid):
        keys = natten_axis_keys(qc[a], L, pat.kernel_size[a], pat.dilation[a], pat.stride[a], pat.causal[a])
        if kc[a] not in keys:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------------------
def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _doc_of(x: int, lengths) -> int:
    if x < 0:
        return -1
    end = 0
    for n, length in enumerate(lengths):
        end += length
        if x < end:
            return n
    return len(lengths)  # past the end (should not happen when lengths sum to kv_len)


def visible(pattern, i: int, j: int, q_len: int, kv_len: int, head=None) -> bool:
    """Whether query ``i`` (of ``q_len``) may attend to key ``j`` (of ``kv_len``)."""
    p = i + kv_len - q_len
    t = type(pattern)
    if t is Full:
        return True
    if t is Causal:
        return j <= p
    if t is SlidingWindow:
        return p - pattern.left <= j <= p + pattern.right
    if t is Sinks:
        return j < pattern.n and j <= p
    if t is Chunked:
        return p // pattern.size == j // pattern.size
    if t is Dilated:
        d = p - j
        return 0 <= d <= (pattern.window - 1) * pattern.dilation and d % pattern.dilation == 0
    if t is Strided:
        d = p - j
        return d >= 0 and (d < pattern.stride or d % pattern.stride == 0)
    if t is PrefixLM:
        return j < pattern.prefix_len or j <= p
    if t is Document:
        dp = _doc_of(p, pattern.lengths)
        return dp >= 0 and dp == _doc_of(j, pattern.lengths)
    if t is PowerAttention:
        d = p - j
        return (0 <= d <= pattern.window) or _is_pow2(d) or (pattern.sinks > 0 and j < pattern.sinks and d >= 0)
    if t is Union:
        return visible(pattern.a, i, j, q_len, kv_len, head) or visible(pattern.b, i, j, q_len, kv_len, head)
    if t is Intersection:
        return visible(pattern.a, i, j, q_len, kv_len, head) and visible(pattern.b, i, j, q_len, kv_len, head)
    if t is PerHead:
        if head is None:
            raise ValueError("PerHead needs head")
        return visible(pattern.patterns[head], i, j, q_len, kv_len, None)
    if t is Mask:
        out = pattern.fn(torch.tensor(0), torch.tensor(head or 0), torch.tensor(i), torch.tensor(j))
        return bool(out)
    if t is Neighborhood:
        return _neighborhood_visible(pattern, p, j, kv_len)
    raise TypeError(f"naive: unknown pattern type {t.__name__}")


def naive_mask(pattern, q_len: int, kv_len: int, head=None) -> torch.Tensor:
    """The full (q_len, kv_len) bool matrix of `visible`."""
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i, j in itertools.product(range(q_len), range(kv_len)):
        if visible(pattern, i, j, q_len, kv_len, head):
            out[i, j] = True
    return out


def head_dependent(pattern) -> bool:
    """Whether the pattern's visibility depends on the query head (from its public fields)."""
    if isinstance(pattern, PerHead):
        return True
    if isinstance(pattern, Mask):
        return bool(pattern.per_head)
    if isinstance(pattern, (Union, Intersection)):
        return head_dependent(pattern.a) or head_dependent(pattern.b)
    return False


def naive_masks(pattern, q_len: int, kv_len: int, num_heads=None) -> torch.Tensor:
    """(H, q_len, kv_len): one naive mask per head (H = 1 for head-independent patterns)."""
    if not head_dependent(pattern):
        return naive_mask(pattern, q_len, kv_len)[None]
    assert num_heads is not None
    return torch.stack([naive_mask(pattern, q_len, kv_len, head=h) for h in range(num_heads)])


def naive_neighborhood_mask_kron(pat: Neighborhood, n_tokens: int) -> torch.Tensor:
    """The Neighborhood mask on a larger grid, cheaply: visibility is a per-axis AND and tokens are
    flattened row-major, so the (N, N) mask is the Kronecker product of the per-axis (L, L) matrices,
    each listed with `natten_axis_keys`."""
    grid = tuple(pat.grid) if pat.grid is not None else (n_tokens,)
    m = torch.ones(1, 1, dtype=torch.int64)
    for a, L in enumerate(grid):
        axis = torch.zeros(L, L, dtype=torch.int64)
        for x in range(L):
            axis[x, natten_axis_keys(x, L, pat.kernel_size[a], pat.dilation[a], pat.stride[a], pat.causal[a])] = 1
        m = torch.kron(m, axis)
    assert m.shape == (n_tokens, n_tokens)
    return m.bool()
