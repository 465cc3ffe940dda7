"""Split-K ("flash decoding") forward for short queries: a few query tokens against a long KV cache.

With Lq <= 16 the ordinary forward grid (query blocks x heads) has too few programs to fill the GPU,
and each query head would re-read its shared K/V under GQA. Here:

- One program owns a kv head's group of query heads (or a chunk of it when G * Lq is large): its
  rows are (head in chunk, query) pairs, row r -> head r // Lq, query r % Lq, padded to >= 16 rows
  for ``tl.dot``. So K/V are read once per kv head, not once per query head.
- The kv blocks that group visits come from the pattern's `BlockLayout` (one query block covering
  all Lq queries), or for closed-form patterns from Lk in the kernel (see "Visit ranges" below).
  They are flattened per (kv head, chunk) into an ascending list whose entries are
  ``block * 2 + needs_mask``: a block fully visible for every head of the chunk runs without the
  mask, any other visited block (partial, or visited by only some heads of a per-head pattern)
  applies the generated ``_mask`` with per-row query heads. The list is cut into ``num_splits``
  even contiguous pieces, one program each: grid (num_splits, B * Hkv * chunks).
- Each split writes its normalised partial output and its base-2 lse in fp32 to a workspace; a
  second small kernel merges the splits of each output row by lse (a split that saw no key has lse
  -inf and weight 0; a row that saw no key at all gets output 0 and lse -inf). With one split the
  first kernel writes the result directly.
- Head dims above 256 (up to 1024; MLA's absorbed decode has one latent kv head with D = 576 = kv_rank +
  rope_dim and V = its first Dv = 512 columns) take `attn_decode_wide`, FlashMLA-style: the same split-K
  lists and merge, grid (num_splits, B * Hkv * chunks * Dv slices), but a kv block's scores are summed over D chunks (q chunk . k chunk^T, BLOCK_DC = 64)
  and each program accumulates one Dv slice of the output (BLOCK_DV, as wide as the register budget
  allows: all 512 for MLA's 32 rows; a second slice would recompute the scores from K that its sibling
  program pulls into L2 at the same time, so the cache is still read from HBM about once). Programs have
  at most `WIDE_MAX_ROWS` = 32 rows, 16-key blocks and 16 warps (no register spills on sm_90, see there).
  V may alias K (MLA passes ``latent[..., :512]``): its loads then hit in L2 right after K's.
  Full attention with the query heads folded into the query axis (MLA's one-token call, Lq = heads)
  is unfolded back into heads when it has more queries than a program has rows. Checked under the CPU
  interpreter only so far; benchmarks/triton_decode_bench.py --cases mla times it against SDPA.

`attention_decode` has the semantics of `ops.attention_fwd` (patterns, GQA, bottom-right cross
attention, padded head dims, fully masked rows). Measured on an H100 (benchmarks/triton_decode_bench.py,
bf16, one token, Hq=64, Hkv=8, D=128, CUDA-graph replay, L2 flushed): full attention over 128K keys in
195 us = 82% of the HBM peak (SDPA 193 us), 8K in 24 us (SDPA 26 us); SlidingWindow(4095) | Sinks(4)
in 18 us at any length (FlexAttention 24-157 us).

Visit ranges vs visit lists. A decode loop grows Lk by one key a step, so anything cached per Lk is rebuilt
every step; visit lists cost 0.4-0.9 ms of host time a step at 32K-128K keys (CPU, measured here), plus
their host-to-device copy, more than the kernel (the 128K-key kernel takes ~195 us). So for the closed-form
patterns (`range_spec`: Full, Causal, SlidingWindow, Sinks, Chunked and their simple unions / intersections,
e.g. ``Sinks(4) | SlidingWindow(4095)``, ``Chunked(n) & Causal()``) the kernels take ``RANGE=True`` and
compute their blocks from the runtime Lk (`_decode_range`): the sinks' blocks 0 .. na - 1, then the window's
(or chunk's) blocks, cut into ``num_splits`` even pieces like a list; a block needs the mask unless every
query sees all its keys (the window's edges, the causal tail, a sink block that is partial). These are the
very blocks of the list, in the same order (`range_blocks`, the host twin, is tested against the lists), so
the results are bit for bit those of the list path with the same ``num_splits`` (the default split count
is chosen at the bucket's length, so it can differ from the list path's). Everything cached on the host for
them (`range_plan`, `_launch`: the split count, grid, compiled kernels) is keyed on `lk_bucket` (the largest
power of two <= Lk) and Lk is only a kernel argument (not specialised on): after its first step a loop makes
no host-to-device copy and no host sync, and meets a new cache entry only when Lk doubles (the cache lookups
take ~1 us a step; the two launches some tens of us, benchmarks/triton_decode_bench.py --cases loop). A
CUDA graph still bakes the Lk it was captured with into the launch (replaying it across steps would need Lk
read from a device tensor).
Other patterns (per-head, documents, neighborhoods, block-sparse, routed, dilated, ...) keep the lists,
built on the host (and cached) per (pattern, Lq, Lk); ``visit="list"`` forces them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...patterns import Causal, Chunked, Full, Intersection, Sinks, SlidingWindow, Union
from . import DECODE_MAX_HEAD_DIM as WIDE_MAX_HEAD_DIM, MAX_HEAD_DIM as NARROW_MAX_HEAD_DIM
from .codegen import generate
from .kernels import kernel_module
from .ops import LOG2E, _pow2, _prec

DECODE = '''

@triton.jit
def _decode_range(Lk, LQ: tl.constexpr, BLOCK_N: tl.constexpr, SINKS: tl.constexpr, TAIL: tl.constexpr,
                  LEFT: tl.constexpr, RIGHT: tl.constexpr):
    # The kv blocks visited by the LQ queries at positions Lk - LQ .. Lk - 1 of a closed-form pattern (see
    # `range_spec`): blocks 0 .. na - 1 (the sinks' keys 0 .. SINKS - 1), then blocks b0 .. b0 + n - na - 1
    # (the tail: TAIL 1 = the window [p - LEFT, p + RIGHT] per query p (LEFT / RIGHT = BIG: unbounded; Full,
    # Causal), TAIL 2 = the chunk of p (LEFT keys a chunk) up to p + RIGHT), without the sink blocks again.
    # Keys <= a_full and keys in [f_lo, f_hi] are seen by every query (blocks inside them need no mask).
    # `range_blocks` is the same on the host.
    p_lo = Lk - LQ
    p_hi = Lk - 1
    if SINKS > 0:
        a_hi = tl.minimum(p_hi, SINKS - 1)
        na = tl.where(a_hi >= 0, tl.maximum(a_hi, 0) // BLOCK_N + 1, 0)
        a_full = tl.minimum(p_lo, SINKS - 1)
    else:
        na = p_lo * 0
        a_full = na - 1
    if TAIL == 1:
        b_lo = tl.maximum(p_lo - LEFT, 0)
        b_hi = p_hi  # RIGHT >= 0
        f_lo = p_hi - LEFT
        f_hi = p_lo + RIGHT
    elif TAIL == 2:
        c0 = _fdiv(p_lo, LEFT) * LEFT
        b_lo = tl.maximum(c0, 0)
        b_hi = p_hi
        f_lo = tl.where(c0 == _fdiv(p_hi, LEFT) * LEFT, c0, Lk)
        f_hi = tl.minimum(p_lo + RIGHT, p_hi)
    else:
        b_lo = p_lo * 0
        b_hi = b_lo - 1
        f_lo = Lk
        f_hi = b_hi
    b0 = tl.maximum(b_lo // BLOCK_N, na)
    nb = tl.where(b_lo <= b_hi, tl.maximum(b_hi, 0) // BLOCK_N - b0 + 1, 0)
    return na, b0, na + tl.maximum(nb, 0), a_full, f_lo, f_hi


@triton.jit
def _decode_block(j, Lk, na, b0, a_full, f_lo, f_hi, BLOCK_N: tl.constexpr):
    # the j-th visited block of `_decode_range`, and whether it needs the mask (not seen whole by every query)
    blk = tl.where(j < na, j, b0 + (j - na))
    k0 = blk * BLOCK_N
    k1 = tl.minimum(k0 + BLOCK_N - 1, Lk - 1)
    full = (k1 <= a_full) | ((k0 >= f_lo) & (k1 <= f_hi))
    return blk, full == 0


@triton.jit(do_not_specialize=["Lk"])
def attn_decode_split(Q, K, V, O, LSE, W, AUX, LIST,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, list_stride, Hkv, Lk, qk_scale, S, wl_off,
                      G: tl.constexpr, NC: tl.constexpr, HPP: tl.constexpr, LQ: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr,
                      RANGE: tl.constexpr, SINKS: tl.constexpr, TAIL: tl.constexpr, LEFT: tl.constexpr,
                      RIGHT: tl.constexpr):
    split = tl.program_id(0)
    pid = tl.program_id(1)  # (b, kv head, chunk of the group)
    c = pid % NC
    hk = (pid // NC) % Hkv
    b = (pid // (NC * Hkv)).to(tl.int64)  # long KV caches: b * stride_kb can pass 2**31
    r = tl.arange(0, ROWS)
    hg = c * HPP + r // LQ  # head within the group
    qi = r % LQ
    valid = (r < HPP * LQ) & (hg < G)
    h = hk * G + tl.where(valid, hg, 0)  # query head per row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :],
                mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    qp = qi[:, None] + (Lk - LQ)  # bottom-right: query i sits at position i + Lk - Lq
    hq = h[:, None]
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    if RANGE:  # closed form: the visited blocks from Lk, no list
        na, b0, n, a_full, f_lo, f_hi = _decode_range(Lk, LQ, BLOCK_N, SINKS, TAIL, LEFT, RIGHT)
    else:
        lst = LIST + (hk * NC + c) * list_stride  # [count, entries...] of this (kv head, chunk)
        n = tl.load(lst)
    per = tl.cdiv(n, S)
    start = split * per
    end = tl.minimum(start + per, n)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for j in range(start, end):
        if RANGE:
            blk, masked = _decode_block(j, Lk, na, b0, a_full, f_lo, f_hi, BLOCK_N)
        else:
            e = tl.load(lst + 1 + j)
            blk = e >> 1
            masked = (e & 1) != 0
        offs_n = blk * BLOCK_N + offs_n0
        in_k = offs_n < Lk
        kt = tl.load(kbase + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(vbase + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=in_k[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(in_k[None, :], s, float("-inf"))
        if masked:
            s = tl.where(_mask(qp, offs_n[None, :], hq, AUX), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    orow = (b * (Hkv * G) + h) * LQ + qi  # row of the contiguous (B, Hq, Lq, DV) output
    if SINGLE:
        tl.store(O + orow[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=valid[:, None] & (offs_dv[None, :] < DV))
        tl.store(LSE + orow, lse2 * 0.6931471805599453, mask=valid)
    else:
        row = orow * S + split  # workspace: (B * Hq * Lq, S, DV) outputs, then (B * Hq * Lq, S) lse
        tl.store(W + row[:, None] * DV + offs_dv[None, :], out, mask=valid[:, None] & (offs_dv[None, :] < DV))
        tl.store(W + wl_off + row, lse2, mask=valid)


@triton.jit(do_not_specialize=["Lk"])
def attn_decode_wide(Q, K, V, O, LSE, W, AUX, LIST,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, list_stride, Hkv, Lk, qk_scale, S, wl_off,
                     G: tl.constexpr, NC: tl.constexpr, NDV: tl.constexpr, HPP: tl.constexpr, LQ: tl.constexpr,
                     D: tl.constexpr, DV: tl.constexpr, ROWS: tl.constexpr, BLOCK_DC: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr,
                     RANGE: tl.constexpr, SINKS: tl.constexpr, TAIL: tl.constexpr, LEFT: tl.constexpr,
                     RIGHT: tl.constexpr):
    # As attn_decode_split, for head dims too wide for one tile (e.g. MLA's absorbed decode, D=576, Dv=512):
    # the scores of a kv block are summed over D chunks of BLOCK_DC (q chunk . k chunk^T), and the program
    # accumulates only its Dv slice [dvs * BLOCK_DV, (dvs + 1) * BLOCK_DV) of the output.
    split = tl.program_id(0)
    pid = tl.program_id(1)  # (b, kv head, chunk of the group, Dv slice); the default split count keeps all
    dvs = pid % NDV         # programs in one wave, so slices and chunks reading the same keys share them in L2
    c = (pid // NDV) % NC
    hk = (pid // (NDV * NC)) % Hkv
    b = (pid // (NDV * NC * Hkv)).to(tl.int64)
    r = tl.arange(0, ROWS)
    hg = c * HPP + r // LQ
    qi = r % LQ
    valid = (r < HPP * LQ) & (hg < G)
    h = hk * G + tl.where(valid, hg, 0)
    offs_dc = tl.arange(0, BLOCK_DC)
    offs_dv = dvs * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    qrow = Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm
    qp = qi[:, None] + (Lk - LQ)
    hq = h[:, None]
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    if RANGE:
        na, b0, n, a_full, f_lo, f_hi = _decode_range(Lk, LQ, BLOCK_N, SINKS, TAIL, LEFT, RIGHT)
    else:
        lst = LIST + (hk * NC + c) * list_stride
        n = tl.load(lst)
    per = tl.cdiv(n, S)
    start = split * per
    end = tl.minimum(start + per, n)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for j in range(start, end):
        if RANGE:
            blk, masked = _decode_block(j, Lk, na, b0, a_full, f_lo, f_hi, BLOCK_N)
        else:
            e = tl.load(lst + 1 + j)
            blk = e >> 1
            masked = (e & 1) != 0
        offs_n = blk * BLOCK_N + offs_n0
        in_k = offs_n < Lk
        s = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_DC):  # q chunks: loop invariant (Triton's LICM may hoist them)
            od = d0 + offs_dc
            qc = tl.load(qrow + od[None, :], mask=valid[:, None] & (od[None, :] < D), other=0.0)
            kc = tl.load(kbase + offs_n[None, :] * stride_kn + od[:, None],
                         mask=in_k[None, :] & (od[:, None] < D), other=0.0)
            s += tl.dot(qc, kc, input_precision=PREC)
        s = tl.where(in_k[None, :], s * qk_scale, float("-inf"))
        if masked:
            s = tl.where(_mask(qp, offs_n[None, :], hq, AUX), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=in_k[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    orow = (b * (Hkv * G) + h) * LQ + qi
    in_dv = offs_dv[None, :] < DV
    if SINGLE:
        tl.store(O + orow[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty), mask=valid[:, None] & in_dv)
        if dvs == 0:
            tl.store(LSE + orow, lse2 * 0.6931471805599453, mask=valid)
    else:
        row = orow * S + split
        tl.store(W + row[:, None] * DV + offs_dv[None, :], out, mask=valid[:, None] & in_dv)
        if dvs == 0:
            tl.store(W + wl_off + row, lse2, mask=valid)


@triton.jit
def attn_decode_merge(W, O, LSE, S, wl_off, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Lq + qi
    dvs = tl.program_id(1)  # which BLOCK_DV slice of the output row
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = dvs * BLOCK_DV + tl.arange(0, BLOCK_DV)
    lse = tl.load(W + wl_off + row * S + offs_s, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for splits that saw no key
    total = tl.sum(w, 0)
    o = tl.load(W + (row * S + offs_s[:, None]) * DV + offs_dv[None, :],
                mask=(offs_s[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    t_safe = tl.where(total > 0, total, 1.0)
    out = tl.sum(o * (w / t_safe)[:, None], 0)
    tl.store(O + row * DV + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < DV)
    if dvs == 0:
        tl.store(LSE + row, tl.where(total > 0, (m_safe + tl.log2(t_safe)) * 0.6931471805599453, float("-inf")))
'''

MAX_ROWS = 64  # rows (heads x queries) of one program; larger groups are cut into chunks
# attn_decode_split holds whole q/k/v rows in one tile (<= NARROW_MAX_HEAD_DIM); wider heads take attn_decode_wide
# attn_decode_wide's register budget. Compiled for sm_90 (Triton 3.9, bf16, D=576, Dv=512; registers from
# cuobjdump): 32 rows x a 512-wide Dv slice with BLOCK_N=16 and 16 warps use 128 registers a thread without
# spills (also D=1024, and 16 rows x 1024); 64 rows (wgmma) or BLOCK_N=32 spill, and so does 32 x 512 at
# 8 warps. So a program has at most 32 rows (larger groups are cut into chunks) and its fp32 accumulator
# (rows x Dv slice) at most WIDE_ACC_BUDGET elements (wider Dv: more slices, each recomputing the scores
# from K that the sibling programs pull into L2 at the same time: the cache is read from HBM about once).
WIDE_MAX_ROWS = 32
WIDE_ACC_BUDGET = 32 * 512


@dataclass(frozen=True, eq=False)
class DecodePlan:
    """The kv blocks each (kv head, chunk) visits, for one (pattern, lq, lk, block_n, hq, hkv)."""
    lists: torch.Tensor      # (owners, 1 + nk) int32: [count, block * 2 + needs_mask ascending, 0 padding]
    owners: int              # 1 (shared by every kv head and chunk) or hkv * chunks
    chunks: int              # chunks per group
    heads_per_chunk: int
    max_blocks: int          # the longest list
    keys_read: int           # keys loaded over all (kv head, chunk) programs, for one batch entry


@functools.lru_cache(maxsize=128)
def decode_plan(pattern, lq: int, lk: int, block_n: int, hq: int, hkv: int, device: str,
                max_rows: int = MAX_ROWS) -> DecodePlan:
    """Visit lists (cached per shape and pattern), built on the CPU and moved to ``device``. A program
    takes ``heads_per_chunk`` query heads of a group: as many as fit ``max_rows`` rows."""
    g = hq // hkv
    hpp, nc = _group_chunks(hq, hkv, lq, max_rows)
    lay = (pattern or Full()).block_layout(lq, lk, _pow2(lq), block_n, device="cpu", num_heads=hq)
    part, full = lay.partial_blocks()[:, 0], lay.full_blocks()[:, 0]  # (1 or Hq, nk) bool
    nk = part.shape[-1]
    if part.shape[0] == 1:
        vis, need = part | full, part
        owners = 1
    else:  # per-head layout: the union of the chunk's heads; masked unless full for all of them
        vis_l, need_l = [], []
        for hk in range(hkv):
            for c in range(nc):
                heads = slice(hk * g + c * hpp, hk * g + min(g, (c + 1) * hpp))
                v_ = (part[heads] | full[heads]).any(0)
                vis_l.append(v_)
                need_l.append(v_ & ~full[heads].all(0))
        vis, need = torch.stack(vis_l), torch.stack(need_l)
        owners = hkv * nc
    blk = torch.arange(nk, dtype=torch.int32).expand(owners, nk)
    code = torch.where(vis, blk * 2 + need.to(torch.int32), torch.full_like(blk, 2 ** 30))
    entries = torch.sort(code, dim=-1).values
    entries = torch.where(entries == 2 ** 30, 0, entries).to(torch.int32)
    counts = vis.sum(-1, dtype=torch.int32)
    lists = torch.cat([counts[:, None], entries], 1).contiguous()
    width = torch.clamp(lk - blk * block_n, max=block_n)
    keys = int((width * vis).sum()) * (hkv * nc if owners == 1 else 1)
    return DecodePlan(lists.to(device), owners, nc, hpp, int(counts.max()), keys)


# -- closed-form visit ranges: no list, nothing on the host that depends on the exact Lk ---------------------

BIG = 1 << 30  # an unbounded window side (keys and positions stay below it)


def range_spec(pattern):
    """``(sinks, tail, left, right)`` when the kv blocks the (<= 16) decode queries visit are a closed form of
    Lk that the kernel computes itself (`_decode_range`), else None (the pattern takes the visit lists).
    The keys visible to the query at position p are ``k < sinks`` (and ``k <= p``) plus, with ``tail`` 1,
    the window ``[p - left, p + right]`` (``BIG``: unbounded) or, with ``tail`` 2, the keys of p's chunk of
    ``left`` keys up to ``p + right``. Full, Causal, SlidingWindow, Sinks, Chunked; the union of Sinks with one
    of them (or of two windows), the intersection of two windows, of a chunk and a right-bounded window
    (``Chunked(n) & Causal()``), of Sinks and Causal; Full is neutral in an intersection."""
    if pattern is None or isinstance(pattern, Full):
        return (0, 1, BIG, BIG)
    t = type(pattern)
    if t is Causal:
        return (0, 1, BIG, 0)
    if t is SlidingWindow:
        return (0, 1, min(pattern.left, BIG), min(pattern.right, BIG))
    if t is Sinks:
        return (min(pattern.n, BIG), 0, 0, 0)
    if t is Chunked:
        return (0, 2, pattern.size, BIG) if pattern.size < BIG else (0, 1, BIG, BIG)
    if t not in (Union, Intersection):
        return None
    a, b = range_spec(pattern.a), range_spec(pattern.b)
    if a is None or b is None:
        return None
    full = (0, 1, BIG, BIG)
    if t is Union:
        if full in (a, b):
            return full
        if a[1] == 0 or b[1] == 0:  # sinks | x: the sinks are keys 0 .. n - 1 below (or in) x's range
            tail = b if a[1] == 0 else a
            return (max(a[0], b[0]),) + tail[1:]
        if a[0] == b[0] == 0 and a[1] == b[1] == 1:  # two windows around p: their hull
            return (0, 1, max(a[2], b[2]), max(a[3], b[3]))
        return None
    if a == full or b == full:
        return b if a == full else a
    if a[0] == b[0] == 0 and a[1] == b[1] == 1:  # two windows: their intersection, per query
        return (0, 1, min(a[2], b[2]), min(a[3], b[3]))
    if a[0] == b[0] == 0 and {a[1], b[1]} == {1, 2}:  # a chunk and a window unbounded on the left
        c, w = (a, b) if a[1] == 2 else (b, a)
        if w[2] == BIG:
            return (0, 2, c[2], min(c[3], w[3]))
    if {a[1], b[1]} == {0, 1} and (a if a[1] == 1 else b)[2:] == (BIG, 0):  # sinks & causal: the sinks
        return a if a[1] == 0 else b
    return None


def _floordiv(x: int, s: int) -> int:
    return x // s  # Python's floor division, as `_fdiv`


def range_blocks(spec, lq: int, lk: int, block_n: int) -> list:
    """The host twin of `_decode_range` / `_decode_block`: [(block, needs_mask), ...] in visiting order."""
    sinks, tail, left, right = spec
    p_lo, p_hi = lk - lq, lk - 1
    if sinks > 0:
        a_hi = min(p_hi, sinks - 1)
        na = a_hi // block_n + 1 if a_hi >= 0 else 0
        a_full = min(p_lo, sinks - 1)
    else:
        na, a_full = 0, -1
    if tail == 1:
        b_lo, b_hi = max(p_lo - left, 0), p_hi
        f_lo, f_hi = p_hi - left, p_lo + right
    elif tail == 2:
        c0 = _floordiv(p_lo, left) * left
        b_lo, b_hi = max(c0, 0), p_hi
        f_lo, f_hi = (c0 if c0 == _floordiv(p_hi, left) * left else lk), min(p_lo + right, p_hi)
    else:
        b_lo, b_hi, f_lo, f_hi = 0, -1, lk, -1
    b0 = max(b_lo // block_n, na)
    nb = max(max(b_hi, 0) // block_n - b0 + 1, 0) if b_lo <= b_hi else 0
    out = []
    for j in range(na + nb):
        blk = j if j < na else b0 + (j - na)
        k0 = blk * block_n
        k1 = min(k0 + block_n - 1, lk - 1)
        out.append((blk, not (k1 <= a_full or (k0 >= f_lo and k1 <= f_hi))))
    return out


def lk_bucket(lk: int) -> int:
    """The key length that host metadata of a range pattern is built for: the largest power of two <= lk
    (so a decode loop whose Lk grows by one each step meets a new one only when Lk doubles)."""
    return 1 << (max(int(lk), 1).bit_length() - 1)


def _group_chunks(hq: int, hkv: int, lq: int, max_rows: int) -> tuple:
    """(heads a program takes, programs a group is cut into)."""
    g = hq // hkv
    hpp = max(1, min(g, max_rows // lq))
    return hpp, -(-g // hpp)


@functools.lru_cache(maxsize=128)
def range_plan(spec, lq: int, lk_bucket: int, block_n: int, hq: int, hkv: int, device: str,
               max_rows: int = MAX_ROWS) -> DecodePlan:
    """The `DecodePlan` of a range pattern (`range_spec`), for a length bucket (`lk_bucket`): no lists (a
    one-element dummy, never read), ``max_blocks`` and ``keys_read`` at the bucket's length (they choose the
    default split count)."""
    hpp, nc = _group_chunks(hq, hkv, lq, max_rows)
    blocks = range_blocks(spec, lq, lk_bucket, block_n)
    keys = sum(min(block_n, lk_bucket - b * block_n) for b, _ in blocks) * hkv * nc
    dummy = torch.zeros((1, 1), dtype=torch.int32, device=device)
    return DecodePlan(dummy, 1, nc, hpp, len(blocks), keys)


@functools.lru_cache(maxsize=128)
def _kernels(pattern, lq: int, lk, device: str):
    # lk None: a range pattern (`range_spec`), whose mask source does not depend on the key length (the
    # emitters of Full, Causal, SlidingWindow, Sinks, Chunked and their unions / intersections never read
    # it; only Document's and a 1-D Neighborhood's do): one kernel for every Lk
    lines, aux = generate(pattern, lq, 1 if lk is None else lk)
    mod = kernel_module(lines, DECODE)
    aux = aux.to(device) if aux is not None else torch.zeros(1, dtype=torch.int32, device=device)
    return mod.attn_decode_split, mod.attn_decode_wide, mod.attn_decode_merge, aux


@functools.lru_cache(maxsize=16)
def _num_sms(device: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


def is_wide(d: int, dv: int) -> bool:
    """Whether (D, Dv) needs the chunked kernel `attn_decode_wide`."""
    return max(d, dv) > NARROW_MAX_HEAD_DIM


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def default_block_n(d: int, dv: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # the CPU interpreter: small tiles keep it quick
    if is_wide(d, dv):
        return 16  # see WIDE_MAX_ROWS: with 32 keys a block the accumulator spills
    return 64 if max(d, dv) <= 128 else 32


def default_num_splits(programs: int, max_blocks: int, device: torch.device, min_blocks: int = 4) -> int:
    """As many splits as fill one wave of the GPU (``programs * splits <= SMs``; a partial second wave
    only adds a tail), but none with fewer than ``min_blocks`` kv blocks (the workspace and merge cost
    stay small next to K/V). On an H100 (benchmarks/triton_decode_bench.py, bf16, D=128, Hkv=8, one
    token) 16 splits of 64-key blocks ran within 2% of the best of 8..128 splits at 8K..128K keys."""
    if max_blocks <= 0:
        return 1
    if device.type != "cuda":
        return min(2, max_blocks)
    target = _num_sms(str(device)) // max(programs, 1)
    return max(1, min(target, max_blocks // min_blocks))


@dataclass(frozen=True, eq=False)
class _Launch:
    """Everything about a call that depends only on its shapes, dtype, device and options (cached, so
    that a decode step costs little more on the host than the two kernel launches)."""
    split_k: object
    merge: object
    aux: torch.Tensor
    plan: DecodePlan
    splits: int
    programs: int
    list_stride: int
    meta: dict
    merge_meta: dict
    merge_slices: int  # Dv slices per output row in the merge grid


@functools.lru_cache(maxsize=256)
def _launch(pattern, b, hq, hkv, lq, lk, d, dv, dtype, device, num_splits, block_n, num_warps, num_stages,
            max_rows, wide, block_dv, block_dc, visit="auto") -> _Launch:
    """``lk``: the key length for the visit lists, or any length of the bucket (`lk_bucket`) for a range
    pattern (`range_spec`, unless ``visit="list"``), whose launches hold nothing that depends on the exact Lk."""
    if hq % hkv:
        raise ValueError(f"attention_decode: Hq={hq} is not a multiple of Hkv={hkv}")
    wide = is_wide(d, dv) if wide is None else bool(wide)
    limit = WIDE_MAX_HEAD_DIM if wide else NARROW_MAX_HEAD_DIM
    if max(d, dv) > limit:
        raise ValueError(f"attention_decode: head dims D={d}, Dv={dv} are too wide (at most {limit})")
    if max_rows is None:
        max_rows = WIDE_MAX_ROWS if wide else MAX_ROWS
    if lq > max_rows:
        raise ValueError(f"attention_decode: Lq={lq} is too long for the decode path (at most {max_rows})")
    dev = str(device)
    cuda = device.type == "cuda"
    bn = block_n or default_block_n(d, dv, device)
    spec = _visit_spec(pattern, visit)
    if spec is None:
        plan = decode_plan(pattern, lq, lk, bn, hq, hkv, dev, max_rows)
        narrow_k, wide_k, merge, aux = _kernels(pattern, lq, lk, dev)
    else:
        plan = range_plan(spec, lq, lk_bucket(lk), bn, hq, hkv, dev, max_rows)
        narrow_k, wide_k, merge, aux = _kernels(pattern, lq, None, dev)
    rows = max(16, _pow2(plan.heads_per_chunk * lq))
    common = dict(G=hq // hkv, NC=plan.chunks, HPP=plan.heads_per_chunk, LQ=lq, D=d, DV=dv, ROWS=rows,
                  BLOCK_N=bn, PREC=_prec(dtype))
    if wide:
        bdv = block_dv or min(_pow2(dv), max(16, _pow2_floor(WIDE_ACC_BUDGET // rows)))
        ndv = -(-dv // bdv)
        programs = b * hkv * plan.chunks * ndv
        # each split should read >= 512 keys: its partial output (rows x Dv fp32, written and merged) then
        # stays small next to the keys it reads (512 x 576 bf16 for MLA)
        min_blocks = max(4, 512 // bn)
        meta = dict(common, NDV=ndv, BLOCK_DC=block_dc or min(64, _pow2(d)), BLOCK_DV=bdv,
                    num_warps=num_warps or (16 if cuda else 1), num_stages=num_stages or (2 if cuda else 1))
    else:
        programs = b * hkv * plan.chunks
        min_blocks = 4
        meta = dict(common, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
                    num_warps=num_warps or (4 if cuda else 1),
                    num_stages=num_stages or ((3 if max(d, dv) <= 128 else 2) if cuda else 1))
    s = max(1, int(num_splits or default_num_splits(programs, plan.max_blocks, device, min_blocks)))
    meta["SINGLE"] = s == 1
    sinks, tail, left, right = spec if spec is not None else (0, 0, 0, 0)
    meta.update(RANGE=spec is not None, SINKS=sinks, TAIL=tail, LEFT=left, RIGHT=right)
    block_s = max(2, 1 << (s - 1).bit_length())
    mdv = _pow2(dv) if not wide else min(_pow2(dv), max(32, _pow2_floor(8192 // block_s)))
    merge_meta = dict(DV=dv, BLOCK_S=block_s, BLOCK_DV=mdv, num_warps=4 if cuda else 1)
    return _Launch(wide_k if wide else narrow_k, merge, aux, plan, s, programs,
                   plan.lists.stride(0) if plan.owners > 1 else 0, meta, merge_meta, -(-dv // mdv))


def _visit_spec(pattern, visit: str):
    """The `range_spec` the kernel runs with (None: the visit lists)."""
    if visit == "list":
        return None
    spec = range_spec(pattern)
    if visit == "range" and spec is None:
        raise ValueError(f"attention_decode: visit='range' needs a closed-form pattern, not {pattern!r}")
    if visit not in ("auto", "range"):
        raise ValueError(f"attention_decode: visit must be 'auto', 'range' or 'list', got {visit!r}")
    return spec


def _is_full(pattern) -> bool:
    return pattern is None or isinstance(pattern, Full)


def attention_decode(q, k, v, pattern, scale: float, poison: bool = False, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     max_rows: int | None = None, wide: bool | None = None, block_dv: int | None = None,
                     block_dc: int | None = None, visit: str = "auto"):
    """Split-K forward for short queries. -> (out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32).

    Same semantics as `ops.attention_fwd`. ``num_splits``: pieces each (kv head, chunk) list of kv blocks
    is cut into (default: `default_num_splits`); ``block_n``: keys per block (default 64 on the GPU, 16
    under the interpreter); ``max_rows``: rows (heads x queries) of one program, a group with more
    heads is cut into chunks (each chunk reads its K/V again; default `MAX_ROWS`, `WIDE_MAX_ROWS` for wide heads).
    No host synchronisation once a shape has been seen, so a decode step can be captured in a CUDA graph.
    ``visit``: how the kernel finds its kv blocks: "auto" (closed-form patterns, `range_spec`, compute them
    from Lk in the kernel; the others read visit lists built on the host per Lk), "range" (the former, or
    an error), "list" (always the lists). With ranges nothing cached on the host depends on the exact Lk
    (only on `lk_bucket`), so a decode loop with growing Lk does no host work beyond the launches.

    Head dims above 256 (up to `WIDE_MAX_HEAD_DIM`; or any with ``wide=True``) take `attn_decode_wide`:
    scores summed over D chunks of ``block_dc``, the output accumulated per Dv slice of ``block_dv``
    (one program per slice; default: as wide as `WIDE_ACC_BUDGET` allows). Full attention with more
    queries than ``max_rows`` (e.g. MLA's absorbed decode with its heads folded into the query axis) is
    computed with the queries folded into the heads, as one query per head."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    rows_cap = max_rows or (WIDE_MAX_ROWS if (is_wide(d, dv) if wide is None else wide) else MAX_ROWS)
    if lq > rows_cap and _is_full(pattern):  # queries of full attention are independent: one per head
        out, lse = attention_decode(q.reshape(b, hq * lq, 1, d), k, v, None, scale, poison, num_splits, block_n,
                                    num_warps, num_stages, max_rows, wide, block_dv, block_dc, visit)
        return out.view(b, hq, lq, dv), lse.view(b, hq, lq)
    # range patterns: the launch is cached per length bucket, Lk reaches the kernel as a runtime argument
    lk_key = lk if _visit_spec(pattern, visit) is None else lk_bucket(lk)
    L = _launch(pattern, b, hq, hkv, lq, lk_key, d, dv, q.dtype, q.device, num_splits, block_n, num_warps, num_stages,
                max_rows, wide, block_dv, block_dc, visit)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    s, dev = L.splits, q.device
    new = functools.partial(torch.full, fill_value=float("nan")) if poison else torch.empty
    out = new((b, hq, lq, dv), dtype=q.dtype, device=dev)
    lse = new((b, hq, lq), dtype=torch.float32, device=dev)
    rows = b * hq * lq
    # the split workspace: (rows, S, Dv) partial outputs, then (rows, S) base-2 lse
    w = new((rows * s * (dv + 1),), dtype=torch.float32, device=dev) if s > 1 else lse
    L.split_k[(s, L.programs)](
        q, k, v, out, lse, w, L.aux, L.plan.lists,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), L.list_stride, hkv, lk, scale * LOG2E, s, rows * s * dv, **L.meta)
    if s > 1:
        L.merge[(rows, L.merge_slices)](w, out, lse, s, rows * s * dv, **L.merge_meta)
    return out, lse
