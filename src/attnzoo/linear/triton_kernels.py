"""Triton kernels for scalar-gated linear attention (the "simple GLA" family: linear attention, RetNet /
Lightning-Attention decay, data-dependent scalar gates).

Recurrence per (batch, head), row-vector convention as in :mod:`attnzoo.linear._core`::

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

q, k (B, H, T, Dk), v (B, H, T, Dv) in float16 / bfloat16 / float32, g (B, H, T) float32 log gates (None:
plain linear attention), state (B, H, Dk, Dv) float32. Accumulation is float32 throughout; the tensor-core
operands are in the input dtype (float32 inputs: IEEE float32 dots, no TF32).

Forward (two phases, like Lightning Attention-2 / flash-linear-attention's chunked form)
-------------------------------------------------------------------------------------
Cut time into chunks of C steps (64 on GPU for 16-bit inputs, 32 for float32, 16 under the interpreter;
the last one masked). Inside chunk n let b_i = g_start + ... + g_i be the chunk-local inclusive cumulative
gate and h_n the state before it::

    o_i     = scale * [ exp(b_i) q_i h_n  +  sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j ]
    h_{n+1} = exp(b_last) h_n + sum_j exp(b_last - b_j) k_j^T v_j

1. ``_fwd_h``: one program per (Dk block, Dv block, batch x head) walks the chunks in order, holding its
   tile of the state in float32 registers, and writes h_n for every chunk (input dtype; float32 for float32
   inputs) plus the final state (float32).
2. ``_fwd_o``: one program per (chunk, Dv block, batch x head), fully parallel: the masked, decayed
   intra-chunk product plus the inter-chunk read of h_n.

Precision with 16-bit inputs: the decayed score matrix A_ij = exp(b_i - b_j) q_i . k_j and the states h_n
enter the tensor-core dots rounded to the input dtype (as in flash-linear-attention); row scalings such as
exp(b_i) are applied after the dots. In the two sequential kernels the decayed operand (k_j exp(b_last - b_j),
q_i exp(b_i)) is split into hi + lo parts, two 16-bit dots instead of one rounding, so the state carried from
chunk to chunk, the final state and d initial_state stay accurate to about float32 rather than accumulating a
16-bit rounding per chunk; the extra dot is free in these latency-bound loops. float16 states above 65504
overflow in the h_n buffer (bfloat16 has float32's range).

Every decay is exp of a non-positive exponent when g <= 0 (masked pairs get exponent -inf before exp), so
nothing overflows at any gate strength. The exponents are differences of chunk-local prefix sums (not
the exact segment sums of the PyTorch form): their absolute error is about eps_fp32 * |sum of the gates over
a chunk|, e.g. 1e-5 for gates summing to -100 within one chunk.

Backward
--------
``_bwd_dh`` walks the chunks in reverse (same grid as ``_fwd_h``) and writes dh_{n+1}, the gradient of the
state after chunk n; what is left at the start is the gradient of the initial state::

    dh_n = exp(b_last) dh_{n+1} + scale * sum_i exp(b_i) q_i^T do_i,      dh_NT = d final_state

``_bwd_dqkv``: one program per (chunk, batch x head) (whole Dk, a loop over Dv blocks) recomputes
A_ij = scale exp(b_i - b_j) q_i . k_j (j <= i) and with dA_ij = do_i . v_j, D_ij = exp(b_i - b_j)::

    dq_i = scale exp(b_i) do_i h_n^T + sum_{j<=i} scale D_ij dA_ij k_j
    dk_j = exp(b_last - b_j) v_j dh_{n+1}^T + sum_{i>=j} scale D_ij dA_ij q_i
    dv_j = exp(b_last - b_j) k_j dh_{n+1} + sum_{i>=j} A_ij do_i

The states h_n are recomputed by ``_fwd_h`` (nothing but q, k, v, g, S_0 is saved for backward). No atomics:
the gradients are deterministic.

Gradient of the gates
---------------------
With the global cumulative gates G_t = g_1 + ... + g_t, the forward is a function of q~_t = q_t e^{G_t},
k~_t = k_t e^{-G_t} and of e^{G_T} (the final state is S_T = e^{G_T} (S_0 + sum_j k~_j^T v_j)):
o_i = scale q~_i (S_0 + sum_{j<=i} k~_j^T v_j). Since d q~_t / d G_t = q~_t and d k~_t / d G_t = -k~_t,

    dL/dG_t = sum_d (q_td dq_td - k_td dk_td)  +  [t = T] sum(S_T * dS_T)

with dq, dk the ordinary gradients of q and k (scaled or not: q . dq is the same). g_t enters every G_s with
s >= t, so dg_t = sum_{s >= t} dL/dG_s: in pairs language the reverse cumsum keeps exactly the pairs
(i >= t > j) whose decay contains g_t, the pairs on one side of t cancel. A reverse cumsum over the whole
sequence would leave that cancellation to float32 across T terms (absolute error ~ eps sqrt(T) |dL/dG|, bad
for long sequences with strong gates), so the kernel cuts it at the chunk's end. The tail beyond chunk n is
dg at the first step s of chunk n+1, which has the exact closed form <h_{n+1}, dh_{n+1}>: g_s only scales
the incoming state h_{n+1} = S_{s-1} in S_s = exp(g_s) h_{n+1} + k_s^T v_s, so dL/dg_s =
<exp(g_s) h_{n+1}, dL/dS_s> = <h_{n+1}, dh_{n+1}>, dh_{n+1} being the gradient the reverse pass stores (that
of h_{n+1} as the input of chunk n+1). Per chunk::

    dg_t = sum_{t <= u in chunk n} (q_u . dq_u - k_u . dk_u)  +  <h_{n+1}, dh_{n+1}>
    <h_{n+1}, dh_{n+1}> = exp(b_last) <h_n, dh_{n+1}> + sum_j v_j . (exp(b_last - b_j) k_j dh_{n+1})

both terms from tiles the backward kernel already holds (the last product is the dh part of dv). For the
last chunk h_NT, dh_NT are the final state and its gradient, which is where the final state's term enters.
With no initial state, chunk 0 sums forward instead (dg_t = -sum_{u < t} (...), since <h_0, dh_0> = 0), so
dg_0 is exactly 0. Everything happens inside ``_bwd_dqkv``: no extra pass, no atomics.

Decoding
--------
``_step``: one token against the state, one program per (batch x head, Dv block): reads the state tile
once, writes S_new = exp(g) S + k^T v and o = scale q S_new. ``simple_gla_step(..., inplace=True)``
overwrites the given state (float32, contiguous); otherwise a new state is returned.

Public functions: :func:`simple_gla` (differentiable, through the ``torch.library`` custom ops
``attnzoo::simple_gla_fwd`` / ``attnzoo::simple_gla_bwd`` with fake implementations for torch.compile) and
:func:`simple_gla_step`. ``fwd`` / ``bwd`` launch the kernels directly (block sizes and NaN poisoning of the
outputs for the tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends.triton.ops import _pow2, _prec  # noqa: F401 - the launchers here and in triton_*.py
from . import _core

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The autograd paths of GLA, Gated DeltaNet and KDA keep their forward's chunk intermediates (the chunk states,
# and for the delta rules T, W, U0 and U) for the backward instead of recomputing them, when a gradient will
# be taken; False trades that speed for activation memory (only the inputs, the gate cumsum and the
# intra-chunk scores are kept).
SAVE_INTERMEDIATES = True


def _keep(*tensors) -> bool:
    """Whether a forward keeps its intermediates for the backward: SAVE_INTERMEDIATES and a gradient wanted."""
    return SAVE_INTERMEDIATES and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_gates(gbase, s_gt, offs_t, m_t, BT: tl.constexpr):
    # chunk-local inclusive cumsum of the gates (0 past T) and its last entry (exactly, not a second sum)
    gc = tl.load(gbase + offs_t * s_gt, mask=m_t, other=0.0).to(tl.float32)
    bc = tl.cumsum(gc, 0)
    blast = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, bc, 0.0), 0)
    return bc, blast


@triton.jit
def _split_dot(x, y, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # acc + x @ y with x float32 and y in the operand dtype. SPLIT: x = hi + lo, both rounded to y's dtype,
    # two tensor-core dots (x to about 2 x its mantissa bits) instead of one rounding of x.
    hi = x.to(y.dtype)
    acc = tl.dot(hi, y, acc, input_precision=PREC)
    if SPLIT:
        acc = tl.dot((x - hi.to(tl.float32)).to(y.dtype), y, acc, input_precision=PREC)
    return acc


@triton.jit
def _fwd_h(K, V, G, H0, HS, HT,
           s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt,
           NH, T, DIMK, DIMV, NT,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           HAS_G: tl.constexpr, HAS_H0: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    ik = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    m_kv = m_k[:, None] & m_v[None, :]
    st = offs_k[:, None] * DIMV + offs_v[None, :]
    kbase = K + b * s_kb + h * s_kh
    vbase = V + b * s_vb + h * s_vh
    gbase = G + b * s_gb + h * s_gh
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + bh * DIMK * DIMV + st, mask=m_kv, other=0.0)
    for n in range(0, NT):
        tl.store(HS + (bh * NT + n) * DIMK * DIMV + st, state.to(HS.dtype.element_ty), mask=m_kv)
        offs_t = n * BT + tl.arange(0, BT)
        m_t = offs_t < T
        kt = tl.load(kbase + offs_t[None, :] * s_kt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        v = tl.load(vbase + offs_t[:, None] * s_vt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_G:
            bc, blast = _chunk_gates(gbase, s_gt, offs_t, m_t, BT)
            state = _split_dot(kt.to(tl.float32) * tl.exp(blast - bc)[None, :], v, state * tl.exp(blast), SPLIT, PREC)
        else:
            state = tl.dot(kt, v, state, input_precision=PREC)
    tl.store(HT + bh * DIMK * DIMV + st, state, mask=m_kv)


@triton.jit
def _fwd_o(Q, K, V, G, HS, O,
           s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt, s_ob, s_oh, s_ot,
           NH, T, DIMK, DIMV, NT, scale,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_t = n * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_t = offs_t < T
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    q = tl.load(Q + b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_k[None, :],
                mask=m_t[:, None] & m_k[None, :], other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_k[None, :],
                mask=m_t[:, None] & m_k[None, :], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vt + offs_v[None, :],
                mask=m_t[:, None] & m_v[None, :], other=0.0)
    hs = tl.load(HS + (bh * NT + n) * DIMK * DIMV + offs_k[:, None] * DIMV + offs_v[None, :],
                 mask=m_k[:, None] & m_v[None, :], other=0.0)
    a = tl.dot(q, tl.trans(k), input_precision=PREC)
    causal = offs_t[:, None] >= offs_t[None, :]
    if HAS_G:
        bc, blast = _chunk_gates(G + b * s_gb + h * s_gh, s_gt, offs_t, m_t, BT)
        a = a * tl.exp(tl.where(causal, bc[:, None] - bc[None, :], float("-inf")))
        o = tl.dot(q.to(hs.dtype), hs, input_precision=PREC) * tl.exp(bc)[:, None]  # row scaling after the dot
    else:
        a = tl.where(causal, a, 0.0)
        o = tl.dot(q.to(hs.dtype), hs, input_precision=PREC)
    o = tl.dot(a.to(v.dtype), v, o, input_precision=PREC)
    tl.store(O + b * s_ob + h * s_oh + offs_t[:, None] * s_ot + offs_v[None, :], (o * scale).to(O.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _bwd_dh(Q, DO, G, DHT, DH0, DHS,
            s_qb, s_qh, s_qt, s_db, s_dh, s_dt, s_gb, s_gh, s_gt,
            NH, T, DIMK, DIMV, NT, scale,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    ik = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    m_kv = m_k[:, None] & m_v[None, :]
    st = offs_k[:, None] * DIMV + offs_v[None, :]
    qbase = Q + b * s_qb + h * s_qh
    dbase = DO + b * s_db + h * s_dh
    gbase = G + b * s_gb + h * s_gh
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(DHT + bh * DIMK * DIMV + st, mask=m_kv, other=0.0)
    for i in range(0, NT):
        n = NT - 1 - i
        tl.store(DHS + (bh * NT + n) * DIMK * DIMV + st, dstate.to(DHS.dtype.element_ty), mask=m_kv)
        offs_t = n * BT + tl.arange(0, BT)
        m_t = offs_t < T
        qt = tl.load(qbase + offs_t[None, :] * s_qt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        do = tl.load(dbase + offs_t[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_G:
            bc, blast = _chunk_gates(gbase, s_gt, offs_t, m_t, BT)
            zero = tl.zeros([BK, BV], dtype=tl.float32)
            dstate = dstate * tl.exp(blast) + scale * _split_dot(qt.to(tl.float32) * tl.exp(bc)[None, :], do, zero,
                                                                 SPLIT, PREC)
        else:
            dstate += scale * tl.dot(qt.to(do.dtype), do, input_precision=PREC)
    tl.store(DH0 + bh * DIMK * DIMV + st, dstate, mask=m_kv)


@triton.jit
def _bwd_dqkv(Q, K, V, G, DO, HS, DHS, DQ, DKK, DVV, DG,
              s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt, s_db, s_dh, s_dt,
              s_xb, s_xh, s_xt, s_yb, s_yh, s_yt,
              NH, T, DIMK, DIMV, NT, scale,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
              PREC: tl.constexpr):
    # s_x*: strides of dq and dk (one shape, both contiguous), s_y*: of dv
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_t = n * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    m_t = offs_t < T
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    qoff = b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_k[None, :]
    koff = b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_k[None, :]
    q = tl.load(Q + qoff, mask=m_tk, other=0.0)
    k = tl.load(K + koff, mask=m_tk, other=0.0)
    causal = offs_t[:, None] >= offs_t[None, :]
    a = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if HAS_G:
        bc, blast = _chunk_gates(G + b * s_gb + h * s_gh, s_gt, offs_t, m_t, BT)
        a = a * tl.exp(tl.where(causal, bc[:, None] - bc[None, :], float("-inf")))
        ek = tl.exp(blast - bc)
    else:
        a = tl.where(causal, a, 0.0)
    at = tl.trans(a).to(k.dtype)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    # <h_n, dh_{n+1}> and <sum_j exp(b_last - b_j) k_j^T v_j, dh_{n+1}> (gate gradient), fp32 scalars
    ip_old = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    ip_new = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    hbase = (bh * NT + n) * DIMK * DIMV
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        m_tv = m_t[:, None] & m_v[None, :]
        v = tl.load(vbase + offs_t[:, None] * s_vt + offs_v[None, :], mask=m_tv, other=0.0)
        do = tl.load(dbase + offs_t[:, None] * s_dt + offs_v[None, :], mask=m_tv, other=0.0)
        st = hbase + offs_k[:, None] * DIMV + offs_v[None, :]
        hs = tl.load(HS + st, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dhs = tl.load(DHS + st, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dvs = tl.dot(k.to(dhs.dtype), dhs, input_precision=PREC)  # exp(b_last - b_j) k_j dh_{n+1}
        if HAS_G:
            dvs = dvs * ek[:, None]
        dv = tl.dot(at, do, dvs, input_precision=PREC)
        if HAS_G:
            ip_old += tl.sum(tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1), 0)
            ip_new += tl.sum(tl.sum(dvs * v.to(tl.float32), 1), 0)
        tl.store(DVV + b * s_yb + h * s_yh + offs_t[:, None] * s_yt + offs_v[None, :], dv.to(DVV.dtype.element_ty),
                 mask=m_tv)
        da = tl.dot(do, tl.trans(v), da, input_precision=PREC)
        dq = tl.dot(do.to(hs.dtype), tl.trans(hs), dq, input_precision=PREC)
        dk = tl.dot(v.to(dhs.dtype), tl.trans(dhs), dk, input_precision=PREC)
    if HAS_G:  # the decay matrix again (recomputed rather than held in registers through the loop)
        dec = tl.exp(tl.where(causal, bc[:, None] - bc[None, :], float("-inf")))
        ds = da * dec * scale
        dq = dq * (tl.exp(bc) * scale)[:, None]
        dk = dk * ek[:, None]
    else:
        ds = tl.where(causal, da * scale, 0.0)
        dq = dq * scale
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PREC)
    xoff = b * s_xb + h * s_xh + offs_t[:, None] * s_xt + offs_k[None, :]
    tl.store(DQ + xoff, dq.to(DQ.dtype.element_ty), mask=m_tk)
    tl.store(DKK + xoff, dk.to(DKK.dtype.element_ty), mask=m_tk)
    if HAS_G:
        # dL/dG_t = q_t . dq_t - k_t . dk_t; dg_t = sum_{u >= t in the chunk} dL/dG_u + <h_{n+1}, dh_{n+1}>
        # with h_{n+1} = exp(b_last) h_n + sum_j exp(b_last - b_j) k_j^T v_j (see the module doc)
        dgl = tl.sum(q.to(tl.float32) * dq, 1) - tl.sum(k.to(tl.float32) * dk, 1)
        ip = tl.exp(blast) * ip_old + ip_new
        dg = tl.cumsum(dgl, 0, reverse=True) + ip
        if not HAS_H0:
            if n == 0:  # <h_0, dh_0> = 0: sum forward from the start instead (dg_0 = 0 exactly)
                dg = dgl - tl.cumsum(dgl, 0)
        tl.store(DG + bh * T + offs_t, dg, mask=m_t)


@triton.jit
def _step(Q, K, V, G, S, SO, O, BETA,
          s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_gb, s_gh, s_ob, s_oh, s_bb, s_bh,
          NH, DIMK, DIMV, scale,
          BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, VEC_G: tl.constexpr = False,
          DELTA: tl.constexpr = False):
    # one token of every recurrence on a (Dk, BV) state tile, float32: decay by exp(g) (a scalar per head, or
    # VEC_G a vector over Dk: GLA / KDA), then S += k^T v, or DELTA: S += beta k^T (v - k S) (the delta rule:
    # the reduction over Dk stays in the program); o = scale q S
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    m_kv = m_k[:, None] & m_v[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_k, mask=m_k, other=0.0).to(tl.float32)
    k = tl.load(K + b * s_kb + h * s_kh + offs_k, mask=m_k, other=0.0).to(tl.float32)
    v = tl.load(V + b * s_vb + h * s_vh + offs_v, mask=m_v, other=0.0).to(tl.float32)
    st = bh * DIMK * DIMV + offs_k[:, None] * DIMV + offs_v[None, :]
    s = tl.load(S + st, mask=m_kv, other=0.0)
    if HAS_G:
        if VEC_G:
            gk = tl.load(G + b * s_gb + h * s_gh + offs_k, mask=m_k, other=0.0).to(tl.float32)
            s = s * tl.exp(gk)[:, None]
        else:
            s = s * tl.exp(tl.load(G + b * s_gb + h * s_gh).to(tl.float32))
    if DELTA:
        beta = tl.load(BETA + b * s_bb + h * s_bh).to(tl.float32)
        s = s + k[:, None] * (beta * (v - tl.sum(k[:, None] * s, 0)))[None, :]
    else:
        s = s + k[:, None] * v[None, :]
    o = tl.sum(q[:, None] * s, 0) * scale
    tl.store(SO + st, s, mask=m_kv)
    tl.store(O + b * s_ob + h * s_oh + offs_v, o.to(O.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def config(dk: int, dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Chunk and block sizes (no autotuning). Under the interpreter: chunks of 16 and whole-dimension blocks
    (fewest programs).

    BT: chunk; BK_H, BV_H: state tile of the two sequential kernels; BV_O: Dv block of the output kernel;
    BV_B: Dv block of the backward loop (the output and backward kernels always hold the whole Dk).
    The GPU values were chosen from ptxas register / spill counts for sm_90 (no spills except about 700
    bytes in the 16-bit backward at Dk = 128), not from timings: benchmarks/linear_bench.py --sweep times
    alternatives."""
    pk, pv = _pow2(dk), _pow2(dv)
    if device.type != "cuda":
        return dict(BT=16, BK_H=pk, BV_H=pv, BV_O=pv, BV_B=pv, warps_h=1, warps_o=1, warps_b=1, stages=1)
    if dtype == torch.float32:  # IEEE float32 dots run on FMA units and need far more registers
        return dict(BT=32, BK_H=min(64, pk), BV_H=min(32, pv), BV_O=16, BV_B=16, warps_h=8, warps_o=8, warps_b=8,
                    stages=2)
    bvo = min(128, pv)
    return dict(BT=64, BK_H=min(64, pk), BV_H=min(64, pv), BV_O=bvo, BV_B=32 if pk > 64 else 16,
                warps_h=4, warps_o=8 if bvo > 64 else 4, warps_b=8, stages=2)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fit_state_tiles(cfg: dict, bh: int, dims: dict, device: torch.device, floor: int = 32) -> dict:
    """The sequential state kernels run one program per state tile and batch x head; with few sequences
    (B * H small) that is too few programs to fill the GPU, and each walks every chunk. Halve the largest
    of the tiles named in ``dims`` ({cfg key: the dimension it tiles}) while the programs number fewer than
    the SMs and a tile is above ``floor``. H200, T=8192, H=16, D=128, B=1 (benchmarks/results/
    h200-2026-12-04-s5/call2 and call3): GLA 64 x 64 state tiles (64 programs) fwd 0.743 / bwd 1.669 ms,
    32 x 32 (256 programs) 0.711 / 1.603; Gated DeltaNet (Dv tiles only) 64: 0.578 / 1.889, 32: 0.537 /
    1.636, 16 (128 programs): 0.520 / 1.605; KDA 64: 1.229 / 4.174, 16: 1.103 / 3.740. At B=8, T=2048 the
    tables' tiles stay (GLA 32 x 32 there: 1.146 / 2.764 vs 1.050 / 2.576; Gated DeltaNet's 64-wide tiles
    won its B=8 sweep). CUDA only; a copy of cfg."""
    if device.type != "cuda":
        return cfg
    cfg = dict(cfg)
    want = _sm_count(device)

    def programs():
        n = bh
        for key, dim in dims.items():
            n *= triton.cdiv(dim, min(cfg[key], _pow2(dim)))
        return n

    while programs() < want:
        keys = [key for key, dim in dims.items() if min(cfg[key], _pow2(dim)) > floor]
        if not keys:
            break
        key = max(keys, key=lambda key_: min(cfg[key_], _pow2(dims[key_])))
        cfg[key] = min(cfg[key], _pow2(dims[key])) // 2
    return cfg


def _check_cfg(cfg: dict) -> None:
    for key in ("BT", "BK_H", "BV_H", "BV_O", "BV_B"):
        x = cfg[key]
        if x < 16 or x & (x - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {x}")


def _last_unit(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _state_in(s: torch.Tensor | None) -> torch.Tensor | None:
    return None if s is None else s.to(torch.float32).contiguous()


def _gstrides(g):
    return (g.stride(0), g.stride(1), g.stride(2)) if g is not None else (0, 0, 0)


def _empty(poison: bool, shape, dtype, device):
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _states(k, v, g, s0, cfg, poison):
    """Run ``_fwd_h``: -> (h per chunk (B*H, NT, Dk, Dv) in the dot dtype, final state (B, H, Dk, Dv) fp32)."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    hdt = k.dtype
    hs = _empty(poison, (b * h, nt, dk, dv), hdt, k.device)
    ht = _empty(poison, (b, h, dk, dv), torch.float32, k.device)
    bk, bv = min(cfg["BK_H"], _pow2(dk)), min(cfg["BV_H"], _pow2(dv))
    grid = (triton.cdiv(dk, bk), triton.cdiv(dv, bv), b * h)
    _fwd_h[grid](k, v, g if g is not None else k, s0 if s0 is not None else ht, hs, ht,
                 k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *_gstrides(g),
                 h, t, dk, dv, nt, BT=bt, BK=bk, BV=bv, HAS_G=g is not None, HAS_H0=s0 is not None,
                 SPLIT=k.dtype != torch.float32, PREC=_prec(k.dtype), num_warps=cfg["warps_h"],
                 num_stages=cfg["stages"])
    return hs, ht


def fwd(q, k, v, g, s0, scale: float, cfg: dict | None = None, poison: bool = False):
    """-> (o (B, H, T, Dv) in q's dtype, final state (B, H, Dk, Dv) float32). No argument checks (see
    :func:`simple_gla`); g (B, H, T) float32 or None, s0 (B, H, Dk, Dv) or None."""
    q, k, v = (_last_unit(x) for x in (q, k, v))
    s0 = _state_in(s0)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        o = q.new_empty((b, h, 0, dv))
        return o, (s0.clone() if s0 is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32))
    cfg = cfg or fit_state_tiles(config(dk, dv, q.dtype, q.device), b * h, dict(BK_H=dk, BV_H=dv), q.device)
    _check_cfg(cfg)
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    hs, ht = _states(k, v, g, s0, cfg, poison)
    o = _empty(poison, (b, h, t, dv), q.dtype, q.device)
    bv = min(cfg["BV_O"], _pow2(dv))
    _fwd_o[(nt, triton.cdiv(dv, bv), b * h)](
        q, k, v, g if g is not None else q, hs, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *_gstrides(g), o.stride(0), o.stride(1), o.stride(2),
        h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bv, HAS_G=g is not None, PREC=_prec(q.dtype),
        num_warps=cfg["warps_o"], num_stages=cfg["stages"])
    return o, ht


def bwd(do, dht, q, k, v, g, s0, scale: float, cfg: dict | None = None, poison: bool = False):
    """Gradients -> (dq, dk, dv, dg (B, H, T) float32 or None, ds0 (B, H, Dk, Dv) float32).

    ``dht``: gradient of the final state, or None. ``ds0`` is returned even when s0 is None."""
    q, k, v, do = (_last_unit(x) for x in (q, k, v, do))
    s0, dht = _state_in(s0), _state_in(dht)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        ds0 = dht.clone() if dht is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        dg = None if g is None else g.new_zeros((b, h, 0), dtype=torch.float32)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dg, ds0
    cfg = cfg or fit_state_tiles(config(dk, dv, q.dtype, q.device), b * h, dict(BK_H=dk, BV_H=dv), q.device)
    _check_cfg(cfg)
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    hs, ht = _states(k, v, g, s0, cfg, poison)
    dhs = _empty(poison, (b * h, nt, dk, dv), hs.dtype, q.device)
    ds0 = _empty(poison, (b, h, dk, dv), torch.float32, q.device)
    bk, bvh = min(cfg["BK_H"], _pow2(dk)), min(cfg["BV_H"], _pow2(dv))
    _bwd_dh[(triton.cdiv(dk, bk), triton.cdiv(dv, bvh), b * h)](
        q, do, g if g is not None else q, dht if dht is not None else ds0, ds0, dhs,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2), *_gstrides(g),
        h, t, dk, dv, nt, float(scale), BT=bt, BK=bk, BV=bvh, HAS_G=g is not None, HAS_DHT=dht is not None,
        SPLIT=q.dtype != torch.float32, PREC=_prec(q.dtype), num_warps=cfg["warps_h"], num_stages=cfg["stages"])
    dq, dk_, dv_ = (_empty(poison, x.shape, x.dtype, x.device) for x in (q, k, v))
    dgl = _empty(poison, (b, h, t), torch.float32, q.device) if g is not None else None
    _bwd_dqkv[(nt, b * h)](
        q, k, v, g if g is not None else q, do, hs, dhs, dq, dk_, dv_, dgl if dgl is not None else ds0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *_gstrides(g), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dv_.stride(0), dv_.stride(1), dv_.stride(2),
        h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=min(cfg["BV_B"], _pow2(dv)),
        HAS_G=g is not None, HAS_H0=s0 is not None, PREC=_prec(q.dtype), num_warps=cfg["warps_b"],
        num_stages=cfg["stages"])
    return dq, dk_, dv_, dgl, ds0


def step(q, k, v, g, state, scale: float, inplace: bool = False, poison: bool = False, block_v: int | None = None,
         beta=None):
    """One token: q, k (B, H, Dk), v (B, H, Dv), g (B, H) (a decay per head), (B, H, Dk) (per channel: GLA,
    KDA) or None, state (B, H, Dk, Dv) or None (zeros); ``beta`` (B, H): the delta rule's update (DeltaNet,
    Gated DeltaNet, KDA) instead of S += k^T v.

    -> (o (B, H, Dv) in q's dtype, new state float32). ``inplace`` writes the new state into ``state``
    (which must then be float32 and contiguous) and returns it."""
    b, h, dk = q.shape
    dv = v.shape[-1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if state is None:
        if inplace:
            raise ValueError("inplace=True needs a state to update")
        state = q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        inplace = True  # a fresh buffer: update it
    if inplace:
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError("inplace=True needs a contiguous float32 state")
        out_state = state
    else:
        state = state.to(torch.float32).contiguous()
        out_state = _empty(poison, state.shape, torch.float32, q.device)
    o = _empty(poison, (b, h, dv), q.dtype, q.device)
    pk, pv = _pow2(dk), _pow2(dv)
    if block_v is None:
        block_v = pv if q.device.type != "cuda" else min(pv, 32 if b * h * triton.cdiv(dv, 32) >= 264 else 16)
    vec = g is not None and g.dim() == 3
    if vec and g.stride(-1) != 1:
        g = g.contiguous()
    gs = (g.stride(0), g.stride(1)) if g is not None else (0, 0)
    bs = (beta.stride(0), beta.stride(1)) if beta is not None else (0, 0)
    _step[(b * h, triton.cdiv(dv, block_v))](
        q, k, v, g if g is not None else q, state, out_state, o, beta if beta is not None else q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *gs, o.stride(0), o.stride(1),
        *bs, h, dk, dv, float(scale), BK=pk, BV=block_v, HAS_G=g is not None, VEC_G=vec, DELTA=beta is not None,
        num_warps=4 if pk * block_v >= 4096 else 2)
    return o, out_state


# ----------------------------------------------------------------------------------------------------------
# custom ops and autograd
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("attnzoo::simple_gla_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
            initial_state: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return fwd(q, k, v, g, initial_state, scale)


@_fwd_op.register_fake
def _(q, k, v, g, initial_state, scale):
    b, h, t, dk = q.shape
    return q.new_empty((b, h, t, v.shape[-1])), q.new_empty((b, h, dk, v.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("attnzoo::simple_gla_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, dht: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            g: torch.Tensor | None, initial_state: torch.Tensor | None, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dg, ds0 = bwd(do, dht, q, k, v, g, initial_state, scale)
    if dg is None:
        dg = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dg, ds0


@_bwd_op.register_fake
def _(do, dht, q, k, v, g, initial_state, scale):
    b, h, t, dk = q.shape
    dg = q.new_empty((b, h, t) if g is not None else (0,), dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg,
            q.new_empty((b, h, dk, v.shape[-1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, s0, scale = inputs
    ctx.save_for_backward(q, k, v, g, s0)
    ctx.scale = scale


def _backward(ctx, do, dht):
    q, k, v, g, s0 = ctx.saved_tensors
    dq, dk, dv, dg, ds0 = _bwd_op(do, dht, q, k, v, g, s0, ctx.scale)
    return dq, dk, dv, (dg if g is not None else None), (ds0 if s0 is not None else None), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------

def _check(q, k, v, g, step_: bool):
    _core.check_qkv(q, k, v, step=step_)
    if q.dtype not in DTYPES:
        raise TypeError(f"the Triton simple-GLA kernels take float16, bfloat16 or float32, got {q.dtype}")
    if g is not None:
        shape = q.shape[:-1]
        _core.check_gate("g", g, shape, "(batch, heads)" if step_ else "(batch, heads, length)", q.device)


def simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    """Scalar-gated linear attention with the Triton kernels (differentiable in q, k, v, g, initial_state).

    S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv); float16, bfloat16 or float32 (one dtype).
        g: (B, H, T) log gates (computed in float32; <= 0 for the no-overflow guarantee), or None (no decay).
            A per-head constant decay is ``log_gamma.view(1, H, 1).expand(B, H, T)`` (stride-0 views work).
        scale: multiplies q; default Dk ** -0.5.
        initial_state: (B, H, Dk, Dv) (used in float32), or None (zeros).
        output_final_state: also return the final state (float32).
    Returns ``(o (B, H, T, Dv) in q's dtype, final_state or None)``. Runs on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``.
    """
    _check(q, k, v, g, False)
    _core.check_bool("output_final_state", output_final_state)
    b, h, t, dk = q.shape
    scale = _core.check_scale(scale, dk)
    if initial_state is not None:
        _core.check_state("initial_state", initial_state, (b, h, dk, v.shape[-1]), q.device)
        initial_state = initial_state.to(torch.float32)
    if g is not None:
        g = g.to(torch.float32)
    o, ht = _fwd_op(q, k, v, g, initial_state, scale)
    return o, (ht if output_final_state else None)


def simple_gla_step(q_t, k_t, v_t, g_t=None, state=None, scale=None, inplace=False):
    """One decoding token: q_t, k_t (B, H, Dk), v_t (B, H, Dv), g_t (B, H) or None, state (B, H, Dk, Dv) or
    None. -> ``(o_t (B, H, Dv), new_state float32)``. Not differentiable.

    ``inplace=True`` overwrites ``state`` (contiguous float32) with the new state and returns it; otherwise
    ``state`` is left alone (out of place). The kernel reads and writes the state once.
    """
    _check(q_t, k_t, v_t, g_t, True)
    _core.check_bool("inplace", inplace)
    b, h, dk = q_t.shape
    scale = _core.check_scale(scale, dk)
    if state is not None:
        _core.check_state("state", state, (b, h, dk, v_t.shape[-1]), q_t.device)
    with torch.no_grad():
        return step(q_t, k_t, v_t, None if g_t is None else g_t.to(torch.float32), state, scale, inplace)


# ----------------------------------------------------------------------------------------------------------
# linear attention on top of the kernels
# ----------------------------------------------------------------------------------------------------------

ELEMENTWISE_MAPS = ("identity", "elu+1", "relu")


def _phi(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return x
    y = x.to(torch.float32)
    y = torch.nn.functional.elu(y) + 1.0 if name == "elu+1" else torch.relu(y)
    return y.to(x.dtype)


def linear_attention_chunk(q, k, v, feature_map: str, log_decay, scale: float, initial_state, offsets):
    """The chunked linear attention of :func:`attnzoo.linear.linear_attention` (normalize=False, causal)
    on the kernels: phi applied elementwise in PyTorch (in float32, rounded back to the input dtype),
    g = the per-head log decay (or None). Arguments are already checked. -> (o, final state float32)."""
    b, h, t, _ = q.shape
    fq, fk = _phi(feature_map, q), _phi(feature_map, k)
    s0 = None if initial_state is None else initial_state.to(torch.float32)
    g = None if log_decay is None else log_decay.to(torch.float32).view(1, h, 1).expand(b, h, t)

    def fn(q, k, v, g, s):
        return _fwd_op(q, k, v, g, s, scale)

    return _core.run_sequences(fn, [fq, fk, v, g], s0, offsets)


def linear_attention_step(q, k, v, feature_map: str, log_decay, scale: float, state):
    """One decoding step of linear attention (normalize=False) on the step kernel (out of place)."""
    b, h, _ = q.shape
    fq, fk = _phi(feature_map, q), _phi(feature_map, k)
    g = None if log_decay is None else log_decay.to(torch.float32).view(1, h).expand(b, h)
    return step(fq, fk, v, g, state, scale)
