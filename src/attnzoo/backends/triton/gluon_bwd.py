"""A Hopper (sm_90) dk / dv kernel written in Gluon, over the same transposed `BlockLayout` and work items as the
Triton kernel `attn_bwd_dkdv` (`kernels.py`); dq comes from the Triton dq kernel (which also writes delta, and runs
first) or from the Gluon dq kernel (`gluon_fwd.gluon_attn_bwd_dq`, which also writes delta, unless SEP_DELTA).

cfg ``GLUON_BWD``, GPU-only: Gluon kernels do not run in Triton's interpreter. Written in the eighteenth session after
the warp-specialised forward (`gluon_fwd.py`) reached cuDNN's dense rate; right on the H100 since the nineteenth, but
no faster than the Triton kernel in its transposed form. Since the twenty-first, its ROWS 2 form with the Gluon dq
kernel (3-slot rings) is the backward's default on Hopper for wide windows at D = 128 (`tuning.default`;
BENCHMARKS.md: 5.5 % faster than the Triton kernels on window 4096), and since the twenty-second for causal / full
too (7.5 % faster). Class local (window 1024, sinks + window) ran the Gluon dq kernel with the Triton dk / dv kernel
(TRITON_DKDV): ROWS 2 lost on sinks + window, whose sink column it splits over more work items. Since the
thirty-fifth session the transposed form with T_STATS (below) is the default on every class at D = 128, local
included (H100, 16K: window 4096's dk / dv kernel 6.97 -> 5.79 ms; sustained backward 7-9 % faster on causal, window
1024 / 4096 and sinks + window).

One program = one work item (a block of 128 keys and a range of the query blocks that see it, `ops._bwd_plan`) of
one (batch, KV head), looping over the G query heads of the group:

- A producer warp loads the block's K and V once (TMA, two 64-key halves each), then Q and dO tiles of 64 query rows
  into a ring of ``STAGES`` slots, each with a ready mbarrier (TMA bytes) and an empty one (count 2).
- Two consumer warpgroups, one per 64-key half, run every step on the same Q / dO tiles (FlashAttention-3's split of
  the key block): ``S^T = K_c Q^T`` and ``dP^T = V_c dO^T`` as asynchronous warpgroup MMAs, ``P^T = exp2(S^T * scale
  - lse)`` (the pattern's mask on partial blocks), ``dS^T = P^T (dP^T - delta)``, then ``dV_c += P^T dO`` and
  ``dK_c += dS^T Q`` with P^T and dS^T as register operands. lse and delta come from global memory per step
  (ACC_INIT: the score and dP MMAs start from -lse / scale and -delta instead, so neither vector stays live through
  them: 6-7 spill instructions a step instead of 9 at D = 128 on ptxas sm_90, 30 instructions more).
- The block's dk (times the softmax scale) and dv are stored by each consumer for its half, or, for a column split
  over several items, its float32 partials go to the workspace that `attn_bwd_reduce` sums (the Triton kernel's
  format, 128-key rows).

FUSED_DQ (cfg ``GLUON_BWD=dict(FUSED_DQ=True)``; nineteenth session; right, level in speed): dq in the
same kernel, five products a pair instead of the seven of two kernels. Each consumer also writes its dS^T half to
shared memory (double-buffered by step parity, two count-2 mbarriers between the consumers), takes dK's product from
that copy, and computes ``dq[:, C * D/2 ..] = dS K[:, C * D/2 ..]`` over both halves (64 rows x 128 keys); the tile
goes to shared memory and a TMA reduce-add puts it into a float32 (B * H * Lq, D) accumulator (the other key blocks
add theirs: not bitwise deterministic). ``attention_bwd`` runs the delta kernel first and scales / casts the
accumulator after, as for ATOMIC_DQ (the Triton kernel's ATOMIC form is the fallback). ptxas sm_90 at 240 registers:
D = 64 no spills; D = 128 about 32 spill loads and 50 stores a step (24 / 9 without it).

ROWS (cfg ``GLUON_BWD=dict(ROWS=True)``, alone or with FUSED_DQ; twentieth session, right on the H100 in the
twenty-first): FlashAttention-3's arrangement, `_bwd_consumer_rows`. The scores keep the query rows as rows (``S = Q K_C^T``
and ``dP = dO V_C^T`` issued together), so lse and delta are two registers a thread instead of sixteen; P and dS go to
shared memory (64 x 64 per consumer) as the transposed operands of ``dV += P^T dO`` and ``dK += dS^T Q`` and, fused,
as dq's A operands without a transpose. `ops.gluon_bwd_smem` counts the shared memory (ROWS + FUSED_DQ: ring 2 at
D = 128). ROWS 1 issues dP's MMA with S's (it runs during P's exponentials; two score tiles live), ROWS 2 with dV's
after P (one at a time, as the transposed form): ptxas sm_90, sinks + window, 620 / 554 loop instructions and 45 / 7
spill loads + stores a step (637 / 9 transposed); fused 747 / 72 and 690 / 30 (823 / 46).

ROWS 3 and PINGPONG (twenty-third / twenty-fourth sessions, removed; commit 944279a has them): ROWS 3 issued dP with
S, computed dS right after P from P rounded to 16 bits, stored both behind one fence and issued dV and dK together;
PINGPONG made the two consumers take turns to issue their MMA groups through two count-1 mbarriers (FlashAttention-3's
warpgroup ping-pong). Right on the H100 (twenty-fifth session), not faster: window 4096, dk / dv kernel 6959 µs in
ROWS 2, 6975 in ROWS 3, 7065 in ROWS 2 + PINGPONG, 7287 in ROWS 3 + PINGPONG (BENCHMARKS.md, round 23).

PIPE (twenty-third session, removed; commit 3b4c836 has it): the ROWS 2 loop flat over the group's heads, lse / delta
loaded a step ahead, and (PIPE 2) the next step's scores issued behind dK. Slower on the H100 in every form (window
4096, dk / dv kernel 6864 -> 9390 / 7275 µs; BENCHMARKS.md, round 22).

T_STATS (thirty-fourth session; the default on every class since the thirty-fifth): in the transposed form, each
step's lse (in log2 units, +inf where a row sees nothing) and delta rows come by TMA with its Q / dO tiles and are
read from shared memory in the columns' layout, instead of 16 + 16 global loads a thread; with it the transposed form,
which has no P / dS stores, fences or barriers inside a step, has a shorter loop than ROWS 2 (424 / 417 instructions
against 442 / 447, ptxas sm_90, window 4096) and runs faster (H100, 16K, window 4096: 6.97 -> 5.79 ms).
S_AHEAD (thirty-fourth session, removed in the thirty-fifth; commit caacfda has it): each step's scores issued right
behind the step before's dK and left running into the step (the producer loading one Q tile more). H100, 16K, window
4096, dk / dv kernel: ROWS 2 6974 -> 7038 µs, T_STATS 5793 -> 5785 (sustained 1 % slower).

Supported: 64-row query blocks, 128-key blocks, lengths multiples of them, D = Dv in {64, 128}, float16 / bfloat16,
contiguous tensors, a plain mask (no lookups), a head-independent layout (`ops.gluon_bwd_plan` says why not).
"""
from __future__ import annotations

from .gluon_fwd import PRELUDE
from .kernels import import_source

KERNEL_BWD = '''

# TMA reduce-add of a shared-memory tile into global memory (FUSED_DQ): Gluon's own where this Triton has it, else
# the same IR op through a builtin of our own (Triton 3.6's Gluon has the op, not its Python wrapper)
try:
    _tma_add = tma.async_atomic_add
except AttributeError:
    from triton.experimental.gluon.language._core import builtin as _builtin
    from triton._C.libtriton import ir as _ir

    @_builtin
    def _tma_add(tensor_desc, coord, src, _semantic=None):
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)


@gluon.jit
def _dq_step(C: gl.constexpr, t, qrow, ds_smem, k_smem, dq_smem, dsready, dsfree, dqd, DH: gl.constexpr,
             BLOCK_M: gl.constexpr, q_layout: gl.constexpr, ROWS: gl.constexpr = False):
    # (FUSED_DQ) step t's dq[:, C * DH ..] for its 64 query rows (from qrow) = dS (64 rows x 128 keys: both consumers'
    # dS^T halves in buffer t % 2, or their dS halves with ROWS) K[:, C * DH ..], added to the float32 dq accumulator
    # by a TMA reduce (the other key blocks add theirs); then buffer t % 2 is free for step t + 2
    tb = t % 2
    mbarrier.wait(dsready.index(tb), (t // 2) & 1)
    if ROWS:
        ds0 = ds_smem.index(2 * tb)
        ds1 = ds_smem.index(2 * tb + 1)
    else:
        ds0 = ds_smem.index(2 * tb).permute((1, 0))
        ds1 = ds_smem.index(2 * tb + 1).permute((1, 0))
    dq = warpgroup_mma(ds0, k_smem.index(0).slice(C * DH, DH, dim=1),
                       gl.zeros([BLOCK_M, DH], gl.float32, layout=q_layout), use_acc=False, is_async=True)
    dq = warpgroup_mma(ds1, k_smem.index(1).slice(C * DH, DH, dim=1), dq, is_async=True)
    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
    mbarrier.arrive(dsfree.index(tb), count=1)
    tma.store_wait(0)  # the previous reduce has read dq_smem[C]
    gl.thread_barrier()
    dq_smem.index(C).store(dq)
    fence_async_shared()
    gl.thread_barrier()
    _tma_add(dqd, [qrow, C * DH], dq_smem.index(C))


@gluon.jit
def _bwd_col(QN, QI, FQN, FQI, h, pid_n, lay_h, lay_m, idx_h, idx_m):
    # kv block pid_n's visiting query blocks for head h in the transposed layout: nf full ones (list at frow),
    # then the partial ones (list at prow); n in all
    nf = gl.load(FQN + h * lay_h + pid_n * lay_m)
    n = nf + gl.load(QN + h * lay_h + pid_n * lay_m)
    return nf, FQI + h * idx_h + pid_n * idx_m, QI + h * idx_h + pid_n * idx_m, n


@gluon.jit
def _bwd_qblk(j, nf, frow, prow, n):
    # the query block of step j: the full list, then the partial one
    return gl.where(j < nf, gl.load(frow + j, mask=j < nf, other=0),
                    gl.load(prow + (j - nf), mask=(j >= nf) & (j < n), other=0))


@gluon.jit
def _bwd_step_rows(j, nf, frow, prow, n, bh, Lq, idx, LSE, DELTA, BLOCK_M: gl.constexpr):
    # step j's query block: its first row m0, and lse and delta of its rows (idx: 0 .. BLOCK_M in the layout the
    # consumer needs them in) -- both consumer forms
    m0 = _bwd_qblk(j, nf, frow, prow, n) * BLOCK_M
    lrow = bh * Lq + m0 + idx
    return m0, gl.load(LSE + lrow), gl.load(DELTA + lrow)


@gluon.jit
def _bwd_producer(qd, dod, kd, vd, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty,
                  QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, pid_n, s0, e0,
                  STAGES: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                  ld=None, dd=None, lse_smem=None, del_smem=None, TSTATS: gl.constexpr = False):
    kvrow = (b * HKV + hk) * Lk + pid_n * (2 * HALF)
    mbarrier.expect(kvbar, 2 * kd.block_type.nbytes + 2 * vd.block_type.nbytes)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(kd, [kvrow + c * HALF, 0], kvbar, k_smem.index(c))
        tma.async_copy_global_to_shared(vd, [kvrow + c * HALF, 0], kvbar, v_smem.index(c))
    it = 0
    for g in range(0, G):
        h = hk * G + g
        nf, frow, prow, n = _bwd_col(QN, QI, FQN, FQI, h, pid_n, lay_h, lay_m, idx_h, idx_m)
        for j in range(s0, gl.minimum(e0, n)):
            row = (b * H + h) * Lq + _bwd_qblk(j, nf, frow, prow, n) * BLOCK_M
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            if TSTATS:  # (with the step's lse (log2 units) and delta rows: one 64-float row of their (rows / 64, 64)
                # views)
                mbarrier.expect(ready.index(slot), qd.block_type.nbytes + dod.block_type.nbytes +
                                ld.block_type.nbytes + dd.block_type.nbytes)
                tma.async_copy_global_to_shared(ld, [row // BLOCK_M, 0], ready.index(slot), lse_smem.index(slot))
                tma.async_copy_global_to_shared(dd, [row // BLOCK_M, 0], ready.index(slot), del_smem.index(slot))
            else:
                mbarrier.expect(ready.index(slot), qd.block_type.nbytes + dod.block_type.nbytes)
            tma.async_copy_global_to_shared(qd, [row, 0], ready.index(slot), q_smem.index(slot))
            tma.async_copy_global_to_shared(dod, [row, 0], ready.index(slot), do_smem.index(slot))
            it += 1


@gluon.jit
def _bwd_consumer(C: gl.constexpr, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX,
                  DK, DV, WSK, WSV, QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF,
                  pid_n, s0, e0, wslot, nbh, qk_scale, sm_scale, dqd, p_smem, ds_smem, dq_smem, dsready, dsfree,
                  D: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                  ACC_INIT: gl.constexpr, FUSED_DQ: gl.constexpr, ROWS: gl.constexpr,
                  lse_smem=None, del_smem=None, TSTATS: gl.constexpr = False):
    # consumer C (one 64-key half of the block): the rows form (ROWS) or the transposed one
    if ROWS:
        _bwd_consumer_rows(C, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX, DK, DV, WSK,
                           WSV, QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF, pid_n,
                           s0, e0, wslot, nbh, qk_scale, sm_scale, dqd, p_smem, ds_smem, dq_smem, dsready, dsfree, D,
                           STAGES, BLOCK_M, HALF, FUSED_DQ, ROWS)
    else:
        _bwd_consumer_t(C, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX, DK, DV, WSK, WSV,
                        QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF, pid_n, s0, e0,
                        wslot, nbh, qk_scale, sm_scale, dqd, ds_smem, dq_smem, dsready, dsfree, D, STAGES, BLOCK_M,
                        HALF, ACC_INIT, FUSED_DQ, lse_smem, del_smem, TSTATS)


@gluon.jit
def _bwd_consumer_t(C: gl.constexpr, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX,
                    DK, DV, WSK, WSV, QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF,
                    pid_n, s0, e0, wslot, nbh, qk_scale, sm_scale, dqd, ds_smem, dq_smem, dsready, dsfree,
                    D: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                    ACC_INIT: gl.constexpr, FUSED_DQ: gl.constexpr, lse_smem=None, del_smem=None,
                    TSTATS: gl.constexpr = False):
    # the transposed form: S^T = K_C Q^T (keys as rows), P^T and dS^T as register operands
    # TSTATS (cfg GLUON_BWD T_STATS; thirty-fourth session, the default since the thirty-fifth): each step's lse
    # (already in log2 units, +inf on rows that see nothing) and delta come with its Q / dO tiles, by TMA into the ring
    # slot, and are read from shared memory in the columns' layout -- not 16 + 16 global loads a thread with their
    # addresses, the lse's scaling and -inf test every step (ptxas sm_90: the loop's 544 instructions, 16 spill
    # instructions, before)
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = _wg_layout(BLOCK_M)
    a_layout: gl.constexpr = _wg_layout(D)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
    DH: gl.constexpr = D // 2  # (FUSED_DQ) the dq columns of consumer C: C * DH ..
    q_layout: gl.constexpr = _wg_layout(DH)
    scol: gl.constexpr = gl.SliceLayout(0, s_layout)
    cols = gl.arange(0, BLOCK_M, layout=scol)
    kk = gl.expand_dims(pid_n * (2 * HALF) + C * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout)), 1)
    dk = gl.zeros([HALF, D], gl.float32, layout=a_layout)
    dv = gl.zeros([HALF, D], gl.float32, layout=a_layout)
    lse_units = 1.4426950408889634 / qk_scale  # (ACC_INIT) lse -> score units: 1 / the softmax scale
    kc = k_smem.index(C)
    vc = v_smem.index(C)
    mbarrier.wait(kvbar, 0)
    it = 0
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        nf, frow, prow, n = _bwd_col(QN, QI, FQN, FQI, h, pid_n, lay_h, lay_m, idx_h, idx_m)
        for j in range(s0, gl.minimum(e0, n)):
            if TSTATS:
                m0 = _bwd_qblk(j, nf, frow, prow, n) * BLOCK_M
            else:
                m0, lse, delta = _bwd_step_rows(j, nf, frow, prow, n, bh, Lq, cols, LSE, DELTA, BLOCK_M)
            if ACC_INIT:  # S^T starts from -lse in score units (lse / scale): no lse vector live through the MMA
                s = gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_layout) + \
                    gl.expand_dims(gl.where(lse == float("-inf"), float("-inf"), -lse * lse_units), 0)
            else:
                if not TSTATS:
                    lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
                s = gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_layout)  # (made here: not live across steps)
            slot = it % STAGES
            qs = q_smem.index(slot)
            dos = do_smem.index(slot)
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            s = warpgroup_mma(kc, qs.permute((1, 0)), s, use_acc=ACC_INIT, is_async=True)
            if TSTATS:  # (read while the scores' MMA runs)
                lse2 = lse_smem.index(slot).reshape([BLOCK_M]).load(scol)
                delta = del_smem.index(slot).reshape([BLOCK_M]).load(scol)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            if ACC_INIT:
                p = gl.exp2(s * qk_scale)
            else:
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if j >= nf:  # a partial block: the pattern's mask (keys by queries)
                p = gl.where(_mask(gl.expand_dims(m0 + cols + OFF, 0), kk, h, AUX), p, 0.0)
            # dV += P^T dO and dP^T = V dO^T together on the tensor cores; P^T's registers are free after the wait.
            # ACC_INIT: dP^T starts from -delta, so the MMA gives dP^T - delta
            dv = warpgroup_mma(gl.convert_layout(p.to(dtype), op_layout), dos, dv, is_async=True)
            dp = gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_layout)
            if ACC_INIT:
                dp = dp - gl.expand_dims(delta, 0)
            dp = warpgroup_mma(vc, dos.permute((1, 0)), dp, use_acc=ACC_INIT, is_async=True)
            dv, dp = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dp))
            if ACC_INIT:
                ds = p * dp
            else:
                ds = p * (dp - gl.expand_dims(delta, 0))
            if FUSED_DQ:  # dS^T of this half to shared memory, for both consumers' dq products below
                dsb = it % 2
                mbarrier.wait(dsfree.index(dsb), ((it // 2) & 1) ^ 1)  # (step it - 2's dq products are done)
                ds_smem.index(2 * dsb + C).store(ds.to(dtype))
                fence_async_shared()
                mbarrier.arrive(dsready.index(dsb), count=1)
                # dK += dS^T Q from that copy (no register operand live through the MMAs below)
                dk = warpgroup_mma(ds_smem.index(2 * dsb + C), qs, dk, is_async=True)
            else:
                dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), qs, dk, is_async=True)
            if FUSED_DQ:
                _dq_step(C, it, bh * Lq + m0, ds_smem, k_smem, dq_smem, dsready, dsfree, dqd, DH, BLOCK_M, q_layout)
            dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ))
            mbarrier.arrive(empty.index(slot), count=1)
            it += 1
    if FUSED_DQ:
        tma.store_wait(0)
    _bwd_store(C, dk, dv, DK, DV, WSK, WSV, b, hk, HKV, Lk, pid_n, wslot, nbh, sm_scale, D, HALF, a_layout)


@gluon.jit
def _bwd_consumer_rows(C: gl.constexpr, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX,
                       DK, DV, WSK, WSV, QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF,
                       pid_n, s0, e0, wslot, nbh, qk_scale, sm_scale, dqd, p_smem, ds_smem, dq_smem, dsready, dsfree,
                       D: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                       FUSED_DQ: gl.constexpr, ROWS: gl.constexpr):
    # (ROWS) the query rows as rows: S = Q K_C^T and dP = dO V_C^T (64 rows x 64 keys, both issued at once), so lse
    # and delta are per row (two registers each, not sixteen); P and dS go through shared memory (this consumer's
    # p_smem, ds_smem) as the transposed operands of dV += P^T dO and dK += dS^T Q -- and, with FUSED_DQ, as the
    # dS of both consumers' dq products (double-buffered by step parity, as in the transposed form)
    # ROWS 1: dP issued with S, 2: with dV. (The next step's block index, lse and delta loaded during this step --
    # cfg ROWS_PREF, twenty-eighth session -- was level or slower on the H100; removed in the twenty-ninth.)
    DP_EARLY: gl.constexpr = ROWS != 2
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = _wg_layout(HALF)
    a_layout: gl.constexpr = _wg_layout(D)
    DH: gl.constexpr = D // 2
    q_layout: gl.constexpr = _wg_layout(DH)
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    kk = gl.expand_dims(pid_n * (2 * HALF) + C * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, s_layout)), 0)
    dk = gl.zeros([HALF, D], gl.float32, layout=a_layout)
    dv = gl.zeros([HALF, D], gl.float32, layout=a_layout)
    kt = k_smem.index(C).permute((1, 0))
    vt = v_smem.index(C).permute((1, 0))
    pc = p_smem.index(C)
    mbarrier.wait(kvbar, 0)
    it = 0
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        nf, frow, prow, n = _bwd_col(QN, QI, FQN, FQI, h, pid_n, lay_h, lay_m, idx_h, idx_m)
        jend = gl.minimum(e0, n)
        for j in range(s0, jend):
            m0, lse, delta = _bwd_step_rows(j, nf, frow, prow, n, bh, Lq, rows, LSE, DELTA, BLOCK_M)
            lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
            slot = it % STAGES
            qs = q_smem.index(slot)
            dos = do_smem.index(slot)
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            s = warpgroup_mma(qs, kt, gl.zeros([BLOCK_M, HALF], gl.float32, layout=s_layout), use_acc=False,
                              is_async=True)
            if DP_EARLY:  # dP with S: its MMA runs during P's exponentials (two score tiles live)
                dp = warpgroup_mma(dos, vt, gl.zeros([BLOCK_M, HALF], gl.float32, layout=s_layout),
                                   use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            else:
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
            if j >= nf:  # a partial block: the pattern's mask (queries by keys)
                p = gl.where(_mask(gl.expand_dims(m0 + rows + OFF, 1), kk, h, AUX), p, 0.0)
            pc.store(p.to(dtype))
            fence_async_shared()
            dv = warpgroup_mma(pc.permute((1, 0)), dos, dv, is_async=True)
            if DP_EARLY:
                dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp, ))  # (dV still running)
            else:  # dP with dV, after P (one score tile live at a time, as in the transposed form)
                dp = warpgroup_mma(dos, vt, gl.zeros([BLOCK_M, HALF], gl.float32, layout=s_layout), use_acc=False,
                                   is_async=True)
                dv, dp = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dp))
            ds = (p * (dp - gl.expand_dims(delta, 1))).to(dtype)
            if FUSED_DQ:
                dsb = it % 2
                mbarrier.wait(dsfree.index(dsb), ((it // 2) & 1) ^ 1)  # (step it - 2's dq products are done)
                dss = ds_smem.index(2 * dsb + C)
            else:
                dss = ds_smem.index(C)
            dss.store(ds)
            fence_async_shared()
            if FUSED_DQ:
                mbarrier.arrive(dsready.index(dsb), count=1)
            dk = warpgroup_mma(dss.permute((1, 0)), qs, dk, is_async=True)
            if FUSED_DQ:
                _dq_step(C, it, bh * Lq + m0, ds_smem, k_smem, dq_smem, dsready, dsfree, dqd, DH, BLOCK_M, q_layout,
                         True)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            mbarrier.arrive(empty.index(slot), count=1)
            it += 1
    if FUSED_DQ:
        tma.store_wait(0)
    _bwd_store(C, dk, dv, DK, DV, WSK, WSV, b, hk, HKV, Lk, pid_n, wslot, nbh, sm_scale, D, HALF, a_layout)


@gluon.jit
def _bwd_store(C: gl.constexpr, dk, dv, DK, DV, WSK, WSV, b, hk, HKV, Lk, pid_n, wslot, nbh, sm_scale,
               D: gl.constexpr, HALF: gl.constexpr, a_layout: gl.constexpr):
    # consumer C's half of the key block: dk (times the softmax scale) and dv, or, for a column split over several
    # items, their float32 partials in the workspace (summed in order by attn_bwd_reduce)
    dtype: gl.constexpr = DK.dtype.element_ty
    rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, a_layout))
    dcols = gl.arange(0, D, layout=gl.SliceLayout(0, a_layout))
    if wslot < 0:
        krow = ((b * HKV + hk) * Lk + pid_n * (2 * HALF) + C * HALF + rows).to(gl.int64)
        gl.store(DK + krow[:, None] * D + dcols[None, :], (dk * sm_scale).to(dtype))
        gl.store(DV + krow[:, None] * D + dcols[None, :], dv.to(dtype))
    else:
        wrow = ((wslot * nbh + b * HKV + hk) * (2 * HALF) + C * HALF + rows).to(gl.int64)
        gl.store(WSK + wrow[:, None] * D + dcols[None, :], dk)
        gl.store(WSV + wrow[:, None] * D + dcols[None, :], dv)


@gluon.jit
def gluon_attn_bwd_dkdv(qd, dod, kd, vd, dqd, LSE, DELTA, DK, DV, WSK, WSV, ITEMS, AUX, QN, QI, FQN, FQI,
                        lay_h, lay_m, idx_h, idx_m, H, HKV, G, Lq, Lk, OFF, qk_scale, sm_scale,
                        D: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr, ACC_INIT: gl.constexpr, FUSED_DQ: gl.constexpr,
                        ROWS: gl.constexpr = 0, ld=None, dd=None,
                        TSTATS: gl.constexpr = False, TAIL_ORDER: gl.constexpr = False, n_head=1, n_bh=1):
    # grid (work items, B * HKV); a work item = (kv block, range [s0, e0) of its visiting query blocks, workspace
    # slot or -1), as the Triton kernel's
    if TAIL_ORDER:  # (cfg GLUON_BWD TAIL_ORDER; thirty-fifth session, not yet run) a 1-D grid of items x B * HKV
        # programs: the first n_head items of each (batch, KV head) in turn, as the 2-D grid has them, then the other
        # (shorter) items with the (batch, KV head)s fastest -- longest first over the whole tail, so the last wave
        # is not one (batch, KV head)'s short items alone (`ops.dkdv_order` is this map on the host)
        pid = gl.program_id(0)
        nbh = n_bh
        if pid < n_head * n_bh:
            pid_bh = pid // gl.maximum(n_head, 1)
            item = pid % gl.maximum(n_head, 1)
        else:
            rest = pid - n_head * n_bh
            item = n_head + rest // n_bh
            pid_bh = rest % n_bh
    else:
        item = gl.program_id(0)
        pid_bh = gl.program_id(1)
        nbh = gl.num_programs(1)
    pid_n = gl.load(ITEMS + item * 4)
    s0 = gl.load(ITEMS + item * 4 + 1)
    e0 = gl.load(ITEMS + item * 4 + 2)
    wslot = gl.load(ITEMS + item * 4 + 3)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    dtype: gl.constexpr = kd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], qd.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], dod.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], vd.layout)
    kvbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kvbar, count=1)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    # FUSED_DQ: dS^T of both halves, double-buffered by step parity ([2 * buffer + half]: 64 keys x 64 rows), each
    # consumer's dq tile for the TMA reduce, and the two consumers' ready / free barriers for the dS^T buffers
    # (without FUSED_DQ: small stand-ins, unused)
    # ROWS: each consumer's P and dS (64 rows x 64 keys; dS double-buffered with FUSED_DQ, as above)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    if FUSED_DQ:
        ds_smem = gl.allocate_shared_memory(dtype, [4, HALF, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, D // 2], dqd.layout)
    elif ROWS:
        ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HALF], ds_layout)
        dq_smem = k_smem
    else:
        ds_smem = k_smem
        dq_smem = k_smem
    if ROWS:
        p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HALF], ds_layout)
    else:
        p_smem = k_smem
    if TSTATS:  # (the transposed form) each ring slot's lse (log2 units) and delta rows, 64 floats each
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], ld.layout)
        del_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], dd.layout)
    else:
        lse_smem = k_smem
        del_smem = k_smem
    dsready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dsfree = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(dsready.index(i), count=2)
        mbarrier.init(dsfree.index(i), count=2)
    gl.warp_specialize([
        (_bwd_consumer, (0, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX, DK, DV, WSK, WSV,
                         QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF, pid_n, s0, e0,
                         wslot, nbh, qk_scale, sm_scale, dqd, p_smem, ds_smem, dq_smem, dsready, dsfree, D, STAGES,
                         BLOCK_M, HALF, ACC_INIT, FUSED_DQ, ROWS, lse_smem, del_smem, TSTATS)),
        (_bwd_consumer, (1, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, LSE, DELTA, AUX, DK, DV, WSK, WSV,
                         QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, OFF, pid_n, s0, e0,
                         wslot, nbh, qk_scale, sm_scale, dqd, p_smem, ds_smem, dq_smem, dsready, dsfree, D, STAGES,
                         BLOCK_M, HALF, ACC_INIT, FUSED_DQ, ROWS, lse_smem, del_smem, TSTATS)),
        (_bwd_producer, (qd, dod, kd, vd, q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty,
                         QN, QI, FQN, FQI, lay_h, lay_m, idx_h, idx_m, b, hk, H, HKV, G, Lq, Lk, pid_n, s0, e0,
                         STAGES, BLOCK_M, HALF, ld, dd, lse_smem, del_smem, TSTATS)),
    ], [4, 1], [CONSUMER_REGS, 24])
'''


def gluon_bwd_module(body_lines: list[str]):
    """Import (once) the Gluon dk / dv module with this ``_mask`` body (the lines `codegen.generate` gives)."""
    body = "\n".join("    " + line for line in body_lines)
    src = PRELUDE.format(body=body, far=body) + KERNEL_BWD
    return import_source(src, "attnzoo_gluon_bwd", "attnzoo_gluon_bwd")
