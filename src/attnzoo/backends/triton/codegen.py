"""Pattern -> Triton source for the in-kernel mask of partial blocks.

`generate(pattern, lq, lk)` returns ``(body, aux)``: the statements of a ``@triton.jit`` function
``_mask(qp, kk, hq, AUX)`` that computes visibility from query positions ``qp`` (BLOCK_M, 1),
key indices ``kk`` (1, BLOCK_N), the query head ``hq`` (scalar) and an int32 lookup buffer ``AUX``,
and the contents of that buffer (document ids, block-sparse bits), or None. Pattern parameters are baked into the
source as literals, so each pattern is its own specialised kernel (as with FlexAttention). The
definitions are the same as the patterns' `_mask_pos` (tests compare the kernel with them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...patterns import (BlockSparse, Causal, Chunked, Dilated, Document, Full, Intersection, Neighborhood, Pattern,
                         PerHead, PowerAttention, PrefixLM, RoutedBlocks, Sinks, SlidingWindow, Strided,
                         TiledNeighborhood, Union)


class Unsupported(Exception):
    """The pattern has no in-kernel mask (e.g. `Mask(fn)` with an arbitrary Python function)."""


_FALSE = "_F"  # (kmin) a term that is false for every key the mask is asked about


class _Gen:
    def __init__(self, lq: int, lk: int, tile: tuple | None = None, kmin: int = 0):
        self.lq, self.lk = lq, lk
        self.tile = tile  # (BLOCK_M, BLOCK_N) of the kernel that runs this mask, or None (any tile)
        self.kmin = kmin  # every key index the mask is asked about is >= kmin (0: no such knowledge)
        self.lines: list[str] = []
        self.aux: list[torch.Tensor] = []
        self.aux_len = 0
        self.n = 0
        # The names of the query-position and key-index variables the emitters read; an emitter that
        # maps indices (e.g. TiledNeighborhood's token order) can run another one on its own variables.
        self.qp, self.kk = "qp", "kk"

    def var(self, expr: str) -> str:
        self.n += 1
        name = f"m{self.n}"
        self.lines.append(f"{name} = {expr}")
        return name

    def real(self, name: str) -> str:
        """``name``, or for the constant-false term a variable that is false everywhere (same shape as a mask)."""
        if name == _FALSE:
            return self.var(f"({self.kk} < -2147483647) & ({self.qp} >= -2147483647)")
        return name

    def add_aux(self, t: torch.Tensor) -> int:
        off = self.aux_len
        self.aux.append(t.to(torch.int32).cpu())
        self.aux_len += t.numel()
        return off

    def emit(self, p: Pattern) -> str:
        fn = _EMIT.get(type(p))
        if fn is None:
            raise Unsupported(f"the Triton backend has no in-kernel mask for {p!r}")
        return fn(self, p)


def _full(g, p):
    return g.var(f"({g.kk} >= 0) & ({g.qp} >= -2147483647)")


def _causal(g, p):
    return g.var(f"{g.kk} <= {g.qp}")


def _window(g, p):
    qp, kk = g.qp, g.kk
    return g.var(f"(({qp} - {kk}) <= {p.left}) & (({qp} - {kk}) >= {-p.right})")


def _sinks(g, p):
    if g.kk == "kk" and p.n <= g.kmin:  # keys at or past kmin are never sinks
        return _FALSE
    return g.var(f"({g.kk} < {p.n}) & ({g.kk} <= {g.qp})")


def _chunked(g, p):
    return g.var(f"_fdiv({g.qp}, {p.size}) == _fdiv({g.kk}, {p.size})")


def _dilated(g, p):
    span = (p.window - 1) * p.dilation
    d = g.var(f"{g.qp} - {g.kk}")
    return g.var(f"({d} >= 0) & ({d} <= {span}) & (_fmod({d}, {p.dilation}) == 0)")


def _strided(g, p):
    s = p.stride
    d = g.var(f"{g.qp} - {g.kk}")
    return g.var(f"({d} >= 0) & (({d} < {s}) | (_fmod({d}, {s}) == 0))")


def _prefix(g, p):
    if g.kk == "kk" and p.prefix_len <= g.kmin:  # past the prefix: causal
        return g.var(f"{g.kk} <= {g.qp}")
    return g.var(f"({g.kk} < {p.prefix_len}) | ({g.kk} <= {g.qp})")


def _power(g, p):
    d = g.var(f"{g.qp} - {g.kk}")
    m = g.var(f"(({d} >= 0) & ({d} <= {p.window})) | (({d} > 0) & (({d} & ({d} - 1)) == 0))")
    if p.sinks:
        m = g.var(f"{m} | (({g.kk} < {p.sinks}) & ({d} >= 0))")
    return m


def _document(g, p):
    ids = torch.repeat_interleave(torch.arange(len(p.lengths)), torch.tensor(p.lengths))
    off = g.add_aux(ids)
    last = g.lk - 1
    qp, kk = g.qp, g.kk
    dq = g.var(f"tl.where({qp} >= 0, tl.load(AUX + {off} + tl.minimum(tl.maximum({qp}, 0), {last})), -1)")
    dk = g.var(f"tl.load(AUX + {off} + tl.minimum(tl.maximum({kk}, 0), {last}))")
    return g.var(f"{dq} == {dk}")


def _blocksparse(g, p):
    """The block bits in AUX (one int32 per block, heads then rows then columns), read by `_block_lookup`."""
    table = p.blocks
    h, nq, nk = (1,) + tuple(table.shape) if table.dim() == 2 else tuple(table.shape)
    return _block_lookup(g, g.add_aux(table.reshape(-1)), (h, nq, nk), p.block_size, False)


def _nested(g, bq: int, bk: int) -> bool:
    """Whether every tile of the kernel (``g.tile``) lies inside one (bq, bk) block of positions: the tile
    sizes divide the block sizes and the query offset Lk - Lq is a multiple of the query tile (the
    positions ``qp`` are offset by it; tiles then never straddle a block edge, nor position 0). Only in
    the kernels' own variables (a mapped order, e.g. a tiled neighborhood's, breaks the tiles)."""
    if g.tile is None or (g.qp, g.kk) != ("qp", "kk"):
        return False
    bm, bn = g.tile
    return bq % bm == 0 and bk % bn == 0 and (g.lk - g.lq) % bm == 0


def _block_lookup(g, off: int, grid: tuple, block_size: tuple, causal: bool) -> str:
    """Visibility from a block mask read in-kernel at ``AUX + off`` (one element per block, heads then rows
    then columns; any integer or bool dtype), looked up at ``(qp // bq) * nk + kk // bk``, with token
    causality when ``causal``. Indices are clamped into the table (padding rows and columns of a last
    block, negative positions when Lq > Lk), and negative positions are masked.

    When every kernel tile lies inside one block (`_nested`), the tile reads one bit, at its first query
    and key, instead of one per element: no per-element gather, which Triton's pipeliner would also
    multi-buffer in shared memory."""
    h, nq, nk = grid
    bq, bk = block_size
    qp, kk = g.qp, g.kk
    qi, ki = (g.var(f"tl.min({qp})"), g.var(f"tl.min({kk})")) if _nested(g, bq, bk) else (qp, kk)
    qb = g.var(f"tl.minimum(tl.maximum({qi}, 0) // {bq}, {nq - 1})")
    kb = g.var(f"tl.minimum(tl.maximum({ki}, 0) // {bk}, {nk - 1})")
    if off + h * nq * nk >= 2**31:  # int32 offsets would overflow
        qb = g.var(f"{qb}.to(tl.int64)")
    base = str(off) if h == 1 else f"{off} + tl.minimum(tl.maximum(hq, 0), {h - 1}) * {nq * nk}"
    bit = g.var(f"tl.load(AUX + {base} + {qb} * {nk} + {kb})")
    m = g.var(f"({bit} != 0) & ({qp} >= 0)")
    return g.var(f"{m} & ({kk} <= {qp})") if causal else m


def _routed(g, p):
    """A `RoutedBlocks` inside a composite (or for the decode kernel): its mask copied into AUX (a host copy,
    cached with the kernel). A standalone RoutedBlocks takes `generate_routed` instead (the mask is AUX)."""
    off = g.add_aux(p.block_mask.reshape(-1))
    return _block_lookup(g, off, p.grid, p.block_size, p.causal)


def _neighborhood(g, p):
    grid = p.grid if p.grid is not None else (g.lk,)
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    qax, kax = [], []
    for a in range(len(grid)):
        d = p.dilation[a]
        qc = g.var(_digit(g.qp, strides[a], grid[a]))
        kc = g.var(_digit(g.kk, strides[a], grid[a]))
        qax.append((g.var(f"{qc} % {d}"), g.var(f"{qc} // {d}")) if d > 1 else (None, qc))
        kax.append((g.var(f"{kc} % {d}"), g.var(f"{kc} // {d}")) if d > 1 else (None, kc))
    return _neighborhood_axes(g, p, grid, qax, kax)


def _neighborhood_axes(g, p, grid, qax, kax):
    """The Neighborhood mask from per-axis (dilation group, group coordinate) variable names of the
    queries (``qax``) and keys (``kax``); the group is None on axes without dilation. Trivial steps are
    left out: with stride 1 a query is its own stride-tile leader (``i <= Lg - 1`` for every real token)."""
    out = None
    for a in range(len(grid)):
        L, K, d, s = grid[a], p.kernel_size[a], p.dilation[a], p.stride[a]
        (grp, i), (kgrp, kj) = qax[a], kax[a]
        if d > 1:
            lg = g.var(f"{L // d} + ({grp} < {L % d}).to(tl.int32)") if L % d else str(L // d)
            same = f"({kgrp} == {grp}) & "
        else:
            lg, same = str(L), ""
        tile = i if s == 1 else g.var(f"({i} // {s}) * {s}")
        if p.causal[a]:
            leader = i if s == 1 else g.var(f"tl.minimum({tile} + {s - 1}, {lg} - 1)")
            ma = g.var(f"{same}({kj} <= {i}) & ({kj} >= {leader} - {K - 1})")
        else:
            left, right = K // 2, (K - 1) // 2
            leader = i if s == 1 else g.var(f"tl.minimum({tile} + {s // 2}, {lg} - 1)")
            center = g.var(f"tl.maximum(tl.minimum({leader}, {lg} - 1 - {right}), {left})")
            ma = g.var(f"{same}({kj} >= {center} - {left}) & ({kj} <= {center} + {right})")
        out = ma if out is None else g.var(f"{out} & {ma}")
    return out


def _digit(x: str, stride: int, radix: int) -> str:
    """Source of ``(x // stride) % radix`` without the trivial operations."""
    if radix == 1:
        return "0"
    return f"{x} % {radix}" if stride == 1 else f"({x} // {stride}) % {radix}"


def _tiled_neighborhood(g, p):
    """Per-axis dilation groups and group coordinates straight from the tile-major positions, by
    arithmetic on literals (no table, no loads), then the Neighborhood mask on them. Positions outside
    [0, N) (the padding of a last block) give some coordinates, whose mask is never used."""
    geo = p._geometry()

    def axes(x):
        out = []
        for a in range(len(geo.grid)):
            T, d, nt = geo.tile[a], geo.dilation[a], geo.nt[a]
            r = _digit(x, geo.RS[a], T)
            i = g.var(f"({_digit(x, geo.TS[a], nt)}) * {T} + ({r})" if nt > 1 else r)
            out.append((g.var(_digit(x, geo.GS[a], d)) if d > 1 else None, i))
        return out

    return _neighborhood_axes(g, p.neighborhood, geo.grid, axes(g.qp), axes(g.kk))


@dataclass(frozen=True, init=False)
class InPlaceTiled(TiledNeighborhood):
    """A tiled N-D neighborhood run over tensors kept in their original row-major token order.

    The kernels walk the tokens in `TiledNeighborhood`'s tile-major order -- its block layout and its
    in-kernel mask are over those positions -- and map each position to its tensor row by arithmetic
    (`row_maps`): ``out[perm[i]]`` is computed from the keys ``perm[j]`` that the tiled mask shows position
    ``i``, which is the `Neighborhood` itself in row-major order. No gathers of q, k, v and out into tile order
    and back (nor their scatters in the backward). ``kv=False`` maps the query side only (q, out, lse, dO, dq),
    for tensors whose K / V rows the caller gathered into tile order (then K / V keep contiguous row blocks, so
    tensor descriptors apply to them). Internal to the Triton backend: as a `Pattern` its mask is the tiled
    one, over iteration positions."""
    kv: bool = True

    def __init__(self, tiled: TiledNeighborhood, kv: bool = True):
        if not isinstance(tiled, TiledNeighborhood):
            raise TypeError(f"InPlaceTiled needs a TiledNeighborhood, got {type(tiled).__name__}: {tiled!r}")
        super().__init__(tiled.neighborhood, tiled.tile)
        object.__setattr__(self, "kv", bool(kv))

    def tiled(self) -> TiledNeighborhood:
        return TiledNeighborhood(self.neighborhood, self.tile)

    def __repr__(self):
        return f"InPlaceTiled({self.neighborhood!r}, tile={self.tile}, kv={self.kv})"


def _to_original(geo, block: int | None) -> list:
    """Lines of the body of a ``@triton.jit`` row map ``(x0, x)``: tile-major positions ``x`` (a block of
    ``block`` positions from ``x0``, a multiple of ``block``; None: any positions) -> row-major token indices.

    A position is a tile number ``x // vol`` (its digits: dilation groups and tile coordinates) and an offset
    ``x % vol`` in the tile (the in-tile coordinates), so the index is ``F(x // vol) + G(x % vol)`` by
    arithmetic on literals (`_TileGeometry.coords`). When the block is the tile, ``F`` takes the scalar ``x0``
    and ``G`` the offsets ``x - x0``, the same for every block (the compiler hoists it out of the loops): the
    map costs a few scalar operations and one add a row. So do blocks of several tiles that differ only in
    the tile number's innermost digit; other blocks of several tiles compute ``F`` per row, blocks inside a
    tile ``G``."""
    vol = geo.vol
    n = len(geo.grid)
    strides = [math.prod(geo.grid[a + 1:]) for a in range(n)]
    # the innermost digit of the tile number: the last axis cut into more than one tile
    last = max((a for a in range(n) if geo.nt[a] > 1), default=None)
    step = ""
    if block is not None and block == vol:
        lines, t, w = [], "(x0 // {})".format(vol), "(x - x0)"
    elif (block is not None and block % vol == 0 and last is not None and geo.nt[last] % (block // vol) == 0):
        # the block's tiles differ in that digit alone (x0 // vol is a multiple of block // vol, which divides
        # the digit's radix): F(x0 // vol + j) = F(x0 // vol) + j * (one tile along that axis), scalar + offsets
        lines, t, w = ["r = x - x0"], f"(x0 // {vol})", f"(r % {vol})"
        step = f" + (r // {vol}) * {geo.tile[last] * geo.dilation[last] * strides[last]}"
    elif block is not None and block % vol == 0:
        lines, t, w = ["r = x - x0"], f"(x0 // {vol} + r // {vol})", f"(r % {vol})"
    elif block is not None and vol % block == 0:
        lines, t, w = [], f"(x0 // {vol})", f"(x0 % {vol} + (x - x0))"
    else:
        lines, t, w = [], f"(x // {vol})", f"(x % {vol})"
    lines += [f"t = {t}", f"w = {w}"]
    outer, inner = [], []
    for a in range(n):
        T, d, nt = geo.tile[a], geo.dilation[a], geo.nt[a]
        st = strides[a]
        if nt > 1:  # tile coordinate * T, in dilation-group coordinates
            outer.append(f"({_digit('t', geo.TS[a] // vol, nt)}) * {T * d * st}")
        if d > 1:
            outer.append(f"({_digit('t', geo.GS[a] // vol, d)}) * {st}")
        if T > 1:
            inner.append(f"({_digit('w', geo.RS[a], T)})" + (f" * {d * st}" if d * st > 1 else ""))
    lines.append(f"return ({' + '.join(outer) or '0'}) + ({' + '.join(inner) or 'w * 0'}){step}")
    return lines


def row_maps(pattern, tile: tuple | None = None) -> tuple | None:
    """The bodies of the kernels' row maps ``_qrows`` / ``_krows`` for ``pattern`` (lists of source lines, None
    for the identity), or None when both are the identity (every pattern but `InPlaceTiled`). ``tile``: the
    kernel's (query block, key block), when it runs only those (see `_to_original`)."""
    if not isinstance(pattern, InPlaceTiled):
        return None
    geo = pattern._geometry()
    bm, bn = tile if tile is not None else (None, None)
    return _to_original(geo, bm), (_to_original(geo, bn) if pattern.kv else None)


def _union(g, p):
    a, b = g.emit(p.a), g.emit(p.b)
    if _FALSE in (a, b):
        return b if a == _FALSE else a
    return g.var(f"{a} | {b}")


def _intersection(g, p):
    a, b = g.emit(p.a), g.emit(p.b)
    if _FALSE in (a, b):
        return _FALSE
    return g.var(f"{a} & {b}")


def _perhead(g, p):
    return _by_head(g, [g.real(g.emit(x)) for x in p.patterns])


def _by_head(g, subs: list) -> str:
    """The variable that is ``subs[hq]`` (one variable per head, the last one for every later head)."""
    m = subs[-1]
    for i in range(len(subs) - 2, -1, -1):
        m = g.var(f"tl.where(hq == {i}, {subs[i]}, {m})")
    return m


_EMIT = {Full: _full, Causal: _causal, SlidingWindow: _window, Sinks: _sinks, Chunked: _chunked,
         Dilated: _dilated, Strided: _strided, PrefixLM: _prefix, PowerAttention: _power, Document: _document,
         Neighborhood: _neighborhood, TiledNeighborhood: _tiled_neighborhood, InPlaceTiled: _tiled_neighborhood,
         Union: _union, Intersection: _intersection, PerHead: _perhead, BlockSparse: _blocksparse,
         RoutedBlocks: _routed}


def generate(pattern: Pattern, lq: int, lk: int, tile: tuple | None = None, kmin: int = 0):
    """-> (list of source lines of the mask body ending in ``return``, aux int32 tensor or None).
    ``tile``: (BLOCK_M, BLOCK_N) of the kernel that will run the mask, when it runs only that tile size
    (lets block masks whose blocks hold whole tiles read one bit per tile); None for any tile.
    ``kmin``: the mask is only asked about keys >= kmin, so terms that cannot hold there drop out (sinks and
    prefixes shorter than kmin: e.g. a window's mask past its sink block, without the sinks' compares)."""
    g = _Gen(lq, lk, tile, kmin)
    m = g.real(g.emit(pattern if pattern is not None else Full()))
    lines = g.lines + [f"return {m}"]
    aux = torch.cat(g.aux) if g.aux else None
    return lines, aux


def generate_routed(key: tuple, lq: int, lk: int, nested: bool) -> list:
    """Mask body of a standalone `RoutedBlocks` (``key``: its `static_key`, (name, grid, block_size, causal));
    ``nested``: `RoutedBlocks.nested` for the kernel's blocks. The kernel reads the mask itself as AUX (the per-call
    device tensor, one byte per block: nothing is copied or cached per call), and only where partial
    blocks need it: when every kernel block lies inside one router block (`RoutedBlocks.nested`), a
    visited block is partial only through causality, so the body is the causal mask (or none), the very
    source of `Causal` / `Full` (one compiled kernel shared with them)."""
    _, grid, (bq, bk), causal = key
    g = _Gen(lq, lk)
    if nested:
        m = g.emit(Causal() if causal else Full())
    else:
        m = _block_lookup(g, 0, grid, (bq, bk), causal)
    return g.lines + [f"return {m}"]


def supports(pattern) -> tuple[bool, str]:
    """Whether every node of the pattern has an in-kernel mask."""
    if pattern is None:
        return True, ""
    if type(pattern) not in _EMIT:
        return False, f"the Triton backend has no in-kernel mask for {pattern!r}"
    kids = ([pattern.a, pattern.b] if isinstance(pattern, (Union, Intersection)) else
            list(pattern.patterns) if isinstance(pattern, PerHead) else [])
    for kid in kids:
        ok, why = supports(kid)
        if not ok:
            return ok, why
    return True, ""
