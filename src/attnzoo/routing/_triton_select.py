"""Top-k block selection in one Triton kernel: `select_blocks`' ``top_k`` path without the (B, H, nb, nb)
intermediates.

The PyTorch path masks the scores (a copy), runs ``torch.topk`` over every row, scatters the winners into a
zeroed mask and ORs the forced blocks in: five passes over the block grid plus the top-k itself, about
three quarters of the routers' time at 64K tokens (H200, 2026-12-03: route 4.2 ms against 18 ms of sparse
attention, where issue 7 allows 10 %). Here one program takes one row (a query block's scores, at most a few
thousand values, held in registers), builds the allowed / forced / candidate flags from the row and column
numbers, finds the k-th largest candidate score by a 32-step radix select on the float's order-preserving
integer key (counting, per bit, the candidates at or above the prefix), and writes the row of the mask
once: candidates above the threshold, ties at the threshold by increasing column until k are kept, and the
forced blocks. Same result as the PyTorch path (which breaks ties arbitrarily; scores here are continuous).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _select_topk_kernel(S, HAS_Q, M, NB, K, SINKS, LOCAL, CAUSAL: tl.constexpr, NBP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = (row % NB).to(tl.int32)
    c = tl.arange(0, NBP)
    inb = c < NB
    s = tl.load(S + row * NB + c, mask=inb, other=0.0)
    hq = tl.load(HAS_Q + r) != 0
    allowed = inb & hq
    if CAUSAL:
        allowed = allowed & (c <= r)
        near = (c <= r) & (c > r - LOCAL)
    else:
        near = tl.abs(c - r) < LOCAL
    forced = allowed & ((c < SINKS) | near)
    cand = allowed & (~forced)
    # order-preserving unsigned key of a float32: flip every bit of negatives, only the sign bit of the rest
    bits = s.to(tl.uint32, bitcast=True)
    neg = (bits >> 31) != 0
    one = tl.full([], 1, tl.uint32)
    key = tl.where(neg, ~bits, bits | (one << 31))
    thr = tl.zeros([], dtype=tl.uint32)
    for i in tl.static_range(32):
        trial = thr | (one << (31 - i))
        cnt = tl.sum(((key >= trial) & cand).to(tl.int32), 0)
        thr = tl.where(cnt >= K, trial, thr)
    above = cand & (key > thr)
    ties = cand & (key == thr)
    room = K - tl.sum(above.to(tl.int32), 0)
    keep = above | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= room))
    tl.store(M + row * NB + c, (keep | forced).to(tl.int8), mask=inb)


MAX_BLOCKS = 8192  # one row in registers: longer rows take the PyTorch path


def select_topk(scores: torch.Tensor, has_q: torch.Tensor, *, causal: bool, sinks: int, local: int,
                top_k: int) -> torch.Tensor:
    """`select_blocks(scores, has_q, causal=..., sinks=..., local=..., top_k=...)` by the kernel above:
    scores (B, H, nb, nb) float -> bool mask (B, H, nb, nb)."""
    nb = scores.shape[-1]
    s = scores.to(torch.float32).contiguous()
    out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    rows = s.numel() // nb
    if rows == 0:
        return out
    hq = has_q.to(device=scores.device, dtype=torch.int8).contiguous()
    nbp = max(16, triton.next_power_of_2(nb))
    _select_topk_kernel[(rows,)](s, hq, out.view(torch.int8), nb, int(top_k), int(sinks), int(local),
                                 CAUSAL=bool(causal), NBP=nbp, num_warps=4 if nbp <= 1024 else 8)
    return out
