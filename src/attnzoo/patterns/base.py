"""The `Pattern` base class and the pattern algebra (`|`, `&`, `PerHead`).

A pattern says which key each query may see. Positions are aligned bottom-right: query ``i`` of
``q_len`` sits at position ``p = i + kv_len - q_len`` on the key axis, so the last query sits on the
last key (FlashAttention's and decoding's convention).

Every pattern answers three questions:

- ``mask(q_idx, kv_idx, q_len, kv_len, head=None)``: elementwise visibility, vectorised over
  broadcastable index tensors (usable inside FlexAttention's ``mask_mod``).
- ``block_layout(q_len, kv_len, block_q, block_k, device)``: the `BlockLayout` of visited blocks. Static
  patterns classify each block pair in closed form from the block's index ranges; only composite
  patterns evaluate the mask, and only on the few block pairs where both operands are partial.
- ``density(q_len, kv_len)``: the exact fraction of visible (query, key) pairs.

Subclasses implement ``_mask_pos(p, k, ctx, head)`` on positions and ``_classify(ctx)``, which returns
``(any, all, uncertain)`` boolean tensors broadcastable to (heads, num_q_blocks, num_kv_blocks): exact
"some pair visible" / "every pair visible" flags, except where ``uncertain`` is set, where ``any`` is
an upper bound and ``all`` a lower bound; those blocks are settled by evaluating the mask.
``uncertain`` may be ``None``: the classification is exact everywhere (every closed-form leaf), and
`block_layout` then runs without a single device->host synchronisation.

Cost model (the layout is built on the GPU at every new shape): each tensor op is a kernel launch of
5-20 us of host time (~15-20 us measured on an H100 host) while the tensors are small (at most a few
million block pairs), so the code below counts ops rather than elements; see
benchmarks/layout_speed.py. Two construction paths: the dense one (`Pattern._dense_layout`: classify
every block pair on the device, sort-free CSR; used on GPUs) and the band one (`Pattern._band_layout`:
per-query-block ranges on the CPU, CSR straight from them; used on the CPU).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .layout import BlockLayout, _cdiv, _selection

# Block pairs x block area evaluated per step when a composite pattern settles uncertain blocks.
_EVAL_BUDGET = 1 << 24
# Query-key pairs a composite's band path may evaluate on the CPU to settle its uncertain blocks; past
# this it leaves the layout to the general path (one device sync, the evaluation on the device).
_BAND_EVAL_BUDGET = 1 << 18
# Piece classes of a band leaf, (1, a0, f0, f1, a1) -> [0, a0) none, [a0, f0) partial, [f0, f1) full, ...
_LEAF_CODES = torch.tensor([0, 1, 2, 1, 0], dtype=torch.int64)


@dataclass(frozen=True)
class Ctx:
    """The geometry a pattern is asked about."""
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    num_heads: Optional[int]
    device: torch.device

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def nq(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def nk(self) -> int:
        return _cdiv(self.kv_len, self.block_k)

    def ranges(self):
        """Inclusive block ranges: query positions p0, p1 of shape (nq, 1); keys k0, k1 of shape (1, nk).

        Built once per Ctx (composites share them); callers must not modify them in place."""
        return self._ranges

    @functools.cached_property
    def _ranges(self):
        bq, bk, off, dev = self.block_q, self.block_k, self.offset, self.device
        nq, nk, last = self.nq, self.nk, self.kv_len - 1
        # p1 = min(q0 + bq, q_len) - 1 + offset = min(p0 + bq - 1, kv_len - 1); likewise k1
        p0 = torch.arange(off, off + nq * bq, bq, device=dev, dtype=torch.int64)
        p1 = torch.arange(off + bq - 1, off + bq - 1 + nq * bq, bq, device=dev, dtype=torch.int64)
        k0 = torch.arange(0, nk * bk, bk, device=dev, dtype=torch.int64)
        k1 = torch.arange(bk - 1, bk - 1 + nk * bk, bk, device=dev, dtype=torch.int64)
        if self.q_len % bq:  # ragged last block (an op saved when there is none)
            p1.clamp_(max=last)
        if self.kv_len % bk:
            k1.clamp_(max=last)
        return p0[:, None], p1[:, None], k0[None, :], k1[None, :]


try:  # the band path's row arithmetic runs on tiny arrays: numpy's per-op cost is a fraction of torch's
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is optional; torch CPU tensors do the same
    _np = None


class Rows:
    """The query blocks of a Ctx on the CPU, for the band path: ``p0``, ``p1`` (nq,) int64 arrays are each
    query block's first and last position, and the methods turn key bounds (arrays of positions) into
    kv-block indices. Patterns whose visited blocks form, per query block, one contiguous range of which
    one contiguous sub-range is fully visible (windows, causal, sinks, chunks, documents, prefix-LM) give
    those ranges from these in O(nq) (see `Pattern._band`), and the layout skips the (nq, nk)
    classification. The arrays are numpy arrays when numpy is installed (about a microsecond an op, one
    thread), else CPU tensors; `Pattern._band` code uses only operators and these methods, so it runs on
    either."""

    def __init__(self, ctx: Ctx, use_numpy: Optional[bool] = None):
        bq, off = ctx.block_q, ctx.offset
        self.ctx = ctx
        self.np = _np is not None if use_numpy is None else (use_numpy and _np is not None)
        self.nq, self.nk, self.bk, self.kv_len = ctx.nq, ctx.nk, ctx.block_k, ctx.kv_len
        self.ragged = ctx.kv_len % ctx.block_k != 0       # the last kv block is short
        if self.np:
            self.p0 = _np.arange(off, off + self.nq * bq, bq, dtype=_np.int64)
        else:
            self.p0 = torch.arange(off, off + self.nq * bq, bq, dtype=torch.int64)
        self.p1 = self.p0 + (bq - 1)
        if ctx.q_len % bq:
            self.p1[-1] = ctx.kv_len - 1

    # -- array helpers (numpy or torch) -----------------------------------------------------------
    def where(self, cond, a, b):
        return _np.where(cond, a, b) if self.np else torch.where(cond, a, b)

    def clip(self, x, lo, hi):
        if self.np:
            return _np.clip(x, lo, hi)
        return torch.clamp(x, lo, hi)

    def maximum(self, a, b):
        if self.np:
            return _np.maximum(a, b)
        return torch.clamp(a, min=b) if not isinstance(b, torch.Tensor) else torch.maximum(a, b)

    def minimum(self, a, b):
        if self.np:
            return _np.minimum(a, b)
        return torch.clamp(a, max=b) if not isinstance(b, torch.Tensor) else torch.minimum(a, b)

    def zeros(self):
        return _np.zeros(self.nq, dtype=_np.int64) if self.np else torch.zeros(self.nq, dtype=torch.int64)

    def array(self, t: torch.Tensor):
        """A CPU tensor as this backend's array (numpy: a view, no copy)."""
        return t.numpy() if self.np else t

    def stack(self, xs, axis=-1):
        return _np.stack(xs, axis) if self.np else torch.stack(xs, axis)

    def cat(self, xs, axis=0):
        return _np.concatenate(xs, axis) if self.np else torch.cat(xs, axis)

    # -- kv-block arithmetic ----------------------------------------------------------------------
    def first_k1_ge(self, x):
        """First kv block whose last key is >= x (nk if none)."""
        b = self.clip(x // self.bk, 0, self.nk)
        return self.where(x >= self.kv_len, self.nk, b) if self.ragged else b

    def last_k0_le(self, x):
        """Last kv block whose first key is <= x (-1 if none)."""
        return self.clip(x // self.bk, -1, self.nk - 1)

    def first_k0_ge(self, x):
        """First kv block whose first key is >= x (nk if none)."""
        return self.clip((x + (self.bk - 1)) // self.bk, 0, self.nk)

    def last_k1_le(self, x):
        """Last kv block whose last key is <= x (-1 if none)."""
        b = self.clip((x + (1 - self.bk)) // self.bk, -1, self.nk - 1)
        return self.where(x >= self.kv_len - 1, self.nk - 1, b) if self.ragged else b


def _normalize_band(r: Rows, a0, a1, f0, f1):
    """Inclusive ranges (a0..a1 visited, f0..f1 of them full; empty: lo > hi) -> (nq, 5) rows
    ``(1, a0, f0, f1, a1)`` of half-open boundaries ``a0 <= f0 <= f1 <= a1`` (see `layout._band_csr`).
    An empty full range becomes a point inside [a0, a1), an empty visited range a point."""
    a1 = r.maximum(a1 + 1, a0)
    f0 = r.clip(f0, a0, a1)
    f1 = r.maximum(f1 + 1, f0)
    return r.stack([a0 * 0 + 1, a0, f0, f1, a1], -1)


def _check_len(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _check_int(name: str, value, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


class Pattern:
    """Base class. Patterns are frozen dataclasses: immutable, hashable, printable."""

    #: True when visibility depends on the query head (then ``mask`` needs ``head``).
    head_dependent: bool = False

    # -- to implement -----------------------------------------------------------------------------
    def _mask_pos(self, p: torch.Tensor, k: torch.Tensor, ctx: Ctx, head) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define a mask")

    def _classify(self, ctx: Ctx):
        raise NotImplementedError(f"{type(self).__name__} does not define a block classification")

    def check(self, q_len: int, kv_len: int, num_heads: Optional[int] = None) -> None:
        """Raise ValueError if the pattern cannot be applied to these lengths / head count."""

    #: True when `_band` gives the block ranges (see `Rows`), or for composites `_band_pieces` may settle
    #: the layout on the CPU; then `block_layout` takes the band path.
    _banded: bool = False
    #: True for band leaves (and PerHead of them): one visited range with one full sub-range per row.
    _band_leaf: bool = False

    def _band(self, rows: "Rows"):
        """Per query block, inclusive kv-block ranges ``(a0, a1, f0, f1)`` ((nq,) int64 arrays, see `Rows`):
        blocks a0..a1 are visited and f0..f1 of them entirely visible (empty: lo > hi). Exact, like
        `_classify`, and equal to it (tests/patterns/test_layout.py checks the two paths agree)."""
        raise NotImplementedError(f"{type(self).__name__} has no band form")

    def _band_rows(self, rows: "Rows"):
        """(H, nq, 5) array (see `Rows`): rows (1, a0, f0, f1, a1) of half-open boundaries (see
        `layout._band_csr`)."""
        return _normalize_band(rows, *self._band(rows))[None]

    def _band_pieces(self, rows: "Rows"):
        """``(x (H, nq, K+1), code (H, nq, K))``: per query block, kv-block boundaries 0 = x0 <= ... <= xK = nk
        and the class of each piece [x_j, x_j+1) (0 not visited, 1 partial, 2 full); None when the CPU
        cannot settle it cheaply (see `_Binary._band_pieces`)."""
        band = torch.as_tensor(self._band_rows(rows))
        h, nq = band.shape[:2]
        x = torch.cat([torch.zeros((h, nq, 1), dtype=torch.int64), band[..., 1:],
                       torch.full((h, nq, 1), rows.nk, dtype=torch.int64)], -1)
        return x, _LEAF_CODES.expand(h, nq, 5)

    # -- public API -------------------------------------------------------------------------------
    def mask(self, q_idx, kv_idx, q_len: int, kv_len: int, head=None) -> torch.Tensor:
        """Elementwise visibility of key ``kv_idx`` from query ``q_idx`` (broadcasting tensors)."""
        q_idx = torch.as_tensor(q_idx)
        kv_idx = torch.as_tensor(kv_idx, device=q_idx.device)
        if self.head_dependent and head is None:
            raise ValueError(f"{self!r} depends on the query head: pass head=")
        if head is not None:
            head = torch.as_tensor(head, device=q_idx.device)
        ctx = Ctx(q_len, kv_len, 1, 1, None, q_idx.device)
        return self._bind(ctx)(q_idx + (kv_len - q_len), kv_idx, head)

    def mask_mod(self, q_len: int, kv_len: int, device=None):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for these lengths; lookup tables (e.g. a
        Document's ids) are built once, on ``device``, and captured."""
        ctx = Ctx(q_len, kv_len, 1, 1, None, torch.device(device or "cpu"))
        f, off, dep = self._bind(ctx), kv_len - q_len, self.head_dependent

        def mask_mod(b, h, q_idx, kv_idx):
            return f(q_idx + off, kv_idx, h if dep else None)

        mask_mod.__name__ = f"attnzoo_{type(self).__name__}"
        return mask_mod

    def _bind(self, ctx: Ctx):
        """The mask on positions as a closure ``f(p, k, head)``, with any tables for ctx prebuilt."""
        return lambda p, k, head: self._mask_pos(p, k, ctx, head)

    def block_layout(self, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128,
                     device=None, num_heads: Optional[int] = None) -> BlockLayout:
        """The blocks each query block must visit, split into full and partial ones."""
        _check_len("q_len", q_len)
        _check_len("kv_len", kv_len)
        _check_len("block_q", block_q)
        _check_len("block_k", block_k)
        self.check(q_len, kv_len, num_heads)
        ctx = Ctx(q_len, kv_len, block_q, block_k, num_heads, torch.device(device or "cpu"))
        lay = self._band_layout(ctx) if self._banded else None
        return lay if lay is not None else self._dense_layout(ctx)

    def _band_layout(self, ctx: Ctx, force: bool = False) -> Optional[BlockLayout]:
        """The band path: per-row ranges on the CPU, then the CSR directly (one host->device copy and
        three kernels); None where the dense path is the faster one, or when a composite's uncertain
        blocks are too many to settle on the CPU.

        Used for layouts on the CPU, where it is 10-400x faster than classifying every block pair. On a
        GPU the dense path is used (``force=True`` takes the band path anyway): measured on an H100 host
        (torch 2.11) the dense path's ~25 launches took 0.35-0.7 ms at 64K tokens and the band path
        0.55-0.9 ms, that host's CPU being slow at even tiny array ops."""
        if not (ctx.device.type == "cpu" or force):
            return None
        geo = dict(block_q=ctx.block_q, block_k=ctx.block_k, q_len=ctx.q_len, kv_len=ctx.kv_len)
        if self._band_leaf:
            return BlockLayout._from_band(self._band_rows(Rows(ctx)), ctx.device, **geo)
        pieces = self._band_pieces(Rows(ctx, use_numpy=False))
        if pieces is None:
            return None
        return BlockLayout._from_pieces(*pieces, ctx.device, **geo)

    def _dense_layout(self, ctx: Ctx) -> BlockLayout:
        """The general path: classify every block pair on the device, settle the uncertain ones by
        evaluating the mask, then the sort-free CSR."""
        block_q, block_k, q_len, kv_len = ctx.block_q, ctx.block_k, ctx.q_len, ctx.kv_len
        any_, all_, unc = self._classify3(ctx)
        sel = _selection(any_, all_)  # (2, H, nq, nk): partial, full
        if unc is not None:
            # Only composites land here, and only on blocks where both operands are partial; the
            # nonzero() is the layout's only device->host synchronisation.
            h, qb, kb = (unc & sel[0]).nonzero(as_tuple=True)
            if h.numel():
                counts, area = self._count_at(h, qb, kb, ctx)
                full = counts == area
                sel[1].index_put_((h, qb, kb), full)
                sel[0].index_put_((h, qb, kb), (counts > 0) > full)
        return BlockLayout._from_selection(sel, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)

    def density(self, q_len: int, kv_len: int, num_heads: Optional[int] = None) -> float:
        """Exact fraction of visible (query, key) pairs (averaged over heads for per-head patterns)."""
        _check_len("q_len", q_len)
        _check_len("kv_len", kv_len)
        self.check(q_len, kv_len, num_heads)
        return self.count_visible(q_len, kv_len, num_heads) / (q_len * kv_len * self._heads(num_heads))

    def count_visible(self, q_len: int, kv_len: int, num_heads: Optional[int] = None) -> int:
        """Exact number of visible pairs, summed over heads for per-head patterns."""
        b = 64
        ctx = Ctx(q_len, kv_len, b, b, num_heads, torch.device("cpu"))
        any_, all_ = self._exact_blocks(ctx)
        p0, p1, k0, k1 = ctx.ranges()
        area = (p1 - p0 + 1) * (k1 - k0 + 1)
        full = all_ & any_
        total = int((full * area).sum())
        partial = any_ & ~full
        if partial.any():
            total += int(self._count_in_blocks(partial, ctx).sum())
        return total

    def _heads(self, num_heads) -> int:
        return 1

    def __or__(self, other: "Pattern") -> "Pattern":
        _need_pattern(other, "|")
        return Union(self, other)

    def __and__(self, other: "Pattern") -> "Pattern":
        _need_pattern(other, "&")
        return Intersection(self, other)

    # -- shared machinery -------------------------------------------------------------------------
    def _classify3(self, ctx: Ctx):
        """_classify with the outputs broadcast (views) to (H, nq, nk); ``uncertain`` stays None if exact."""
        any_, all_, unc = self._classify(ctx)
        shapes = [any_.shape, all_.shape, (ctx.nq, ctx.nk)] + ([] if unc is None else [unc.shape])
        shape = torch.broadcast_shapes(*shapes)
        if len(shape) == 2:
            shape = (1,) + tuple(shape)
        return any_.expand(shape), all_.expand(shape), (None if unc is None else unc.expand(shape))

    def _exact_blocks(self, ctx: Ctx):
        """Exact (any, all) flags, (H, nq, nk) (possibly broadcast views: read them, don't write)."""
        any_, all_, unc = self._classify3(ctx)
        if unc is None:  # exact closed form: no evaluation, no host sync
            return any_, all_
        h, qb, kb = (unc & (any_ > all_)).nonzero(as_tuple=True)
        if h.numel() == 0:
            return any_, all_
        counts, area = self._count_at(h, qb, kb, ctx)
        any_, all_ = any_.clone(), all_.clone()
        any_[h, qb, kb] = counts > 0
        all_[h, qb, kb] = counts == area
        return any_, all_

    def _count_in_blocks(self, sel: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        """Visible pairs in each selected block (sel: (H, nq, nk) bool), in nonzero() order."""
        h, qb, kb = sel.nonzero(as_tuple=True)
        return self._count_at(h, qb, kb, ctx)[0]

    def _count_at(self, h: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, ctx: Ctx):
        """(visible pairs, area) of the blocks (h[i], qb[i], kb[i]), by evaluating the mask in chunks of
        bounded memory. ``area`` (valid pairs) is a tensor, or an int when no block is ragged."""
        dev = h.device
        bq, bk = ctx.block_q, ctx.block_k
        ragged = ctx.q_len % bq != 0 or ctx.kv_len % bk != 0
        pos_q = torch.arange(ctx.offset, ctx.offset + bq, device=dev)  # positions of a block's queries
        ar_k = torch.arange(bk, device=dev)
        step = max(1, _EVAL_BUDGET // (bq * bk))
        head_dep = self.head_dependent
        f = self._bind(ctx)
        counts, areas = [], []
        for s in range(0, h.numel(), step):
            hh, qq, kk = h[s:s + step], qb[s:s + step], kb[s:s + step]
            p = qq[:, None, None] * bq + pos_q[None, :, None]
            k = kk[:, None, None] * bk + ar_k[None, None, :]
            m = f(p, k, hh[:, None, None] if head_dep else None)
            if ragged:
                valid = (p < ctx.kv_len) & (k < ctx.kv_len)
                m = m & valid
                areas.append(valid.sum((1, 2)))
            counts.append(m.sum((1, 2)))
        if len(counts) == 1:
            return counts[0], (areas[0] if ragged else bq * bk)
        return torch.cat(counts), (torch.cat(areas) if ragged else bq * bk)


def _need_pattern(other, op: str) -> None:
    if not isinstance(other, Pattern):
        raise TypeError(f"cannot combine a Pattern with {type(other).__name__} using '{op}'")


def _partial(any_, all_):
    return any_ > all_  # any_ & ~all_ in one op (bool: True > False)


def _sure(all_, unc):
    """A lower bound of "every pair visible": ``all_`` where certain."""
    return all_ if unc is None else all_ > unc  # all_ & ~unc


class _Binary(Pattern):
    """What union and intersection share: two operands, validated together."""
    a: Pattern
    b: Pattern

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        return self.a.head_dependent or self.b.head_dependent

    def check(self, q_len, kv_len, num_heads=None):
        a, b = self.a, self.b
        a.check(q_len, kv_len, num_heads)
        b.check(q_len, kv_len, num_heads)
        if a.head_dependent and b.head_dependent and a._heads(num_heads) != b._heads(num_heads):
            raise ValueError(f"pattern: per-head operands of {self!r} have different head counts "
                             f"({a._heads(num_heads)} vs {b._heads(num_heads)})")

    def _heads(self, num_heads):
        return max(self.a._heads(num_heads), self.b._heads(num_heads))

    @property
    def _banded(self):  # type: ignore[override]
        return self.a._banded and self.b._banded

    def _band_pieces(self, rows: "Rows"):
        """Both operands' pieces merged on the CPU: the union of their boundaries, each piece classed from
        the operands' classes there; pieces partial in both are settled by evaluating the mask on their
        blocks (on the CPU: they are few, e.g. the sink column where a window's edge crosses it)."""
        pa = self.a._band_pieces(rows)
        pb = self.b._band_pieces(rows) if pa is not None else None
        if pb is None:
            return None
        (xa, ca), (xb, cb) = pa, pb
        h = max(xa.shape[0], xb.shape[0])
        nq = rows.nq
        xa, ca, xb, cb = (t.expand(h, nq, t.shape[-1]) for t in (xa, ca, xb, cb))
        x = torch.cat([xa, xb[..., 1:-1]], -1).sort(-1).values
        start = x[..., :-1]
        # the operand piece holding each merged piece: the last one starting at or before it
        ka = ca.gather(-1, (start[..., :, None] >= xa[..., None, 1:-1]).sum(-1))
        kb = cb.gather(-1, (start[..., :, None] >= xb[..., None, 1:-1]).sum(-1))
        code = self._combine_codes(ka, kb)
        ln = x[..., 1:] - start
        code.masked_fill_(ln == 0, 0)
        unsure = code == 3
        if bool(unsure.any()):
            if not self._settle_pieces(code, start, ln, unsure, rows):
                return None
        return x, code

    def _settle_pieces(self, code, start, ln, unsure, rows: "Rows") -> bool:
        """Class the pieces marked 3 in place by evaluating the mask on their blocks (CPU); False when
        they are too many, or a piece's blocks differ in class (the caller falls back)."""
        ctx = rows.ctx
        h, r, j = unsure.nonzero(as_tuple=True)
        lens = ln[h, r, j]
        total = int(lens.sum())
        if total * ctx.block_q * ctx.block_k > _BAND_EVAL_BUDGET:
            return False
        piece = torch.repeat_interleave(torch.arange(h.numel()), lens)
        first = torch.cumsum(lens, 0) - lens
        kb = start[h, r, j][piece] + (torch.arange(total) - first[piece])
        cpu = Ctx(ctx.q_len, ctx.kv_len, ctx.block_q, ctx.block_k, ctx.num_heads, torch.device("cpu"))
        counts, area = self._count_at(h[piece], r[piece], kb, cpu)
        cls = (counts > 0).long() + (counts == area).long()
        lo = torch.full((h.numel(),), 3, dtype=torch.int64).scatter_reduce_(0, piece, cls, "amin")
        hi = torch.full((h.numel(),), -1, dtype=torch.int64).scatter_reduce_(0, piece, cls, "amax")
        if not torch.equal(lo, hi):
            return False
        code[h, r, j] = lo
        return True

    def _operands(self, ctx):
        """Both classifications, and where both operands are partial (or either is uncertain)."""
        a_any, a_all, a_unc = self.a._classify(ctx)
        b_any, b_all, b_unc = self.b._classify(ctx)
        unsure = _partial(a_any, a_all) & _partial(b_any, b_all)
        for u in (a_unc, b_unc):
            if u is not None:
                unsure = unsure | u
        return a_any, a_all, a_unc, b_any, b_all, b_unc, unsure


@dataclass(frozen=True)
class Union(_Binary):
    """Visible where either operand is visible."""
    a: Pattern
    b: Pattern

    def _bind(self, ctx):
        fa, fb = self.a._bind(ctx), self.b._bind(ctx)
        return lambda p, k, head: fa(p, k, head) | fb(p, k, head)

    def _classify(self, ctx):
        a_any, a_all, a_unc, b_any, b_all, b_unc, unsure = self._operands(ctx)
        all_ = _sure(a_all, a_unc) | _sure(b_all, b_unc)
        return a_any | b_any, all_, unsure > all_

    @staticmethod
    def _combine_codes(ka, kb):
        """Piece classes of a union: the larger one; partial in both: unknown (3)."""
        return torch.maximum(ka, kb).masked_fill_((ka == 1) & (kb == 1), 3)

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


@dataclass(frozen=True)
class Intersection(_Binary):
    """Visible where both operands are visible."""
    a: Pattern
    b: Pattern

    def _bind(self, ctx):
        fa, fb = self.a._bind(ctx), self.b._bind(ctx)
        return lambda p, k, head: fa(p, k, head) & fb(p, k, head)

    def _classify(self, ctx):
        a_any, a_all, a_unc, b_any, b_all, b_unc, unsure = self._operands(ctx)
        any_ = a_any & b_any
        return any_, a_all & b_all, unsure & any_

    @staticmethod
    def _combine_codes(ka, kb):
        """Piece classes of an intersection: the smaller one; partial in both: unknown (3)."""
        return torch.minimum(ka, kb).masked_fill_((ka == 1) & (kb == 1), 3)

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


@dataclass(frozen=True)
class PerHead(Pattern):
    """One pattern per query head: ``PerHead([p0, p1, ...])`` with ``len == Hq``."""
    patterns: tuple

    def __init__(self, patterns):
        patterns = tuple(patterns)
        if not patterns:
            raise ValueError("PerHead needs at least one pattern")
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise TypeError(f"PerHead patterns[{i}] must be a Pattern, got {type(p).__name__}")
            if p.head_dependent:
                raise ValueError(f"PerHead patterns[{i}] is itself per-head; nest PerHead only once")
        object.__setattr__(self, "patterns", patterns)

    head_dependent = True

    def _heads(self, num_heads):
        return len(self.patterns)

    def check(self, q_len, kv_len, num_heads=None):
        if num_heads is not None and num_heads != len(self.patterns):
            raise ValueError(f"pattern: PerHead has {len(self.patterns)} patterns but the query has "
                             f"{num_heads} heads (Hq); give one pattern per query head")
        for p in self.patterns:
            p.check(q_len, kv_len, None)

    def _bind(self, ctx):
        fs = [pat._bind(ctx) for pat in self.patterns]

        def f(p, k, head):
            if head is None:
                raise ValueError("PerHead.mask needs head=")
            out = None
            for i, fi in enumerate(fs):
                m = fi(p, k, None) & (head == i)
                out = m if out is None else (out | m)
            return out
        return f

    @property
    def _banded(self):  # type: ignore[override]
        return all(p._banded for p in self.patterns)

    @property
    def _band_leaf(self):  # type: ignore[override]
        return all(p._band_leaf for p in self.patterns)

    def _band_rows(self, rows):
        return rows.cat([p._band_rows(rows) for p in self.patterns])

    def _band_pieces(self, rows):
        parts = []
        for p in self.patterns:
            part = p._band_pieces(rows)
            if part is None:
                return None
            parts.append(part)
        k = max(c.shape[-1] for _, c in parts)
        xs, cs = [], []
        for x, c in parts:  # pad with empty pieces at the row's end
            pad = k - c.shape[-1]
            xs.append(torch.nn.functional.pad(x, (0, pad), value=rows.nk))
            cs.append(torch.nn.functional.pad(c, (0, pad)))
        return torch.cat(xs), torch.cat(cs)

    def _classify(self, ctx):
        parts = [p._classify3(ctx) for p in self.patterns]
        any_, all_ = (torch.cat([pp[j] for pp in parts], 0) for j in range(2))
        if all(pp[2] is None for pp in parts):
            return any_, all_, None
        unc = torch.cat([pp[2] if pp[2] is not None else torch.zeros_like(pp[0]) for pp in parts], 0)
        return any_, all_, unc

    def __repr__(self):
        return f"PerHead([{', '.join(repr(p) for p in self.patterns)}])"
