"""Triton kernels for GLA: linear attention with a per-channel (vector) forget gate.

Recurrence per (batch, head), row-vector convention as in :mod:`attnzoo.linear._core`::

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

q, k (B, H, T, Dk), v (B, H, T, Dv) in float16 / bfloat16 / float32, g (B, H, T, Dk) float32 log gates
(<= 0 for the no-overflow guarantee), state (B, H, Dk, Dv) float32, Dk, Dv <= 128 (the key dimension is
held whole in one block). Accumulation is float32; float32 inputs use IEEE float32 dots (no TF32). The
structure follows :mod:`attnzoo.linear.triton_kernels` (the scalar-gated kernels); read its docstring first.

Gates
-----
Time is cut into chunks of BT steps. ``chunk_cumsum`` (a Triton kernel, float32) writes G, the chunk-local
inclusive cumulative sum of g per channel, into a buffer padded with zero gates to a whole number of chunks
(so every kernel reads G in bounds, and G is non-increasing inside each chunk, padding included: a float32
running sum of non-positive terms never increases, so G_i - G_j <= 0 exactly for j <= i).

Forward
-------
Inside chunk n, with h_n the state before it and G_last the last row of G::

    o_i     = scale * [ (q_i * exp(G_i)) h_n  +  sum_{j <= i} A_ij v_j ]
    A_ij    = sum_d q_id k_jd exp(G_id - G_jd)                            (j <= i)
    h_{n+1} = diag(exp G_last) h_n + sum_j (k_j * exp(G_last - G_j))^T v_j

1. ``_fwd_h`` (grid: Dk block, Dv block, batch x head) walks the chunks in order and writes every h_n and
   the final state (same as the scalar kernel, the decays now per channel: rows of the state tile).
2. ``_intra_a`` (grid: chunk, sub-chunk p, batch x head) writes the rows of sub-chunk p of scale * A
   (float32 buffer (B*H, NT*BT, BT)). Sub-chunks of BC steps (16):
   - key sub-chunks before p: both sides are referenced to r, the step just before sub-chunk p starts:
     exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j) with i in p, j <= r, so both factors are exp of
     a non-positive number (bounded by 1; a far key's factor may underflow to 0, as the true product
     does). Then the sum over channels is one tensor-core dot (BC, Dk) x (Dk, BT).
   - the diagonal sub-chunk p itself: exact, a loop over its BC key steps j computing column j of A
     elementwise, sum_d q_id k_jd exp(G_id - G_jd) with exponent -inf where i < j. Never exp(+G).
     With ``diag="bcast"`` (opt-in, not yet timed) the same sums run as one (BC, BC, BKD) broadcast product
     per BKD channels instead of BC dependent steps (the split backward's diagonal likewise, over its Dk
     block).
3. ``_fwd_o`` (grid: chunk, Dv block, batch x head): o = scale (q * exp(G)) h_n + A v.

The exponents are differences of chunk-local prefix sums (not exact segment sums as in the PyTorch form):
absolute error about eps_fp32 * |sum of the gates over a chunk|.

Backward
--------
``_bwd_dh`` walks the chunks in reverse and writes dh_{n+1} (gradient of the state after chunk n); what is
left at the start is d initial_state::

    dh_n = diag(exp G_last) dh_{n+1} + scale (q * exp(G))^T do,          dh_NT = d final_state

With dA_ij = do_i . v_j, ``_bwd_intra`` (grid: chunk, sub-chunk p, batch x head) writes the intra-chunk
parts of dq and dk for the rows of sub-chunk p (float32 buffers), with the same sub-chunk scheme::

    dq_i <- scale sum_{j <= i} dA_ij k_j * exp(G_i - G_j)
            (j before p: exp(G_i - G_r) * [dA (k * exp(G_r - G_j))], r = step before p; j in p: a loop)
    dk_j <- scale sum_{i >= j} dA_ij q_i * exp(G_i - G_j)
            (i after p: exp(G_e - G_j) * [dA^T (q * exp(G_i - G_e))], e = last step of p; i in p: a loop)

With ``intra="split"`` the same sums run in two kernels: ``_bwd_da`` writes scale * dA per chunk once
(float32, lower triangle), and ``_bwd_intra_split`` (grid: Dk block, chunk x sub-chunk, batch x head) walks
the earlier / later sub-chunks one (BC, BC) tile of dA at a time, referenced to p's first / last row.

``_bwd_inter`` (grid: chunk, batch x head; whole Dk, a loop over Dv blocks) adds the state parts and
writes dq, dk, dv, dg::

    dq_i = dq_intra_i + scale exp(G_i) * (do_i h_n^T)
    dk_j = dk_intra_j + exp(G_last - G_j) * (v_j dh_{n+1}^T)
    dv_j = (k_j * exp(G_last - G_j)) dh_{n+1} + sum_{i >= j} A_ij do_i

Gradient of the gates (per channel; the derivation of :mod:`triton_kernels` carries over channel by
channel): with G the global cumulative gate, dL/dG_t = q_t * dq_t - k_t * dk_t (+ the final state term),
dg_t = sum_{s >= t} dL/dG_s. The reverse sum is cut at the chunk end with the exact closed form of the
tail, dL/dg at the first step of chunk n+1, which per channel d is <h_{n+1}[d, :], dh_{n+1}[d, :]>::

    dg_t = sum_{t <= u in chunk n} (q_u * dq_u - k_u * dk_u)  +  ip,
    ip_d = exp(G_last,d) <h_n[d, :], dh_{n+1}[d, :]>  +  sum_j k_jd dk_inter_jd

(h_{n+1} = diag(exp G_last) h_n + sum_j (k_j exp(G_last - G_j))^T v_j expanded; dk_inter is the state part
of dk above). For the last chunk this is the final state's term. With no initial state chunk 0 sums forward
instead (dg_t = -sum_{u < t}(...), as <h_0, dh_0> = 0), so dg_0 = 0 exactly. Nothing but the inputs is
saved for backward (h_n and A are recomputed); no atomics: deterministic.

Public: :func:`gla_triton` (differentiable, through the ``torch.library`` custom ops ``attnzoo::gla_fwd``
/ ``attnzoo::gla_bwd`` with fake implementations). ``fwd`` / ``bwd`` launch the kernels directly (block
sizes and NaN poisoning of the outputs for the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _core
from .triton_kernels import _empty, _keep, _last_unit, _pow2, _prec, _split_dot, _state_in, fit_state_tiles

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the largest gate span (nats) a diagonal tile may run as dots with (cfg diag_lim / diag_lim_b of GLA and KDA): its
# factors reach exp(span) = 1e26 at 60, far from float32's (and bfloat16's) 3e38 for any sane |k|
DIAG_LIM_MAX = 60.0


# ----------------------------------------------------------------------------------------------------------
# kernels (G: chunk-local cumulative gates, contiguous float32 (B*H, NT*BT, Dk))
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_h(K, V, G, H0, HS, HT,
           s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
           NH, T, DIMK, DIMV, NT,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           HAS_H0: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
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
    gbase = G + bh * NT * BT * DIMK
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + bh * DIMK * DIMV + st, mask=m_kv, other=0.0)
    for n in range(0, NT):
        tl.store(HS + (bh * NT + n) * DIMK * DIMV + st, state.to(HS.dtype.element_ty), mask=m_kv)
        offs_t = n * BT + tl.arange(0, BT)
        m_t = offs_t < T
        kt = tl.load(kbase + offs_t[None, :] * s_kt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        v = tl.load(vbase + offs_t[:, None] * s_vt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        gt = tl.load(gbase + offs_t[None, :] * DIMK + offs_k[:, None], mask=m_k[:, None], other=0.0)  # (BK, BT)
        glast = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
        state = _split_dot(kt.to(tl.float32) * tl.exp(glast[:, None] - gt), v, state * tl.exp(glast)[:, None],
                           SPLIT, PREC)
    tl.store(HT + bh * DIMK * DIMV + st, state, mask=m_kv)


@triton.jit
def _intra_a(Q, K, G, A,
             s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
             NH, T, DIMK, NT, scale,
             BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
             BKD: tl.constexpr = 0):
    n = tl.program_id(0)
    p = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)                  # chunk-local step of the keys
    offs_i = p * BC + tl.arange(0, BC)         # chunk-local step of the queries (sub-chunk p)
    offs_k = tl.arange(0, BK)
    m_k = offs_k < DIMK
    ti = n * BT + offs_i
    tc = n * BT + offs_c
    m_ik = (ti < T)[:, None] & m_k[None, :]
    m_ck = (tc < T)[:, None] & m_k[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    q = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_ck, other=0.0)
    gc = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    # r = the step before sub-chunk p (G_r = 0 at the chunk start, p = 0, where no key is before)
    gr = tl.load(gbase + tl.maximum(n * BT + p * BC - 1, 0) * DIMK + offs_k, mask=m_k, other=0.0)
    gr = tl.where(p > 0, gr, 0.0)
    qr = (q * tl.exp(gi - gr[None, :])).to(k.dtype)
    before = offs_c < p * BC
    kr = (k.to(tl.float32) * tl.exp(tl.where(before[:, None], gr[None, :] - gc, float("-inf")))).to(k.dtype)
    a = tl.dot(qr, tl.trans(kr), input_precision=PREC)  # (BC, BT): keys of earlier sub-chunks
    rows = A + (bh * NT * BT + n * BT + offs_i)[:, None] * BT
    if BKD > 0:
        # the diagonal sub-chunk, exact, as one (BC, BC, BKD) product per BKD channels (no step loop): the
        # off-diagonal columns are stored first, the diagonal tile into its own columns (disjoint stores)
        offs_s = tl.arange(0, BC)
        ti_ok = ti < T
        low = (offs_s[:, None] >= offs_s[None, :])[:, :, None]
        ad = tl.zeros([BC, BC], dtype=tl.float32)
        for d0 in range(0, BK, BKD):
            offs_d = d0 + tl.arange(0, BKD)
            m_d = (offs_d < DIMK)[None, :]
            qd = tl.load(qbase + ti[:, None] * s_qt + offs_d[None, :], mask=ti_ok[:, None] & m_d, other=0.0)
            kd = tl.load(kbase + ti[:, None] * s_kt + offs_d[None, :], mask=ti_ok[:, None] & m_d, other=0.0)
            gd = tl.load(gbase + ti[:, None] * DIMK + offs_d[None, :], mask=m_d, other=0.0)
            dec = tl.exp(tl.where(low, gd[:, None, :] - gd[None, :, :], float("-inf")))
            ad += tl.sum(qd.to(tl.float32)[:, None, :] * kd.to(tl.float32)[None, :, :] * dec, 2)
        off_diag = (offs_c < p * BC) | (offs_c >= p * BC + BC)
        tl.store(rows + offs_c[None, :], a * scale, mask=off_diag[None, :])
        tl.store(rows + (p * BC + offs_s)[None, :], ad * scale)
    else:
        for jj in range(0, BC):  # the diagonal sub-chunk, exact, one key step at a time
            j = p * BC + jj
            kj = tl.load(kbase + (n * BT + j) * s_kt + offs_k, mask=m_k & (offs_k * 0 + n * BT + j < T),
                         other=0.0).to(tl.float32)
            gj = tl.load(gbase + (n * BT + j) * DIMK + offs_k, mask=m_k, other=0.0)
            dec = tl.exp(tl.where((offs_i >= j)[:, None], gi - gj[None, :], float("-inf")))
            col = tl.sum(q * kj[None, :] * dec, 1)
            a += tl.where((offs_c == j)[None, :], col[:, None], 0.0)
        tl.store(rows + offs_c[None, :], a * scale)


@triton.jit
def _fwd_o(Q, V, G, HS, A, O,
           s_qb, s_qh, s_qt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
           NH, T, DIMK, DIMV, NT, scale,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_t = n * BT + offs_c
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_t = offs_t < T
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    q = tl.load(Q + b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_k[None, :],
                mask=m_t[:, None] & m_k[None, :], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vt + offs_v[None, :],
                mask=m_t[:, None] & m_v[None, :], other=0.0)
    g = tl.load(G + bh * NT * BT * DIMK + offs_t[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    hs = tl.load(HS + (bh * NT + n) * DIMK * DIMV + offs_k[:, None] * DIMV + offs_v[None, :],
                 mask=m_k[:, None] & m_v[None, :], other=0.0)
    a = tl.load(A + (bh * NT * BT + offs_t)[:, None] * BT + offs_c[None, :])
    o = tl.dot((q.to(tl.float32) * tl.exp(g)).to(hs.dtype), hs, input_precision=PREC) * scale
    o = tl.dot(a.to(v.dtype), v, o, input_precision=PREC)
    tl.store(O + b * s_ob + h * s_oh + offs_t[:, None] * s_ot + offs_v[None, :], o.to(O.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _bwd_dh(Q, DO, G, DHT, DH0, DHS,
            s_qb, s_qh, s_qt, s_db, s_dh, s_dt,
            NH, T, DIMK, DIMV, NT, scale,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_DHT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
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
    gbase = G + bh * NT * BT * DIMK
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
        gt = tl.load(gbase + offs_t[None, :] * DIMK + offs_k[:, None], mask=m_k[:, None], other=0.0)
        glast = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
        zero = tl.zeros([BK, BV], dtype=tl.float32)
        dstate = dstate * tl.exp(glast)[:, None] + scale * _split_dot(qt.to(tl.float32) * tl.exp(gt), do, zero,
                                                                      SPLIT, PREC)
    tl.store(DH0 + bh * DIMK * DIMV + st, dstate, mask=m_kv)


@triton.jit
def _bwd_intra(Q, K, V, G, DO, DQI, DKI,
               s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
               NH, T, DIMK, DIMV, NT, scale,
               BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # DQI, DKI: float32 (B*H, T, Dk) contiguous
    n = tl.program_id(0)
    p = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_i = p * BC + tl.arange(0, BC)
    offs_k = tl.arange(0, BK)
    m_k = offs_k < DIMK
    ti = n * BT + offs_i
    tc = n * BT + offs_c
    m_i = ti < T
    m_c = tc < T
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    m_ik = m_i[:, None] & m_k[None, :]
    m_ck = m_c[:, None] & m_k[None, :]
    gp = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    qc = tl.load(qbase + tc[:, None] * s_qt + offs_k[None, :], mask=m_ck, other=0.0)
    kc = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_ck, other=0.0)
    gc = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    # dA rows of p (BC, BT) and columns of p (BT, BC), over all of Dv
    dar = tl.zeros([BC, BT], dtype=tl.float32)
    dac = tl.zeros([BT, BC], dtype=tl.float32)
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        dop = tl.load(dbase + ti[:, None] * s_dt + offs_v[None, :], mask=m_i[:, None] & m_v[None, :], other=0.0)
        vp = tl.load(vbase + ti[:, None] * s_vt + offs_v[None, :], mask=m_i[:, None] & m_v[None, :], other=0.0)
        doc = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        vc = tl.load(vbase + tc[:, None] * s_vt + offs_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        dar = tl.dot(dop, tl.trans(vc), dar, input_precision=PREC)
        dac = tl.dot(doc, tl.trans(vp), dac, input_precision=PREC)
    # dq, keys of earlier sub-chunks, referenced to r (the step before p)
    gr = tl.load(gbase + tl.maximum(n * BT + p * BC - 1, 0) * DIMK + offs_k, mask=m_k, other=0.0)
    gr = tl.where(p > 0, gr, 0.0)
    before = offs_c < p * BC
    kr = kc.to(tl.float32) * tl.exp(tl.where(before[:, None], gr[None, :] - gc, float("-inf")))
    dq = tl.dot(tl.where(before[None, :], dar, 0.0).to(kc.dtype), kr.to(kc.dtype), input_precision=PREC)
    dq = dq * tl.exp(gp - gr[None, :])
    # dk, queries of later sub-chunks, referenced to e (the last step of p)
    ge = tl.load(gbase + (n * BT + p * BC + BC - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    after = offs_c >= (p + 1) * BC
    qe = qc.to(tl.float32) * tl.exp(tl.where(after[:, None], gc - ge[None, :], float("-inf")))
    dk = tl.dot(tl.trans(tl.where(after[:, None], dac, 0.0)).to(qc.dtype), qe.to(qc.dtype), input_precision=PREC)
    dk = dk * tl.exp(ge[None, :] - gp)
    # the diagonal sub-chunk, exact, one step at a time. One exp per element serves both sides (dq reads
    # i >= j, dk i <= j): exp(G_i - G_j) where i >= j, exp(G_j - G_i) where i < j -- the values of two
    # exps of the masked differences (fl(a - b) = -fl(b - a); both are exp(0) = 1 on the diagonal)
    for jj in range(0, BC):
        j = p * BC + jj
        tj = n * BT + j
        kj = tl.load(kbase + tj * s_kt + offs_k, mask=m_k & (offs_k * 0 + tj < T), other=0.0).to(tl.float32)
        qj = tl.load(qbase + tj * s_qt + offs_k, mask=m_k & (offs_k * 0 + tj < T), other=0.0).to(tl.float32)
        gj = tl.load(gbase + tj * DIMK + offs_k, mask=m_k, other=0.0)
        # dq_i += dA_ij k_j exp(G_i - G_j) for i >= j (i in p)
        da_j = tl.sum(tl.where((offs_c == j)[None, :], dar, 0.0), 1)      # (BC,): dA[i, j]
        x = gp - gj[None, :]
        e = tl.exp(tl.where((offs_i >= j)[:, None], x, -x))
        dq += da_j[:, None] * kj[None, :] * tl.where((offs_i >= j)[:, None], e, 0.0)
        # dk_i' += dA_{j i'} q_j exp(G_j - G_i') for i' <= j (i' in p; here j plays the query)
        da_r = tl.sum(tl.where((offs_c == j)[:, None], dac, 0.0), 0)      # (BC,): dA[j, i']
        dk += da_r[:, None] * qj[None, :] * tl.where((offs_i <= j)[:, None], e, 0.0)
    xoff = (bh * T + ti)[:, None] * DIMK + offs_k[None, :]
    tl.store(DQI + xoff, dq * scale, mask=m_ik)
    tl.store(DKI + xoff, dk * scale, mask=m_ik)


@triton.jit
def _bwd_da(V, DO, DA, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, NH, T, DIMV, NT, scale,
            BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # DA: float32 (B*H, NT*BT, BT), scale * do_i . v_j for j <= i inside each chunk, 0 above the diagonal
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    m_c = tc < T
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_cv = m_c[:, None] & (offs_v < DIMV)[None, :]
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_cv, other=0.0)
        v = tl.load(vbase + tc[:, None] * s_vt + offs_v[None, :], mask=m_cv, other=0.0)
        acc = tl.dot(do, tl.trans(v), acc, input_precision=PREC)
    acc = tl.where(offs_c[:, None] >= offs_c[None, :], acc * scale, 0.0)
    tl.store(DA + (bh * NT * BT + tc)[:, None] * BT + offs_c[None, :], acc)


@triton.jit
def _gate_span(x, mask):
    """The largest entry of x where mask (0 elsewhere): the largest exponent a factored diagonal tile needs. NaN
    and +inf compare false against any limit, so such tiles take the exact steps."""
    return tl.max(tl.max(tl.where(mask, x, 0.0), 1), 0)


@triton.jit
def _bwd_intra_split(Q, K, G, DA, DQI, DKI,
                     s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                     NH, T, DIMK, NT,
                     BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                     DIAG3: tl.constexpr = False, DIAG_LIM: tl.constexpr = 0.0):
    # the intra-chunk dq, dk of sub-chunk p over one Dk block, from the precomputed DA (see _bwd_da);
    # grid (Dk block, chunk x sub-chunk, batch x head). DQI, DKI: float32 (B*H, T, Dk) contiguous
    ik = tl.program_id(0)
    n = tl.program_id(1) // (BT // BC)
    p = tl.program_id(1) % (BT // BC)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_s = tl.arange(0, BC)
    offs_i = p * BC + offs_s
    ti = n * BT + offs_i
    m_i = ti < T
    offs_k = ik * BK + tl.arange(0, BK)
    m_k = offs_k < DIMK
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    dabase = DA + (bh * NT * BT + n * BT) * BT
    gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    # dq_i = sum_{j < p's start} dA_ij k_j exp(G_i - G_j), referenced to gn = G at p's first row
    gn = tl.load(gbase + (n * BT + p * BC) * DIMK + offs_k, mask=m_k, other=0.0)
    dq = tl.zeros([BC, BK], dtype=tl.float32)
    for jc in range(0, p):
        offs_j = jc * BC + offs_s
        tj = n * BT + offs_j
        kj = tl.load(kbase + tj[:, None] * s_kt + offs_k[None, :], mask=(tj < T)[:, None] & m_k[None, :], other=0.0)
        gj = tl.load(gbase + tj[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        kg = (kj.to(tl.float32) * tl.exp(gn[None, :] - gj)).to(kj.dtype)
        da = tl.load(dabase + offs_i[:, None] * BT + offs_j[None, :])
        dq = tl.dot(da.to(kj.dtype), kg, dq, input_precision=PREC)
    dq = dq * tl.exp(gi - gn[None, :])
    # dk_i = sum_{j after p} dA_ji q_j exp(G_j - G_i), referenced to ge = G at p's last row
    ge = tl.load(gbase + (n * BT + p * BC + BC - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    dk = tl.zeros([BC, BK], dtype=tl.float32)
    for jc in range(p + 1, BT // BC):
        offs_j = jc * BC + offs_s
        tj = n * BT + offs_j
        qj = tl.load(qbase + tj[:, None] * s_qt + offs_k[None, :], mask=(tj < T)[:, None] & m_k[None, :], other=0.0)
        gj = tl.load(gbase + tj[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        qg = (qj.to(tl.float32) * tl.exp(gj - ge[None, :])).to(qj.dtype)
        da = tl.load(dabase + offs_j[:, None] * BT + offs_i[None, :])  # dA[j, i]
        dk = tl.dot(tl.trans(da).to(qj.dtype), qg, dk, input_precision=PREC)
    ec = tl.exp(ge[None, :] - gi)
    dk = dk * ec
    if DIAG_LIM > 0:
        # the diagonal tile as two dots, factored at gn (rows) and ge (columns) as the tiles off it, when the
        # sub-chunk's gates span at most DIAG_LIM nats (cfg diag_lim_b); else the exact steps
        m_ik = m_i[:, None] & m_k[None, :]
        if tl.maximum(_gate_span(gn[None, :] - gi, m_ik), _gate_span(gi - ge[None, :], m_ik)) <= DIAG_LIM:
            ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_ik, other=0.0)
            qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0)
            keep = (offs_s[:, None] >= offs_s[None, :]) & m_i[:, None] & m_i[None, :]
            dd = tl.where(keep, tl.load(dabase + offs_i[:, None] * BT + offs_i[None, :]), 0.0).to(ki.dtype)
            kn = tl.where(m_ik, ki.to(tl.float32) * tl.exp(gn[None, :] - gi), 0.0).to(ki.dtype)
            qe = tl.where(m_ik, qi.to(tl.float32) * tl.exp(gi - ge[None, :]), 0.0).to(qi.dtype)
            z = tl.zeros([BC, BK], dtype=tl.float32)
            dq += tl.exp(gi - gn[None, :]) * tl.dot(dd, kn, z, input_precision=PREC)
            dk += ec * tl.dot(tl.trans(dd), qe, z, input_precision=PREC)
        else:
            dq, dk = _bwd_diag_steps(qbase, kbase, gbase, dabase, gi, dq, dk, s_qt, s_kt, n, p, T, DIMK,
                                     offs_i, offs_k, m_k, BT, BC)
    elif DIAG3:
        # the diagonal sub-chunk, exact, as (BC, BC, BK) products: i on axis 0, j on axis 1
        ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_i[:, None] & m_k[None, :],
                     other=0.0).to(tl.float32)
        qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_i[:, None] & m_k[None, :],
                     other=0.0).to(tl.float32)
        dd = tl.load(dabase + offs_i[:, None] * BT + offs_i[None, :])  # dA[i, j] of the diagonal block
        ge_ = (offs_s[:, None] >= offs_s[None, :])[:, :, None]        # j <= i
        le_ = (offs_s[:, None] <= offs_s[None, :])[:, :, None]        # j >= i
        diff = gi[:, None, :] - gi[None, :, :]                        # G_i - G_j
        dq += tl.sum(dd[:, :, None] * ki[None, :, :] * tl.exp(tl.where(ge_, diff, float("-inf"))), 1)
        # dk_i += sum_{j >= i} dA[j, i] q_j exp(G_j - G_i)
        dk += tl.sum(tl.trans(dd)[:, :, None] * qi[None, :, :] * tl.exp(tl.where(le_, -diff, float("-inf"))), 1)
    else:
        dq, dk = _bwd_diag_steps(qbase, kbase, gbase, dabase, gi, dq, dk, s_qt, s_kt, n, p, T, DIMK,
                                 offs_i, offs_k, m_k, BT, BC)
    xoff = (bh * T + ti)[:, None] * DIMK + offs_k[None, :]
    m_ik = m_i[:, None] & m_k[None, :]
    tl.store(DQI + xoff, dq, mask=m_ik)
    tl.store(DKI + xoff, dk, mask=m_ik)


@triton.jit
def _bwd_diag_steps(qbase, kbase, gbase, dabase, gi, dq, dk, s_qt, s_kt, n, p, T, DIMK, offs_i, offs_k, m_k,
                    BT: tl.constexpr, BC: tl.constexpr):
    # the diagonal sub-chunk, exact, one step at a time. One exp per element serves both sides (dq reads
    # i >= j, dk i <= j): exp(G_i - G_j) where i >= j, exp(G_j - G_i) where i < j -- the values of two
    # exps of the masked differences (fl(a - b) = -fl(b - a); both are exp(0) = 1 on the diagonal)
    for jj in range(0, BC):
        j = p * BC + jj
        tj = n * BT + j
        m_j = m_k & (offs_k * 0 + tj < T)
        kj = tl.load(kbase + tj * s_kt + offs_k, mask=m_j, other=0.0).to(tl.float32)
        qj = tl.load(qbase + tj * s_qt + offs_k, mask=m_j, other=0.0).to(tl.float32)
        gj = tl.load(gbase + tj * DIMK + offs_k, mask=m_k, other=0.0)
        da_c = tl.load(dabase + offs_i * BT + j)  # dA[i, j]
        da_r = tl.load(dabase + j * BT + offs_i)  # dA[j, i]
        x = gi - gj[None, :]
        e = tl.exp(tl.where((offs_i >= j)[:, None], x, -x))
        dq += da_c[:, None] * kj[None, :] * tl.where((offs_i >= j)[:, None], e, 0.0)
        dk += da_r[:, None] * qj[None, :] * tl.where((offs_i <= j)[:, None], e, 0.0)
    return dq, dk


@triton.jit
def _bwd_inter(Q, K, V, G, DO, HS, DHS, A, DQI, DKI, DQ, DKK, DVV, DG,
               s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
               s_xb, s_xh, s_xt, s_yb, s_yh, s_yt,
               NH, T, DIMK, DIMV, NT, scale,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    # s_x*: strides of dq and dk (one shape, both contiguous), s_y*: of dv; DQI, DKI, DG: (B*H, T, Dk) fp32
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_t = n * BT + offs_c
    offs_k = tl.arange(0, BK)
    m_t = offs_t < T
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    gbase = G + bh * NT * BT * DIMK
    g = tl.load(gbase + offs_t[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    glast = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    ek = tl.exp(glast[None, :] - g)
    ke = k.to(tl.float32) * ek
    at = tl.trans(tl.load(A + (bh * NT * BT + offs_t)[:, None] * BT + offs_c[None, :]))
    dqh = tl.zeros([BT, BK], dtype=tl.float32)
    dkh = tl.zeros([BT, BK], dtype=tl.float32)
    iph = tl.zeros([BK], dtype=tl.float32)
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
        dv = tl.dot(ke.to(dhs.dtype), dhs, input_precision=PREC)
        dv = tl.dot(at.to(do.dtype), do, dv, input_precision=PREC)
        tl.store(DVV + b * s_yb + h * s_yh + offs_t[:, None] * s_yt + offs_v[None, :], dv.to(DVV.dtype.element_ty),
                 mask=m_tv)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
        dkh = tl.dot(v.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        iph += tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1)
    _inter_finish(q, k, g, glast, ek, dqh, dkh, iph, DQI, DKI, DQ, DKK, DG, b, h, bh, n, offs_t, offs_k, m_tk,
                  s_xb, s_xh, s_xt, T, DIMK, scale, HAS_H0)


@triton.jit
def _inter_finish(q, k, g, glast, ek, dqh, dkh, iph, DQI, DKI, DQ, DKK, DG, b, h, bh, n, offs_t, offs_k, m_tk,
                  s_xb, s_xh, s_xt, T, DIMK, scale, HAS_H0: tl.constexpr):
    # dq, dk (intra parts + state parts) and dg of one chunk over the channels offs_k, from the state
    # products dqh = do h_n^T, dkh = v dh_{n+1}^T and iph = <h_n[d], dh_{n+1}[d]> (every channel independent)
    xi = (bh * T + offs_t)[:, None] * DIMK + offs_k[None, :]
    dki = dkh * ek  # the state part of dk
    dq = tl.load(DQI + xi, mask=m_tk, other=0.0) + dqh * (tl.exp(g) * scale)
    dk = tl.load(DKI + xi, mask=m_tk, other=0.0) + dki
    xoff = b * s_xb + h * s_xh + offs_t[:, None] * s_xt + offs_k[None, :]
    tl.store(DQ + xoff, dq.to(DQ.dtype.element_ty), mask=m_tk)
    tl.store(DKK + xoff, dk.to(DKK.dtype.element_ty), mask=m_tk)
    # dL/dG_t = q_t * dq_t - k_t * dk_t (per channel); the tail <h_{n+1}[d], dh_{n+1}[d]> in closed form
    dgl = q.to(tl.float32) * dq - k.to(tl.float32) * dk
    ip = tl.exp(glast) * iph + tl.sum(k.to(tl.float32) * dki, 0)
    dg = tl.cumsum(dgl, 0, reverse=True) + ip[None, :]
    if not HAS_H0:
        if n == 0:  # <h_0, dh_0> = 0: sum forward from the start instead (dg_0 = 0 exactly)
            dg = dgl - tl.cumsum(dgl, 0)
    tl.store(DG + xi, dg, mask=m_tk)


@triton.jit
def _bwd_dv(K, G, DHS, A, DO, DVV, s_kb, s_kh, s_kt, s_db, s_dh, s_dt, s_yb, s_yh, s_yt,
            NH, T, DIMK, DIMV, NT, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # inter="split": dv_j = (k_j * exp(G_last - G_j)) dh_{n+1} + sum_{i >= j} A_ij do_i for one chunk and Dv
    # block (grid: chunk, Dv block, batch x head), a loop over Dk blocks
    n = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_t = n * BT + offs_c
    offs_v = iv * BV + tl.arange(0, BV)
    m_t = offs_t < T
    m_v = offs_v < DIMV
    m_tv = m_t[:, None] & m_v[None, :]
    gbase = G + bh * NT * BT * DIMK
    hbase = (bh * NT + n) * DIMK * DIMV
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    for ik in range(0, tl.cdiv(DIMK, BK)):
        offs_k = ik * BK + tl.arange(0, BK)
        m_k = offs_k < DIMK
        k = tl.load(K + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :],
                    other=0.0)
        g = tl.load(gbase + offs_t[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        glast = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
        dhs = tl.load(DHS + hbase + offs_k[:, None] * DIMV + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                      other=0.0)
        dv = tl.dot((k.to(tl.float32) * tl.exp(glast[None, :] - g)).to(dhs.dtype), dhs, dv, input_precision=PREC)
    at = tl.trans(tl.load(A + (bh * NT * BT + offs_t)[:, None] * BT + offs_c[None, :]))
    do = tl.load(DO + b * s_db + h * s_dh + offs_t[:, None] * s_dt + offs_v[None, :], mask=m_tv, other=0.0)
    dv = tl.dot(at.to(do.dtype), do, dv, input_precision=PREC)
    tl.store(DVV + b * s_yb + h * s_yh + offs_t[:, None] * s_yt + offs_v[None, :], dv.to(DVV.dtype.element_ty),
             mask=m_tv)


@triton.jit
def _bwd_dqkg(Q, K, V, G, DO, HS, DHS, DQI, DKI, DQ, DKK, DG,
              s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_xb, s_xh, s_xt,
              NH, T, DIMK, DIMV, NT, scale,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    # inter="split": _bwd_inter's dq, dk, dg for one Dk block (grid: Dk block, chunk, batch x head; the
    # channels are independent), dv left to _bwd_dv
    ik = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_t = n * BT + tl.arange(0, BT)
    offs_k = ik * BK + tl.arange(0, BK)
    m_t = offs_t < T
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_t[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    gbase = G + bh * NT * BT * DIMK
    g = tl.load(gbase + offs_t[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    glast = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    ek = tl.exp(glast[None, :] - g)
    dqh = tl.zeros([BT, BK], dtype=tl.float32)
    dkh = tl.zeros([BT, BK], dtype=tl.float32)
    iph = tl.zeros([BK], dtype=tl.float32)
    hbase = (bh * NT + n) * DIMK * DIMV
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        m_tv = m_t[:, None] & m_v[None, :]
        v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vt + offs_v[None, :], mask=m_tv, other=0.0)
        do = tl.load(DO + b * s_db + h * s_dh + offs_t[:, None] * s_dt + offs_v[None, :], mask=m_tv, other=0.0)
        st = hbase + offs_k[:, None] * DIMV + offs_v[None, :]
        hs = tl.load(HS + st, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dhs = tl.load(DHS + st, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
        dkh = tl.dot(v.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        iph += tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1)
    _inter_finish(q, k, g, glast, ek, dqh, dkh, iph, DQI, DKI, DQ, DKK, DG, b, h, bh, n, offs_t, offs_k, m_tk,
                  s_xb, s_xh, s_xt, T, DIMK, scale, HAS_H0)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def config(dk: int, dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Chunk and block sizes (no autotuning). BT: chunk; BC: sub-chunk (BC <= BT); BK_H, BV_H: state tile of
    the two sequential kernels; BV_O: Dv block of the output kernel; BV_B: Dv block of the backward loops.
    intra: "fused" (``_bwd_intra``: one program per sub-chunk over the whole Dk, dA computed in it) or
    "split" (``_bwd_da`` writes dA per chunk once, then ``_bwd_intra_split`` runs per sub-chunk and Dk
    block of BK_I channels with warps_i warps: more, smaller programs, the layout of fla's kernels; the
    16-bit default since the H200 sweep of the second 2026-12-04 session: backward 3.95 -> 2.83 ms).
    intra_f: the forward's score kernel, "fused" (``_intra_a``: one program per sub-chunk and its whole
    (BC, BT) row block) or "split" (``triton_kda._intra_split`` without M: one dot per earlier (BC, BC) tile,
    the exact per-step loop on the diagonal tile only, warps_f warps; the 16-bit GPU default).
    diag_lim / diag_lim_b (with intra_f="split" / intra="split"; 20 in the 16-bit GPU default, else 0: off): as
    KDA's, the diagonal (BC, BC) tile of the scores / of the intra backward as dots where the sub-chunk's
    gates span at most that many nats (<= DIAG_LIM_MAX), the exact steps elsewhere.
    Under the interpreter: chunks of 16 (one sub-chunk) and whole-dimension blocks. The GPU values are
    from the H200 sweep below."""
    pk, pv = _pow2(dk), _pow2(dv)
    if device.type != "cuda":
        return dict(BT=16, BC=16, BK_H=pk, BV_H=pv, BV_O=pv, BV_B=pv, warps_h=1, warps_o=1, warps_b=1, stages=1)
    if dtype == torch.float32:
        return dict(BT=32, BC=16, BK_H=min(64, pk), BV_H=min(32, pv), BV_O=16, BV_B=16, warps_h=8, warps_o=8,
                    warps_b=8, stages=2)
    # 16-bit: the H200 sweep of 2026-12-04 (benchmarks/results/h200-2026-12-04/linear_sweep.txt, B=8 T=2048
    # H=16 D=128): 8 warps for the output / score kernels (forward 1.28 -> 1.21 ms) and 64-wide Dv blocks
    # in the backward loops (backward 4.55 -> 4.08 ms).
    # The split intra backward, 32-channel blocks, 2 warps (benchmarks/results/h200-2026-12-04-s2/
    # linear_sweep_log.txt: backward 3.95 -> 2.83 ms; 64-channel / 4 warps 2.85, 8 warps 2.90).
    # The state kernels round k (q) times its decay to 16 bits once (split_h=False, as flash-linear-attention
    # does) instead of the two-dot hi/lo split: B=8 T=2048 forward 1.125 -> 1.050 ms, backward 2.655 -> 2.576;
    # the GPU protocol check still passes (rel RMSE: final state 2.3e-6 -> 0.0016, d initial state 2.5e-6 ->
    # 0.0017, the rest unchanged at 0.0022-0.0029; benchmarks/results/h200-2026-12-04-s5/call2/).
    # The inter-chunk backward per 64-channel Dk block (dq, dk, dg; 4 warps) with dv in its own kernel:
    # backward 2.581 -> 2.470 ms (benchmarks/results/h200-2026-12-04-s5/call3/gla_inter_log.txt; 32 channels
    # 2.489, 8 warps 2.711, whole Dk 2.651).
    # The split scores (4 warps) and both diagonal tiles as dots where a sub-chunk's gates span <= 20 nats: H200
    # 2026-12-05, B=2 T=8192, forward 1.210 -> 0.794 ms, backward 2.744 -> 1.791 (8 warps 1.004 / 2.001;
    # benchmarks/results/h200-2026-12-05-s14/call1/kda_dot_log.txt).
    return dict(BT=64, BC=16, BK_H=min(64, pk), BV_H=min(64, pv), BV_O=min(64, pv), BV_B=min(64, pv),
                warps_h=4, warps_o=8, warps_b=8, stages=2, intra="split", BK_I=min(32, pk), warps_i=2,
                split_h=False, inter="split", BK_Q=min(64, pk), warps_q=4, intra_f="split", warps_f=4, diag_lim=20.0,
                diag_lim_b=20.0)


def check_diag_lim(cfg: dict, keys) -> None:
    """Each of ``keys`` in cfg (default 0): a number in [0, DIAG_LIM_MAX], else ValueError."""
    for key in keys:
        lim = cfg.get(key, 0.0)
        if isinstance(lim, bool) or not isinstance(lim, (int, float)) or not 0 <= lim <= DIAG_LIM_MAX:
            raise ValueError(f"{key} (the gate span up to which the diagonal tile runs as dots; 0: never) must be a "
                             f"number in [0, {DIAG_LIM_MAX}], got {lim!r}")


def _check_cfg(cfg: dict) -> None:
    if cfg.get("intra", "fused") not in ("fused", "split"):
        raise ValueError(f"intra must be 'fused' or 'split', got {cfg['intra']!r}")
    if cfg.get("intra_f", "fused") not in ("fused", "split"):
        raise ValueError(f"intra_f must be 'fused' or 'split', got {cfg['intra_f']!r}")
    if cfg.get("inter", "fused") not in ("fused", "split"):
        raise ValueError(f"inter must be 'fused' or 'split', got {cfg['inter']!r}")
    if cfg.get("diag", "steps") not in ("steps", "bcast"):
        raise ValueError(f"diag must be 'steps' or 'bcast', got {cfg['diag']!r}")
    check_diag_lim(cfg, ("diag_lim", "diag_lim_b"))
    if cfg.get("diag_lim", 0) > 0 and cfg.get("intra_f") != "split":
        raise ValueError(f"diag_lim needs intra_f='split', got intra_f={cfg.get('intra_f')!r}")
    if cfg.get("diag_lim_b", 0) > 0 and (cfg.get("intra") != "split" or cfg.get("diag") == "bcast"):
        raise ValueError("diag_lim_b needs intra='split' with the step diagonal (diag='steps'); got "
                         f"intra={cfg.get('intra')!r}, diag={cfg.get('diag', 'steps')!r}")
    if cfg.get("diag") == "bcast":
        bkd = cfg.get("BKD", 0)
        if bkd < 16 or bkd & (bkd - 1):
            raise ValueError(f"diag='bcast' needs BKD, a power of two >= 16 (channels per diagonal product), got {bkd}")
    for key in ("BT", "BC", "BK_H", "BV_H", "BV_O", "BV_B", "BK_I", "BK_Q", "BV_D"):
        if key not in cfg and key in ("BK_I", "BK_Q", "BV_D"):
            continue
        x = cfg[key]
        if x < 16 or x & (x - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {x}")
    if cfg["BC"] > cfg["BT"]:
        raise ValueError(f"the sub-chunk BC={cfg['BC']} must not exceed the chunk BT={cfg['BT']}")


@triton.jit
def _chunk_cumsum(G, GC, s_b, s_h, s_t, NH, T, DIMK, NT, BT: tl.constexpr, BK: tl.constexpr):
    # one (chunk, channel block, batch x head): a running sum down the chunk's BT steps, in order (so a
    # sum of non-positive gates never increases: rounding is monotone), zero gates past T
    n = tl.program_id(0)
    ik = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_k = ik * BK + tl.arange(0, BK)
    m_k = offs_k < DIMK
    src = G + b * s_b + h * s_h + offs_k
    dst = GC + (bh * NT * BT + n * BT) * DIMK + offs_k
    acc = tl.zeros([BK], dtype=tl.float32)
    for i in range(0, BT):
        t = n * BT + i
        acc += tl.load(src + t * s_t, mask=m_k & (offs_k * 0 + t < T), other=0.0).to(tl.float32)
        tl.store(dst + i * DIMK, acc, mask=m_k)


def chunk_cumsum(g: torch.Tensor, bt: int) -> torch.Tensor:
    """g (B, H, T, Dk) -> chunk-local inclusive cumsum, float32, contiguous (B*H, NT*BT, Dk), zero gates
    padded past T (so every row a kernel reads exists and G never increases inside a chunk).

    One Triton kernel (it replaced a PyTorch pad + cumsum + copy: three passes over g, ~0.16 ms of a 1.2 ms
    GLA forward at B 8, T 2048, H 16, Dk 128 on the H200); each program sums one chunk's steps in order,
    as the sequential scan it replaced."""
    b, h, t, dk = g.shape
    nt = triton.cdiv(t, bt)
    g = _last_unit(g)
    gc = torch.empty((b * h, nt * bt, dk), dtype=torch.float32, device=g.device)
    bk = min(128, _pow2(dk))
    _chunk_cumsum[(nt, triton.cdiv(dk, bk), b * h)](g, gc, g.stride(0), g.stride(1), g.stride(2), h, t, dk, nt,
                                                    BT=bt, BK=bk, num_warps=1)
    return gc


def _states(k, v, gc, s0, cfg, poison):
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    hs = _empty(poison, (b * h, nt, dk, dv), k.dtype, k.device)
    ht = _empty(poison, (b, h, dk, dv), torch.float32, k.device)
    bk, bv = min(cfg["BK_H"], _pow2(dk)), min(cfg["BV_H"], _pow2(dv))
    _fwd_h[(triton.cdiv(dk, bk), triton.cdiv(dv, bv), b * h)](
        k, v, gc, s0 if s0 is not None else ht, hs, ht,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, t, dk, dv, nt, BT=bt, BK=bk, BV=bv, HAS_H0=s0 is not None, SPLIT=_split_h(k.dtype, cfg),
        PREC=_prec(k.dtype), num_warps=cfg["warps_h"], num_stages=cfg["stages"])
    return hs, ht


def _split_h(dtype: torch.dtype, cfg: dict) -> bool:
    """Whether the two sequential state kernels split their float32 operand (k or q times its decay) into
    two 16-bit halves (two dots, about twice the mantissa) instead of one rounding: for 16-bit inputs when
    ``cfg["split_h"]`` is true or absent (the GPU config sets it False; float32 inputs have nothing to split)."""
    return dtype != torch.float32 and cfg.get("split_h", True)


def _scores(q, k, gc, scale, cfg, poison):
    """Run ``_intra_a``: scale * A, float32 (B*H, NT*BT, BT)."""
    b, h, t, dk = q.shape
    bt, bc = cfg["BT"], cfg["BC"]
    nt = triton.cdiv(t, bt)
    a = _empty(poison, (b * h, nt * bt, bt), torch.float32, q.device)
    if cfg.get("intra_f", "fused") == "split":
        # (BC, BC) tiles, the exact per-step loop on the diagonal tile only: KDA's score kernel without M
        from .triton_kda import _intra_split
        _intra_split[(nt * (bt // bc), b * h)](
            q, k, gc, a, a, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            h, t, dk, nt, float(scale), BT=bt, BC=bc, BK=_pow2(dk), SPLIT=False, PREC=_prec(q.dtype),
            WITH_KK=False, DIAG_LIM=float(cfg.get("diag_lim", 0.0)), num_warps=cfg.get("warps_f", 4),
            num_stages=cfg["stages"])
        return a
    _intra_a[(nt, bt // bc, b * h)](
        q, k, gc, a, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, t, dk, nt, float(scale), BT=bt, BC=bc, BK=_pow2(dk), PREC=_prec(q.dtype),
        BKD=min(cfg.get("BKD", 0), _pow2(dk)) if cfg.get("diag") == "bcast" else 0, num_warps=cfg["warps_o"],
        num_stages=cfg["stages"])
    return a


def fwd(q, k, v, g, s0, scale: float, cfg: dict | None = None, poison: bool = False, keep: bool | str = False):
    """-> (o (B, H, T, Dv) in q's dtype, final state (B, H, Dk, Dv) float32). No argument checks (see
    :func:`gla_triton`); g (B, H, T, Dk), s0 (B, H, Dk, Dv) or None. ``keep``: also return ``(gc, A)``, the
    chunk-local gate cumsum and the intra-chunk scores, which :func:`bwd` takes as ``kept`` instead of
    recomputing them (``_intra_a`` was about a sixth of a forward+backward on the H200; the cumsum is
    the size of g, which the backward then need not keep); ``keep="all"``: ``(gc, A, HS)``, also the chunk
    states, so that the backward does not run ``_fwd_h`` again."""
    q, k, v = (_last_unit(x) for x in (q, k, v))
    s0 = _state_in(s0)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        o = q.new_empty((b, h, 0, dv))
        ht = s0.clone() if s0 is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        return (o, ht, (q.new_empty((b * h, 0, dk), dtype=torch.float32),
                        q.new_empty((b * h, 0, 1), dtype=torch.float32))) if keep else (o, ht)
    cfg = cfg or fit_state_tiles(config(dk, dv, q.dtype, q.device), b * h, dict(BK_H=dk, BV_H=dv), q.device)
    _check_cfg(cfg)
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    gc = chunk_cumsum(g, bt)
    hs, ht = _states(k, v, gc, s0, cfg, poison)
    a = _scores(q, k, gc, scale, cfg, poison)
    o = _empty(poison, (b, h, t, dv), q.dtype, q.device)
    bv = min(cfg["BV_O"], _pow2(dv))
    _fwd_o[(nt, triton.cdiv(dv, bv), b * h)](
        q, v, gc, hs, a, o, q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bv,
        PREC=_prec(q.dtype), num_warps=cfg["warps_o"], num_stages=cfg["stages"])
    if not keep:
        return o, ht
    return o, ht, ((gc, a, hs) if keep == "all" else (gc, a))


def bwd(do, dht, q, k, v, g, s0, scale: float, cfg: dict | None = None, poison: bool = False, kept=None):
    """Gradients -> (dq, dk, dv, dg (B, H, T, Dk) float32, ds0 (B, H, Dk, Dv) float32).

    ``dht``: gradient of the final state, or None. ``ds0`` is returned even when s0 is None. ``kept``:
    the ``(gc, A)`` of ``fwd(..., keep=True)`` with the same cfg (g is then not read and may be None)."""
    q, k, v, do = (_last_unit(x) for x in (q, k, v, do))
    s0, dht = _state_in(s0), _state_in(dht)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        ds0 = dht.clone() if dht is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                q.new_zeros((b, h, 0, dk), dtype=torch.float32), ds0)
    cfg = cfg or fit_state_tiles(config(dk, dv, q.dtype, q.device), b * h, dict(BK_H=dk, BV_H=dv), q.device)
    _check_cfg(cfg)
    bt, bc = cfg["BT"], cfg["BC"]
    nt = triton.cdiv(t, bt)
    if kept is not None:
        gc, a = kept[:2]
        if (gc.shape != (b * h, nt * bt, dk) or a.shape != (b * h, nt * bt, bt)
                or (len(kept) > 2 and kept[2].shape != (b * h, nt, dk, dv))):
            raise ValueError("kept tensors do not match this cfg's chunk size (pass the cfg of the forward)")
    else:
        gc = chunk_cumsum(g, bt)
        a = _scores(q, k, gc, scale, cfg, poison)
    hs = kept[2] if kept is not None and len(kept) > 2 else _states(k, v, gc, s0, cfg, poison)[0]
    dhs = _empty(poison, (b * h, nt, dk, dv), hs.dtype, q.device)
    ds0 = _empty(poison, (b, h, dk, dv), torch.float32, q.device)
    bk, bvh = min(cfg["BK_H"], _pow2(dk)), min(cfg["BV_H"], _pow2(dv))
    _bwd_dh[(triton.cdiv(dk, bk), triton.cdiv(dv, bvh), b * h)](
        q, do, gc, dht if dht is not None else ds0, ds0, dhs,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, t, dk, dv, nt, float(scale), BT=bt, BK=bk, BV=bvh, HAS_DHT=dht is not None,
        SPLIT=_split_h(q.dtype, cfg), PREC=_prec(q.dtype), num_warps=cfg["warps_h"], num_stages=cfg["stages"])
    bvb = min(cfg["BV_B"], _pow2(dv))
    dqi = _empty(poison, (b * h, t, dk), torch.float32, q.device)
    dki = _empty(poison, (b * h, t, dk), torch.float32, q.device)
    if cfg.get("intra", "fused") == "split":
        da = _empty(poison, (b * h, nt * bt, bt), torch.float32, q.device)
        _bwd_da[(nt, b * h)](
            v, do, da, v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            h, t, dv, nt, float(scale), BT=bt, BV=bvb, PREC=_prec(q.dtype), num_warps=cfg["warps_b"],
            num_stages=cfg["stages"])
        bki = min(cfg.get("BK_I", 64), _pow2(dk))
        _bwd_intra_split[(triton.cdiv(dk, bki), nt * (bt // bc), b * h)](
            q, k, gc, da, dqi, dki, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            h, t, dk, nt, BT=bt, BC=bc, BK=bki, PREC=_prec(q.dtype), DIAG3=cfg.get("diag") == "bcast",
            DIAG_LIM=float(cfg.get("diag_lim_b", 0.0)), num_warps=cfg.get("warps_i", 4), num_stages=cfg["stages"])
    else:
        _bwd_intra[(nt, bt // bc, b * h)](
            q, k, v, gc, do, dqi, dki,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            h, t, dk, dv, nt, float(scale), BT=bt, BC=bc, BK=_pow2(dk), BV=bvb, PREC=_prec(q.dtype),
            num_warps=cfg["warps_b"], num_stages=cfg["stages"])
    dq, dk_, dv_ = (_empty(poison, x.shape, x.dtype, x.device) for x in (q, k, v))
    dg = _empty(poison, (b, h, t, dk), torch.float32, q.device)
    if cfg.get("inter", "fused") == "split":
        bkq = min(cfg.get("BK_Q", 64), _pow2(dk))
        _bwd_dqkg[(triton.cdiv(dk, bkq), nt, b * h)](
            q, k, v, gc, do, hs, dhs, dqi, dki, dq, dk_, dg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=bkq, BV=bvb,
            HAS_H0=s0 is not None, PREC=_prec(q.dtype), num_warps=cfg.get("warps_q", 4), num_stages=cfg["stages"])
        bvd = min(cfg.get("BV_D", 64), _pow2(dv))
        _bwd_dv[(nt, triton.cdiv(dv, bvd), b * h)](
            k, gc, dhs, a, do, dv_, k.stride(0), k.stride(1), k.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dv_.stride(0), dv_.stride(1), dv_.stride(2), h, t, dk, dv, nt, BT=bt, BK=min(64, _pow2(dk)), BV=bvd,
            PREC=_prec(q.dtype), num_warps=cfg.get("warps_q", 4), num_stages=cfg["stages"])
        return dq, dk_, dv_, dg, ds0
    _bwd_inter[(nt, b * h)](
        q, k, v, gc, do, hs, dhs, a, dqi, dki, dq, dk_, dv_, dg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dv_.stride(0), dv_.stride(1), dv_.stride(2),
        h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bvb, HAS_H0=s0 is not None,
        PREC=_prec(q.dtype), num_warps=cfg["warps_b"], num_stages=cfg["stages"])
    return dq, dk_, dv_, dg, ds0


# ----------------------------------------------------------------------------------------------------------
# custom ops and autograd
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("attnzoo::gla_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None,
            scale: float, keep_all: bool) -> list[torch.Tensor]:
    """-> [o, final state, gc, A] (+ [HS] with ``keep_all``): what follows the final state is kept for the
    backward (not differentiable)."""
    o, ht, kept = fwd(q, k, v, g, initial_state, scale, keep="all" if keep_all and q.shape[2] else True)
    return [o, ht, *kept]


def _kept_shapes(q, dv):
    b, h, t, dk = q.shape
    bt = config(dk, dv, q.dtype, q.device)["BT"] if t else 1
    tp = triton.cdiv(t, bt) * bt
    return (b * h, tp, dk), (b * h, tp, bt)


@_fwd_op.register_fake
def _(q, k, v, g, initial_state, scale, keep_all):
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    sg, sa = _kept_shapes(q, dv)
    f32 = torch.float32
    out = [q.new_empty((b, h, t, dv)), q.new_empty((b, h, dk, dv), dtype=f32), q.new_empty(sg, dtype=f32),
           q.new_empty(sa, dtype=f32)]
    if keep_all and t:
        out.append(q.new_empty((b * h, sa[1] // sa[2], dk, dv)))
    return out


@torch.library.custom_op("attnzoo::gla_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, dht: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            initial_state: torch.Tensor | None, scale: float, kept: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kept``: what ``_fwd_op`` returned after the final state ([gc, A] or [gc, A, HS])."""
    return bwd(do, dht, q, k, v, None, initial_state, scale, kept=tuple(kept))


@_bwd_op.register_fake
def _(do, dht, q, k, v, initial_state, scale, kept):
    b, h, t, dk = q.shape
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((b, h, t, dk), dtype=torch.float32), q.new_empty((b, h, dk, v.shape[-1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, s0, scale, _ = inputs
    kept = output[2:]
    ctx.mark_non_differentiable(*kept)
    ctx.save_for_backward(q, k, v, s0, *kept)
    ctx.scale = scale


def _backward(ctx, grads):
    do, dht = grads[0], grads[1]
    q, k, v, s0, *kept = ctx.saved_tensors
    dq, dk, dv, dg, ds0 = _bwd_op(do, dht, q, k, v, s0, ctx.scale, kept)
    return dq, dk, dv, dg, (ds0 if s0 is not None else None), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------

def gla_triton(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """GLA with the Triton kernels (differentiable in q, k, v, g, initial_state).

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv); float16, bfloat16 or float32 (one dtype); Dk, Dv <= 128.
        g: (B, H, T, Dk) log gates (computed in float32; <= 0 for the no-overflow guarantee, not checked).
        scale: multiplies q; default Dk ** -0.5.
        initial_state: (B, H, Dk, Dv) (used in float32), or None (zeros).
        output_final_state: also return the final state (float32).
    Returns ``(o (B, H, T, Dv) in q's dtype, final_state or None)``. Runs on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``.
    """
    _core.check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"the Triton GLA kernels take float16, bfloat16 or float32, got {q.dtype}")
    _core.check_gate("g", g, q.shape, "(batch, heads, length, key_dim)", q.device)
    _core.check_bool("output_final_state", output_final_state)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if max(dk, dv) > 128:
        raise ValueError(f"the Triton GLA kernels take head dims <= 128, got Dk={dk}, Dv={dv}")
    scale = _core.check_scale(scale, dk)
    if initial_state is not None:
        _core.check_state("initial_state", initial_state, (b, h, dk, dv), q.device)
        initial_state = initial_state.to(torch.float32)
    g = g.to(torch.float32)
    o, ht = _fwd_op(q, k, v, g, initial_state, scale, _keep(q, k, v, g, initial_state))[:2]
    return o, (ht if output_final_state else None)


def gla_chunk(q, k, v, g, scale: float, initial_state, offsets):
    """:func:`attnzoo.linear.gla` with mode="chunk" on the kernels (arguments already checked), per packed
    sequence when ``offsets`` is given. -> (o, final state float32)."""
    s0 = None if initial_state is None else initial_state.to(torch.float32)

    def fn(q, k, v, g, s):
        return tuple(_fwd_op(q, k, v, g, s, scale, _keep(q, k, v, g, s))[:2])

    return _core.run_sequences(fn, [q, k, v, g.to(torch.float32)], s0, offsets)
