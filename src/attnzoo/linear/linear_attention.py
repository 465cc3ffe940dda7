"""Linear attention (Katharopoulos et al., 2020), with feature maps, per-head decay (RetNet / Lightning
Attention style) and optional normalisation.

With phi the feature map (see :mod:`attnzoo.linear.feature_maps`) and gamma_h = exp(decay_h)::

    S_t = gamma_h S_{t-1} + phi(k_t)^T v_t                 (state (F, Dv), F = feature dim)
    o_t = scale * phi(q_t) S_t                              normalize=False
    o_t = scale * phi(q_t) S_t / (scale * phi(q_t) . z_t + eps),   z_t = gamma_h z_{t-1} + phi(k_t)
                                                            normalize=True

``decay`` is log gamma (<= 0), a float or an (H,) tensor (differentiable), as every gate of this package
is given in log space; None means gamma = 1. With ``normalize=True`` the normaliser uses the same decayed
key sum z_t, and the state carries it as an extra last column: state = [S | z] of shape (B, H, F, Dv + 1),
for both ``initial_state`` and the returned final state. ``eps`` (default 1e-6) is added to the
denominator; use a positive feature map (elu+1, taylor, Hedgehog) with normalisation, since for identity or
relu the denominator can be ~0 or negative.

``causal=False`` gives the bidirectional form o_t = scale * phi(q_t) (S_0 + sum_all phi(k_s)^T v_s) (and the
matching normaliser); it admits no decay. Its final state is S_0 plus the sum over the sequence. It is
two matmuls in "chunk" and "recurrent" modes alike ("naive" accumulates token by token).

``mode="chunk"`` runs the chunked form of the gated linear recurrence (exact masked products inside a
chunk, running state between chunks; the constant decay enters as exp of segment sums, exponents <= 0).
``mode="recurrent"`` loops with :func:`linear_attention_step`; ``mode="naive"`` is the reference.

``backend`` chooses who runs ``mode="chunk"`` (and the decoding step): "torch" (the PyTorch chunked form),
"triton" (the kernels of :mod:`attnzoo.linear.triton_kernels`; CUDA, or CPU under ``TRITON_INTERPRET=1``)
or "auto" (the default): Triton when the inputs are on CUDA and the case is one the kernels cover (an
elementwise feature map "identity", "elu+1" or "relu"; ``normalize=False``; ``causal=True``; float16,
bfloat16 or float32; head dims <= 128), else PyTorch. The environment variable ``ATTNZOO_LINEAR_TRITON=0``
turns "auto" Triton off; ``=1`` also lets "auto" pick Triton on CPU under the interpreter. The Triton path
chooses its own chunk (64 on GPU, 32 for float32, 16 under the interpreter; ``chunk_size`` is ignored
there), applies the feature map in float32 and rounds phi(q), phi(k) back to the input dtype, and keeps the
tensor-core operands in the input dtype (float32 accumulation; see the kernels' module for the precision
notes). The decoding step uses the step kernel only when no gradient is needed.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from . import _core
from . import feature_maps as fm
from .naive import naive_linear_attention


def _check_decay(decay, heads: int, device, dtype):
    """None | real <= 0 | (H,) or 0-d tensor -> None or an (H,) tensor of log gamma in ``dtype``."""
    if decay is None:
        return None
    if isinstance(decay, torch.Tensor):
        if not decay.is_floating_point():
            raise TypeError(f"decay must be a floating-point tensor (log gamma per head), got dtype {decay.dtype}")
        if decay.device != device:
            raise ValueError(f"decay is on {decay.device} but q is on {device}")
        if decay.dim() == 0:
            decay = decay.expand(heads)
        if tuple(decay.shape) != (heads,):
            raise ValueError(f"decay must be a float or a tensor of shape (heads,) = ({heads},), "
                             f"got {tuple(decay.shape)}")
        return decay.to(dtype)
    if isinstance(decay, bool) or not isinstance(decay, Real):
        raise TypeError(f"decay must be None, a float or a (heads,) tensor of log gamma, got {type(decay).__name__}")
    if not math.isfinite(decay) or decay > 0:
        raise ValueError(f"decay is log gamma and must be finite and <= 0 (gamma in (0, 1]), got {decay}")
    return torch.full((heads,), float(decay), dtype=dtype, device=device)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return float(eps)


def _noncausal(q, k, v, g, s):
    s = _core.zeros_state(q, v, s) + k.transpose(-1, -2) @ v
    return q @ s, s


def _features(phi, q, k, scale, cd):
    fq, fk = fm.apply(phi, q.to(cd), k.to(cd))
    return fq.to(cd) * scale, fk.to(cd)


def _triton_ok(backend, q, v, feature_map, normalize: bool, causal: bool, mode: str = "chunk") -> bool:
    """Whether this call runs on the Triton kernels (see the module doc); raises for backend="triton" on a
    case they do not cover."""
    reasons = []
    if not (isinstance(feature_map, str) and feature_map in ("identity", "elu+1", "relu")):
        reasons.append("the feature map must be 'identity', 'elu+1' or 'relu'")
    if normalize:
        reasons.append("normalize=True is not supported")
    if not causal:
        reasons.append("causal=False is not supported")
    return _core.use_triton(backend, q, v, mode, reasons, max_head_dim_is_limit=False)


def linear_attention(q, k, v, feature_map="identity", decay=None, normalize=False, scale=None, initial_state=None,
                     output_final_state=False, mode="chunk", cu_seqlens=None, chunk_size=64, causal=True, eps=1e-6,
                     backend="auto"):
    """Linear attention. Returns ``(o, final_state)``; final_state is None unless ``output_final_state``.

    Args:
        q, k: (B, H, T, D); v: (B, H, T, Dv).
        feature_map: "identity", "elu+1", "relu", "taylor" (F = 1 + D + D^2), or a callable / nn.Module
            mapping (B, H, T, D) -> (B, H, T, F) (e.g. :class:`HedgehogFeatureMap`).
        decay: log gamma per head, a float or an (H,) tensor, <= 0; None for no decay.
        normalize: divide by scale * phi(q_t) . z_t + eps (state then (.., F, Dv + 1), see module doc).
        scale: multiplies phi(q); default D ** -0.5 (D = q's head dim before the feature map).
        initial_state: (B, H, F, Dv [+1]), or (N, H, F, Dv [+1]) with ``cu_seqlens``.
        mode: "chunk" (default), "recurrent" or "naive".
        cu_seqlens: int tensor (N + 1,) of boundaries of N sequences packed along T (B must be 1).
        chunk_size: steps per chunk in "chunk" mode.
        causal: False for the bidirectional form (no decay).
        eps: added to the normaliser.
        backend: "auto", "torch" or "triton" (who runs ``mode="chunk"``; see the module doc).
    """
    _core.check_qkv(q, k, v)
    for name, val in (("normalize", normalize), ("output_final_state", output_final_state), ("causal", causal)):
        _core.check_bool(name, val)
    _core.check_mode(mode)
    _core.check_chunk_size(chunk_size)
    phi = fm.resolve(feature_map)
    b, h, length, d = q.shape
    dv = v.shape[-1]
    scale = _core.check_scale(scale, d)
    eps = _check_eps(eps)
    cd = _core.compute_dtype(q.dtype)
    log_decay = _check_decay(decay, h, q.device, cd)
    if not causal and log_decay is not None:
        raise ValueError("decay needs causal=True: the non-causal form has no order to decay along")
    offsets = _core.check_cu_seqlens(cu_seqlens, b, length, q.device)
    if _triton_ok(backend, q, v, feature_map, normalize, causal, mode):
        from .triton_kernels import linear_attention_chunk
        n = b if offsets is None else len(offsets) - 1
        if initial_state is not None:
            _core.check_state("initial_state", initial_state, (n, h, d, dv), q.device)
        o, s = linear_attention_chunk(q, k, v, feature_map, log_decay, scale, initial_state, offsets)
        return o, (s if output_final_state else None)
    fq, fk = _features(phi, q, k, scale, cd)
    f = fq.shape[-1]
    n = b if offsets is None else len(offsets) - 1
    s0 = None
    if initial_state is not None:
        _core.check_state("initial_state", initial_state, (n, h, f, dv + normalize), q.device)
        s0 = initial_state.to(cd)
    vc = v.to(cd)

    if mode == "naive":
        def fn(q, k, v, s):
            return naive_linear_attention(q, k, v, log_decay, normalize, eps, s, causal)
        o, s = _core.run_sequences(fn, [fq, fk, vc], s0, offsets, batched=False)
    else:
        if normalize:  # carry the key sum as an extra value column of ones
            vc = torch.cat([vc, torch.ones_like(vc[..., :1])], -1)
        g = None if log_decay is None else log_decay.view(1, h, 1).expand(b, h, length)
        if not causal:
            fn = _noncausal
        elif mode == "chunk":
            def fn(q, k, v, g, s):
                return _core.chunk_gated_linear(q, k, v, g, s, chunk_size)
        else:
            def fn(q, k, v, g, s):
                return _core.recurrent(_core.step_gated_linear, q, k, v, g, None, s)
        o, s = _core.run_sequences(fn, [fq, fk, vc, g], s0, offsets, batched=q.is_cuda)
        if normalize:
            o = o[..., :dv] / (o[..., dv:] + eps)
    return o.to(q.dtype), (s if output_final_state else None)


def linear_attention_step(q_t, k_t, v_t, state, feature_map="identity", decay=None, normalize=False, scale=None,
                          eps=1e-6, backend="auto"):
    """One decoding step of (decayed, normalised) linear attention.

    q_t, k_t (B, H, D), v_t (B, H, Dv); state (B, H, F, Dv [+1]) or None (zeros). The feature map sees the
    token as (B, H, 1, D). Returns ``(o_t (B, H, Dv), new_state)``. ``backend`` as for
    :func:`linear_attention`; the step kernel (out of place) runs only when no input needs a gradient.
    """
    _core.check_qkv(q_t, k_t, v_t, step=True)
    _core.check_bool("normalize", normalize)
    phi = fm.resolve(feature_map)
    b, h, d = q_t.shape
    dv = v_t.shape[-1]
    scale = _core.check_scale(scale, d)
    eps = _check_eps(eps)
    cd = _core.compute_dtype(q_t.dtype)
    log_decay = _check_decay(decay, h, q_t.device, cd)
    if _triton_ok(backend, q_t, v_t, feature_map, normalize, True):
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in (q_t, k_t, v_t, state, decay))
        if backend == "triton" and needs_grad:
            raise ValueError("backend='triton': the decoding step kernel is not differentiable")
        if not needs_grad:
            from .triton_kernels import linear_attention_step as step
            if state is not None:
                _core.check_state("state", state, (b, h, d, dv), q_t.device)
            return step(q_t, k_t, v_t, feature_map, log_decay, scale, state)
    fq, fk = _features(phi, q_t.unsqueeze(2), k_t.unsqueeze(2), scale, cd)
    fq, fk = fq.squeeze(2), fk.squeeze(2)
    f = fq.shape[-1]
    if state is None:
        state = fq.new_zeros(b, h, f, dv + normalize)
    _core.check_state("state", state, (b, h, f, dv + normalize), q_t.device)
    vc = v_t.to(cd)
    if normalize:
        vc = torch.cat([vc, torch.ones_like(vc[..., :1])], -1)
    g = None if log_decay is None else log_decay.view(1, h).expand(b, h)
    o, s = _core.step_gated_linear(fq, fk, vc, g, state.to(cd))
    if normalize:
        o = o[..., :dv] / (o[..., dv:] + eps)
    return o.to(q_t.dtype), s
