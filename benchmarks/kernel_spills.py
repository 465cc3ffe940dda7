"""Registers and local-memory (spill) bytes per thread of the linear-attention Triton kernels, compiled for sm_90
(Hopper) without a GPU: Triton's compiler with an explicit target and the cuobjdump bundled with Triton.

    PYTHONPATH=src python3 benchmarks/kernel_spills.py [--filter SUBSTRING] [--attn]

A CPU-only machine can rank config variants by spills before a GPU session times them (a kernel at 255 registers
with a stack of a few KB spills its accumulators to local memory in its inner loop). The numbers come from the
local Triton; the GPU machine's Triton may allocate differently, so they guide which variants to time, never
replace the timing. One line per case: kernel, constexprs, warps, registers, stack bytes.
"""
import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnzoo.linear import triton_delta as td
from attnzoo.linear import triton_gla as tg
from attnzoo.linear import triton_kda as tk

F32 = {"BETA", "G", "GIN", "CARRY", "TT", "DU", "DBETA", "DG", "H0", "HT", "AQK", "AKK", "DAQ", "DM", "DQP", "DKP", "DB",
       "DHT", "DH0", "A", "DA", "DQI", "DKI", "DAK", "RP", "IPB"}


def resources(fn, consts: dict, warps: int, stages: int = 2, dtype: str = "bf16", types: dict | None = None,
              sass: bool = False) -> dict:
    """Compile ``fn`` for sm_90 with ``consts`` (and the kernel's constexpr defaults): -> registers and stack
    bytes per thread; with ``sass`` also the instruction mix of its machine code (`sass_mix`). ``types``
    (name -> Triton type string) decides where given; else pointer arguments are float32 when named in F32,
    else ``dtype``; other scalars int32, ``scale`` float32."""
    params = inspect.signature(fn.fn).parameters
    consts = dict(consts)
    for name, par in params.items():
        # a name that ``types`` gives is a run-time argument even where the kernel has a default for it
        if name not in consts and par.default is not inspect.Parameter.empty and (types is None or name not in types):
            consts[name] = par.default
    names = list(params)
    sig = {}
    for name in names:
        if name in consts:
            sig[name] = "constexpr"
        elif types is not None:
            sig[name] = types.get(name, "i32")
        elif name == "scale":
            sig[name] = "fp32"
        elif name.isupper() and name not in ("NH", "T", "NT", "NK", "NKB", "DIMK", "DIMV", "P_RC"):
            sig[name] = "*" + ("fp32" if name in F32 else dtype)
        else:
            sig[name] = "i32"
    # what a real launch at the benchmark shapes tells the compiler: Triton marks every argument divisible by 16
    # (tensor pointers, whose storage is 16-byte aligned, and there every stride and length), so its loads are
    # vectorised; without the marks every K / V element is a separate 2-byte load
    div16 = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if sig[name].startswith("*") or (sig[name] == "i32" and _DIV16.match(name))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=div16)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
        mix = sass_mix(subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout) \
            if sass else None
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump's output: {out[-300:]!r}")
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)), **({"sass": mix} if sass else {}))


# integer arguments that are multiples of 16 at the benchmark shapes (D = 128, lengths of whole chunks / blocks,
# 16 or 64 heads): strides and lengths, not group sizes or offsets
_DIV16 = re.compile(r"^(s_|stride_)|^(D|DV|DIMK|DIMV|Lq|Lk|T|NH|H|NT)$")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# opcode groups of the instruction mix: Hopper's warpgroup MMA (wgmma), the older warp-level MMA (mma.sync: a
# dot Triton could not put on wgmma, e.g. fewer than 64 rows per warpgroup), local-memory loads / stores (the
# spill traffic) and the exp2 / rcp unit
SASS_GROUPS = {"wgmma": ("HGMMA",), "mma": ("HMMA",), "spill_ld": ("LDL",), "spill_st": ("STL",), "mufu": ("MUFU",)}


def sass_mix(listing: str) -> dict:
    """Static counts of opcode groups (SASS_GROUPS) and of all instructions in an ``nvdisasm -c`` listing, and
    per innermost loop (a backward branch whose range holds no other loop) its instructions, wgmma and spill
    loads + stores: what one iteration of a kernel's main loop issues. Static: an instruction counts once."""
    counts = {g: 0 for g in SASS_GROUPS}
    ops = {op: g for g, names in SASS_GROUPS.items() for op in names}
    labels, code, label = {}, [], None
    for line in listing.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*)", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        if label:
            labels[label], label = addr, None
        code.append((addr, m.group(2), m.group(3)))
        g = ops.get(m.group(2))
        if g:
            counts[g] += 1
    counts["instructions"] = len(code)
    loops = []
    for addr, op, rest in code:
        t = re.search(r"`\((\.L_x_\d+)\)", rest)
        if op == "BRA" and t and labels.get(t.group(1), addr + 1) < addr:
            loops.append((labels[t.group(1)], addr))
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    per = []
    for lo, hi in inner:
        body = [op for a, op, _ in code if lo <= a <= hi]
        if len(body) > 1:
            per.append(f"{len(body)}/{body.count('HGMMA')}/{body.count('LDL') + body.count('STL')}")
    counts["loops"] = ",".join(per) or "-"
    return counts


B16 = dict(SPLIT=False, PREC="tf32")
CASES = [  # name, kernel, constexprs, warps (the 16-bit GPU configs and their variants)
    ("gdn _bwd_main (fused, BV 32)", td._bwd_main, dict(BT=64, BK=128, BV=32, **B16), 8),
    ("gdn _bwd_main (fused, BV 32)", td._bwd_main, dict(BT=64, BK=128, BV=32, **B16), 16),
    ("gdn _bwd_main_seq (three passes, BV 32)", td._bwd_main_seq, dict(BT=64, BK=128, BV=32, **B16), 8),
    ("gdn _bwd_main_seq (three passes, BV 64)", td._bwd_main_seq, dict(BT=64, BK=128, BV=64, **B16), 8),
    ("gdn _bwd_main_seq (three passes, BV 32)", td._bwd_main_seq, dict(BT=64, BK=128, BV=32, **B16), 4),
    ("gdn _bwd_main_k (split, BK 64, BV 32)", td._bwd_main_k, dict(BT=64, BK=64, BV=32, **B16), 8),
    ("gdn _bwd_main_v (split, BK 32, BV 32)", td._bwd_main_v, dict(BT=64, BK=32, BV=32, **B16), 8),
    ("gdn _prep", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 4),
    ("gdn _prep", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 8),
    ("gdn _prep (inv dbl)", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     4),
    ("gdn _prep (inv dbl)", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     8),
    ("gdn _prep (T only)", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", WU=False, **B16),
     4),
    ("gdn _prep (T only, inv dbl)", td._prep,
     dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, WU=False, **B16), 4),
    ("gdn _wu (BN 64)", td._wu, dict(BT=64, BN=64, **B16), 4),
    ("kda _wu (BN 64)", td._wu, dict(BT=64, BN=64, VEC=True, **B16), 4),
    ("gdn _fwd_h (BV 64)", td._fwd_h, dict(BT=64, BK=128, BV=64, HAS_H0=False, **B16), 4),
    ("gdn _bwd_dh (BV 64)", td._bwd_dh, dict(BT=64, BK=128, BV=64, HAS_DHT=False, **B16), 4),
    ("gdn _bwd_dh (BV 64)", td._bwd_dh, dict(BT=64, BK=128, BV=64, HAS_DHT=False, **B16), 8),
    ("gdn _bwd_dh (BV 32)", td._bwd_dh, dict(BT=64, BK=128, BV=32, HAS_DHT=False, **B16), 8),
    ("gdn _fwd_h (BV 32)", td._fwd_h, dict(BT=64, BK=128, BV=32, HAS_H0=False, **B16), 8),
    ("kda _bwd_main (fused, BV 32)", tk._bwd_main, dict(BT=64, BK=128, BV=32, **B16), 8),
    ("kda _bwd_main (fused, BV 32, dP in _bwd_dul)", tk._bwd_main, dict(BT=64, BK=128, BV=32, DP=False, **B16), 8),
    ("kda _bwd_dul (with dP, BV 64)", tk._bwd_dul, dict(BT=64, BV=64, DP=True, **B16), 4),
    ("kda _bwd_main_seq (three passes, BV 32)", tk._bwd_main_seq, dict(BT=64, BK=128, BV=32, **B16), 8),
    ("kda _bwd_main_seq (three passes, BV 64)", tk._bwd_main_seq, dict(BT=64, BK=128, BV=64, **B16), 8),
    ("kda _bwd_main_k (split, BK 32, BV 32)", tk._bwd_main_k, dict(BT=64, BK=32, BV=32, **B16), 8),
    ("kda _bwd_main_v (split, BV 32)", tk._bwd_main_v, dict(BT=64, BV=32, **B16), 8),
    ("kda _bwd_dh (VEC, BV 16)", td._bwd_dh, dict(BT=64, BK=128, BV=16, HAS_DHT=False, VEC=True, **B16), 4),
    ("kda _bwd_dh (PRE, BV 16)", td._bwd_dh, dict(BT=64, BK=128, BV=16, HAS_DHT=False, VEC=True, PRE=True, **B16), 4),
    ("kda _bwd_intra_split (BK 32)", tk._bwd_intra_split, dict(BT=64, BC=16, BK=32, **B16), 4),
    ("kda _intra_split", tk._intra_split, dict(BT=64, BC=16, BK=128, **B16), 2),
    *((f"kda _intra_chunk (BK {bk})", tk._intra_chunk, dict(BT=64, BC=16, BK=bk, **B16), w)
      for bk, w in ((64, 4), (64, 8), (32, 4), (128, 8))),
    *((f"kda _bwd_intra_chunk (BK {bk})", tk._bwd_intra_chunk, dict(BT=64, BC=16, BK=bk, **B16), w)
      for bk, w in ((32, 4), (32, 8), (16, 4), (64, 8))),
    *((f"kda _bwd_intra_split (BK 32) unroll {u}", tk._bwd_intra_split, dict(BT=64, BC=16, BK=32, UNROLL=u, **B16), 4)
      for u in (2, 4, 16)),
    *((f"kda _intra_split unroll {u}", tk._intra_split, dict(BT=64, BC=16, BK=128, UNROLL=u, **B16), w)
      for u, w in ((2, 2), (4, 2), (16, 2), (4, 4))),
    # the diagonal tiles as dots where the gates span at most DIAG_LIM nats (cfg diag_lim / diag_lim_b)
    *((f"kda _bwd_intra_split (BK {bk}) dot", tk._bwd_intra_split, dict(BT=64, BC=16, BK=bk, DIAG_LIM=20.0, **B16), w)
      for bk, w in ((32, 4), (16, 2), (64, 4))),
    # the gate factors KE, QE (cfg pre), and with the chunk cumsum of the gates formed there too (cfg gc="rows")
    *((f"kda _gate_rows{' cumsum' if c else ''}", tk._gate_rows, dict(BT=64, BK=64, WITH_Q=True, CUMSUM=c), 8)
      for c in (False, True)),
    # dg from the intra backward (cfg rc): one program per chunk walking its sub-chunks (RC 1, "loop") or one
    # launch per sub-chunk (RC 2, "launches")
    *((f"kda _bwd_intra_split (BK {bk}) dot rc {'loop' if rc == 1 else 'launches'}", tk._bwd_intra_split,
       dict(BT=64, BC=16, BK=bk, DIAG_LIM=20.0, RC=rc, **B16), w)
      for bk, w, rc in ((64, 4, 1), (32, 4, 1), (64, 8, 1), (64, 4, 2))),
    *((f"kda _intra_split dot unroll {u}", tk._intra_split, dict(BT=64, BC=16, BK=128, UNROLL=u, DIAG_LIM=20.0, **B16),
       w) for u, w in ((2, 2), (1, 2), (2, 4))),
    ("kda _prep", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 4),
    ("kda _prep", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 8),
    ("kda _prep (inv dbl)", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     4),
    ("kda _prep (inv dbl)", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     8),
    ("gla _intra_a", tg._intra_a, dict(BT=64, BC=16, BK=128, PREC="tf32"), 8),
    ("gla _fwd_o", tg._fwd_o, dict(BT=64, BK=128, BV=64, PREC="tf32"), 8),
    ("gla _bwd_intra_split (BK 32)", tg._bwd_intra_split, dict(BT=64, BC=16, BK=32, PREC="tf32"), 2),
    ("gla _bwd_intra_split (BK 32) dot", tg._bwd_intra_split, dict(BT=64, BC=16, BK=32, PREC="tf32", DIAG_LIM=20.0), 2),
    ("gla _bwd_dqkg (BK 64)", tg._bwd_dqkg, dict(BT=64, BK=64, BV=64, HAS_H0=False, PREC="tf32"), 4),
    ("gla _bwd_dqkg (BK 64)", tg._bwd_dqkg, dict(BT=64, BK=64, BV=64, HAS_H0=False, PREC="tf32"), 8),
    ("gla _bwd_dv", tg._bwd_dv, dict(BT=64, BK=64, BV=64, PREC="tf32"), 4),
]


# the attention backward's kernels (issue 3), generated for causal attention at 16K: pointer types by name
_ATTN_TYPES = dict({n: "*bf16" for n in ("Q", "K", "V", "DO", "DQ", "O", "DKP", "DVP")},
                   **{n: "*fp32" for n in ("LSE", "DELTA", "DLSE", "WSK", "WSV", "DQA")},
                   **{n: "*i32" for n in ("ITEMS", "AUX", "QN", "QI", "FQN", "FQI", "KVN", "KVI", "FKVN", "FKVI",
                                          "NROW")},
                   qk_scale="fp32", sm_scale="fp32")


def attention_cases():
    """(name, kernel, constexprs, warps, stages, types): the forward at its two 16-bit defaults, the dq kernel and
    the dk/dv kernel (queries by keys, and keys by queries: KT) at the tiles of triton_pack_variants.py --round 6;
    D = 128, bf16, pointer loads."""
    import attnzoo as az
    from attnzoo.backends.triton import ops
    out = []
    base = dict(BLOCK_D=128, BLOCK_DV=128, PREC="tf32", TMA=False, MERGE=False)
    # the forward at the local class's default (a 1024-key window: PACK 4, 64 x 64, 8 warps, 3 stages, IDX 2,
    # MERGE) and the dense class's tiles (causal: PACK 2, 64 x 128; pointer loads here, TMA on the GPU)
    for name, pat, bm, bn, pack, merge in (("sw1024", az.SlidingWindow(1023), 64, 64, 4, True),
                                            ("causal", az.Causal(), 64, 128, 2, False)):
        mod = ops._module(pat, 16384, 16384, "cpu", (bm, bn))[0]
        for lazy in (False, True):  # LAZY: acc rescaled only when a row's maximum grew past the threshold
            out.append((f"attn fwd {name} {bm}x{bn} p{pack}{' lazy' if lazy else ''}", mod.attn_fwd,
                        dict(base, BLOCK_M=bm, BLOCK_N=bn, EVEN=True, PACK=pack, FOLD=True, IDX=2, MERGE=merge,
                             KD=None, VD=None, WS=False, LAZY=lazy), 8, 3, _ATTN_TYPES))
    # PIPE: the merged loop with each step's next scores issued before its softmax (one more score tile in
    # registers: the window's PACK 4 tile at 64 and at 32 keys, PACK 2, and the unpacked 64 x 64 at 4 warps)
    mod = ops._module(az.SlidingWindow(1023), 16384, 16384, "cpu", (64, 64))[0]
    mod32 = ops._module(az.SlidingWindow(1023), 16384, 16384, "cpu", (64, 32))[0]
    for m, bn, pack, w in ((mod, 64, 4, 8), (mod32, 32, 4, 8), (mod, 64, 2, 8), (mod, 64, 1, 4)):
        for pipe in (False, True):
            out.append((f"attn fwd sw1024 64x{bn} p{pack} merge{' pipe' if pipe else ''}", m.attn_fwd,
                        dict(base, BLOCK_M=64, BLOCK_N=bn, EVEN=True, PACK=pack, FOLD=True, IDX=2, MERGE=True,
                             KD=None, VD=None, WS=False, LAZY=False, PIPE=pipe), w, 3, _ATTN_TYPES))
    # NARROW (block 0 as a 16-key tile where a query block sees only the sinks in it): sinks + window 1024 at the
    # local default (64 x 64, PACK 4, MERGE) and on the wide tiles (64 x 128, PACK 2)
    sinks = ops._module(az.SlidingWindow(1023) | az.Sinks(4), 16384, 16384, "cpu", (64, 64))[0]
    sinks128 = ops._module(az.SlidingWindow(1023) | az.Sinks(4), 16384, 16384, "cpu", (64, 128))[0]
    for m, bn, pack, merge in ((sinks, 64, 4, True), (sinks128, 128, 2, False)):
        for narrow in (0, 16):
            out.append((f"attn fwd sinks+sw1024 64x{bn} p{pack}{' merge' if merge else ''}"
                        f"{' narrow16' if narrow else ''}", m.attn_fwd,
                        dict(base, BLOCK_M=64, BLOCK_N=bn, EVEN=True, PACK=pack, FOLD=True, IDX=2, MERGE=merge,
                             KD=None, VD=None, WS=False, LAZY=False, PIPE=False, NARROW=narrow,
                             **({} if narrow else dict(NROW=None))), 8, 3, _ATTN_TYPES))
    for bm, bn, w in ((64, 64, 4), (64, 64, 8), (128, 64, 8)):
        mod = ops._module(az.Causal(), 16384, 16384, "cpu", (bm, bn))[0]
        out.append((f"attn dq {bm}x{bn}", mod.attn_bwd_dq, dict(base, BLOCK_M=bm, BLOCK_N=bn, HAS_DLSE=False, PACK=1,
                                                               KD=None, VD=None, EVEN_N=True), w, 2, _ATTN_TYPES))
    # (64 x 64 at 8 warps: two warpgroups split the 64 x 128 dk / dv accumulators by columns; sixteenth session)
    for bm, bn, w, st in ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 1),
                          (64, 64, 8, 2)):
        mod = ops._module(az.Causal(), 16384, 16384, "cpu", (bm, bn))[0]
        for kt in (False, True):
            name = f"attn dkdv {bn} keys x {bm} rows{' KT' if kt else ''} s{st}{f' w{w}' if w != 4 else ''}"
            out.append((name, mod.attn_bwd_dkdv,
                        dict(base, BLOCK_M=bm, BLOCK_N=bn, KT=kt, QD=None, DOD=None, EVEN_N=True), w, st, _ATTN_TYPES))
    # a 2-D neighborhood (13 x 13 on 128 x 128) in tile order: over gathered tensors (TiledNeighborhood) and over
    # the tensors in place (InPlaceTiled: each row's address through the generated row maps), at the nbhd
    # class's forward default (32 x 32, PACK 4, 4 warps) and the backward's 64 x 64 tiles
    from attnzoo.backends.triton.codegen import InPlaceTiled
    nb = az.Neighborhood((13, 13), grid=(128, 128))
    tiled = az.neighborhood_tiling(nb, 32)[2]
    for name, pat in (("tiled", tiled), ("in-place", InPlaceTiled(tiled))):
        mod = ops._module(pat, 16384, 16384, "cpu", (32, 32))[0]
        out.append((f"attn fwd nbhd13 {name} 32x32 p4", mod.attn_fwd,
                    dict(base, BLOCK_M=32, BLOCK_N=32, EVEN=True, PACK=4, FOLD=True, IDX=0, KD=None, VD=None,
                         WS=False, LAZY=False), 4, 3, _ATTN_TYPES))
        mod = ops._module(pat, 16384, 16384, "cpu", (64, 64))[0]
        out.append((f"attn dq nbhd13 {name} 64x64", mod.attn_bwd_dq,
                    dict(base, BLOCK_M=64, BLOCK_N=64, HAS_DLSE=False, PACK=1, KD=None, VD=None, EVEN_N=True), 4, 2,
                    _ATTN_TYPES))
        out.append((f"attn dkdv nbhd13 {name} 64x64", mod.attn_bwd_dkdv,
                    dict(base, BLOCK_M=64, BLOCK_N=64, KT=False, QD=None, DOD=None, EVEN_N=True), 4, 2, _ATTN_TYPES))
    for bm, bn, w, kt in ((64, 64, 4, False), (64, 128, 8, True), (64, 64, 4, True)):  # dq by atomics (ATOMIC_DQ)
        mod = ops._module(az.Causal(), 16384, 16384, "cpu", (bm, bn))[0]
        out.append((f"attn dkdv {bn} keys x {bm} rows{' KT' if kt else ''} atomic dq", mod.attn_bwd_dkdv,
                    dict(base, BLOCK_M=bm, BLOCK_N=bn, KT=kt, QD=None, DOD=None, ATOMIC=True, EVEN_N=True), w, 2,
                    _ATTN_TYPES))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter", default="", help="only the cases whose name contains this")
    ap.add_argument("--attn", action="store_true", help="also the attention backward's kernels (issue 3)")
    ap.add_argument("--sass", action="store_true",
                    help="also the machine code's static instruction mix: wgmma / mma.sync dots, spill loads / "
                         "stores (LDL / STL), MUFU, all instructions, and per innermost loop "
                         "instructions / wgmma / spill loads+stores of one iteration")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90; registers / stack bytes per thread")
    bad = 0
    cases = [(name, fn, consts, warps, 2, None) for name, fn, consts, warps in CASES]
    if args.attn:
        cases += attention_cases()
    for name, fn, consts, warps, stages, types in cases:
        if args.filter not in name:
            continue
        try:
            r = resources(fn, consts, warps, stages, types=types, sass=args.sass)
            mix = "  " + "  ".join(f"{k} {v}" for k, v in r["sass"].items()) if args.sass else ""
            print(f"  {name:<42} {warps:>2} warps  {r['registers']:>4} regs  {r['stack_bytes']:>5} B stack{mix}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - one case that does not compile is reported, the rest still run
            bad += 1
            print(f"  {name:<42} {warps:>2} warps  error: {type(e).__name__}: {str(e)[-200:]}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
