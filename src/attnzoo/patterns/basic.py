"""1-D static patterns with closed-form block classification.

All definitions are on positions: query ``i`` sits at ``p = i + kv_len - q_len``; ``k`` is the key
index. In ``_classify`` every block is a rectangle of positions ``[p0, p1] x [k0, k1]`` (inclusive),
and the pairs of a rectangle realise every difference ``p - k`` in ``[p0 - k1, p1 - k0]``, which is
what makes the closed forms below exact.

The closed forms return ``None`` as their "uncertain" flag (exact everywhere), and are written for few
tensor ops: on the GPU every op is a kernel launch, and launches, not elements, dominate the cost of
a layout. Query ranges are (nq, 1) and key ranges (1, nk), so comparisons between them broadcast to the
(nq, nk) block grid; when ``lo <= hi`` per axis, ``[a0, a1]`` and ``[b0, b1]`` overlap iff ``a0 <= b1`` and
``b0 <= a1``, and are one and the same point iff ``a0 == b1`` and ``a1 == b0``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .base import Ctx, Pattern, Rows, _check_int, _check_len


def _false(ctx: Ctx):
    """The "uncertain" flag of an exact classification: none (see `Pattern._classify`)."""
    return None


def _delta_range(ctx: Ctx):
    """Smallest and largest p - k inside each block pair, shape (nq, nk)."""
    p0, p1, k0, k1 = ctx.ranges()
    return p0 - k1, p1 - k0


def _has_multiple(lo, hi, d: int):
    """Whether [lo, hi] (elementwise, lo <= hi) contains a multiple of d."""
    return torch.div(hi, d, rounding_mode="floor") * d >= lo


@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key."""

    def _mask_pos(self, p, k, ctx, head):
        return torch.ones(torch.broadcast_shapes(p.shape, k.shape), dtype=torch.bool, device=p.device)

    def _classify(self, ctx):
        t = torch.ones((), dtype=torch.bool, device=ctx.device).expand(ctx.nq, ctx.nk)
        return t, t, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        z = r.zeros()
        return z, z + (r.nk - 1), z, z + (r.nk - 1)

    def count_visible(self, q_len, kv_len, num_heads=None):
        return q_len * kv_len

    def __repr__(self):
        return "Full()"


@dataclass(frozen=True)
class Causal(Pattern):
    """Key ``k`` visible from the query at position ``p`` iff ``k <= p`` (bottom-right aligned)."""

    def _mask_pos(self, p, k, ctx, head):
        return k <= p

    def _classify(self, ctx):
        p0, p1, k0, k1 = ctx.ranges()
        return k0 <= p1, k1 <= p0, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        z = r.zeros()
        return z, r.last_k0_le(r.p1), z, r.last_k1_le(r.p0)

    def __repr__(self):
        return "Causal()"


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Key ``k`` visible iff ``p - left <= k <= p + right`` (FlashAttention's window semantics).

    ``SlidingWindow(1023)`` is a causal window of 1024 keys.
    """
    left: int
    right: int = 0

    def __post_init__(self):
        _check_int("SlidingWindow left", self.left)
        _check_int("SlidingWindow right", self.right)

    def _mask_pos(self, p, k, ctx, head):
        d = p - k
        return (d <= self.left) & (d >= -self.right)

    def _classify(self, ctx):
        lo, hi = _delta_range(ctx)
        any_ = (lo <= self.left) & (hi >= -self.right)
        all_ = (hi <= self.left) & (lo >= -self.right)
        return any_, all_, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        # any: k1 >= p0 - left and k0 <= p1 + right; all: k0 >= p1 - left and k1 <= p0 + right
        return (r.first_k1_ge(r.p0 - self.left), r.last_k0_le(r.p1 + self.right),
                r.first_k0_ge(r.p1 - self.left), r.last_k1_le(r.p0 + self.right))

    def __repr__(self):
        return f"SlidingWindow({self.left})" if self.right == 0 else f"SlidingWindow({self.left}, {self.right})"


@dataclass(frozen=True)
class Sinks(Pattern):
    """The first ``n`` keys, visible to every query at or after them (StreamingLLM's attention sinks)."""
    n: int

    def __post_init__(self):
        _check_int("Sinks n", self.n, 1)

    def _mask_pos(self, p, k, ctx, head):
        return (k < self.n) & (k <= p)

    def _classify(self, ctx):
        p0, p1, k0, k1 = ctx.ranges()
        # (k < n) & (k <= p) is k <= min(p, n - 1)
        any_ = k0 <= torch.clamp(p1, max=self.n - 1)
        all_ = k1 <= torch.clamp(p0, max=self.n - 1)
        return any_, all_, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        z = r.zeros()
        return z, r.last_k0_le(r.minimum(r.p1, self.n - 1)), z, r.last_k1_le(r.minimum(r.p0, self.n - 1))

    def __repr__(self):
        return f"Sinks({self.n})"


@dataclass(frozen=True)
class Chunked(Pattern):
    """Block-diagonal: query and key in the same chunk of ``size`` positions (chunk = position // size)."""
    size: int

    def __post_init__(self):
        _check_int("Chunked size", self.size, 1)

    def _mask_pos(self, p, k, ctx, head):
        s = self.size
        # floor division keeps negative positions (Lq > Lk) out of chunk 0
        return torch.div(p, s, rounding_mode="floor") == torch.div(k, s, rounding_mode="floor")

    def _classify(self, ctx):
        p0, p1, k0, k1 = ctx.ranges()
        s = self.size
        cp0, cp1 = torch.div(p0, s, rounding_mode="floor"), torch.div(p1, s, rounding_mode="floor")
        ck0, ck1 = torch.div(k0, s, rounding_mode="floor"), torch.div(k1, s, rounding_mode="floor")
        # chunk ranges [cp0, cp1] and [ck0, ck1]: overlap / both the same single chunk
        any_ = (cp0 <= ck1) & (ck0 <= cp1)
        all_ = (cp0 == ck1) & (cp1 == ck0)
        return any_, all_, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        s = self.size
        c0 = (r.p0 // s) * s              # first position of p0's chunk (floor division, also below 0)
        c1 = (r.p1 // s) * s
        # any: key chunks reach p0's chunk and start by p1's; all: one chunk for queries and keys
        f1 = r.where(c0 == c1, r.last_k1_le(c0 + (s - 1)), -1)
        return r.first_k1_ge(c0), r.last_k0_le(c1 + (s - 1)), r.first_k0_ge(c0), f1

    def __repr__(self):
        return f"Chunked({self.size})"


@dataclass(frozen=True)
class Dilated(Pattern):
    """A causal dilated window: each query sees ``window`` keys, at distances 0, d, 2d, ..., (window-1)d.

    Key ``k`` visible iff ``0 <= p - k <= (window - 1) * dilation`` and ``(p - k) % dilation == 0``
    (Longformer's dilated sliding window).
    """
    window: int
    dilation: int = 1

    def __post_init__(self):
        _check_int("Dilated window", self.window, 1)
        _check_int("Dilated dilation", self.dilation, 1)

    @property
    def _span(self):
        return (self.window - 1) * self.dilation

    def _mask_pos(self, p, k, ctx, head):
        d = p - k
        return (d >= 0) & (d <= self._span) & (torch.remainder(d, self.dilation) == 0)

    def _classify(self, ctx):
        lo, hi = _delta_range(ctx)
        a, b = torch.clamp(lo, min=0), torch.clamp(hi, max=self._span)
        any_ = (a <= b) & _has_multiple(a, b, self.dilation)
        inside = (lo >= 0) & (hi <= self._span)
        if self.dilation == 1:
            all_ = inside
        else:
            all_ = inside & (lo == hi) & (torch.remainder(lo, self.dilation) == 0)
        return any_, all_, _false(ctx)

    def __repr__(self):
        return f"Dilated({self.window}, {self.dilation})"


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer's strided pattern (local and strided heads merged), causal.

    Key ``k`` visible iff ``0 <= p - k < stride`` (the local part) or ``(p - k) % stride == 0`` (the
    strided part).
    """
    stride: int

    def __post_init__(self):
        _check_int("Strided stride", self.stride, 1)

    def _mask_pos(self, p, k, ctx, head):
        d = p - k
        return (d >= 0) & ((d < self.stride) | (torch.remainder(d, self.stride) == 0))

    def _classify(self, ctx):
        s = self.stride
        lo, hi = _delta_range(ctx)
        a = torch.clamp(lo, min=0)
        nonempty = a <= hi
        any_ = nonempty & ((a < s) | _has_multiple(a, hi, s))
        # every difference in [lo, hi] visible: lo >= 0 and the part >= stride is one multiple of s
        r = torch.clamp(lo, min=s)
        rest_ok = (r > hi) | ((r == hi) & (torch.remainder(hi, s) == 0))
        if s == 1:  # every distance is a multiple of 1: Strided(1) is Causal()
            rest_ok = torch.ones_like(rest_ok)
        all_ = (lo >= 0) & rest_ok
        return any_, all_, _false(ctx)

    def __repr__(self):
        return f"Strided({self.stride})"


@dataclass(frozen=True)
class PrefixLM(Pattern):
    """Bidirectional over the first ``prefix_len`` keys, causal after: ``k < prefix_len or k <= p``."""
    prefix_len: int

    def __post_init__(self):
        _check_int("PrefixLM prefix_len", self.prefix_len, 0)

    def _mask_pos(self, p, k, ctx, head):
        return (k < self.prefix_len) | (k <= p)

    def _classify(self, ctx):
        p0, p1, k0, k1 = ctx.ranges()
        # (k < prefix_len) | (k <= p) is k <= max(p, prefix_len - 1); a block is entirely visible iff
        # its last key is visible from its first query
        any_ = k0 <= torch.clamp(p1, min=self.prefix_len - 1)
        all_ = k1 <= torch.clamp(p0, min=self.prefix_len - 1)
        return any_, all_, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        z, m = r.zeros(), self.prefix_len - 1
        return z, r.last_k0_le(r.maximum(r.p1, m)), z, r.last_k1_le(r.maximum(r.p0, m))

    def __repr__(self):
        return f"PrefixLM({self.prefix_len})"


@dataclass(frozen=True)
class Document(Pattern):
    """Packed variable-length sequences: a token sees only tokens of its own document.

    ``lengths`` are the document lengths, in order; they must sum to the key length. Queries are
    placed by position (bottom-right), so with ``Lq < Lk`` the queries are the last tokens. Not causal
    by itself: use ``Document(lengths) & Causal()`` for packed causal LM training.
    """
    lengths: tuple

    def __init__(self, lengths):
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        try:
            lengths = tuple(lengths)
        except TypeError:
            raise TypeError(f"Document lengths must be a sequence of ints, got {type(lengths).__name__}") from None
        if not lengths:
            raise ValueError("Document lengths must not be empty")
        for i, n in enumerate(lengths):
            _check_int(f"Document lengths[{i}]", n, 1)
        object.__setattr__(self, "lengths", lengths)

    def check(self, q_len, kv_len, num_heads=None):
        total = sum(self.lengths)
        if total != kv_len:
            raise ValueError(f"pattern: Document lengths sum to {total} but the key length is {kv_len}")

    def _starts(self, device):
        """First token of every document (int64, cached per device like the id table)."""
        return _doc_starts(self.lengths, str(torch.device(device)))

    def _doc_ids(self, device):
        return _doc_table(self.lengths, str(torch.device(device)))

    def _bind(self, ctx):
        ids = self._doc_ids(ctx.device)  # built once and captured (FlexAttention's mask_mod indexes it)
        last = ctx.kv_len - 1

        def doc(x):  # negative positions (Lq > Lk) are in no document
            return torch.where(x >= 0, ids[x.clamp(0, last)], -1)

        return lambda p, k, head: doc(p) == doc(k)

    def _classify(self, ctx):
        p0, p1, k0, k1 = ctx.ranges()
        if ctx.device.type == "cpu":  # a table lookup (CPU searchsorted threads even for 1K values)
            ids = _doc_bounds(self.lengths)[0]

            def doc(x):  # document id + 1 (0: x < 0)
                return ids[(x + 1).clamp_(min=0)]
        else:
            starts = self._starts(ctx.device)

            def doc(x):  # document id + 1: the number of documents starting at or before x (0: x < 0)
                return torch.searchsorted(starts, x.contiguous(), right=True)

        dp0, dp1, dk0, dk1 = doc(p0), doc(p1), doc(k0), doc(k1)
        # documents are contiguous and non-empty, so a rectangle realises every doc id in its ranges:
        # visible iff the id ranges overlap (keys are never at negative positions, so dk0 >= 1 keeps
        # queries before the first key out), entirely visible iff both are the same single document
        any_ = (dp0 <= dk1) & (dk0 <= dp1)
        all_ = (dp0 == dk1) & (dp1 == dk0)
        return any_, all_, _false(ctx)

    _banded = _band_leaf = True

    def _band(self, r: Rows):
        ids, first, last = (r.array(t) for t in _doc_bounds(self.lengths))
        # doc id + 1 of each block's first / last query (0: before the first key); first / last hold
        # each such id's first and last token (-1 for id 0, which no key has). A table lookup, not
        # searchsorted: on the CPU that one goes multi-threaded even for 1K values (ms of wake-ups).
        d0 = ids[r.maximum(r.p0 + 1, 0)]
        d1 = ids[r.maximum(r.p1 + 1, 0)]
        lo0, hi1 = first[d0], last[d1]
        f1 = r.where(d0 == d1, r.last_k1_le(last[d0]), -1)
        return r.first_k1_ge(lo0), r.last_k0_le(hi1), r.first_k0_ge(lo0), f1

    def __repr__(self):
        if len(self.lengths) > 6:
            head = ", ".join(map(str, self.lengths[:3]))
            return f"Document([{head}, ... {len(self.lengths)} docs, {sum(self.lengths)} tokens])"
        return f"Document({list(self.lengths)})"


@functools.lru_cache(maxsize=16)
def _doc_bounds(lengths: tuple):
    """CPU tables for the band path: ``ids[x + 1]`` = doc id + 1 of token x (``ids[0]`` = 0 for positions
    before the first key, int32), and the first / last token of each doc id + 1 (-1 for id + 1 = 0)."""
    starts, acc = [], 0
    for n in lengths:
        starts.append(acc)
        acc += n
    ids = torch.repeat_interleave(torch.arange(len(lengths) + 1, dtype=torch.int32),
                                  torch.tensor([1, *lengths]))
    first = torch.tensor([-1] + starts, dtype=torch.int64)
    last = torch.tensor([-1] + [s - 1 for s in starts[1:]] + [acc - 1], dtype=torch.int64)
    return ids, first, last


@functools.lru_cache(maxsize=64)
def _doc_starts(lengths: tuple, device: str) -> torch.Tensor:
    """First token of every document (a sorted table for searchsorted)."""
    starts, acc = [], 0
    for n in lengths:
        starts.append(acc)
        acc += n
    return torch.tensor(starts, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _doc_table(lengths: tuple, device: str) -> torch.Tensor:
    """Document id of every token (a lookup table that FlexAttention's mask_mod can index)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def _is_pow2(x):
    return (x > 0) & ((x & (x - 1)) == 0)


@dataclass(frozen=True)
class PowerAttention(Pattern):
    """PowerAttention: a causal local window plus keys at power-of-two distances (1, 2, 4, 8, ...).

    Key ``k`` visible iff ``0 <= p - k <= window`` or ``p - k`` is a power of two, or ``k < sinks``
    (and ``k <= p``). The receptive field doubles per layer, as in the PowerAttention paper.
    """
    window: int
    sinks: int = 0

    def __post_init__(self):
        _check_int("PowerAttention window", self.window, 0)
        _check_int("PowerAttention sinks", self.sinks, 0)

    def _mask_pos(self, p, k, ctx, head):
        d = p - k
        m = ((d >= 0) & (d <= self.window)) | _is_pow2(d)
        if self.sinks:
            m = m | ((k < self.sinks) & (d >= 0))
        return m

    def _classify(self, ctx):
        lo, hi = _delta_range(ctx)
        w = self.window
        a = torch.clamp(lo, min=0)
        in_window = (a <= hi) & (a <= w)
        # largest power of two <= hi, compared with a (hi >= 1)
        hi_pos = torch.clamp(hi, min=1)
        top = torch.pow(2, torch.floor(torch.log2(hi_pos.double()))).long()
        top = torch.where(top * 2 <= hi_pos, top * 2, top)  # guard against log2 rounding down
        top = torch.where(top > hi_pos, top // 2, top)
        has_pow2 = (hi >= 1) & (top >= torch.clamp(a, min=1))
        any_ = in_window | has_pow2
        # all: lo >= 0 and every difference above the window is a power of two; at most {1, 2}
        r = torch.clamp(lo, min=w + 1)
        rest_ok = (r > hi) | ((r == hi) & _is_pow2(hi)) | ((r + 1 == hi) & _is_pow2(r) & _is_pow2(hi))
        all_ = (lo >= 0) & rest_ok
        if self.sinks:
            p0, p1, k0, k1 = ctx.ranges()
            s_any = (k0 < self.sinks) & (k0 <= p1)
            s_all = (k1 < self.sinks) & (k1 <= p0)
            # union with the sink columns: exact when one side is empty or full, else settle by mask
            part_a, part_s = any_ & ~all_, s_any & ~s_all
            any2, all2 = any_ | s_any, all_ | s_all
            return any2, all2, part_a & part_s & ~all2
        return any_, all_, _false(ctx)

    def __repr__(self):
        return f"PowerAttention({self.window})" if not self.sinks else f"PowerAttention({self.window}, sinks={self.sinks})"


@dataclass(frozen=True)
class Mask(Pattern):
    """Escape hatch: a FlexAttention-style ``fn(b, h, q_idx, kv_idx) -> bool`` on raw indices.

    ``b`` is always 0 (layouts broadcast over the batch). Its block layout is computed by evaluating
    ``fn`` on every (query, key) pair, in bounded-memory chunks, so it costs O(Lq * Lk): slower than
    the closed forms of the built-in patterns. Set ``per_head=True`` when ``fn`` depends on ``h``.
    """
    fn: Callable
    per_head: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Mask fn must be callable, got {type(self.fn).__name__}")

    @property
    def head_dependent(self):  # type: ignore[override]
        return self.per_head

    def _heads(self, num_heads):
        return num_heads if (self.per_head and num_heads) else 1

    def check(self, q_len, kv_len, num_heads=None):
        if self.per_head and num_heads is None:
            raise ValueError("pattern: Mask(per_head=True) needs the number of query heads (num_heads=)")

    def _mask_pos(self, p, k, ctx, head):
        q_idx = p - ctx.offset
        zero = torch.zeros((), dtype=torch.int64, device=p.device)
        h = head if head is not None else zero
        out = self.fn(zero, h, q_idx, k)
        return torch.as_tensor(out, device=p.device).to(torch.bool).expand(
            torch.broadcast_shapes(p.shape, k.shape, h.shape))

    def _classify(self, ctx):
        h = ctx.num_heads if self.per_head else 1
        t = torch.ones((h, ctx.nq, ctx.nk), dtype=torch.bool, device=ctx.device)
        return t, torch.zeros_like(t), t

    def __repr__(self):
        name = getattr(self.fn, "__name__", "fn")
        return f"Mask({name}{', per_head=True' if self.per_head else ''})"


# --------------------------------------------------------------------------------------------------
# Block-sparse attention: an explicit grid of blocks
# --------------------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


class BlockBits:
    """An immutable, hashable grid of bits: the block mask of a `BlockSparse`, packed 8 blocks a byte.

    Equal grids are equal values with equal hashes (the hash is computed once), so a pattern holding one
    is a cheap cache key even for large masks. ``tensor()`` gives the bool grid back (on the CPU)."""

    __slots__ = ("shape", "bits", "_hash", "_digest")

    def __init__(self, shape: tuple, bits: bytes):
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "bits", bytes(bits))
        object.__setattr__(self, "_hash", hash((self.shape, self.bits)))
        object.__setattr__(self, "_digest", None)

    def __setattr__(self, name, value):
        raise AttributeError("BlockBits is immutable")

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "BlockBits":
        flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.int32)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        packed = (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)
        try:
            data = packed.numpy().tobytes()
        except Exception:  # noqa: BLE001 - numpy missing: the slow way
            data = bytes(packed.tolist())
        return cls(tuple(t.shape), data)

    def tensor(self) -> torch.Tensor:
        """The grid as a bool tensor of ``shape``, on the CPU (a new tensor each call)."""
        n = math.prod(self.shape)
        packed = torch.frombuffer(bytearray(self.bits), dtype=torch.uint8).to(torch.int32)
        bits = (packed[:, None] & _BIT_WEIGHTS).ne(0).reshape(-1)[:n]
        return bits.reshape(self.shape)

    @property
    def digest(self) -> str:
        if self._digest is None:
            import hashlib
            object.__setattr__(self, "_digest", hashlib.sha1(repr(self.shape).encode() + self.bits).hexdigest()[:12])
        return self._digest

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, BlockBits):
            return NotImplemented
        return self._hash == other._hash and self.shape == other.shape and self.bits == other.bits

    def __repr__(self):
        return f"BlockBits(shape={self.shape}, sha1={self.digest})"

    def __reduce__(self):
        return (BlockBits, (self.shape, self.bits))


@functools.lru_cache(maxsize=32)
def _bs_table(bits: BlockBits, device: str) -> torch.Tensor:
    """The block mask as (H, nQ, nK) bool on ``device`` (H = 1 for a head-independent mask)."""
    t = bits.tensor()
    if t.dim() == 2:
        t = t[None]
    return t.to(device)


@functools.lru_cache(maxsize=8)
def _bs_sat(bits: BlockBits, device: str) -> torch.Tensor:
    """Summed-area table of the block mask: (H, nQ + 1, nK + 1), ``S[h, r, c]`` = blocks on in rows < r and
    columns < c (int32 while the counts fit). Any rectangle of blocks is counted with four lookups."""
    t = _bs_table(bits, device)
    dt = torch.int32 if t.shape[1] * t.shape[2] < 2**31 else torch.int64
    s = t.to(dt).cumsum(1, dtype=dt).cumsum(2, dtype=dt)
    return torch.nn.functional.pad(s, (1, 0, 1, 0))


def _block_size(value) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"BlockSparse block_size must be an int or a pair (block_q, block_k), got {value!r}")
        bq, bk = value
    else:
        bq = bk = value
    _check_int("BlockSparse block_size (query)", bq, 1)
    _check_int("BlockSparse block_size (key)", bk, 1)
    return int(bq), int(bk)


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Block-sparse attention: query ``i`` sees key ``j`` iff their block pair is on in ``block_mask``.

    ``block_mask`` is a bool tensor of shape (nq_blocks, nk_blocks), or (H, nq_blocks, nk_blocks) for one
    mask per query head (then the pattern is head-dependent and needs H query heads); ``block_size`` is
    an int or ``(block_q, block_k)``. Like every pattern, queries are placed by position (bottom-right
    aligned): the query at key position ``p`` uses block row ``p // block_q``, key ``j`` block column
    ``j // block_k``. The mask must cover every key position (``ceil(Lk / block_q)`` rows and
    ``ceil(Lk / block_k)`` columns; larger masks are fine, their extra blocks unused), else `check`
    raises. The layout is exact for any kernel block size (a summed-area table of the block mask, no
    N x N evaluation). ``BlockSparse.random(...)`` draws a seeded random mask.

    The mask is stored packed (`BlockBits`), so patterns are immutable, hashable cache keys.
    """
    block_mask: BlockBits
    block_size: tuple = (128, 128)

    def __init__(self, block_mask, block_size=128):
        bs = _block_size(block_size)
        if not isinstance(block_mask, BlockBits):
            if not isinstance(block_mask, torch.Tensor):
                try:
                    block_mask = torch.as_tensor(block_mask)
                except Exception:  # noqa: BLE001
                    raise TypeError("BlockSparse block_mask must be a bool tensor of shape (nq_blocks, "
                                    f"nk_blocks) or (H, nq_blocks, nk_blocks), got {type(block_mask).__name__}"
                                    ) from None
            if block_mask.dtype != torch.bool:
                if block_mask.dtype.is_floating_point or block_mask.dtype.is_complex or not bool(
                        ((block_mask == 0) | (block_mask == 1)).all()):
                    raise TypeError(f"BlockSparse block_mask must be a bool tensor (or 0/1 integers), got "
                                    f"dtype {block_mask.dtype}")
                block_mask = block_mask != 0
            if block_mask.dim() not in (2, 3):
                raise ValueError(f"BlockSparse block_mask must have shape (nq_blocks, nk_blocks) or (H, nq_blocks, "
                                 f"nk_blocks), got shape {tuple(block_mask.shape)}")
            if block_mask.numel() == 0:
                raise ValueError(f"BlockSparse block_mask must not be empty, got shape {tuple(block_mask.shape)}")
            block_mask = BlockBits.from_tensor(block_mask)
        object.__setattr__(self, "block_mask", block_mask)
        object.__setattr__(self, "block_size", bs)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def random(cls, q_len: int, kv_len: int, density: float, block_size=128, causal: bool = False, seed: int = 0,
               num_heads=None) -> "BlockSparse":
        """A seeded random block mask for ``q_len`` queries and ``kv_len`` keys.

        ``density`` is the fraction of the *allowed* block pairs that are kept: every block pair the
        queries reach, or with ``causal=True`` those on or below the block diagonal (a block is allowed
        when its first key is at or before its last query position). The diagonal blocks (those holding
        the key at each query's own position) are always kept, so no query row is empty; the others are
        drawn uniformly without replacement (``torch.Generator`` seeded with ``seed``) to reach
        ``round(density * allowed)`` blocks. ``causal`` acts on blocks only: inside a diagonal block
        queries see later keys; intersect with `Causal` (``BlockSparse.random(...) & Causal()``) for
        token-level causality. The exact share of visible (query, key) pairs is ``density(q_len, kv_len)``.
        ``num_heads``: one independent mask per head (a head-dependent pattern).
        """
        _check_len("BlockSparse.random q_len", q_len)
        _check_len("BlockSparse.random kv_len", kv_len)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"BlockSparse.random density must be a number in (0, 1], got {density!r}")
        if num_heads is not None:
            _check_int("BlockSparse.random num_heads", num_heads, 1)
        _check_int("BlockSparse.random seed", seed, 0)
        bq, bk = _block_size(block_size)
        nq, nk = -(-kv_len // bq), -(-kv_len // bk)
        lo = max(kv_len - q_len, 0)                               # first query position
        r = torch.arange(nq)[:, None]
        c = torch.arange(nk)[None, :]
        row_first = torch.clamp(r * bq, min=lo)                   # positions of each row's queries
        row_last = torch.clamp((r + 1) * bq, max=kv_len) - 1
        used = row_last >= lo
        allowed = used.expand(nq, nk)
        if causal:
            allowed = allowed & (c * bk <= row_last)
        diag = used & (c >= row_first // bk) & (c <= row_last // bk)
        n_allowed = int(allowed.sum())
        target = int(round(float(density) * n_allowed))
        cand = (allowed & ~diag).reshape(-1).nonzero().squeeze(1)
        n_extra = max(0, min(target - int(diag.sum()), cand.numel()))
        g = torch.Generator().manual_seed(int(seed))
        masks = []
        for _ in range(num_heads or 1):
            m = diag.reshape(-1).clone()
            if n_extra:
                m[cand[torch.randperm(cand.numel(), generator=g)[:n_extra]]] = True
            masks.append(m.view(nq, nk))
        block_mask = torch.stack(masks) if num_heads is not None else masks[0]
        return cls(block_mask, (bq, bk))

    # -- properties -------------------------------------------------------------------------------
    @property
    def head_dependent(self):  # type: ignore[override]
        return len(self.block_mask.shape) == 3

    @property
    def blocks(self) -> torch.Tensor:
        """The block mask as a bool tensor (CPU): (nq_blocks, nk_blocks) or (H, nq_blocks, nk_blocks)."""
        return self.block_mask.tensor()

    def _grid(self):
        s = self.block_mask.shape
        return (1,) + s if len(s) == 2 else s

    def _heads(self, num_heads):
        return self._grid()[0] if self.head_dependent else 1

    def block_density(self) -> float:
        """Fraction of the mask's block pairs that are on (over the whole grid, all heads)."""
        t = self.block_mask.tensor()
        return float(t.sum()) / t.numel()

    def check(self, q_len, kv_len, num_heads=None):
        h, nq, nk = self._grid()
        bq, bk = self.block_size
        if self.head_dependent and num_heads is not None and num_heads != h:
            raise ValueError(f"pattern: BlockSparse has a per-head block mask for {h} heads but the query has "
                             f"{num_heads} heads (Hq)")
        need_q, need_k = -(-kv_len // bq), -(-kv_len // bk)
        if need_q > nq or need_k > nk:
            raise ValueError(
                f"pattern: BlockSparse block_mask has {nq} x {nk} blocks of {bq} x {bk} (query positions < "
                f"{nq * bq}, keys < {nk * bk}) but kv_len={kv_len} needs at least {need_q} x {need_k} blocks: "
                "queries sit at key positions (bottom-right aligned), so the mask must cover every key position "
                "on both axes")

    # -- mask and layout --------------------------------------------------------------------------
    def _bind(self, ctx):
        t = _bs_table(self.block_mask, str(ctx.device))            # (H, nQ, nK), built once and captured
        h_n, nq, nk = t.shape
        bq, bk = self.block_size
        per_head = self.head_dependent
        t0 = t[0]

        def f(p, k, head):
            qb = torch.div(p, bq, rounding_mode="floor")
            kb = torch.div(k, bk, rounding_mode="floor")
            ok = (p >= 0) & (qb < nq) & (kb < nk) & (k >= 0)
            qi, ki = qb.clamp(0, nq - 1), kb.clamp(0, nk - 1)
            if per_head:
                if head is None:
                    raise ValueError("BlockSparse with a per-head block mask needs head=")
                on = t[torch.as_tensor(head, device=t.device).clamp(0, h_n - 1), qi, ki]
            else:
                on = t0[qi, ki]
            return on & ok

        return f

    def _mask_pos(self, p, k, ctx, head):
        return self._bind(ctx)(p, k, head)

    def _classify(self, ctx):
        # A kernel block covers positions [p0, p1] and keys [k0, k1]: pattern block rows r0..r1 and columns
        # c0..c1, each of which it meets in at least one pair, so it is visible somewhere iff one of those
        # blocks is on, and everywhere iff all are on (and all its positions are real and covered).
        s = _bs_sat(self.block_mask, str(ctx.device))
        _, nq, nk = self._grid()
        bq, bk = self.block_size
        p0, p1, k0, k1 = ctx.ranges()
        r1 = torch.div(p1, bq, rounding_mode="floor")
        c1 = torch.div(k1, bk, rounding_mode="floor")
        r0 = torch.div(p0.clamp(min=0), bq, rounding_mode="floor").clamp_(max=nq)
        c0 = torch.div(k0, bk, rounding_mode="floor").clamp_(max=nk)
        r1c, c1c = r1.clamp(-1, nq - 1), c1.clamp(max=nk - 1)
        cnt = (s[:, r1c + 1, c1c + 1] - s[:, r0, c1c + 1]) - (s[:, r1c + 1, c0] - s[:, r0, c0])
        rows = (r1c - r0 + 1).clamp_(min=0)
        cols = (c1c - c0 + 1).clamp_(min=0)
        any_ = cnt > 0
        covered = (p0 >= 0) & (r1 < nq)
        all_ = (cnt == rows * cols) & covered & (c1 < nk)
        return any_, all_ & any_, None

    def count_visible(self, q_len, kv_len, num_heads=None):
        _, nq, nk = self._grid()
        bq, bk = self.block_size
        lo = max(kv_len - q_len, 0)
        r = torch.arange(nq, dtype=torch.int64)
        c = torch.arange(nk, dtype=torch.int64)
        rows = (torch.clamp((r + 1) * bq, max=kv_len) - torch.clamp(r * bq, min=lo)).clamp_(min=0)
        cols = (torch.clamp((c + 1) * bk, max=kv_len) - c * bk).clamp_(min=0)
        t = _bs_table(self.block_mask, "cpu").to(torch.int64)
        return int(((t * cols).sum(-1) * rows).sum())

    def density(self, q_len=None, kv_len=None, num_heads=None) -> float:
        """Exact fraction of visible (query, key) pairs (mean over heads for a per-head mask). Without
        lengths: self-attention over the whole grid the mask covers, ``min(nq * block_q, nk * block_k)``."""
        if q_len is None and kv_len is None:
            _, nq, nk = self._grid()
            q_len = kv_len = min(nq * self.block_size[0], nk * self.block_size[1])
        elif q_len is None or kv_len is None:
            raise ValueError("BlockSparse.density: give both q_len and kv_len, or neither")
        return super().density(q_len, kv_len, num_heads)

    def __repr__(self):
        shape = "x".join(map(str, self.block_mask.shape))
        bq, bk = self.block_size
        bs = str(bq) if bq == bk else f"({bq}, {bk})"
        return (f"BlockSparse(<{shape} blocks, {self.block_density():.3g} on, sha1 {self.block_mask.digest}>, "
                f"block_size={bs})")
