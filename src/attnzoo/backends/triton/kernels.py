"""The Triton forward kernel over a `BlockLayout`, specialised per pattern by source generation.

For each (query block, batch x head) program: the fully visible kv blocks run without any mask, then
the partial blocks apply the pattern's mask, generated from the pattern into ``_mask`` (see
`codegen`). Online softmax in base 2 with fp32 accumulation; the lse is written in natural log.
GQA reads the shared K/V head directly (no repeated K/V). Head dims that are not powers of two are
padded to the next one inside the kernel (masked loads), so Dv != D (e.g. 192/128) works.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading

PRELUDE = '''
import triton
import triton.language as tl

# the forward's LAZY rescaling: how far (log2 units) a row's block maximum may exceed its stale running maximum
LAZY_TAU = tl.constexpr(8.0)


@triton.jit
def _fdiv(x, s):
    return tl.where(x >= 0, x // s, -((s - 1 - x) // s))


@triton.jit
def _fmod(x, s):
    return x - _fdiv(x, s) * s


@triton.jit
def _mask(qp, kk, hq, AUX):
{body}


# Row maps: the tensor rows that hold the tokens at iteration positions x (a block's positions, x0 its first:
# a multiple of the block size, scalar), for the query side (q, out, lse, dO, delta, dq) and the key side (k, v,
# dk, dv). The identity except for patterns whose kernel walks the tokens in another order than the tensors
# hold them (a tiled N-D neighborhood over tensors kept in row-major order: codegen.row_maps).
@triton.jit
def _qrows(x0, x):
{qrows}


@triton.jit
def _krows(x0, x):
{krows}
'''

FWD = '''

@triton.jit
def _fwd_tile(q, kbase, vbase, offs_n, offs_d, offs_dv, stride_kn, stride_vn, qp, h, AUX, Lk, D, DV, qk_scale,
              m_i, l_i, acc, MASK: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr,
              KD=None, VD=None, krow=0, TMA: tl.constexpr = False, part=False, LAZY: tl.constexpr = False, n0=0):
    # one kv block: scores (_fwd_scores), then the mask and the online softmax update (_fwd_update)
    s = _fwd_scores(q, kbase, offs_n, offs_d, stride_kn, Lk, D, EVEN, PREC, KD, krow, TMA, n0)
    return _fwd_update(s, vbase, offs_n, offs_dv, stride_vn, qp, h, AUX, Lk, DV, qk_scale, m_i, l_i, acc, MASK, EVEN,
                       PREC, FOLD, VD, krow, TMA, part, LAZY, n0)


@triton.jit
def _fwd_scores(q, kbase, offs_n, offs_d, stride_kn, Lk, D, EVEN: tl.constexpr, PREC: tl.constexpr, KD=None, krow=0,
                TMA: tl.constexpr = False, n0=0):
    # the raw scores q K^T of one kv block.
    # TMA (EVEN only): K and V come through tensor descriptors over their (B * Hkv * Lk, D) views, row krow.
    # n0: the block's first key position (offs_n = n0 + arange), for the row map
    if TMA:
        kt = tl.trans(KD.load([krow, 0]))
    elif EVEN:
        kt = tl.load(kbase + _krows(n0, offs_n)[None, :] * stride_kn + offs_d[:, None])
    else:
        kt = tl.load(kbase + _krows(n0, offs_n)[None, :] * stride_kn + offs_d[:, None],
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
    return tl.dot(q, kt, input_precision=PREC)


@triton.jit
def _fwd_update(s, vbase, offs_n, offs_dv, stride_vn, qp, h, AUX, Lk, DV, qk_scale, m_i, l_i, acc,
                MASK: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr, VD=None, krow=0,
                TMA: tl.constexpr = False, part=False, LAZY: tl.constexpr = False, n0=0):
    # one kv block's raw scores s: the pattern's mask on partial blocks, online softmax update (base 2), P V.
    # FOLD (qk_scale > 0): the scale is applied inside the exponent's argument, one FMA per score,
    # and to the row maxima (max(s) * c == max(s * c) for c > 0) instead of a multiply per score.
    # MASK: 0 a full block, 1 a partial block, 2 decided at run time by `part` (the merged loop's blocks)
    # LAZY: the running maxima (and the rescale of acc and l) move only when some row's block maximum exceeds
    # its running maximum by more than LAZY_TAU (log2 units): otherwise the probabilities are taken against the
    # stale maxima (each at most 2**LAZY_TAU) and the tile skips the (rows x Dv) multiply of acc -- one
    # block-wide reduction and a branch instead (FlashAttention-4's conditional rescaling)
    if TMA:
        v = VD.load([krow, 0])
    elif EVEN:
        v = tl.load(vbase + _krows(n0, offs_n)[:, None] * stride_vn + offs_dv[None, :])
    else:
        v = tl.load(vbase + _krows(n0, offs_n)[:, None] * stride_vn + offs_dv[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
    if not FOLD:
        s = s * qk_scale
    if MASK == 1:
        keep = _mask(qp, offs_n[None, :], h, AUX)
        if not EVEN:
            keep = keep & (offs_n[None, :] < Lk)
        s = tl.where(keep, s, float("-inf"))
    elif MASK == 2:
        if part:
            s = tl.where(_mask(qp, offs_n[None, :], h, AUX), s, float("-inf"))
        if not EVEN:
            s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    elif not EVEN:
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if LAZY:
        if tl.max(tl.where(m_new > m_i + LAZY_TAU, 1, 0), 0) > 0:
            m_up = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_up)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        m_out = m_i
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows that have seen nothing: s is -inf, p 0
    else:
        m_out = m_new
        if MASK:  # a row may have seen nothing yet
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every row sees a key of a full block (the first key is always in range)
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
    if FOLD:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.exp2(s - m_safe[:, None])
    l_i = l_i + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return m_out, l_i, acc


@triton.jit
def _packed_rows(pid_m, pid_bh, H, G, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
    # the rows of a program over query block pid_m and PACK heads of one GQA group (grid axis 1: B * H / PACK):
    # -> batch, first head, its KV head, each row's position and each row's head
    HP = H // PACK
    b = pid_bh // HP
    h = (pid_bh % HP) * PACK
    r = tl.arange(0, PACK * BLOCK_M)
    if PACK == 1:
        offs_m = pid_m * BLOCK_M + r
        hr = h + r * 0
    else:
        offs_m = pid_m * BLOCK_M + r % BLOCK_M
        hr = h + r // BLOCK_M
    return b, h, h // G, offs_m, hr


@triton.jit
def _fwd_blocks(row, n, q, kbase, vbase, offs_n0, offs_d, offs_dv, stride_kn, stride_vn, qp, h, AUX, Lk, D, DV,
                qk_scale, m_i, l_i, acc, BLOCK_N: tl.constexpr, MASK: tl.constexpr, EVEN: tl.constexpr,
                PREC: tl.constexpr, FOLD: tl.constexpr, IDX: tl.constexpr, KD=None, VD=None, kvrow=0,
                TMA: tl.constexpr = False, WS: tl.constexpr = False, LAZY: tl.constexpr = False):
    # the n kv blocks listed at row. IDX: how the loop finds each block's index -- 0 loads it at its step
    # (the tile's addresses wait on that load), 1 loads the next step's index one step ahead, 2 takes
    # first + j for the full blocks (the launcher checked that every row's full list is contiguous, as for
    # windows; no loads at all) and 1 for the partial ones. WS: the loop asks Triton for warp specialisation
    nxt = tl.load(row, mask=n > 0, other=0)
    for j in tl.range(0, n, warp_specialize=WS):
        if IDX == 2 and not MASK:
            blk = nxt + j
        elif IDX >= 1:
            blk = nxt
            nxt = tl.load(row + j + 1, mask=j + 1 < n, other=0)
        else:
            blk = tl.load(row + j)
        m_i, l_i, acc = _fwd_tile(q, kbase, vbase, blk * BLOCK_N + offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                                  qp, h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, MASK, EVEN, PREC, FOLD,
                                  KD, VD, kvrow + blk * BLOCK_N, TMA, False, LAZY, blk * BLOCK_N)
    return m_i, l_i, acc


@triton.jit
def _fwd_blocks_merged(frow, nf, prow, npart, q, kbase, vbase, offs_n0, offs_d, offs_dv, stride_kn, stride_vn, qp,
                       h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
                       PREC: tl.constexpr, FOLD: tl.constexpr, IDX: tl.constexpr, KD=None, VD=None, kvrow=0,
                       TMA: tl.constexpr = False, LAZY: tl.constexpr = False):
    # MERGE: the nf full blocks, then the npart partial ones, in one loop (one software pipeline instead of
    # two, so the first partial block's K / V load overlaps the last full block's compute); the mask is
    # applied on the steps past nf only. Full indices as in _fwd_blocks (IDX 2: first + j); the partial
    # list's next index is loaded one step ahead.
    f0 = tl.load(frow, mask=nf > 0, other=0)
    pn = tl.load(prow, mask=npart > 0, other=0)
    for j in tl.range(0, nf + npart):
        part = j >= nf
        if IDX == 2:
            bf = f0 + j
        else:
            bf = tl.load(frow + j, mask=j < nf, other=0)
        blk = tl.where(part, pn, bf)
        pn = tl.where(part, tl.load(prow + (j - nf + 1), mask=part & (j - nf + 1 < npart), other=0), pn)
        m_i, l_i, acc = _fwd_tile(q, kbase, vbase, blk * BLOCK_N + offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                                  qp, h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, 2, EVEN, PREC, FOLD,
                                  KD, VD, kvrow + blk * BLOCK_N, TMA, part, LAZY, blk * BLOCK_N)
    return m_i, l_i, acc


@triton.jit
def _merged_blk(j, nf, npart, f0, frow, prow, IDX: tl.constexpr):
    # the kv block of step j of a merged loop: the nf full blocks (first + j under IDX 2), then the partial ones
    if IDX == 2:
        bf = f0 + j
    else:
        bf = tl.load(frow + j, mask=j < nf, other=0)
    bp = tl.load(prow + (j - nf), mask=(j >= nf) & (j - nf < npart), other=0)
    return tl.where(j >= nf, bp, bf)


@triton.jit
def _fwd_blocks_pipe(frow, nf, prow, npart, q, kbase, vbase, offs_n0, offs_d, offs_dv, stride_kn, stride_vn, qp,
                     h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
                     PREC: tl.constexpr, FOLD: tl.constexpr, IDX: tl.constexpr, KD=None, VD=None, kvrow=0,
                     TMA: tl.constexpr = False, LAZY: tl.constexpr = False):
    # PIPE: the merged loop (full blocks, then partial ones) with each step's next scores q K^T issued before
    # this step's softmax, so the tensor cores work on them while the exp2s run (FlashAttention-3's intra-warpgroup
    # overlap; the compiled loop interleaves the next block's wgmma with this block's MUFU instructions). One
    # more score tile lives in registers. The last step recomputes its own block's scores (discarded).
    n = nf + npart
    f0 = tl.load(frow, mask=nf > 0, other=0)
    blk = _merged_blk(0, nf, npart, f0, frow, prow, IDX)
    s = _fwd_scores(q, kbase, blk * BLOCK_N + offs_n0, offs_d, stride_kn, Lk, D, EVEN, PREC, KD, kvrow + blk * BLOCK_N,
                    TMA, blk * BLOCK_N)
    for j in tl.range(0, n):
        nxt = _merged_blk(tl.minimum(j + 1, n - 1), nf, npart, f0, frow, prow, IDX)
        s_next = _fwd_scores(q, kbase, nxt * BLOCK_N + offs_n0, offs_d, stride_kn, Lk, D, EVEN, PREC, KD,
                             kvrow + nxt * BLOCK_N, TMA, nxt * BLOCK_N)
        m_i, l_i, acc = _fwd_update(s, vbase, blk * BLOCK_N + offs_n0, offs_dv, stride_vn, qp, h, AUX, Lk, DV, qk_scale,
                                    m_i, l_i, acc, 2, EVEN, PREC, FOLD, VD, kvrow + blk * BLOCK_N, TMA, j >= nf, LAZY,
                                    blk * BLOCK_N)
        s = s_next
        blk = nxt
    return m_i, l_i, acc


@triton.jit
def attn_fwd(Q, K, V, O, LSE, AUX, KVN, KVI, FKVN, FKVI,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
             lay_h, lay_m, idx_h, idx_m,
             H, G, Lq, Lk, OFF, D, DV, qk_scale,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             EVEN: tl.constexpr, PREC: tl.constexpr, PACK: tl.constexpr = 1, FOLD: tl.constexpr = False,
             IDX: tl.constexpr = 0, KD=None, VD=None, TMA: tl.constexpr = False, WS: tl.constexpr = False,
             MERGE: tl.constexpr = False, LAZY: tl.constexpr = False, PIPE: tl.constexpr = False,
             NROW=None, NARROW: tl.constexpr = 0):
    # EVEN: the lengths are multiples of the blocks and the head dims powers of two (no bounds checks).
    # PACK query heads of one GQA group share a program: its tile stacks their BLOCK_M rows of the same
    # positions (PACK * BLOCK_M rows), so each K/V tile is loaded once for all of them (the mask and the
    # layout must not depend on the head; the launcher checks). Grid: (query blocks, B * H / PACK).
    # NARROW (cfg NARROW, e.g. 16): on the query blocks that NROW flags (ops._narrow_rows: the first partial
    # kv block is block 0 and no query of the block sees a key of it at or past NARROW -- attention sinks
    # far behind a window), block 0 runs as a tile of its first NARROW keys, before the other blocks, instead
    # of a BLOCK_N-wide one.
    ROWS: tl.constexpr = PACK * BLOCK_M
    pid_m = tl.program_id(0)
    b, h, hk, offs_m, hr = _packed_rows(pid_m, tl.program_id(1), H, G, BLOCK_M, PACK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    qr = _qrows(pid_m * BLOCK_M, offs_m)
    qptr = Q + b * stride_qb + hr[:, None] * stride_qh + qr[:, None] * stride_qm + offs_d[None, :]
    if EVEN:
        q = tl.load(qptr)
    else:
        q = tl.load(qptr, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    qp = offs_m[:, None] + OFF
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    kvrow = (b * (H // G) + hk) * Lk  # this KV head's first row in the descriptors' 2-D views (TMA)
    frow, nf = FKVI + h * idx_h + pid_m * idx_m, tl.load(FKVN + h * lay_h + pid_m * lay_m)
    prow, npart = KVI + h * idx_h + pid_m * idx_m, tl.load(KVN + h * lay_h + pid_m * lay_m)
    if NARROW > 0:
        if tl.load(NROW + pid_m) != 0:
            m_i, l_i, acc = _fwd_tile(q, kbase, vbase, tl.arange(0, NARROW), offs_d, offs_dv, stride_kn, stride_vn,
                                      qp, h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, 1, EVEN, PREC, FOLD,
                                      None, None, 0, False, False, LAZY, 0)
            prow += 1
            npart -= 1
    if PIPE:  # the merged loop, each step's next scores issued before its softmax
        m_i, l_i, acc = _fwd_blocks_pipe(frow, nf, prow, npart, q, kbase, vbase, offs_n0, offs_d, offs_dv,
                                         stride_kn, stride_vn, qp, h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc,
                                         BLOCK_N, EVEN, PREC, FOLD, IDX, KD, VD, kvrow, TMA, LAZY)
    elif MERGE:
        m_i, l_i, acc = _fwd_blocks_merged(frow, nf, prow, npart, q, kbase, vbase, offs_n0, offs_d, offs_dv,
                                           stride_kn, stride_vn, qp, h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc,
                                           BLOCK_N, EVEN, PREC, FOLD, IDX, KD, VD, kvrow, TMA, LAZY)
    else:
        # fully visible blocks: no elementwise mask
        m_i, l_i, acc = _fwd_blocks(frow, nf, q, kbase, vbase, offs_n0, offs_d, offs_dv, stride_kn, stride_vn, qp,
                                    h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, BLOCK_N, 0, EVEN, PREC, FOLD, IDX,
                                    KD, VD, kvrow, TMA, WS, LAZY)
        # partial blocks: the pattern's mask, computed in-kernel
        m_i, l_i, acc = _fwd_blocks(prow, npart, q, kbase, vbase, offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                                    qp, h, AUX, Lk, D, DV, qk_scale, m_i, l_i, acc, BLOCK_N, 1, EVEN, PREC, FOLD,
                                    IDX, KD, VD, kvrow, TMA, WS, LAZY)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    optr = O + b * stride_ob + hr[:, None] * stride_oh + qr[:, None] * stride_om + offs_dv[None, :]
    lptr = LSE + (b * H + hr) * Lq + qr
    if EVEN:
        tl.store(optr, out.to(O.dtype.element_ty))
        tl.store(lptr, lse)
    else:
        tl.store(optr, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV))
        tl.store(lptr, lse, mask=offs_m < Lq)
'''

# Backward: no atomics, so gradients are bitwise deterministic. `attn_bwd_dkdv` runs one program per
# (work item, batch x kv head) over the transposed layout and loops over the G query heads of the group,
# accumulating dk and dv in registers (GQA without repeated K/V). A work item is a kv block with a range
# of the query blocks that see it: long columns (attention sinks, the first blocks under causal masks)
# are split so no program runs far longer than the rest, their fp32 partials summed in a fixed order
# by `attn_bwd_reduce`; items are launched longest first;
# `attn_bwd_dq` runs one program per (query block, batch x query head) over the forward layout. It runs
# first: it computes DELTA = rowsum(out * dout) - dlse for its rows (the lse's own gradient folds into it)
# and stores it for `attn_bwd_dkdv`, so no separate pass (nor launch) computes it. The opt-in ATOMIC
# variant (ops' cfg ATOMIC_DQ) is the one exception to determinism: no dq kernel, `attn_bwd_delta` computes
# DELTA, and the dk/dv kernel adds each tile's dS K to a float32 dq accumulator with atomics.
BWD = '''

@triton.jit
def _bwd_probs(q, kt, qp, kk, h, AUX, Lk, qk_scale, lse2, MASK: tl.constexpr, PREC: tl.constexpr, part=False,
               EVEN_N: tl.constexpr = False):
    # probabilities of one tile from the saved lse (base 2); keys past Lk and hidden pairs -> 0. MASK: 0 a
    # full tile, 1 a partial one, 2 decided at run time by `part` (the merged loops)
    return _probs_of(tl.dot(q, kt, input_precision=PREC), qk_scale, qp, kk, h, AUX, Lk, lse2[:, None], MASK, part,
                     EVEN_N)


@triton.jit
def _probs_of(raw, qk_scale, qp, kk, h, AUX, Lk, lse2b, MASK: tl.constexpr, part=False, EVEN_N: tl.constexpr = False):
    # raw scores -> probabilities exp2(raw * qk_scale - lse2) (one FMA and one exp2 an element), then zero where
    # hidden; qp / kk / lse2b broadcast against raw in either orientation (queries by keys, or keys by queries in
    # the dk/dv kernel's KT form). EVEN_N: Lk is a multiple of the key tile, so no key is out of range and full
    # tiles select nothing (the mask after the exp2 also lets the scale and the lse fuse into one FMA)
    p = tl.exp2(raw * qk_scale - lse2b)
    if not EVEN_N:
        p = tl.where(kk < Lk, p, 0.0)
    if MASK == 1:
        p = tl.where(_mask(qp, kk, h, AUX), p, 0.0)
    elif MASK == 2:
        if part:
            p = tl.where(_mask(qp, kk, h, AUX), p, 0.0)
    return p


@triton.jit
def _bwd_kv_tile(q, do, lse2, delta, kt, vt, qp, kk, h, AUX, Lk, qk_scale, dk, dv,
                 MASK: tl.constexpr, PREC: tl.constexpr, part=False, EVEN_N: tl.constexpr = False):
    p = _bwd_probs(q, kt, qp, kk, h, AUX, Lk, qk_scale, lse2, MASK, PREC, part, EVEN_N)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
    dp = tl.dot(do, vt, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    return dk, dv, ds


@triton.jit
def _bwd_kv_tile_t(q, do, lse2, delta, k, v, qp, kk, h, AUX, Lk, qk_scale, dk, dv,
                   MASK: tl.constexpr, PREC: tl.constexpr, part=False, EVEN_N: tl.constexpr = False):
    # the same tile computed keys by queries (KT): S^T = K Q^T, so P^T and dS^T come out of their dots in
    # the layout the dv and dk dots take as their left operand (no transpose of a computed tile); q and dO
    # are read transposed from shared memory instead. qp (1, M), kk (N, 1); k (N, D), v (N, DV)
    pt = _probs_of(tl.dot(k, tl.trans(q), input_precision=PREC), qk_scale, qp, kk, h, AUX, Lk, lse2[None, :],
                   MASK, part, EVEN_N)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv, dst


@triton.jit
def _bwd_load_q(Q, DO, LSE, qrow, dorow, lrow, offs_m, offs_d, offs_dv, Lq, D, DV,
                QD=None, DOD=None, trow=0, TMA: tl.constexpr = False):
    # the rows' q, dO and lse (base 2, and whether the row sees anything); qrow / dorow: element offsets
    # of each row's start, lrow: each row's index into lse and delta. TMA (EVEN only): q and dO through
    # descriptors over the (B * H * Lq, D) views, from row trow
    rm = offs_m < Lq
    if TMA:
        q = QD.load([trow, 0])
        do = DOD.load([trow, 0])
        lse = tl.load(LSE + lrow)
    else:
        q = tl.load(Q + qrow[:, None] + offs_d[None, :], mask=rm[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + dorow[:, None] + offs_dv[None, :], mask=rm[:, None] & (offs_dv[None, :] < DV),
                     other=0.0)
        lse = tl.load(LSE + lrow, mask=rm, other=float("inf"))
    # rows that see nothing (lse -inf) and padding rows get p = 0
    empty = lse == float("-inf")
    lse2 = tl.where(empty, float("inf"), lse * 1.4426950408889634)
    return q, do, lse2, empty


@triton.jit
def _bwd_kv_block(m0, offs_m0, Q, DO, LSE, DELTA, qoff, dooff, bh, stride_qm, stride_dm, offs_d, offs_dv, Lq, D, DV,
                  kt, vt, OFF, kk, h, AUX, Lk, qk_scale, dk, dv, MASK: tl.constexpr, PREC: tl.constexpr,
                  QD, DOD, TMA: tl.constexpr, part=False, KT: tl.constexpr = False, DQA=None,
                  ATOMIC: tl.constexpr = False, BLOCK_D: tl.constexpr = 16, EVEN_N: tl.constexpr = False):
    # one query block (rows m0 + offs_m0 of head h, bh = batch * H + h) of the dk/dv kernel: its q, dO, lse
    # and delta, then the tile's contribution to dk and dv
    offs_m = m0 + offs_m0
    qr = _qrows(m0, offs_m)
    q, do, lse2, _ = _bwd_load_q(Q, DO, LSE, qoff + qr * stride_qm, dooff + qr * stride_dm,
                                 bh * Lq + qr, offs_m, offs_d, offs_dv, Lq, D, DV,
                                 QD, DOD, bh * Lq + m0, TMA)
    if TMA:
        delta = tl.load(DELTA + bh * Lq + qr)
    else:
        delta = tl.load(DELTA + bh * Lq + qr, mask=offs_m < Lq, other=0.0)
    if KT:  # kt, vt hold K and V untransposed, (N, D) / (N, DV)
        dk, dv, ds = _bwd_kv_tile_t(q, do, lse2, delta, kt, vt, offs_m[None, :] + OFF, kk, h, AUX, Lk, qk_scale, dk,
                                    dv, MASK, PREC, part, EVEN_N)
    else:
        dk, dv, ds = _bwd_kv_tile(q, do, lse2, delta, kt, vt, offs_m[:, None] + OFF, kk, h, AUX, Lk, qk_scale, dk,
                                  dv, MASK, PREC, part, EVEN_N)
    if ATOMIC:  # this tile's share of dq, added in float32 to the rows' accumulator (B * H * Lq, BLOCK_D)
        if KT:
            dqp = tl.dot(tl.trans(ds).to(q.dtype), kt, input_precision=PREC)
        else:
            dqp = tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PREC)
        tl.atomic_add(DQA + (bh * Lq + qr)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], dqp,
                      mask=(offs_m < Lq)[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DKP, DVP, WSK, WSV, ITEMS, AUX, QN, QI, FQN, FQI,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                  stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                  lay_h, lay_m, idx_h, idx_m,
                  H, HKV, G, Lq, Lk, OFF, D, DV, qk_scale, sm_scale,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr, QD=None, DOD=None, TMA: tl.constexpr = False, MERGE: tl.constexpr = False,
                  KT: tl.constexpr = False, DQA=None, ATOMIC: tl.constexpr = False, EVEN_N: tl.constexpr = False):
    # one work item = (kv block, range [s, e) of its visiting query blocks, workspace slot or -1). MERGE: the
    # item's full and partial query blocks of a head in one loop (the mask past the full ones). KT: each tile
    # keys by queries (_bwd_kv_tile_t). EVEN_N: Lk % BLOCK_N == 0 (no key out of range)
    item = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_n = tl.load(ITEMS + item * 4)
    s0 = tl.load(ITEMS + item * 4 + 1)
    e0 = tl.load(ITEMS + item * 4 + 2)
    slot = tl.load(ITEMS + item * 4 + 3)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m0 = tl.arange(0, BLOCK_M)
    kr = _krows(pid_n * BLOCK_N, offs_n)
    if KT:
        kt = tl.load(K + b * stride_kb + hk * stride_kh + kr[:, None] * stride_kn + offs_d[None, :],
                     mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(V + b * stride_vb + hk * stride_vh + kr[:, None] * stride_vn + offs_dv[None, :],
                     mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
        kk = offs_n[:, None]
    else:
        kt = tl.load(K + b * stride_kb + hk * stride_kh + kr[None, :] * stride_kn + offs_d[:, None],
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(V + b * stride_vb + hk * stride_vh + kr[None, :] * stride_vn + offs_dv[:, None],
                     mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV), other=0.0)
        kk = offs_n[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        qoff = b * stride_qb + h * stride_qh
        dooff = b * stride_db + h * stride_dh
        # the item's range runs over the full blocks first, then the partial ones
        n_full = tl.load(FQN + h * lay_h + pid_n * lay_m)
        frow = FQI + h * idx_h + pid_n * idx_m
        n_part = tl.load(QN + h * lay_h + pid_n * lay_m)
        prow = QI + h * idx_h + pid_n * idx_m
        if MERGE:
            for j in range(s0, tl.minimum(e0, n_full + n_part)):
                part = j >= n_full
                blk = tl.where(part, tl.load(prow + (j - n_full), mask=part, other=0),
                               tl.load(frow + j, mask=j < n_full, other=0))
                dk, dv = _bwd_kv_block(blk * BLOCK_M, offs_m0, Q, DO, LSE, DELTA, qoff, dooff, bh,
                                       stride_qm, stride_dm, offs_d, offs_dv, Lq, D, DV, kt, vt, OFF, kk, h, AUX,
                                       Lk, qk_scale, dk, dv, 2, PREC, QD, DOD, TMA, part, KT, DQA, ATOMIC,
                                       BLOCK_D, EVEN_N)
        else:
            for j in range(s0, tl.minimum(e0, n_full)):
                dk, dv = _bwd_kv_block(tl.load(frow + j) * BLOCK_M, offs_m0, Q, DO, LSE, DELTA, qoff, dooff, bh,
                                       stride_qm, stride_dm, offs_d, offs_dv, Lq, D, DV, kt, vt, OFF, kk, h, AUX,
                                       Lk, qk_scale, dk, dv, 0, PREC, QD, DOD, TMA, False, KT, DQA, ATOMIC,
                                       BLOCK_D, EVEN_N)
            for j in range(tl.maximum(s0 - n_full, 0), tl.minimum(e0 - n_full, n_part)):
                dk, dv = _bwd_kv_block(tl.load(prow + j) * BLOCK_M, offs_m0, Q, DO, LSE, DELTA, qoff, dooff, bh,
                                       stride_qm, stride_dm, offs_d, offs_dv, Lq, D, DV, kt, vt, OFF, kk, h, AUX,
                                       Lk, qk_scale, dk, dv, 1, PREC, QD, DOD, TMA, False, KT, DQA, ATOMIC,
                                       BLOCK_D, EVEN_N)
    if slot < 0:
        tl.store(DKP + b * stride_dkb + hk * stride_dkh + kr[:, None] * stride_dkn + offs_d[None, :],
                 (dk * sm_scale).to(DKP.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D))
        tl.store(DVP + b * stride_dvb + hk * stride_dvh + kr[:, None] * stride_dvn + offs_dv[None, :],
                 dv.to(DVP.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV))
    else:
        # a long column split over several items: fp32 partials, summed in order by attn_bwd_reduce
        ws = (slot * (tl.num_programs(1)) + pid_bh) * BLOCK_N
        r = tl.arange(0, BLOCK_N)
        tl.store(WSK + (ws + r[:, None]) * BLOCK_D + offs_d[None, :], dk)
        tl.store(WSV + (ws + r[:, None]) * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def attn_bwd_delta(O, DO, LSE, DLSE, DELTA, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                   H, Lq, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr):
    # delta = rowsum(out * dout) - dlse (rows that see nothing drop their dlse), as attn_bwd_dq computes it;
    # for the backward whose dq comes from the dk/dv kernel (ATOMIC_DQ), which then runs no dq kernel
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rm = offs_m < Lq
    msk = rm[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :], mask=msk,
                other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :], mask=msk,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        lse = tl.load(LSE + pid_bh * Lq + offs_m, mask=rm, other=0.0)
        delta -= tl.where(lse == float("-inf"), 0.0, tl.load(DLSE + pid_bh * Lq + offs_m, mask=rm, other=0.0))
    tl.store(DELTA + pid_bh * Lq + offs_m, delta, mask=rm)


@triton.jit
def attn_bwd_reduce(WSK, WSV, RED, DKP, DVP, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                    HKV, Lk, D, DV, sm_scale,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    nbh = tl.num_programs(1)
    pid_n = tl.load(RED + i * 3)
    slot0 = tl.load(RED + i * 3 + 1)
    cnt = tl.load(RED + i * 3 + 2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    r = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + r
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for j in range(0, cnt):
        ws = ((slot0 + j) * nbh + pid_bh) * BLOCK_N
        dk += tl.load(WSK + (ws + r[:, None]) * BLOCK_D + offs_d[None, :])
        dv += tl.load(WSV + (ws + r[:, None]) * BLOCK_DV + offs_dv[None, :])
    kr = _krows(pid_n * BLOCK_N, offs_n)
    tl.store(DKP + b * stride_dkb + hk * stride_dkh + kr[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DKP.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D))
    tl.store(DVP + b * stride_dvb + hk * stride_dvh + kr[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DVP.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_q_tile(q, do, lse2, delta, kbase, vbase, offs_n, offs_d, offs_dv, stride_kn, stride_vn, qp, h, AUX,
                Lk, D, DV, qk_scale, dq, MASK: tl.constexpr, PREC: tl.constexpr, KD=None, VD=None, krow=0,
                TMA: tl.constexpr = False, part=False, EVEN_N: tl.constexpr = False, n0=0):
    # n0: the block's first key position (offs_n = n0 + arange), for the row map
    if TMA:  # EVEN only: descriptors over K's and V's (B * Hkv * Lk, D) views
        k = KD.load([krow, 0])
        vt = tl.trans(VD.load([krow, 0]))
    else:
        kr = _krows(n0, offs_n)
        k = tl.load(kbase + kr[:, None] * stride_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(vbase + kr[None, :] * stride_vn + offs_dv[:, None],
                     mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV), other=0.0)
    p = _bwd_probs(q, tl.trans(k), qp, offs_n[None, :], h, AUX, Lk, qk_scale, lse2, MASK, PREC, part, EVEN_N)
    dp = tl.dot(do, vt, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, O, DLSE, AUX, KVN, KVI, FKVN, FKVI,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                stride_dqb, stride_dqh, stride_dqm, stride_ob, stride_oh, stride_om,
                lay_h, lay_m, idx_h, idx_m,
                H, G, Lq, Lk, OFF, D, DV, qk_scale, sm_scale,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr, HAS_DLSE: tl.constexpr, PACK: tl.constexpr = 1, KD=None, VD=None,
                TMA: tl.constexpr = False, MERGE: tl.constexpr = False, EVEN_N: tl.constexpr = False):
    # PACK query heads of a GQA group per program, as in attn_fwd; MERGE: full and partial kv blocks in one
    # loop (the mask past the full ones), the next block index loaded a step ahead; EVEN_N: Lk % BLOCK_N == 0
    ROWS: tl.constexpr = PACK * BLOCK_M
    pid_m = tl.program_id(0)
    b, h, hk, offs_m, hr = _packed_rows(pid_m, tl.program_id(1), H, G, BLOCK_M, PACK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    qr = _qrows(pid_m * BLOCK_M, offs_m)
    lrow = (b * H + hr) * Lq + qr
    q, do, lse2, empty = _bwd_load_q(Q, DO, LSE, b * stride_qb + hr * stride_qh + qr * stride_qm,
                                     b * stride_db + hr * stride_dh + qr * stride_dm, lrow,
                                     offs_m, offs_d, offs_dv, Lq, D, DV)
    # delta = rowsum(out * dout) - dlse, stored for attn_bwd_dkdv (launched after this kernel); the dlse of
    # rows that see nothing is dropped (their lse is -inf, its gradient meaningless)
    rm = offs_m < Lq
    o = tl.load(O + b * stride_ob + hr[:, None] * stride_oh + qr[:, None] * stride_om + offs_dv[None, :],
                mask=rm[:, None] & (offs_dv[None, :] < DV), other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.where(empty, 0.0, tl.load(DLSE + lrow, mask=rm, other=0.0))
    tl.store(DELTA + lrow, delta, mask=rm)
    qp = offs_m[:, None] + OFF
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    n_full = tl.load(FKVN + h * lay_h + pid_m * lay_m)
    frow = FKVI + h * idx_h + pid_m * idx_m
    n_part = tl.load(KVN + h * lay_h + pid_m * lay_m)
    prow = KVI + h * idx_h + pid_m * idx_m
    kvrow = (b * (H // G) + hk) * Lk
    if MERGE:
        nxt = tl.load(frow, mask=n_full > 0, other=0)
        if n_full == 0:
            nxt = tl.load(prow, mask=n_part > 0, other=0)
        for j in range(0, n_full + n_part):
            part = j >= n_full
            n0 = nxt * BLOCK_N
            jn = j + 1
            nxt = tl.where(jn < n_full, tl.load(frow + jn, mask=jn < n_full, other=0),
                           tl.load(prow + (jn - n_full), mask=(jn >= n_full) & (jn < n_full + n_part), other=0))
            dq = _bwd_q_tile(q, do, lse2, delta, kbase, vbase, n0 + offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                             qp, h, AUX, Lk, D, DV, qk_scale, dq, 2, PREC, KD, VD, kvrow + n0, TMA, part, EVEN_N, n0)
    else:
        for j in range(0, n_full):
            n0 = tl.load(frow + j) * BLOCK_N
            dq = _bwd_q_tile(q, do, lse2, delta, kbase, vbase, n0 + offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                             qp, h, AUX, Lk, D, DV, qk_scale, dq, 0, PREC, KD, VD, kvrow + n0, TMA, False, EVEN_N, n0)
        for j in range(0, n_part):
            n0 = tl.load(prow + j) * BLOCK_N
            dq = _bwd_q_tile(q, do, lse2, delta, kbase, vbase, n0 + offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                             qp, h, AUX, Lk, D, DV, qk_scale, dq, 1, PREC, KD, VD, kvrow + n0, TMA, False, EVEN_N, n0)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + hr[:, None] * stride_dqh + qr[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
'''

_lock = threading.Lock()
_modules: dict = {}


def _cache_dir() -> str:
    d = os.environ.get("ATTNZOO_CACHE") or os.path.join(tempfile.gettempdir(), f"attnzoo-{os.getuid()}", "triton")
    os.makedirs(d, exist_ok=True)
    return d


def kernel_module(body_lines: list[str], *sources: str, rows: tuple | None = None):
    """Import (once) the module made of the prelude with this ``_mask`` body followed by the given kernel
    sources (default: the forward kernel). ``rows``: the bodies (lists of lines, or None for the identity) of
    the row maps ``_qrows`` / ``_krows`` (see PRELUDE). Triton needs real source files, so it is written to a
    cache."""
    indent = lambda lines: "\n".join("    " + line for line in lines)
    qrows, krows = rows or (None, None)
    src = PRELUDE.format(body=indent(body_lines), qrows=indent(qrows or ["return x"]),
                         krows=indent(krows or ["return x"])) + "".join(sources or (FWD,))
    return import_source(src, "attnzoo_fwd", "attnzoo_triton_fwd", lambda mod: _mark(mod, body_lines, qrows, krows))


def _mark(mod, body_lines, qrows, krows):
    # whether the mask reads the query head (PerHead, per-head block masks): packing heads needs it not to
    mod.uses_head = any("hq" in line for line in body_lines)
    # whether the query / key rows are mapped (no contiguous row blocks: no tensor descriptors on that side)
    mod.maps_q, mod.maps_k = qrows is not None, krows is not None


def import_source(src: str, file_prefix: str, module_prefix: str, init=None):
    """Import (once per process, keyed by the source's hash) the module with source ``src``, written first to the
    cache (Triton and Gluon need real source files); ``init(mod)`` runs once on a newly imported module."""
    key = hashlib.sha1(src.encode()).hexdigest()[:20]
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        path = os.path.join(_cache_dir(), f"{file_prefix}_{key}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        name = f"{module_prefix}_{key}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        if init is not None:
            init(mod)
        _modules[key] = mod
        return mod
