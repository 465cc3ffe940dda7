"""Helpers shared by the backend tests: a dense twin of attention, inputs, losses."""
import torch


def dense(q, k, v, pattern, scale=None):
    """Dense attention with the whole score matrix: repeated K/V for GQA, bottom-right mask."""
    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    lk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if pattern is None:
        m = torch.ones(lq, lk, dtype=torch.bool)
    else:
        qi, ki = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        if pattern.head_dependent:
            m = torch.stack([pattern.mask(qi, ki, lq, lk, head=h) for h in range(hq)])
        else:
            m = pattern.mask(qi, ki, lq, lk)
    m = m.expand(b, hq, lq, lk)
    rows = m.any(-1, keepdim=True)
    s = torch.where(m, s, float("-inf"))
    s_safe = torch.where(rows, s, 0.0)
    lse = torch.logsumexp(s_safe, -1, keepdim=True)
    p = torch.exp(s_safe - lse) * rows
    out = p @ v
    return out, torch.where(rows, lse, float("-inf")).squeeze(-1)


def inputs(b, hq, hkv, lq, lk, d, dv, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(b, hq, lq, d), mk(b, hkv, lk, d), mk(b, hkv, lk, dv)


def grads(fn, q, k, v, seed=1, use_lse=True, backward=True):
    """Outputs and gradients of a loss that uses both out and (finite) lse."""
    if not backward:  # forward only (FlexAttention has no CPU backward)
        with torch.no_grad():
            return fn(q, k, v)
    out, lse = fn(q, k, v)
    if not use_lse:
        lse = lse.detach()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    # float32-representable weights: the lse is float32 by contract, the dense twin's is float64
    wl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).float().to(lse.dtype)
    loss = (out * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * wl).sum()
    gq, gk, gv = torch.autograd.grad(loss, (q, k, v))
    return out, lse, gq, gk, gv
