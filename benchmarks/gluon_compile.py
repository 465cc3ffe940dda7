"""Compile the Gluon forward kernel (`backends/triton/gluon_fwd.py`) for sm_90 without a GPU: registers, stack
(spill) bytes and the instruction mix, per config. Gluon changes between Triton releases, so run it with the
GPU machine's Triton (3.6 there) where it differs from the local one, e.g.

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:src python3 benchmarks/gluon_compile.py [--pattern sw1024] [--stages 2 3]

A compile error here is a compile error on the GPU machine; the numbers guide which variants to time, never
replace the timing.
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from attnzoo import patterns as P  # noqa: E402
from attnzoo.backends.triton import gluon_fwd  # noqa: E402
from attnzoo.backends.triton.codegen import generate  # noqa: E402
from kernel_spills import _tool, sass_mix  # noqa: E402

PATTERNS = {"sw1024": lambda: P.SlidingWindow(1023, 0), "sw4096": lambda: P.SlidingWindow(4095, 0),
            "causal": lambda: P.Causal(),
            "sinks+sw1024": lambda: P.Union(P.Sinks(4), P.SlidingWindow(1023, 0))}


def compile_fwd(pattern, d: int = 128, bm: int = 64, bn: int = 64, stages: int = 2, dtype: str = "bf16",
                lq: int = 16384, pingpong: bool = False, regs: int = 168, maxnreg: int | None = None,
                persistent: bool = False, qbuf: int = 2, order: int = 1, narrow: int = 0, merge: bool = False,
                far: bool = False, last: int = 0, xpipe: bool = False, fold: bool = False):
    """The warp-specialised kernel (gluon_attn_fwd_ws, or gluon_attn_fwd_wsp with ``persistent``): Q by TMA, two
    heads a program (PACK 2), one consumer warpgroup each; the narrow tile's descriptors (kdn, vdn: NARROW x D) and
    flags (NROW)."""
    from triton.experimental.gluon import language as gl
    lines, _aux = generate(pattern, lq, lq, (bm, bn))
    mod = gluon_fwd.gluon_module(lines, generate(pattern, lq, lq, (bm, bn), kmin=bn)[0])
    fn = mod.gluon_attn_fwd_wsp if persistent else mod.gluon_attn_fwd_ws
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    desc = f"tensordesc<{dtype}[{bn}, {d}],{gl.NVMMASharedLayout.get_default_for([bn, d], gdt)!r}>"
    qdesc = f"tensordesc<{dtype}[{bm}, {d}],{gl.NVMMASharedLayout.get_default_for([bm, d], gdt)!r}>"
    sn = narrow or bn
    ndesc = f"tensordesc<{dtype}[{sn}, {d}],{gl.NVMMASharedLayout.get_default_for([sn, d], gdt)!r}>"
    sig = dict(qd=qdesc, kd=desc, vd=desc, kdn=ndesc, vdn=ndesc, O=f"*{dtype}", LSE="*fp32", AUX="*i32",
               NROW="*i32", KVN="*i32", KVI="*i32", FKVN="*i32", FKVI="*i32", lay_h="i32", lay_m="i32", idx_h="i32",
               idx_m="i32", H="i32", G="i32", Lq="i32", Lk="i32", OFF="i32")
    if persistent:  # + the query blocks per head and the work-item count
        sig.update(NQB="i32", n_items="i32")
    sig.update(qk_scale="fp32", D="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", STAGES="constexpr",
               PINGPONG="constexpr", CONSUMER_REGS="constexpr")
    consts = dict(D=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, PINGPONG=pingpong, CONSUMER_REGS=regs)
    if persistent:  # the Q buffers and the work-item order
        sig.update(QBUF="constexpr", ORDER="constexpr")
        consts.update(QBUF=qbuf, ORDER=order)
    sig["NARROW"] = "constexpr"
    consts["NARROW"] = narrow
    sig["NMERGE"] = "constexpr"
    consts["NMERGE"] = merge
    sig["FAR"] = "constexpr"
    consts["FAR"] = far
    if persistent:  # NARROW_LAST: the narrow tile at the item's end
        sig["NLAST"] = "constexpr"
        consts["NLAST"] = last
        sig["XPIPE"] = "constexpr"
        consts["XPIPE"] = xpipe
        sig["NFOLD"] = "constexpr"  # (with XPIPE and NARROW: the sinks folded into a partial block's tile)
        consts["NFOLD"] = fold
    options = dict(num_warps=4, maxnreg=maxnreg or regs)
    return _build(fn, sig, consts, options)


def _build(fn, sig: dict, consts: dict, options: dict):
    """Compile ``fn`` for sm_90 -> (registers / stack / shared / SASS mix, the compiled kernel)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    import re
    names = list(sig)
    div16 = {(names.index(k),): [["tt.divisibility", 16]]
             for k in ("O", "LSE", "DELTA", "DK", "DV", "H", "Lq", "Lk") if k in sig}
    src = GluonASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=div16)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        mix = sass_mix(subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout)
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res.stdout)
    return dict(registers=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)), sass=mix), kernel


def compile_dq(pattern, d: int = 128, stages: int = 2, dtype: str = "bf16", lq: int = 16384, regs: int = 240,
               maxnreg: int = 168, fuse_delta: bool = True, has_dlse: bool = False, qbuf: int = 0,
               pipe: bool = False, pref: bool = False):
    """The Gluon dq kernel (`gluon_fwd.gluon_attn_bwd_dq`): 64-row query tiles, 64-key steps, two heads a program;
    ``fuse_delta``: it computes delta itself (FUSE_DELTA, the default), ``has_dlse``: less the lse's gradient;
    ``qbuf`` > 0: the persistent form (`gluon_attn_bwd_dqp`) with that many Q / dO buffers, ``pipe``: its DQ_PIPE
    (each step's dq MMA left running into the next step)."""
    from triton.experimental.gluon import language as gl
    lines, _aux = generate(pattern, lq, lq, (64, 64))
    mod = gluon_fwd.gluon_module(lines, generate(pattern, lq, lq, (64, 64), kmin=64)[0])
    fn = mod.gluon_attn_bwd_dqp if qbuf else mod.gluon_attn_bwd_dq
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    desc = f"tensordesc<{dtype}[64, {d}],{gl.NVMMASharedLayout.get_default_for([64, d], gdt)!r}>"
    sig = dict(qd=desc, dod=desc, kd=desc, vd=desc, DQ=f"*{dtype}", LSE="*fp32", DELTA="*fp32", O=f"*{dtype}",
               DLSE="*fp32", AUX="*i32", KVN="*i32", KVI="*i32", FKVN="*i32", FKVI="*i32", lay_h="i32", lay_m="i32", idx_h="i32", idx_m="i32",
               H="i32", G="i32", Lq="i32", Lk="i32", OFF="i32", qk_scale="fp32", sm_scale="fp32", D="constexpr",
               BLOCK_M="constexpr", BLOCK_N="constexpr", STAGES="constexpr", CONSUMER_REGS="constexpr",
               FUSE_DELTA="constexpr", HAS_DLSE="constexpr")
    consts = dict(D=d, BLOCK_M=64, BLOCK_N=64, STAGES=stages, CONSUMER_REGS=regs, FUSE_DELTA=fuse_delta,
                  HAS_DLSE=has_dlse)
    if qbuf:  # (the persistent form's: the item count and order, its Q / dO buffers)
        sig = {**{key: val for key, val in sig.items() if key not in ("qk_scale", "sm_scale")}, "NQB": "i32",
               "n_items": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
        consts.update(QBUF=qbuf, ORDER=1)
        sig.update(QBUF="constexpr", ORDER="constexpr")
        order = ["qd", "dod", "kd", "vd", "DQ", "LSE", "DELTA", "O", "DLSE", "AUX", "KVN", "KVI", "FKVN", "FKVI",
                 "lay_h", "lay_m", "idx_h", "idx_m", "H", "G", "Lq", "Lk", "OFF", "NQB", "n_items", "qk_scale",
                 "sm_scale", "D", "BLOCK_M", "BLOCK_N", "STAGES", "CONSUMER_REGS", "QBUF", "ORDER", "FUSE_DELTA",
                 "HAS_DLSE"]
        sig = {key: sig[key] for key in order}
        sig["PIPE"] = "constexpr"
        consts["PIPE"] = pipe
        sig["PREF"] = "constexpr"
        consts["PREF"] = pref
    return _build(fn, sig, consts, dict(num_warps=4, maxnreg=maxnreg))


def compile_bwd(pattern, d: int = 128, stages: int = 2, dtype: str = "bf16", lq: int = 16384, regs: int = 240,
                maxnreg: int = 168, acc_init: bool = False, fused: bool = False, rows: int = 0,
                tstats: bool = False, tail: bool = False):
    """The Gluon dk / dv kernel (`gluon_bwd.gluon_attn_bwd_dkdv`): 64-row query tiles, 128-key blocks (two halves);
    ``fused``: FUSED_DQ (dq by TMA reduce-adds into a float32 accumulator, through its descriptor dqd); ``rows``: ROWS
    (scores with the query rows as rows, P and dS through shared memory)."""
    from triton.experimental.gluon import language as gl
    from attnzoo.backends.triton import gluon_bwd
    lines, _aux = generate(pattern, lq, lq, (64, 128))
    fn = gluon_bwd.gluon_bwd_module(lines).gluon_attn_bwd_dkdv
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    desc = f"tensordesc<{dtype}[64, {d}],{gl.NVMMASharedLayout.get_default_for([64, d], gdt)!r}>"
    dqdesc = f"tensordesc<fp32[64, {d // 2}],{gl.NVMMASharedLayout.get_default_for([64, d // 2], gl.float32)!r}>"
    sig = dict(qd=desc, dod=desc, kd=desc, vd=desc, dqd=dqdesc if fused else desc, LSE="*fp32", DELTA="*fp32", DK=f"*{dtype}", DV=f"*{dtype}",
               WSK="*fp32", WSV="*fp32", ITEMS="*i32", AUX="*i32", QN="*i32", QI="*i32", FQN="*i32", FQI="*i32",
               lay_h="i32", lay_m="i32", idx_h="i32", idx_m="i32", H="i32", HKV="i32", G="i32", Lq="i32", Lk="i32",
               OFF="i32", qk_scale="fp32", sm_scale="fp32", D="constexpr", STAGES="constexpr", BLOCK_M="constexpr",
               HALF="constexpr", CONSUMER_REGS="constexpr", ACC_INIT="constexpr", FUSED_DQ="constexpr",
               ROWS="constexpr")
    consts = dict(D=d, STAGES=stages, BLOCK_M=64, HALF=64, CONSUMER_REGS=regs, ACC_INIT=acc_init, FUSED_DQ=fused,
                  ROWS=rows)
    # (T_STATS: lse / delta rows by TMA, (rows / 64, 64) float32 views; else stand-ins)
    sdesc = f"tensordesc<fp32[1, 64],{gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)!r}>"
    sig.update(ld=sdesc if tstats else desc, dd=sdesc if tstats else desc, TSTATS="constexpr")
    consts["TSTATS"] = tstats
    if tail:  # (TAIL_ORDER: the 1-D grid's map, two more i32 arguments)
        sig.update(TAIL_ORDER="constexpr", n_head="i32", n_bh="i32")
        consts["TAIL_ORDER"] = True
    return _build(fn, sig, consts, dict(num_warps=4, maxnreg=maxnreg))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pattern", action="append", choices=sorted(PATTERNS))
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--bn", type=int, nargs="+", default=[64])
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    ap.add_argument("--ws", action="store_true", help="(the only kernel now: the warp-specialised one)")
    ap.add_argument("--pingpong", action="store_true", help="the turn barriers (PINGPONG)")
    ap.add_argument("--regs", type=int, help="the consumer worker's registers (default: the launch's, 168 for the "
                                              "forward, 240 for the dq and dk / dv kernels)")
    ap.add_argument("--maxnreg", type=int, help="the kernel's maxnreg (default --regs)")
    ap.add_argument("--persistent", action="store_true", help="the persistent kernel (gluon_attn_fwd_wsp)")
    ap.add_argument("--qbuf", type=int, default=2, help="with --persistent: Q buffers (1 or 2)")
    ap.add_argument("--narrow", type=int, default=0, help="NARROW keys of block 0's sink tile (0: none)")
    ap.add_argument("--merge", action="store_true", help="with --narrow: NARROW_MERGE (its scores with step 0's)")
    ap.add_argument("--far", action="store_true", help="MASK_FAR (block 0 first, the shorter mask past it)")
    ap.add_argument("--last", type=int, default=0,
                    help="with --persistent --narrow: NARROW_LAST (1: the narrow tile's scores with the last P V in "
                         "both consumers, 2: in consumer 1 only)")
    ap.add_argument("--xpipe", action="store_true", help="with --persistent: XPIPE (each item's first scores with "
                                                          "the previous item's last P V)")
    ap.add_argument("--fold", action="store_true", help="with --xpipe --narrow: the sinks folded into a partial "
                                                         "block's tile (cfg XPIPE_NARROW='fold'; no narrow step)")
    ap.add_argument("--order", type=int, default=1, help="with --persistent: work-item order (0 or 1, see _wsp_item)")
    ap.add_argument("--ptx", help="write the last kernel's PTX here")
    ap.add_argument("--dq", action="store_true", help="the Gluon dq kernel (gluon_attn_bwd_dq) at --stages, --regs")
    ap.add_argument("--sep-delta", action="store_true", help="with --dq: delta read, not computed (SEP_DELTA)")
    ap.add_argument("--dlse", action="store_true", help="with --dq: delta less the lse's gradient (HAS_DLSE)")
    ap.add_argument("--dq-qbuf", type=int, default=0, help="with --dq: the persistent form with these Q / dO buffers")
    ap.add_argument("--dq-pipe", action="store_true", help="with --dq --dq-qbuf: DQ_PIPE (the dq MMA a step late)")
    ap.add_argument("--dq-pref", action="store_true",
                    help="with --dq --dq-qbuf: DQ_PREF (each item's O and lse loaded during the item before)")
    ap.add_argument("--bwd", action="store_true", help="the dk / dv kernel (gluon_bwd) instead, at --stages, --regs")
    ap.add_argument("--acc-init", action="store_true", help="with --bwd: ACC_INIT (MMAs start from -lse, -delta)")
    ap.add_argument("--fused", action="store_true", help="with --bwd: FUSED_DQ (dq by TMA reduce-adds)")
    ap.add_argument("--rows", type=int, nargs="?", const=1, default=0,
                    help="with --bwd: ROWS (S = Q K^T, P and dS through shared memory; 1: dP issued with S, 2: with dV)")
    ap.add_argument("--tstats", action="store_true",
                    help="with --bwd (transposed form): T_STATS (lse / delta rows by TMA with the Q / dO tiles)")
    ap.add_argument("--tail", action="store_true",
                    help="with --bwd: TAIL_ORDER (a 1-D grid, the tail's (batch, KV head)s fastest)")
    a = ap.parse_args(argv)
    print(f"triton {triton.__version__}")
    if a.dq:
        for name in a.pattern or ["sw1024"]:
            for d in a.d:
                for st in a.stages:
                    r, k = compile_dq(PATTERNS[name](), d=d, stages=st, regs=a.regs or 240, maxnreg=a.maxnreg or 168,
                                      fuse_delta=not a.sep_delta, has_dlse=a.dlse, qbuf=a.dq_qbuf,
                                      pipe=a.dq_pipe, pref=a.dq_pref)
                    print(f"dq {name:14s} D={d} stages={st}: {r['registers']} regs, stack {r['stack']} B, "
                          f"shared {r['shared']} B, {r['sass']}")
        return
    if a.bwd:
        for name in a.pattern or ["sw1024"]:
            for d in a.d:
                for st in a.stages:
                    r, k = compile_bwd(PATTERNS[name](), d=d, stages=st, regs=a.regs or 240, maxnreg=a.maxnreg or 168,
                                       acc_init=a.acc_init, fused=a.fused, rows=a.rows, tstats=a.tstats,
                                       tail=a.tail)
                    print(f"bwd {name:14s} D={d} stages={st}: {r['registers']} regs, stack {r['stack']} B, "
                          f"{r['sass']}")
                    if a.ptx:
                        open(a.ptx, "w").write(k.asm["ptx"])
        return
    for name in a.pattern or ["sw1024"]:
        for d in a.d:
            for bn in a.bn:
                for st in a.stages:
                    r, k = compile_fwd(PATTERNS[name](), d=d, bn=bn, stages=st, pingpong=a.pingpong, regs=a.regs or 168,
                                       maxnreg=a.maxnreg, persistent=a.persistent, qbuf=a.qbuf, order=a.order,
                                       narrow=a.narrow, merge=a.merge, far=a.far, last=a.last, xpipe=a.xpipe,
                                       fold=a.fold)
                    print(f"{name:14s} D={d} BN={bn} stages={st}: {r['registers']} regs, "
                          f"stack {r['stack']} B, shared {r['shared']} B, {r['sass']}")
                    if a.ptx:
                        open(a.ptx, "w").write(k.asm["ptx"])


if __name__ == "__main__":
    main()
