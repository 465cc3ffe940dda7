"""The references of the linear-attention family: each recurrence exactly as written in its paper, one token at
a time, with the transition matrices formed explicitly. Slow (a Python loop over time, Dk x Dk matrices),
any float dtype; every faster form is tested against these.

Row-vector convention: q_t, k_t in R^{1 x Dk}, v_t in R^{1 x Dv}, state S in R^{Dk x Dv}, o_t = q_t S_t,
where q already carries ``scale`` (and the feature map, for linear attention). All functions take
(B, H, T, .) tensors and an optional initial state (B, H, Dk, Dv) and return (o, final_state).

==================  ===========================================================================
linear attention    S_t = gamma S_{t-1} + k_t^T v_t                      (gamma = exp(log_decay))
GLA                 S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t              (g_t in R^Dk)
DeltaNet            S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
Gated DeltaNet      S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t   (g_t scalar)
KDA                 S_t = (I - beta_t k_t^T k_t) Diag(exp g_t) S_{t-1} + beta_t k_t^T v_t   (g_t in R^Dk)
==================  ===========================================================================
"""
from __future__ import annotations

import torch


def _outer(a, b):  # a^T b for row vectors a (B, H, m), b (B, H, n) -> (B, H, m, n)
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _read(q, s):  # q S for a row vector q (B, H, m) and S (B, H, m, n) -> (B, H, n)
    return (q.unsqueeze(-2) @ s).squeeze(-2)


def _init(q, v, state):
    b, h, _, dk = q.shape
    return q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state


def _stack(outs, v):
    return torch.stack(outs, 2) if outs else v.new_zeros(v.shape)


def naive_linear_attention(q, k, v, log_decay=None, normalize=False, eps=1e-6, state=None, causal=True):
    """Linear attention on feature-mapped q (scaled), k: o_t = q_t S_t [/ (q_t z_t + eps)].

    log_decay: None or (H,) log gamma per head. With ``normalize`` the state is [S | z] (Dk, Dv + 1), z the
    (decayed) running sum of k. Non-causal: every query reads the state after the whole sequence.
    """
    b, h, length, dk = q.shape
    dv = v.shape[-1]
    s = q.new_zeros(b, h, dk, dv) if state is None else state[..., :dv]
    z = q.new_zeros(b, h, dk) if state is None or not normalize else state[..., dv]
    gamma = 1.0 if log_decay is None else log_decay.exp().view(1, h, 1, 1)
    outs = []

    def out(t):
        o = _read(q[:, :, t], s)
        if normalize:
            o = o / ((q[:, :, t] * z).sum(-1, keepdim=True) + eps)
        return o

    for t in range(length):
        s = gamma * s + _outer(k[:, :, t], v[:, :, t])
        z = (gamma if log_decay is None else gamma[..., 0]) * z + k[:, :, t]
        if causal:
            outs.append(out(t))
    if not causal:
        outs = [out(t) for t in range(length)]
    final = torch.cat([s, z.unsqueeze(-1)], -1) if normalize else s
    return _stack(outs, v), final


def naive_gla(q, k, v, g, state=None):
    """Gated linear attention (Yang et al., 2024): S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t."""
    s = _init(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        s = torch.diag_embed(g[:, :, t].exp()) @ s + _outer(k[:, :, t], v[:, :, t])
        outs.append(_read(q[:, :, t], s))
    return _stack(outs, v), s


def _projection(k, beta):  # I - beta k^T k, (B, H, Dk, Dk)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return eye - beta[..., None, None] * _outer(k, k)


def naive_delta_rule(q, k, v, beta, state=None):
    """DeltaNet (Schlag et al., 2021; Yang et al., 2024): S_t = (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t."""
    s = _init(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t], beta[:, :, t]
        s = _projection(kt, bt) @ s + bt[..., None, None] * _outer(kt, v[:, :, t])
        outs.append(_read(q[:, :, t], s))
    return _stack(outs, v), s


def naive_gated_delta_rule(q, k, v, g, beta, state=None):
    """Gated DeltaNet (Yang et al., 2025): S_t = exp(g_t) (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t."""
    s = _init(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t], beta[:, :, t]
        s = g[:, :, t].exp()[..., None, None] * (_projection(kt, bt) @ s) + bt[..., None, None] * _outer(kt, v[:, :, t])
        outs.append(_read(q[:, :, t], s))
    return _stack(outs, v), s


def naive_kda(q, k, v, g, beta, state=None):
    """Kimi Delta Attention: S_t = (I - b_t k_t^T k_t) Diag(exp g_t) S_{t-1} + b_t k_t^T v_t."""
    s = _init(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t], beta[:, :, t]
        transition = _projection(kt, bt) @ torch.diag_embed(g[:, :, t].exp())
        s = transition @ s + bt[..., None, None] * _outer(kt, v[:, :, t])
        outs.append(_read(q[:, :, t], s))
    return _stack(outs, v), s
