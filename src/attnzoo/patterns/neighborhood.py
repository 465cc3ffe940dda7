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

In row-major order a block of consecutive tokens is a thin strip of the grid, so a multi-axis
neighbourhood touches many blocks, nearly all partial. `TiledNeighborhood` is the same attention over
tokens reordered tile by tile (NATTEN / GNA's token permutation), where a block is a compact N-D tile;
`neighborhood_tiling` picks the tile for a kernel's block size and gives the permutation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .base import Ctx, Pattern, _check_int

_ENUM_BUDGET = 1 << 23  # query x kernel-volume pairs enumerated per step in block classification


def _per_axis(name, value, ndim, kind=int, owner="Neighborhood"):
    if isinstance(value, (tuple, list)):
        vals = tuple(value)
        if len(vals) != ndim:
            raise ValueError(f"{owner} {name} has {len(vals)} entries but the grid has {ndim} axes")
    else:
        vals = (value,) * ndim
    out = []
    for i, v in enumerate(vals):
        if kind is bool:
            if not isinstance(v, bool):
                raise TypeError(f"{owner} {name}[{i}] must be a bool, got {type(v).__name__}")
            out.append(v)
        else:
            out.append(_check_int(f"{owner} {name}[{i}]" if ndim > 1 else f"{owner} {name}", v, 1))
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
        pos = [torch.arange(L, device=ctx.device) * math.prod(grid[a + 1:]) for a, L in enumerate(grid)]
        return self._classify_enum(ctx, grid, pos)

    def _classify_enum(self, ctx: Ctx, grid, pos):
        """Block flags by enumerating every query's window, for any token order in which a token's
        position is a sum of per-axis terms: the token at coordinates ``c`` sits at position
        ``sum(pos[a][c[a]])`` (row-major order: ``pos[a][x] = x * stride_a``)."""
        dev = ctx.device
        keys = []
        for a in range(self.ndim):
            kc, kv = self._axis_keys(a, grid[a], dev)
            keys.append((pos[a][kc], kv))  # (L, K): position terms of every query coordinate's keys
        vol = math.prod(self.kernel_size)
        counts = torch.zeros(ctx.nq * ctx.nk, dtype=torch.int64, device=dev)
        n = ctx.q_len
        step = max(1, _ENUM_BUDGET // vol)
        for s0 in range(0, n, step):
            q = torch.arange(s0, min(n, s0 + step), device=dev)
            qc = self._coords(q, grid)
            qpos = sum(pos[a][qc[a]] for a in range(self.ndim))
            flat = torch.zeros((q.numel(),) + (1,) * self.ndim, dtype=torch.int64, device=dev)
            valid = torch.ones_like(flat, dtype=torch.bool)
            for a in range(self.ndim):
                kp, kv = keys[a]
                shape = [q.numel()] + [1] * self.ndim
                shape[1 + a] = self.kernel_size[a]
                flat = flat + kp[qc[a]].view(shape)
                valid = valid & kv[qc[a]].view(shape)
            valid = valid.expand(flat.shape).reshape(q.numel(), -1)
            flat = flat.reshape(q.numel(), -1)
            pair = (qpos // ctx.block_q)[:, None] * ctx.nk + torch.div(flat, ctx.block_k, rounding_mode="floor")
            counts += torch.bincount(pair[valid], minlength=ctx.nq * ctx.nk)
        counts = counts.view(ctx.nq, ctx.nk)
        p0, p1, k0, k1 = ctx.ranges()
        area = (p1 - p0 + 1) * (k1 - k0 + 1)
        return counts > 0, counts == area, None  # exact: never uncertain (no host sync)

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


# --------------------------------------------------------------------------------------------------
# Tile-major token order: a block of consecutive tokens is a compact N-D tile
# --------------------------------------------------------------------------------------------------
# Relative cost of a partial block (elementwise mask) vs. a full one when `neighborhood_tiling` ranks
# tile shapes. An estimate (the mask is ~3 integer ops per pair and axis next to the block's matmuls),
# not a measurement.
_PARTIAL_COST = 1.5


def _check_tile(nb: Neighborhood, tile) -> tuple:
    """Validate ``tile`` for ``nb`` -> the tile as a tuple of ints (raises ValueError / TypeError)."""
    if not isinstance(nb, Neighborhood):
        raise TypeError(f"TiledNeighborhood needs a Neighborhood, got {type(nb).__name__}: {nb!r}")
    if nb.grid is None:
        raise ValueError(f"TiledNeighborhood needs a Neighborhood with grid= (the token grid shape), got {nb!r}")
    tile = _per_axis("tile", tile, nb.ndim, owner="TiledNeighborhood")
    for a, (L, d, t) in enumerate(zip(nb.grid, nb.dilation, tile)):
        if L % d:
            raise ValueError(f"TiledNeighborhood: dilation[{a}] = {d} does not divide grid[{a}] = {L} "
                             f"(tiles are cut inside dilation groups, which must have equal sizes)")
        if (L // d) % t:
            what = f"grid[{a}] = {L}" if d == 1 else f"the dilation group length grid[{a}] / dilation[{a}] = {L // d}"
            raise ValueError(f"TiledNeighborhood: tile[{a}] = {t} does not divide {what}")
    return tile


class _TileGeometry:
    """Mixed-radix description of the tile-major order (see `TiledNeighborhood`).

    A token at grid coordinates ``c`` has, per axis, dilation group ``g = c % d``, tile ``t = (c // d) // T``
    and offset ``r = (c // d) % T``; its position is ``sum_a g_a * GS[a] + t_a * TS[a] + r_a * RS[a]``.
    """

    def __init__(self, grid, dilation, tile):
        n = len(grid)
        self.grid, self.dilation, self.tile = tuple(grid), tuple(dilation), tuple(tile)
        self.lg = tuple(L // d for L, d in zip(grid, dilation))              # group lengths
        self.nt = tuple(lg // t for lg, t in zip(self.lg, tile))            # tiles per group and axis
        self.vol = math.prod(tile)
        self.ng = math.prod(self.lg)                                         # tokens per dilation group
        self.n = math.prod(grid)
        self.RS = tuple(math.prod(tile[a + 1:]) for a in range(n))
        self.TS = tuple(self.vol * math.prod(self.nt[a + 1:]) for a in range(n))
        self.GS = tuple(self.ng * math.prod(dilation[a + 1:]) for a in range(n))
        self.strides = tuple(math.prod(grid[a + 1:]) for a in range(n))     # row-major strides

    def axis_pos(self, a, x):
        """Position term of coordinate(s) x on axis a."""
        d, T = self.dilation[a], self.tile[a]
        i = torch.div(x, d, rounding_mode="floor")
        return torch.remainder(x, d) * self.GS[a] + torch.div(i, T, rounding_mode="floor") * self.TS[a] \
            + torch.remainder(i, T) * self.RS[a]

    def coords(self, pos):
        """Grid coordinates (one tensor per axis) of the tokens at positions ``pos``."""
        out = []
        for a in range(len(self.grid)):
            g = torch.remainder(torch.div(pos, self.GS[a], rounding_mode="floor"), self.dilation[a])
            t = torch.remainder(torch.div(pos, self.TS[a], rounding_mode="floor"), self.nt[a])
            r = torch.remainder(torch.div(pos, self.RS[a], rounding_mode="floor"), self.tile[a])
            out.append((t * self.tile[a] + r) * self.dilation[a] + g)
        return out

    def to_original(self, pos):
        """Row-major token index of the tokens at positions ``pos``."""
        return sum(c * s for c, s in zip(self.coords(pos), self.strides))

    def axis_tile(self, a, x):
        """Per-axis tile id ``g * nt + t`` of coordinate(s) x on axis a."""
        d = self.dilation[a]
        return torch.remainder(x, d) * self.nt[a] + torch.div(torch.div(x, d, rounding_mode="floor"),
                                                              self.tile[a], rounding_mode="floor")


def _axis_tile_counts(nb: Neighborhood, geo: _TileGeometry, a: int, device) -> torch.Tensor:
    """(n_a, n_a) int64 with n_a = dilation * tiles per group: visible (query, key) coordinate pairs on
    axis a between every pair of per-axis tiles (indexed ``g * nt + t``)."""
    L = nb.grid[a]
    kc, kv = nb._axis_keys(a, L, device)                       # (L, K) key coordinates, validity
    x = torch.arange(L, device=device)
    n_a = geo.dilation[a] * geo.nt[a]
    pair = geo.axis_tile(a, x)[:, None] * n_a + geo.axis_tile(a, kc)
    return torch.bincount(pair[kv], minlength=n_a * n_a).view(n_a, n_a)


@functools.lru_cache(maxsize=256)
def _geometry(geo_key: tuple) -> _TileGeometry:
    return _TileGeometry(*geo_key)


@functools.lru_cache(maxsize=64)
def _permutation(geo_key: tuple, device: str):
    geo = _geometry(geo_key)
    perm = geo.to_original(torch.arange(geo.n, dtype=torch.int64, device=device))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(geo.n, dtype=torch.int64, device=device)
    return perm, inv


@dataclass(frozen=True)
class TiledNeighborhood(Pattern):
    """A `Neighborhood` over tokens reordered tile by tile, so that a block of consecutive tokens is an N-D tile.

    ``TiledNeighborhood(neighborhood, tile)``: the token at position ``i`` is the original (row-major)
    token ``perm[i]`` and ``mask(i, j) == neighborhood.mask(perm[i], perm[j])``. The order (NATTEN / GNA's
    token permutation), per axis of length ``L`` with dilation ``d`` and tile length ``T``: coordinate ``c``
    lies in dilation group ``c % d`` at group coordinate ``c // d``, in tile ``(c // d) // T`` at offset
    ``(c // d) % T``. Tokens are ordered by dilation group (row-major over the groups), then by tile
    (row-major over the tile grid of the group), then row-major inside the tile; a tile's ``prod(tile)``
    tokens are contiguous. Requires ``d | L`` and ``T | L / d`` on every axis. With blocks of
    ``prod(tile)`` tokens a query block's neighbourhood covers few key blocks, most of them fully visible.

    `neighborhood_tiling` picks a tile for a kernel block size and returns ``perm`` / ``inv``;
    `permutation` gives them too. Run attention on ``x.index_select(-2, perm)`` and restore the
    original order of the output with ``out.index_select(-2, inv)``.
    """
    neighborhood: Neighborhood
    tile: tuple

    def __init__(self, neighborhood, tile):
        tile = _check_tile(neighborhood, tile)
        object.__setattr__(self, "neighborhood", neighborhood)
        object.__setattr__(self, "tile", tile)

    @property
    def ndim(self) -> int:
        return self.neighborhood.ndim

    @property
    def grid(self) -> tuple:
        return self.neighborhood.grid

    def _geo_key(self) -> tuple:
        return (self.neighborhood.grid, self.neighborhood.dilation, self.tile)

    def _geometry(self) -> _TileGeometry:
        return _geometry(self._geo_key())

    def permutation(self, device=None):
        """-> (perm, inv) int64 tensors of length prod(grid): ``perm[i]`` is the original (row-major) index
        of the token at position ``i``; ``inv[perm[i]] == i``. Cached: do not modify them in place."""
        return _permutation(self._geo_key(), str(torch.device(device or "cpu")))

    def _identity(self) -> bool:
        """Whether the order is the row-major one: no dilation groups and a tile ``(1, .., 1, T, L, .., L)``
        (whole trailing axes after the first axis cut by more than one token)."""
        nb = self.neighborhood
        if any(d > 1 for d in nb.dilation):
            return False
        first = next((a for a, t in enumerate(self.tile) if t > 1), nb.ndim)
        return all(t == L for t, L in zip(self.tile[first + 1:], nb.grid[first + 1:]))

    def check(self, q_len, kv_len, num_heads=None):
        if q_len != kv_len:
            raise ValueError(f"pattern: TiledNeighborhood is self-attention; query length {q_len} != "
                             f"key length {kv_len}")
        self.neighborhood.check(q_len, kv_len, num_heads)

    def _mask_pos(self, p, k, ctx, head):
        # Arithmetic, no table: positions outside [0, N) map to some token (their mask is irrelevant).
        geo = self._geometry()
        return self.neighborhood._mask_pos(geo.to_original(p), geo.to_original(k), ctx, head)

    def _classify(self, ctx: Ctx):
        nb, geo = self.neighborhood, self._geometry()
        if ctx.block_q == ctx.block_k == geo.vol:
            return self._classify_tiles(ctx, geo)
        pos = [geo.axis_pos(a, torch.arange(L, device=ctx.device)) for a, L in enumerate(nb.grid)]
        return nb._classify_enum(ctx, nb.grid, pos)

    def _classify_tiles(self, ctx: Ctx, geo: _TileGeometry):
        """Blocks are exactly the tiles: visibility is a per-axis AND and a tile a product of per-axis
        ranges, so a block pair's count is the product of per-axis counts (O(sum of L * K) + the output)."""
        n = self.ndim
        any_ = all_ = None
        for a in range(n):
            c = _axis_tile_counts(self.neighborhood, geo, a, ctx.device)
            d, nt = geo.dilation[a], geo.nt[a]
            shape = [1] * (4 * n)
            shape[a], shape[n + a], shape[2 * n + a], shape[3 * n + a] = d, nt, d, nt
            aa = (c > 0).view(shape)                                   # dims (g, t) of the query, then the key
            fa = (c == geo.tile[a] ** 2).view(shape)
            any_ = aa if any_ is None else any_ & aa
            all_ = fa if all_ is None else all_ & fa
        nq = geo.n // geo.vol
        return any_.reshape(nq, nq), all_.reshape(nq, nq), None  # exact

    def count_visible(self, q_len, kv_len, num_heads=None):
        return self.neighborhood.count_visible(q_len, kv_len, num_heads)

    def __repr__(self):
        return f"TiledNeighborhood({self.neighborhood!r}, tile={self.tile})"


def _tile_candidates(lengths, block: int) -> list:
    """Every tile with prod(tile) == block and tile[a] | lengths[a]."""
    out = []

    def rec(a, rem, acc):
        if a == len(lengths) - 1:
            if lengths[a] % rem == 0:
                out.append(acc + (rem,))
            return
        for t in range(1, rem + 1):
            if rem % t == 0 and lengths[a] % t == 0:
                rec(a + 1, rem // t, acc + (t,))

    rec(0, block, ())
    return out


@functools.lru_cache(maxsize=64)
def _best_tile(nb: Neighborhood, block: int):
    if nb.grid is None or nb.ndim == 1:
        return None
    if any(L % d for L, d in zip(nb.grid, nb.dilation)):
        return None
    lg = tuple(L // d for L, d in zip(nb.grid, nb.dilation))
    axis_stats: dict = {}

    def stats(a, t):  # (visited, full) per-axis tile pairs
        if (a, t) not in axis_stats:
            tile = tuple(t if b == a else 1 for b in range(nb.ndim))
            c = _axis_tile_counts(nb, _TileGeometry(nb.grid, nb.dilation, tile), a, torch.device("cpu"))
            axis_stats[a, t] = (int((c > 0).sum()), int((c == t * t).sum()))
        return axis_stats[a, t]

    best = None
    for tile in _tile_candidates(lg, block):
        visited = math.prod(stats(a, t)[0] for a, t in enumerate(tile))
        full = math.prod(stats(a, t)[1] for a, t in enumerate(tile))
        cost = full + _PARTIAL_COST * (visited - full)
        key = (cost, max(tile) / min(tile), tuple(-t for t in reversed(tile)))
        if best is None or key < best[0]:
            best = (key, tile)
    return None if best is None else best[1]


def neighborhood_tiling(pattern: Neighborhood, block: int, device=None):
    """Tile a multi-axis `Neighborhood` for a kernel whose query and key blocks hold ``block`` tokens.

    Returns ``(perm, inv, tiled)`` or None. ``tiled`` is the `TiledNeighborhood` with a tile of exactly
    ``block`` tokens that divides the grid (in dilation-group coordinates); among those, the tile with
    the fewest visited blocks (a partial block weighted ``1.5`` full ones), computed exactly per axis,
    then the most cube-like one: e.g. a 13x13 kernel on a 128x128 grid with 64-token blocks gets 8x8
    tiles, a 5x7x7 kernel on 16x32x32 gets 4x4x4. ``perm`` / ``inv`` (int64, length prod(grid), on
    ``device``) map positions to original row-major indices and back (see `TiledNeighborhood`):
    ``out = attention(q[..., perm, :], k[..., perm, :], v[..., perm, :], tiled)[..., inv, :]``.

    None when nothing fits or helps: a 1-D pattern (row-major order is already compact), no tile of
    ``block`` tokens divides the grid, a dilation does not divide its axis, or the best tile gives the
    row-major order itself (e.g. a 7x7 kernel on 32x32 with 64-token blocks: a block is two whole rows,
    76 partial blocks, vs. 100 with 8x8 tiles). Cached per (pattern, block, device); do not modify the
    returned tensors in place. For blocks of unequal sizes, tile for one of them: the layout stays exact.
    """
    if not isinstance(pattern, Neighborhood):
        raise TypeError(f"neighborhood_tiling needs a Neighborhood, got {type(pattern).__name__}: {pattern!r}")
    _check_int("neighborhood_tiling block", block, 1)
    return _tiling(pattern, block, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _tiling(pattern: Neighborhood, block: int, device: str):
    tile = _best_tile(pattern, block)
    if tile is None:
        return None
    tiled = TiledNeighborhood(pattern, tile)
    if tiled._identity():
        return None
    perm, inv = tiled.permutation(device)
    return perm, inv, tiled
