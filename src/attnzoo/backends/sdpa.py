"""PyTorch `scaled_dot_product_attention` for full and causal attention (incl. cross attention and GQA).

Causal attention with ``Lq != Lk`` is aligned bottom-right (query i at position i + Lk - Lq):
``Lq < Lk`` uses PyTorch's lower-right causal bias; with ``Lq > Lk`` the first ``Lq - Lk`` queries
see no key (output 0) and the rest is an ordinary square causal problem.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, Request

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _sdpa(q, k, v, scale, causal):
    gqa = q.shape[1] != k.shape[1]
    lq, lk = q.shape[2], k.shape[2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=gqa)
    if lq < lk:
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk), scale=scale,
                                              enable_gqa=gqa)
    tail = F.scaled_dot_product_attention(q[:, :, lq - lk:], k, v, scale=scale, is_causal=True, enable_gqa=gqa)
    head = tail.new_zeros(q.shape[0], q.shape[1], lq - lk, v.shape[-1])
    return torch.cat([head, tail], dim=2)


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention (flash / cuDNN / efficient / math kernels)"
    patterns = "Full, Causal"
    supports_lse = False

    def can_run(self, req: Request):
        if req.kind == "pattern":
            return False, f"SDPA only runs full and causal attention, not {req.pattern!r}"
        if req.return_lse:
            return False, "SDPA does not return the log-sum-exp (return_lse=True)"
        if req.dtype not in _DTYPES:
            return False, f"SDPA does not take {req.dtype}"
        return True, "full/causal attention through torch SDPA"

    def run(self, req: Request):
        return _sdpa(req.q, req.k, req.v, req.scale, req.kind == "causal"), None
