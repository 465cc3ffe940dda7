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

F32 = {"BETA", "G", "TT", "DU", "DBETA", "DG", "H0", "HT", "AQK", "AKK", "DAQ", "DM", "DQP", "DKP", "DB", "DHT", "DH0",
       "A", "DA", "DQI", "DKI", "DAK", "RP", "IPB"}


def resources(fn, consts: dict, warps: int, stages: int = 2, dtype: str = "bf16", types: dict | None = None) -> dict:
    """Compile ``fn`` for sm_90 with ``consts`` (and the kernel's constexpr defaults): -> registers and stack
    bytes per thread. ``types`` (name -> Triton type string) decides where given; else pointer arguments are
    float32 when named in F32, else ``dtype``; other scalars int32, ``scale`` float32."""
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
        elif name.isupper() and name not in ("NH", "T", "NT", "NK", "DIMK", "DIMV"):
            sig[name] = "*" + ("fp32" if name in F32 else dtype)
        else:
            sig[name] = "i32"
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump's output: {out[-300:]!r}")
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)))


B16 = dict(SPLIT=False, PREC="tf32")
CASES = [  # name, kernel, constexprs, warps (the 16-bit GPU configs and their variants)
    ("gdn _bwd_main (fused, BV 32)", td._bwd_main, dict(BT=64, BK=128, BV=32, **B16), 8),
    ("gdn _bwd_main (fused, BV 32)", td._bwd_main, dict(BT=64, BK=128, BV=32, **B16), 16),
    ("gdn _bwd_main_k (split, BK 64, BV 32)", td._bwd_main_k, dict(BT=64, BK=64, BV=32, **B16), 8),
    ("gdn _bwd_main_v (split, BK 32, BV 32)", td._bwd_main_v, dict(BT=64, BK=32, BV=32, **B16), 8),
    ("gdn _prep", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 4),
    ("gdn _prep", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 8),
    ("gdn _prep (inv dbl)", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     4),
    ("gdn _prep (inv dbl)", td._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     8),
    ("gdn _fwd_h (BV 64)", td._fwd_h, dict(BT=64, BK=128, BV=64, HAS_H0=False, **B16), 4),
    ("gdn _bwd_dh (BV 64)", td._bwd_dh, dict(BT=64, BK=128, BV=64, HAS_DHT=False, **B16), 4),
    ("gdn _bwd_dh (BV 64)", td._bwd_dh, dict(BT=64, BK=128, BV=64, HAS_DHT=False, **B16), 8),
    ("gdn _bwd_dh (BV 32)", td._bwd_dh, dict(BT=64, BK=128, BV=32, HAS_DHT=False, **B16), 8),
    ("gdn _fwd_h (BV 32)", td._fwd_h, dict(BT=64, BK=128, BV=32, HAS_H0=False, **B16), 8),
    ("kda _bwd_main (fused, BV 32)", tk._bwd_main, dict(BT=64, BK=128, BV=32, **B16), 8),
    ("kda _bwd_main_k (split, BK 32, BV 32)", tk._bwd_main_k, dict(BT=64, BK=32, BV=32, **B16), 8),
    ("kda _bwd_main_v (split, BV 32)", tk._bwd_main_v, dict(BT=64, BV=32, **B16), 8),
    ("kda _bwd_dh (VEC, BV 16)", td._bwd_dh, dict(BT=64, BK=128, BV=16, HAS_DHT=False, VEC=True, **B16), 4),
    ("kda _bwd_dh (PRE, BV 16)", td._bwd_dh, dict(BT=64, BK=128, BV=16, HAS_DHT=False, VEC=True, PRE=True, **B16), 4),
    ("kda _bwd_intra_split (BK 32)", tk._bwd_intra_split, dict(BT=64, BC=16, BK=32, **B16), 4),
    ("kda _intra_split", tk._intra_split, dict(BT=64, BC=16, BK=128, **B16), 2),
    ("kda _prep", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 4),
    ("kda _prep", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", **B16), 8),
    ("kda _prep (inv dbl)", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     4),
    ("kda _prep (inv dbl)", tk._prep, dict(BT=64, BC=16, BK=128, BV=64, STORE_T=True, PREC_T="tf32", INV=True, **B16),
     8),
    ("gla _intra_a", tg._intra_a, dict(BT=64, BC=16, BK=128, PREC="tf32"), 8),
    ("gla _fwd_o", tg._fwd_o, dict(BT=64, BK=128, BV=64, PREC="tf32"), 8),
    ("gla _bwd_intra_split (BK 32)", tg._bwd_intra_split, dict(BT=64, BC=16, BK=32, PREC="tf32"), 2),
    ("gla _bwd_dqkg (BK 64)", tg._bwd_dqkg, dict(BT=64, BK=64, BV=64, HAS_H0=False, PREC="tf32"), 4),
    ("gla _bwd_dqkg (BK 64)", tg._bwd_dqkg, dict(BT=64, BK=64, BV=64, HAS_H0=False, PREC="tf32"), 8),
    ("gla _bwd_dv", tg._bwd_dv, dict(BT=64, BK=64, BV=64, PREC="tf32"), 4),
]


# the attention backward's kernels (issue 3), generated for causal attention at 16K: pointer types by name
_ATTN_TYPES = dict({n: "*bf16" for n in ("Q", "K", "V", "DO", "DQ", "O", "DKP", "DVP")},
                   **{n: "*fp32" for n in ("LSE", "DELTA", "DLSE", "WSK", "WSV", "DQA")},
                   **{n: "*i32" for n in ("ITEMS", "AUX", "QN", "QI", "FQN", "FQI", "KVN", "KVI", "FKVN", "FKVI")},
                   qk_scale="fp32", sm_scale="fp32")


def attention_cases():
    """(name, kernel, constexprs, warps, stages, types): the dq kernel and the dk/dv kernel (queries by keys, and
    keys by queries: KT) at the tiles of triton_pack_variants.py --round 6; D = 128, bf16, pointer loads."""
    import attnzoo as az
    from attnzoo.backends.triton import ops
    out = []
    base = dict(BLOCK_D=128, BLOCK_DV=128, PREC="tf32", TMA=False, MERGE=False)
    for bm, bn, w in ((64, 64, 4), (64, 64, 8), (128, 64, 8)):
        mod = ops._module(az.Causal(), 16384, 16384, "cpu", (bm, bn))[0]
        out.append((f"attn dq {bm}x{bn}", mod.attn_bwd_dq, dict(base, BLOCK_M=bm, BLOCK_N=bn, HAS_DLSE=False, PACK=1,
                                                               KD=None, VD=None), w, 2, _ATTN_TYPES))
    for bm, bn, w, st in ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 1)):
        mod = ops._module(az.Causal(), 16384, 16384, "cpu", (bm, bn))[0]
        for kt in (False, True):
            out.append((f"attn dkdv {bn} keys x {bm} rows{' KT' if kt else ''} s{st}", mod.attn_bwd_dkdv,
                        dict(base, BLOCK_M=bm, BLOCK_N=bn, KT=kt, QD=None, DOD=None), w, st, _ATTN_TYPES))
    for bm, bn, w, kt in ((64, 64, 4, False), (64, 128, 8, True), (64, 64, 4, True)):  # dq by atomics (ATOMIC_DQ)
        mod = ops._module(az.Causal(), 16384, 16384, "cpu", (bm, bn))[0]
        out.append((f"attn dkdv {bn} keys x {bm} rows{' KT' if kt else ''} atomic dq", mod.attn_bwd_dkdv,
                    dict(base, BLOCK_M=bm, BLOCK_N=bn, KT=kt, QD=None, DOD=None, ATOMIC=True), w, 2, _ATTN_TYPES))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter", default="", help="only the cases whose name contains this")
    ap.add_argument("--attn", action="store_true", help="also the attention backward's kernels (issue 3)")
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
            r = resources(fn, consts, warps, stages, types=types)
            print(f"  {name:<42} {warps:>2} warps  {r['registers']:>4} regs  {r['stack_bytes']:>5} B stack", flush=True)
        except Exception as e:  # noqa: BLE001 - one case that does not compile is reported, the rest still run
            bad += 1
            print(f"  {name:<42} {warps:>2} warps  error: {type(e).__name__}: {str(e)[-200:]}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
