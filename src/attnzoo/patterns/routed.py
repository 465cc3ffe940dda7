"""`RoutedBlocks`: a block mask that lives on the device and is made anew for every call (by a router).

`BlockSparse` is a *static* pattern: its mask is packed on the host (`BlockBits`), so the pattern is a
value, hashable and a cache key of every backend. That is right for a mask fixed once, and wrong for a
mask a router computes from q and k at every call: packing it costs a device->host copy, and a cache
keyed by the pattern gains one entry per call. `RoutedBlocks` keeps the mask where the router made it:

- the block layout is classified on the mask's device in closed form (a gather, or a summed-area table
  of the mask when the kernel's blocks straddle the router's), exact for any kernel block sizes, without
  a single device->host synchronisation; ``causal=True`` intersects with token causality exactly (no
  composite with `Causal`, whose partial-partial blocks would need evaluating the mask);
- equality and hashing are by *identity* (the default of ``object``): two RoutedBlocks over equal masks
  are different patterns. It is a per-call object; backends must not cache anything keyed by it (the
  Triton backend keys its kernels by `RoutedBlocks.static_key`, the part that does not depend on the
  mask's contents, and passes the mask itself as a tensor);
- ``density`` / ``count_visible`` read the mask back (a sync): they are for reports, not the hot path.

Geometry as `BlockSparse`: queries sit at key positions (bottom-right aligned), the query at position
``p`` uses block row ``p // block_q``, key ``j`` block column ``j // block_k``; positions below 0
(``Lq > Lk``) see nothing. With ``causal=True`` key ``j`` is also visible only if ``j <= p``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Ctx, Pattern, _check_len
from .layout import BlockLayout, _selection


def _block_size(value) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"RoutedBlocks block_size must be an int or a pair (block_q, block_k), got {value!r}")
        bq, bk = value
    else:
        bq = bk = value
    for name, b in (("query", bq), ("key", bk)):
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"RoutedBlocks block_size ({name}) must be an int, got {type(b).__name__}: {b!r}")
        if b < 1:
            raise ValueError(f"RoutedBlocks block_size ({name}) must be >= 1, got {b}")
    return int(bq), int(bk)


def _sat(t: torch.Tensor) -> torch.Tensor:
    """Summed-area table of a bool grid (H, nq, nk): (H, nq + 1, nk + 1), ``S[h, r, c]`` = cells on in rows < r
    and columns < c."""
    dt = torch.int32 if (t.shape[1] + 1) * (t.shape[2] + 1) < 2**31 else torch.int64
    s = t.to(dt).cumsum(1, dtype=dt).cumsum(2, dtype=dt)
    return torch.nn.functional.pad(s, (1, 0, 1, 0))


def _rect(s: torch.Tensor, r0, r1, c0, c1) -> torch.Tensor:
    """Cells on in rows r0..r1 x columns c0..c1 (inclusive; empty when r1 < r0 or c1 < c0) from a summed-area
    table; r0, c0 in [0, n], r1, c1 in [-1, n - 1], broadcasting (NQ, 1) rows against (1, NK) columns."""
    e0 = torch.maximum(r1 + 1, r0)            # an empty range counts 0 (instead of a negative difference)
    e1 = torch.maximum(c1 + 1, c0)
    return (s[:, e0, e1] - s[:, r0, e1]) - (s[:, e0, c0] - s[:, r0, c0])


class RoutedBlocks(Pattern):
    """A device block mask, per call: query ``i`` sees key ``j`` iff their block pair is on (and ``j <= p``
    with ``causal=True``). ``block_mask``: bool tensor (H, nq_blocks, nk_blocks), one mask per query head
    (or (nq_blocks, nk_blocks), shared); it stays on its device and is not copied (do not modify it while
    the pattern is in use). Equal by identity, not by value (see the module docstring)."""

    def __init__(self, block_mask: torch.Tensor, block_size=64, causal: bool = False):
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"RoutedBlocks block_mask must be a bool torch.Tensor, got {type(block_mask).__name__}")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"RoutedBlocks block_mask must be a bool tensor, got dtype {block_mask.dtype}")
        if block_mask.dim() not in (2, 3):
            raise ValueError(f"RoutedBlocks block_mask must have shape (H, nq_blocks, nk_blocks) or (nq_blocks, "
                             f"nk_blocks), got shape {tuple(block_mask.shape)}")
        if block_mask.numel() == 0:
            raise ValueError(f"RoutedBlocks block_mask must not be empty, got shape {tuple(block_mask.shape)}")
        if not isinstance(causal, bool):
            raise TypeError(f"RoutedBlocks causal must be a bool, got {type(causal).__name__}: {causal!r}")
        object.__setattr__(self, "block_mask", block_mask.detach())
        object.__setattr__(self, "block_size", _block_size(block_size))
        object.__setattr__(self, "causal", causal)

    def __setattr__(self, name, value):
        raise AttributeError("RoutedBlocks is immutable")

    # -- properties -------------------------------------------------------------------------------
    @property
    def head_dependent(self):  # type: ignore[override]
        return self.block_mask.dim() == 3

    @property
    def grid(self) -> tuple:
        """(H, nq_blocks, nk_blocks), H = 1 for a shared mask."""
        s = tuple(self.block_mask.shape)
        return (1,) + s if len(s) == 2 else s

    @property
    def device(self) -> torch.device:
        return self.block_mask.device

    def static_key(self) -> tuple:
        """What a kernel specialised on this pattern may depend on without reading the mask: a hashable
        value, equal for every routed call of one router and shape (the Triton backend's cache key)."""
        return ("RoutedBlocks", self.grid, self.block_size, self.causal)

    def _heads(self, num_heads):
        return self.grid[0] if self.head_dependent else 1

    def _table(self, device) -> torch.Tensor:
        """The mask as (H, nq, nk) bool on ``device`` (a view when it is already there)."""
        t = self.block_mask if self.block_mask.dim() == 3 else self.block_mask[None]
        return t if t.device == torch.device(device) else t.to(device)

    def check(self, q_len, kv_len, num_heads=None):
        h, nq, nk = self.grid
        bq, bk = self.block_size
        if self.head_dependent and num_heads is not None and num_heads != h:
            raise ValueError(f"pattern: RoutedBlocks has a per-head block mask for {h} heads but the query has "
                             f"{num_heads} heads (Hq)")
        need_q, need_k = -(-kv_len // bq), -(-kv_len // bk)
        if need_q > nq or need_k > nk:
            raise ValueError(
                f"pattern: RoutedBlocks block_mask has {nq} x {nk} blocks of {bq} x {bk} but kv_len={kv_len} needs "
                f"at least {need_q} x {need_k} blocks: queries sit at key positions (bottom-right aligned), so "
                "the mask must cover every key position on both axes")

    # -- mask ------------------------------------------------------------------------------------
    def _bind(self, ctx):
        t = self._table(ctx.device)                   # captured (FlexAttention's mask_mod indexes it)
        h_n, nq, nk = t.shape
        bq, bk = self.block_size
        per_head, causal = self.head_dependent, self.causal
        t0 = t[0]

        def f(p, k, head):
            qb = torch.div(p, bq, rounding_mode="floor")
            kb = torch.div(k, bk, rounding_mode="floor")
            ok = (p >= 0) & (qb < nq) & (kb < nk) & (k >= 0)
            if causal:
                ok = ok & (k <= p)
            qi, ki = qb.clamp(0, nq - 1), kb.clamp(0, nk - 1)
            if per_head:
                if head is None:
                    raise ValueError("RoutedBlocks with a per-head block mask needs head=")
                on = t[torch.as_tensor(head, device=t.device).clamp(0, h_n - 1), qi, ki]
            else:
                on = t0[qi, ki]
            return on & ok

        return f

    def _mask_pos(self, p, k, ctx, head):
        return self._bind(ctx)(p, k, head)

    # -- layout ----------------------------------------------------------------------------------
    def nested(self, q_len: int, kv_len: int, block_q: int, block_k: int) -> bool:
        """Whether every kernel block (``block_q`` x ``block_k``, query blocks starting at position
        ``kv_len - q_len``) lies inside one router block: then a visited kernel block is partial only
        through causality, and the in-kernel mask of partial blocks is the causal mask alone."""
        bq, bk = self.block_size
        return bq % block_q == 0 and bk % block_k == 0 and (kv_len - q_len) % block_q == 0

    def _classify(self, ctx: Ctx):
        """Exact (any, all) per kernel block, on the mask's device, no host sync (see the module docstring).

        A kernel block is the rectangle of positions [p0, p1] x keys [k0, k1] (positions below 0 see nothing,
        so the rows start at max(p0, 0)); it meets router rows r0..r1 and columns c0..c1, each router block
        there in a non-empty rectangle. Not causal: visible somewhere iff one of those router blocks is on,
        everywhere iff all are on (and every position is real). Causal: router block (r, c) (rows
        [R0, R1], columns [C0, C1]) has a pair with key <= position inside the kernel block iff
        max(k0, C0) <= min(p1, R1), i.e. k0 <= p1, C0 <= R1 (a property of the router block: folded into the
        table), r >= k0 // bq (k0 <= R1) and c <= p1 // bk (C0 <= p1): a rectangle again. Everywhere needs
        k1 <= p0, and then every router block of the range has C0 <= R1, so one table serves both."""
        t = self._table(ctx.device)
        _, nq, nk = t.shape
        bq, bk = self.block_size
        p0, p1, k0, k1 = ctx.ranges()
        if self.nested(ctx.q_len, ctx.kv_len, ctx.block_q, ctx.block_k):
            # one router block per kernel block: a gather. With the offset a multiple of the kernel's query
            # block, a block's positions are all >= 0 or all < 0.
            r = torch.div(p0, bq, rounding_mode="floor")
            c = torch.div(k0, bk, rounding_mode="floor")
            on = t[:, r.clamp(0, nq - 1), c.clamp(max=nk - 1)] & ((p0 >= 0) & (r < nq) & (c < nk))
            if not self.causal:
                return on, on, None
            return on & (k0 <= p1), on & (k1 <= p0), None
        if self.causal:
            rr = torch.arange(nq, device=t.device)[:, None]
            cc = torch.arange(nk, device=t.device)[None, :]
            t = t & (cc * bk <= (rr + 1) * bq - 1)    # router blocks holding some key <= position
        s = _sat(t)
        r1 = torch.div(p1, bq, rounding_mode="floor")
        c1 = torch.div(k1, bk, rounding_mode="floor")
        r0 = torch.div(p0.clamp(min=0), bq, rounding_mode="floor").clamp_(max=nq)
        c0 = torch.div(k0, bk, rounding_mode="floor").clamp_(max=nk)
        r1c, c1c = r1.clamp(-1, nq - 1), c1.clamp(max=nk - 1)
        full_area = ((r1c - r0 + 1).clamp_(min=0) * (c1c - c0 + 1).clamp_(min=0))
        cnt = _rect(s, r0, r1c, c0, c1c)
        all_ = (cnt == full_area) & ((p0 >= 0) & (r1 < nq)) & (c1 < nk)
        if not self.causal:
            any_ = cnt > 0
            return any_, all_ & any_, None
        ra = torch.maximum(r0, torch.div(k0, bq, rounding_mode="floor")).clamp_(max=nq)
        cb = torch.minimum(c1c, torch.div(p1, bk, rounding_mode="floor").clamp(min=-1))
        any_ = (_rect(s, ra, r1c, c0, cb) > 0) & (k0 <= p1)
        return any_, all_ & (k1 <= p0) & any_, None

    def block_layout(self, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128, device=None,
                     num_heads: Optional[int] = None) -> BlockLayout:
        """As `Pattern.block_layout`, on the mask's device by default."""
        return super().block_layout(q_len, kv_len, block_q, block_k, device=device or self.device,
                                    num_heads=num_heads)

    def layouts(self, q_len: int, kv_len: int, block_q: int, block_k: int, device=None,
                num_heads: Optional[int] = None, transposed: bool = True):
        """``(layout, transposed layout or None)`` from one classification, on ``device`` (default: the
        mask's), without a host sync. The transposed layout lists, per kv block, the query blocks that
        see it (partial / full): what a backward kernel over key blocks walks (its ``block_q`` is
        ``block_k``, its lengths swapped)."""
        for name, v in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_k", block_k)):
            _check_len(name, v)
        self.check(q_len, kv_len, num_heads)
        ctx = Ctx(q_len, kv_len, block_q, block_k, num_heads, torch.device(device or self.device))
        any_, all_, _ = self._classify3(ctx)
        sel = _selection(any_, all_)                   # (2, H, nq, nk): partial, full
        lay = BlockLayout._from_selection(sel, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
        if not transposed:
            return lay, None
        tsel = sel.transpose(-1, -2).contiguous()
        return lay, BlockLayout._from_selection(tsel, block_q=block_k, block_k=block_q, q_len=kv_len, kv_len=q_len)

    # -- density ---------------------------------------------------------------------------------
    def count_visible(self, q_len, kv_len, num_heads=None):
        """Exact visible pairs, summed over heads, in closed form per router block (one sync)."""
        t = self._table(self.device)
        _, nq, nk = t.shape
        bq, bk = self.block_size
        dev = t.device
        off = kv_len - q_len
        r = torch.arange(nq, dtype=torch.int64, device=dev)[:, None]
        c = torch.arange(nk, dtype=torch.int64, device=dev)[None, :]
        a = torch.clamp(r * bq, min=max(off, 0))                       # real query positions [a, b)
        b = torch.clamp((r + 1) * bq, max=kv_len)
        c0 = c * bk                                                     # keys [c0, c0 + w)
        w = (torch.clamp((c + 1) * bk, max=kv_len) - c0).clamp_(min=0)
        if self.causal:
            def s(n):  # sum over j = 1..n of min(j, w) (0 for n <= 0): the keys <= p of the block, summed
                n = n.clamp(min=0)
                m = torch.minimum(n, w)
                return m * (m + 1) // 2 + (n - m) * w
            pairs = s(b - c0) - s(a - c0)
        else:
            pairs = (b - a) * w
        pairs = torch.where(b > a, pairs, 0)
        return int((t.to(torch.int64) * pairs).sum())

    def density(self, q_len: int, kv_len: int, num_heads: Optional[int] = None) -> float:
        _check_len("q_len", q_len)
        _check_len("kv_len", kv_len)
        return super().density(q_len, kv_len, num_heads)

    def __repr__(self):
        shape = "x".join(map(str, self.block_mask.shape))
        bq, bk = self.block_size
        bs = str(bq) if bq == bk else f"({bq}, {bk})"
        return f"RoutedBlocks(<{shape} blocks on {self.device}>, block_size={bs}, causal={self.causal})"
