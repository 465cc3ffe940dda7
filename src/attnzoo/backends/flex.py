"""FlexAttention fed with attnzoo's closed-form `BlockLayout` (no `create_block_mask` N^2 cost).

On CUDA the compiled FlexAttention kernel runs; compiled functions, block masks and ``mask_mod``
closures are cached per (pattern, lengths, heads, device), so calling again with new data does not
rebuild metadata or recompile. It never falls back to FlexAttention's unfused path on CUDA (which
materialises the score matrix and runs out of memory at long lengths): if compilation fails the
error is raised. On CPU, ``backend="flex"`` runs eager FlexAttention, which *does* materialise the
Lq x Lk scores; it is allowed only up to a fixed size and `auto` never picks it.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from .base import Backend, Request

_CPU_SCORE_BYTES = 1 << 30  # eager (unfused) FlexAttention on CPU: largest score matrix allowed
_CUDA_HEAD_DIMS = (16, 32, 64, 128, 256)
BLOCK = 128
_RECOMPILE_LIMIT = 1024  # distinct (pattern, shape) kernels one process may compile


def flex_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the torch build
        return False, f"this torch has no FlexAttention ({e})"
    return True, ""


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _no_silent_fallback(compiled: bool):
    """Every (pattern, shape) is its own compiled kernel. Past dynamo's recompile limit (8 by
    default) torch would quietly run FlexAttention *eagerly* -- the unfused path that materialises
    the scores and runs out of memory at long lengths. Raise the limit for this call and make
    hitting it an error instead of a fallback."""
    if not compiled:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                      accumulated_recompile_limit=max(_RECOMPILE_LIMIT, 4096),
                                      fail_on_recompile_limit_hit=True)


def block_mask_for(pattern, lq: int, lk: int, num_heads: int, device: str):
    """The FlexAttention BlockMask of a pattern, from its closed-form BlockLayout (cached, except for a
    per-call `RoutedBlocks`, whose identity-based key would only fill the cache)."""
    from ..patterns import RoutedBlocks
    if isinstance(pattern, RoutedBlocks):
        return _block_mask_uncached(pattern, lq, lk, num_heads, device)
    return _block_mask_cached(pattern, lq, lk, num_heads, device)


def _block_mask_uncached(pattern, lq: int, lk: int, num_heads: int, device: str):
    layout = pattern.block_layout(lq, lk, BLOCK, BLOCK, device=device, num_heads=num_heads)
    return layout.to_block_mask(pattern.mask_mod(lq, lk, device))


_block_mask_cached = functools.lru_cache(maxsize=64)(_block_mask_uncached)


def run_flex(q, k, v, pattern, scale, *, compiled: bool, return_lse: bool = True):
    from torch.nn.attention import flex_attention as fa

    lq, lk = q.shape[2], k.shape[2]
    bm = None
    if pattern is not None and type(pattern).__name__ != "Full":
        bm = block_mask_for(pattern, lq, lk, q.shape[1], str(q.device))
    fn = _compiled_flex() if compiled else fa.flex_attention
    kwargs = dict(block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    with _no_silent_fallback(compiled), warnings.catch_warnings():
        # the eager path warns that it is unfused; can_run already bounds its size on CPU
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
            lse = aux.lse
        else:  # pragma: no cover - older torch
            out, lse = fn(q, k, v, return_lse=True, **kwargs)
    return out, lse.float()


class FlexBackend(Backend):
    name = "flex"
    description = "FlexAttention with attnzoo's closed-form block layout (compiled on CUDA, eager on CPU)"
    patterns = "all"
    dtypes = "fp16, bf16, fp32 (CUDA); any float (CPU)"
    grad = "CUDA only"

    def can_run(self, req: Request):
        ok, why = flex_available()
        if not ok:
            return False, why
        if req.device.type == "cuda":
            if req.D not in _CUDA_HEAD_DIMS or req.Dv not in _CUDA_HEAD_DIMS:
                return False, f"compiled FlexAttention needs head dims in {_CUDA_HEAD_DIMS}, got D={req.D}, Dv={req.Dv}"
            if req.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return False, f"compiled FlexAttention does not take {req.dtype}"
            return True, "compiled FlexAttention kernel"
        if req.device.type == "cpu":
            if req.needs_grad:
                return False, "FlexAttention has no backward on CPU (inputs require grad); use backend='reference'"
            nbytes = req.B * req.Hq * req.Lq * req.Lk * 4
            if nbytes > _CPU_SCORE_BYTES:
                return False, (f"eager FlexAttention on CPU materialises the {req.Lq}x{req.Lk} scores "
                               f"({nbytes / 2**30:.1f} GiB > {_CPU_SCORE_BYTES / 2**30:.0f} GiB); use backend='reference'")
            return True, "eager FlexAttention (unfused: materialises the score matrix)"
        return False, f"FlexAttention does not run on {req.device.type}"

    def auto_ok(self, req: Request):
        if req.device.type != "cuda":
            return False, "auto does not pick eager (unfused) FlexAttention on CPU; ask for backend='flex'"
        return True, ""

    def run(self, req: Request):
        out, lse = run_flex(req.q, req.k, req.v, req.pattern, req.scale, compiled=req.device.type == "cuda")
        return out, (lse if req.return_lse else None)
