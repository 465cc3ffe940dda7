"""Hopper (sm_90) forward kernels written in Gluon, Triton's lower-level language, over the same `BlockLayout`.

GPU-only: Gluon kernels do not run in Triton's interpreter. What Triton's own schedule does not do, these kernels do
by hand (FlashAttention-3's overlaps):

- Warp specialisation: a producer warp issues every TMA load -- Q, then K and V tiles into a ring of ``STAGES`` (cfg
  num_stages) shared-memory slots -- and two consumer warpgroups, one per query head of a GQA pair (64 rows each),
  free ring slots through count-2 "empty" mbarriers instead of a CTA barrier, so one's softmax overlaps the other's
  MMAs.
- Within a consumer, step j issues the scores ``S_j = Q K_j^T`` and the previous step's ``acc += P_{j-1} V_{j-1}``
  as asynchronous warpgroup MMAs, waits for ``S_j`` only, and runs the mask and the softmax of step j while
  ``P_{j-1} V_{j-1}`` is still on the tensor cores. P stays in registers as the left operand of ``P V``.

Two forms. ``gluon_attn_fwd_ws`` (cfg GLUON="ws"): one program per work item (query block, head pair). On the H100
(16K, 64 / 8 heads, D = 128; BENCHMARKS.md) 643 TF/s on causal on 64 x 128 tiles (1.22x the Triton default, 1.48x
flex): the dense class's default forward on Hopper (`tuning._gluon`, run by `ops._gluon_fwd`).
``gluon_attn_fwd_wsp`` (GLUON="wsp") is its persistent form (see there), the default of the local and wide classes:
window 1024 1.62x flex at 0.81 of ideal (16K), window 4096 1.59x. NARROW (block 0 as a 16-key sink tile, both
forms; on by default since the nineteenth session, `ops.GLUON_NARROW`) runs attention sinks behind a window, with
MASK_FAR (block 0 first where it is partial) and, in the persistent form, NARROW_LAST 2 (consumer 1 takes the sink
tile at its items' ends; twenty-eighth session, sinks + window 1.100 -> 1.082 ms at 16K). On the local class the
persistent form runs XPIPE (each item's first scores with the previous item's last P V) and, instead of the sink
tile, NFOLD: the sinks loaded into an unseen 16-key slot of one of each item's partial blocks (thirty-second session,
sinks + window 1.052 -> 1.022 ms at 16K, 0.80 of ideal in `attnzoo bench`). A first, single-partition
form (one CTA barrier a step) ran at 0.76-0.94x the Triton kernel and was removed in the eighteenth session. HALF
(thirtieth session; commit 886714f has it) ran a window's edge block, seen in one 64-key half only, last as a 64-key
half step: right, and slower on the H100 (window 1024 1.013 -> 1.041 ms at 16K), so removed.

Supported here: block-multiple lengths, head dims 64 / 128 (D = Dv), float16 / bfloat16, contiguous (B, H, L, D)
tensors, a mask body without lookups (the pattern's `_mask` written into the module as for the Triton kernel), a
head-independent layout whose full blocks form one contiguous run per query block (windows, sinks + window,
causal). `ops.gluon_plan` says why not elsewhere; `ops.attention_fwd` falls back to the Triton kernel then.
"""
from __future__ import annotations

import functools

from .kernels import import_source

PRELUDE = '''
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared, warpgroup_mma, \\
    warpgroup_mma_wait


@gluon.jit
def _fdiv(x, s):
    return gl.where(x >= 0, x // s, -((s - 1 - x) // s))


@gluon.jit
def _fmod(x, s):
    return x - _fdiv(x, s) * s


@gluon.constexpr_function
def _wg_layout(N):
    # a warpgroup MMA accumulator's layout with N columns (64 rows a warpgroup): the scores of N keys (the narrow
    # tile's with N = NARROW), an output tile of N = D columns, or a backward accumulator (dK, dV, dq columns)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])


@gluon.jit
def _mask(qp, kk, hq, AUX):
{body}


@gluon.jit
def _mask_far(qp, kk, hq, AUX):
    # (cfg MASK_FAR) the same mask for keys past the first kv block only: sinks / prefixes shorter than a block drop out
{far}
'''

KERNEL = '''

@gluon.jit
def _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m):
    # query block pid_m's kv blocks in the layout: nf full ones from f0 on (one contiguous run), then the partial
    # list at prow; n in all
    nf = gl.load(FKVN + h * lay_h + pid_m * lay_m)
    n = nf + gl.load(KVN + h * lay_h + pid_m * lay_m)
    f0 = gl.load(FKVI + h * idx_h + pid_m * idx_m, mask=nf > 0, other=0)
    return nf, f0, KVI + h * idx_h + pid_m * idx_m, n


@gluon.jit
def _blk(j, nf, f0, prow, n, z, FAR: gl.constexpr):
    # the kv block of step j: the nf full blocks f0, f0 + 1, ... then the partial list (prow); 0 past the end.
    # FAR with z = 1 (_zfirst): block 0, the partial list's first, comes first, then the full blocks, then the rest
    if FAR:
        jf = j - z
        full = (jf >= 0) & (jf < nf)
        return gl.where(full, f0 + jf, gl.load(prow + gl.where(jf < 0, 0, j - nf), mask=(~full) & (j < n), other=0))
    else:
        return gl.where(j < nf, f0 + j, gl.load(prow + (j - nf), mask=(j >= nf) & (j < n), other=0))


@gluon.jit
def _part(j, nf, z, FAR: gl.constexpr):
    # whether step j runs a partial block (masked): see _blk
    if FAR:
        return (j - z < 0) | (j - z >= nf)
    else:
        return j >= nf


@gluon.jit
def _zfirst(nf, prow, n, FAR: gl.constexpr):
    # (MASK_FAR) 1 where block 0 is a partial block that would run after full ones -- it then runs first, so the main
    # loop (steps 1 ..) never meets it and takes the shorter mask (_mask_far); else 0
    if FAR:
        return ((nf > 0) & (n > nf) & (gl.load(prow, mask=n > nf, other=1) == 0)).to(gl.int32)
    else:
        return 0


@gluon.jit
def _softmax(s, m_i, l_i, qp, kpos, h, AUX, qk_scale, part, dtype: gl.constexpr, p_layout: gl.constexpr,
             FARMASK: gl.constexpr = False, c0s=0, NFOLD: gl.constexpr = False, SN: gl.constexpr = 16):
    # one step's raw scores s: the pattern's mask where the block is partial, then the online softmax update in
    # base 2 with the scale folded into the exponent -> the new maxima and sums, P (the left operand of P V, in
    # registers) and each row's factor for acc. FARMASK: the block lies past block 0, where _mask_far holds.
    # NFOLD: the SN columns at key positions c0s .. c0s + SN hold the sinks, keys 0 .. SN (_x_head)
    if part:
        if NFOLD:
            dk = kpos - c0s
            kpos = gl.where((dk >= 0) & (dk < SN), dk, kpos)
        if FARMASK:
            s = gl.where(_mask_far(qp, gl.expand_dims(kpos, 0), h, AUX), s, float("-inf"))
        else:
            s = gl.where(_mask(qp, gl.expand_dims(kpos, 0), h, AUX), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    alpha = gl.exp2(m_i - m_safe)
    pf = gl.exp2(s * qk_scale - gl.expand_dims(m_safe, 1))
    l_i = l_i * alpha + gl.sum(pf, 1)
    return m_new, l_i, gl.convert_layout(pf.to(dtype), p_layout), alpha


# The warp-specialised form (cfg GLUON="ws"): a producer warp issues the TMA loads (Q once, then K and V into the
# ring), and two consumer warpgroups, one per query head of the program (PACK 2), each run the loop (_ws_item) on
# their own 64 rows: step j issues the scores S_j = Q K_j^T and the previous step's acc += P_{j-1} V_{j-1} as
# asynchronous warpgroup MMAs, waits for S_j only, and runs the mask and the softmax of step j while P_{j-1} V_{j-1}
# is still on the tensor cores. No CTA barrier: a ring slot is refilled once both consumers have arrived on
# its "empty" barrier (count 2), so each warpgroup runs at its own pace and one's softmax can overlap the other's
# MMAs (FlashAttention-3's inter-warpgroup overlap, left to the warp schedulers; PINGPONG orders the two
# warpgroups' score MMAs explicitly through a pair of turn barriers).

@gluon.jit
def _ring_barriers(STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    # the K / V ring's mbarriers: ready (the producer's TMA bytes) and empty (both consumers' arrivals) per slot,
    # and the two consumers' turn barriers (PINGPONG: consumer 0 issues first)
    kready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    vready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kempty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    vempty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(kready.index(i), count=1)
        mbarrier.init(vready.index(i), count=1)
        mbarrier.init(kempty.index(i), count=2)
        mbarrier.init(vempty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    if PINGPONG:
        mbarrier.arrive(turn.index(0), count=1)
    return kready, vready, kempty, vempty, turn


@gluon.jit
def _q_barriers(QBUF: gl.constexpr):
    # the persistent kernels' Q buffers' mbarriers: ready (the producer's TMA bytes) and empty (both consumers' arrivals)
    qready = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    qempty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(QBUF):
        mbarrier.init(qready.index(i), count=1)
        mbarrier.init(qempty.index(i), count=2)
    return qready, qempty


@gluon.jit
def _ws_load_steps(kd, vd, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n, it0, z,
                   STAGES: gl.constexpr, BLOCK_N: gl.constexpr, FAR: gl.constexpr):
    # the producer's K / V loads of one work item's n steps, ring steps it0 .. it0 + n - 1 (slot and phase run on
    # across work items in the persistent kernel)
    for j in range(0, n):
        it = it0 + j
        slot = it % STAGES
        ph = (it // STAGES) & 1
        row = kvrow + _blk(j, nf, f0, prow, n, z, FAR) * BLOCK_N
        mbarrier.wait(kempty.index(slot), ph ^ 1)
        mbarrier.expect(kready.index(slot), kd.block_type.nbytes)
        tma.async_copy_global_to_shared(kd, [row, 0], kready.index(slot), k_smem.index(slot))
        mbarrier.wait(vempty.index(slot), ph ^ 1)
        mbarrier.expect(vready.index(slot), vd.block_type.nbytes)
        tma.async_copy_global_to_shared(vd, [row, 0], vready.index(slot), v_smem.index(slot))


@gluon.jit
def _narrow_flag(NROW, pid_m, prow, n, NARROW: gl.constexpr):
    # NARROW: 1 where query block pid_m runs kv block 0 as a NARROW-key tile (ops._narrow_rows: block 0 is its first
    # partial block and it sees only keys below NARROW there -- attention sinks behind a window), else 0; the partial
    # list and the step count without block 0 then
    if NARROW > 0:
        nw = gl.load(NROW + pid_m)
    else:
        nw = 0
    return nw, prow + nw, n - nw


# NFOLD (cfg XPIPE_NARROW="fold", with XPIPE; thirty-second session): no narrow tile and no narrow step. Each
# flagged item's sinks go into SN columns of one of its partial kv blocks that none of its queries sees (a window's
# first block starts with such columns where the query block is odd, its diagonal block ends with them where it is
# even; ops._narrow_fold finds them and puts that block first in the item's partial list, after block 0, which the
# flag drops): the item runs it as its first step (_zfold), the producer loads its tile in SN-row pieces with the
# sinks' rows in place of the unseen ones, and the consumers mask that step with the sinks' positions in those
# columns. The main loop (steps 1 ..) is the plain one with MASK_FAR's shorter mask, and an item costs what it costs
# without sinks. NROW holds 1 + the slot (its SN-column index in the block; 0: not flagged).

@gluon.jit
def _fold_flag(NROW, pid_m, prow, n, CH: gl.constexpr):
    # (NFOLD) _narrow_flag's (nw, prow, n), and the SN-column slot of query block pid_m's first step that holds the
    # sinks (CH, none, where unflagged)
    v = gl.load(NROW + pid_m)
    nw = gl.minimum(v, 1)
    return nw, prow + nw, n - nw, gl.where(v > 0, v - 1, CH)


@gluon.jit
def _zfold(nf, prow, n, nw, FAR: gl.constexpr):
    # (NFOLD) _zfirst, and 1 on a flagged item with full blocks: its fold block, its partial list's first (after the
    # dropped block 0), then comes first too
    return _zfirst(nf, prow, n, FAR) | ((nw != 0) & (nf > 0) & (n > nf)).to(gl.int32)


@gluon.jit
def _fold_copy(d, dn, bar, smem, row, kvrow, sc, fold, BLOCK_N: gl.constexpr, SN: gl.constexpr):
    # (NFOLD) one K or V tile (rows row ..) into smem, or where fold in SN-row pieces with piece sc from the sinks'
    # rows (kvrow ..) instead of the block's
    if fold:
        for r in gl.static_range(BLOCK_N // SN):
            tma.async_copy_global_to_shared(dn, [gl.where(sc == r, kvrow, row + r * SN), 0], bar,
                                            smem.slice(r * SN, SN))
    else:
        tma.async_copy_global_to_shared(d, [row, 0], bar, smem)


@gluon.jit
def _fold_load_steps(kd, vd, kdn, vdn, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n, it0,
                     z, sc, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, SN: gl.constexpr, FAR: gl.constexpr):
    # (NFOLD) the producer's K / V loads of one work item (as _ws_load_steps): where sc < BLOCK_N / SN, step 0's tile
    # with the sinks in its piece sc (_fold_copy)
    for j in range(0, n):
        it = it0 + j
        slot = it % STAGES
        ph = (it // STAGES) & 1
        row = kvrow + _blk(j, nf, f0, prow, n, z, FAR) * BLOCK_N
        fold = (j == 0) & (sc < BLOCK_N // SN)
        mbarrier.wait(kempty.index(slot), ph ^ 1)
        mbarrier.expect(kready.index(slot), kd.block_type.nbytes)
        _fold_copy(kd, kdn, kready.index(slot), k_smem.index(slot), row, kvrow, sc, fold, BLOCK_N, SN)
        mbarrier.wait(vempty.index(slot), ph ^ 1)
        mbarrier.expect(vready.index(slot), vd.block_type.nbytes)
        _fold_copy(vd, vdn, vready.index(slot), v_smem.index(slot), row, kvrow, sc, fold, BLOCK_N, SN)


@gluon.jit
def _q_load(qd, kdn, vdn, q_smem, nbuf, bar, qb, qrow0, Lq, kvrow, nw, NARROW: gl.constexpr):
    # a work item's Q tiles (both heads) into Q buffer qb, and with them, where nw, its narrow K / V tile (rows
    # kvrow .. kvrow + NARROW) into the narrow buffer qb -- one mbarrier for all, so the narrow tile is ready with Q
    # and free with it (the consumers' narrow step is done before they free Q)
    # (the narrow tile for every item, flagged or not: one expect, no predicates -- see _ws_item)
    if NARROW > 0:
        kn_smem, vn_smem = nbuf
        mbarrier.expect(bar, 2 * qd.block_type.nbytes + kdn.block_type.nbytes + vdn.block_type.nbytes)
    else:
        mbarrier.expect(bar, 2 * qd.block_type.nbytes)
    tma.async_copy_global_to_shared(qd, [qrow0, 0], bar, q_smem.index(2 * qb))
    tma.async_copy_global_to_shared(qd, [qrow0 + Lq, 0], bar, q_smem.index(2 * qb + 1))
    if NARROW > 0:
        tma.async_copy_global_to_shared(kdn, [kvrow, 0], bar, kn_smem.index(qb))
        tma.async_copy_global_to_shared(vdn, [kvrow, 0], bar, vn_smem.index(qb))


@gluon.jit
def _narrow_setup(m0, OFF, BLOCK_M: gl.constexpr, NARROW: gl.constexpr):
    # the narrow tile's query positions (a column), key positions (0 .. NARROW) and zero scores, in its score layout
    sn_layout: gl.constexpr = _wg_layout(NARROW)
    qp = gl.expand_dims(m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, sn_layout)) + OFF, 1)
    kpos = gl.arange(0, NARROW, layout=gl.SliceLayout(0, sn_layout))
    return qp, kpos, gl.zeros([BLOCK_M, NARROW], gl.float32, layout=sn_layout)


@gluon.jit
def _narrow_step(qs, kn_smem, vn_smem, m0, OFF, hc, AUX, qk_scale, srow: gl.constexpr, o_layout: gl.constexpr,
                 p_layout: gl.constexpr, BLOCK_M: gl.constexpr, NARROW: gl.constexpr, D: gl.constexpr):
    # a consumer's first step on a narrow work item (its narrow tile loaded with Q): scores against the NARROW-key
    # tile (masked), the softmax from scratch and acc = P V -> (m_i, l_i, acc)
    dtype: gl.constexpr = kn_smem.dtype
    snrow: gl.constexpr = gl.SliceLayout(1, _wg_layout(NARROW))
    qp, kpos, s0 = _narrow_setup(m0, OFF, BLOCK_M, NARROW)
    s = warpgroup_mma(qs, kn_smem.permute((1, 0)), s0, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    m_i, l_i, p, alpha = _softmax(s, gl.full([BLOCK_M], float("-inf"), gl.float32, layout=snrow),
                                  gl.zeros([BLOCK_M], gl.float32, layout=snrow), qp, kpos, hc, AUX, qk_scale, True,
                                  dtype, p_layout)
    acc = warpgroup_mma(p, vn_smem, gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout), use_acc=False,
                        is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return gl.convert_layout(m_i, srow), gl.convert_layout(l_i, srow), acc


@gluon.jit
def _narrow_last(qs, kn_smem, vn_smem, vl_smem, vl_ready, vl_empty, vl_phase, p, acc, m_i, l_i, m0, OFF, hc, AUX, nw,
                 qk_scale, srow: gl.constexpr, orow: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                 BLOCK_M: gl.constexpr, NARROW: gl.constexpr, D: gl.constexpr):
    # (NLAST) a consumer's item end with the narrow tile last: its scores are issued with the last block's P V
    # (vl_smem), so that they and their softmax run while that MMA is on the tensor cores, instead of a step of its own
    # at the item's start with both consumers' MMAs idle; then the rescale and the narrow tile's P V. Branch-free in
    # nw: on an unflagged item the scores are all masked (p = 0, factor 1). Needs n > 0 (ops._narrow_merge_ok)
    dtype: gl.constexpr = kn_smem.dtype
    snrow: gl.constexpr = gl.SliceLayout(1, _wg_layout(NARROW))
    qp, kpos, s0 = _narrow_setup(m0, OFF, BLOCK_M, NARROW)
    s = warpgroup_mma(qs, kn_smem.permute((1, 0)), s0, use_acc=False, is_async=True)
    mbarrier.wait(vl_ready, vl_phase)
    acc = warpgroup_mma(p, vl_smem, acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    s = gl.where(nw != 0, s, float("-inf"))
    m_n, l_n, pn, alpha = _softmax(s, gl.convert_layout(m_i, snrow), gl.convert_layout(l_i, snrow), qp, kpos, hc, AUX,
                                   qk_scale, True, dtype, p_layout)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(vl_empty, count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
    acc = warpgroup_mma(pn, vn_smem, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return gl.convert_layout(m_n, srow), gl.convert_layout(l_n, srow), acc


@gluon.jit
def _narrow_buffers(kdn, vdn, k_smem, v_smem, D: gl.constexpr, NARROW: gl.constexpr, NBUF: gl.constexpr):
    # the narrow tile's K / V buffers, one per Q buffer (the ring's, unused, without NARROW)
    if NARROW > 0:
        kn_smem = gl.allocate_shared_memory(kdn.dtype, [NBUF, NARROW, D], kdn.layout)
        vn_smem = gl.allocate_shared_memory(vdn.dtype, [NBUF, NARROW, D], vdn.layout)
        return kn_smem, vn_smem
    else:
        return k_smem, v_smem


@gluon.jit
def _ws_producer(qd, kd, vd, kdn, vdn, q_smem, k_smem, v_smem, nbuf, qbar, kready, vready, kempty, vempty,
                 qrow0, Lq, kvrow, nf, f0, prow, n, nw, z, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                 NARROW: gl.constexpr, FAR: gl.constexpr):
    _q_load(qd, kdn, vdn, q_smem, nbuf, qbar, 0, qrow0, Lq, kvrow, nw, NARROW)
    _ws_load_steps(kd, vd, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n, 0, z, STAGES,
                   BLOCK_N, FAR)


@gluon.jit
def _step(C: gl.constexpr, j, it0, qs, k_smem, v_smem, kready, vready, kempty, vempty, turn, p, acc, m_i, l_i, s_zero,
          qp, cols, nf, f0, prow, n, z, h, AUX, qk_scale, orow: gl.constexpr, p_layout: gl.constexpr,
          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FAR: gl.constexpr, PINGPONG: gl.constexpr):
    # one step j >= 1 of a consumer's main loop (ring step it0 + j): the scores S_j issued with the previous step's
    # P V, the mask and softmax of step j while that P V runs, then the rescale -> (m_i, l_i, P_j, acc)
    it = it0 + j
    slot = it % STAGES
    pslot = (it + STAGES - 1) % STAGES
    blk = _blk(j, nf, f0, prow, n, z, FAR)
    mbarrier.wait(kready.index(slot), (it // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(C), it & 1)
    s = warpgroup_mma(qs, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(vready.index(pslot), ((it - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(pslot), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - C), count=1)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    mbarrier.arrive(kempty.index(slot), count=1)
    m_i, l_i, p, alpha = _softmax(s, m_i, l_i, qp, blk * BLOCK_N + cols, h + C, AUX, qk_scale, _part(j, nf, z, FAR),
                                  k_smem.dtype, p_layout, FAR)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(vempty.index(pslot), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
    return m_i, l_i, p, acc


@gluon.jit
def _store_out(acc, m_i, l_i, O, LSE, row0, orow: gl.constexpr, o_layout: gl.constexpr, D: gl.constexpr,
               BLOCK_M: gl.constexpr):
    # a consumer's item epilogue: out = acc / l into rows row0 .. row0 + BLOCK_M of the (B * H * Lq, D) view, and lse
    # (-inf on rows that saw nothing)
    l_o = gl.convert_layout(l_i, orow)
    l_safe = gl.where(l_o > 0, l_o, 1.0)
    orow_g = (row0 + gl.arange(0, BLOCK_M, layout=orow)).to(gl.int64)
    ocols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + orow_g[:, None] * D + ocols[None, :], (acc / gl.expand_dims(l_safe, 1)).to(O.dtype.element_ty))
    m_o = gl.convert_layout(m_i, orow)
    gl.store(LSE + orow_g, gl.where(l_o > 0, (m_o + gl.log2(l_safe)) * 0.6931471805599453, float("-inf")))


@gluon.jit
def _ws_item(C: gl.constexpr, qs, k_smem, v_smem, kn_smem, vn_smem, kready, vready, kempty, vempty, turn, qempty,
             O, LSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, it0, nw, z, qk_scale,
             D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             PINGPONG: gl.constexpr, QEMPTY: gl.constexpr, NARROW: gl.constexpr, NMERGE: gl.constexpr,
             FAR: gl.constexpr, NLAST: gl.constexpr = False):
    # consumer C (0 or 1) on one work item: query head h + C, rows qrow0 + C * Lq + (0 .. BLOCK_M) of the
    # (B * H * Lq, D) views, its Q in qs (loaded), its n steps at ring steps it0 ..; QEMPTY: arrive on qempty once
    # its last score MMA is done (the persistent kernel's Q buffer is then free). nw: the item starts with the
    # narrow tile (kn_smem, vn_smem, loaded with Q), so acc, m_i and l_i start from that step -- or, NLAST, ends with
    # it: its scores issued with the last block's P V (see _narrow_last)
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = _wg_layout(BLOCK_N)
    o_layout: gl.constexpr = _wg_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = gl.arange(0, BLOCK_M, layout=srow)
    qp = gl.expand_dims(m0 + rows + OFF, 1)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=srow)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=srow)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    p = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_layout)
    if NARROW > 0 and not NMERGE and not NLAST:
        # the narrow step on every item, its result kept where nw: a branch around its MMAs (if nw != 0) gave wrong
        # outputs on the unflagged items of the persistent kernel with two Q buffers (H100, nineteenth session,
        # benchmarks/gluon_narrow_map.py: with or without the tile's load predicated; the ws kernel and one Q
        # buffer were right) -- the branch-free form is right in every case there
        m_n, l_n, acc_n = _narrow_step(qs, kn_smem, vn_smem, m0, OFF, h + C, AUX, qk_scale, srow, o_layout,
                                       p_layout, BLOCK_M, NARROW, D)
        m_i = gl.where(nw != 0, m_n, m_i)
        l_i = gl.where(nw != 0, l_n, l_i)
        acc = gl.where(nw != 0, acc_n, acc)
    if n > 0:
        blk = _blk(0, nf, f0, prow, n, z, FAR)
        slot0 = it0 % STAGES
        mbarrier.wait(kready.index(slot0), (it0 // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn.index(C), it0 & 1)
        if NMERGE:  # (NARROW_MERGE) the narrow tile's scores issued with step 0's
            sn_layout: gl.constexpr = _wg_layout(NARROW)
            s_n = warpgroup_mma(qs, kn_smem.permute((1, 0)), gl.zeros([BLOCK_M, NARROW], gl.float32,
                                                                      layout=sn_layout), use_acc=False, is_async=True)
        s = warpgroup_mma(qs, k_smem.index(slot0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - C), count=1)
        if NMERGE:
            s_n, s = warpgroup_mma_wait(num_outstanding=0, deps=(s_n, s))
        else:
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(kempty.index(slot0), count=1)
        if NMERGE:
            # one online-softmax update over both tiles: the narrow tile's row maxima (nothing where the item is not
            # flagged) start m_i, step 0's scores raise it, and P_n V_n starts acc at the same maxima (no rescale)
            snrow: gl.constexpr = gl.SliceLayout(1, sn_layout)
            qp_n = gl.expand_dims(m0 + gl.arange(0, BLOCK_M, layout=snrow) + OFF, 1)
            kpos_n = gl.expand_dims(gl.arange(0, NARROW, layout=gl.SliceLayout(0, sn_layout)), 0)
            s_n = gl.where(_mask(qp_n, kpos_n, h + C, AUX) & (nw != 0), s_n, float("-inf"))
            m_i = gl.convert_layout(gl.max(s_n, 1) * qk_scale, srow)
        m_i, l_i, p, alpha = _softmax(s, m_i, l_i, qp, blk * BLOCK_N + cols, h + C, AUX, qk_scale,
                                      _part(0, nf, z, FAR), dtype, p_layout)
        if NMERGE:
            m_n = gl.convert_layout(gl.where(m_i == float("-inf"), 0.0, m_i), snrow)
            p_n = gl.exp2(s_n * qk_scale - gl.expand_dims(m_n, 1))
            l_i = l_i + gl.convert_layout(gl.sum(p_n, 1), srow)
            acc = warpgroup_mma(gl.convert_layout(p_n.to(dtype), p_layout), vn_smem, acc, use_acc=False,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))  # (an async result cannot leave the branch)
        elif NARROW > 0 and not NLAST:  # acc holds the narrow step's P V
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
    for j in range(1, n):
        m_i, l_i, p, acc = _step(C, j, it0, qs, k_smem, v_smem, kready, vready, kempty, vempty, turn, p, acc, m_i, l_i,
                                 s_zero, qp, cols, nf, f0, prow, n, z, h, AUX, qk_scale, orow, p_layout, BLOCK_N,
                                 STAGES, FAR, PINGPONG)
    if QEMPTY and not NLAST:
        mbarrier.arrive(qempty, count=1)
    if n > 0:
        lslot = (it0 + n - 1) % STAGES
        if NLAST:
            m_i, l_i, acc = _narrow_last(qs, kn_smem, vn_smem, v_smem.index(lslot), vready.index(lslot),
                                         vempty.index(lslot), ((it0 + n - 1) // STAGES) & 1, p, acc, m_i, l_i, m0,
                                         OFF, h + C, AUX, nw, qk_scale, srow, orow, o_layout, p_layout, BLOCK_M,
                                         NARROW, D)
        else:
            mbarrier.wait(vready.index(lslot), ((it0 + n - 1) // STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(lslot), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(vempty.index(lslot), count=1)
    if QEMPTY and NLAST:  # (after the narrow tile's P V: its buffers go with Q's)
        mbarrier.arrive(qempty, count=1)
    _store_out(acc, m_i, l_i, O, LSE, qrow0 + C * Lq, orow, o_layout, D, BLOCK_M)


@gluon.jit
def _ws_consumer(C: gl.constexpr, q_smem, k_smem, v_smem, nbuf, qbar, kready, vready, kempty, vempty, turn,
                 O, LSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, nw, z, qk_scale,
                 D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 PINGPONG: gl.constexpr, NARROW: gl.constexpr, NMERGE: gl.constexpr, FAR: gl.constexpr):
    mbarrier.wait(qbar, 0)
    kn_smem, vn_smem = nbuf
    _ws_item(C, q_smem.index(C), k_smem, v_smem, kn_smem.index(0), vn_smem.index(0), kready, vready, kempty, vempty,
             turn, qbar, O, LSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, 0, nw, z, qk_scale, D, BLOCK_M,
             BLOCK_N, STAGES, PINGPONG, False, NARROW, NMERGE, FAR)


@gluon.jit
def _ws_program(H, Lq, BLOCK_M: gl.constexpr):
    # a ws program's work item from its grid position (query block, head pair): (query block, batch, first head of
    # the pair, first query row, that row in the (B * H * Lq, D) view)
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // (H // 2)
    h = (pid_bh % (H // 2)) * 2
    m0 = pid_m * BLOCK_M
    return pid_m, b, h, m0, (b * H + h) * Lq + m0


@gluon.jit
def gluon_attn_fwd_ws(qd, kd, vd, kdn, vdn, O, LSE, AUX, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m,
                      H, G, Lq, Lk, OFF, qk_scale,
                      D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, NARROW: gl.constexpr,
                      NMERGE: gl.constexpr, FAR: gl.constexpr):
    # PACK 2 only: two query heads of one GQA group, one consumer warpgroup each (kernel num_warps = 4)
    dtype: gl.constexpr = kd.dtype
    pid_m, b, h, m0, qrow0 = _ws_program(H, Lq, BLOCK_M)
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], qd.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], vd.layout)
    qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(qbar, count=1)
    kready, vready, kempty, vempty, turn = _ring_barriers(STAGES, PINGPONG)
    nbuf = _narrow_buffers(kdn, vdn, k_smem, v_smem, D, NARROW, 1)
    nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
    nw, prow, n = _narrow_flag(NROW, pid_m, prow, n, NARROW)
    z = _zfirst(nf, prow, n, FAR)
    kvrow = (b * (H // G) + h // G) * Lk
    gl.warp_specialize([
        (_ws_consumer, (0, q_smem, k_smem, v_smem, nbuf, qbar, kready, vready, kempty, vempty, turn, O, LSE, AUX, h,
                        qrow0, Lq, m0, OFF, nf, f0, prow, n, nw, z, qk_scale, D, BLOCK_M, BLOCK_N, STAGES,
                        PINGPONG, NARROW, NMERGE, FAR)),
        (_ws_consumer, (1, q_smem, k_smem, v_smem, nbuf, qbar, kready, vready, kempty, vempty, turn, O, LSE, AUX, h,
                        qrow0, Lq, m0, OFF, nf, f0, prow, n, nw, z, qk_scale, D, BLOCK_M, BLOCK_N, STAGES,
                        PINGPONG, NARROW, NMERGE, FAR)),
        (_ws_producer, (qd, kd, vd, kdn, vdn, q_smem, k_smem, v_smem, nbuf, qbar, kready, vready, kempty, vempty,
                        qrow0, Lq, kvrow, nf, f0, prow, n, nw, z, STAGES, BLOCK_N, NARROW, FAR)),
    ], [4, 1], [CONSUMER_REGS, 24])



# The backward's dq kernel in the same form (cfg GLUON_BWD=dict(GLUON_DQ=True); twentieth session, first run in the
# twenty-first, in the backward's defaults since then): it walks the forward's layout (query block, its kv blocks)
# with the forward's producer, so it lives here. A producer warp loads both heads' Q and dO once, then K and V tiles
# (64 keys) into the ring; consumer C (query head h + C, 64 rows) issues S = Q K^T and dP = dO V^T, takes P = exp2(S * scale - lse) (the mask on partial blocks)
# and dS = P (dP - delta) in registers, and adds dS K to its dq accumulator with dS as the register operand (no
# shared-memory round trip, no atomics: each program owns its rows). FUSE_DELTA (the default since the twenty-second
# session): each consumer computes its rows' delta = rowsum(O * dO) - dlse before its loop (O from global memory, dO
# from the tile the producer loaded) and stores it for the dk / dv kernel, launched after this one -- as the Triton dq
# kernel does; without it delta comes from attn_bwd_delta, run first (a kernel of its own: 0.18 ms at 16K, 64 heads,
# 5 % of window 1024's backward, H100).

@gluon.jit
def _dq_producer(qd, dod, kd, vd, q_smem, do_smem, k_smem, v_smem, qbar, kready, vready, kempty, vempty, qrow0, Lq,
                 kvrow, nf, f0, prow, n, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    mbarrier.expect(qbar, 2 * qd.block_type.nbytes + 2 * dod.block_type.nbytes)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(qd, [qrow0 + c * Lq, 0], qbar, q_smem.index(c))
        tma.async_copy_global_to_shared(dod, [qrow0 + c * Lq, 0], qbar, do_smem.index(c))
    _ws_load_steps(kd, vd, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n, 0, 0, STAGES,
                   BLOCK_N, False)


@gluon.jit
def _dq_scores(qs, dos, k_smem, v_smem, kready, vready, slot, ph, s_zero):
    # (the dq kernel) a step's S = Q K^T and dP = dO V^T issued on ring slot `slot` (phase ph) as they become ready
    mbarrier.wait(kready.index(slot), ph)
    s = warpgroup_mma(qs, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(vready.index(slot), ph)
    dp = warpgroup_mma(dos, v_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    return s, dp


@gluon.jit
def _dq_p(s, lse2, qk_scale, part, qp, kpos, hc, AUX):
    # (the dq kernel) P = exp2(S * scale - lse) of a step, with the pattern's mask where the block is partial
    p = gl.exp2(s * qk_scale - lse2)
    if part:
        p = gl.where(_mask(qp, gl.expand_dims(kpos, 0), hc, AUX), p, 0.0)
    return p


@gluon.jit
def _dq_item(C: gl.constexpr, qs, dos, k_smem, v_smem, qwait, qph, qfree, kready, vready, kempty, vempty, DQ, LSE,
             DELTA, O, DLSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, it0, qk_scale, sm_scale, o_pre, lse_pre,
             D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             QFREE: gl.constexpr, FUSE_DELTA: gl.constexpr, HAS_DLSE: gl.constexpr, PIPE: gl.constexpr = False,
             PREF: gl.constexpr = False):
    # consumer C on one work item: query head h + C, rows qrow0 + C * Lq + (0 .. BLOCK_M) of the (B * H * Lq, D)
    # views; its Q and dO tiles qs, dos (ready when qwait completes phase qph), its n steps at ring steps it0 ..;
    # QFREE: arrive on qfree once its last MMA reading Q / dO is done (the persistent kernel's buffer is then free).
    # PIPE (cfg GLUON_BWD DQ_PIPE; twenty-eighth session, the default since the twenty-ninth): step j's dq MMA is
    # issued behind step j + 1's S and dP, so it runs during step j + 1's exponentials (as the forward issues P V
    # behind the next scores), instead of the warpgroup waiting for it at the end of step j; step j's K tile is freed
    # a step later (ring >= 3)
    # PREF (cfg GLUON_BWD DQ_PREF; twenty-eighth session, the default since the twenty-ninth): o_pre and lse_pre are
    # this item's O tile and lse, loaded by the persistent consumer a whole item ahead (_dq_pref), instead of loads
    # whose latency every item start waits out in both consumers at once
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = _wg_layout(BLOCK_N)
    o_layout: gl.constexpr = _wg_layout(D)
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = gl.arange(0, BLOCK_M, layout=srow)
    qp = gl.expand_dims(m0 + rows + OFF, 1)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    lrow = qrow0 + C * Lq + rows
    if PREF:
        lse = lse_pre
    else:
        lse = gl.load(LSE + lrow)
    lse2 = gl.expand_dims(gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), 1)  # (p = 0)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    orows = gl.arange(0, BLOCK_M, layout=orow)
    ocols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    orow_g = (qrow0 + C * Lq + orows).to(gl.int64)
    if FUSE_DELTA:  # delta = rowsum(O * dO) - dlse (dropped on rows that see nothing), stored for the dk / dv kernel
        if PREF:
            o = o_pre.to(gl.float32)
        else:
            o = gl.load(O + orow_g[:, None] * D + ocols[None, :]).to(gl.float32)  # (issued before the wait on Q / dO)
        mbarrier.wait(qwait, qph)
        dsum = gl.sum(o * dos.load(o_layout).to(gl.float32), 1)
        if HAS_DLSE:
            olse = gl.load(LSE + qrow0 + C * Lq + orows)
            dsum -= gl.where(olse == float("-inf"), 0.0, gl.load(DLSE + qrow0 + C * Lq + orows))
        gl.store(DELTA + qrow0 + C * Lq + orows, dsum)
        delta = gl.expand_dims(gl.convert_layout(dsum, srow), 1)
    else:
        delta = gl.expand_dims(gl.load(DELTA + lrow), 1)
        mbarrier.wait(qwait, qph)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    if PIPE:
        if n > 0:  # step 0 peeled: no dq MMA before it
            s, dp = _dq_scores(qs, dos, k_smem, v_smem, kready, vready, it0 % STAGES, (it0 // STAGES) & 1, s_zero)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            p = _dq_p(s, lse2, qk_scale, nf == 0, qp, _blk(0, nf, f0, prow, n, 0, False) * BLOCK_N + cols, h + C, AUX)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
            mbarrier.arrive(vempty.index(it0 % STAGES), count=1)
            ds = gl.convert_layout((p * (dp - delta)).to(dtype), ds_layout)
            for j in range(1, n):
                slot = (it0 + j) % STAGES
                pslot = (it0 + j - 1) % STAGES
                blk = _blk(j, nf, f0, prow, n, 0, False)
                s, dp = _dq_scores(qs, dos, k_smem, v_smem, kready, vready, slot, ((it0 + j) // STAGES) & 1, s_zero)
                # step j - 1's dq MMA, issued behind S and dP: it runs during this step's exponentials
                acc = warpgroup_mma(ds, k_smem.index(pslot), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=2, deps=(s, ))
                p = _dq_p(s, lse2, qk_scale, j >= nf, qp, blk * BLOCK_N + cols, h + C, AUX)
                dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp, ))
                mbarrier.arrive(vempty.index(slot), count=1)
                ds_next = gl.convert_layout((p * (dp - delta)).to(dtype), ds_layout)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(kempty.index(pslot), count=1)
                ds = ds_next
            lslot = (it0 + n - 1) % STAGES
            acc = warpgroup_mma(ds, k_smem.index(lslot), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(kempty.index(lslot), count=1)
    else:
        for j in range(0, n):
            slot = (it0 + j) % STAGES
            blk = _blk(j, nf, f0, prow, n, 0, False)
            s, dp = _dq_scores(qs, dos, k_smem, v_smem, kready, vready, slot, ((it0 + j) // STAGES) & 1, s_zero)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # (dP still running)
            p = _dq_p(s, lse2, qk_scale, j >= nf, qp, blk * BLOCK_N + cols, h + C, AUX)  # (the mask: partial blocks)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
            mbarrier.arrive(vempty.index(slot), count=1)
            ds = gl.convert_layout((p * (dp - delta)).to(dtype), ds_layout)
            acc = warpgroup_mma(ds, k_smem.index(slot), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(kempty.index(slot), count=1)
    if QFREE:  # (the S and dP MMAs, the last readers of Q and dO, are done)
        mbarrier.arrive(qfree, count=1)
    gl.store(DQ + orow_g[:, None] * D + ocols[None, :], (acc * sm_scale).to(dtype))


@gluon.jit
def _dq_consumer(C: gl.constexpr, q_smem, do_smem, k_smem, v_smem, qbar, kready, vready, kempty, vempty, DQ, LSE,
                 DELTA, O, DLSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, qk_scale, sm_scale, D: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FUSE_DELTA: gl.constexpr,
                 HAS_DLSE: gl.constexpr):
    _dq_item(C, q_smem.index(C), do_smem.index(C), k_smem, v_smem, qbar, 0, qbar, kready, vready, kempty, vempty, DQ,
             LSE, DELTA, O, DLSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, 0, qk_scale, sm_scale, 0, 0, D, BLOCK_M,
             BLOCK_N, STAGES, False, FUSE_DELTA, HAS_DLSE)


@gluon.jit
def gluon_attn_bwd_dq(qd, dod, kd, vd, DQ, LSE, DELTA, O, DLSE, AUX, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h,
                      idx_m, H, G, Lq, Lk, OFF, qk_scale, sm_scale, D: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      FUSE_DELTA: gl.constexpr, HAS_DLSE: gl.constexpr):
    # grid (query blocks, B * H / 2): two query heads of one GQA group a program, one consumer warpgroup each, as the
    # ws forward; DQ, LSE, DELTA, O, DLSE in the (B * H * Lq) row order
    dtype: gl.constexpr = kd.dtype
    pid_m, b, h, m0, qrow0 = _ws_program(H, Lq, BLOCK_M)
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], qd.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], dod.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], vd.layout)
    qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(qbar, count=1)
    kready, vready, kempty, vempty, turn = _ring_barriers(STAGES, False)
    nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
    kvrow = (b * (H // G) + h // G) * Lk
    gl.warp_specialize([
        (_dq_consumer, (0, q_smem, do_smem, k_smem, v_smem, qbar, kready, vready, kempty, vempty, DQ, LSE, DELTA, O,
                        DLSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, qk_scale, sm_scale, D, BLOCK_M, BLOCK_N,
                        STAGES, FUSE_DELTA, HAS_DLSE)),
        (_dq_consumer, (1, q_smem, do_smem, k_smem, v_smem, qbar, kready, vready, kempty, vempty, DQ, LSE, DELTA, O,
                        DLSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, qk_scale, sm_scale, D, BLOCK_M, BLOCK_N,
                        STAGES, FUSE_DELTA, HAS_DLSE)),
        (_dq_producer, (qd, dod, kd, vd, q_smem, do_smem, k_smem, v_smem, qbar, kready, vready, kempty, vempty,
                        qrow0, Lq, kvrow, nf, f0, prow, n, STAGES, BLOCK_N)),
    ], [4, 1], [CONSUMER_REGS, 24])


# The persistent form (cfg GLUON="wsp"; the default of the local and wide classes; H100, eighteenth session: window
# 1024 1.198 -> 1.002 ms at 16K against the Triton kernel): a grid of at most one program per SM, each taking work
# items (query block, head pair) p, p + P, ... in turn, so the producer loads the next item's Q and first K / V tiles
# while the consumers finish the current one (its last P V and its stores) -- the per-item prologue that short
# windows (window 1024: 9 steps of 128 keys an item) pay in full when every item is its own program. The ring's slots
# and phases run on across items (each partition counts the steps it0 itself); QBUF Q buffers, each freed by both
# consumers (count-2 mbarrier) once their last score MMA of the item is done.

@gluon.jit
def _wsp_item(t, NQB, H, G, Lq, Lk, BLOCK_M: gl.constexpr, ORDER: gl.constexpr):
    # work item t -> (its query block, its first head h, first query row of head h in the (B * H * Lq, D) view, m0,
    # its KV head's first row). ORDER 0: head pair outer, query block inner (the ws kernel's grid order). ORDER 1: the
    # G / 2 head pairs of one KV head innermost, then the query block: the programs at work at one time read the same
    # K / V tiles, so the rows they span in L2 shrink by G / 2 -- the programs of a persistent grid drift apart over
    # their items, and at 64K tokens that spread outgrew L2 in order 0
    if ORDER == 0:
        pid_m = t % NQB
        pid_bh = t // NQB
        HP = H // 2
        b = pid_bh // HP
        h = (pid_bh % HP) * 2
    else:
        P = G // 2
        r = t // P
        pid_m = r % NQB
        bk = r // NQB  # b * HKV + the KV head
        HKV = H // G
        b = bk // HKV
        h = (bk % HKV) * G + (t % P) * 2
    m0 = pid_m * BLOCK_M
    return pid_m, h, (b * H + h) * Lq + m0, m0, (b * (H // G) + h // G) * Lk


@gluon.jit
def _wsp_producer(qd, kd, vd, kdn, vdn, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty,
                  vempty, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, NQB, n_items,
                  STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, QBUF: gl.constexpr,
                  ORDER: gl.constexpr, NARROW: gl.constexpr, FAR: gl.constexpr, XPIPE: gl.constexpr = False,
                  NFOLD: gl.constexpr = False):
    # XPIPE: one more Q tile and first K / V tile after the last item (the last item's again), for the consumers'
    # boundary after their last item (_x_consumer), so that their loop has no branch. NFOLD: the sinks into the fold
    # block's tile (_fold_load_steps), no narrow tile with Q
    it0 = 0
    i = 0
    nprog = gl.num_programs(0)
    last = gl.program_id(0) + ((n_items - 1 - gl.program_id(0)) // nprog) * nprog
    for t in range(gl.program_id(0), n_items + (nprog if XPIPE else 0), nprog):
        tt = t
        if XPIPE:
            tt = gl.minimum(t, last)
        pid_m, h, qrow0, m0, kvrow = _wsp_item(tt, NQB, H, G, Lq, Lk, BLOCK_M, ORDER)
        nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
        if NFOLD:
            nw, prow, n, sc = _fold_flag(NROW, pid_m, prow, n, BLOCK_N // NARROW)
        else:
            nw, prow, n = _narrow_flag(NROW, pid_m, prow, n, NARROW)
        if XPIPE:
            if t > last:
                n = gl.minimum(n, 1)
        qb = i % QBUF
        mbarrier.wait(qempty.index(qb), ((i // QBUF) & 1) ^ 1)
        if NFOLD:
            _q_load(qd, kdn, vdn, q_smem, nbuf, qready.index(qb), qb, qrow0, Lq, kvrow, nw, 0)
            _fold_load_steps(kd, vd, kdn, vdn, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n,
                             it0, _zfold(nf, prow, n, nw, FAR), sc, STAGES, BLOCK_N, NARROW, FAR)
        else:
            _q_load(qd, kdn, vdn, q_smem, nbuf, qready.index(qb), qb, qrow0, Lq, kvrow, nw, NARROW)
            _ws_load_steps(kd, vd, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n, it0,
                           _zfirst(nf, prow, n, FAR), STAGES, BLOCK_N, FAR)
        it0 += n
        i += 1


@gluon.jit
def _wsp_consumer(C: gl.constexpr, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty, vempty,
                  turn, O, LSE, AUX, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB,
                  n_items, qk_scale, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, PINGPONG: gl.constexpr, QBUF: gl.constexpr, ORDER: gl.constexpr,
                  NARROW: gl.constexpr, NMERGE: gl.constexpr, FAR: gl.constexpr, NLAST: gl.constexpr):
    it0 = 0
    i = 0
    kn_smem, vn_smem = nbuf
    # NLAST 1: both consumers take the narrow tile at their items' ends; 2: consumer 1 only, so that the two
    # consumers' narrow steps (whose MMA waits leave the tensor cores idle) fall at different times
    NL: gl.constexpr = NLAST == 1 or (NLAST == 2 and C == 1)
    for t in range(gl.program_id(0), n_items, gl.num_programs(0)):
        pid_m, h, qrow0, m0, kvrow = _wsp_item(t, NQB, H, G, Lq, Lk, BLOCK_M, ORDER)
        nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
        nw, prow, n = _narrow_flag(NROW, pid_m, prow, n, NARROW)
        qb = i % QBUF
        mbarrier.wait(qready.index(qb), (i // QBUF) & 1)
        _ws_item(C, q_smem.index(2 * qb + C), k_smem, v_smem, kn_smem.index(qb), vn_smem.index(qb), kready, vready,
                 kempty, vempty, turn, qempty.index(qb), O, LSE, AUX, h, qrow0, Lq, m0, OFF, nf, f0, prow, n, it0, nw,
                 _zfirst(nf, prow, n, FAR), qk_scale, D, BLOCK_M, BLOCK_N, STAGES, PINGPONG, True, NARROW, NMERGE,
                 FAR, NL)
        it0 += n
        i += 1


# XPIPE (cfg GLUON_CFG XPIPE, persistent form, plain masks without the narrow tile; thirtieth session): each item's
# first scores are issued with the previous item's last P V, and their softmax runs while that P V is on the tensor
# cores -- the two waits at every item boundary (the last P V, then the next item's first scores) become one, as in
# the main loop. The items are short on window 1024 (9 steps), where a consumer's fill and drain cost about two steps
# an item. The producer (_wsp_producer with XPIPE) loads one more Q tile and K / V tile after its last item (the last
# item's again): the consumers' boundary after their last item reads them and drops the result, so the loop has no
# branch.

@gluon.jit
def _x_head(C: gl.constexpr, t, i, it, q_smem, k_smem, kready, qready, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m,
            idx_h, idx_m, H, G, Lq, Lk, NQB, s_zero, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, QBUF: gl.constexpr,
            ORDER: gl.constexpr, NARROW: gl.constexpr, FAR: gl.constexpr, NFOLD: gl.constexpr):
    # (XPIPE) item t's first scores (ring step it), issued once its Q (buffer i % QBUF) and K tile are in -> the
    # scores (running) and the item's h, first query row, nf, f0, prow, n, z, m0 and narrow flag nw (NFOLD: in its
    # place the key position of step 0's first sink column, far below every key where unflagged)
    pid_m, h, qrow0, m0, kvrow = _wsp_item(t, NQB, H, G, Lq, Lk, BLOCK_M, ORDER)
    nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
    if NFOLD:
        BN: gl.constexpr = s_zero.shape[1]
        nw, prow, n, sc = _fold_flag(NROW, pid_m, prow, n, BN // NARROW)
        z = _zfold(nf, prow, n, nw, FAR)
        nw = gl.where(sc < BN // NARROW, _blk(0, nf, f0, prow, n, z, FAR) * BN + sc * NARROW, -(1 << 30))
    else:
        nw, prow, n = _narrow_flag(NROW, pid_m, prow, n, NARROW)
        z = _zfirst(nf, prow, n, FAR)
    qb = i % QBUF
    mbarrier.wait(qready.index(qb), (i // QBUF) & 1)
    slot = it % STAGES
    mbarrier.wait(kready.index(slot), (it // STAGES) & 1)
    s = warpgroup_mma(q_smem.index(2 * qb + C), k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    return s, h, qrow0, nf, f0, prow, n, z, m0, nw


@gluon.jit
def _xn_scores(qs, kn, qrow0, Lq, NROW, OFF, BLOCK_M: gl.constexpr, NARROW: gl.constexpr):
    # (XPIPE with the narrow tile) an item's narrow scores, issued -- its query block from qrow0 and its flag reloaded
    # here rather than carried through the main loop -> (scores in flight, flag, query and key positions)
    m0c = qrow0 % Lq
    nwc = gl.load(NROW + m0c // BLOCK_M)
    qpn, kposn, sn0 = _narrow_setup(m0c, OFF, BLOCK_M, NARROW)
    sn = warpgroup_mma(qs, kn.permute((1, 0)), sn0, use_acc=False, is_async=True)
    return sn, nwc, qpn, kposn


@gluon.jit
def _xn_softmax(sn, nwc, m_i, l_i, qpn, kposn, h, C: gl.constexpr, AUX, qk_scale, dtype: gl.constexpr,
                p_layout: gl.constexpr, srow: gl.constexpr, NARROW: gl.constexpr):
    # the narrow tile's softmax step for head h + C (all masked where the item is not flagged: p = 0, factor 1) ->
    # (m_i, l_i, P, the factor for acc)
    snrow: gl.constexpr = gl.SliceLayout(1, _wg_layout(NARROW))
    sn = gl.where(nwc != 0, sn, float("-inf"))
    m_n, l_n, pn, alpha_n = _softmax(sn, gl.convert_layout(m_i, snrow), gl.convert_layout(l_i, snrow), qpn, kposn,
                                     h + C, AUX, qk_scale, True, dtype, p_layout)
    return gl.convert_layout(m_n, srow), gl.convert_layout(l_n, srow), pn, alpha_n


@gluon.jit
def _x_consumer(C: gl.constexpr, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty, vempty, O, LSE,
                AUX, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB, n_items, qk_scale,
                D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                QBUF: gl.constexpr, ORDER: gl.constexpr, NARROW: gl.constexpr, FAR: gl.constexpr,
                NFOLD: gl.constexpr = False):
    # NARROW: the narrow sink tile at each item's end, after the boundary's MMAs (the Q buffer, and the narrow buffer
    # with it, freed after that). NFOLD: the sinks folded into each flagged item's first step instead (no narrow
    # step; c0s: that step's first sink column, from _x_head)
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = _wg_layout(BLOCK_N)
    o_layout: gl.constexpr = _wg_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = gl.arange(0, BLOCK_M, layout=srow)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    m_new = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=srow)
    l_new = gl.zeros([BLOCK_M], gl.float32, layout=srow)
    nprog = gl.num_programs(0)
    last = gl.program_id(0) + ((n_items - 1 - gl.program_id(0)) // nprog) * nprog
    kn_smem, vn_smem = nbuf
    # the first item's first step
    NSTEP: gl.constexpr = NARROW > 0 and not NFOLD  # (the narrow step at each item's end)
    s, h, qrow0, nf, f0, prow, n, z, m0, c0s = _x_head(C, gl.program_id(0), 0, 0, q_smem, k_smem, kready, qready, NROW,
                                                        KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk,
                                                        NQB, s_zero, BLOCK_M, STAGES, QBUF, ORDER, NARROW, FAR, NFOLD)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(kempty.index(0), count=1)
    qp = gl.expand_dims(m0 + rows + OFF, 1)
    blk0 = _blk(0, nf, f0, prow, n, z, FAR)
    m_i, l_i, p, alpha = _softmax(s, m_new, l_new, qp, blk0 * BLOCK_N + cols, h + C, AUX, qk_scale,
                                  _part(0, nf, z, FAR), dtype, p_layout, False, c0s,
                                  NFOLD, NARROW)
    it0 = 0
    i = 0
    for t in range(gl.program_id(0), n_items, nprog):
        qb = i % QBUF
        qs = q_smem.index(2 * qb + C)
        acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
        for j in range(1, n):
            m_i, l_i, p, acc = _step(C, j, it0, qs, k_smem, v_smem, kready, vready, kempty, vempty, kready, p, acc, m_i,
                                     l_i, s_zero, qp, cols, nf, f0, prow, n, z, h, AUX, qk_scale, orow, p_layout,
                                     BLOCK_N, STAGES, FAR, False)
        if not NSTEP:
            mbarrier.arrive(qempty.index(qb), count=1)  # (the item's last score MMA is done)
        lit = it0 + n - 1
        lslot = lit % STAGES
        # the boundary: the next item's first scores (past the last item: the producer's extra tile, dropped) with
        # this item's last P V, their softmax while it runs, then this item's epilogue
        s, h2, qrow2, nf, f0, prow, n2, z, m0, c0s2 = _x_head(C, gl.minimum(t + nprog, last), i + 1, lit + 1, q_smem,
                                                               k_smem, kready, qready, NROW, KVN, KVI, FKVN, FKVI,
                                                               lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, NQB, s_zero,
                                                               BLOCK_M, STAGES, QBUF, ORDER, NARROW, FAR, NFOLD)
        mbarrier.wait(vready.index(lslot), (lit // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(lslot), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        mbarrier.arrive(kempty.index((lit + 1) % STAGES), count=1)
        qp2 = gl.expand_dims(m0 + rows + OFF, 1)
        blk0 = _blk(0, nf, f0, prow, n2, z, FAR)
        m2, l2, p, alpha = _softmax(s, m_new, l_new, qp2, blk0 * BLOCK_N + cols, h2 + C, AUX, qk_scale,
                                    _part(0, nf, z, FAR), dtype, p_layout, False, c0s2,
                                    NFOLD, NARROW)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(vempty.index(lslot), count=1)
        if NSTEP:  # the narrow tile last, then its buffer goes with Q's
            sn, nwc, qpn, kposn = _xn_scores(qs, kn_smem.index(qb), qrow0, Lq, NROW, OFF, BLOCK_M, NARROW)
            sn = warpgroup_mma_wait(num_outstanding=0, deps=(sn, ))
            m_i, l_i, pn, alpha_n = _xn_softmax(sn, nwc, m_i, l_i, qpn, kposn, h, C, AUX, qk_scale, dtype, p_layout,
                                                srow, NARROW)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha_n, orow), 1)
            acc = warpgroup_mma(pn, vn_smem.index(qb), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(qempty.index(qb), count=1)
        _store_out(acc, m_i, l_i, O, LSE, qrow0 + C * Lq, orow, o_layout, D, BLOCK_M)
        m_i = m2
        l_i = l2
        h = h2
        qrow0 = qrow2
        qp = qp2
        it0 += n
        n = n2
        i += 1
    # the extra tile's V (never read): waited for, so that no copy is in flight when the program ends
    mbarrier.wait(vready.index(it0 % STAGES), (it0 // STAGES) & 1)


@gluon.jit
def gluon_attn_fwd_wsp(qd, kd, vd, kdn, vdn, O, LSE, AUX, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m,
                       H, G, Lq, Lk, OFF, NQB, n_items, qk_scale,
                       D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, QBUF: gl.constexpr,
                       ORDER: gl.constexpr, NARROW: gl.constexpr, NMERGE: gl.constexpr, FAR: gl.constexpr,
                       NLAST: gl.constexpr = 0, XPIPE: gl.constexpr = False, NFOLD: gl.constexpr = False):
    dtype: gl.constexpr = kd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2 * QBUF, BLOCK_M, D], qd.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], vd.layout)
    qready, qempty = _q_barriers(QBUF)
    kready, vready, kempty, vempty, turn = _ring_barriers(STAGES, PINGPONG)
    if NFOLD:  # (no narrow buffers: the sinks go into the ring)
        nbuf = _narrow_buffers(kdn, vdn, k_smem, v_smem, D, 0, QBUF)
    else:
        nbuf = _narrow_buffers(kdn, vdn, k_smem, v_smem, D, NARROW, QBUF)
    if XPIPE:  # (no turn barriers; with NARROW, every flagged item keeps a regular step: ops checks)
        gl.warp_specialize([
            (_x_consumer, (0, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty, vempty, O, LSE, AUX,
                           NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB, n_items,
                           qk_scale, D, BLOCK_M, BLOCK_N, STAGES, QBUF, ORDER, NARROW, FAR, NFOLD)),
            (_x_consumer, (1, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty, vempty, O, LSE, AUX,
                           NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB, n_items,
                           qk_scale, D, BLOCK_M, BLOCK_N, STAGES, QBUF, ORDER, NARROW, FAR, NFOLD)),
            (_wsp_producer, (qd, kd, vd, kdn, vdn, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready,
                             kempty, vempty, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, NQB,
                             n_items, STAGES, BLOCK_M, BLOCK_N, QBUF, ORDER, NARROW, FAR, True, NFOLD)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:  # (not compiled with XPIPE: with NFOLD there are no narrow buffers for its narrow steps)
        gl.warp_specialize([
            (_wsp_consumer, (0, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty, vempty, turn, O,
                             LSE, AUX, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB,
                             n_items, qk_scale, D, BLOCK_M, BLOCK_N, STAGES, PINGPONG, QBUF, ORDER, NARROW, NMERGE,
                             FAR, NLAST)),
            (_wsp_consumer, (1, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty, vempty, turn, O,
                             LSE, AUX, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB,
                             n_items, qk_scale, D, BLOCK_M, BLOCK_N, STAGES, PINGPONG, QBUF, ORDER, NARROW, NMERGE,
                             FAR, NLAST)),
            (_wsp_producer, (qd, kd, vd, kdn, vdn, q_smem, k_smem, v_smem, nbuf, qready, qempty, kready, vready, kempty,
                             vempty, NROW, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, NQB, n_items,
                             STAGES, BLOCK_M, BLOCK_N, QBUF, ORDER, NARROW, FAR)),
        ], [4, 1], [CONSUMER_REGS, 24])


# The dq kernel's persistent form (cfg GLUON_BWD DQ_PERSIST; twenty-second session, compiled for sm_90, NOT YET
# RUN): the persistent forward's walk (one program per SM taking work items t, t + P, ..., ORDER 1) with the dq
# kernel's item; QBUF buffers of both heads' Q and dO tiles, each freed by both consumers (count-2 mbarrier) once
# their item's last S / dP MMA is done, so the producer loads the next item's Q, dO and first K / V tiles while the
# consumers finish the current one -- the per-item prologue and epilogue that short windows pay in full otherwise.

@gluon.jit
def _dqp_producer(qd, dod, kd, vd, q_smem, do_smem, k_smem, v_smem, qready, qempty, kready, vready, kempty, vempty,
                  KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, NQB, n_items,
                  STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, QBUF: gl.constexpr,
                  ORDER: gl.constexpr):
    it0 = 0
    i = 0
    for t in range(gl.program_id(0), n_items, gl.num_programs(0)):
        pid_m, h, qrow0, m0, kvrow = _wsp_item(t, NQB, H, G, Lq, Lk, BLOCK_M, ORDER)
        nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
        qb = i % QBUF
        mbarrier.wait(qempty.index(qb), ((i // QBUF) & 1) ^ 1)
        mbarrier.expect(qready.index(qb), 2 * qd.block_type.nbytes + 2 * dod.block_type.nbytes)
        for c in gl.static_range(2):
            tma.async_copy_global_to_shared(qd, [qrow0 + c * Lq, 0], qready.index(qb), q_smem.index(2 * qb + c))
            tma.async_copy_global_to_shared(dod, [qrow0 + c * Lq, 0], qready.index(qb), do_smem.index(2 * qb + c))
        _ws_load_steps(kd, vd, k_smem, v_smem, kready, vready, kempty, vempty, kvrow, nf, f0, prow, n, it0, 0, STAGES,
                       BLOCK_N, False)
        it0 += n
        i += 1


@gluon.jit
def _dqp_consumer(C: gl.constexpr, q_smem, do_smem, k_smem, v_smem, qready, qempty, kready, vready, kempty, vempty,
                  DQ, LSE, DELTA, O, DLSE, AUX, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF,
                  NQB, n_items, qk_scale, sm_scale, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, QBUF: gl.constexpr, ORDER: gl.constexpr, FUSE_DELTA: gl.constexpr,
                  HAS_DLSE: gl.constexpr, PIPE: gl.constexpr, PREF: gl.constexpr):
    it0 = 0
    i = 0
    if PREF:  # (the first item's O and lse; then each item's are loaded while the one before runs)
        o_n, lse_n = _dq_pref(O, LSE, _wsp_item(gl.program_id(0), NQB, H, G, Lq, Lk, BLOCK_M, ORDER)[2] + C * Lq, D,
                              BLOCK_M, BLOCK_N)
    for t in range(gl.program_id(0), n_items, gl.num_programs(0)):
        pid_m, h, qrow0, m0, kvrow = _wsp_item(t, NQB, H, G, Lq, Lk, BLOCK_M, ORDER)
        nf, f0, prow, n = _row_blocks(KVN, KVI, FKVN, FKVI, h, pid_m, lay_h, lay_m, idx_h, idx_m)
        qb = i % QBUF
        if PREF:
            o_c = o_n
            lse_c = lse_n
            # the next item's (the last item's again after the last: a load nobody uses)
            t2 = gl.minimum(t + gl.num_programs(0), n_items - 1)
            o_n, lse_n = _dq_pref(O, LSE, _wsp_item(t2, NQB, H, G, Lq, Lk, BLOCK_M, ORDER)[2] + C * Lq, D, BLOCK_M,
                                  BLOCK_N)
        else:
            o_c = 0
            lse_c = 0
        _dq_item(C, q_smem.index(2 * qb + C), do_smem.index(2 * qb + C), k_smem, v_smem, qready.index(qb),
                 (i // QBUF) & 1, qempty.index(qb), kready, vready, kempty, vempty, DQ, LSE, DELTA, O, DLSE, AUX, h,
                 qrow0, Lq, m0, OFF, nf, f0, prow, n, it0, qk_scale, sm_scale, o_c, lse_c, D, BLOCK_M, BLOCK_N, STAGES,
                 True, FUSE_DELTA, HAS_DLSE, PIPE, PREF)
        it0 += n
        i += 1


@gluon.jit
def _dq_pref(O, LSE, row0, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    # (PREF) a consumer's O tile (rows row0 .. row0 + BLOCK_M, 16-bit, in the dq accumulator's layout) and lse (in the
    # scores' row layout) of one work item, as _dq_item would load them
    s_layout: gl.constexpr = _wg_layout(BLOCK_N)
    o_layout: gl.constexpr = _wg_layout(D)
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    orows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    ocols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    og = (row0 + orows).to(gl.int64)
    return gl.load(O + og[:, None] * D + ocols[None, :]), gl.load(LSE + row0 + rows)


@gluon.jit
def gluon_attn_bwd_dqp(qd, dod, kd, vd, DQ, LSE, DELTA, O, DLSE, AUX, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h,
                       idx_m, H, G, Lq, Lk, OFF, NQB, n_items, qk_scale, sm_scale, D: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr, QBUF: gl.constexpr, ORDER: gl.constexpr,
                       FUSE_DELTA: gl.constexpr, HAS_DLSE: gl.constexpr, PIPE: gl.constexpr = False,
                       PREF: gl.constexpr = False):
    dtype: gl.constexpr = kd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2 * QBUF, BLOCK_M, D], qd.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2 * QBUF, BLOCK_M, D], dod.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], vd.layout)
    qready, qempty = _q_barriers(QBUF)
    kready, vready, kempty, vempty, turn = _ring_barriers(STAGES, False)
    gl.warp_specialize([
        (_dqp_consumer, (0, q_smem, do_smem, k_smem, v_smem, qready, qempty, kready, vready, kempty, vempty, DQ, LSE,
                         DELTA, O, DLSE, AUX, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB,
                         n_items, qk_scale, sm_scale, D, BLOCK_M, BLOCK_N, STAGES, QBUF, ORDER, FUSE_DELTA,
                         HAS_DLSE, PIPE, PREF)),
        (_dqp_consumer, (1, q_smem, do_smem, k_smem, v_smem, qready, qempty, kready, vready, kempty, vempty, DQ, LSE,
                         DELTA, O, DLSE, AUX, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, OFF, NQB,
                         n_items, qk_scale, sm_scale, D, BLOCK_M, BLOCK_N, STAGES, QBUF, ORDER, FUSE_DELTA,
                         HAS_DLSE, PIPE, PREF)),
        (_dqp_producer, (qd, dod, kd, vd, q_smem, do_smem, k_smem, v_smem, qready, qempty, kready, vready, kempty,
                         vempty, KVN, KVI, FKVN, FKVI, lay_h, lay_m, idx_h, idx_m, H, G, Lq, Lk, NQB, n_items, STAGES,
                         BLOCK_M, BLOCK_N, QBUF, ORDER)),
    ], [4, 1], [CONSUMER_REGS, 24])
'''


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this Triton has Gluon's Hopper API."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except Exception:
        return False
    return True


def plain_mask(body_lines: list[str]) -> bool:
    """Whether a generated mask body (`codegen.generate`'s lines) is plain arithmetic -- no table lookups,
    reductions or Triton calls -- the body this module takes."""
    return not any("tl." in line or "AUX" in line for line in body_lines)


def gluon_module(body_lines: list[str], far_lines: list[str] | None = None):
    """Import (once) the Gluon module with this ``_mask`` body (the lines `codegen.generate` gives) and this
    ``_mask_far`` body (the mask for keys past the first kv block, `generate(..., kmin=BLOCK_N)`; default the mask)."""
    indent = lambda lines: "\n".join("    " + line for line in lines)  # noqa: E731
    src = PRELUDE.format(body=indent(body_lines), far=indent(far_lines or body_lines)) + KERNEL
    return import_source(src, "attnzoo_gluon", "attnzoo_gluon_fwd")
