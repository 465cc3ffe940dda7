"""The reference backend: exact attention in float64 or float32, query chunk by query chunk.

It is the ground truth of every test. Memory stays bounded at any length: the forward pass holds one
(query chunk x keys) score tile at a time, and the backward pass recomputes the tiles from the saved
log-sum-exp instead of storing the probabilities (a custom autograd function), so it never holds the
full Lq x Lk matrix. GQA is computed by grouping query heads, without repeating K and V.
"""
from __future__ import annotations

import torch

from .base import Backend, Request

# Elements of one score tile (B * Hq * chunk * Lk); 2^24 floats = 64 MiB in float32.
_TILE = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(req_b, hq, lk) -> int:
    return max(1, _TILE // max(1, req_b * hq * lk))


def _tile_mask(pattern, s, e, lq, lk, hkv, g, device):
    """Visibility of keys from queries s..e-1, broadcastable to (B, Hkv, G, e-s, Lk); None = all."""
    if pattern is None:
        return None
    qi = torch.arange(s, e, device=device)[:, None]
    ki = torch.arange(lk, device=device)[None, :]
    if pattern.head_dependent:
        head = torch.arange(hkv * g, device=device).view(hkv, g, 1, 1)
        return pattern.mask(qi, ki, lq, lk, head=head)  # (Hkv, G, c, Lk)
    return pattern.mask(qi, ki, lq, lk)  # (c, Lk)


def _prepare(q, k, v):
    """Compute-dtype views: q grouped as (B, Hkv, G, Lq, D); k, v as (B, Hkv, 1, Lk, D)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    cd = _compute_dtype(q.dtype)
    return q.to(cd).view(b, hkv, hq // hkv, lq, d), k.to(cd).unsqueeze(2), v.to(cd).unsqueeze(2)


def _scores(qc, kc, pattern, s, e, scale):
    """Masked scores of queries s..e-1 against all keys: (B, Hkv, G, e-s, Lk), -inf where hidden."""
    _, hkv, g, lq, _ = qc.shape
    lk = kc.shape[3]
    sc = torch.matmul(qc[:, :, :, s:e], kc.transpose(-1, -2)) * scale
    m = _tile_mask(pattern, s, e, lq, lk, hkv, g, qc.device)
    return sc if m is None else sc.masked_fill(~m, float("-inf"))


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale):
        b, hq, lq, d = q.shape
        hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
        g = hq // hkv
        qc, kc, vc = _prepare(q, k, v)
        cd = qc.dtype
        out = torch.empty(b, hkv, g, lq, dv, dtype=cd, device=q.device)
        lse = torch.empty(b, hkv, g, lq, dtype=cd, device=q.device)
        step = _chunk(b, hq, lk)
        for s in range(0, lq, step):
            e = min(lq, s + step)
            sc = _scores(qc, kc, pattern, s, e, scale)
            mx = sc.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            p = torch.exp(sc - mx)
            den = p.sum(-1, keepdim=True)
            out[:, :, :, s:e] = torch.matmul(p, vc) / torch.where(den > 0, den, torch.ones_like(den))
            lse[:, :, :, s:e] = torch.where(den > 0, mx + torch.log(den), torch.full_like(den, float("-inf"))).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale = pattern, scale
        return out.view(b, hq, lq, dv).to(q.dtype), lse.view(b, hq, lq).to(torch.float32)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, scale = ctx.pattern, ctx.scale
        b, hq, lq, d = q.shape
        hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
        g = hq // hkv
        qc, kc, vc = _prepare(q, k, v)
        cd = qc.dtype
        do = (dout if dout is not None else torch.zeros(b, hq, lq, dv, device=q.device)).to(cd).view(b, hkv, g, lq, dv)
        dl = (dlse if dlse is not None else torch.zeros(b, hq, lq, device=q.device)).to(cd).view(b, hkv, g, lq)
        dl = torch.where(torch.isfinite(lse), dl, torch.zeros_like(dl))
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        delta = (do * out).sum(-1)  # (B, Hkv, G, Lq)
        dq = torch.empty_like(qc)
        dk = torch.zeros(b, hkv, lk, d, dtype=cd, device=q.device)
        dvv = torch.zeros(b, hkv, lk, dv, dtype=cd, device=q.device)
        step = _chunk(b, hq, lk)
        for s in range(0, lq, step):
            e = min(lq, s + step)
            sc = _scores(qc, kc, pattern, s, e, scale)
            p = torch.exp(sc - lse_safe[:, :, :, s:e, None])  # masked -> 0; empty rows -> 0
            dot = do[:, :, :, s:e]
            dvv += torch.einsum("bhgqk,bhgqe->bhke", p, dot)
            dp = torch.matmul(dot, vc.transpose(-1, -2))
            ds = p * (dp - delta[:, :, :, s:e, None] + dl[:, :, :, s:e, None])
            dq[:, :, :, s:e] = torch.matmul(ds, kc) * scale
            dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, qc[:, :, :, s:e]) * scale
        return (dq.view(b, hq, lq, d).to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None, None)


def reference_attention(q, k, v, pattern=None, scale=None):
    """Exact attention with bounded memory. Returns (out, lse); differentiable in q, k, v (and lse)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ReferenceAttention.apply(q, k, v, pattern, float(scale))


class ReferenceBackend(Backend):
    name = "reference"
    description = "exact chunked attention (float64-capable), bounded memory; the ground truth"
    patterns = "all"

    def can_run(self, req: Request):
        return True, "runs every pattern, dtype and device"

    def auto_ok(self, req: Request):
        if req.device.type == "cuda":
            return False, "auto does not pick the slow reference on CUDA; ask for backend='reference'"
        return True, ""

    def run(self, req: Request):
        out, lse = reference_attention(req.q, req.k, req.v, req.pattern, req.scale)
        return out, (lse if req.return_lse else None)
