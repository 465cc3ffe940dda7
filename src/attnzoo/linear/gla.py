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
"""
from __future__ import annotations

from . import _core
from .naive import naive_gla

_GATE = "(batch, heads, length, key_dim)"


def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, mode="chunk", cu_seqlens=None,
        chunk_size=64):
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
    Computation is in float32 (float64 for float64 inputs); o has q's dtype, the state the compute dtype.
    """
    _core.check_qkv(q, k, v)
    _core.check_gate("g", g, q.shape, _GATE, q.device)
    return _core.forward("linear", naive_gla, q, k, v, g, None, scale, initial_state, output_final_state, mode,
                         cu_seqlens, chunk_size)


def gla_step(q_t, k_t, v_t, g_t, state, scale=None):
    """One decoding step of GLA: q_t, k_t, g_t (B, H, Dk), v_t (B, H, Dv), state (B, H, Dk, Dv) or None.

    Returns ``(o_t (B, H, Dv), new_state)``.
    """
    _core.check_qkv(q_t, k_t, v_t, step=True)
    _core.check_gate("g_t", g_t, q_t.shape, "(batch, heads, key_dim)", q_t.device)
    return _core.forward_step("linear", q_t, k_t, v_t, g_t, None, state, scale)
