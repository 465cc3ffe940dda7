"""Triton kernels for the delta rule and Gated DeltaNet (scalar gate per head and step).

Recurrence per (batch, head), row-vector convention as in :mod:`attnzoo.linear._core`::

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,        o_t = scale * q_t S_t

(``g = None``: DeltaNet). q, k (B, H, T, Dk), v (B, H, T, Dv) in float16 / bfloat16 / float32, g (B, H, T)
float32 log gates (<= 0 for the no-overflow guarantee), beta (B, H, T) float32, state (B, H, Dk, Dv) float32,
Dk, Dv <= 128 (the key dimension is held whole in one block, padded to a power of two with masks).
Accumulation is float32; float32 inputs use IEEE float32 dots (no TF32). Read the docstring of
:mod:`attnzoo.linear.triton_kernels` (the scalar-gated linear kernels) first: the layout of the kernels, the
gate buffers and the hi/lo split dots follow it.

Chunked form (WY representation / UT transform)
-----------------------------------------------
Time is cut into chunks of BT steps (the last one padded with k = v = 0, beta = 0, g = 0: the identity).
``chunk_cumsum`` (PyTorch, float32) writes b, the chunk-local inclusive cumulative gate, padded to whole
chunks. Inside chunk n, with S the state before it, b_L the last entry of b and D_ij = exp(b_i - b_j)::

    A_ij    = beta_i D_ij k_i . k_j                  (j < i; strictly lower triangular)
    T       = (I + A)^{-1}
    W       = T diag(beta exp(b)) K,   U0 = T diag(beta) V
    U       = U0 - W S                               (the chunk's pseudo-values, "v_new")
    o_i     = scale [ exp(b_i) q_i S + sum_{j <= i} D_ij (q_i . k_j) u_j ]
    S'      = exp(b_L) S + sum_j exp(b_L - b_j) k_j^T u_j

Forward kernels:

1. ``_prep`` (grid: chunk, batch x head) builds T by blocked forward substitution, in row blocks of BC (16)
   steps: the diagonal block's inverse (I + A_pp)^{-1} by a 16-step elementwise substitution, then
   T_p,: = (I + A_pp)^{-1} (E_p - A_p,: T), the rows above already in registers (one tensor-core dot per
   block and one exact one-hot dot to place the block). Then W and U0 = T R (R = [beta exp(b) K | beta V]),
   written in the dot dtype (float32 for float32 inputs); T itself only for the backward (float32).
2. ``_fwd_h`` (grid: Dv block, batch x head) walks the chunks in order with its (Dk, BV) tile of the state in
   float32 registers (the Dv columns are independent: U[:, block] = U0[:, block] - W S[:, block]) and writes
   every S_n (dot dtype), U and the final state (float32).
3. ``_fwd_o`` (grid: chunk, Dv block, batch x head), fully parallel: the output from S_n and U.

Backward
--------
With P_ij = scale D_ij q_i . k_j (j <= i), the gradient of one chunk given dO and dS' (that of its end
state) is::

    dU  = P^T dO + diag(exp(b_L - b)) K dS'
    dS  = exp(b_L) dS' + scale (diag(exp b) Q)^T dO - W^T dU           (the state before the chunk)
    dW  = -dU S^T,    dR = T^T [dU | dW]    (the triangular solve: X = T R gives dR = T^T dX and
    dA  = -dR X^T = -(dR_v U0^T + dR_k W^T), kept strictly lower)

then the chain through A, R, P and the state update to q, k, v, beta and b.

4. ``_bwd_dul`` (grid: chunk, Dv block, batch x head): P^T dO into a float32 buffer (parallel).
5. ``_bwd_dh`` (grid: Dv block, batch x head) walks the chunks in reverse: completes dU (in place, or into a
   16-bit copy when the main backward rounds it to 16 bits anyway), writes
   dS' for every chunk (dot dtype) and d initial_state (float32); d final_state enters at the end.
6. ``_bwd_main`` (grid: chunk, batch x head; whole Dk, a loop over Dv blocks) everything else: dq, dk, dv,
   dbeta and dg.

Gates: b_i is a chunk-local prefix sum, so g_t only enters b_i for i >= t in its own chunk and
dg_t = sum_{i >= t in the chunk} dL/db_i exactly (a chunk-local reverse cumsum, no cross-chunk terms).
dL/db_i collects the pairs of P and A (+ on the row, - on the column), the row scalings exp(b_i) of the state
read and of R, and at the chunk's last step b_L the state carry exp(b_L) <S, dS'> + sum_j F_j (with
F_j = exp(b_L - b_j) k_j . (u_j dS'^T), also subtracted at step j). Every decay factor is exp of a
non-positive exponent when g <= 0 (masked pairs get exponent -inf before exp): nothing overflows. The
exponents are differences of chunk-local prefix sums (absolute error about eps_fp32 * |sum of the gates over
a chunk|), as in the other Triton kernels.

What the backward reads of the forward: with ``triton_kernels.SAVE_INTERMEDIATES`` (the default) the
autograd path keeps the forward's b, T, W, U0, U and S_n (about 1.5 KB per token and head at Dk = Dv = 128 in
bfloat16, twice the inputs; the forward then also writes T), so the backward skips ``_prep`` and ``_fwd_h``
(about a fifth of a forward+backward on the H200); set it False to keep only the inputs and recompute them.
Only when a gradient is wanted: an inference call keeps nothing. No atomics: deterministic. Sequential work:
``_fwd_h`` and ``_bwd_dh`` loop over the chunks, (Dv / BV) x B x H programs.
Both also serve KDA (:mod:`attnzoo.linear.triton_kda`) with ``VEC=True``: G then holds per-channel
cumulative gates (B*H, NT*BT, Dk) and every exp(b) factor becomes a per-row (key channel) decay of the state.

Public: :func:`gated_delta_triton` (differentiable in q, k, v, g, beta, initial_state, through the
``torch.library`` custom ops ``attnzoo::gated_delta_fwd`` / ``attnzoo::gated_delta_bwd`` with fake
implementations) and :func:`delta_chunk` (what :func:`attnzoo.linear.delta_rule` / ``gated_delta_rule`` call
for ``backend="triton"``). ``fwd`` / ``bwd`` launch the kernels directly (block sizes and NaN poisoning of the
outputs for the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _core
from .triton_kernels import _empty, _keep, _last_unit, _pow2, _prec, _split_dot, _state_in, fit_state_tiles

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _split_dot_r(x, y, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # acc + x @ y with x in the operand dtype and y float32 (split into hi + lo when SPLIT)
    hi = y.to(x.dtype)
    acc = tl.dot(x, hi, acc, input_precision=PREC)
    if SPLIT:
        acc = tl.dot(x, (y - hi.to(tl.float32)).to(x.dtype), acc, input_precision=PREC)
    return acc


@triton.jit
def _split_dot2(x, y, acc, ref, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # acc + x @ y with x and y float32, rounded to ref's dtype; SPLIT: three dots (hi hi, lo hi, hi lo)
    xh = x.to(ref.dtype)
    yh = y.to(ref.dtype)
    acc = tl.dot(xh, yh, acc, input_precision=PREC)
    if SPLIT:
        acc = tl.dot((x - xh.to(tl.float32)).to(ref.dtype), yh, acc, input_precision=PREC)
        acc = tl.dot(xh, (y - yh.to(tl.float32)).to(ref.dtype), acc, input_precision=PREC)
    return acc


@triton.jit
def _store_w(k, eb, beta, tinv, W, rowoff, offs_k, m_k, DIMK, BT: tl.constexpr, BK: tl.constexpr,
             SPLIT: tl.constexpr, PREC: tl.constexpr):
    # W[:, offs_k] = T diag(beta) (K * eb) for a (BT, BK) block of K; eb: exp(b) per row (BT, 1) or per element
    rk = (k.to(tl.float32) * beta[:, None] * eb).to(k.dtype)
    w = _split_dot(tinv, rk, tl.zeros([BT, BK], dtype=tl.float32), SPLIT, PREC)
    tl.store(W + rowoff * DIMK + offs_k[None, :], w.to(W.dtype.element_ty), mask=m_k[None, :])


@triton.jit
def _store_u0(vbase, U0, tc, m_c, rowoff, s_vt, beta, tinv, c0, nb, DIMV, BT: tl.constexpr, BV: tl.constexpr,
              SPLIT: tl.constexpr, PREC: tl.constexpr):
    # U0[:, c0 : c0 + nb BV] = T diag(beta) V, BV columns at a time
    for iv in range(0, nb):
        offs_v = c0 + iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        v = tl.load(vbase + tc[:, None] * s_vt + offs_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        rv = (v.to(tl.float32) * beta[:, None]).to(v.dtype)
        u0 = _split_dot(tinv, rv, tl.zeros([BT, BV], dtype=tl.float32), SPLIT, PREC)
        tl.store(U0 + rowoff * DIMV + offs_v[None, :], u0.to(U0.dtype.element_ty), mask=m_v[None, :])


@triton.jit
def _tri_inv(a, offs_c, BT: tl.constexpr, PREC_T: tl.constexpr):
    # (I + A)^{-1} for A (BT, BT) strictly lower triangular, by block doubling: D_1 = I - (A's entries inside
    # the 2 x 2 diagonal blocks) is the inverse of its 2 x 2 blocks; then for s = 2, 4, .., BT / 2,
    # D_2s = D_s - D_s C_s D_s, where C_s keeps A's entries whose row lies in the lower and whose column in the
    # upper half of one 2s-block ([[X, 0], [C, Y]]^{-1} = [[X^-1, 0], [-Y^-1 C X^-1, Y^-1]]). log2(BT) - 1
    # levels of two (BT, BT) dots, no dependent chain of single-row steps
    # with A strictly lower, "row in the lower, column in the upper half of one 2s-block" is (i ^ j) >> log2(s) == 1
    # D_s being block diagonal, D_s C_s D_s is D_s A D_s on those positions: one A for every level, the mask
    # applied to the product (no masked copy of A per level for the compiler to hoist and hold)
    d = tl.where((offs_c[:, None] ^ offs_c[None, :]) == 0, 1.0, 0.0)
    d -= tl.where((offs_c[:, None] ^ offs_c[None, :]) == 1, a, 0.0)
    for lvl in tl.static_range(1, 8):
        if (1 << lvl) < BT:
            x = tl.dot(tl.dot(d, a, input_precision=PREC_T), d, input_precision=PREC_T)
            d -= tl.where(((offs_c[:, None] ^ offs_c[None, :]) >> lvl) == 1, x, 0.0)
    return d


# ----------------------------------------------------------------------------------------------------------
# forward kernels (G: chunk-local cumulative gates, float32 (B*H, NT*BT); BETA: float32 (B*H, T);
# TT, W, U0, U, DU: (B*H, NT*BT, .) contiguous, padded to whole chunks)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _prep(K, V, BETA, G, TT, W, U0,
          s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
          NH, T, DIMK, DIMV, NT,
          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
          STORE_T: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
          INV: tl.constexpr = False, WU: tl.constexpr = True):
    # INV: T by block doubling (_tri_inv) from the whole A of one dot, instead of row blocks of BC steps.
    # WU=False (cfg prep="split"): T only (STORE_T), W and U0 left to _wu
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
    kbase = K + b * s_kb + h * s_kh
    gbase = G + bh * NT * BT
    k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
    beta = tl.load(BETA + bh * T + tc, mask=m_c, other=0.0)
    gc = tl.load(gbase + tc)
    # T = (I + A)^{-1}, one row block of BC steps at a time (rows above p already final, rows below zero)
    tinv = tl.zeros([BT, BT], dtype=tl.float32)
    eye = tl.where(offs_r[:, None] == offs_r[None, :], 1.0, 0.0)
    if INV:
        a = tl.dot(k, tl.trans(k), input_precision=PREC) * beta[:, None]
        a = a * tl.exp(tl.where(offs_c[:, None] > offs_c[None, :], gc[:, None] - gc[None, :], float("-inf")))
        tinv = _tri_inv(a, offs_c, BT, PREC_T)
        if WU:  # read K again for R below rather than hold it in registers through the inverse's dots
            k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
    for p in range(0, 0 if INV else BT // BC):
        offs_i = p * BC + offs_r
        ti = n * BT + offs_i
        m_i = ti < T
        kp = tl.load(kbase + ti[:, None] * s_kt + offs_k[None, :], mask=m_i[:, None] & m_k[None, :], other=0.0)
        bp = tl.load(BETA + bh * T + ti, mask=m_i, other=0.0)
        gp = tl.load(gbase + ti)
        # rows of block p of A (BC, BT); the entries in block p's own columns meet zero rows of tinv
        ap = tl.dot(kp, tl.trans(k), input_precision=PREC)
        ap = ap * bp[:, None] * tl.exp(tl.where(offs_i[:, None] > offs_c[None, :], gp[:, None] - gc[None, :],
                                                float("-inf")))
        app = tl.dot(kp, tl.trans(kp), input_precision=PREC)
        app = app * bp[:, None] * tl.exp(tl.where(offs_r[:, None] > offs_r[None, :], gp[:, None] - gp[None, :],
                                                  float("-inf")))
        # (I + A_pp)^{-1} by forward substitution: row r = e_r - sum_{j < r} A_rj row_j
        lin = eye
        for r in range(1, BC):
            ar = tl.sum(tl.where(offs_r[:, None] == r, app, 0.0), 0)
            lin = lin - tl.where(offs_r[:, None] == r, tl.sum(ar[:, None] * lin, 0)[None, :], 0.0)
        z = tl.where(offs_c[None, :] == offs_i[:, None], 1.0, 0.0) - tl.dot(ap, tinv, input_precision=PREC_T)
        rows = tl.dot(lin, z, input_precision=PREC_T)                     # rows of block p of T (BC, BT)
        place = tl.where(offs_c[:, None] == offs_i[None, :], 1.0, 0.0)    # (BT, BC) one-hot
        tinv += tl.dot(place, rows, input_precision="ieee")
    if STORE_T:
        tl.store(TT + (bh * NT * BT + tc)[:, None] * BT + offs_c[None, :], tinv)
    if WU:
        rowoff = (bh * NT * BT + tc)[:, None]
        _store_w(k, tl.exp(gc)[:, None], beta, tinv, W, rowoff, offs_k, m_k, DIMK, BT, BK, SPLIT, PREC)
        _store_u0(V + b * s_vb + h * s_vh, U0, tc, m_c, rowoff, s_vt, beta, tinv, 0, tl.cdiv(DIMV, BV), DIMV, BT, BV,
                  SPLIT, PREC)


@triton.jit
def _wu(K, V, BETA, G, TT, W, U0,
        s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
        NH, T, DIMK, DIMV, NT, NKB,
        BT: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, VEC: tl.constexpr = False):
    # cfg prep="split", after _prep(WU=False) stored T (grid: chunk, column block, batch x head): one BN-wide
    # column block of W = T diag(beta exp(b)) K (blocks j < NKB) or of U0 = T diag(beta) V (the rest), the same
    # products as _prep's. VEC (KDA): G holds per-channel cumulative gates (B*H, NT*BT, Dk), exp(b) per element
    n = tl.program_id(0)
    j = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    m_c = tc < T
    rowoff = (bh * NT * BT + tc)[:, None]
    beta = tl.load(BETA + bh * T + tc, mask=m_c, other=0.0)
    tinv = tl.load(TT + rowoff * BT + offs_c[None, :])
    if j < NKB:
        offs_k = j * BN + tl.arange(0, BN)
        m_k = offs_k < DIMK
        k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_c[:, None] & m_k[None, :],
                    other=0.0)
        if VEC:
            eb = tl.exp(tl.load(G + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0))
        else:
            eb = tl.exp(tl.load(G + bh * NT * BT + tc))[:, None]
        _store_w(k, eb, beta, tinv, W, rowoff, offs_k, m_k, DIMK, BT, BN, SPLIT, PREC)
    else:
        _store_u0(V + b * s_vb + h * s_vh, U0, tc, m_c, rowoff, s_vt, beta, tinv, (j - NKB) * BN, 1, DIMV, BT, BN,
                  SPLIT, PREC)


@triton.jit
def _fwd_h(K, G, W, U0, H0, HS, U, HT, KE,
           s_kb, s_kh, s_kt,
           NH, T, DIMK, DIMV, NT,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           HAS_H0: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, VEC: tl.constexpr = False,
           PRE: tl.constexpr = False):
    # VEC (KDA): G holds per-channel gates (B*H, NT*BT, DIMK) and W already carries exp(b) per channel.
    # PRE (with VEC): KE (B*H, NT*BT, DIMK) holds k * exp(b_L - b) (triton_kda._gate_rows), the same values
    # this kernel would compute, so that its (Dv / BV) programs per head do not each redo the exps
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    m_kv = m_k[:, None] & m_v[None, :]
    st = offs_k[:, None] * DIMV + offs_v[None, :]
    kbase = K + b * s_kb + h * s_kh
    if VEC:
        gbase = G + bh * NT * BT * DIMK
    else:
        gbase = G + bh * NT * BT
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + bh * DIMK * DIMV + st, mask=m_kv, other=0.0)
    for n in range(0, NT):
        tl.store(HS + (bh * NT + n) * DIMK * DIMV + st, state.to(HS.dtype.element_ty), mask=m_kv)
        tc = n * BT + offs_c
        m_t = tc < T
        rowoff = (bh * NT * BT + tc)[:, None]
        w = tl.load(W + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
        u = tl.load(U0 + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0).to(tl.float32)
        u = u - _split_dot_r(w, state, tl.zeros([BT, BV], dtype=tl.float32), SPLIT, PREC)
        tl.store(U + rowoff * DIMV + offs_v[None, :], u.to(U.dtype.element_ty), mask=m_v[None, :])
        if PRE:
            gl = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
            ke = tl.load(KE + (bh * NT * BT + tc)[None, :] * DIMK + offs_k[:, None], mask=m_k[:, None], other=0.0)
            if SPLIT:  # float32 factors; else already in the dot dtype
                ke = ke.to(tl.float32)
            state = _split_dot2(ke, u, state * tl.exp(gl)[:, None], w, SPLIT, PREC)
        elif VEC:
            kt = tl.load(kbase + tc[None, :] * s_kt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            gt = tl.load(gbase + tc[None, :] * DIMK + offs_k[:, None], mask=m_k[:, None], other=0.0)  # (BK, BT)
            gl = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
            ke = kt.to(tl.float32) * tl.exp(gl[:, None] - gt)
            state = _split_dot2(ke, u, state * tl.exp(gl)[:, None], kt, SPLIT, PREC)
        else:
            # a scalar gate per step: the decay exp(b_L - b) scales the rows of u (BT x BV) rather than the
            # columns of K^T (BK x BT), so K^T reaches the dot as loaded
            kt = tl.load(kbase + tc[None, :] * s_kt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            gc = tl.load(gbase + tc)
            glast = tl.load(gbase + n * BT + BT - 1)
            state = _split_dot_r(kt, u * tl.exp(glast - gc)[:, None], state * tl.exp(glast), SPLIT, PREC)
    tl.store(HT + bh * DIMK * DIMV + st, state, mask=m_kv)


@triton.jit
def _fwd_o(Q, K, G, HS, U, O,
           s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_ob, s_oh, s_ot,
           NH, T, DIMK, DIMV, NT, scale,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
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
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :],
                other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :],
                other=0.0)
    u = tl.load(U + (bh * NT * BT + tc)[:, None] * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
    hs = tl.load(HS + (bh * NT + n) * DIMK * DIMV + offs_k[:, None] * DIMV + offs_v[None, :],
                 mask=m_k[:, None] & m_v[None, :], other=0.0)
    gc = tl.load(G + bh * NT * BT + tc)
    a = tl.dot(q, tl.trans(k), input_precision=PREC)
    a = a * tl.exp(tl.where(offs_c[:, None] >= offs_c[None, :], gc[:, None] - gc[None, :], float("-inf")))
    o = tl.dot(q.to(hs.dtype), hs, input_precision=PREC) * tl.exp(gc)[:, None]  # row scaling after the dot
    o = tl.dot(a.to(u.dtype), u, o, input_precision=PREC)
    tl.store(O + b * s_ob + h * s_oh + tc[:, None] * s_ot + offs_v[None, :], (o * scale).to(O.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_dul(Q, K, G, DO, DU,
             s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_db, s_dh, s_dt,
             NH, T, DIMK, DIMV, NT, scale,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # DU <- P^T dO (float32), P_ij = scale exp(b_i - b_j) q_i . k_j for j <= i
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
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :],
                other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :],
                other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + tc[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :],
                 other=0.0)
    gc = tl.load(G + bh * NT * BT + tc)
    pt = tl.dot(k, tl.trans(q), input_precision=PREC)  # (j, i)
    pt = pt * (tl.exp(tl.where(offs_c[None, :] >= offs_c[:, None], gc[None, :] - gc[:, None], float("-inf"))) * scale)
    du = tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    tl.store(DU + (bh * NT * BT + tc)[:, None] * DIMV + offs_v[None, :], du, mask=m_v[None, :])


@triton.jit
def _bwd_dh(Q, K, G, W, DO, DHT, DH0, DHS, DU, DUO, KE, QE,
            s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_db, s_dh, s_dt,
            NH, T, DIMK, DIMV, NT, scale,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_DHT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, VEC: tl.constexpr = False,
            PRE: tl.constexpr = False):
    # DU: P^T dO (float32, _bwd_dul); the complete dU goes to DUO: DU itself (in place) or, when the main
    # backward rounds it to 16 bits anyway (SPLIT False), a 16-bit copy (half the bytes it then reads).
    # VEC (KDA): G holds per-channel gates (B*H, NT*BT, DIMK). PRE (with VEC): KE holds k * exp(b_L - b) and
    # QE scale * q * exp(b), (B*H, NT*BT, DIMK) each (triton_kda._gate_rows), read instead of recomputed
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    m_k = offs_k < DIMK
    m_v = offs_v < DIMV
    m_kv = m_k[:, None] & m_v[None, :]
    st = offs_k[:, None] * DIMV + offs_v[None, :]
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    dbase = DO + b * s_db + h * s_dh
    if VEC:
        gbase = G + bh * NT * BT * DIMK
    else:
        gbase = G + bh * NT * BT
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(DHT + bh * DIMK * DIMV + st, mask=m_kv, other=0.0)
    for i in range(0, NT):
        n = NT - 1 - i
        tl.store(DHS + (bh * NT + n) * DIMK * DIMV + st, dstate.to(DHS.dtype.element_ty), mask=m_kv)
        tc = n * BT + offs_c
        m_t = tc < T
        rowoff = (bh * NT * BT + tc)[:, None]
        wt = tl.load(W + (bh * NT * BT + tc)[None, :] * DIMK + offs_k[:, None], mask=m_k[:, None], other=0.0)
        if PRE:
            gl = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
            ke = tl.load(KE + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
            if SPLIT:  # float32 factors; else already in the dot dtype
                ke = ke.to(tl.float32)
            k = wt  # only its dtype is read below (the dot dtype)
        elif VEC:
            k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            gc = tl.load(gbase + tc[:, None] * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)  # (BT, BK)
            gl = tl.load(gbase + (n * BT + BT - 1) * DIMK + offs_k, mask=m_k, other=0.0)
            ke = k.to(tl.float32) * tl.exp(gl[None, :] - gc)
        else:
            k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            gc = tl.load(gbase + tc)
            glast = tl.load(gbase + n * BT + BT - 1)
        du = tl.load(DU + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        if PRE or VEC:
            du = _split_dot2(ke, dstate, du, k, SPLIT, PREC)           # + exp(b_L - b) K dS'
        else:  # a scalar gate per step: the rows of K dS' (BT x BV) scaled, K reaches the dot as loaded
            du += _split_dot_r(k, dstate, tl.zeros([BT, BV], dtype=tl.float32), SPLIT, PREC) * \
                tl.exp(glast - gc)[:, None]
        tl.store(DUO + rowoff * DIMV + offs_v[None, :], du.to(DUO.dtype.element_ty), mask=m_v[None, :])
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if PRE:
            qe = tl.load(QE + (bh * NT * BT + tc)[None, :] * DIMK + offs_k[:, None], mask=m_k[:, None], other=0.0)
            if SPLIT:
                qe = qe.to(tl.float32)
            dstate = _split_dot(qe, do, dstate * tl.exp(gl)[:, None], SPLIT, PREC)
        elif VEC:
            qt = tl.load(qbase + tc[None, :] * s_qt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            qe = qt.to(tl.float32) * tl.exp(tl.trans(gc)) * scale
            dstate = _split_dot(qe, do, dstate * tl.exp(gl)[:, None], SPLIT, PREC)
        else:  # the rows of dO (BT x BV) scaled rather than the columns of Q^T (BK x BT)
            qt = tl.load(qbase + tc[None, :] * s_qt + offs_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            dstate = _split_dot_r(qt, do.to(tl.float32) * (tl.exp(gc) * scale)[:, None], dstate * tl.exp(glast),
                                  SPLIT, PREC)
        dstate = dstate - _split_dot_r(wt, du, tl.zeros([BK, BV], dtype=tl.float32), SPLIT, PREC)
    tl.store(DH0 + bh * DIMK * DIMV + st, dstate, mask=m_kv)


@triton.jit
def _bwd_main(Q, K, V, BETA, G, DO, TT, W, U0, U, DU, HS, DHS, DQ, DKK, DVV, DBETA, DG,
              s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
              s_xb, s_xh, s_xt, s_yb, s_yh, s_yt,
              NH, T, DIMK, DIMV, NT, scale,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # s_x*: strides of dq and dk (one shape, both contiguous), s_y*: of dv; DBETA, DG: float32 (B*H, T)
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
    gbase = G + bh * NT * BT
    gc = tl.load(gbase + tc)
    glast = tl.load(gbase + n * BT + BT - 1)
    tt = tl.load(TT + rowoff * BT + offs_c[None, :])
    ttt = tl.trans(tt)
    if not SPLIT:  # rounded once to the dot dtype (U's, the input dtype) instead of in every Dv block
        ttt = ttt.to(U.dtype.element_ty)
    # q and k are read after the Dv loop (live through it they took registers from the accumulators)
    dp = tl.zeros([BT, BT], dtype=tl.float32)    # dL/dP_ij = do_i . u_j
    da = tl.zeros([BT, BT], dtype=tl.float32)    # dL/dA (before the strict-lower mask)
    dqh = tl.zeros([BT, BK], dtype=tl.float32)   # do S^T (the state read)
    dkh = tl.zeros([BT, BK], dtype=tl.float32)   # u dS'^T (the state update)
    drk = tl.zeros([BT, BK], dtype=tl.float32)   # T^T dW = -(T^T dU) S^T (dW = -dU S^T), by Dv block
    dbeta = tl.zeros([BT], dtype=tl.float32)
    ip = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)  # <S, dS'>
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
        dp = tl.dot(do.to(u.dtype), tl.trans(u), dp, input_precision=PREC)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
        dkh = tl.dot(u.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        drv = _split_dot2(ttt, du, tl.zeros([BT, BV], dtype=tl.float32), u, SPLIT, PREC)  # T^T dU
        drk = _split_dot(-drv, tl.trans(hs), drk, SPLIT, PREC)
        tl.store(DVV + b * s_yb + h * s_yh + tc[:, None] * s_yt + offs_v[None, :],
                 (drv * beta[:, None]).to(DVV.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(drv * v.to(tl.float32), 1)
        da = _split_dot(-drv, tl.trans(u0), da, SPLIT, PREC)
        ip += tl.sum(tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1), 0)
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    w = tl.load(W + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    da = _split_dot(-drk, tl.trans(w), da, SPLIT, PREC)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    dec = tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    sdec = tl.where(strict, dec, 0.0)
    eb = tl.exp(gc)
    qf = q.to(tl.float32)
    kf = k.to(tl.float32)
    # output: o = scale [exp(b) Q S + P U]
    p = tl.dot(q, tl.trans(k), input_precision=PREC) * dec * scale
    ds = dp * dec * scale
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) + dqh * (eb * scale)[:, None]
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    m = dp * p
    db = tl.sum(m, 1) - tl.sum(m, 0) + eb * scale * tl.sum(qf * dqh, 1)
    # the triangular system: A_ij = beta_i D_ij k_i . k_j (j < i)
    kk = tl.dot(k, tl.trans(k), input_precision=PREC)
    da = tl.where(strict, da, 0.0)
    dbeta += tl.sum(da * kk * sdec, 1)
    e = da * sdec * beta[:, None]
    dk = _split_dot(e, k, dk, SPLIT, PREC)
    dk = _split_dot(tl.trans(e), k, dk, SPLIT, PREC)
    m = e * kk
    db += tl.sum(m, 1) - tl.sum(m, 0)
    # R_k = diag(beta exp(b)) K
    trk = tl.sum(drk * kf, 1)
    dk += drk * (beta * eb)[:, None]
    dbeta += eb * trk
    db += beta * eb * trk
    # the state update: S' = exp(b_L) S + sum_j exp(b_L - b_j) k_j^T u_j
    dks = dkh * tl.exp(glast - gc)[:, None]
    dk += dks
    f = tl.sum(kf * dks, 1)
    db += tl.where(offs_c == BT - 1, tl.exp(glast) * ip + tl.sum(f, 0), 0.0) - f
    dg = tl.cumsum(db, 0, reverse=True)
    xoff = b * s_xb + h * s_xh + tc[:, None] * s_xt + offs_k[None, :]
    tl.store(DQ + xoff, dq.to(DQ.dtype.element_ty), mask=m_tk)
    tl.store(DKK + xoff, dk.to(DKK.dtype.element_ty), mask=m_tk)
    tl.store(DBETA + bh * T + tc, dbeta, mask=m_t)
    tl.store(DG + bh * T + tc, dg, mask=m_t)


@triton.jit
def _bwd_main_seq(Q, K, V, BETA, G, DO, TT, W, U0, U, DU, HS, DHS, DQ, DKK, DVV, DBETA, DG,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
                  s_xb, s_xh, s_xt, s_yb, s_yh, s_yt,
                  NH, T, DIMK, DIMV, NT, scale,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # _bwd_main's math in three passes over the Dv blocks (cfg main="seq"), each finishing what it can before
    # the next starts, so fewer of the (BT, BT | Dk) float32 accumulators live at once (no spills in the loops,
    # against 36 spill instructions per step of the fused loop at 8 warps on sm_90):
    # 1. dW = -dU S^T and T^T dU -> dv (stored), dA -> dk's and dbeta's triangular-system and R parts;
    # 2. dP = dO U^T and dO S^T -> dq (stored), dk's P part dS^T Q;
    # 3. U dS'^T -> dk's state-update part (dk stored), <S, dS'>, dg.
    # S and U are read twice. Same signature and results as _bwd_main (up to rounding order).
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
    kbase = K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :]
    k = tl.load(kbase, mask=m_tk, other=0.0)
    gbase = G + bh * NT * BT
    gc = tl.load(gbase + tc)
    glast = tl.load(gbase + n * BT + BT - 1)
    eb = tl.exp(gc)
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    hbase = (bh * NT + n) * DIMK * DIMV
    # pass 1: the triangular system A_ij = beta_i D_ij k_i . k_j (j < i) and R = [diag(beta exp(b)) K | diag(beta) V]
    ttt = tl.trans(tl.load(TT + rowoff * BT + offs_c[None, :]))
    if not SPLIT:  # rounded once, not in every Dv step
        ttt = ttt.to(k.dtype)
    drk = tl.zeros([BT, BK], dtype=tl.float32)   # T^T dW = -(T^T dU) S^T (dW = -dU S^T), by Dv block
    da = tl.zeros([BT, BT], dtype=tl.float32)    # dL/dA (before the strict-lower mask)
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
        drv = _split_dot2(ttt, du, tl.zeros([BT, BV], dtype=tl.float32), k, SPLIT, PREC)  # T^T dU
        drk = _split_dot(-drv, tl.trans(hs), drk, SPLIT, PREC)
        tl.store(DVV + b * s_yb + h * s_yh + tc[:, None] * s_yt + offs_v[None, :],
                 (drv * beta[:, None]).to(DVV.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(drv * v.to(tl.float32), 1)
        da = _split_dot(-drv, tl.trans(u0), da, SPLIT, PREC)
    w = tl.load(W + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    da = _split_dot(-drk, tl.trans(w), da, SPLIT, PREC)
    trk = tl.sum(drk * k.to(tl.float32), 1)
    dk = drk * (beta * eb)[:, None]
    dbeta += eb * trk
    db = beta * eb * trk
    strict = offs_c[:, None] > offs_c[None, :]
    sdec = tl.exp(tl.where(strict, gc[:, None] - gc[None, :], float("-inf")))
    kk = tl.dot(k, tl.trans(k), input_precision=PREC)
    da = tl.where(strict, da, 0.0)
    dbeta += tl.sum(da * kk * sdec, 1)
    tl.store(DBETA + bh * T + tc, dbeta, mask=m_t)
    e = da * sdec * beta[:, None]
    dk = _split_dot(e, k, dk, SPLIT, PREC)
    dk = _split_dot(tl.trans(e), k, dk, SPLIT, PREC)
    m = e * kk
    db += tl.sum(m, 1) - tl.sum(m, 0)
    # pass 2: the output o = scale [exp(b) Q S + P U]
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    dp = tl.zeros([BT, BT], dtype=tl.float32)    # dL/dP_ij = do_i . u_j
    dqh = tl.zeros([BT, BK], dtype=tl.float32)   # do S^T (the state read)
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        hs = tl.load(HS + hbase + offs_k[:, None] * DIMV + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                     other=0.0)
        dp = tl.dot(do.to(u.dtype), tl.trans(u), dp, input_precision=PREC)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
    dec = tl.exp(tl.where(offs_c[:, None] >= offs_c[None, :], gc[:, None] - gc[None, :], float("-inf")))
    ds = dp * dec * scale
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) + dqh * (eb * scale)[:, None]
    xoff = b * s_xb + h * s_xh + tc[:, None] * s_xt + offs_k[None, :]
    tl.store(DQ + xoff, dq.to(DQ.dtype.element_ty), mask=m_tk)
    db += eb * scale * tl.sum(q.to(tl.float32) * dqh, 1)
    m = dp * (tl.dot(q, tl.trans(k), input_precision=PREC) * dec * scale)
    db += tl.sum(m, 1) - tl.sum(m, 0)
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PREC)
    # pass 3: the state update S' = exp(b_L) S + sum_j exp(b_L - b_j) k_j^T u_j
    dkh = tl.zeros([BT, BK], dtype=tl.float32)   # u dS'^T
    ip = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)  # <S, dS'>
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        sk = hbase + offs_k[:, None] * DIMV + offs_v[None, :]
        hs = tl.load(HS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dhs = tl.load(DHS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dkh = tl.dot(u.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        ip += tl.sum(tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1), 0)
    dks = dkh * tl.exp(glast - gc)[:, None]
    dk += dks
    f = tl.sum(k.to(tl.float32) * dks, 1)
    db += tl.where(offs_c == BT - 1, tl.exp(glast) * ip + tl.sum(f, 0), 0.0) - f
    tl.store(DKK + xoff, dk.to(DKK.dtype.element_ty), mask=m_tk)
    tl.store(DG + bh * T + tc, tl.cumsum(db, 0, reverse=True), mask=m_t)


@triton.jit
def _state_side(DO, U, DU, HS, DHS, TT, W, DAK, b, h, bh, n, ik, tc, m_t, rowoff, offs_c, offs_k, m_k, k,
                s_db, s_dh, s_dt, NT, DIMK, DIMV, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                SPLIT: tl.constexpr, PREC: tl.constexpr):
    # the Dv loop of the split main backward's Dk-block kernel (Gated DeltaNet's and KDA's _bwd_main_k): the
    # (BT, BK) accumulators do S^T and u dS'^T, drk = T^T dW with dW = -dU S^T, and <S, dS'> per key channel;
    # stores the block's share of dA, -drk W^T, into DAK (NK, B*H*NT*BT, BT). -> (dqh, dkh, drk, ip)
    dqh = tl.zeros([BT, BK], dtype=tl.float32)
    dkh = tl.zeros([BT, BK], dtype=tl.float32)
    dw = tl.zeros([BT, BK], dtype=tl.float32)
    ip = tl.zeros([BK], dtype=tl.float32)
    dbase = DO + b * s_db + h * s_dh
    hbase = (bh * NT + n) * DIMK * DIMV
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        du = tl.load(DU + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        sk = hbase + offs_k[:, None] * DIMV + offs_v[None, :]
        hs = tl.load(HS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dhs = tl.load(DHS + sk, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dqh = tl.dot(do.to(hs.dtype), tl.trans(hs), dqh, input_precision=PREC)
        dkh = tl.dot(u.to(dhs.dtype), tl.trans(dhs), dkh, input_precision=PREC)
        dw = _split_dot(-du, tl.trans(hs), dw, SPLIT, PREC)
        ip += tl.sum(hs.to(tl.float32) * dhs.to(tl.float32), 1)
    tt = tl.load(TT + rowoff * BT + offs_c[None, :])
    drk = _split_dot2(tl.trans(tt), dw, tl.zeros([BT, BK], dtype=tl.float32), k, SPLIT, PREC)   # T^T dW
    w = tl.load(W + rowoff * DIMK + offs_k[None, :], mask=m_k[None, :], other=0.0)
    rows = tl.num_programs(2) * NT * BT  # B*H*NT*BT: the rows of one Dk block's share
    tl.store(DAK + ik * rows * BT + rowoff * BT + offs_c[None, :],
             _split_dot(-drk, tl.trans(w), tl.zeros([BT, BT], dtype=tl.float32), SPLIT, PREC))
    return dqh, dkh, drk, ip


@triton.jit
def _bwd_main_k(Q, K, BETA, G, DO, TT, W, U, DU, HS, DHS, DQP, DKP, DAK, RP, IPB,
                s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_db, s_dh, s_dt,
                NH, T, DIMK, DIMV, NT, scale,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # _bwd_main's state-side half for one Dk block (cfg main="split"; grid: chunk, Dk block, batch x head): the
    # three (BT, BK) accumulators do S^T, u dS'^T, -dU S^T over a loop on Dv, then per channel the parts of dq
    # and dk that need no dA (DQP, DKP: float32 (B*H, NT*BT, Dk)), this block's share of dA (DAK: float32
    # (NK, B*H, NT*BT, BT)) and of three row sums (RP: float32 (NK, 3, B*H*NT*BT): q.dqh, drk.k, k.dks) and of
    # <S, dS'> (IPB: float32 (NK, B*H*NT)); _bwd_main_v finishes. Same math as _bwd_main, fewer registers.
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
    q = tl.load(Q + b * s_qb + h * s_qh + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    gc = tl.load(G + bh * NT * BT + tc)
    glast = tl.load(G + bh * NT * BT + n * BT + BT - 1)
    dqh, dkh, drk, ipk = _state_side(DO, U, DU, HS, DHS, TT, W, DAK, b, h, bh, n, ik, tc, m_t, rowoff, offs_c, offs_k,
                                     m_k, k, s_db, s_dh, s_dt, NT, DIMK, DIMV, BT, BK, BV, SPLIT, PREC)
    ip = tl.sum(ipk, 0)
    rows = tl.num_programs(2) * NT * BT  # B*H*NT*BT: the rows of one Dk block's share
    eb = tl.exp(gc)
    kf = k.to(tl.float32)
    dks = dkh * tl.exp(glast - gc)[:, None]
    poff = rowoff * DIMK + offs_k[None, :]
    tl.store(DQP + poff, dqh * (eb * scale)[:, None], mask=m_k[None, :])
    tl.store(DKP + poff, drk * (beta * eb)[:, None] + dks, mask=m_k[None, :])
    rbase = RP + ik * 3 * rows + bh * NT * BT + tc
    tl.store(rbase, tl.sum(q.to(tl.float32) * dqh, 1))
    tl.store(rbase + rows, tl.sum(drk * kf, 1))
    tl.store(rbase + 2 * rows, tl.sum(kf * dks, 1))
    tl.store(IPB + ik * tl.num_programs(2) * NT + bh * NT + n, ip)


@triton.jit
def _value_side(V, DO, U, U0, DU, DVV, b, h, tc, m_t, rowoff, ttt, beta, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
                s_yb, s_yh, s_yt, DIMV, BT: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr,
                PREC: tl.constexpr):
    # the Dv loop of the split main backward (Gated DeltaNet's and KDA's _bwd_main_v): stores dv = beta T^T dU,
    # -> (dP = dO U^T, dA's value share -(T^T dU) U0^T, dbeta's value share sum_v (T^T dU) v)
    dp = tl.zeros([BT, BT], dtype=tl.float32)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    vbase = V + b * s_vb + h * s_vh
    dbase = DO + b * s_db + h * s_dh
    for iv in range(0, tl.cdiv(DIMV, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        m_v = offs_v < DIMV
        m_tv = m_t[:, None] & m_v[None, :]
        v = tl.load(vbase + tc[:, None] * s_vt + offs_v[None, :], mask=m_tv, other=0.0)
        do = tl.load(dbase + tc[:, None] * s_dt + offs_v[None, :], mask=m_tv, other=0.0)
        u = tl.load(U + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        u0 = tl.load(U0 + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        du = tl.load(DU + rowoff * DIMV + offs_v[None, :], mask=m_v[None, :], other=0.0)
        dp = tl.dot(do.to(u.dtype), tl.trans(u), dp, input_precision=PREC)
        drv = _split_dot2(ttt, du, tl.zeros([BT, BV], dtype=tl.float32), u, SPLIT, PREC)  # T^T dU
        tl.store(DVV + b * s_yb + h * s_yh + tc[:, None] * s_yt + offs_v[None, :],
                 (drv * beta[:, None]).to(DVV.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(drv * v.to(tl.float32), 1)
        da = _split_dot(-drv, tl.trans(u0), da, SPLIT, PREC)
    return dp, da, dbeta


@triton.jit
def _bwd_main_v(Q, K, V, BETA, G, DO, TT, U0, U, DU, DQP, DKP, DAK, RP, IPB, DQ, DKK, DVV, DBETA, DG,
                s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
                s_xb, s_xh, s_xt, s_yb, s_yh, s_yt,
                NH, T, DIMK, DIMV, NT, NK, scale,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # the rest of _bwd_main (cfg main="split"; grid: chunk, batch x head): the Dv loop for dP, dv, dbeta and
    # dA's value side, dA completed with the Dk blocks' shares, then P, K K^T, dbeta, dg, and dq, dk per Dk
    # block (BK channels) from the partials of _bwd_main_k
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_c = tl.arange(0, BT)
    tc = n * BT + offs_c
    m_t = tc < T
    rowoff = (bh * NT * BT + tc)[:, None]
    beta = tl.load(BETA + bh * T + tc, mask=m_t, other=0.0)
    gc = tl.load(G + bh * NT * BT + tc)
    glast = tl.load(G + bh * NT * BT + n * BT + BT - 1)
    tt = tl.load(TT + rowoff * BT + offs_c[None, :])
    ttt = tl.trans(tt)
    dp, da, dbeta = _value_side(V, DO, U, U0, DU, DVV, b, h, tc, m_t, rowoff, ttt, beta, s_vb, s_vh, s_vt,
                                s_db, s_dh, s_dt, s_yb, s_yh, s_yt, DIMV, BT, BV, SPLIT, PREC)
    rows = tl.num_programs(1) * NT * BT
    r_qdq = tl.zeros([BT], dtype=tl.float32)
    r_trk = tl.zeros([BT], dtype=tl.float32)
    r_f = tl.zeros([BT], dtype=tl.float32)
    ip = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for ik in range(0, NK):
        da += tl.load(DAK + ik * rows * BT + rowoff * BT + offs_c[None, :])
        rbase = RP + ik * 3 * rows + bh * NT * BT + tc
        r_qdq += tl.load(rbase)
        r_trk += tl.load(rbase + rows)
        r_f += tl.load(rbase + 2 * rows)
        ip += tl.load(IPB + ik * tl.num_programs(1) * NT + bh * NT + n)
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + h * s_kh
    pk = tl.zeros([BT, BT], dtype=tl.float32)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, DIMK, BK):
        offs_k = k0 + tl.arange(0, BK)
        m_tk = m_t[:, None] & (offs_k < DIMK)[None, :]
        q = tl.load(qbase + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
        k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
        pk = tl.dot(q, tl.trans(k), pk, input_precision=PREC)
        kk = tl.dot(k, tl.trans(k), kk, input_precision=PREC)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    dec = tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    sdec = tl.where(strict, dec, 0.0)
    eb = tl.exp(gc)
    ds = dp * dec * scale
    m = dp * (pk * dec * scale)
    db = tl.sum(m, 1) - tl.sum(m, 0) + eb * scale * r_qdq
    da = tl.where(strict, da, 0.0)
    dbeta += tl.sum(da * kk * sdec, 1)
    e = da * sdec * beta[:, None]
    m = e * kk
    db += tl.sum(m, 1) - tl.sum(m, 0)
    dbeta += eb * r_trk
    db += beta * eb * r_trk
    db += tl.where(offs_c == BT - 1, tl.exp(glast) * ip + tl.sum(r_f, 0), 0.0) - r_f
    dg = tl.cumsum(db, 0, reverse=True)
    tl.store(DBETA + bh * T + tc, dbeta, mask=m_t)
    tl.store(DG + bh * T + tc, dg, mask=m_t)
    for k0 in range(0, DIMK, BK):
        offs_k = k0 + tl.arange(0, BK)
        m_k = offs_k < DIMK
        m_tk = m_t[:, None] & m_k[None, :]
        q = tl.load(qbase + tc[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
        k = tl.load(kbase + tc[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
        poff = rowoff * DIMK + offs_k[None, :]
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) + tl.load(DQP + poff, mask=m_k[None, :], other=0.0)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
        dk = _split_dot(e, k, dk, SPLIT, PREC)
        dk = _split_dot(tl.trans(e), k, dk, SPLIT, PREC)
        dk += tl.load(DKP + poff, mask=m_k[None, :], other=0.0)
        xoff = b * s_xb + h * s_xh + tc[:, None] * s_xt + offs_k[None, :]
        tl.store(DQ + xoff, dq.to(DQ.dtype.element_ty), mask=m_tk)
        tl.store(DKK + xoff, dk.to(DKK.dtype.element_ty), mask=m_tk)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def config(dk: int, dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Chunk and block sizes (no autotuning). BT: chunk (a multiple of BC); BC: row block of the triangular
    inverse (16); BV_P: Dv block of ``_prep``'s U0 loop; BV_H: Dv tile of the two sequential kernels (its
    grid); BV_O: Dv block of ``_fwd_o`` and ``_bwd_dul``; BV_B: Dv block of ``_bwd_main``'s loop. prec_t:
    input precision of the float32 dots building T ("ieee" for float32 inputs; "tf32" for 16-bit inputs,
    whose W and U0 round T to 16 bits anyway). split: 16-bit inputs only, the hi/lo split of the float32
    operands (state, pseudo-values, T, gradients) into two 16-bit parts in the dots that carry them (about
    float32 accuracy for the state; False: one rounding to 16 bits, fewer dots). main: "fused" (``_bwd_main``,
    one program per chunk holding five (BT, BT | Dk) float32 accumulators: about 1 KB of register spills
    per thread at the GPU values, ptxas sm_90 with Triton 3.9, arguments marked divisible by 16 as a launch
    marks them), "split" (``_bwd_main_k`` per BK_M-channel Dk block, then ``_bwd_main_v`` with Dk blocks of
    BK_MV; Dv blocks BV_M; warps_mk / warps_mv warps: no spills at 64 / 32 / 32 and 8 warps; opt-in, not yet
    timed on a GPU) or "seq" (``_bwd_main_seq``: the same program per chunk in three passes over BV_B-wide Dv
    blocks, each finishing what it can, so no more than two (BT, BT | Dk) accumulators live at once: no spills
    in its loops at 8 warps; the 16-bit GPU default for Gated DeltaNet and DeltaNet with BV_B=64, KDA keeps
    "fused", see its config). inv: how ``_prep`` builds T, "sub"
    (row blocks of BC steps, each block's inverse by BC - 1 dependent single-row steps) or "dbl" (block
    doubling from the whole A, `_tri_inv`: log2(BT) - 1 levels of two (BT, BT) dots, meant for 16-bit inputs
    whose prec_t is TF32: with IEEE float32 dots they run on the FMA units and spill; the 16-bit GPU default
    since the H200 run of 2026-12-05, KDA's too). prep: "fused" (``_prep`` builds T and then W and U0 in one program
    per chunk) or "split" (``_prep`` builds and stores T only, then ``_wu`` forms W and U0 in BN_WU-wide column
    blocks, one program each, warps_wu warps: the inverse's program holds no K/V tiles for the products, and
    the products run (Dk + Dv) / BN_WU times as many programs; KDA takes it too; opt-in, not yet timed on a
    GPU). Under the interpreter: chunks of 16 and whole-dimension blocks. GPU values: from the H200 sweep
    below."""
    pk, pv = _pow2(dk), _pow2(dv)
    if device.type != "cuda":
        return dict(BT=16, BC=16, BV_P=pv, BV_H=pv, BV_O=pv, BV_B=pv, warps_p=1, warps_h=1, warps_o=1,
                    warps_b=1, stages=1, prec_t="ieee", split=True)
    if dtype == torch.float32:
        return dict(BT=32, BC=16, BV_P=min(32, pv), BV_H=min(32, pv), BV_O=min(32, pv), BV_B=16, warps_p=4,
                    warps_h=8, warps_o=8, warps_b=8, stages=2, prec_t="ieee", split=False)
    # 16-bit inputs: the H200 sweep of 2026-12-04 (benchmarks/results/h200-2026-12-04/linear_sweep.txt,
    # Gated DeltaNet B=8 T=2048 H=16 D=128): split=False with 64-wide state tiles took the forward from
    # 0.85 to 0.69 ms and the backward from 3.47 to 2.67 ms at the same output error (rel RMSE 0.0042 vs
    # 0.0041 against float64); 32-wide Dv blocks in the backward's main loop: 2.63 -> 2.37 ms (KDA: same).
    # inv="dbl" (T by block doubling): H200, 2026-12-05 (benchmarks/results/h200-2026-12-05-s10/call1/
    # gdn_fla_log.txt), the same shape: forward 0.668 -> 0.441 ms, backward 2.202 -> 1.979 ms (the backward
    # runs _prep again), same error against float64 (linear_check_log.txt)
    # main="seq" with 64-wide Dv blocks: H100, 2026-12-05, the same shape, backward 2.145 -> 1.609 ms (32-wide:
    # 1.773, 16-wide: 1.971; 4 warps: 1.975 / 1.902); fwd+bwd through autograd 2.520 -> 1.978 ms against fla's
    # 2.270 (benchmarks/results/h100-2026-12-05-s11/call1/gdn_fla_log.txt)
    return dict(BT=64, BC=16, BV_P=min(64, pv), BV_H=min(64, pv), BV_O=min(64, pv), BV_B=min(64, pv),
                warps_p=4, warps_h=4, warps_o=4, warps_b=8, stages=2, prec_t="tf32", split=False, inv="dbl",
                main="seq")


def _check_cfg(cfg: dict) -> None:
    for key in ("BT", "BC", "BV_P", "BV_H", "BV_O", "BV_B"):
        x = cfg[key]
        if x < 16 or x & (x - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {x}")
    if cfg["BC"] > cfg["BT"]:
        raise ValueError(f"the row block BC={cfg['BC']} must not exceed the chunk BT={cfg['BT']}")
    if cfg.get("main", "fused") not in ("fused", "split", "seq"):
        raise ValueError(f"main must be 'fused', 'split' or 'seq', got {cfg['main']!r}")
    if cfg.get("inv", "sub") not in ("sub", "dbl"):
        raise ValueError(f"inv must be 'sub' (row-block substitution) or 'dbl' (block doubling), got {cfg['inv']!r}")
    if cfg.get("prep", "fused") not in ("fused", "split"):
        raise ValueError(f"prep must be 'fused' or 'split', got {cfg['prep']!r}")
    for key in ("BK_M", "BK_MV", "BV_M", "BN_WU"):
        x = cfg.get(key, 16)
        if x < 16 or x & (x - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {x}")


def chunk_cumsum(g: torch.Tensor | None, shape: tuple, bt: int, device) -> torch.Tensor:
    """g (B, H, T) or None -> chunk-local inclusive cumsum, float32, contiguous (B*H, NT*BT), zero gates
    padded past T (so every kernel reads in bounds and b never increases inside a chunk)."""
    b, h, t = shape
    nt = triton.cdiv(t, bt)
    if g is None:
        return torch.zeros(b * h, nt * bt, dtype=torch.float32, device=device)
    g = torch.nn.functional.pad(g.to(torch.float32), (0, nt * bt - t))
    return g.reshape(b * h, nt, bt).cumsum(2).reshape(b * h, nt * bt).contiguous()


def _forward_pass(q, k, v, gc, beta, s0, cfg, poison, store_t):
    """_prep + _fwd_h: -> (T or None, W, U0, U, HS, final state)."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    hd = k.dtype  # the dot dtype of the stored intermediates
    split = k.dtype != torch.float32 and cfg.get("split", True)
    prec = _prec(k.dtype)
    wu = cfg.get("prep", "fused") == "fused"
    tt = _empty(poison, (b * h, nt * bt, bt), torch.float32, k.device) if store_t or not wu else None
    w = _empty(poison, (b * h, nt * bt, dk), hd, k.device)
    u0 = _empty(poison, (b * h, nt * bt, dv), hd, k.device)
    _prep[(nt, b * h)](
        k, v, beta, gc, tt if tt is not None else w, w, u0,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, t, dk, dv, nt, BT=bt, BC=cfg["BC"], BK=_pow2(dk), BV=min(cfg["BV_P"], _pow2(dv)), STORE_T=tt is not None,
        SPLIT=split, PREC=prec, PREC_T=cfg["prec_t"], INV=cfg.get("inv", "sub") == "dbl", WU=wu,
        num_warps=cfg["warps_p"], num_stages=cfg["stages"])
    if not wu:
        launch_wu(k, v, beta, gc, tt, w, u0, cfg, split, prec, vec=False)
    hs = _empty(poison, (b * h, nt, dk, dv), hd, k.device)
    u = _empty(poison, (b * h, nt * bt, dv), hd, k.device)
    ht = _empty(poison, (b, h, dk, dv), torch.float32, k.device)
    bv = min(cfg["BV_H"], _pow2(dv))
    _fwd_h[(triton.cdiv(dv, bv), b * h)](
        k, gc, w, u0, s0 if s0 is not None else ht, hs, u, ht, k, k.stride(0), k.stride(1), k.stride(2),
        h, t, dk, dv, nt, BT=bt, BK=_pow2(dk), BV=bv, HAS_H0=s0 is not None, SPLIT=split, PREC=prec,
        num_warps=cfg["warps_h"], num_stages=cfg["stages"])
    return tt, w, u0, u, hs, ht


def launch_wu(k, v, beta, gc, tt, w, u0, cfg, split, prec, vec: bool):
    """cfg prep="split": W and U0 from the stored T by ``_wu``, BN_WU-wide column blocks (Gated DeltaNet, and
    KDA with ``vec``), warps_wu warps."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    bn = min(cfg.get("BN_WU", 64), _pow2(max(dk, dv)))
    nkb = triton.cdiv(dk, bn)
    _wu[(nt, nkb + triton.cdiv(dv, bn), b * h)](
        k, v, beta, gc, tt, w, u0, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, t, dk, dv, nt, nkb, BT=bt, BN=bn, SPLIT=split, PREC=prec, VEC=vec, num_warps=cfg.get("warps_wu", 4),
        num_stages=cfg["stages"])


def _du_out(du: torch.Tensor, split: bool, dtype: torch.dtype, poison: bool) -> torch.Tensor:
    """Where ``_bwd_dh`` writes the complete dU: ``du`` itself (float32, in place) when the main backward splits
    its operands (``split``), else a new tensor in the 16-bit dot dtype, to which the main backward rounds dU
    anyway (the same results, half the bytes read)."""
    if split or dtype == torch.float32:
        return du
    return _empty(poison, du.shape, dtype, du.device)


def _prepare(q, k, v, g, beta, s0, cfg):
    q, k, v = (_last_unit(x) for x in (q, k, v))
    b, h, t, dk = q.shape
    cfg = cfg or fit_state_tiles(config(dk, v.shape[-1], q.dtype, q.device), b * h, dict(BV_H=v.shape[-1]),
                                 q.device, floor=16)
    _check_cfg(cfg)
    gc = chunk_cumsum(g, (b, h, t), cfg["BT"], q.device)
    beta = beta.to(torch.float32).reshape(b * h, t).contiguous()
    return q, k, v, gc, beta, _state_in(s0), cfg


def fwd(q, k, v, g, beta, s0, scale: float, cfg: dict | None = None, poison: bool = False, keep: bool = False):
    """-> (o (B, H, T, Dv) in q's dtype, final state (B, H, Dk, Dv) float32). No argument checks (see
    :func:`gated_delta_triton`); g (B, H, T) or None, beta (B, H, T), s0 (B, H, Dk, Dv) or None. ``keep``: also
    return ``(gc, T, W, U0, U, HS)``, the forward's chunk intermediates, which :func:`bwd` takes as ``kept``
    instead of recomputing them (the forward then also writes T)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        s0 = _state_in(s0)
        ht = s0.clone() if s0 is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        return (q.new_empty((b, h, 0, dv)), ht) + ((None,) if keep else ())
    q, k, v, gc, beta, s0, cfg = _prepare(q, k, v, g, beta, s0, cfg)
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    tt, w, u0, u, hs, ht = _forward_pass(q, k, v, gc, beta, s0, cfg, poison, keep)
    o = _empty(poison, (b, h, t, dv), q.dtype, q.device)
    bv = min(cfg["BV_O"], _pow2(dv))
    _fwd_o[(nt, triton.cdiv(dv, bv), b * h)](
        q, k, gc, hs, u, o, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bv,
        PREC=_prec(q.dtype), num_warps=cfg["warps_o"], num_stages=cfg["stages"])
    return (o, ht, (gc, tt, w, u0, u, hs)) if keep else (o, ht)


def bwd(do, dht, q, k, v, g, beta, s0, scale: float, cfg: dict | None = None, poison: bool = False, kept=None):
    """Gradients -> (dq, dk, dv, dg (B, H, T) float32, dbeta (B, H, T) float32, ds0 (B, H, Dk, Dv) float32).

    ``dht``: gradient of the final state, or None. ``dg`` and ``ds0`` are returned even when g / s0 are None.
    ``kept``: the ``(gc, T, W, U0, U, HS)`` of ``fwd(..., keep=True)`` with the same cfg and initial state
    (g is then not read)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    dht = _state_in(dht)
    if t == 0:
        ds0 = dht.clone() if dht is not None else q.new_zeros((b, h, dk, dv), dtype=torch.float32)
        z = q.new_zeros((b, h, 0), dtype=torch.float32)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), z, z.clone(), ds0
    do = _last_unit(do)
    q, k, v, gc, beta, s0, cfg = _prepare(q, k, v, g if kept is None else None, beta, s0, cfg)
    bt = cfg["BT"]
    nt = triton.cdiv(t, bt)
    split = q.dtype != torch.float32 and cfg.get("split", True)
    prec = _prec(q.dtype)
    if kept is None:
        tt, w, u0, u, hs, _ = _forward_pass(q, k, v, gc, beta, s0, cfg, poison, True)
    else:
        gc, tt, w, u0, u, hs = kept
        tp = nt * bt
        if (tt.shape != (b * h, tp, bt) or w.shape != (b * h, tp, dk) or hs.shape != (b * h, nt, dk, dv)
                or (gc is not None and gc.shape != (b * h, tp))):
            raise ValueError("kept tensors do not match this cfg's chunk size (pass the cfg of the forward)")
    du = _empty(poison, (b * h, nt * bt, dv), torch.float32, q.device)
    bvo = min(cfg["BV_O"], _pow2(dv))
    _bwd_dul[(nt, triton.cdiv(dv, bvo), b * h)](
        q, k, gc, do, du, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        do.stride(0), do.stride(1), do.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bvo,
        PREC=prec, num_warps=cfg["warps_o"], num_stages=cfg["stages"])
    dhs = _empty(poison, (b * h, nt, dk, dv), hs.dtype, q.device)
    ds0 = _empty(poison, (b, h, dk, dv), torch.float32, q.device)
    bvh = min(cfg["BV_H"], _pow2(dv))
    du, dul = _du_out(du, split, q.dtype, poison), du
    _bwd_dh[(triton.cdiv(dv, bvh), b * h)](
        q, k, gc, w, do, dht if dht is not None else ds0, ds0, dhs, dul, du, k, q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        do.stride(0), do.stride(1), do.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=bvh,
        HAS_DHT=dht is not None, SPLIT=split, PREC=prec, num_warps=cfg["warps_h"], num_stages=cfg["stages"])
    dq, dk_, dv_ = (_empty(poison, x.shape, x.dtype, x.device) for x in (q, k, v))
    dbeta = _empty(poison, (b, h, t), torch.float32, q.device)
    dg = _empty(poison, (b, h, t), torch.float32, q.device)
    if cfg.get("main", "fused") == "split":
        bkm = min(cfg.get("BK_M", 64), _pow2(dk))
        nk = triton.cdiv(dk, bkm)
        f32 = torch.float32
        rows = b * h * nt * bt
        dqp, dkp = (_empty(poison, (b * h, nt * bt, dk), f32, q.device) for _ in range(2))
        dak = _empty(poison, (nk, rows, bt), f32, q.device)
        rp = _empty(poison, (nk, 3, rows), f32, q.device)
        ipb = _empty(poison, (nk, b * h * nt), f32, q.device)
        bvm = min(cfg.get("BV_M", cfg["BV_B"]), _pow2(dv))
        _bwd_main_k[(nt, nk, b * h)](
            q, k, beta, gc, do, tt, w, u, du, hs, dhs, dqp, dkp, dak, rp, ipb,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            do.stride(0), do.stride(1), do.stride(2), h, t, dk, dv, nt, float(scale), BT=bt, BK=bkm, BV=bvm,
            SPLIT=split, PREC=prec, num_warps=cfg.get("warps_mk", 4), num_stages=cfg["stages"])
        _bwd_main_v[(nt, b * h)](
            q, k, v, beta, gc, do, tt, u0, u, du, dqp, dkp, dak, rp, ipb, dq, dk_, dv_, dbeta, dg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dv_.stride(0), dv_.stride(1), dv_.stride(2),
            h, t, dk, dv, nt, nk, float(scale), BT=bt, BK=min(cfg.get("BK_MV", bkm), _pow2(dk)), BV=bvm,
            SPLIT=split, PREC=prec, num_warps=cfg.get("warps_mv", 4), num_stages=cfg["stages"])
        return dq, dk_, dv_, dg, dbeta, ds0
    kern = _bwd_main_seq if cfg.get("main", "fused") == "seq" else _bwd_main
    kern[(nt, b * h)](
        q, k, v, beta, gc, do, tt, w, u0, u, du, hs, dhs, dq, dk_, dv_, dbeta, dg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dv_.stride(0), dv_.stride(1), dv_.stride(2),
        h, t, dk, dv, nt, float(scale), BT=bt, BK=_pow2(dk), BV=min(cfg["BV_B"], _pow2(dv)), SPLIT=split,
        PREC=prec, num_warps=cfg["warps_b"], num_stages=cfg["stages"])
    return dq, dk_, dv_, dg, dbeta, ds0


# ----------------------------------------------------------------------------------------------------------
# custom ops and autograd
# ----------------------------------------------------------------------------------------------------------

def _kept_shapes(q, dv):
    """Shapes and dtypes of what ``fwd(..., keep=True)`` keeps (the fake implementation's outputs)."""
    b, h, t, dk = q.shape
    bt = config(dk, dv, q.dtype, q.device)["BT"]
    nt = triton.cdiv(t, bt)
    tp, f32 = nt * bt, torch.float32
    return [((b * h, tp), f32), ((b * h, tp, bt), f32), ((b * h, tp, dk), q.dtype), ((b * h, tp, dv), q.dtype),
            ((b * h, tp, dv), q.dtype), ((b * h, nt, dk, dv), q.dtype)]


@torch.library.custom_op("attnzoo::gated_delta_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
            initial_state: torch.Tensor | None, scale: float, keep: bool) -> list[torch.Tensor]:
    """-> [o, final state] + (with ``keep``, for the backward, not differentiable) [gc, T, W, U0, U, HS]."""
    if not keep or q.shape[2] == 0:
        return list(fwd(q, k, v, g, beta, initial_state, scale)[:2])
    o, ht, kept = fwd(q, k, v, g, beta, initial_state, scale, keep=True)
    return [o, ht, *kept]


@_fwd_op.register_fake
def _(q, k, v, g, beta, initial_state, scale, keep):
    b, h, t, dk = q.shape
    out = [q.new_empty((b, h, t, v.shape[-1])), q.new_empty((b, h, dk, v.shape[-1]), dtype=torch.float32)]
    if keep and t:
        out += [q.new_empty(shape, dtype=dt) for shape, dt in _kept_shapes(q, v.shape[-1])]
    return out


@torch.library.custom_op("attnzoo::gated_delta_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, dht: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            g: torch.Tensor | None, beta: torch.Tensor, initial_state: torch.Tensor | None, scale: float,
            kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """``kept``: the forward's [gc, T, W, U0, U, HS] (``_fwd_op(..., keep=True)``), or [] to recompute them."""
    return bwd(do, dht, q, k, v, g, beta, initial_state, scale, kept=tuple(kept) if kept else None)


@_bwd_op.register_fake
def _(do, dht, q, k, v, g, beta, initial_state, scale, kept):
    b, h, t, dk = q.shape
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty((b, h, t), dtype=f32),
            q.new_empty((b, h, t), dtype=f32), q.new_empty((b, h, dk, v.shape[-1]), dtype=f32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, s0, scale, _ = inputs
    kept = output[2:]
    if kept:
        ctx.mark_non_differentiable(*kept)
    ctx.save_for_backward(q, k, v, g, beta, s0, *kept)
    ctx.scale = scale


def _backward(ctx, grads):
    do, dht = grads[0], grads[1]
    q, k, v, g, beta, s0, *kept = ctx.saved_tensors
    dq, dk, dv, dg, dbeta, ds0 = _bwd_op(do, dht, q, k, v, g, beta, s0, ctx.scale, list(kept))
    return dq, dk, dv, (dg if g is not None else None), dbeta, (ds0 if s0 is not None else None), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------

def gated_delta_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Gated DeltaNet (``g`` a tensor) or DeltaNet (``g=None``) on the Triton kernels (differentiable in q, k,
    v, g, beta, initial_state).

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv); float16, bfloat16 or float32 (one dtype); Dk, Dv <= 128.
        g: (B, H, T) log gates (computed in float32; <= 0 for the no-overflow guarantee, not checked) or None.
        beta: (B, H, T) (computed in float32).
        scale: multiplies q; default Dk ** -0.5.
        initial_state: (B, H, Dk, Dv) (used in float32), or None (zeros).
        output_final_state: also return the final state (float32).
    Returns ``(o (B, H, T, Dv) in q's dtype, final_state or None)``. Runs on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``.
    """
    _core.check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"the Triton delta-rule kernels take float16, bfloat16 or float32, got {q.dtype}")
    if g is not None:
        _core.check_gate("g", g, q.shape[:3], "(batch, heads, length)", q.device)
    _core.check_gate("beta", beta, q.shape[:3], "(batch, heads, length)", q.device)
    _core.check_bool("output_final_state", output_final_state)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if max(dk, dv) > 128:
        raise ValueError(f"the Triton delta-rule kernels take head dims <= 128, got Dk={dk}, Dv={dv}")
    scale = _core.check_scale(scale, dk)
    if initial_state is not None:
        _core.check_state("initial_state", initial_state, (b, h, dk, dv), q.device)
        initial_state = initial_state.to(torch.float32)
    g = None if g is None else g.to(torch.float32)
    beta = beta.to(torch.float32)
    o, ht = _fwd_op(q, k, v, g, beta, initial_state, scale, _keep(q, k, v, g, beta, initial_state))[:2]
    return o, (ht if output_final_state else None)


def delta_chunk(q, k, v, g, beta, scale: float, initial_state, offsets):
    """:func:`attnzoo.linear.delta_rule` / ``gated_delta_rule`` with mode="chunk" on the kernels (arguments
    already checked); with ``offsets``, the packed sequences in padded batches of similar lengths
    (`_core.run_sequences`). -> (o, final state float32)."""
    s0 = None if initial_state is None else initial_state.to(torch.float32)

    def fn(q, k, v, g, beta, s):
        return tuple(_fwd_op(q, k, v, g, beta, s, scale, _keep(q, k, v, g, beta, s))[:2])

    return _core.run_sequences(fn, [q, k, v, None if g is None else g.to(torch.float32),
                                    beta.to(torch.float32)], s0, offsets)
