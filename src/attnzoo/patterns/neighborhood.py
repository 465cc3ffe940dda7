"""N-D neighborhood attention over a 1-D, 2-D or 3-D token grid, with NATTEN's definitions.

Tokens are flattened row-major from ``grid``. Per axis (length ``L``, kernel ``K``, dilation ``d``,
stride ``s``), a coordinate ``x`` lives in dilation group ``x % d`` at group coordinate ``x // d``; the
group holds ``L // d + (x % d < L % d)`` coordinates. Query ``q`` sees key ``k`` iff on every axis they
share a dilation group and, in group coordinates ``i`` (query) and ``j`` (key):

- non-causal: the stride tile's leader ``c = min((i // s) * s + s // 2, Lg - 1)`` is clamped to
  ``[K // 2, Lg - 1 - (K - 1) // 2]`` (the window shifts inward at borders, so every query sees
  exactly ``K`` keys on the axis) and ``c - K // 2 <= j <= c + (K - 1) // 2``;
- causal: ``j <= i`` and ``leader - j < K`` with ``leader = min((i // s) * s + s - 1, Lg - 1)``.

With ``stride == 1`` these are NATTEN's neighborhood / dilated / causal neighborhood attention; with
``stride > 1`` they are GNA's strided neighborhoods (queries of one stride tile share a window).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .base import Ctx, Pattern, _check_int

_ENUM_BUDGET = 1 << 23  # query x kernel-volume pairs enumerated per step in block classification


def _per_axis(name, value, ndim, kind=int):
    if isinstance(value, (tuple, list)):
        vals = tuple(value)
        if len(vals) != ndim:
            raise ValueError(f"Neighborhood {name} has {len(vals)} entries but the grid has {ndim} axes")
    else:
        vals = (value,) * ndim
    out = []
    for i, v in enumerate(vals):
        if kind is bool:
            if not isinstance(v, bool):
                raise TypeError(f"Neighborhood {name}[{i}] must be a bool, got {type(v).__name__}")
            out.append(v)
        else:
            out.append(_check_int(f"Neighborhood {name}[{i}]" if ndim > 1 else f"Neighborhood {name}", v, 1))
    return tuple(out)


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """``Neighborhood(kernel_size, dilation=1, stride=1, causal=False, grid=None)``.

    ``grid`` is the token grid's shape (row-major flattening); ``None`` means 1-D over the whole
    sequence. ``kernel_size``, ``dilation``, ``stride`` and ``causal`` are ints/bools or per-axis tuples.
    Self-attention only: query length = key length = prod(grid).
    """
    kernel_size: tuple
    dilation: tuple = 1
    stride: tuple = 1
    causal: tuple = False
    grid: Optional[tuple] = None

    def __init__(self, kernel_size, dilation=1, stride=1, causal=False, grid=None):
        if grid is not None:
            if isinstance(grid, int):
                grid = (grid,)
            grid = tuple(grid)
            if not 1 <= len(grid) <= 3:
                raise ValueError(f"Neighborhood grid must have 1, 2 or 3 axes, got {len(grid)}")
            for i, g in enumerate(grid):
                _check_int(f"Neighborhood grid[{i}]", g, 1)
            ndim = len(grid)
        else:
            ndim = len(kernel_size) if isinstance(kernel_size, (tuple, list)) else 1
            if ndim != 1:
                raise ValueError("Neighborhood: a multi-axis kernel_size needs grid= (the token grid shape)")
        ks = _per_axis("kernel_size", kernel_size, ndim)
        dil = _per_axis("dilation", dilation, ndim)
        st = _per_axis("stride", stride, ndim)
        ca = _per_axis("causal", causal, ndim, bool)
        for i, (k, s) in enumerate(zip(ks, st)):
            if s > k:
                raise ValueError(f"Neighborhood stride[{i}]={s} must not exceed kernel_size[{i}]={k}")
        if grid is not None:
            for i, (k, d, g) in enumerate(zip(ks, dil, grid)):
                if k * d > g:
                    raise ValueError(f"Neighborhood kernel_size[{i}]*dilation[{i}] = {k}*{d} exceeds grid[{i}] = {g}")
        for name, val in (("kernel_size", ks), ("dilation", dil), ("stride", st), ("causal", ca), ("grid", grid)):
            object.__setattr__(self, name, val)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def _grid(self, length: int) -> tuple:
        return self.grid if self.grid is not None else (length,)

    def check(self, q_len, kv_len, num_heads=None):
        if q_len != kv_len:
            raise ValueError(f"pattern: Neighborhood is self-attention; query length {q_len} != key length {kv_len}")
        grid = self._grid(kv_len)
        if math.prod(grid) != kv_len:
            raise ValueError(f"pattern: Neighborhood grid {grid} has {math.prod(grid)} tokens but the sequence has {kv_len}")
        for i, (k, d, g) in enumerate(zip(self.kernel_size, self.dilation, grid)):
            if k * d > g:
                raise ValueError(f"pattern: Neighborhood kernel_size[{i}]*dilation[{i}] = {k}*{d} exceeds the grid extent {g}")

    # -- per-axis definitions ---------------------------------------------------------------------
    def _coords(self, idx, grid):
        out, rest = [], idx
        for a in reversed(range(len(grid))):
            out.append(torch.remainder(rest, grid[a]))
            rest = torch.div(rest, grid[a], rounding_mode="floor")
        return out[::-1]

    @staticmethod
    def _axis_window(x, L, K, d, s, causal):
        """For coordinates x: (group g, group coord i, lowest and highest visible group coord j)."""
        g = torch.remainder(x, d)
        i = torch.div(x, d, rounding_mode="floor")
        Lg = L // d + (g < (L % d)).to(x.dtype)
        tile = torch.div(i, s, rounding_mode="floor") * s
        if causal:
            leader = torch.minimum(tile + s - 1, Lg - 1)
            return g, i, torch.clamp(leader - K + 1, min=0), i
        leader = torch.minimum(tile + s // 2, Lg - 1)
        left, right = K // 2, (K - 1) // 2
        center = torch.maximum(torch.minimum(leader, Lg - 1 - right), torch.full_like(leader, left))
        return g, i, center - left, center + right

    def _mask_pos(self, p, k, ctx, head):
        grid = self._grid(ctx.kv_len)
        qc, kc = self._coords(p, grid), self._coords(k, grid)
        m = None
        for a in range(self.ndim):
            g, _, lo, hi = self._axis_window(qc[a], grid[a], self.kernel_size[a], self.dilation[a],
                                             self.stride[a], self.causal[a])
            kg = torch.remainder(kc[a], self.dilation[a])
            kj = torch.div(kc[a], self.dilation[a], rounding_mode="floor")
            ma = (kg == g) & (kj >= lo) & (kj <= hi)
            m = ma if m is None else (m & ma)
        return m

    # -- block classification by enumerating each query's window (O(N * kernel volume)) ----------
    def _axis_keys(self, a, L, device):
        """(L, K) key coordinates on axis a for every query coordinate, and their validity."""
        K, d = self.kernel_size[a], self.dilation[a]
        x = torch.arange(L, device=device)
        g, i, lo, hi = self._axis_window(x, L, K, d, self.stride[a], self.causal[a])
        t = torch.arange(K, device=device)
        j = lo[:, None] + t[None, :]
        valid = j <= hi[:, None]
        return (j * d + g[:, None]).clamp(max=L - 1), valid

    def _classify(self, ctx: Ctx):
        grid = self._grid(ctx.kv_len)
        dev = ctx.device
        strides = [math.prod(grid[a + 1:]) for a in range(self.ndim)]
        keys = [self._axis_keys(a, grid[a], dev) for a in range(self.ndim)]
        vol = math.prod(self.kernel_size)
        counts = torch.zeros(ctx.nq * ctx.nk, dtype=torch.int64, device=dev)
        n = ctx.q_len
        step = max(1, _ENUM_BUDGET // vol)
        for s0 in range(0, n, step):
            q = torch.arange(s0, min(n, s0 + step), device=dev)
            qc = self._coords(q, grid)
            flat = torch.zeros((q.numel(),) + (1,) * self.ndim, dtype=torch.int64, device=dev)
            valid = torch.ones_like(flat, dtype=torch.bool)
            for a in range(self.ndim):
                kc, kv = keys[a]
                shape = [q.numel()] + [1] * self.ndim
                shape[1 + a] = self.kernel_size[a]
                flat = flat + (kc[qc[a]] * strides[a]).view(shape)
                valid = valid & kv[qc[a]].view(shape)
            valid = valid.expand(flat.shape).reshape(q.numel(), -1)
            flat = flat.reshape(q.numel(), -1)
            pair = (q // ctx.block_q)[:, None] * ctx.nk + torch.div(flat, ctx.block_k, rounding_mode="floor")
            counts += torch.bincount(pair[valid], minlength=ctx.nq * ctx.nk)
        counts = counts.view(ctx.nq, ctx.nk)
        p0, p1, k0, k1 = ctx.ranges()
        area = (p1 - p0 + 1) * (k1 - k0 + 1)
        return counts > 0, counts == area, torch.zeros((), dtype=torch.bool, device=dev)

    def count_visible(self, q_len, kv_len, num_heads=None):
        grid = self._grid(kv_len)
        total = 1
        for a in range(self.ndim):
            _, valid = self._axis_keys(a, grid[a], torch.device("cpu"))
            total *= int(valid.sum())
        return total

    def __repr__(self):
        def one(t):
            return t[0] if len(set(t)) == 1 and self.ndim == 1 else t
        parts = [f"kernel_size={one(self.kernel_size)}"]
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={one(self.dilation)}")
        if any(s != 1 for s in self.stride):
            parts.append(f"stride={one(self.stride)}")
        if any(self.causal):
            parts.append(f"causal={one(self.causal)}")
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        return f"Neighborhood({', '.join(parts)})"
