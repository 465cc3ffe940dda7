"""How good is a router's approximation: `evaluate(q, k, v, router)` (BENCHMARK_PROTOCOL.md, "Quality")."""
from __future__ import annotations

import math

import torch

from .base import Router, check_bool, check_qk

# Elements of one float64 score tile (B * Hq * query chunk * Lk): 2^23 = 64 MiB.
_TILE = 1 << 23


def evaluate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, router: Router, causal=None, scale=None,
             mask=None) -> dict:
    """Attention-mass recall, output error against dense attention, and realised density, per head.

    ``router`` routes ``q``, ``k`` (or ``mask``, a block mask (B, Hq, nb, nb) it returned, is used as is).
    The dense baseline is full attention, or causal attention (bottom-right aligned) with ``causal=True``;
    ``causal=None`` takes the router's own setting. The routed attention is the baseline restricted to the
    selected blocks -- what ``attnzoo.attention(q, k, v, pattern=router)`` computes for a causal router
    evaluated causally. Everything is computed in float64, query chunk by query chunk (one chunk x Lk
    score tile at a time, never Lq x Lk).

    Returns a dict of (B, Hq) float64 tensors (on q's device) and the mask:

    - ``recall``: the share of the true softmax mass that falls on visible keys, averaged over the queries;
    - ``rel_error``: ``||out_routed - out_dense|| / ||out_dense||`` over the head's queries (Frobenius);
    - ``density``: visible (query, key) pairs / pairs visible to the dense baseline;
    - ``pair_density``: visible pairs / (Lq * Lk) (the patterns' `density` convention);
    - ``mask``: the block mask (B, Hq, nb, nb) bool.
    """
    if not isinstance(router, Router):
        raise TypeError(f"evaluate: router must be an attnzoo.routing.Router, got {type(router).__name__}")
    check_qk(q, k, "evaluate")
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"evaluate: v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 4 or v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2] \
            or v.shape[3] == 0:
        raise ValueError(f"evaluate: v must have shape (B, Hkv, Lk, Dv) matching k {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"evaluate: v must be a floating-point tensor, got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"evaluate: v must be on q's device {q.device}, got {v.device}")
    causal = router.causal if causal is None else check_bool("evaluate causal", causal)
    d = q.shape[-1]
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"evaluate: scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"evaluate: scale must be finite, got {scale}")
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = router.block_size
    nb = router.num_blocks(lk)
    if mask is None:
        mask = router(q, k)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, hq, nb, nb):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"evaluate: mask must be a bool tensor of shape {(b, hq, nb, nb)}, got {got}")
    mask = mask.to(q.device)

    dev, f64 = q.device, torch.float64
    with torch.no_grad():
        qc = q.detach().to(f64).view(b, hkv, g, lq, d)
        kt = k.detach().to(f64).unsqueeze(2).transpose(-1, -2)     # (B, Hkv, 1, D, Lk)
        vc = v.detach().to(f64).unsqueeze(2)                        # (B, Hkv, 1, Lk, Dv)
        kidx = torch.arange(lk, device=dev)
        kcol = kidx // bs
        recall = torch.zeros(b, hkv, g, dtype=f64, device=dev)
        err2 = torch.zeros_like(recall)
        ref2 = torch.zeros_like(recall)
        seen = torch.zeros_like(recall)
        base_pairs = 0
        step = max(1, _TILE // (b * hq * lk))
        for s in range(0, lq, step):
            e = min(lq, s + step)
            pos = torch.arange(s, e, device=dev) + (lk - lq)
            sc = torch.matmul(qc[:, :, :, s:e], kt) * scale          # (B, Hkv, G, c, Lk)
            base = (kidx[None, :] <= pos[:, None]) if causal else torch.ones(e - s, lk, dtype=torch.bool, device=dev)
            base_pairs += int(base.sum())
            sc = sc.masked_fill(~base, float("-inf"))
            p = torch.softmax(sc, -1)
            od = torch.matmul(p, vc)
            vis = mask[:, :, pos // bs][:, :, :, kcol].view(b, hkv, g, e - s, lk) & base
            recall += (p * vis).sum((-1, -2))
            ps = torch.nan_to_num(torch.softmax(sc.masked_fill(~vis, float("-inf")), -1), nan=0.0)
            os_ = torch.matmul(ps, vc)
            err2 += (os_ - od).square().sum((-1, -2))
            ref2 += od.square().sum((-1, -2))
            seen += vis.sum((-1, -2))
        shape = (b, hq)
        return dict(recall=(recall / lq).reshape(shape),
                    rel_error=(err2.sqrt() / ref2.sqrt().clamp(min=1e-300)).reshape(shape),
                    density=(seen / max(base_pairs, 1)).reshape(shape),
                    pair_density=(seen / (lq * lk)).reshape(shape),
                    mask=mask)
