"""The delta-rule family: DeltaNet, Gated DeltaNet and Kimi Delta Attention (KDA).

The state is a fast-weight memory corrected toward each new value (one step of online regression with
learning rate beta_t in (0, 1)), optionally after a forget gate given in log space::

    DeltaNet        S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
    Gated DeltaNet  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        g: (B, H, T)
    KDA             S_t = (I - beta_t k_t^T k_t) Diag(exp g_t) S_{t-1} + beta_t k_t^T v_t   g: (B, H, T, Dk)

and o_t = scale * q_t S_t. beta: (B, H, T). The papers L2-normalise the keys (then I - beta k^T k is a
contraction); that is the caller's job here: nothing is normalised inside the ops.

``mode="chunk"`` uses the WY representation / UT transform: within a chunk the pseudo-values
u_t = beta_t (v_t - k_t Diag(exp g_t) S_{t-1}) solve a unit lower-triangular system
(I + A) U = beta (V - (K * Gamma) S_start), A_ij = beta_i sum_d k_id k_jd Gamma_{i,j,d} (j < i), solved with
``torch.linalg.solve_triangular`` for all chunks at once; then o = (Q * Gamma) S_start + P U and
S_end = Gamma_end S_start + (K * Gamma_{end,.})^T U, one state update per chunk. Gate factors are exp of
segment sums (exponents <= 0, no cancellation; per-channel gates via 16-step sub-chunks, see ``_core``).

``backend`` chooses who runs ``mode="chunk"``: "torch" (the PyTorch chunked form above), "triton" (the fused
kernels of :mod:`attnzoo.linear.triton_delta`, for ``kda`` those of :mod:`attnzoo.linear.triton_kda`; CUDA,
or CPU under ``TRITON_INTERPRET=1``) or "auto" (the default): Triton when the inputs are on CUDA and the case
is covered (float16, bfloat16 or float32; head dims <= 128), else PyTorch. ``ATTNZOO_LINEAR_TRITON=0`` turns
"auto" Triton off; ``=1`` also lets "auto" pick Triton on CPU under the interpreter (as for
:func:`attnzoo.linear.gla`). The Triton path covers ``delta_rule``, ``gated_delta_rule`` and ``kda`` (forward
and backward). It chooses its own chunk (``chunk_size`` is ignored there), keeps the dot operands in the input
dtype (float32 accumulation) and returns the final state in float32.
"""
from __future__ import annotations

from . import _core
from .naive import naive_delta_rule, naive_gated_delta_rule, naive_kda

_SCALAR = "(batch, heads, length)"
_VECTOR = "(batch, heads, length, key_dim)"

_COMMON_DOC = """
    Args:
        q, k: (B, H, T, Dk) (k usually L2-normalised by the caller); v: (B, H, T, Dv).
        beta: (B, H, T) write strengths, usually in (0, 1).
        scale: multiplies q; default Dk ** -0.5.
        initial_state: (B, H, Dk, Dv), or (N, H, Dk, Dv) with ``cu_seqlens``.
        mode: "chunk" (parallel, default), "recurrent" (token loop) or "naive" (reference).
        cu_seqlens: int tensor (N + 1,) of boundaries of N sequences packed along T (B must be 1); each
            sequence restarts from its row of ``initial_state`` (zeros when None).
        chunk_size: steps per chunk in "chunk" mode (any positive int; need not divide T).
        backend: "auto", "torch" or "triton" (who runs ``mode="chunk"``; see the module doc).
    Returns ``(o, final_state)``; final_state is None unless ``output_final_state``. Computation is in float32
    (float64 for float64 inputs); o has q's dtype, the state the compute dtype.
"""


def _check_beta(name, beta, shape, device):
    _core.check_gate(name, beta, shape, _SCALAR if len(shape) == 3 else "(batch, heads)", device)


def _triton(backend, q, k, v, g, beta, scale, initial_state, output_final_state, mode, cu_seqlens, chunk_size,
            reasons=(), vector=False):
    """Run ``mode="chunk"`` on the Triton kernels when ``backend`` asks for it (see the module doc); returns
    None when the PyTorch path should run instead (raises for backend="triton" on an uncovered case)."""
    if not _core.use_triton(backend, q, v, mode, list(reasons)):
        return None
    _core.check_bool("output_final_state", output_final_state)
    _core.check_chunk_size(chunk_size)
    b, h, length, dk = q.shape
    scale = _core.check_scale(scale, dk)
    offsets = _core.check_cu_seqlens(cu_seqlens, b, length, q.device)
    n = b if offsets is None else len(offsets) - 1
    if initial_state is not None:
        _core.check_state("initial_state", initial_state, (n, h, dk, v.shape[-1]), q.device)
    if vector:
        from .triton_kda import kda_chunk
        o, s = kda_chunk(q, k, v, g, beta, scale, initial_state, offsets)
    else:
        from .triton_delta import delta_chunk
        o, s = delta_chunk(q, k, v, g, beta, scale, initial_state, offsets)
    return o, (s if output_final_state else None)


def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, mode="chunk",
               cu_seqlens=None, chunk_size=64, backend="auto"):
    _core.check_qkv(q, k, v)
    _check_beta("beta", beta, q.shape[:3], q.device)
    out = _triton(backend, q, k, v, None, beta, scale, initial_state, output_final_state, mode, cu_seqlens,
                  chunk_size)
    if out is not None:
        return out
    return _core.forward("delta", naive_delta_rule, q, k, v, None, beta, scale, initial_state, output_final_state,
                         mode, cu_seqlens, chunk_size)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, mode="chunk",
                     cu_seqlens=None, chunk_size=64, backend="auto"):
    _core.check_qkv(q, k, v)
    _core.check_gate("g", g, q.shape[:3], _SCALAR, q.device)
    _check_beta("beta", beta, q.shape[:3], q.device)
    out = _triton(backend, q, k, v, g, beta, scale, initial_state, output_final_state, mode, cu_seqlens,
                  chunk_size)
    if out is not None:
        return out
    return _core.forward("delta", naive_gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                         output_final_state, mode, cu_seqlens, chunk_size)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, mode="chunk",
        cu_seqlens=None, chunk_size=64, backend="auto"):
    _core.check_qkv(q, k, v)
    _core.check_gate("g", g, q.shape, _VECTOR, q.device)
    _check_beta("beta", beta, q.shape[:3], q.device)
    out = _triton(backend, q, k, v, g, beta, scale, initial_state, output_final_state, mode, cu_seqlens,
                  chunk_size, vector=True)
    if out is not None:
        return out
    return _core.forward("delta", naive_kda, q, k, v, g, beta, scale, initial_state, output_final_state, mode,
                         cu_seqlens, chunk_size)


delta_rule.__doc__ = "DeltaNet: S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale q_t S_t.\n" \
    + _COMMON_DOC
gated_delta_rule.__doc__ = ("Gated DeltaNet: S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t.\n\n"
                            "    g: (B, H, T) scalar log forget gate per head and step (<= 0).\n" + _COMMON_DOC)
kda.__doc__ = ("Kimi Delta Attention: S_t = (I - beta_t k_t^T k_t) Diag(exp g_t) S_{t-1} + beta_t k_t^T v_t.\n\n"
               "    g: (B, H, T, Dk) per-channel log forget gates (<= 0).\n" + _COMMON_DOC)


def delta_rule_step(q_t, k_t, v_t, beta_t, state, scale=None, backend="auto"):
    """One decoding step of DeltaNet: q_t, k_t (B, H, Dk), v_t (B, H, Dv), beta_t (B, H); state or None.
    Returns ``(o_t, new_state)``. ``backend``: "auto" (the fused Triton step kernel on CUDA when no gradient is
    wanted, else PyTorch), "torch" or "triton" (see :func:`attnzoo.linear._core.forward_step`)."""
    _core.check_qkv(q_t, k_t, v_t, step=True)
    _check_beta("beta_t", beta_t, q_t.shape[:2], q_t.device)
    return _core.forward_step("delta", q_t, k_t, v_t, None, beta_t, state, scale, backend)


def gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale=None, backend="auto"):
    """One decoding step of Gated DeltaNet: g_t, beta_t (B, H). Returns ``(o_t, new_state)``."""
    _core.check_qkv(q_t, k_t, v_t, step=True)
    _core.check_gate("g_t", g_t, q_t.shape[:2], "(batch, heads)", q_t.device)
    _check_beta("beta_t", beta_t, q_t.shape[:2], q_t.device)
    return _core.forward_step("delta", q_t, k_t, v_t, g_t, beta_t, state, scale, backend)


def kda_step(q_t, k_t, v_t, g_t, beta_t, state, scale=None, backend="auto"):
    """One decoding step of KDA: g_t (B, H, Dk), beta_t (B, H). Returns ``(o_t, new_state)``."""
    _core.check_qkv(q_t, k_t, v_t, step=True)
    _core.check_gate("g_t", g_t, q_t.shape, "(batch, heads, key_dim)", q_t.device)
    _check_beta("beta_t", beta_t, q_t.shape[:2], q_t.device)
    return _core.forward_step("delta", q_t, k_t, v_t, g_t, beta_t, state, scale, backend)
