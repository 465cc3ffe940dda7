"""The block layout of a routed pattern (`RoutedBlocks`) in one Triton kernel: classification and compaction
fused, one program per layout line (a query block's row, or a key block's column for the transposed
layout the backward walks).

`RoutedBlocks.layouts` builds the same layout with PyTorch ops in closed form (a gather, or a summed-area
table when kernel and router blocks straddle), then turns the (2, H, nq, nk) partial / full flags into
index lists with a cumsum and a scatter: a dozen passes over the full block grid, several in int64. At
32K tokens and 64 heads (router blocks of 64, kernel blocks 128 x 64) that cost about a quarter of the
sparse attention it prepares (H200, 2026-12-03). Here each program walks its line once: for every kernel
block it reads the few router cells the block touches (at most ``SR x SC``, static loops), decides partial /
full exactly as `RoutedBlocks._classify` does (causality folded in the same way), and appends the block to
the partial or the full list with an in-register prefix sum. Nothing else is written: entries of a list past
its count are left as they were (the kernels read only ``count`` entries; `BlockLayout` documents padding
as arbitrary).

The PyTorch path stays the reference (and the fallback for callers outside the Triton backend); the tests
compare the two on random masks, aligned and straddling block sizes, causal and not, cross attention and
ragged lengths.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...patterns import BlockLayout, RoutedBlocks


@triton.jit
def _routed_layout_kernel(T, t_h, NQR, NKR, bq, bk, NUM, IDX, H, NL, NO, off, Lk, BQ, BK,
                          CAUSAL: tl.constexpr, TRANS: tl.constexpr, SR: tl.constexpr, SC: tl.constexpr,
                          CH: tl.constexpr):
    line = tl.program_id(0)
    h = tl.program_id(1)
    tb = T + h.to(tl.int64) * t_h
    out_p = IDX + (h.to(tl.int64) * NL + line) * NO               # this line's partial list
    out_f = IDX + ((H + h).to(tl.int64) * NL + line) * NO         # and its full list
    base_p = 0
    base_f = 0
    for o0 in range(0, NO, CH):
        oo = o0 + tl.arange(0, CH)
        valid = oo < NO
        if TRANS:  # a key block's column: the other coordinate runs over query blocks
            i = oo
            j = line + 0 * oo
        else:
            i = line + 0 * oo
            j = oo
        # the kernel block: positions [p0, p1] (below 0: no query), keys [k0, k1]
        p0 = off + i * BQ
        p1 = tl.minimum(p0 + BQ - 1, Lk - 1)
        k0 = j * BK
        k1 = tl.minimum(k0 + BK - 1, Lk - 1)
        # the router rows / columns it meets (inclusive; empty when r1c < r0)
        r0 = tl.minimum(tl.maximum(p0, 0) // bq, NQR)
        r1 = tl.where(p1 >= 0, p1 // bq, -1)
        r1c = tl.minimum(r1, NQR - 1)
        c0 = tl.minimum(k0 // bk, NKR)
        c1 = k1 // bk
        c1c = tl.minimum(c1, NKR - 1)
        if CAUSAL:  # router blocks that can hold a pair with key <= position inside this kernel block
            ra = tl.maximum(r0, k0 // bq)
            cb = tl.minimum(c1c, tl.where(p1 >= 0, p1 // bk, -1))
        else:
            ra = r0
            cb = c1c
        any_ = tl.zeros([CH], dtype=tl.int1)
        all_ = tl.full([CH], 1, dtype=tl.int1)
        for dr in tl.static_range(SR):
            r = r0 + dr
            for dc in tl.static_range(SC):
                c = c0 + dc
                inside = (r <= r1c) & (c <= c1c)
                on = tl.load(tb + r * NKR + c, mask=inside & valid, other=0) != 0
                if CAUSAL:
                    on = on & (c * bk <= (r + 1) * bq - 1)
                all_ = all_ & (on | (~inside))
                any_ = any_ | (on & inside & (r >= ra) & (c <= cb))
        all_ = all_ & (p0 >= 0) & (r1 < NQR) & (c1 < NKR)
        if CAUSAL:
            any_ = any_ & (k0 <= p1)
            all_ = all_ & (k1 <= p0)
        full = all_ & any_ & valid
        part = any_ & (~all_) & valid
        fp = part.to(tl.int32)
        ff = full.to(tl.int32)
        tl.store(out_p + base_p + tl.cumsum(fp, 0) - 1, oo, mask=part)
        tl.store(out_f + base_f + tl.cumsum(ff, 0) - 1, oo, mask=full)
        base_p += tl.sum(fp, 0)
        base_f += tl.sum(ff, 0)
    tl.store(NUM + h * NL + line, base_p)
    tl.store(NUM + (H + h) * NL + line, base_f)


def _span(kernel_block: int, router_block: int, offset: int, lines: int) -> int:
    """Most router blocks one kernel block of ``kernel_block`` tokens can meet, over the phases its start
    takes (``offset + i * kernel_block`` modulo ``router_block``, i < lines)."""
    period = router_block // math.gcd(kernel_block, router_block)
    phases = {(offset + i * kernel_block) % router_block for i in range(min(lines, period))}
    return max((ph + kernel_block - 1) // router_block + 1 for ph in phases)


def _one(t: torch.Tensor, pattern: RoutedBlocks, lq: int, lk: int, bm: int, bn: int, transposed: bool):
    h, nqr, nkr = t.shape
    bq, bk = pattern.block_size
    nq, nk = -(-lq // bm), -(-lk // bn)
    nl, no = (nk, nq) if transposed else (nq, nk)
    off = lk - lq
    num = torch.empty((2, h, nl), dtype=torch.int32, device=t.device)
    idx = torch.empty((2, h, nl, no), dtype=torch.int32, device=t.device)
    sr = _span(bm, bq, off, nq)
    sc = _span(bn, bk, 0, nk)
    ch = min(1024, max(16, triton.next_power_of_2(no)))
    _routed_layout_kernel[(nl, h)](t, nqr * nkr if h > 1 else 0, nqr, nkr, bq, bk, num, idx, h, nl, no, off, lk,
                                   bm, bn, CAUSAL=pattern.causal, TRANS=transposed, SR=sr, SC=sc, CH=ch,
                                   num_warps=4)
    if transposed:
        return BlockLayout(num[0:1], idx[0:1], num[1:2], idx[1:2], bn, bm, lk, lq)
    return BlockLayout(num[0:1], idx[0:1], num[1:2], idx[1:2], bm, bn, lq, lk)


def routed_layouts(pattern: RoutedBlocks, lq: int, lk: int, bm: int, bn: int, device, num_heads=None,
                   transposed: bool = True):
    """As `RoutedBlocks.layouts` (same lists; padding past the counts unspecified), by the kernel above."""
    pattern.check(lq, lk, num_heads)
    t = pattern._table(device).contiguous().view(torch.uint8)
    lay = _one(t, pattern, lq, lk, bm, bn, False)
    return lay, (_one(t, pattern, lq, lk, bm, bn, True) if transposed else None)
