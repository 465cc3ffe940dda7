"""Triton kernels for KDA (Kimi Delta Attention): the delta rule with a per-channel (vector) forget gate.

Recurrence per (batch, head), row-vector convention as in :mod:`attnzoo.linear._core`::

    S_t = (I - beta_t k_t^T k_t) Diag(exp g_t) S_{t-1} + beta_t k_t^T v_t,        o_t = scale * q_t S_t

q, k (B, H, T, Dk), v (B, H, T, Dv) in float16 / bfloat16 / float32, g (B, H, T, Dk) float32 log gates
(<= 0 for the no-overflow guarantee), beta (B, H, T) float32, state (B, H, Dk, Dv) float32, Dk, Dv <= 128.
The layout, the chunk sizes (:func:`attnzoo.linear.triton_delta.config`), the hi/lo split dots and the two
sequential state kernels (``_fwd_h`` / ``_bwd_dh`` with ``VEC=True``: per-row decays of the state) are those
of :mod:`attnzoo.linear.triton_delta`; read its docstring first. The per-channel gate changes the intra-chunk
matrices into gate-weighted products, computed as in :mod:`attnzoo.linear.triton_gla`.

Chunked form
------------
b: chunk-local inclusive cumsum of g per channel, (B*H, NT*BT, Dk) float32 padded with zero gates
(``triton_gla.chunk_cumsum``). Inside chunk n, with S the state before it, b_L the chunk's last row::

    M_ij  = sum_d k_id k_jd exp(b_id - b_jd)              (j < i),    A = diag(beta) M,   T = (I + A)^{-1}
    P_ij  = scale sum_d q_id k_jd exp(b_id - b_jd)        (j <= i)
    W     = T diag(beta) (K * exp(b)),   U0 = T diag(beta) V,   U = U0 - W S
    O     = scale (Q * exp(b)) S + P U
    S'    = Diag(exp b_L) S + (K * exp(b_L - b))^T U

Forward kernels: ``_intra`` (grid: chunk, sub-chunk, batch x head) writes P and M (float32 buffers) with the
sub-chunk scheme of ``triton_gla._intra_a`` (keys of earlier sub-chunks referenced to the step before the
sub-chunk, both factors exp of a non-positive number, one dot; the diagonal sub-chunk exact, one key step at
a time); ``_prep`` builds T (blocked forward substitution on the stored M), W and U0; ``triton_delta._fwd_h``
(VEC) walks the chunks; ``_fwd_o`` writes O.

Backward
--------
Given dO and dS' per chunk (``_bwd_dul``: dU = P^T dO; ``triton_delta._bwd_dh`` (VEC) adds
(K * exp(b_L - b)) dS', writes every dS' and d initial_state)::

    dW = -dU S^T,   dR = T^T [dU | dW],   dA = -(dR_v U0^T + dR_k W^T) (strict lower),   dM = diag(beta) dA
    dP = dO U^T (j <= i)

``_bwd_main`` (grid: chunk, batch x head) writes dv, dbeta, dP (scaled), dM and the parts of dq, dk and
dL/db that do not go through P or M (the state read, R_k = diag(beta)(K * exp b) and the state update:
dL/db_L += exp(b_L) * <S, dS'>_rows + sum_j f_j, dL/db_j -= f_j, f = K * exp(b_L - b) * (U dS'^T)).
``_bwd_intra`` (grid: chunk, sub-chunk, batch x head) adds the gate-weighted products through P and M, the
same sub-chunk scheme on both sides (rows: keys before the sub-chunk; columns: queries / keys after it,
referenced to the sub-chunk's last step), and their gate terms dL/db_i += q_i dq_i - k_i dk_i (per pair
side); with ``intra_b="split"`` (the 16-bit GPU default) ``_bwd_intra_split`` does the same per Dk block and
(BC, BC) tile. dg = chunk-local reverse cumsum of dL/db (``_chunk_rcumsum``, over the padded chunk so the
chunk-end term at b_L reaches every step). The forward's gate cumsum and P, M are kept for the backward, and
with ``triton_kernels.SAVE_INTERMEDIATES`` (when a gradient is wanted) also T, W, U0, U and the chunk states,
so that the backward runs no forward kernel; no atomics: deterministic.

Public: :func:`kda_triton` (differentiable in q, k, v, g, beta, initial_state through the custom ops
``attnzoo::kda_fwd`` / ``attnzoo::kda_bwd``) and :func:`kda_chunk` (what :func:`attnzoo.linear.kda` calls
for ``backend="triton"``). ``fwd`` / ``bwd`` launch the kernels directly (block sizes, NaN poisoning).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _core
from . import triton_delta as _td
from .triton_delta import _split_dot2, _state_side, _value_side
from .triton_gla import DIAG_LIM_MAX, _gate_span, chunk_cumsum, check_diag_lim  # noqa: F401
from .triton_kernels import _empty, _last_unit, _pow2, _prec, _split_dot, _state_in, fit_state_tiles

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# forward kernels (G: float32 (B*H, NT*BT, Dk); BETA float32 (B*H, T); AQK (= P), AKK (= M), TT: float32
# (B*H, NT*BT, BT); W, U0, U: (B*H, NT*BT, .) contiguous, padded to whole chunks)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _diag_column(qi, ki, gi, kbase, gbase, s_kt, tj, j, offs_i, offs_k, m_k, T, DIMK):
    """Column j (time tj) of the diagonal sub-chunk's scores, exact: sum_d x_id k_jd exp(G_id - G_jd) for
    the rows i >= j (q rows) and i > j (k rows), never exp of a positive number."""
    kj = tl.load(kbase + tj * s_kt + offs_k, mask=m_k & (offs_k * 0 + tj < T), other=0.0).to(tl.float32)
    gj = tl.load(gbase + tj * DIMK + offs_k, mask=m_k, other=0.0)
    kd = kj[None, :] * tl.exp(tl.where((offs_i >= j)[:, None], gi - gj[None, :], float("-inf")))
    return tl.sum(qi * kd, 1), tl.where(offs_i > j, tl.sum(ki * kd, 1), 0.0)


@triton.jit
def _diag_acc(aq, ak, qi, ki, gi, kbase, gbase, s_kt, n, p, jj, BT, BC, offs_i, offs_s, offs_k, m_k, T, DIMK):
    """Adds column jj of the diagonal (BC, BC) tile of sub-chunk p (`_diag_column`) to aq / ak."""
    j = p * BC + jj
    cq, ck = _diag_column(qi, ki, gi, kbase, gbase, s_kt, n * BT + j, j, offs_i, offs_k, m_k, T, DIMK)
    sel = (offs_s == jj)[None, :]
    return aq + tl.where(sel, cq[:, None], 0.0), ak + tl.where(sel, ck[:, None], 0.0)


@triton.jit
def _diag_steps(aq, ak, qi, ki, gi, kbase, gbase, s_kt, n, p, BT, BC, offs_i, offs_s, offs_k, m_k, T, DIMK,
                UNROLL: tl.constexpr):
    """The diagonal (BC, BC) tile of sub-chunk p, exact, one key step at a time (`_diag_acc`), UNROLL steps
    unrolled per loop iteration."""
    for j0 in range(0, BC, UNROLL):
        for u in tl.static_range(UNROLL):
            aq, ak = _diag_acc(aq, ak, qi, ki, gi, kbase, gbase, s_kt, n, p, j0 + u, BT, BC, offs_i, offs_s, offs_k,
                               m_k, T, DIMK)
    return aq, ak


@triton.jit
def _intra(Q, K, G, AQK, AKK,
           s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
           NH, T, DIMK, NT, scale,
           BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
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
    m_ik = (ti < T)[:, None] & m_k[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    kc = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=(tc < T)[:, None] & m_k[None, :], other=0.0)
    gc = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    # keys of earlier sub-chunks, referenced to r = the step before sub-chunk p
    gr = tl.load(gbase + (n * BT + tl.maximum(p * BC - 1, 0)) * DIMK + offs_k, mask=m_k, other=0.0)
    gr = tl.where(p > 0, gr, 0.0)
    before = offs_c < p * BC
    kr = kc.to(tl.float32) * tl.exp(tl.where(before[:, None], gr[None, :] - gc, float("-inf")))
    ei = tl.exp(gi - gr[None, :])
    krt = tl.trans(kr)
    aqk = _split_dot2(qi * ei, krt, tl.zeros([BC, BT], dtype=tl.float32), kc, SPLIT, PREC)
    akk = _split_dot2(ki * ei, krt, tl.zeros([BC, BT], dtype=tl.float32), kc, SPLIT, PREC)
    for jj in range(0, BC):  # the diagonal sub-chunk, exact, one key step at a time
        j = p * BC + jj
        cq, ck = _diag_column(qi, ki, gi, kbase, gbase, s_kt, n * BT + j, j, offs_i, offs_k, m_k, T, DIMK)
        sel = (offs_c == j)[None, :]
        aqk += tl.where(sel, cq[:, None], 0.0)
        akk += tl.where(sel, ck[:, None], 0.0)
    off = (bh * NT * BT + n * BT + offs_i)[:, None] * BT + offs_c[None, :]
    tl.store(AQK + off, (aqk * scale).to(AQK.dtype.element_ty))
    tl.store(AKK + off, akk)


@triton.jit
def _intra_split(Q, K, G, AQK, AKK,
                 s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                 NH, T, DIMK, NT, scale,
                 BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                 BKD: tl.constexpr = 0, WITH_KK: tl.constexpr = True, UNROLL: tl.constexpr = 1,
                 DIAG_LIM: tl.constexpr = 0.0):
    # _intra by (BC, BC) tiles: the rows of sub-chunk p against each earlier sub-chunk (one dot per tile,
    # referenced to gn = G at p's first row), the diagonal tile by the exact per-step loop, zero tiles after
    # it. grid (chunk x sub-chunk, batch x head); same outputs as _intra (cfg intra="split"). Without WITH_KK
    # only P (= GLA's scale * A; triton_gla's cfg intra_f="split"), AKK not touched.
    n = tl.program_id(0) // (BT // BC)
    p = tl.program_id(0) % (BT // BC)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_s = tl.arange(0, BC)
    offs_i = p * BC + offs_s
    offs_k = tl.arange(0, BK)
    m_k = offs_k < DIMK
    ti = n * BT + offs_i
    m_ik = (ti < T)[:, None] & m_k[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    gn = tl.load(gbase + (n * BT + p * BC) * DIMK + offs_k, mask=m_k, other=0.0)
    ei = tl.exp(gi - gn[None, :])
    qe = qi * ei
    ke = ki * ei
    rows = (bh * NT * BT + ti)[:, None] * BT
    for jc in range(0, p):
        offs_j = jc * BC + offs_s
        tj = n * BT + offs_j
        kj = tl.load(kbase + tj[:, None] * s_kt + offs_k[None, :], mask=(tj < T)[:, None] & m_k[None, :], other=0.0)
        gj = tl.load(gbase + tj[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        krt = tl.trans(kj.to(tl.float32) * tl.exp(gn[None, :] - gj))
        aq = _split_dot2(qe, krt, tl.zeros([BC, BC], dtype=tl.float32), kj, SPLIT, PREC)
        tl.store(AQK + rows + offs_j[None, :], (aq * scale).to(AQK.dtype.element_ty))
        if WITH_KK:
            ak = _split_dot2(ke, krt, tl.zeros([BC, BC], dtype=tl.float32), kj, SPLIT, PREC)
            tl.store(AKK + rows + offs_j[None, :], ak)
    aq = tl.zeros([BC, BC], dtype=tl.float32)
    ak = tl.zeros([BC, BC], dtype=tl.float32)
    if BKD > 0:
        # the diagonal tile, exact, as one (BC, BC, BKD) broadcast product per BKD channels (cfg diag="bcast")
        low = (offs_s[:, None] >= offs_s[None, :])[:, :, None]
        m_t = (ti < T)[:, None]
        for d0 in range(0, BK, BKD):
            offs_d = d0 + tl.arange(0, BKD)
            m_d = (offs_d < DIMK)[None, :]
            qd = tl.load(qbase + ti[:, None] * s_qt + offs_d[None, :], mask=m_t & m_d, other=0.0).to(tl.float32)
            kd = tl.load(kbase + ti[:, None] * s_kt + offs_d[None, :], mask=m_t & m_d, other=0.0).to(tl.float32)
            gd = tl.load(gbase + ti[:, None] * DIMK + offs_d[None, :], mask=m_d, other=0.0)
            kdec = kd[None, :, :] * tl.exp(tl.where(low, gd[:, None, :] - gd[None, :, :], float("-inf")))
            aq += tl.sum(qd[:, None, :] * kdec, 2)
            ak += tl.sum(kd[:, None, :] * kdec, 2)
        ak = tl.where(offs_s[:, None] > offs_s[None, :], ak, 0.0)  # strictly below the diagonal
    elif DIAG_LIM > 0:
        # the diagonal tile as one dot per matrix, referenced to gn like the earlier sub-chunks, when the
        # sub-chunk's gates span at most DIAG_LIM (every factor exp(G_n - G_j) <= exp(DIAG_LIM), cfg diag_lim);
        # else the exact steps
        if _gate_span(gn[None, :] - gi, m_ik) <= DIAG_LIM:
            kft = tl.trans(tl.where(m_ik, ki * tl.exp(gn[None, :] - gi), 0.0))
            ref = tl.zeros([BC, BK], dtype=K.dtype.element_ty)
            low = offs_s[:, None] >= offs_s[None, :]
            aq = tl.where(low, _split_dot2(qe, kft, aq, ref, SPLIT, PREC), 0.0)
            ak = tl.where(offs_s[:, None] > offs_s[None, :], _split_dot2(ke, kft, ak, ref, SPLIT, PREC), 0.0)
        else:
            aq, ak = _diag_steps(aq, ak, qi, ki, gi, kbase, gbase, s_kt, n, p, BT, BC, offs_i, offs_s, offs_k, m_k,
                                 T, DIMK, UNROLL)
    else:  # the diagonal tile, exact, one key step at a time, UNROLL steps unrolled per loop iteration
        aq, ak = _diag_steps(aq, ak, qi, ki, gi, kbase, gbase, s_kt, n, p, BT, BC, offs_i, offs_s, offs_k, m_k, T,
                             DIMK, UNROLL)
    tl.store(AQK + rows + offs_i[None, :], (aq * scale).to(AQK.dtype.element_ty))
    if WITH_KK:
        tl.store(AKK + rows + offs_i[None, :], ak)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for jc in range(p + 1, BT // BC):
        offs_j = jc * BC + offs_s
        tl.store(AQK + rows + offs_j[None, :], zero.to(AQK.dtype.element_ty))
        if WITH_KK:
            tl.store(AKK + rows + offs_j[None, :], zero)


@triton.jit
def _intra_chunk(Q, K, G, AQK, AKK,
                 s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                 NH, T, DIMK, NT, scale,
                 BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # _intra_split's scores with one program per chunk (cfg intra="chunk"; grid: chunk, batch x head) over
    # BK-channel blocks: below the diagonal blocks, per key sub-chunk c one (BT, BK) x (BK, BT) product with
    # the gate factor split at c's last row e (q_i exp(G_i - G_e) for the rows after c, k_j exp(G_e - G_j) for
    # the keys of c, zero elsewhere); the diagonal blocks' BC exact steps for all sub-chunks together into a
    # (BT, BC) tile stored at the columns (sub-chunk, step); zeros above the diagonal blocks.
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_s = tl.arange(0, BC)
    tc = n * BT + offs_c
    m_t = tc < T
    sub = offs_c // BC  # each row's sub-chunk
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    aq = tl.zeros([BT, BT], dtype=tl.float32)
    ak = tl.zeros([BT, BT], dtype=tl.float32)
    dgq = tl.zeros([BT, BC], dtype=tl.float32)  # the diagonal blocks: row i, step jj of its sub-chunk
    dgk = tl.zeros([BT, BC], dtype=tl.float32)
    for d0 in range(0, DIMK, BK):
        offs_k = d0 + tl.arange(0, BK)
        m_k = offs_k < DIMK
        m_tk = m_t[:, None] & m_k[None, :]
        kraw = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
        q = tl.load(qbase + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        k = kraw.to(tl.float32)
        g = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        for c in range(0, BT // BC - 1):
            ge = tl.load(gbase + (n * BT + c * BC + BC - 1) * DIMK + offs_k, mask=m_k, other=0.0)
            f = tl.exp(tl.where((sub > c)[:, None], g - ge[None, :], float("-inf")))
            kct = tl.trans(k * tl.exp(tl.where((sub == c)[:, None], ge[None, :] - g, float("-inf"))))
            aq = _split_dot2(q * f, kct, aq, kraw, SPLIT, PREC)
            ak = _split_dot2(k * f, kct, ak, kraw, SPLIT, PREC)
        for jj in range(0, BC):
            s = sub * BC + jj
            ts = n * BT + s
            ks = tl.load(kbase + ts[:, None] * s_kt + offs_k[None, :], mask=(ts < T)[:, None] & m_k[None, :],
                         other=0.0).to(tl.float32)
            gs = tl.load(gbase + ts[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
            kd = ks * tl.exp(tl.where((offs_c >= s)[:, None], g - gs, float("-inf")))
            sel = (offs_s == jj)[None, :]
            dgq += tl.where(sel, tl.sum(q * kd, 1)[:, None], 0.0)
            dgk += tl.where(sel, tl.where(offs_c > s, tl.sum(k * kd, 1), 0.0)[:, None], 0.0)
    rows = (bh * NT * BT + tc)[:, None] * BT
    off_diag = (offs_c[None, :] // BC) != sub[:, None]  # two stores, no element written twice
    tl.store(AQK + rows + offs_c[None, :], (aq * scale).to(AQK.dtype.element_ty), mask=off_diag)
    tl.store(AKK + rows + offs_c[None, :], ak, mask=off_diag)
    cols = rows + sub[:, None] * BC + offs_s[None, :]
    tl.store(AQK + cols, (dgq * scale).to(AQK.dtype.element_ty))
    tl.store(AKK + cols, dgk)


@triton.jit
def _prep(AKK, K, V, BETA, G, TT, W, U0,
          s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
          NH, T, DIMK, DIMV, NT,
          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
          STORE_T: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
          INV: tl.constexpr = False, WU: tl.constexpr = True):
    # INV: T by block doubling (triton_delta._tri_inv) from the whole of A, instead of row blocks of BC steps.
    # WU=False (cfg prep="split"): T only (STORE_T), W and U0 left to triton_delta._wu (VEC)
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_r = tl.arange(0, BC)
    offs_k = tl.arange(0, BK)
    tc = n * BT + offs_c
    m_c = tc < T
    m_k = offs_k < DIMK
    beta = tl.load(BETA + bh * T + tc, mask=m_c, other=0.0)
    abase = AKK + (bh * NT * BT + n * BT) * BT
    # T = (I + A)^{-1}, A = diag(beta) M, by row blocks of BC steps (as triton_delta._prep)
    tinv = tl.zeros([BT, BT], dtype=tl.float32)
    eye = tl.where(offs_r[:, None] == offs_r[None, :], 1.0, 0.0)
    if INV:  # A = diag(beta) M, its strictly lower part
        a = tl.load(abase + offs_c[:, None] * BT + offs_c[None, :]) * beta[:, None]
        tinv = _td._tri_inv(tl.where(offs_c[:, None] > offs_c[None, :], a, 0.0), offs_c, BT, PREC_T)
    for p in range(0, 0 if INV else BT // BC):
        offs_i = p * BC + offs_r
        bp = tl.load(BETA + bh * T + n * BT + offs_i, mask=n * BT + offs_i < T, other=0.0)
        ap = tl.load(abase + offs_i[:, None] * BT + offs_c[None, :]) * bp[:, None]
        app = tl.load(abase + offs_i[:, None] * BT + offs_i[None, :]) * bp[:, None]
        lin = eye
        for r in range(1, BC):
            ar = tl.sum(tl.where(offs_r[:, None] == r, app, 0.0), 0)
            lin = lin - tl.where(offs_r[:, None] == r, tl.sum(ar[:, None] * lin, 0)[None, :], 0.0)
        z = tl.where(offs_c[None, :] == offs_i[:, None], 1.0, 0.0) - tl.dot(ap, tinv, input_precision=PREC_T)
        rows = tl.dot(lin, z, input_precision=PREC_T)
        place = tl.where(offs_c[:, None] == offs_i[None, :], 1.0, 0.0)
        tinv += tl.dot(place, rows, input_precision="ieee")
    if STORE_T:
        tl.store(TT + (bh * NT * BT + tc)[:, None] * BT + offs_c[None, :], tinv)
    if WU:
        rowoff = (bh * NT * BT + tc)[:, None]
        # K and the gates only now (not held through the inverse)
        k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :],
                    mask=m_c[:, None] & m_k[None, :], other=0.0)
        gc = tl.load(G + (bh * NT * BT + tc)[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        _td._store_w(k, tl.exp(gc), beta, tinv, W, rowoff, offs_k, m_k, DIMK, BT, BK, SPLIT, PREC)
        _td._store_u0(V + b * s_vb + h * s_vh, U0, tc, m_c, rowoff, s_vt, beta, tinv, 0, tl.cdiv(DIMV, BV), DIMV, BT,
                      BV, SPLIT, PREC)


@triton.jit
def _fwd_o(Q, G, HS, U, AQK, O, QE,
           s_qb, s_qh, s_qt, s_ob, s_oh, s_ot,
           NH, T, DIMK, DIMV, NT, scale,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
           PRE: tl.constexpr = False):
    # PRE: the state read's rows scale * q * exp(b) from _gate_rows (QE, (B*H, NT*BT, Dk), the same float32
    # expression rounded to QE's dtype) instead of q and the gate cumsum, which every Dv block read again
    n = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_t = tc < T
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    rowoff = (bh * NT * BT + tc)[:, None]
    if PRE:
        qg = tl.load(QE + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    else:
        q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :],
                    mask=m_t[:, None] & m_k[None, :], other=0.0)
        g = tl.load(G + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        qg = q.to(tl.float32) * tl.exp(g) * scale
    u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
    hs = tl.load(HS + (bh * NT + n) * DIMK * DIMV + offs_k[:, None] * DIMV + offs_v[None, :],
                 mask=m_k[:, None] & m_v[None, :], other=0.0)
    a = tl.load(AQK + rowoff * BT + offs_c[None, :])
    o = _split_dot(qg, hs, tl.zeros([BT, BV], dtype=tl.float32), SPLIT, PREC)
    o = _split_dot(a, u, o, SPLIT, PREC)
    tl.store(O + b * s_ob + h * s_oh + tc[:, None] * s_ot + offs_v[None, :], o.to(O.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_dul(AQK, DO, DU, U, DAQ, s_db, s_dh, s_dt, NH, T, DIMV, NT, scale,
             BT: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, DP: tl.constexpr = False):
    # DU <- P^T dO (float32), one Dv block per program; DP (cfg dp="dul"): every Dv block in one program per
    # chunk, which also forms dP = dO U^T and stores DAQ = scale dP (causal), _bwd_main's otherwise
    n = tl.program_id(0)
    iv0 = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    rowoff = (bh * NT * BT + tc)[:, None]
    at = tl.trans(tl.load(AQK + rowoff * BT + offs_c[None, :]))
    dp = tl.zeros([BT, BT], dtype=tl.float32)
    if DP:
        hi = tl.cdiv(DIMV, BV)
    else:
        hi = iv0 + 1
    for iv in range(iv0, hi):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        do = tl.load(DO + b * s_db + h * s_dh + tc[:, None] * s_dt + offs_v[None, :],
                     mask=(tc < T)[:, None] & m_v[None, :], other=0.0)
        du = _split_dot(at, do, tl.zeros([BT, BV], dtype=tl.float32), SPLIT, PREC)
        tl.store(DU + rowoff * DIMV + offs_v[None, :], du, mask=m_v[None, :])
        if DP:
            u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
            dp = tl.dot(do.to(u.dtype), tl.trans(u), dp, input_precision=PREC)
    if DP:
        tl.store(DAQ + rowoff * BT + offs_c[None, :],
                 tl.where(offs_c[:, None] >= offs_c[None, :], dp * scale, 0.0).to(DAQ.dtype.element_ty))


@triton.jit
def _bwd_main(Q, K, V, BETA, G, DO, TT, W, U0, U, DU, HS, DHS, AKK, DQP, DKP, DB, DAQ, DM, DVV, DBETA,
              s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_yb, s_yh, s_yt,
              NH, T, DIMK, DIMV, NT, scale,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
              DP: tl.constexpr = True):
    # DQP, DKP, DB: float32 (B*H, NT*BT, Dk) partials; DAQ (scale dP), DM: float32 (B*H, NT*BT, BT); without DP
    # (cfg dp="dul") dP and DAQ are _bwd_dul's
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    offs_k = tl.arange(0, BK)
    m_t = tc < T
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    rowoff = (bh * NT * BT + tc)[:, None]
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    tt = tl.load(TT + rowoff * BT + offs_c[None, :])
    ttt = tl.trans(tt)
    if not SPLIT:  # rounded once to the dot dtype (U's, the input dtype) instead of in every Dv block
        ttt = ttt.to(U.dtype.element_ty)
    # q, k and the gate cumsum are read after the Dv loop, where they are used: live through the loop they took
    # registers from its accumulators (with T^T dW below: 1160 -> 248 B of stack per thread, ptxas sm_90)
    dp = tl.zeros([BT, BT], dtype=tl.float32)    # do_i . u_j
    da = tl.zeros([BT, BT], dtype=tl.float32)    # dL/dA (before the strict-lower mask)
    dqh = tl.zeros([BT, BK], dtype=tl.float32)   # do S^T
    dkh = tl.zeros([BT, BK], dtype=tl.float32)   # u dS'^T
    drk = tl.zeros([BT, BK], dtype=tl.float32)   # T^T dW = -(T^T dU) S^T, by Dv block
    dbeta = tl.zeros([BT], dtype=tl.float32)
    ip = tl.zeros([BK], dtype=tl.float32)        # <S, dS'> per key channel (row of the state)
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    hbase = (bh * NT + n) * DIMK * DIMV
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        m_tv = m_t[:, None] & m_v[None, :]
        v = tl.load(vbase + tc[:, None] * s_vt + offs_v[None, :], mask=m_tv, other=0.0)
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_tv, other=0.0)
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        u0 = tl.load(U0 + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        du = tl.load(DU + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        sk = hbase + offs_k[:, None] * DIMV + offs_v[None, :]
        hs = tl.load(HS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dhs = tl.load(DHS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        if DP:
            dp = tl.dot(do.to(u.dtype), tl.trans(u), dp, input_precision=PREC)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
        dkh = tl.dot(u.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        drv = _split_dot2(ttt, du, tl.zeros([BT, BV], dtype=tl.float32), u, SPLIT, PREC)  # T^T dU
        drk = _split_dot(-drv, tl.trans(hs), drk, SPLIT, PREC)
        tl.store(DVV + b * s_yb + h * s_yh + tc[:, None] * s_yt + offs_v[None, :],
                 (drv * beta[:, None]).to(DVV.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(drv * v.to(tl.float32), 1)
        da = _split_dot(-drv, tl.trans(u0), da, SPLIT, PREC)
        ip += tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1)
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    gc = tl.load(G + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    gl = tl.load(G + (bh * NT * BT + n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    w = tl.load(W + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    da = _split_dot(-drk, tl.trans(w), da, SPLIT, PREC)
    aoff = rowoff * BT + offs_c[None, :]
    if DP:
        tl.store(DAQ + aoff, tl.where(offs_c[:, None] >= offs_c[None, :], dp * scale, 0.0).to(DAQ.dtype.element_ty))
    da = tl.where(offs_c[:, None] > offs_c[None, :], da, 0.0)
    mkk = tl.load(AKK + aoff)
    dbeta += tl.sum(da * mkk, 1)
    tl.store(DM + aoff, (da * beta[:, None]).to(DM.dtype.element_ty))
    eb = tl.exp(gc)
    qf = q.to(tl.float32)
    kf = k.to(tl.float32)
    # the state read: o += scale (Q * exp b) S
    dq = dqh * eb * scale
    db = qf * dq
    # R_k = diag(beta) (K * exp b)
    t = drk * kf * eb
    dk = drk * eb * beta[:, None]
    dbeta += tl.sum(t, 1)
    db += t * beta[:, None]
    # the state update: S' = Diag(exp b_L) S + (K * exp(b_L - b))^T U
    dks = dkh * tl.exp(gl[None, :] - gc)
    dk += dks
    f = kf * dks
    db += tl.where((offs_c == BT - 1)[:, None], (tl.exp(gl) * ip + tl.sum(f, 0))[None, :], 0.0) - f
    poff = rowoff * DIMK + offs_k[None, :]
    tl.store(DQP + poff, dq.to(DQP.dtype.element_ty), mask=m_k[None, :])
    tl.store(DKP + poff, dk.to(DKP.dtype.element_ty), mask=m_k[None, :])
    tl.store(DB + poff, db, mask=m_k[None, :])
    tl.store(DBETA + bh * T + tc, dbeta, mask=m_t)


@triton.jit
def _bwd_main_seq(Q, K, V, BETA, G, DO, TT, W, U0, U, DU, HS, DHS, AKK, DQP, DKP, DB, DAQ, DM, DVV, DBETA,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_yb, s_yh, s_yt,
                  NH, T, DIMK, DIMV, NT, scale,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # _bwd_main's math in three passes over the Dv blocks (cfg main="seq"; as Gated DeltaNet's): 1. dW, T^T dU
    # -> dv, DM, dbeta and the R part of dk and db; 2. dP, dO S^T -> DAQ, DQP and the read's part of db;
    # 3. U dS'^T -> the state update's part of dk and db (DKP, DB stored). Same signature and outputs.
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    offs_k = tl.arange(0, BK)
    m_t = tc < T
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    rowoff = (bh * NT * BT + tc)[:, None]
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    goff = rowoff * DIMK + offs_k[None, :]
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    hbase = (bh * NT + n) * DIMK * DIMV
    aoff = rowoff * BT + offs_c[None, :]
    # pass 1: the triangular system and R = [diag(beta) (K * exp b) | diag(beta) V]
    ttt = tl.trans(tl.load(TT + aoff))
    if not SPLIT:  # rounded once, not in every Dv step
        ttt = ttt.to(k.dtype)
    da = tl.zeros([BT, BT], dtype=tl.float32)    # dL/dA (before the strict-lower mask)
    dw = tl.zeros([BT, BK], dtype=tl.float32)    # -dU S^T
    dbeta = tl.zeros([BT], dtype=tl.float32)
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        m_tv = m_t[:, None] & m_v[None, :]
        v = tl.load(vbase + tc[:, None] * s_vt + offs_v[None, :], mask=m_tv, other=0.0)
        u0 = tl.load(U0 + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        du = tl.load(DU + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        hs = tl.load(HS + hbase + offs_k[:, None] * DIMV + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                     other=0.0)
        dw = _split_dot(-du, tl.trans(hs), dw, SPLIT, PREC)
        drv = _split_dot2(ttt, du, tl.zeros([BT, BV], dtype=tl.float32), k, SPLIT, PREC)  # T^T dU
        tl.store(DVV + b * s_yb + h * s_yh + tc[:, None] * s_yt + offs_v[None, :],
                 (drv * beta[:, None]).to(DVV.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(drv * v.to(tl.float32), 1)
        da = _split_dot(-drv, tl.trans(u0), da, SPLIT, PREC)
    drk = _split_dot2(ttt, dw, tl.zeros([BT, BK], dtype=tl.float32), k, SPLIT, PREC)     # T^T dW
    w = tl.load(W + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    da = _split_dot(-drk, tl.trans(w), da, SPLIT, PREC)
    da = tl.where(offs_c[:, None] > offs_c[None, :], da, 0.0)
    dbeta += tl.sum(da * tl.load(AKK + aoff), 1)
    tl.store(DM + aoff, (da * beta[:, None]).to(DM.dtype.element_ty))
    eb = tl.exp(tl.load(G + goff, mask=m_k[None, :], other=0.0))
    t = drk * k.to(tl.float32) * eb
    dk = drk * eb * beta[:, None]
    tl.store(DBETA + bh * T + tc, dbeta + tl.sum(t, 1), mask=m_t)
    db = t * beta[:, None]
    # pass 2: the state read, o += scale (Q * exp b) S, and dP for the intra-chunk kernel
    dp = tl.zeros([BT, BT], dtype=tl.float32)    # do_i . u_j
    dqh = tl.zeros([BT, BK], dtype=tl.float32)   # do S^T
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        hs = tl.load(HS + hbase + offs_k[:, None] * DIMV + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                     other=0.0)
        dp = tl.dot(do.to(u.dtype), tl.trans(u), dp, input_precision=PREC)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
    tl.store(DAQ + aoff, tl.where(offs_c[:, None] >= offs_c[None, :], dp * scale, 0.0).to(DAQ.dtype.element_ty))
    eb = tl.exp(tl.load(G + goff, mask=m_k[None, :], other=0.0))
    dq = dqh * eb * scale
    tl.store(DQP + goff, dq.to(DQP.dtype.element_ty), mask=m_k[None, :])
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    db += q.to(tl.float32) * dq
    # pass 3: the state update, S' = Diag(exp b_L) S + (K * exp(b_L - b))^T U
    dkh = tl.zeros([BT, BK], dtype=tl.float32)   # u dS'^T
    ip = tl.zeros([BK], dtype=tl.float32)        # <S, dS'> per key channel (row of the state)
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        sk = hbase + offs_k[:, None] * DIMV + offs_v[None, :]
        hs = tl.load(HS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dhs = tl.load(DHS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dkh = tl.dot(u.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        ip += tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1)
    gl = tl.load(G + (bh * NT * BT + n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    dks = dkh * tl.exp(gl[None, :] - tl.load(G + goff, mask=m_k[None, :], other=0.0))
    dk += dks
    f = k.to(tl.float32) * dks
    db += tl.where((offs_c == BT - 1)[:, None], (tl.exp(gl) * ip + tl.sum(f, 0))[None, :], 0.0) - f
    tl.store(DKP + goff, dk.to(DKP.dtype.element_ty), mask=m_k[None, :])
    tl.store(DB + goff, db, mask=m_k[None, :])


@triton.jit
def _bwd_main_k(Q, K, BETA, G, DO, TT, W, U, DU, HS, DHS, DQP, DKP, DB, DAK, RP,
                s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_db, s_dh, s_dt,
                NH, T, DIMK, DIMV, NT, scale,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # _bwd_main's per-channel half for one Dk block (cfg main="split"; grid: chunk, Dk block, batch x head): the
    # (BT, BK) accumulators over a Dv loop, then every per-channel partial (DQP, DKP, DB, as _bwd_main writes
    # them), this block's share of dA (DAK: float32 (NK, B*H*NT*BT, BT)) and of dbeta (RP: float32
    # (NK, B*H*NT*BT)); _bwd_main_v does the rest
    n = tl.program_id(0)
    ik = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    offs_k = ik * BK + tl.arange(0, BK)
    m_t = tc < T
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    rowoff = (bh * NT * BT + tc)[:, None]
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    dqh, dkh, drk, ip = _state_side(DO, U, DU, HS, DHS, TT, W, DAK, b, h, bh, n, ik, tc, m_t, rowoff, offs_c, offs_k,
                                    m_k, k, s_db, s_dh, s_dt, NT, DIMK, DIMV, BT, BK, BV, SPLIT, PREC)
    rows = tl.num_programs(2) * NT * BT
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    gc = tl.load(G + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    gl = tl.load(G + (bh * NT * BT + n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    eb = tl.exp(gc)
    kf = k.to(tl.float32)
    dq = dqh * eb * scale
    db = q.to(tl.float32) * dq
    t = drk * kf * eb
    dk = drk * eb * beta[:, None]
    tl.store(RP + ik * rows + bh * NT * BT + tc, tl.sum(t, 1))
    db += t * beta[:, None]
    dks = dkh * tl.exp(gl[None, :] - gc)
    dk += dks
    f = kf * dks
    db += tl.where((offs_c == BT - 1)[:, None], (tl.exp(gl) * ip + tl.sum(f, 0))[None, :], 0.0) - f
    poff = rowoff * DIMK + offs_k[None, :]
    tl.store(DQP + poff, dq.to(DQP.dtype.element_ty), mask=m_k[None, :])
    tl.store(DKP + poff, dk.to(DKP.dtype.element_ty), mask=m_k[None, :])
    tl.store(DB + poff, db, mask=m_k[None, :])


@triton.jit
def _bwd_main_v(V, BETA, DO, TT, U0, U, DU, AKK, DAK, RP, DAQ, DM, DVV, DBETA,
                s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_yb, s_yh, s_yt,
                NH, T, DIMV, NT, NK, scale,
                BT: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # the rest of _bwd_main (cfg main="split"; grid: chunk, batch x head): dv, dbeta, DAQ (scale dP) and DM
    # (diag(beta) dA), dA completed with the Dk blocks' shares of _bwd_main_k
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    m_t = tc < T
    rowoff = (bh * NT * BT + tc)[:, None]
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    ttt = tl.trans(tl.load(TT + rowoff * BT + offs_c[None, :]))
    dp, da, dbeta = _value_side(V, DO, U, U0, DU, DVV, b, h, tc, m_t, rowoff, ttt, beta, s_vb, s_vh, s_vt,
                                s_db, s_dh, s_dt, s_yb, s_yh, s_yt, DIMV, BT, BV, SPLIT, PREC)
    rows = tl.num_programs(1) * NT * BT
    for ik in range(0, NK):
        da += tl.load(DAK + ik * rows * BT + rowoff * BT + offs_c[None, :])
        dbeta += tl.load(RP + ik * rows + bh * NT * BT + tc)
    aoff = rowoff * BT + offs_c[None, :]
    tl.store(DAQ + aoff, tl.where(offs_c[:, None] >= offs_c[None, :], dp * scale, 0.0).to(DAQ.dtype.element_ty))
    da = tl.where(offs_c[:, None] > offs_c[None, :], da, 0.0)
    dbeta += tl.sum(da * tl.load(AKK + aoff), 1)
    tl.store(DM + aoff, (da * beta[:, None]).to(DM.dtype.element_ty))
    tl.store(DBETA + bh * T + tc, dbeta, mask=m_t)


@triton.jit
def _bwd_intra_out(DQP, DKP, DB, DQ, DKK, poff, xoff, m_k, m_out, q, k, dqi, dkr, dkp, dkc):
    """The intra backward kernels' end: dq = DQP + dqi, dk = DKP + dkp + dkr + dkc (written in DQ's / DKK's
    dtype where m_out); returns dL/db = DB + q dqi + k (dkr - dkp - dkc) (float32 partials at poff)."""
    dq = tl.load(DQP + poff, mask=m_k[None, :], other=0.0).to(tl.float32) + dqi
    dk = tl.load(DKP + poff, mask=m_k[None, :], other=0.0).to(tl.float32) + dkp + dkr + dkc
    db = tl.load(DB + poff, mask=m_k[None, :], other=0.0) + q.to(tl.float32) * dqi \
        + k.to(tl.float32) * (dkr - dkp - dkc)
    tl.store(DQ + xoff, dq.to(DQ.dtype.element_ty), mask=m_out)
    tl.store(DKK + xoff, dk.to(DKK.dtype.element_ty), mask=m_out)
    return db


@triton.jit
def _bwd_intra_finish(DQP, DKP, DB, DQ, DKK, poff, xoff, m_k, m_out, q, k, dqi, dkr, dkp, dkc):
    """`_bwd_intra_out`, dL/db written back to DB in place."""
    db = _bwd_intra_out(DQP, DKP, DB, DQ, DKK, poff, xoff, m_k, m_out, q, k, dqi, dkr, dkp, dkc)
    tl.store(DB + poff, db, mask=m_k[None, :])


@triton.jit
def _bwd_intra(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK,
               s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_xb, s_xh, s_xt,
               NH, T, DIMK, NT,
               BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # the gate-weighted products through P (DAQ = scale dP) and M (DM = diag(beta) dA) for the rows of
    # sub-chunk p; adds them to the partials and writes dq, dk (s_x*: their strides) and DB (in place)
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
    m_ik = (ti < T)[:, None] & m_k[None, :]
    m_ck = (tc < T)[:, None] & m_k[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    abase = (bh * NT * BT + n * BT) * BT
    qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    qc = tl.load(qbase + tc[:, None] * s_qt + offs_k[None, :], mask=m_ck, other=0.0)
    kc = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_ck, other=0.0)
    gc = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    # row side, keys j of earlier sub-chunks (reference r = the step before sub-chunk p)
    gr = tl.load(gbase + (n * BT + tl.maximum(p * BC - 1, 0)) * DIMK + offs_k, mask=m_k, other=0.0)
    gr = tl.where(p > 0, gr, 0.0)
    kr = kc.to(tl.float32) * tl.exp(tl.where((offs_c < p * BC)[:, None], gr[None, :] - gc, float("-inf")))
    daq_r = tl.load(DAQ + abase + offs_i[:, None] * BT + offs_c[None, :])     # (BC, BT)
    dm_r = tl.load(DM + abase + offs_i[:, None] * BT + offs_c[None, :])
    ei = tl.exp(gi - gr[None, :])
    dqi = _split_dot2(daq_r, kr, tl.zeros([BC, BK], dtype=tl.float32), kc, SPLIT, PREC) * ei
    dkr = _split_dot2(dm_r, kr, tl.zeros([BC, BK], dtype=tl.float32), kc, SPLIT, PREC) * ei
    # column side, rows i of later sub-chunks (reference e = the last step of sub-chunk p)
    ge = tl.load(gbase + (n * BT + p * BC + BC - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    ee = tl.exp(tl.where((offs_c > p * BC + BC - 1)[:, None], gc - ge[None, :], float("-inf")))
    daq_c = tl.load(DAQ + abase + offs_c[:, None] * BT + offs_i[None, :])     # (BT, BC)
    dm_c = tl.load(DM + abase + offs_c[:, None] * BT + offs_i[None, :])
    ej = tl.exp(ge[None, :] - gi)
    dkp = _split_dot2(tl.trans(daq_c), qc.to(tl.float32) * ee, tl.zeros([BC, BK], dtype=tl.float32), kc,
                      SPLIT, PREC) * ej
    dkc = _split_dot2(tl.trans(dm_c), kc.to(tl.float32) * ee, tl.zeros([BC, BK], dtype=tl.float32), kc,
                      SPLIT, PREC) * ej
    # the diagonal sub-chunk, exact, one step s at a time (as key on the row side, as query / key on the other)
    for jj in range(0, BC):
        s = p * BC + jj
        m_s = m_k & (offs_k * 0 + n * BT + s < T)
        ks = tl.load(kbase + (n * BT + s) * s_kt + offs_k, mask=m_s, other=0.0).to(tl.float32)
        qs = tl.load(qbase + (n * BT + s) * s_qt + offs_k, mask=m_s, other=0.0).to(tl.float32)
        gs = tl.load(gbase + (n * BT + s) * DIMK + offs_k, mask=m_k, other=0.0)
        dr = tl.exp(tl.where((offs_i >= s)[:, None], gi - gs[None, :], float("-inf")))   # rows i >= s
        a_col = tl.load(DAQ + abase + offs_i * BT + s)
        m_col = tl.load(DM + abase + offs_i * BT + s)
        dqi += a_col[:, None] * ks[None, :] * dr
        dkr += m_col[:, None] * ks[None, :] * dr
        dc = tl.exp(tl.where((offs_i <= s)[:, None], gs[None, :] - gi, float("-inf")))   # columns j <= s
        a_row = tl.load(DAQ + abase + s * BT + offs_i)
        m_row = tl.load(DM + abase + s * BT + offs_i)
        dkp += a_row[:, None] * qs[None, :] * dc
        dkc += m_row[:, None] * ks[None, :] * dc
    _bwd_intra_finish(DQP, DKP, DB, DQ, DKK, (bh * NT * BT + ti)[:, None] * DIMK + offs_k[None, :],
                      b * s_xb + h * s_xh + ti[:, None] * s_xt + offs_k[None, :], m_k, m_ik, qi, ki, dqi, dkr, dkp,
                      dkc)


@triton.jit
def _bwd_diag_step(dqi, dkr, dkp, dkc, qbase, kbase, gbase, DAQ, DM, abase, s_qt, s_kt, gi, n, s, BT, offs_i,
                   offs_k, m_k, T, DIMK):
    """Step s of `_bwd_intra_split`'s diagonal tile: exp(G_i - G_s) where i >= s, exp(G_s - G_i) where i < s
    (one exp per element for both sides, as triton_gla._bwd_diag_steps)."""
    m_s = m_k & (offs_k * 0 + n * BT + s < T)
    ks = tl.load(kbase + (n * BT + s) * s_kt + offs_k, mask=m_s, other=0.0).to(tl.float32)
    qs = tl.load(qbase + (n * BT + s) * s_qt + offs_k, mask=m_s, other=0.0).to(tl.float32)
    gs = tl.load(gbase + (n * BT + s) * DIMK + offs_k, mask=m_k, other=0.0)
    return _diag_update(dqi, dkr, dkp, dkc, ks[None, :], qs[None, :], gs[None, :], gi, DAQ, DM, abase, offs_i, s,
                        BT)


@triton.jit
def _diag_update(dqi, dkr, dkp, dkc, ks, qs, gs, gi, DAQ, DM, abase, offs_i, s, BT):
    """One diagonal step of the intra backward for rows offs_i against step rows s (a scalar, or one per row):
    ks, qs, gs the step rows' k, q, G ((1, BK) or one row per row), gi the rows' G."""
    x = gi - gs
    lo = (offs_i >= s)[:, None]
    ex = tl.exp(tl.where(lo, x, -x))
    el = tl.where(lo, ex, 0.0)
    eu = tl.where((offs_i <= s)[:, None], ex, 0.0)
    a_col = tl.load(DAQ + abase + offs_i * BT + s)
    m_col = tl.load(DM + abase + offs_i * BT + s)
    a_row = tl.load(DAQ + abase + s * BT + offs_i)
    m_row = tl.load(DM + abase + s * BT + offs_i)
    return (dqi + a_col[:, None] * ks * el, dkr + m_col[:, None] * ks * el,
            dkp + a_row[:, None] * qs * eu, dkc + m_row[:, None] * ks * eu)


@triton.jit
def _bwd_diag_steps(dqi, dkr, dkp, dkc, qbase, kbase, gbase, DAQ, DM, abase, s_qt, s_kt, gi, n, p, BT, BC, offs_i,
                    offs_k, m_k, T, DIMK, UNROLL: tl.constexpr):
    """`_bwd_intra_split`'s diagonal tile, exact, one step s at a time, UNROLL steps unrolled per loop iteration
    (so that their loads, rows of q, k, G and of the two dA tiles, need not wait for the step before)."""
    for j0 in range(0, BC, UNROLL):
        for u in tl.static_range(UNROLL):
            dqi, dkr, dkp, dkc = _bwd_diag_step(dqi, dkr, dkp, dkc, qbase, kbase, gbase, DAQ, DM, abase, s_qt, s_kt,
                                                gi, n, p * BC + j0 + u, BT, offs_i, offs_k, m_k, T, DIMK)
    return dqi, dkr, dkp, dkc


@triton.jit
def _bwd_diag_dot(dqi, dkr, dkp, dkc, qi, ki, gi, gn, ge, er, ec, DAQ, DM, abase, offs_i, offs_s, m_i, m_ik,
                  BT, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """`_bwd_intra_split`'s diagonal tile by four dots: row side sum_{j <= i} dA_ij k_j exp(G_n - G_j), scaled by
    er = exp(G_i - G_n); column side sum_{s >= i} dA_si x_s exp(G_s - G_e), scaled by ec = exp(G_e - G_i) (every
    exponent <= the sub-chunk's gate span). The (BC, BC) dA tiles are read once, lower triangle, valid rows and
    columns only."""
    keep = (offs_s[:, None] >= offs_s[None, :]) & m_i[:, None] & m_i[None, :]
    tile = abase + offs_i[:, None] * BT + offs_i[None, :]
    daq = tl.where(keep, tl.load(DAQ + tile), 0.0)
    dm = tl.where(keep, tl.load(DM + tile), 0.0)
    qf = qi.to(tl.float32)
    kf = ki.to(tl.float32)
    ref = tl.zeros([BC, BK], dtype=ki.dtype)
    kn = tl.where(m_ik, kf * tl.exp(gn[None, :] - gi), 0.0)
    eg = tl.where(m_ik, tl.exp(gi - ge[None, :]), 0.0)
    z = tl.zeros([BC, BK], dtype=tl.float32)
    dqi += er * _split_dot2(daq, kn, z, ref, SPLIT, PREC)
    dkr += er * _split_dot2(dm, kn, z, ref, SPLIT, PREC)
    dkp += ec * _split_dot2(tl.trans(daq), qf * eg, z, ref, SPLIT, PREC)
    dkc += ec * _split_dot2(tl.trans(dm), kf * eg, z, ref, SPLIT, PREC)
    return dqi, dkr, dkp, dkc


@triton.jit
def _bwd_intra_sub(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_xb, s_xh, s_xt,
                   NH, T, DIMK, NT, ik, n, p, bh,
                   BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                   UNROLL: tl.constexpr, DIAG_LIM: tl.constexpr):
    """`_bwd_intra_split` for sub-chunk p of chunk n, Dk block ik: writes dq, dk of its BC rows and returns
    their dL/db, a (BC, BK) float32 tile."""
    b = bh // NH
    h = bh % NH
    offs_s = tl.arange(0, BC)
    offs_i = p * BC + offs_s
    ti = n * BT + offs_i
    m_i = ti < T
    offs_k = ik * BK + tl.arange(0, BK)
    m_k = offs_k < DIMK
    m_ik = m_i[:, None] & m_k[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    abase = (bh * NT * BT + n * BT) * BT
    qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0)
    ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_ik, other=0.0)
    gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    # row side: dq_i, dk_i through P_ij and M_ij for keys j of earlier sub-chunks
    gn = tl.load(gbase + (n * BT + p * BC) * DIMK + offs_k, mask=m_k, other=0.0)
    dqi = tl.zeros([BC, BK], dtype=tl.float32)
    dkr = tl.zeros([BC, BK], dtype=tl.float32)
    for jc in range(0, p):
        offs_j = jc * BC + offs_s
        tj = n * BT + offs_j
        kj = tl.load(kbase + tj[:, None] * s_kt + offs_k[None, :], mask=(tj < T)[:, None] & m_k[None, :], other=0.0)
        gj = tl.load(gbase + tj[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        kg = kj.to(tl.float32) * tl.exp(gn[None, :] - gj)
        dqi = _split_dot2(tl.load(DAQ + abase + offs_i[:, None] * BT + offs_j[None, :]), kg, dqi, kj, SPLIT, PREC)
        dkr = _split_dot2(tl.load(DM + abase + offs_i[:, None] * BT + offs_j[None, :]), kg, dkr, kj, SPLIT, PREC)
    e = tl.exp(gi - gn[None, :])
    dqi = dqi * e
    dkr = dkr * e
    # column side: dk_i through P_ji (queries j) and M_ji (keys j) of later sub-chunks
    ge = tl.load(gbase + (n * BT + p * BC + BC - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    dkp = tl.zeros([BC, BK], dtype=tl.float32)
    dkc = tl.zeros([BC, BK], dtype=tl.float32)
    for jc in range(p + 1, BT // BC):
        offs_j = jc * BC + offs_s
        tj = n * BT + offs_j
        m_jk = (tj < T)[:, None] & m_k[None, :]
        qj = tl.load(qbase + tj[:, None] * s_qt + offs_k[None, :], mask=m_jk, other=0.0)
        kj = tl.load(kbase + tj[:, None] * s_kt + offs_k[None, :], mask=m_jk, other=0.0)
        gj = tl.load(gbase + tj[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        eg = tl.exp(gj - ge[None, :])
        daq = tl.load(DAQ + abase + offs_j[:, None] * BT + offs_i[None, :])  # P[j, i]
        dm = tl.load(DM + abase + offs_j[:, None] * BT + offs_i[None, :])
        dkp = _split_dot2(tl.trans(daq), qj.to(tl.float32) * eg, dkp, qj, SPLIT, PREC)
        dkc = _split_dot2(tl.trans(dm), kj.to(tl.float32) * eg, dkc, kj, SPLIT, PREC)
    ec = tl.exp(ge[None, :] - gi)
    dkp = dkp * ec
    dkc = dkc * ec
    if DIAG_LIM > 0:
        # the diagonal tile as dots (cfg diag_lim_b), row side referenced to gn, column side to ge, as the tiles
        # before and after it, when the sub-chunk's gates span at most DIAG_LIM; else the exact steps
        span = tl.maximum(_gate_span(gn[None, :] - gi, m_ik), _gate_span(gi - ge[None, :], m_ik))
        if span <= DIAG_LIM:
            dqi, dkr, dkp, dkc = _bwd_diag_dot(dqi, dkr, dkp, dkc, qi, ki, gi, gn, ge, e, ec, DAQ, DM, abase, offs_i,
                                               offs_s, m_i, m_ik, BT, BC, BK, SPLIT, PREC)
        else:
            dqi, dkr, dkp, dkc = _bwd_diag_steps(dqi, dkr, dkp, dkc, qbase, kbase, gbase, DAQ, DM, abase, s_qt, s_kt,
                                                 gi, n, p, BT, BC, offs_i, offs_k, m_k, T, DIMK, UNROLL)
    else:
        dqi, dkr, dkp, dkc = _bwd_diag_steps(dqi, dkr, dkp, dkc, qbase, kbase, gbase, DAQ, DM, abase, s_qt, s_kt, gi,
                                             n, p, BT, BC, offs_i, offs_k, m_k, T, DIMK, UNROLL)
    return _bwd_intra_out(DQP, DKP, DB, DQ, DKK, (bh * NT * BT + ti)[:, None] * DIMK + offs_k[None, :],
                          b * s_xb + h * s_xh + ti[:, None] * s_xt + offs_k[None, :], m_k, m_ik, qi, ki, dqi, dkr,
                          dkp, dkc)

@triton.jit
def _dg_rows(DG, db, carry, bh, T, DIMK, t0, offs_k, m_k, BC: tl.constexpr):
    """dg of the BC rows from t0 (cfg rc): the reverse cumsum of their dL/db tile plus ``carry``, the column sums
    of the rows after them in the chunk, stored where t < T; -> the carry for the rows before them."""
    t = t0 + tl.arange(0, BC)
    tl.store(DG + (bh * T + t)[:, None] * DIMK + offs_k[None, :], tl.cumsum(db, 0, reverse=True) + carry[None, :],
             mask=(t < T)[:, None] & m_k[None, :])
    return carry + tl.sum(db, 0)


@triton.jit
def _bwd_intra_split(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK, DG, CARRY,
                     s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_xb, s_xh, s_xt,
                     NH, T, DIMK, NT, P_RC,
                     BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                     UNROLL: tl.constexpr = 1, DIAG_LIM: tl.constexpr = 0.0, RC: tl.constexpr = 0):
    # _bwd_intra by (BC, BC) tiles over one Dk block (cfg intra_b="split"; grid: Dk block, chunk x sub-chunk,
    # batch x head): the rows of sub-chunk p against each earlier sub-chunk (referenced to gn = G at p's first
    # row) and against each later one (referenced to ge = G at p's last row), one dot per tile and matrix
    # (P and M share the key operand), the diagonal tile exact one step at a time with one exp per element
    # for both sides; then the partials of _bwd_main, as _bwd_intra, dL/db back to DB.
    # RC (cfg rc; grid: Dk block, chunk, batch x head): dg, the chunk-local reverse cumsum of dL/db (the padded
    # rows included, as _chunk_rcumsum), written to DG (B, H, T, Dk) here: DB is read once and neither written
    # back nor read again. RC 1 (rc="loop"): one program walks the chunk's sub-chunks from the last to the
    # first. RC 2 (rc="launches"): one launch per sub-chunk P_RC, last to first, the column sums of the
    # sub-chunks after it carried in CARRY (float32 (B*H, NT, Dk), read and written back by the same program)
    ik = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64)
    offs_k = ik * BK + tl.arange(0, BK)
    m_k = offs_k < DIMK
    if RC == 2:
        n = tl.program_id(1)
        p = P_RC
        db = _bwd_intra_sub(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                            s_xb, s_xh, s_xt, NH, T, DIMK, NT, ik, n, p, bh, BT, BC, BK, SPLIT, PREC, UNROLL, DIAG_LIM)
        cptr = CARRY + (bh * NT + n) * DIMK + offs_k
        carry = tl.load(cptr, mask=m_k & (offs_k * 0 + P_RC < BT // BC - 1), other=0.0)
        tl.store(cptr, _dg_rows(DG, db, carry, bh, T, DIMK, n * BT + p * BC, offs_k, m_k, BC), mask=m_k)
    elif RC == 1:
        n = tl.program_id(1)
        carry = tl.zeros([BK], dtype=tl.float32)
        for r in tl.range(0, BT // BC, loop_unroll_factor=1):
            p = BT // BC - 1 - r
            db = _bwd_intra_sub(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                                s_xb, s_xh, s_xt, NH, T, DIMK, NT, ik, n, p, bh, BT, BC, BK, SPLIT, PREC, UNROLL,
                                DIAG_LIM)
            carry = _dg_rows(DG, db, carry, bh, T, DIMK, n * BT + p * BC, offs_k, m_k, BC)
    else:
        n = tl.program_id(1) // (BT // BC)
        p = tl.program_id(1) % (BT // BC)
        db = _bwd_intra_sub(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                            s_xb, s_xh, s_xt, NH, T, DIMK, NT, ik, n, p, bh, BT, BC, BK, SPLIT, PREC, UNROLL, DIAG_LIM)
        rows = bh * NT * BT + n * BT + p * BC + tl.arange(0, BC)
        tl.store(DB + rows[:, None] * DIMK + offs_k[None, :], db, mask=m_k[None, :])


@triton.jit
def _bwd_intra_chunk(Q, K, G, DAQ, DM, DQP, DKP, DB, DQ, DKK,
                     s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_xb, s_xh, s_xt,
                     NH, T, DIMK, NT,
                     BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # _bwd_intra_split's sums with one program per chunk and BK-channel block (cfg intra_b="chunk"; grid: Dk
    # block, chunk, batch x head): the whole chunk's BT rows at once, (BT, BK) tiles instead of (BC, BK) ones.
    # Across sub-chunks the gate factor exp(G_i - G_j) splits at a row between them: for keys of sub-chunk c
    # (row side) at c's last row e, exp(G_i - G_e) * exp(G_e - G_j); for queries / keys of sub-chunk p (column
    # side) at p's first row r, exp(G_i - G_r) * exp(G_r - G_j); every exponent <= 0. The diagonal tiles run
    # their BC steps for all sub-chunks together: step jj reads, for each row, the row jj of its own sub-chunk.
    ik = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_s = tl.arange(0, BC)
    tc = n * BT + offs_c
    m_t = tc < T
    offs_k = ik * BK + tl.arange(0, BK)
    m_k = offs_k < DIMK
    m_tk = m_t[:, None] & m_k[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT * DIMK
    abase = (bh * NT * BT + n * BT) * BT
    q = tl.load(qbase + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    g = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    sub = offs_c // BC  # each row's sub-chunk
    dqi = tl.zeros([BT, BK], dtype=tl.float32)
    dkr = tl.zeros([BT, BK], dtype=tl.float32)
    dkp = tl.zeros([BT, BK], dtype=tl.float32)
    dkc = tl.zeros([BT, BK], dtype=tl.float32)
    for c in range(0, BT // BC - 1):
        # row side: dq_i, dk_i through P_ij and M_ij for the keys j of sub-chunk c and the rows i after it
        tj = n * BT + c * BC + offs_s
        kj = tl.load(kbase + tj[:, None] * s_kt + offs_k[None, :], mask=(tj < T)[:, None] & m_k[None, :], other=0.0)
        gj = tl.load(gbase + tj[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        ge = tl.load(gbase + (n * BT + c * BC + BC - 1) * DIMK + offs_k, mask=m_k, other=0.0)
        kg = kj.to(tl.float32) * tl.exp(ge[None, :] - gj)
        fr = tl.exp(tl.where((sub > c)[:, None], g - ge[None, :], float("-inf")))
        cols = abase + offs_c[:, None] * BT + (c * BC + offs_s)[None, :]           # P[i, j], (BT, BC)
        zero = tl.zeros([BT, BK], dtype=tl.float32)
        dqi += _split_dot2(tl.load(DAQ + cols), kg, zero, kj, SPLIT, PREC) * fr
        dkr += _split_dot2(tl.load(DM + cols), kg, zero, kj, SPLIT, PREC) * fr
    for p in range(1, BT // BC):
        # column side: dk_j through P_ij (queries i) and M_ij (keys i) of sub-chunk p, for the keys j before it
        ti = n * BT + p * BC + offs_s
        m_ik = (ti < T)[:, None] & m_k[None, :]
        qi = tl.load(qbase + ti[:, None] * s_qt + offs_k[None, :], mask=m_ik, other=0.0)
        ki = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_ik, other=0.0)
        gi = tl.load(gbase + ti[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        gr = tl.load(gbase + (n * BT + p * BC) * DIMK + offs_k, mask=m_k, other=0.0)
        ei = tl.exp(gi - gr[None, :])
        fc = tl.exp(tl.where((sub < p)[:, None], gr[None, :] - g, float("-inf")))
        rows = abase + (p * BC + offs_s)[:, None] * BT + offs_c[None, :]            # P[i, j], (BC, BT)
        zero = tl.zeros([BT, BK], dtype=tl.float32)
        dkp += _split_dot2(tl.trans(tl.load(DAQ + rows)), qi.to(tl.float32) * ei, zero, qi, SPLIT, PREC) * fc
        dkc += _split_dot2(tl.trans(tl.load(DM + rows)), ki.to(tl.float32) * ei, zero, ki, SPLIT, PREC) * fc
    # the diagonal tiles, exact, every sub-chunk's step jj at once: row i against s = its sub-chunk's row jj,
    # exp(G_i - G_s) where i >= s, exp(G_s - G_i) where i < s (one exp per element for both sides)
    for jj in range(0, BC):
        s = sub * BC + jj
        ts = n * BT + s
        m_s = (ts < T)[:, None] & m_k[None, :]
        ks = tl.load(kbase + ts[:, None] * s_kt + offs_k[None, :], mask=m_s, other=0.0).to(tl.float32)
        qs = tl.load(qbase + ts[:, None] * s_qt + offs_k[None, :], mask=m_s, other=0.0).to(tl.float32)
        gs = tl.load(gbase + ts[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        dqi, dkr, dkp, dkc = _diag_update(dqi, dkr, dkp, dkc, ks, qs, gs, g, DAQ, DM, abase, offs_c, s, BT)
    _bwd_intra_finish(DQP, DKP, DB, DQ, DKK, (bh * NT * BT + tc)[:, None] * DIMK + offs_k[None, :],
                      b * s_xb + h * s_xh + tc[:, None] * s_xt + offs_k[None, :], m_k, m_tk, q, k, dqi, dkr, dkp,
                      dkc)


@triton.jit
def _gate_rows(K, Q, G, KE, QE, s_kb, s_kh, s_kt, s_qb, s_qh, s_qt, NH, T, DIMK, NT, scale, GIN, s_gb, s_gh, s_gt,
               BT: tl.constexpr, BK: tl.constexpr, WITH_Q: tl.constexpr, CUMSUM: tl.constexpr = False):
    # KE = k * exp(b_L - b) and (WITH_Q) QE = scale * q * exp(b), (B*H, NT*BT, Dk) in KE's / QE's dtype (the dot
    # dtype, or float32 for the hi/lo split), zero rows past T: the per-channel gate factors of the two
    # sequential state kernels (triton_delta._fwd_h / _bwd_dh with PRE), computed once per element by the
    # same float32 expressions instead of once per Dv block. Grid (chunk, Dk block, batch x head).
    # CUMSUM (cfg gc="rows"): the chunk-local gate cumsum b formed here from the log gates GIN (B, H, T, Dk; zero
    # past T) and written to G, instead of read from G after triton_gla.chunk_cumsum wrote it (one pass over
    # the float32 gates fewer)
    n = tl.program_id(0)
    ik = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_k = ik * BK + tl.arange(0, BK)
    tc = n * BT + offs_c
    m_k = offs_k < DIMK
    m_tk = (tc < T)[:, None] & m_k[None, :]
    rowoff = (bh * NT * BT + tc)[:, None] * DIMK + offs_k[None, :]
    if CUMSUM:
        graw = tl.load(GIN + b * s_gb + h * s_gh + tc[:, None] * s_gt + offs_k[None, :], mask=m_tk, other=0.0)
        gc = tl.cumsum(graw.to(tl.float32), 0)
        tl.store(G + rowoff, gc, mask=m_k[None, :])
        gl = tl.sum(tl.where((offs_c == BT - 1)[:, None], gc, 0.0), 0)  # the last row, bit for bit
    else:
        gc = tl.load(G + rowoff, mask=m_k[None, :], other=0.0)
        gl = tl.load(G + (bh * NT * BT + n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    tl.store(KE + rowoff, (k.to(tl.float32) * tl.exp(gl[None, :] - gc)).to(KE.dtype.element_ty), mask=m_k[None, :])
    if WITH_Q:
        q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
        tl.store(QE + rowoff, (q.to(tl.float32) * tl.exp(gc) * scale).to(QE.dtype.element_ty), mask=m_k[None, :])


def _gated_rows(k, q, gc, scale, bt, split, poison, g=None):
    """Run ``_gate_rows``: -> (KE, QE, or None without q) for the state kernels' PRE mode; float32 when the
    state kernels split their float32 operands (``split``), else the dot dtype. With the log gates ``g``
    (B, H, T, Dk) and ``gc`` None: -> (gc, (KE, QE)), the gate cumsum formed by the same kernel."""
    b, h, t, dk = k.shape
    nt = triton.cdiv(t, bt)
    dt = torch.float32 if split else k.dtype
    ke = _empty(poison, (b * h, nt * bt, dk), dt, k.device)
    qe = _empty(poison, (b * h, nt * bt, dk), dt, k.device) if q is not None else None
    bk = min(64, _pow2(dk))
    qq = q if q is not None else k
    cumsum = gc is None
    if cumsum:
        g = _last_unit(g)
        gc = _empty(poison, (b * h, nt * bt, dk), torch.float32, k.device)
    gin = g if cumsum else gc
    _gate_rows[(nt, triton.cdiv(dk, bk), b * h)](
        k, qq, gc, ke, qe if qe is not None else ke, k.stride(0), k.stride(1), k.stride(2),
        qq.stride(0), qq.stride(1), qq.stride(2), h, t, dk, nt, float(scale),
        gin, *(g.stride()[:3] if cumsum else (0, 0, 0)), BT=bt, BK=bk, WITH_Q=q is not None, CUMSUM=cumsum,
        num_warps=8 if bk >= 64 else 4)  # no register spills at 64 channels / 8 warps (ptxas sm_90)
    return (gc, (ke, qe)) if cumsum else (ke, qe)


@triton.jit
def _chunk_rcumsum(DB, DG, NH, T, DIMK, NT, BT: tl.constexpr, BK: tl.constexpr):
    # dg = chunk-local reverse inclusive cumsum of DB (float32 (B*H, NT*BT, Dk), padded chunks) into
    # DG (B, H, T, Dk) contiguous: one (chunk, channel block, batch x head) program walks its BT steps
    # backwards, summing the padded steps too (the chunk-end term at b_L reaches every step)
    n = tl.program_id(0)
    ik = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_k = ik * BK + tl.arange(0, BK)
    m_k = offs_k < DIMK
    src = DB + (bh * NT * BT + n * BT) * DIMK + offs_k
    dst = DG + bh * T * DIMK + offs_k
    acc = tl.zeros([BK], dtype=tl.float32)
    for r in range(0, BT):
        i = BT - 1 - r
        t = n * BT + i
        acc += tl.load(src + i * DIMK, mask=m_k, other=0.0)
        tl.store(dst + t * DIMK, acc, mask=m_k & (offs_k * 0 + t < T))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def config(dk: int, dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The chunk and block sizes of :func:`attnzoo.linear.triton_delta.config` (BC: the sub-chunk of the
    gate-weighted products, 16). Optional ``intra``: "fused" (default, ``_intra``: one program per
    sub-chunk computing its whole (BC, BT) row block) or "split" (``_intra_split``: one (BC, BC) dot per
    earlier sub-chunk, the exact loop on the diagonal tile only, with ``warps_i`` warps; the 16-bit GPU
    default: B=8 T=2048 H16 D128 on the H200, forward 2.07 -> 1.70 ms, backward 6.37 -> 6.01 ms with 2 warps,
    benchmarks/results/h200-2026-12-04-s2/linear_sweep_log.txt). The other GPU values: the Gated DeltaNet
    sweep (KDA agreed). "chunk" (``_intra_chunk``, opt-in, not yet timed on a GPU): one program per chunk over
    BK_F-channel blocks, warps_i warps, every sub-chunk at once (no spills at 64 / 8 warps, ptxas sm_90).
    Opt-in, not yet timed: ``diag="bcast"`` with ``BKD`` (split intra only): the diagonal
    tile as (BC, BC, BKD) broadcast products instead of BC dependent key steps. ``intra_b``: "fused"
    (``_bwd_intra``, one program per sub-chunk over the whole Dk) or "split" (``_bwd_intra_split``: per
    sub-chunk and ``BK_I``-channel block, one dot per (BC, BC) tile, ``warps_ib`` warps); the 16-bit GPU
    default is split, 32 channels, 4 warps (H200, H16 D128: backward 5.663 -> 5.018 ms at B=8 T=2048,
    6.520 -> 5.862 at B=2 T=8192; benchmarks/results/h200-2026-12-04-s6/call2/kda_ib_log.txt), or "chunk"
    (``_bwd_intra_chunk``: per chunk and BK_I-channel block, all sub-chunks at once in (BT, BK_I) tiles, four
    times the work per program; no spills at 32 / 8 warps, 138 registers, ptxas sm_90; opt-in, not yet timed on
    a GPU). ``pre`` (the
    16-bit GPU default since the H100 run of 2026-12-05): the sequential state kernels read the gate factors
    k * exp(b_L - b), scale * q * exp(b) from ``_gate_rows`` (one parallel pass) instead of every Dv-block
    program computing them (same bits; ``_bwd_dh`` with per-channel gates took 1.62 ms against Gated
    DeltaNet's 0.48 at B=2 T=8192 H16 D128, benchmarks/results/h200-2026-12-04-s6/call3/linear_sdpa_log.txt).
    ``main`` (opt-in; "fused" by default, see below): "split" runs ``_bwd_main`` as ``_bwd_main_k`` (per
    BK_M-channel Dk block: the per-channel partials and the block's shares of dA and dbeta) and
    ``_bwd_main_v`` (dv, dbeta, dP, dA), Dv blocks BV_M, warps_mk / warps_mv warps: no register spills at 32 /
    32 / 8 / 8 against about 1.2 KB per thread for the fused kernel (ptxas sm_90, Triton 3.9, arguments marked
    divisible by 16 as a launch does); "seq" as Gated DeltaNet's, slower here. ``unroll_i`` /
    ``unroll_ib`` (split kernels only; 1 by default, a power of two <= BC): the diagonal tile's BC dependent key
    steps unrolled that many per loop iteration in ``_intra_split`` / ``_bwd_intra_split``, so that the steps'
    row loads are in flight together (the profile at B=2 T=8192 puts 2.26 of 5.2 ms fwd+bwd in the two kernels;
    ptxas sm_90: 96 -> 185 registers for the backward fully unrolled, 96 at 2 or 4). H100, B=2 T=8192: unroll_i=2
    (the 16-bit GPU default) forward 1.668 -> 1.558 ms; unroll_ib gains < 1 % at 2 / 4 and loses 22 % at 16.
    ``diag_lim`` / ``diag_lim_b`` (split kernels; 20 in the 16-bit GPU default, 0 (off) elsewhere): a sub-chunk
    whose gates span at most that many nats (the largest G_first - G_row over its channels and rows, at most
    DIAG_LIM_MAX) runs its diagonal tile as dots, factored at the sub-chunk's first / last row as the tiles off the
    diagonal are (one dot per matrix forward, four backward), instead of BC dependent steps; wider spans (strong
    gates) keep the exact steps. H200, B=2 T=8192: forward 1.459 -> 1.120 ms, backward 4.613 -> 3.428 with BK_I 64.
    Storage options, timed on the H100 (2026-12-05 / 06; ``da16``, ``a16`` and ``gc`` won and are on in the 16-bit
    GPU default, ``dp``, ``rc`` and ``p16`` lost and stay off): ``dp`` ("main" by default; "dul": dP = dO U^T formed
    by ``_bwd_dul``, one program per chunk over every Dv block, instead of the fused main backward, whose stack then
    drops from 248 to 88 B per thread, ptxas sm_90) and ``da16`` (True in the 16-bit GPU default, else False;
    True: DAQ and DM, dP and dA, stored in the 16-bit input dtype, which every dot reading them rounds them to
    anyway; split intra backward only) and ``rc`` (False by default): the split intra backward writes dg itself,
    the reverse cumsum carried across the chunk's sub-chunks from the last to the first, so dL/db is neither
    written back nor read again by ``_chunk_rcumsum`` (about 64 KB of float32 traffic per chunk and head saved at
    Dk 128). "loop": one program per chunk and BK_I-channel block walks the sub-chunks (ptxas sm_90 252 registers
    at BK_I 64 / 4 warps against 130 without, no spills); "launches": one launch per sub-chunk, the column sums
    carried between launches in a (B*H, NT, Dk) float32 buffer (158 registers). ``p16`` (False by default; True:
    DQP and DKP, the main backward's shares of dq and dk, stored in the input dtype, 16-bit inputs only: a rounding
    more before the intra backward adds its share, half their bytes written and read: about 0.27 GB less traffic
    per fwd+bwd at B=2 T=8192 H16 Dk 128). ``a16`` (True in the 16-bit GPU default; no effect under split=True: P
    (AQK) stored in the input dtype, which ``_fwd_o`` and ``_bwd_dul`` round it to for their dots anyway: the same
    bits, a quarter of the float32 tensor's three passes saved, about 0.1 GB per fwd+bwd at that shape). And
    ``gc`` ("rows" in the 16-bit GPU default, else "cumsum"; "rows", with ``pre``: the chunk-local gate cumsum formed
    by ``_gate_rows`` from the log gates while it forms the gate factors, instead of by ``chunk_cumsum`` before
    it, which then reads it back: one float32 pass over the gates fewer per forward, about 0.13 GB at B=2 T=8192
    H16 Dk 128)."""
    cfg = _td.config(dk, dv, dtype, device)
    if device.type == "cuda" and dtype != torch.float32:
        # T by block doubling (inv="dbl", from Gated DeltaNet's config): H200 2026-12-05, B=8 T=2048 H16 D128,
        # forward 1.628 -> 1.360 ms, backward 5.011 -> 4.750 (benchmarks/results/h200-2026-12-05-s10/call2/
        # kda_inv_log.txt)
        # main="fused" with 32-wide Dv blocks: its three-pass form (Gated DeltaNet's default) lost here, H100
        # 2026-12-05, B=2 T=8192 H16 D128, backward 5.702 -> 5.92..6.69 ms over BV_B 16/32/64 and 4/8 warps;
        # pre=True: 5.702 -> 5.119 ms, forward 1.754 -> 1.669 (benchmarks/results/h100-2026-12-05-s11/call1/
        # kda_seq_log.txt)
        # unroll_i=2 (the forward scores' diagonal steps two per iteration): H100 2026-12-05, B=2 T=8192,
        # forward 1.668 -> 1.558 ms, backward 5.156 -> 5.018 (benchmarks/results/h100-2026-12-05-s12/call4/
        # kda_unroll_log.txt). (32-wide state tiles were 1-2 % faster in that sweep, whose cfg skips
        # fit_state_tiles; through the op at B*H=32 the fitting narrows the tiles to 16 anyway.)
        # diag_lim = diag_lim_b = 20 (the diagonal tiles as dots where a sub-chunk's gates span <= 20 nats) with
        # 64-channel intra-backward blocks: H200 2026-12-05, B=2 T=8192 H16 D128, forward 1.459 -> 1.120 ms,
        # backward 4.613 -> 3.428 (32-channel blocks 3.516, limit 60 the same as 20; the GPU check 28/28;
        # benchmarks/results/h200-2026-12-05-s14/call1/kda_dot_log.txt)
        # da16 (dP, dA in 16 bits), gc="rows" (the gate cumsum by _gate_rows), a16 (P in 16 bits): H100
        # 2026-12-05, B=2 T=8192 H16 D128, fwd+bwd through the op 3.546 -> 3.352 / 3.478 / 3.491 ms each (SDPA
        # cuDNN 3.482); rc and p16 lost (benchmarks/results/h100-2026-12-05-s15/call1/kda_opt_log.txt). The three
        # together, H100 2026-12-06: 3.266 ms (SDPA cuDNN 3.606), each one off 3.463 / 3.287 / 3.300, the GPU
        # check 39/39 (benchmarks/results/h100-2026-12-06-s16/call1/kda_check_log.txt)
        cfg.update(intra="split", warps_i=2, intra_b="split", BK_I=64 if dk >= 64 else 32, warps_ib=4,
                   main="fused", BV_B=min(32, cfg["BV_B"]), pre=True, unroll_i=2, diag_lim=20.0, diag_lim_b=20.0,
                   da16=True, gc="rows", a16=True)
    return cfg


def _check_cfg(cfg: dict) -> None:
    """Gated DeltaNet's checks and KDA's own keys (intra paths, BK_I, unrolling, diagonal modes): ValueError."""
    _td._check_cfg(cfg)
    if cfg.get("intra", "fused") not in ("fused", "split", "chunk"):
        raise ValueError(f"intra must be 'fused', 'split' or 'chunk', got {cfg['intra']!r}")
    if cfg.get("intra_b", "fused") not in ("fused", "split", "chunk"):
        raise ValueError(f"intra_b must be 'fused', 'split' or 'chunk', got {cfg['intra_b']!r}")
    if cfg.get("BK_I", 16) < 16 or cfg.get("BK_I", 16) & (cfg.get("BK_I", 16) - 1):
        raise ValueError(f"BK_I (channels per intra-backward program) must be a power of two >= 16, "
                         f"got {cfg['BK_I']!r}")
    for key in ("unroll_i", "unroll_ib"):
        u = cfg.get(key, 1)
        if not isinstance(u, int) or u < 1 or u & (u - 1) or u > cfg["BC"]:
            raise ValueError(f"{key} (diagonal steps unrolled per loop iteration) must be a power of two "
                             f"<= BC={cfg['BC']}, got {u!r}")
    check_diag_lim(cfg, ("diag_lim", "diag_lim_b"))
    if cfg.get("diag_lim", 0) > 0 and (cfg.get("intra") != "split" or cfg.get("diag") == "bcast"):
        raise ValueError("diag_lim needs intra='split' with the step diagonal (diag='steps'); got "
                         f"intra={cfg.get('intra')!r}, diag={cfg.get('diag', 'steps')!r}")
    if cfg.get("diag_lim_b", 0) > 0 and cfg.get("intra_b") != "split":
        raise ValueError(f"diag_lim_b needs intra_b='split', got intra_b={cfg.get('intra_b')!r}")
    if cfg.get("diag", "steps") not in ("steps", "bcast"):
        raise ValueError(f"diag must be 'steps' or 'bcast', got {cfg['diag']!r}")
    if cfg.get("da16", False) and cfg.get("intra_b", "fused") != "split":
        raise ValueError(f"da16 needs the split intra backward (intra_b='split'), got intra_b={cfg.get('intra_b')!r}")
    if cfg.get("fit_floor", 16) not in (16, 32, 64, 128):
        raise ValueError(f"fit_floor (the narrowest state tile fit_state_tiles picks) must be 16, 32, 64 or 128, "
                         f"got {cfg['fit_floor']!r}")
    if cfg.get("gc", "cumsum") not in ("cumsum", "rows"):
        raise ValueError(f"gc must be 'cumsum' or 'rows', got {cfg['gc']!r}")
    if cfg.get("gc", "cumsum") == "rows" and not cfg.get("pre", False):
        raise ValueError("gc='rows' (the gate cumsum formed by _gate_rows) needs cfg pre=True")
    for key in ("p16", "a16"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{key} must be a bool, got {cfg[key]!r}")
    if cfg.get("rc", False) not in (False, "loop", "launches"):
        raise ValueError(f"rc must be False, 'loop' or 'launches', got {cfg['rc']!r}")
    if cfg.get("rc", False) and cfg.get("intra_b", "fused") != "split":
        raise ValueError(f"rc (dg from the intra backward) needs intra_b='split', got intra_b={cfg.get('intra_b')!r}")
    if cfg.get("dp", "main") not in ("main", "dul"):
        raise ValueError(f"dp must be 'main' or 'dul', got {cfg['dp']!r}")
    if cfg.get("dp", "main") == "dul" and cfg.get("main", "fused") != "fused":
        raise ValueError(f"dp='dul' needs the fused main backward (main='fused'), got main={cfg.get('main')!r}")
    if cfg.get("diag") == "bcast" and (cfg.get("intra") != "split" or cfg.get("BKD", 0) < 16
                                       or cfg["BKD"] & (cfg["BKD"] - 1)):
        raise ValueError("diag='bcast' needs intra='split' and BKD, a power of two >= 16 (channels per diagonal "
                         f"product); got intra={cfg.get('intra')!r}, BKD={cfg.get('BKD')!r}")


def _store_dtype(cfg: dict, key: str, dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of an intermediate that cfg ``key`` (a16: P, AQK; da16: dA, dP) may keep in 16 bits: the
    16-bit input ``dtype`` when the key is on and the kernels do not split float32 operands into hi / lo halves
    (every dot reading it then rounds it to that dtype anyway: the same bits), else float32."""
    split = dtype != torch.float32 and cfg.get("split", True)
    return dtype if cfg.get(key, False) and not split else torch.float32  # (float32 inputs: float32 either way)


def _prepare(q, k, v, g, beta, s0, cfg, gc=None, scores=(), scale=None, poison=False):
    """Contiguous-last-dim inputs, the cfg (default and checked), the gate cumsum gc -> (q, k, v, gc, beta, s0,
    cfg, rows): with cfg pre and gc="rows" and no gc given, rows = (KE, QE) of `_gated_rows`, which formed gc;
    else None."""
    q, k, v = (_last_unit(x) for x in (q, k, v))
    b, h, t, dk = q.shape
    if cfg is None:  # the state kernels' Dv tiles narrowed while B * H * tiles < SMs, down to cfg fit_floor (16)
        base = config(dk, v.shape[-1], q.dtype, q.device)
        cfg = fit_state_tiles(base, b * h, dict(BV_H=v.shape[-1]), q.device, floor=base.get("fit_floor", 16))
    _check_cfg(cfg)
    bt = cfg["BT"]
    rows = None
    if gc is None:
        if cfg.get("pre", False) and cfg.get("gc", "cumsum") == "rows":
            split = q.dtype != torch.float32 and cfg.get("split", True)
            gc, rows = _gated_rows(k, q, None, scale, bt, split, poison, g=g)
        else:
            gc = chunk_cumsum(g, bt)
    elif gc.shape != (b * h, triton.cdiv(t, bt) * bt, dk) or any(x.shape[-1] != bt for x in scores):
        raise ValueError("kept tensors do not match this cfg's chunk size (pass the cfg of the forward)")
    beta = beta.to(torch.float32).reshape(b * h, t).contiguous()
    return q, k, v, gc, beta, _state_in(s0), cfg, rows


def _forward_pass(q, k, v, gc, beta, s0, scale, cfg, poison, store_t, scores=None, rows=None):
    """_intra + _prep + _fwd_h: -> (P, M, T or None, W, U0, U, HS, final state, rows). ``scores``: (P, M) of an
    earlier pass (the forward's, kept for the backward); ``_intra`` is then skipped. ``rows``: with cfg ``pre``
    the gate factors (KE, QE) of ``_gate_rows``: the state kernels' and ``_fwd_o``'s (QE), kept by a forward that
    keeps all for the backward, so that it does not form them again; else None."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    bt, bc = cfg["BT"], cfg["BC"]
    nt = triton.cdiv(t, bt)
    hd = k.dtype
    split = k.dtype != torch.float32 and cfg.get("split", True)
    prec = _prec(k.dtype)
    bk = _pow2(dk)
    f32 = torch.float32
    if scores is not None:
        aqk, akk = scores
    else:
        aqk = _empty(poison, (b * h, nt * bt, bt), _store_dtype(cfg, "a16", k.dtype), k.device)
        akk = _empty(poison, (b * h, nt * bt, bt), f32, k.device)
        split_intra = cfg.get("intra", "fused") == "split"
        grid = (nt * (bt // bc), b * h) if split_intra else (nt, bt // bc, b * h)
        if cfg.get("intra", "fused") == "chunk":
            _intra_chunk[(nt, b * h)](
                q, k, gc, aqk, akk, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                h, t, dk, nt, float(scale), BT=bt, BC=bc, BK=min(cfg.get("BK_F", 64), bk), SPLIT=split, PREC=prec,
                num_warps=cfg.get("warps_i", 4), num_stages=cfg["stages"])
        else:
            extra = {}
            if split_intra and cfg.get("diag") == "bcast":
                extra["BKD"] = min(cfg["BKD"], bk)
            if split_intra and "unroll_i" in cfg:
                extra["UNROLL"] = cfg["unroll_i"]
            if split_intra and cfg.get("diag_lim", 0) > 0:
                extra["DIAG_LIM"] = float(cfg["diag_lim"])
            (_intra_split if split_intra else _intra)[grid](
                q, k, gc, aqk, akk, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                h, t, dk, nt, float(scale), BT=bt, BC=bc, BK=bk, SPLIT=split, PREC=prec,
                num_warps=cfg.get("warps_i", cfg["warps_p"]) if split_intra else cfg["warps_p"],
                num_stages=cfg["stages"], **extra)
    wu = cfg.get("prep", "fused") == "fused"
    tt = _empty(poison, (b * h, nt * bt, bt), f32, k.device) if store_t or not wu else None
    w = _empty(poison, (b * h, nt * bt, dk), hd, k.device)
    u0 = _empty(poison, (b * h, nt * bt, dv), hd, k.device)
    _prep[(nt, b * h)](
        akk, k, v, beta, gc, tt if tt is not None else w, w, u0,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, t, dk, dv, nt, BT=bt, BC=bc, BK=bk, BV=min(cfg["BV_P"], _pow2(dv)), STORE_T=tt is not None,
        SPLIT=split, PREC=prec, PREC_T=cfg["prec_t"], INV=cfg.get("inv", "sub") == "dbl", WU=wu,
        num_warps=cfg["warps_p"], num_stages=cfg["stages"])
    if not wu:
        _td.launch_wu(k, v, beta, gc, tt, w, u0, cfg, split, prec, vec=True)
    hs = _empty(poison, (b * h, nt, dk, dv), hd, k.device)
    u = _empty(poison, (b * h, nt * bt, dv), hd, k.device)
    ht = _empty(poison, (b, h, dk, dv), f32, k.device)
    bv = min(cfg["BV_H"], _pow2(dv))
    pre = cfg.get("pre", False)
    if rows is None:  # (else formed with gc by _prepare)
        rows = _gated_rows(k, q, gc, scale, bt, split, poison) if pre else (k, None)
    ke = rows[0]
    _td._fwd_h[(triton.cdiv(dv, bv), b * h)](
        k, gc, w, u0, s0 if s0 is not None else ht, hs, u, ht, ke, k.stride(0), k.stride(1), k.stride(2),
        h, t, dk, dv, nt, BT=bt, BK=bk, BV=bv, HAS_H0=s0 is not None, SPLIT=split, PREC=prec, VEC=True, PRE=pre,
        num_warps=cfg["warps_h"], num_stages=cfg["stages"])
    return aqk, akk, tt, w, u0, u, hs, ht, (rows if pre else None)


def fwd(q, k, v, g, beta, s0, scale: float, cfg: dict | None = None, poison: bool = False,
        keep: bool | str = False):
    """-> (o (B, H, T, Dv) in q's dtype, final state (B, H, Dk, Dv) float32). No argument checks (see
    :func:`kda_triton`); g (B, H, T, Dk), beta (B, H, T), s0 (B, H, Dk, Dv) or None. ``keep``: also return
    ``(gc, P, M)``, the chunk-local gate cumsum and the two gate-weighted score blocks, which :func:`bwd`
    takes as ``kept`` instead of recomputing them (``_intra`` was about a sixth of a forward+backward on
    the H200; the cumsum replaces g, which the backward then need not keep); ``keep="all"``: also
    ``(T, W, U0, U, HS)``, the rest of the forward pass (the forward then also writes T), so the backward
    runs no forward kernel at all, and with cfg ``pre`` (the 16-bit GPU default) ``(KE, QE)``, the state kernels'
    gate factors (2 x Dk 16-bit values per token and head more kept; the backward's ``_gate_rows`` took 0.11 of
    3.4 ms of device time at B=2 T=8192 H16 D128 on the H100)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        s0 = _state_in(s0)
        ht = s0.clone() if s0 is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        o = q.new_empty((b, h, 0, dv))
        if keep:
            e = q.new_empty((b * h, 0, 1), dtype=torch.float32)
            return o, ht, (q.new_empty((b * h, 0, dk), dtype=torch.float32), e, e.clone())
        return o, ht
    q, k, v, gc, beta, s0, cfg, rows = _prepare(q, k, v, g, beta, s0, cfg, scale=scale, poison=poison)
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    split = q.dtype != torch.float32 and cfg.get("split", True)
    aqk, akk, tt, w, u0, u, hs, ht, rows = _forward_pass(q, k, v, gc, beta, s0, scale, cfg, poison,
                                                         keep == "all", rows=rows)
    o = _empty(poison, (b, h, t, dv), q.dtype, q.device)
    bv = min(cfg["BV_O"], _pow2(dv))
    _fwd_o[(nt, triton.cdiv(dv, bv), b * h)](
        q, gc, hs, u, aqk, o, rows[1] if rows is not None else q, q.stride(0), q.stride(1), q.stride(2),
        o.stride(0), o.stride(1), o.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bv,
        SPLIT=split, PREC=_prec(q.dtype), PRE=rows is not None, num_warps=cfg["warps_o"], num_stages=cfg["stages"])
    if not keep:
        return o, ht
    if keep != "all":
        return o, ht, (gc, aqk, akk)
    return o, ht, (gc, aqk, akk, tt, w, u0, u, hs) + (tuple(rows) if rows is not None else ())


def bwd(do, dht, q, k, v, g, beta, s0, scale: float, cfg: dict | None = None, poison: bool = False, kept=None):
    """Gradients -> (dq, dk, dv, dg (B, H, T, Dk) float32, dbeta (B, H, T) float32, ds0 (B, H, Dk, Dv)
    float32). ``dht``: gradient of the final state, or None. ``ds0`` is returned even when s0 is None.
    ``kept``: the ``(gc, P, M)`` of ``fwd(..., keep=True)`` or the eight (ten with cfg ``pre``) tensors of
    ``keep="all"``, with the same cfg and initial state (g is then not read)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    dht = _state_in(dht)
    f32 = torch.float32
    if t == 0:
        ds0 = dht.clone() if dht is not None else q.new_zeros((b, h, dk, dv), dtype=f32)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), q.new_zeros((b, h, 0, dk), dtype=f32),
                q.new_zeros((b, h, 0), dtype=f32), ds0)
    do = _last_unit(do)
    gc, scores = (None, ()) if kept is None else (kept[0], tuple(kept[1:3]))
    q, k, v, gc, beta, s0, cfg, rows = _prepare(q, k, v, g, beta, s0, cfg, gc, scores, scale=scale, poison=poison)
    bt, bc = cfg["BT"], cfg["BC"]
    nt = triton.cdiv(t, bt)
    bk = _pow2(dk)
    split = q.dtype != f32 and cfg.get("split", True)
    prec = _prec(q.dtype)
    if kept is not None and len(kept) in (8, 10):
        aqk, akk = scores
        tt, w, u0, u, hs = kept[3:8]
        if len(kept) == 10:
            rows = tuple(kept[8:])
            if not cfg.get("pre", False) or rows[0].shape != (b * h, nt * bt, dk):
                raise ValueError("kept gate factors (KE, QE) need cfg pre and this cfg's chunk size (pass the cfg "
                                 "of the forward)")
        if tt.shape != (b * h, nt * bt, bt) or hs.shape != (b * h, nt, dk, dv):
            raise ValueError("kept tensors do not match this cfg's chunk size (pass the cfg of the forward)")
    else:
        aqk, akk, tt, w, u0, u, hs, _, rows = _forward_pass(q, k, v, gc, beta, s0, scale, cfg, poison, True,
                                                            scores or None, rows=rows)
    du = _empty(poison, (b * h, nt * bt, dv), f32, q.device)
    # DAQ, DM in the 16-bit dot dtype with cfg da16 (every dot that reads them rounds them to it anyway; the exact
    # diagonal steps then read the rounded values): half their bytes written and read
    da_dt = _store_dtype(cfg, "da16", q.dtype)
    daq, dm = (_empty(poison, (b * h, nt * bt, bt), da_dt, q.device) for _ in range(2))
    bvo = min(cfg["BV_O"], _pow2(dv))
    dp_dul = cfg.get("dp", "main") == "dul"
    _bwd_dul[(nt, 1 if dp_dul else triton.cdiv(dv, bvo), b * h)](
        aqk, do, du, u, daq, do.stride(0), do.stride(1), do.stride(2), h, t, dv, nt, float(scale), BT=bt, BV=bvo,
        SPLIT=split, PREC=prec, DP=dp_dul, num_warps=cfg["warps_o"], num_stages=cfg["stages"])
    dhs = _empty(poison, (b * h, nt, dk, dv), hs.dtype, q.device)
    ds0 = _empty(poison, (b, h, dk, dv), f32, q.device)
    bvh = min(cfg["BV_H"], _pow2(dv))
    pre = cfg.get("pre", False)
    if pre:
        ke, qe = rows if rows is not None else _gated_rows(k, q, gc, scale, bt, split, poison)
    else:
        ke, qe = k, q
    du, dul = _td._du_out(du, split, q.dtype, poison), du
    _td._bwd_dh[(triton.cdiv(dv, bvh), b * h)](
        q, k, gc, w, do, dht if dht is not None else ds0, ds0, dhs, dul, du, ke, qe,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        do.stride(0), do.stride(1), do.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=bk, BV=bvh,
        HAS_DHT=dht is not None, SPLIT=split, PREC=prec, VEC=True, PRE=pre, num_warps=cfg["warps_h"],
        num_stages=cfg["stages"])
    # DQP, DKP (the main backward's shares of dq, dk) in the 16-bit input dtype with cfg p16: rounded once more
    # before the intra backward adds its share and rounds dq, dk to that dtype
    p_dt = q.dtype if cfg.get("p16", False) else f32
    dqp, dkp = (_empty(poison, (b * h, nt * bt, dk), p_dt, q.device) for _ in range(2))
    db = _empty(poison, (b * h, nt * bt, dk), f32, q.device)
    dv_ = _empty(poison, v.shape, v.dtype, v.device)
    dbeta = _empty(poison, (b, h, t), f32, q.device)
    if cfg.get("main", "fused") == "split":
        bkm = min(cfg.get("BK_M", 64), bk)
        nk = triton.cdiv(dk, bkm)
        bvm = min(cfg.get("BV_M", cfg["BV_B"]), _pow2(dv))
        dak = _empty(poison, (nk, b * h * nt * bt, bt), f32, q.device)
        rp = _empty(poison, (nk, b * h * nt * bt), f32, q.device)
        _bwd_main_k[(nt, nk, b * h)](
            q, k, beta, gc, do, tt, w, u, du, hs, dhs, dqp, dkp, db, dak, rp,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            do.stride(0), do.stride(1), do.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=bkm, BV=bvm,
            SPLIT=split, PREC=prec, num_warps=cfg.get("warps_mk", 4), num_stages=cfg["stages"])
        _bwd_main_v[(nt, b * h)](
            v, beta, do, tt, u0, u, du, akk, dak, rp, daq, dm, dv_, dbeta,
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dv_.stride(0), dv_.stride(1), dv_.stride(2), h, t, dv, nt, nk, float(scale), BT=bt, BV=bvm,
            SPLIT=split, PREC=prec, num_warps=cfg.get("warps_mv", 4), num_stages=cfg["stages"])
    else:
        kern = _bwd_main_seq if cfg.get("main", "fused") == "seq" else _bwd_main
        kern[(nt, b * h)](
            q, k, v, beta, gc, do, tt, w, u0, u, du, hs, dhs, akk, dqp, dkp, db, daq, dm, dv_, dbeta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dv_.stride(0), dv_.stride(1), dv_.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=bk,
            BV=min(cfg["BV_B"], _pow2(dv)), SPLIT=split, PREC=prec, num_warps=cfg["warps_b"],
            num_stages=cfg["stages"], **({} if kern is _bwd_main_seq else dict(DP=not dp_dul)))
    dq, dk_ = (_empty(poison, x.shape, x.dtype, x.device) for x in (q, k))
    dg = _empty(poison, (b, h, t, dk), f32, q.device)
    if cfg.get("intra_b", "fused") == "chunk":
        bki = min(cfg.get("BK_I", 32), bk)
        _bwd_intra_chunk[(triton.cdiv(dk, bki), nt, b * h)](
            q, k, gc, daq, dm, dqp, dkp, db, dq, dk_,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), h, t, dk, nt, BT=bt, BC=bc, BK=bki, SPLIT=split, PREC=prec,
            num_warps=cfg.get("warps_ib", 4), num_stages=cfg["stages"])
    elif cfg.get("intra_b", "fused") == "split":
        bki = min(cfg.get("BK_I", 32), bk)
        rc = {False: 0, "loop": 1, "launches": 2}[cfg.get("rc", False)]
        carry = _empty(poison, (b * h, nt, dk), f32, q.device) if rc == 2 else db
        for p_rc in (range(bt // bc - 1, -1, -1) if rc == 2 else (0,)):
            _bwd_intra_split[(triton.cdiv(dk, bki), nt * (bt // bc if rc == 0 else 1), b * h)](
                q, k, gc, daq, dm, dqp, dkp, db, dq, dk_, dg, carry,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2), h, t, dk, nt, p_rc, BT=bt, BC=bc, BK=bki, SPLIT=split,
                PREC=prec, UNROLL=cfg.get("unroll_ib", 1), DIAG_LIM=float(cfg.get("diag_lim_b", 0.0)), RC=rc,
                num_warps=cfg.get("warps_ib", 2), num_stages=cfg["stages"])
        if rc:  # dg written by the intra backward
            return dq, dk_, dv_, dg, dbeta, ds0
    else:
        _bwd_intra[(nt, bt // bc, b * h)](
            q, k, gc, daq, dm, dqp, dkp, db, dq, dk_,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), h, t, dk, nt, BT=bt, BC=bc, BK=bk, SPLIT=split, PREC=prec,
            num_warps=cfg["warps_p"], num_stages=cfg["stages"])
    # dg = chunk-local reverse cumsum of dL/db over the padded chunk (one Triton pass)
    bkc = min(128, bk)
    _chunk_rcumsum[(nt, triton.cdiv(dk, bkc), b * h)](db, dg, h, t, dk, nt, BT=bt, BK=bkc, num_warps=1)
    return dq, dk_, dv_, dg, dbeta, ds0


# ----------------------------------------------------------------------------------------------------------
# custom ops and autograd
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("attnzoo::kda_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            initial_state: torch.Tensor | None, scale: float, keep_all: bool) -> list[torch.Tensor]:
    """-> [o, final state, gc, P, M] (+ [T, W, U0, U, HS] with ``keep_all``, + [KE, QE] with cfg ``pre`` too): what
    follows the final state
    is kept for the backward (not differentiable)."""
    o, ht, kept = fwd(q, k, v, g, beta, initial_state, scale, keep="all" if keep_all and q.shape[2] else True)
    return [o, ht, *kept]


@_fwd_op.register_fake
def _(q, k, v, g, beta, initial_state, scale, keep_all):
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    cfg = config(dk, dv, q.dtype, q.device)
    bt = cfg["BT"] if t else 1
    nt = triton.cdiv(t, bt)
    tp = nt * bt
    f32 = torch.float32
    out = [q.new_empty((b, h, t, dv)), q.new_empty((b, h, dk, dv), dtype=f32),
           q.new_empty((b * h, tp, dk), dtype=f32),
           q.new_empty((b * h, tp, bt), dtype=_store_dtype(cfg, "a16", q.dtype)),
           q.new_empty((b * h, tp, bt), dtype=f32)]
    if keep_all and t:
        out += [q.new_empty((b * h, tp, bt), dtype=f32), q.new_empty((b * h, tp, dk)), q.new_empty((b * h, tp, dv)),
                q.new_empty((b * h, tp, dv)), q.new_empty((b * h, nt, dk, dv))]
        if cfg.get("pre", False):  # KE, QE: float32 where the state kernels split their operands
            dt = f32 if q.dtype != f32 and cfg.get("split", True) else q.dtype
            out += [q.new_empty((b * h, tp, dk), dtype=dt), q.new_empty((b * h, tp, dk), dtype=dt)]
    return out


@torch.library.custom_op("attnzoo::kda_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, dht: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            beta: torch.Tensor, initial_state: torch.Tensor | None, scale: float, kept: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kept``: what ``_fwd_op`` returned after the final state ([gc, P, M] or those and [T, W, U0, U, HS])."""
    return bwd(do, dht, q, k, v, None, beta, initial_state, scale, kept=tuple(kept))


@_bwd_op.register_fake
def _(do, dht, q, k, v, beta, initial_state, scale, kept):
    b, h, t, dk = q.shape
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty((b, h, t, dk), dtype=f32),
            q.new_empty((b, h, t), dtype=f32), q.new_empty((b, h, dk, v.shape[-1]), dtype=f32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, s0, scale, _ = inputs
    kept = output[2:]
    ctx.mark_non_differentiable(*kept)
    ctx.save_for_backward(q, k, v, beta, s0, *kept)
    ctx.scale = scale


def _backward(ctx, grads):
    do, dht = grads[0], grads[1]
    q, k, v, beta, s0, *kept = ctx.saved_tensors
    dq, dk, dv, dg, dbeta, ds0 = _bwd_op(do, dht, q, k, v, beta, s0, ctx.scale, kept)
    return dq, dk, dv, dg, dbeta, (ds0 if s0 is not None else None), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------

def kda_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """KDA on the Triton kernels (differentiable in q, k, v, g, beta, initial_state).

    S_t = (I - beta_t k_t^T k_t) Diag(exp g_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv); float16, bfloat16 or float32 (one dtype); Dk, Dv <= 128.
        g: (B, H, T, Dk) per-channel log gates (computed in float32; <= 0 for the no-overflow guarantee, not
            checked). beta: (B, H, T) (float32).
        scale: multiplies q; default Dk ** -0.5.
        initial_state: (B, H, Dk, Dv) (used in float32), or None (zeros).
        output_final_state: also return the final state (float32).
    Returns ``(o (B, H, T, Dv) in q's dtype, final_state or None)``. Runs on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``.
    """
    _core.check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"the Triton KDA kernels take float16, bfloat16 or float32, got {q.dtype}")
    _core.check_gate("g", g, q.shape, "(batch, heads, length, key_dim)", q.device)
    _core.check_gate("beta", beta, q.shape[:3], "(batch, heads, length)", q.device)
    _core.check_bool("output_final_state", output_final_state)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if max(dk, dv) > 128:
        raise ValueError(f"the Triton KDA kernels take head dims <= 128, got Dk={dk}, Dv={dv}")
    scale = _core.check_scale(scale, dk)
    if initial_state is not None:
        _core.check_state("initial_state", initial_state, (b, h, dk, dv), q.device)
        initial_state = initial_state.to(torch.float32)
    g, beta = g.to(torch.float32), beta.to(torch.float32)
    o, ht = _fwd_op(q, k, v, g, beta, initial_state, scale, _td._keep(q, k, v, g, beta, initial_state))[:2]
    return o, (ht if output_final_state else None)


def kda_chunk(q, k, v, g, beta, scale: float, initial_state, offsets):
    """:func:`attnzoo.linear.kda` with mode="chunk" on the kernels (arguments already checked), per packed
    sequence when ``offsets`` is given. -> (o, final state float32)."""
    s0 = None if initial_state is None else initial_state.to(torch.float32)

    def fn(q, k, v, g, beta, s):
        return tuple(_fwd_op(q, k, v, g, beta, s, scale, _td._keep(q, k, v, g, beta, s))[:2])

    return _core.run_sequences(fn, [q, k, v, g.to(torch.float32), beta.to(torch.float32)], s0, offsets)
