"""`attention()`: validate -> dispatch -> run. `explain()` says which backend `auto` picks and why."""
from __future__ import annotations

import math

import torch

from .backends import Request, explain_request, select
from .backends.dispatch import Explanation
from .patterns import Pattern
from .routing.base import Router

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(q, k, v, pattern, scale, return_lse) -> Request:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, length, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    (b, hq, lq, d), (bk, hkv, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: q has {b}, k has {bk}, v has {bv}")
    if hkv != hv:
        raise ValueError(f"k and v must have the same number of heads, got k={hkv}, v={hv}")
    if lk != lv:
        raise ValueError(f"k and v must have the same length, got k={lk}, v={lv}")
    if d != dk:
        raise ValueError(f"q and k must have the same head_dim, got q={d}, k={dk}")
    for name, n in (("batch", b), ("q heads", hq), ("k/v heads", hkv), ("q length", lq), ("k/v length", lk),
                    ("q/k head_dim", d), ("v head_dim", dv)):
        if n == 0:
            raise ValueError(f"empty input: {name} is 0 (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnzoo Pattern, an attnzoo.routing Router or None, got "
                        f"{type(pattern).__name__}")
    if pattern is not None:
        pattern.check(lq, lk, hq)
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return Request(q, k, v, pattern, float(scale), return_lse)


def attention(q, k, v, pattern=None, scale=None, backend: str = "auto", return_lse: bool = False):
    """Attention of ``q`` over ``k``, ``v`` restricted to ``pattern``.

    q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv) with Hq % Hkv == 0 (GQA/MQA).
    ``Lq != Lk`` is cross attention, aligned bottom-right (query i sits at position i + Lk - Lq).
    ``pattern=None`` is full attention; ``scale`` defaults to D ** -0.5. ``backend`` is "auto",
    "sdpa", "flex", "triton" or "reference". ``pattern`` may also be a router (`attnzoo.routing.Router`):
    it chooses the key blocks from q and k, and the call runs as the block-sparse pattern it gives, with
    the batch folded into the heads (see `attnzoo.routing.base`). Returns ``out`` (B, Hq, Lq, Dv) in the
    input dtype, and with ``return_lse=True`` also ``lse`` (B, Hq, Lq) float32 (natural log). A query that sees no key
    gives 0 and lse = -inf.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if isinstance(pattern, Router):
        req, call = _routed_request(q, k, v, pattern, scale, return_lse)
        out, lse = select(req, backend).run(req)
        out, lse = call.unfold(out), call.unfold(lse)
    else:
        req = _validate(q, k, v, pattern, scale, return_lse)
        out, lse = select(req, backend).run(req)
    return (out, lse) if return_lse else out


def _routed_request(q, k, v, router, scale, return_lse):
    """A router as the pattern: check the call, route, fold the batch into the heads (`Router.plan`)."""
    _validate(q, k, v, None, scale, return_lse)
    call = router.plan(q, k, v)
    return _validate(call.q, call.k, call.v, call.pattern, scale, return_lse), call


def explain(q, k, v, pattern=None, scale=None, return_lse: bool = False) -> Explanation:
    """Which backend ``attention(..., backend="auto")`` would pick, and why each other one declined.

    ``print(explain(q, k, v, pattern))`` shows a small table.
    """
    if isinstance(pattern, Router):
        return explain_request(_routed_request(q, k, v, pattern, scale, return_lse)[0])
    return explain_request(_validate(q, k, v, pattern, scale, return_lse))
