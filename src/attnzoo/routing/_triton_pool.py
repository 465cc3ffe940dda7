"""Per-block pooling of queries or keys in one Triton kernel: `base.pool` without its intermediates.

The PyTorch path pads the input to whole blocks (a copy when the length is not a multiple of the block
or the queries sit at an offset), then reduces over a strided axis, in float32 for the mean (a converted
copy of the input), and for max-min twice more (one pass per extreme, padded apart with -inf and +inf).
At 64K tokens and 64 query heads the pooled queries alone read 1 GB. Here one program reads each block's
rows once, in chunks of rows, and writes the block's float32 mean, or its max and min, for all of D.
Same results as the PyTorch path: blocks without tokens pool to 0, the mean divides by the block's
number of tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_kernel(X, O1, O2, stride_b, stride_h, stride_l, H, L, D, BS, OFFSET,
                 MAXMIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    nb = tl.num_programs(0)
    d = tl.arange(0, BD)
    dm = d < D
    lo = tl.maximum(j * BS - OFFSET, 0)          # the block's rows of x: [lo, hi)
    hi = tl.minimum((j + 1) * BS - OFFSET, L)
    base = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    r0 = tl.arange(0, BR)
    if MAXMIN:
        mx = tl.full([BD], float("-inf"), tl.float32)
        mn = tl.full([BD], float("inf"), tl.float32)
    else:
        acc = tl.zeros([BD], tl.float32)
    for start in range(lo, hi, BR):
        r = start + r0
        m = (r < hi)[:, None] & dm[None, :]
        x = tl.load(base + r.to(tl.int64)[:, None] * stride_l + d[None, :], mask=m, other=0.0).to(tl.float32)
        if MAXMIN:
            mx = tl.maximum(mx, tl.max(tl.where(m, x, float("-inf")), 0))
            mn = tl.minimum(mn, tl.min(tl.where(m, x, float("inf")), 0))
        else:
            acc += tl.sum(x, 0)
    n = hi - lo
    out = (bh.to(tl.int64) * nb + j) * D + d
    if MAXMIN:
        tl.store(O1 + out, tl.where(n > 0, mx, 0.0), mask=dm)
        tl.store(O2 + out, tl.where(n > 0, mn, 0.0), mask=dm)
    else:
        tl.store(O1 + out, acc / tl.maximum(n, 1).to(tl.float32), mask=dm)


MAX_HEAD_DIM = 1024  # a whole row of D in registers


def pool_fused(x: torch.Tensor, bs: int, nb: int, offset: int, how: str = "mean"):
    """`base.pool(x, bs, nb, offset, how)` by the kernel above: x (B, H, L, D) float16/bfloat16/float32 with
    unit stride in D -> float32 (B, H, nb, D) for "mean", a (max, min) pair for "maxmin"."""
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    o1 = torch.empty((b, h, nb, d), dtype=torch.float32, device=x.device)
    o2 = torch.empty_like(o1) if how == "maxmin" else o1
    if o1.numel():
        br = 16 if x.device.type == "cpu" else max(1, min(64, 8192 // triton.next_power_of_2(d)))
        _pool_kernel[(nb, b * h)](x, o1, o2, x.stride(0), x.stride(1), x.stride(2), h, n, d, bs, offset,
                                  MAXMIN=how == "maxmin", BR=triton.next_power_of_2(br),
                                  BD=triton.next_power_of_2(d), num_warps=4)
    return (o1, o2) if how == "maxmin" else o1
