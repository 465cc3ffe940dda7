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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layout import BlockLayout, _cdiv

# Block pairs x block area evaluated per step when a composite pattern settles uncertain blocks.
_EVAL_BUDGET = 1 << 24


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
        """Inclusive block ranges: query positions p0, p1 of shape (nq, 1); keys k0, k1 of shape (1, nk)."""
        qb = torch.arange(self.nq, device=self.device, dtype=torch.int64)
        kb = torch.arange(self.nk, device=self.device, dtype=torch.int64)
        q0 = qb * self.block_q
        q1 = torch.clamp(q0 + self.block_q, max=self.q_len) - 1
        k0 = kb * self.block_k
        k1 = torch.clamp(k0 + self.block_k, max=self.kv_len) - 1
        return (q0 + self.offset)[:, None], (q1 + self.offset)[:, None], k0[None, :], k1[None, :]


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
        any_, all_ = self._exact_blocks(ctx)
        return BlockLayout.from_bool(any_, all_, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)

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
        """_classify with the outputs broadcast to (H, nq, nk)."""
        any_, all_, unc = self._classify(ctx)
        shape = torch.broadcast_shapes(any_.shape, all_.shape, unc.shape)
        if len(shape) == 2:
            shape = (1,) + tuple(shape)
        any_, all_, unc = (t.expand(shape) for t in (any_, all_, unc))
        return any_, all_, unc

    def _exact_blocks(self, ctx: Ctx):
        any_, all_, unc = self._classify3(ctx)
        any_, all_, unc = any_.clone(), all_.clone(), unc & any_ & ~all_
        if unc.any():
            # Only composites land here, and only on blocks where both operands are partial.
            counts = self._count_in_blocks(unc, ctx)
            h, qb, kb = unc.nonzero(as_tuple=True)
            p0, p1, k0, k1 = ctx.ranges()
            area = (p1 - p0 + 1).view(-1)[qb] * (k1 - k0 + 1).view(-1)[kb]
            any_[h, qb, kb] = counts > 0
            all_[h, qb, kb] = counts == area
        return any_, all_

    def _count_in_blocks(self, sel: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        """Visible pairs in each selected block (sel: (H, nq, nk) bool), in nonzero() order."""
        h, qb, kb = sel.nonzero(as_tuple=True)
        out = torch.empty(h.numel(), dtype=torch.int64, device=sel.device)
        bq, bk = ctx.block_q, ctx.block_k
        ar_q = torch.arange(bq, device=sel.device)
        ar_k = torch.arange(bk, device=sel.device)
        step = max(1, _EVAL_BUDGET // (bq * bk))
        head_dep = self.head_dependent
        f = self._bind(ctx)
        for s in range(0, h.numel(), step):
            hh, qq, kk = h[s:s + step], qb[s:s + step], kb[s:s + step]
            qi = qq[:, None, None] * bq + ar_q[None, :, None]
            ki = kk[:, None, None] * bk + ar_k[None, None, :]
            valid = (qi < ctx.q_len) & (ki < ctx.kv_len)
            head = hh[:, None, None] if head_dep else None
            m = f(qi + ctx.offset, ki, head) & valid
            out[s:s + step] = m.sum((1, 2))
        return out


def _need_pattern(other, op: str) -> None:
    if not isinstance(other, Pattern):
        raise TypeError(f"cannot combine a Pattern with {type(other).__name__} using '{op}'")


def _partial(any_, all_):
    return any_ & ~all_


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

    def _operands(self, ctx):
        """Both classifications, and where both operands are partial (or either is uncertain)."""
        a_any, a_all, a_unc = self.a._classify(ctx)
        b_any, b_all, b_unc = self.b._classify(ctx)
        unsure = a_unc | b_unc | (_partial(a_any, a_all) & _partial(b_any, b_all))
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
        all_ = (a_all & ~a_unc) | (b_all & ~b_unc)
        return a_any | b_any, all_, unsure & ~all_

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

    def _classify(self, ctx):
        parts = [p._classify3(ctx) for p in self.patterns]
        return tuple(torch.cat([pp[j] for pp in parts], 0) for j in range(3))

    def __repr__(self):
        return f"PerHead([{', '.join(repr(p) for p in self.patterns)}])"
