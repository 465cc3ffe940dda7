"""Forward and backward config variants of the Triton kernels on local patterns, in one process, against
compiled FlexAttention on the same pattern: GQA head packing (``PACK``: the query heads of a group share
each K/V tile load) and the folded softmax scale (``FOLD``), on causal, windows and sinks + window
(bf16, B = 1, 64 query / 8 KV heads, D = 128). Each variant's output is checked against a float64
reference on a slice first (protocol rule through `check_close`); a variant that fails to compile or
to match is recorded, not raised. Prints a table last; ``--out`` writes the rows as JSON lines.

    PYTHONPATH=src python3 benchmarks/triton_pack_variants.py --out DIR [--L 16384] [--quick]
"""
import argparse
import json
import os
import statistics
import sys

import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton import ops
from attnzoo.testing import check_close, rel_rmse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import dense_math, median_timer, row_sink  # noqa: E402

PATTERNS = {"causal": az.Causal(), "sw1024": az.SlidingWindow(1023), "sw4096": az.SlidingWindow(4095),
            "sinks+sw1024": az.SlidingWindow(1023) | az.Sinks(4)}


def _cfg(bm, bn, w, s, pack=1, fold=True, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, PACK=pack, FOLD=fold, **kw)


# name -> forward config; the first local / dense entry is the old default
FWD = {
    "64x64 w4 s3 (old)": _cfg(64, 64, 4, 3, fold=False),
    "64x64 w4 s3 fold": _cfg(64, 64, 4, 3),
    "64x64 p2 w8 s3": _cfg(64, 64, 8, 3, 2),
    "64x64 p2 w4 s3": _cfg(64, 64, 4, 3, 2),
    "64x64 p2 w8 s2": _cfg(64, 64, 8, 2, 2),
    "64x64 p2 w8 s4": _cfg(64, 64, 8, 4, 2),
    "64x128 p2 w8 s3": _cfg(64, 128, 8, 3, 2),
    "32x64 p4 w8 s3": _cfg(32, 64, 8, 3, 4),
    "64x64 p4 w8 s3": _cfg(64, 64, 8, 3, 4),
    "128x128 w8 s3 (old dense)": _cfg(128, 128, 8, 3, fold=False),
    "128x128 w8 s3 fold": _cfg(128, 128, 8, 3),
    "64x128 p2 w8 s3 fold": _cfg(64, 128, 8, 3, 2),
}
DENSE_ONLY = {"128x128 w8 s3 (old dense)", "128x128 w8 s3 fold", "128x128 w8 s3 idx2 (dense)",
              "tma 128x128 w8 s3 (dense)"}
# round 2 (after round 1 made 64x64 p4 w8 s3 the default): the neighbourhood of the winner, and backward tiles
FWD2 = {
    "64x64 w4 s3 (old)": _cfg(64, 64, 4, 3, fold=False),
    "128x128 w8 s3 (old dense)": _cfg(128, 128, 8, 3, fold=False),
    "64x64 p4 w8 s3 (default)": _cfg(64, 64, 8, 3, 4),
    "64x64 p4 w8 s4": _cfg(64, 64, 8, 4, 4),
    "64x64 p4 w8 s2": _cfg(64, 64, 8, 2, 4),
    "64x32 p4 w8 s3": _cfg(64, 32, 8, 3, 4),
    "64x128 p4 w8 s3": _cfg(64, 128, 8, 3, 4),
    "32x64 p8 w8 s3": _cfg(32, 64, 8, 3, 8),
    "128x64 p2 w8 s3": _cfg(128, 64, 8, 3, 2),
    "64x64 p8 w16 s3": _cfg(64, 64, 16, 3, 8),
    "64x64 p4 w16 s3": _cfg(64, 64, 16, 3, 4),
}
BWD2 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd 64x128 w8 s2": _cfg(64, 128, 8, 2),
    "bwd 64x128 w8 s1": _cfg(64, 128, 8, 1),
    "bwd 32x128 w4 s2": _cfg(32, 128, 4, 2),
    "bwd 128x128 w8 s2": _cfg(128, 128, 8, 2),
}
# round 3 (prepared 2026-12-04, not yet run): how the loop finds its kv blocks (IDX, see kernels._fwd_blocks)
FWD3 = {
    "64x64 p4 w8 s3 (default)": _cfg(64, 64, 8, 3, 4),
    "64x64 p4 w8 s3 idx1": _cfg(64, 64, 8, 3, 4, IDX=1),
    "64x64 p4 w8 s3 idx2": _cfg(64, 64, 8, 3, 4, IDX=2),
    "64x64 p4 w8 s2 idx2": _cfg(64, 64, 8, 2, 4, IDX=2),
    "64x64 p4 w8 s4 idx2": _cfg(64, 64, 8, 4, 4, IDX=2),
    "128x128 w8 s3 idx2": _cfg(128, 128, 8, 3, IDX=2),
}
BWD3 = {"bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2)}
# round 3 at head dim 64 (--d 64): the current D <= 64 default against packed tiles
FWD3_D64 = {
    "128x64 w4 s3 (default)": _cfg(128, 64, 4, 3),
    "64x64 p2 w4 s3": _cfg(64, 64, 4, 3, 2),
    "64x64 p4 w8 s3": _cfg(64, 64, 8, 3, 4),
    "128x64 p2 w8 s3": _cfg(128, 64, 8, 3, 2),
    "64x128 p4 w8 s3": _cfg(64, 128, 8, 3, 4),
    "128x128 p2 w8 s3": _cfg(128, 128, 8, 3, 2),
}
# round 4 (prepared 2026-12-04 s4): K / V through tensor descriptors (TMA) and Triton's warp specialisation
FWD4 = {
    "64x64 p4 w8 s3 (default)": _cfg(64, 64, 8, 3, 4, IDX=2),
    "tma": _cfg(64, 64, 8, 3, 4, IDX=2, TMA=True),
    "tma s2": _cfg(64, 64, 8, 2, 4, IDX=2, TMA=True),
    "tma s4": _cfg(64, 64, 8, 4, 4, IDX=2, TMA=True),
    "ws": _cfg(64, 64, 8, 3, 4, IDX=2, WS=True),
    "tma ws": _cfg(64, 64, 8, 3, 4, IDX=2, TMA=True, WS=True),
    "tma 128x64 p2 w8 s3": _cfg(128, 64, 8, 3, 2, IDX=2, TMA=True),
    "tma 64x128 p2 w8 s3": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True),
    "128x128 w8 s3 idx2 (dense)": _cfg(128, 128, 8, 3, IDX=2),
    "tma 128x128 w8 s3 (dense)": _cfg(128, 128, 8, 3, IDX=2, TMA=True),
}
# round 5 (prepared 2026-12-04 s5): the full and partial blocks in one loop (MERGE: one software pipeline, the
# mask applied past the full blocks) on the local and the dense defaults
FWD5 = {
    "64x64 p4 w8 s3 (local default)": _cfg(64, 64, 8, 3, 4, IDX=2),
    "merge": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True),
    "merge s4": _cfg(64, 64, 8, 4, 4, IDX=2, MERGE=True),
    "merge tma": _cfg(64, 64, 8, 3, 4, IDX=2, TMA=True, MERGE=True),
    "merge 128x64 p2": _cfg(128, 64, 8, 3, 2, IDX=2, MERGE=True),
    "64x128 p2 tma (dense default)": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True),
    "64x128 p2 tma merge": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True, MERGE=True),
}
BWD5 = {"bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2), "bwd tma (default)": _cfg(64, 64, 4, 2, TMA=True),
        "bwd tma merge": _cfg(64, 64, 4, 2, TMA=True, MERGE=True), "bwd merge": _cfg(64, 64, 4, 2, MERGE=True)}
BWD4 = {"bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2), "bwd tma": _cfg(64, 64, 4, 2, TMA=True),
        "bwd tma w8": _cfg(64, 64, 8, 2, TMA=True), "bwd tma s3": _cfg(64, 64, 4, 3, TMA=True)}
# round 6 (prepared 2026-12-04 s7): the backward alone, after the forward's default. KT: the dk/dv kernel's tiles
# keys by queries (S^T = K Q^T: P^T and dS^T are the left operands of the dv / dk dots as they come out of their
# own dots, no transpose of a computed tile); BM_KV / BN_KV / WARPS_KV / STAGES_KV: the dk/dv kernel's own tiles,
# warps and stages (FA2 / FA3 take 128 keys per program there, 64 or 128 query rows in the dq kernel). Static
# check for sm_90 (benchmarks/kernel_spills.py --attn): at 64x64 / 4 warps both kernels sit at 255 registers and the dk/dv
# kernel spills ~470 B; the dq kernel at 128x64 / 8 warps takes 216 registers and no stack.
FWD6 = {"forward default": None}
BWD6 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd tma (default)": _cfg(64, 64, 4, 2, TMA=True),
    "kt": _cfg(64, 64, 4, 2, TMA=True, KT=True),
    "kt kv64x128 w8": _cfg(64, 64, 4, 2, TMA=True, KT=True, BM_KV=64, BN_KV=128, WARPS_KV=8),
    "kt kv32x128 w8": _cfg(64, 64, 4, 2, TMA=True, KT=True, BM_KV=32, BN_KV=128, WARPS_KV=8),
    "kt kv64x128 w8 s1": _cfg(64, 64, 4, 2, TMA=True, KT=True, BM_KV=64, BN_KV=128, WARPS_KV=8, STAGES_KV=1),
    "kv32x64": _cfg(64, 64, 4, 2, TMA=True, BM_KV=32),
    "dq w8": _cfg(64, 64, 8, 2, TMA=True, WARPS_KV=4),
    "dq128x64 w8": _cfg(128, 64, 8, 2, TMA=True, BM_KV=64, BN_KV=64, WARPS_KV=4),
    "dq128x64 w8 + kt kv64x128 w8": _cfg(128, 64, 8, 2, TMA=True, KT=True, BM_KV=64, BN_KV=128),
    "dq128x64 w8 + kt kv32x128 w8": _cfg(128, 64, 8, 2, TMA=True, KT=True, BM_KV=32, BN_KV=128),
    # ATOMIC_DQ: no dq kernel; the dk/dv kernel adds each tile's dS K to a float32 dq accumulator by atomics (five
    # products per tile instead of seven; not bitwise deterministic, so never a silent default)
    "atomic dq": _cfg(64, 64, 4, 2, TMA=True, ATOMIC_DQ=True),
    "atomic dq kt kv64x128 w8": _cfg(64, 64, 4, 2, TMA=True, ATOMIC_DQ=True, KT=True, BM_KV=64, BN_KV=128,
                                     WARPS_KV=8),
    "atomic dq kv64x128 w8": _cfg(64, 64, 4, 2, TMA=True, ATOMIC_DQ=True, BM_KV=64, BN_KV=128, WARPS_KV=8),
    "atomic dq kt kv128x128 w8": _cfg(64, 64, 4, 2, TMA=True, ATOMIC_DQ=True, KT=True, BM_KV=128, BN_KV=128,
                                      WARPS_KV=8),
}
# round 7 (prepared 2026-12-04 s8): the forward's LAZY rescaling (acc and l rescaled only when some row's maximum
# grew past kernels.LAZY_TAU; FlashAttention-4's conditional rescaling): on sm_90 the window default's full-block
# iteration issues about 557 instead of 661 instructions when no row grows (the 256 x 128 acc multiply skipped,
# one block-wide reduction added); and the backward after its FMA change (exp2(raw * scale - lse), the mask after)
FWD7 = {
    "local default (merge)": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True),
    "local lazy": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, LAZY=True),
    "local lazy s4": _cfg(64, 64, 8, 4, 4, IDX=2, MERGE=True, LAZY=True),
    "local lazy 64x128 p2": _cfg(64, 128, 8, 3, 2, IDX=2, MERGE=True, LAZY=True),
    "dense default": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True),
    "dense lazy": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True, LAZY=True),
    # PIPE (2026-12-05 s9): the merged loop with each step's next scores issued before its softmax, so the next
    # q K^T wgmma runs during this step's exp2s (FlashAttention-3's intra-warpgroup overlap; on sm_90 the compiled
    # loop interleaves them). One more score tile in registers: at the local default's PACK 4 x 64 x 64 it spills
    # 680 B, so the variants take fewer rows or keys (PACK 2: 193 registers, unpacked at 4 warps: 191, PACK 4 at 32
    # keys: 72 B of spills)
    "local pipe p2": _cfg(64, 64, 8, 3, 2, IDX=2, MERGE=True, PIPE=True),
    "local merge p2": _cfg(64, 64, 8, 3, 2, IDX=2, MERGE=True),
    "local pipe p1 w4": _cfg(64, 64, 4, 3, 1, IDX=2, MERGE=True, PIPE=True),
    "local pipe p4 64x32": _cfg(64, 32, 8, 3, 4, IDX=2, MERGE=True, PIPE=True),
    "local pipe lazy p2": _cfg(64, 64, 8, 3, 2, IDX=2, MERGE=True, PIPE=True, LAZY=True),
}
BWD7 = {"bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2), "bwd tma (default)": _cfg(64, 64, 4, 2, TMA=True)}
# round 8 (prepared 2026-12-05 s15, CPU only): NARROW -- on the query blocks past the window's reach of block 0,
# block 0 (where such a block sees only the attention sinks) runs as a 16- or 32-key tile instead of a 64- or
# 128-key one: about 1/18 of the sinks + window-1024 forward's tiles at 64 x 64, 1/10 at 64 x 128 (where the
# wide tiles lost on sinks + window, 1.32 -> 1.56 ms on the H200, round 4)
FWD8 = {
    "local default (merge)": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True),
    "local narrow16": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=16),
    "local narrow32": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=32),
    "local narrow16 tma": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, TMA=True, NARROW=16),
    "wide 64x128 p2 tma": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True),
    "wide 64x128 p2 tma narrow16": _cfg(64, 128, 8, 3, 2, IDX=2, TMA=True, NARROW=16),
    "wide 64x128 p2 merge narrow16": _cfg(64, 128, 8, 3, 2, IDX=2, MERGE=True, NARROW=16),
}
# round 9 (sixteenth session, 2026-12-06): the dk/dv kernel at 8 warps on the default 64 x 64 tiles (two warpgroups
# split the 64 x 128 dk / dv accumulators by columns). ptxas sm_90 (kernel_spills.py --attn --sass --filter "dkdv 64
# keys x 64"): at 4 warps 255 registers and 184 B of spills (9 spill loads / stores per iteration of the partial
# loop), at 8 warps 255 and 168 B, with KT at 8 warps 249 registers and no spills; the dq kernel at 8 warps 167
# registers (163 at 4). After the default forward, vs flex
FWD9 = {"forward default": None}
BWD9 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),  # (the reference every variant's gradients are compared with)
    "bwd tma (default)": _cfg(64, 64, 4, 2, TMA=True),
    "kv w8": _cfg(64, 64, 4, 2, TMA=True, WARPS_KV=8),
    "kt kv w8": _cfg(64, 64, 4, 2, TMA=True, KT=True, WARPS_KV=8),
    "kt kv w8 s1": _cfg(64, 64, 4, 2, TMA=True, KT=True, WARPS_KV=8, STAGES_KV=1),
    "kt kv w8 s3": _cfg(64, 64, 4, 2, TMA=True, KT=True, WARPS_KV=8, STAGES_KV=3),
    "kt w8 (both kernels)": _cfg(64, 64, 8, 2, TMA=True, KT=True),
    "kt kv w8 merge": _cfg(64, 64, 4, 2, TMA=True, KT=True, WARPS_KV=8, MERGE=True),
}
# rounds 10 and 11 (seventeenth session) timed the single-partition Gluon forward (GLUON=True; 0.76-0.94x the Triton
# default, one CTA barrier a step); it was removed in the eighteenth session. Logs:
# benchmarks/results/h100-2026-12-06-s17/call1 and call2. A GLUON row whose shape the kernel does not take would time
# the Triton fallback: the script records that as an error (ops.GLUON_LAUNCHES did not move)
# round 12 (seventeenth session): the warp-specialised Gluon forward (GLUON="ws": a producer warp for the TMA loads,
# two consumer warpgroups, one per head of the pair, slots freed by count-2 mbarriers instead of a CTA barrier;
# PINGPONG: the two warpgroups take turns issuing their score MMAs). ptxas sm_90: 168 registers, no spills
FWD12 = {
    "local default": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=16),
    "gluon ws s2": _cfg(64, 64, 4, 2, 2, IDX=2, GLUON="ws"),
    "gluon ws s3": _cfg(64, 64, 4, 3, 2, IDX=2, GLUON="ws"),
    "gluon ws s4": _cfg(64, 64, 4, 4, 2, IDX=2, GLUON="ws"),
    "gluon ws pingpong s2": _cfg(64, 64, 4, 2, 2, IDX=2, GLUON="ws", PINGPONG=True),
    "gluon ws pingpong s3": _cfg(64, 64, 4, 3, 2, IDX=2, GLUON="ws", PINGPONG=True),
}
# round 13 (seventeenth session, after round 12: the warp-specialised form level with the Triton default on causal,
# 0.96-0.97x on the 1024-windows): its 128-key tiles (the consumers at 232 registers through setmaxnreg, the launch
# at maxnreg 168; no spills at ptxas sm_90) and the 64-key ones at 232
FWD13 = {
    "local default": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=16),
    "gluon ws s3": _cfg(64, 64, 4, 3, 2, IDX=2, GLUON="ws"),
    "gluon ws s3 r232": _cfg(64, 64, 4, 3, 2, IDX=2, GLUON="ws", REGS=232),
    "gluon ws 64x128 s2": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="ws"),
    "gluon ws 64x128 s3": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="ws"),
    "gluon ws 64x128 pingpong s2": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="ws", PINGPONG=True),
}
# round 14 (written in the seventeenth session, run in the eighteenth): the persistent warp-specialised Gluon forward
# (GLUON="wsp": one program per SM walking the work items, the next item's Q and K / V loaded while the current one
# finishes) against the ws default and the Triton local default -- aimed at window 1024, whose items are 9 steps
FWD14 = {
    "local default": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=16),
    "gluon ws 64x128 s3 (dense default)": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="ws"),
    "gluon wsp 64x128 s3 q1": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="wsp", QBUF=1),
    "gluon wsp 64x128 s2 q2": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2),
    "gluon wsp 64x64 s3 q2": _cfg(64, 64, 4, 3, 2, IDX=2, GLUON="wsp", QBUF=2),
    "gluon wsp 64x64 s4 q2": _cfg(64, 64, 4, 4, 2, IDX=2, GLUON="wsp", QBUF=2),
}
FWD15 = {  # the persistent form's work-item order (ORDER 0: head pair outer; 1: a KV head's pairs innermost)
    "local default": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=16),
    "gluon ws 64x128 s3 (dense default)": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="ws"),
    "gluon wsp 64x128 s2 q2 o0": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=0),
    "gluon wsp 64x128 s2 q2 o1": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1),
    "gluon wsp 64x128 s3 q1 o0": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="wsp", QBUF=1, ORDER=0),
    "gluon wsp 64x128 s3 q1 o1": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="wsp", QBUF=1, ORDER=1),
    "gluon wsp 64x128 s2 q1 o1": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=1, ORDER=1),
    # (twenty-third session) the local / wide default since the nineteenth: its consumers at 240 registers
    "gluon wsp 64x128 s2 q2 o1 r240 (default)": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240),
    "gluon wsp 64x128 s2 q2 o0 r240": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=0, REGS=240),
    "gluon wsp 64x128 s3 q1 o1 r240": _cfg(64, 128, 4, 3, 2, IDX=2, GLUON="wsp", QBUF=1, ORDER=1, REGS=240),
}
FWD16 = {  # the narrow sink tile in the persistent form (NARROW), and its consumers at 240 registers (REGS)
    "local default (Triton)": _cfg(64, 64, 8, 3, 4, IDX=2, MERGE=True, NARROW=16),
    "gluon wsp o1 r232": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1),
    "gluon wsp o1 r240": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240),
    "gluon wsp o1 r240 n16": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240,
                                            NARROW=16),
    "gluon wsp o0 r240 n16": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=0, REGS=240, NARROW=16),
    # (nineteenth session, not yet run) the narrow tile's scores issued and softmaxed with step 0's
    "gluon wsp o1 r240 n16 merge": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240, NARROW=16,
                                        NARROW_MERGE=True),
    "gluon wsp o0 r240 n16 merge": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=0, REGS=240, NARROW=16,
                                        NARROW_MERGE=True),
    # (nineteenth session, not yet run) block 0 first where partial, the mask without the sinks in the main loop
    # (the local default since the twentieth session)
    "gluon wsp o1 r240 n16 far (default)": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240,
                                                NARROW=16, MASK_FAR=True),
    # (twentieth session, not yet run: ORDER 0 was the faster order with sinks at 16K, without MASK_FAR)
    "gluon wsp o0 r240 n16 far": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=0, REGS=240, NARROW=16,
                                      MASK_FAR=True),
    "gluon wsp o1 r240 n16 far merge": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240,
                                            NARROW=16, MASK_FAR=True, NARROW_MERGE=True),
    # (twenty-eighth session) NARROW_LAST 1: the narrow tile at each item's end with its scores issued beside the last
    # block's P V -- right and no faster (sinks + window 1.109 vs 1.095 ms at 16K, 4.811 vs 4.729 at 64K); 2: the same
    # for consumer 1 only, so that the two consumers' narrow steps fall at different times
    "gluon wsp o1 r240 n16 far last": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240,
                                           NARROW=16, MASK_FAR=True, NARROW_LAST=1),
    "gluon wsp o1 r240 n16 far last2": _cfg(64, 128, 4, 2, 2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240,
                                            NARROW=16, MASK_FAR=True, NARROW_LAST=2),
}
# round 17 (eighteenth session, written without device time): the Gluon dk / dv kernel (cfg GLUON_BWD: a producer
# warp for K / V once and Q / dO into a ring, two consumer warpgroups of 64 keys each; dq from the Triton dq kernel)
# after the default forward, against the Triton backward's default
FWD17 = {"forward default": None}
BWD17 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),  # (the reference every variant's gradients are compared with)
    "bwd tma (default)": _cfg(64, 64, 4, 2, TMA=True),
    "gluon bwd s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=True),
    "gluon bwd s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(num_stages=3)),
    "gluon bwd s2 r232": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(REGS=232)),
    "gluon bwd s2 acc-init": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ACC_INIT=True)),
    # (nineteenth session, not yet run) dq in the same kernel by TMA reduce-adds: 5 products a pair instead of 7
    "gluon bwd fused dq": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(FUSED_DQ=True)),
    "gluon bwd fused dq s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(FUSED_DQ=True, num_stages=3)),
    # (DQ_LAG, each step's dq one step later so that the consumers need not meet every step, ran in the twentieth
    # session: level, 4.547 / 12.169 / 26.503 ms against 4.602 / 12.117 / 26.737; removed)
}
# round 18 (twentieth session, compiled, not yet run): the Gluon dk / dv kernel's ROWS form (S = Q K^T and dP = dO V^T
# issued together, lse / delta per row, P and dS through shared memory as dV's / dK's operands and, fused, dq's)
BWD18 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd tma (default)": _cfg(64, 64, 4, 2, TMA=True),
    "gluon bwd s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(num_stages=3)),
    "gluon rows s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=True)),
    "gluon rows s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=True, num_stages=3)),
    "gluon fused dq s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(FUSED_DQ=True, num_stages=3)),
    "gluon rows fused s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=True, FUSED_DQ=True)),
    # ROWS 2: dP's MMA with dV's, after P (one score tile live: 554 loop instructions and 7 spills a step on sinks +
    # window, against 620 / 45 for ROWS 1)
    "gluon rows2 s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2)),
    "gluon rows2 s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, num_stages=3)),
    "gluon rows2 fused s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, FUSED_DQ=True)),
    # GLUON_DQ: the Gluon dq kernel (the ws forward's form on 64 x 64 tiles; no spills) instead of the Triton one
    "gluon dq + gluon dkdv s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(GLUON_DQ=True, num_stages=3)),
    "gluon dq + rows2 s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True)),
    "gluon dq s3 + rows2 s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3)),
    "gluon dq s3 + triton dkdv": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                             TRITON_DKDV=True)),
}
# round 19 (twenty-first session): round 18's fastest deterministic form ("(default)": the backward's default on windows
# for this round; after it, the same with a 3-slot ring, on wide windows only) against the Triton kernels and its
# neighbours, in --repeat's round-robin passes
BWD19 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd tma (triton)": _cfg(64, 64, 4, 2, TMA=True),
    "gluon dq s3 + rows2 s2 (default)": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True,
                                                                                    DQ_STAGES=3)),
    "gluon dq s3 + rows2 s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3,
                                                                          num_stages=3)),
    "gluon dq s3 + rows s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=True, GLUON_DQ=True, DQ_STAGES=3)),
    "gluon dq s2 + rows2 s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True)),
    "gluon rows fused s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=True, FUSED_DQ=True)),
}
# round 20 (twenty-second session): delta (rowsum(O dO)) written by the Gluon dq kernel as it goes, as the Triton dq
# kernel does, against its own kernel before (SEP_DELTA: 0.18 ms at 16K, 64 heads, H100 -- 5 % of window 1024's
# backward, which left the Gluon forms level with the Triton kernels there); window 1024, sinks + window and causal
# too, where the Triton kernels are still the default; and the Gluon dq kernel with the Triton dk / dv kernel
# (TRITON_DKDV: for sinks + window, where the Gluon dk / dv kernel lost)
BWD20 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd tma (triton)": _cfg(64, 64, 4, 2, TMA=True),
    "gluon dq s3 + rows2 s3 sep-delta": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3,
                                                                                    num_stages=3, SEP_DELTA=True)),
    "gluon dq s3 + rows2 s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3,
                                                                          num_stages=3)),
    "gluon dq s3 + rows2 s2": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3)),
    "gluon dq s3 + triton dkdv": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                             TRITON_DKDV=True)),
}
# round 21 (twenty-second session, compiled, NOT YET RUN): the Gluon dq kernel's persistent form (DQ_PERSIST: one
# program per SM walking the work items, the next item's Q / dO and K / V loading while the current one ends) with the
# defaults' dk / dv kernels, against those defaults (round 20's winners)
BWD21 = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd tma (triton)": _cfg(64, 64, 4, 2, TMA=True),
    "gluon dq s3 + triton dkdv": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                             TRITON_DKDV=True)),
    "gluon dqp s3 + triton dkdv": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                              DQ_PERSIST=True, TRITON_DKDV=True)),
    "gluon dqp s2 + triton dkdv": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=2,
                                                                              DQ_PERSIST=True, TRITON_DKDV=True)),
    "gluon dq s3 + rows2 s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3,
                                                                          num_stages=3)),
    "gluon dqp s3 + rows2 s3": _cfg(64, 64, 4, 2, TMA=True, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3,
                                                                           num_stages=3, DQ_PERSIST=True)),
}
# round 22 (twenty-third session, run in it: benchmarks/results/h100-2026-12-06-s23/c3): the Gluon dk / dv kernel's PIPE
# (ROWS 2's loop flat over the group's heads, lse / delta a step ahead; 2: the next scores behind dK) -- slower in
# every form, removed (commit 3b4c836 has the kernel and this round's table)
# round 23 (twenty-third / twenty-fifth sessions, run in the twenty-fifth: benchmarks/results/h100-2026-12-07-s25): the
# Gluon dk / dv kernel's ROWS 3 (dP issued with S, P and dS stored behind one fence, dV and dK issued together) and
# PINGPONG (the consumers' MMA groups in turns) -- no faster, removed (commit 944279a has them and this round)
# round 24 (twenty-fifth session, run in the twenty-seventh: benchmarks/results/h100-2026-12-07-s27): the dk / dv
# kernels' grid with the (batch, KV head) axis first (cfg ITEM_AXIS) -- no faster, removed (commit 516104a has it)
# round 25 (thirtieth session, run: benchmarks/results/h100-2026-12-07-s30/c1-half): HALF, a window's edge block seen in
# one 64-key half run last as a half step in the persistent Gluon forward -- slower, removed (commit 886714f has it)
# round 26 (thirtieth session): XPIPE, each item's first scores issued with the previous item's last P V, in the
# persistent Gluon forward (without the narrow tile, which it does not take), against the local / wide default
_WSP = dict(IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240, MASK_FAR=True)
FWD26 = {"gluon wsp default": _cfg(64, 128, 4, 2, 2, NARROW=16, NARROW_LAST=2, **_WSP),
         "gluon wsp xpipe": _cfg(64, 128, 4, 2, 2, XPIPE=True, **_WSP),
         # XPIPE_NARROW: XPIPE with the narrow sink tile at each item's end (both consumers)
         "gluon wsp xpipe narrow": _cfg(64, 128, 4, 2, 2, NARROW=16, XPIPE=True, XPIPE_NARROW=True, **_WSP),
         # (XPIPE_NARROW=2, consumer 0's narrow step before the boundary: 7-10 % slower in the thirty-second session,
         # benchmarks/results/h100-2026-12-07-s32/c1-xstag; removed, commit d5b09a7 has it)
         # XPIPE_NARROW="fold" (thirty-second session): no narrow tile; the sinks loaded into an unseen 16-key slot of
         # each flagged item's first partial block (the fold step), so an item costs what it costs without sinks
         "gluon wsp xpipe fold": _cfg(64, 128, 4, 2, 2, NARROW=16, XPIPE=True, XPIPE_NARROW="fold", **_WSP)}
FWD_ONLY = {8: FWD8, 12: FWD12, 13: FWD13, 14: FWD14, 15: FWD15, 16: FWD16, 26: FWD26}  # rounds with no backward
BWD = {
    "bwd 64x64 w4 s2 (old)": _cfg(64, 64, 4, 2),
    "bwd 64x64 w4 s2 dq-p2": _cfg(64, 64, 4, 2, PACK_DQ=2),
    "bwd 64x64 w8 s2 dq-p2": _cfg(64, 64, 8, 2, PACK_DQ=2),
    "bwd 64x64 w4 s2 dq-p4": _cfg(64, 64, 4, 2, PACK_DQ=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--round", type=int, default=1, choices=[r for r in range(1, 27) if r not in (10, 11, 22, 23, 24, 25)],
                    help="1: packing and folding against the old configs; 2: around the new default, backward tiles; "
                         "3: the block-index modes (IDX); 4: TMA loads and warp specialisation; 5: one merged "
                         "loop over full and partial blocks; 6: the backward's tiles (KT, the dk/dv kernel's own "
                         "tiles and warps) after the default forward; 7: the forward's LAZY rescaling, and the "
                         "backward default, and PIPE (the next scores in flight during the softmax); 8: NARROW "
                         "(block 0 as a 16- or 32-key tile where a query block sees only attention sinks in it), "
                         "forward only; 9: the dk/dv kernel at 8 warps (with KT) on the 64 x 64 tiles; (10, 11: the "
                         "removed single-partition Gluon forward); 12: the warp-specialised Gluon forward; 13: its 128-key tiles; 14: its persistent form; "
                         "15: the persistent form's work-item order; 16: its narrow sink tile and 240 registers; "
                         "17: the Gluon dk / dv kernel; 18: its ROWS form (scores with the query rows as rows); 19: "
                         "ROWS 2 with the Gluon dq kernel, rings of 2 / 3; 20: delta written by the Gluon dq kernel "
                         "against its own kernel; 21: the Gluon dq kernel's persistent form; (22, 23, 24: the removed PIPE, ROWS 3, "
                         "PINGPONG and ITEM_AXIS); (25: the removed HALF); 26: XPIPE (each item's first scores with the "
                         "previous item's last P V) in the persistent Gluon forward")
    ap.add_argument("--fwd-only", action="store_true", help="leave out the backward variants")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run of the script itself (TRITON_INTERPRET=1, float32, tiny shapes, 16x16 tiles)")
    ap.add_argument("--d", type=int, default=128, choices=(64, 128), help="head dim (round 3 only for 64)")
    ap.add_argument("--table", metavar="JSONL", help="print the table of an earlier run's records and exit")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time flex's forward and every forward variant (then every backward variant) this many times "
                         "in all, round robin after the first pass, and record the median (fwd_ms_runs, bwd_ms_runs: "
                         "each time): kernels that differ by less than a run's drift then compare in one light")
    ap.add_argument("--only", metavar="SUBSTR[,SUBSTR]",
                    help="time only the backward variants whose names contain one of these (and the old reference)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.table:
        with open(args.table) as f:
            print_table([json.loads(line) for line in f if line.strip()])
        return
    global FWD, BWD
    if args.d == 64 and args.round != 3:
        ap.error("--d 64 has variants in round 3 only")
    if args.round in (16, 26):  # (the Gluon kernels' NARROW: on by default since the nineteenth session)
        ops.GLUON_NARROW = True
    if args.round in FWD_ONLY:  # (rounds 8, 12-15 fell through to round 3's tables here until the twenty-third
        FWD, BWD = FWD_ONLY[args.round], {}  # session: the twenty-second's wide64 run timed round 3's variants)
    elif args.round == 9:
        FWD, BWD = FWD9, BWD9
    elif args.round in (17, 18, 19, 20, 21):
        FWD, BWD = FWD17, {17: BWD17, 18: BWD18, 19: BWD19, 20: BWD20, 21: BWD21}[args.round]
    elif args.round == 7:
        FWD, BWD = (FWD7, BWD7) if not args.fwd_only else (FWD7, {})
    elif args.round == 6:
        FWD, BWD = FWD6, BWD6
    elif args.round == 5:
        FWD, BWD = (FWD5, BWD5) if not args.fwd_only else (FWD5, {})
    elif args.round == 4:
        FWD, BWD = FWD4, BWD4
    elif args.round > 1:
        FWD, BWD = (FWD2, BWD2) if args.round == 2 else (FWD3_D64 if args.d == 64 else FWD3, BWD3)
    if args.only:
        keep = args.only.split(",")
        BWD = {name: c for name, c in BWD.items() if "(old)" in name or any(x in name for x in keep)}
    dev = "cpu" if args.smoke else "cuda"
    L, hq, hkv, d = (args.L, 64, 8, args.d) if not args.smoke else (64, 8, 2, 32)
    dt = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        for table in (FWD, BWD):
            for c in table.values():
                if c is None:
                    continue
                c.update(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
                c.update({key: 16 for key in ("BM_KV", "BN_KV") if key in c})
                c.update({key: 1 for key in ("WARPS_KV", "STAGES_KV") if key in c})
    scale = d ** -0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, hq, L, d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(1, hkv, L, d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(1, hkv, L, d, device=dev, dtype=dt, generator=gen)
    do = torch.randn(1, hq, L, d, device=dev, dtype=dt, generator=gen)
    # the correctness slice: 16 query heads (two groups), 2048 tokens, against float64
    cs = min(L, 2048)
    qs, ks, vs = (t.contiguous() for t in (q[:, :16, :cs], k[:, :2, :cs], v[:, :2, :cs]))  # (TMA needs contiguous)
    path = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "pack_variants.jsonl" if args.round == 1 else f"pack_variants_r{args.round}_d{args.d}.jsonl"
        path = os.path.join(args.out, name)
    rows, emit, close = row_sink(path)
    timed = median_timer(dev, 0.6 if args.quick else 1.2)

    for pname in args.patterns.split(","):
        p = PATTERNS[pname]
        dens = p.density(L, L)
        fl = 4 * hq * d * dens * L * L
        ref_o = reference_attention(qs.double(), ks.double(), vs.double(), p, scale)[0]
        base_o = dense_math(qs, ks, vs, p, scale)[0]
        # FlexAttention, forward and forward+backward, through attnzoo's flex backend
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        fwd_ms, r = timed(lambda: az.attention(q, k, v, p, backend="flex"))
        fb_ms, r2 = timed(lambda: torch.autograd.backward(az.attention(qg, kg, vg, p, backend="flex"), do))
        flex_row = dict(pattern=pname, L=L, variant="flex", fwd_ms=fwd_ms, fwdbwd_ms=fb_ms,
                        fwd_tflops=fl / fwd_ms / 1e9 if fwd_ms else None,
                        message=r.get("message") or r2.get("message"))
        emit(flex_row)
        flex_fwd, flex_fb = fwd_ms, fb_ms
        best = None
        # (--repeat) the timed forwards, for the round-robin passes after this one
        again = [(flex_row, lambda: az.attention(q, k, v, p, backend="flex"))] if fwd_ms else []
        for name, cfg in FWD.items():
            if name in DENSE_ONLY and pname != "causal":
                continue
            row = dict(pattern=pname, L=L, variant=name, cfg=cfg)
            try:
                launches = ops.GLUON_LAUNCHES
                got = ops.attention_fwd(qs, ks, vs, p, scale, poison=True, cfg=cfg)[0]
                if cfg and cfg.get("GLUON") and ops.GLUON_LAUNCHES == launches:
                    raise RuntimeError("the Gluon kernel did not run (the Triton fallback did)")
                row["rel_rmse_vs_fp64"] = rel_rmse(got, ref_o)
                check_close("out", got, ref_o, baseline=base_o if dt != torch.float32 else None)
                ms, r = timed(lambda: ops.attention_fwd(q, k, v, p, scale, cfg=cfg))
                row.update(fwd_ms=ms, fwd_tflops=fl / ms / 1e9 if ms else None,
                           flex_over_triton=flex_fwd / ms if ms and flex_fwd else None,
                           message=r.get("message"))
                if ms and (best is None or ms < best[0]):
                    best = (ms, cfg)
                if ms:
                    again.append((row, lambda cfg=cfg: ops.attention_fwd(q, k, v, p, scale, cfg=cfg)))
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or match is recorded
                row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
            emit(row)
        if args.repeat > 1 and again:
            best = _repeat_forwards(again, args.repeat, timed, fl, emit) or best
        if best is None or not BWD:
            continue
        out, lse = ops.attention_fwd(q, k, v, p, scale, cfg=best[1])
        outs, lses = ops.attention_fwd(qs, ks, vs, p, scale, cfg=best[1])
        dos = do[:, :16, :cs].contiguous()
        again_b = []  # (--repeat) the timed backwards

        def grads(fn, *x):
            x = [t.detach().requires_grad_() for t in x]
            return torch.autograd.grad(fn(*x), x, dos.to(x[0].dtype))

        ref_g = grads(lambda a, b_, c: reference_attention(a, b_, c, p, scale)[0], qs.double(), ks.double(), vs.double())
        base_g = grads(lambda a, b_, c: dense_math(a, b_, c, p, scale)[0], qs, ks, vs)
        for name, cfg in BWD.items():
            row = dict(pattern=pname, L=L, variant=name, cfg=cfg, fwd_cfg=best[1])
            try:
                launches, dq_launches = ops.GLUON_BWD_LAUNCHES, ops.GLUON_DQ_LAUNCHES
                got = ops.attention_bwd(dos, None, qs, ks, vs, outs, lses, p, scale, cfg=cfg, poison=True)
                gb = (cfg or {}).get("GLUON_BWD")
                if gb and not (isinstance(gb, dict) and gb.get("TRITON_DKDV")) and ops.GLUON_BWD_LAUNCHES == launches:
                    raise RuntimeError("the Gluon dk / dv kernel did not run here (the Triton kernel did)")
                if isinstance(gb, dict) and gb.get("GLUON_DQ") and ops.GLUON_DQ_LAUNCHES == dq_launches:
                    raise RuntimeError("the Gluon dq kernel did not run here (the Triton one did)")
                # (each gradient's error: dq's tells the dq kernels apart, dk / dv's the dk / dv kernels)
                errs = {f"rel_rmse_{gname}": rel_rmse(a, r_) for gname, a, r_ in zip(("dq", "dk", "dv"), got, ref_g)}
                row.update(errs, rel_rmse_vs_fp64=max(errs.values()))
                for gname, a, r_, bl in zip(("dq", "dk", "dv"), got, ref_g, base_g):
                    check_close(gname, a, r_, baseline=bl if dt != torch.float32 else None)
                base = ops.attention_bwd(dos, None, qs, ks, vs, outs, lses, p, scale,
                                         cfg=BWD["bwd 64x64 w4 s2 (old)"])
                row["max_rel_rmse_vs_old"] = max(rel_rmse(a, b) for a, b in zip(got, base))
                run = lambda cfg=cfg: ops.attention_bwd(do, None, q, k, v, out, lse, p, scale, cfg=cfg)  # noqa: E731
                ms, r = timed(run)
                fb = best[0] + ms if ms else None
                row.update(bwd_ms=ms, fwdbwd_ms=fb, flex_over_triton_fwdbwd=flex_fb / fb if fb and flex_fb else None,
                           message=r.get("message"))
                if ms:
                    again_b.append((row, run))
            except Exception as e:  # noqa: BLE001
                row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
            emit(row)
        if args.repeat > 1 and again_b:
            _repeat_backwards(again_b, args.repeat, timed, best[0], flex_fb, emit)
    close()
    print_table(rows)


def _repeat_forwards(again, repeat: int, timed, flops: float, emit):
    """(--repeat) ``repeat - 1`` more passes over the timed forwards ([(row, fn)], flex's first), round robin; each row
    re-emitted with the median of its times (fwd_ms_runs: all of them) and its ratio to flex's median -> the fastest
    (ms, cfg) among the variants, or None."""
    _round_robin(again, repeat, timed, "fwd_ms")
    flex = again[0][0] if again[0][0]["variant"] == "flex" else None
    if flex:
        flex["fwd_ms"] = statistics.median(flex["fwd_ms_runs"])
        flex["fwd_tflops"] = flops / flex["fwd_ms"] / 1e9
    best = None
    for row, _ in again:
        if row is not flex:
            row["fwd_ms"] = statistics.median(row["fwd_ms_runs"])
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["flex_over_triton"] = flex["fwd_ms"] / row["fwd_ms"] if flex else None
            if best is None or row["fwd_ms"] < best[0]:
                best = (row["fwd_ms"], row["cfg"])
        emit(dict(row, repeat=len(row["fwd_ms_runs"])))
    return best


def _round_robin(again, repeat: int, timed, key: str):
    """``repeat - 1`` more passes over [(row, fn)], round robin: each row's times in row[key + "_runs"]. Pass k starts
    at row k (rotated), so that no variant is always timed first or right after flex, on a cooler or warmer card (the
    thirty-first session's passes spread 5-10 % on window 4096, more than the variants' differences)."""
    for row, _ in again:
        row[key + "_runs"] = [row[key]]
    for k in range(1, repeat):
        for row, fn in again[k % len(again):] + again[:k % len(again)]:
            ms = timed(fn)[0]
            if ms:
                row[key + "_runs"].append(ms)


def _repeat_backwards(again, repeat: int, timed, fwd_ms: float, flex_fb, emit):
    """(--repeat) the same for the timed backward variants: each re-emitted with the median of its backward times, the
    forward+backward (the best forward's ms + it) and its ratio to flex's."""
    _round_robin(again, repeat, timed, "bwd_ms")
    for row, _ in again:
        row["bwd_ms"] = statistics.median(row["bwd_ms_runs"])
        row["fwdbwd_ms"] = fwd_ms + row["bwd_ms"]
        row["flex_over_triton_fwdbwd"] = flex_fb / row["fwdbwd_ms"] if flex_fb else None
        emit(dict(row, repeat=len(row["bwd_ms_runs"])))


def print_table(rows):
    # (a row re-emitted by --repeat replaces its first-pass record)
    last = {(r["pattern"], r.get("L"), r["variant"]): r for r in rows}
    rows = [r for key, r in last.items()]
    print(f"\n{'pattern':14s} {'variant':28s} {'fwd ms':>8s} {'TF/s':>6s} {'flex/tri':>8s} {'bwd ms':>8s} {'fb flex/tri':>11s}  note")
    for r in rows:
        f = lambda x, fmt: (fmt % x) if isinstance(x, (int, float)) else "-"  # noqa: E731
        note = (r.get("message") or "")[:60] if r.get("status") == "error" else f"err {r['rel_rmse_vs_fp64']:.1e}" \
            if "rel_rmse_vs_fp64" in r else ""
        print(f"{r['pattern']:14s} {r['variant']:28s} {f(r.get('fwd_ms'), '%8.3f')} {f(r.get('fwd_tflops'), '%6.0f')} "
              f"{f(r.get('flex_over_triton'), '%8.2f')} {f(r.get('bwd_ms'), '%8.3f')} "
              f"{f(r.get('flex_over_triton_fwdbwd'), '%11.2f')}  {note}")


if __name__ == "__main__":
    main()
