"""Launching the Triton forward kernel: configs, cached layouts and generated kernels."""
from __future__ import annotations

import functools
import os

import torch

from ...patterns import Causal, Chunked, Document, Full, Intersection, PrefixLM, Union
from .codegen import generate
from .kernels import kernel_module

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Pattern classes whose visited blocks are mostly full (big tiles pay) vs. local ones (small tiles
# waste less work in partial blocks). Measured on an H100 (benchmarks/triton_tune.py, bf16, D=128,
# 16K tokens): causal 457 TF/s at 128x128/8 warps vs 412 at 128x64; a 1024 window 376 TF/s at
# 64x64/4 warps vs 321 at 128x64.
_DENSE_LIKE = (Full, Causal, PrefixLM, Document, Chunked)


def _dense_like(pattern) -> bool:
    if pattern is None or isinstance(pattern, _DENSE_LIKE):
        return True
    if isinstance(pattern, (Union, Intersection)):
        return _dense_like(pattern.a) and _dense_like(pattern.b)
    return False


def config(d: int, dv: int, device: torch.device, pattern=None) -> dict:
    """Block sizes and launch parameters per (head_dim, pattern class), from the measured table."""
    if device.type != "cuda":  # the CPU interpreter: small tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    dmax = max(d, dv)
    if dmax <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if dmax <= 128:
        if _dense_like(pattern):
            return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=128)
def _layout(pattern, lq, lk, bm, bn, hq, device: str):
    return (pattern or Full()).block_layout(lq, lk, bm, bn, device=device, num_heads=hq)


@functools.lru_cache(maxsize=128)
def _kernel(pattern, lq, lk, device: str):
    lines, aux = generate(pattern, lq, lk)
    mod = kernel_module(lines)
    aux = aux.to(device) if aux is not None else torch.zeros(1, dtype=torch.int32, device=device)
    return mod.attn_fwd, aux


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def attention_fwd(q, k, v, pattern, scale: float, poison: bool = False, cfg: dict | None = None):
    """-> (out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32)."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = cfg or config(d, dv, q.device, pattern)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    dev = str(q.device)
    lay = _layout(pattern, lq, lk, bm, bn, hq, dev)
    kern, aux = _kernel(pattern, lq, lk, dev)
    fill = torch.full if poison else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    out = fill((b, hq, lq, dv), float("nan"), dtype=q.dtype, device=q.device)
    lse = fill((b, hq, lq), float("nan"), dtype=torch.float32, device=q.device)
    kvn, kvi, fkvn, fkvi = lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks, lay.full_kv_indices
    per_head = kvn.shape[1] > 1
    grid = (lay.num_q_blocks, b * hq)
    kern[grid](q, k, v, out, lse, aux, kvn, kvi, fkvn, fkvi,
               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
               kvn.stride(1) if per_head else 0, kvn.stride(2), kvi.stride(1) if per_head else 0, kvi.stride(2),
               hq, hq // hkv, lq, lk, lk - lq, d, dv, scale * LOG2E,
               BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_M=bm, BLOCK_N=bn,
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse
