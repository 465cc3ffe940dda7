"""Gated linear attention (GLA; Yang, Wang, Shen, Panda, Kim, ICML 2024).

A linear-attention state with a data-dependent, per-channel forget gate::

    S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

with g_t in R^{Dk}, given in log space (g <= 0; e.g. ``logsigmoid(x) / 16`` as in the paper). Shapes:
q, k (B, H, T, Dk), v (B, H, T, Dv), g (B, H, T, Dk), state (B, H, Dk, Dv).

``mode="chunk"`` is the chunked parallel form: exact masked intra-chunk products plus a running state
between chunks. The per-channel decays are exp of segment sums of g (never differences of prefix sums),
computed exactly inside sub-chunks of 16 steps and factored through the sub-chunk boundary between them,
so every exponent is <= 0: no overflow at any gate strength and no cancellation (see ``_core``).
``mode="recurrent"`` loops over time with :func:`gla_step`; ``mode="naive"`` is the literal reference.

``backend`` chooses who runs ``mode="chunk"``: "torch" (the PyTorch chunked form), "triton" (the kernels of
:mod:`attnzoo.linear.triton_gla`; CUDA, or CPU under ``TRITON_INTERPRET=1``) or "auto" (the default): Triton
when the inputs are on CUDA and the case is covered (float16, bfloat16 or float32; head dims <= 128), else
PyTorch. ``ATTNZOO_LINEAR_TRITON=0`` turns "auto" Triton off; ``=1`` also lets "auto" pick Triton on CPU under
the interpreter (as for :func:`attnzoo.linear.linear_attention`). The Triton path chooses its own chunk
(``chunk_size`` is ignored there) and keeps the dot operands in the input dtype (float32 accumulation).
"""
from __future__ import annotations

from . import _core
from .naive import naive_gla

_GATE = "(batch, heads, length, key_dim)"


def _triton_ok(backend, q, v, mode) -> bool:
    """Whether this call runs on the Triton kernels (see the module doc); raises for backend="triton" on a
    case they do not cover."""
    return _core.use_triton(backend, q, v, mode, [])


def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, mode="chunk", cu_seqlens=None,
        chunk_size=64, backend="auto"):
    """Gated linear attention. Returns ``(o, final_state)``; final_state is None unless ``output_final_state``.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv).
        g: (B, H, T, Dk) log forget gates (<= 0 for the stability guarantees; not checked).
        scale: multiplies q; default Dk ** -0.5.
        initial_state: (B, H, Dk, Dv), or (N, H, Dk, Dv) with ``cu_seqlens``.
        mode: "chunk" (parallel, default), "recurrent" (token loop) or "naive" (reference).
        cu_seqlens: int tensor (N + 1,) of boundaries of N sequences packed along T (B must be 1); each
            sequence restarts its recurrence from its row of ``initial_state`` (zeros when None).
        chunk_size: steps per chunk in "chunk" mode (any positive int; need not divide T).
        backend: "auto", "torch" or "triton" (who runs ``mode="chunk"``; see the module doc).
    Computation is in float32 (float64 for float64 inputs); o has q's dtype, the state the compute dtype.
    """
    _core.check_qkv(q, k, v)
    _core.check_gate("g", g, q.shape, _GATE, q.device)
    if _triton_ok(backend, q, v, mode):
        _core.check_bool("output_final_state", output_final_state)
        _core.check_chunk_size(chunk_size)
        b, h, length, dk = q.shape
        scale = _core.check_scale(scale, dk)
        offsets = _core.check_cu_seqlens(cu_seqlens, b, length, q.device)
        n = b if offsets is None else len(offsets) - 1
        if initial_state is not None:
            _core.check_state("initial_state", initial_state, (n, h, dk, v.shape[-1]), q.device)
        from .triton_gla import gla_chunk
        o, s = gla_chunk(q, k, v, g, scale, initial_state, offsets)
        return o, (s if output_final_state else None)
    return _core.forward("linear", naive_gla, q, k, v, g, None, scale, initial_state, output_final_state, mode,
                         cu_seqlens, chunk_size)


def gla_step(q_t, k_t, v_t, g_t, state, scale=None, backend="auto"):
    """One decoding step of GLA: q_t, k_t, g_t (B, H, Dk), v_t (B, H, Dv), state (B, H, Dk, Dv) or None.

    Returns ``(o_t (B, H, Dv), new_state)``. ``backend``: "auto" (the fused Triton step kernel on CUDA when no
    gradient is wanted, else PyTorch), "torch" or "triton" (see :func:`attnzoo.linear._core.forward_step`).
    """
    _core.check_qkv(q_t, k_t, v_t, step=True)
    _core.check_gate("g_t", g_t, q_t.shape, "(batch, heads, key_dim)", q_t.device)
    return _core.forward_step("linear", q_t, k_t, v_t, g_t, None, state, scale, backend)
