"""Forward-kernel variants on the GPU, one process: block configs with the current kernel, and Triton's
warp specialization (`tl.range(..., warp_specialize=True)`) on the block loops, for a causal and a
1024-window pattern (H100, bf16, 64/8 heads, D=128). A variant that fails to compile is recorded.

    PYTHONPATH=src python3 benchmarks/triton_fwd_variants.py --out DIR
"""
import argparse
import json
import sys

import torch

import attnzoo as az
from attnzoo.backends.triton import kernels, ops
from attnzoo.backends.triton.codegen import generate
from attnzoo.bench.timing import time_fn
from attnzoo.testing import rel_rmse

_real_module = ops._module


def _variant_module(replace):
    cache = {}

    def module(pattern, lq, lk, device):
        key = (pattern, lq, lk, device)
        if key not in cache:
            lines, aux = generate(pattern, lq, lk)
            src = kernels.FWD
            for a, b in replace:
                assert a in src, a
                src = src.replace(a, b)
            mod = kernels.kernel_module(lines, src, kernels.BWD)
            aux = aux.to(device) if aux is not None else torch.zeros(1, dtype=torch.int32, device=device)
            cache[key] = (mod, aux)
        return cache[key]
    return module


# Both block loops of the forward now run in one helper (`_fwd_blocks`), so the full-block-only variant of
# the 2026-11-23 run (ws-full) is gone; ws-both warp-specializes that helper's loop.
WS_BOTH = [("for j in range(0, n):", "for j in tl.range(0, n, warp_specialize=True):")]
VARIANTS = {"base": None, "ws-both": WS_BOTH}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--L", type=int, default=16384)
    args = ap.parse_args()
    L, hq, hkv, d = args.L, 64, 8, 128
    q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
    pats = {"causal": az.Causal(), "sw1024": az.SlidingWindow(1023)}
    cfgs = {"causal": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
            "sw1024": [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)]}
    rows = []
    for vname, rep in VARIANTS.items():
        ops._module = _real_module if rep is None else _variant_module(rep)
        for pname, p in pats.items():
            dens = p.density(L, L)
            ref = None
            for bm, bn, w, s in cfgs[pname]:
                if vname != "base" and (bm, bn, w, s) not in cfgs[pname][:2] + [(128, 128, 8, 3)]:
                    continue
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                row = dict(variant=vname, pattern=pname, L=L, cfg=cfg)
                try:
                    out, _ = ops.attention_fwd(q, k, v, p, d ** -0.5, cfg=cfg)
                    if ref is None:
                        ref = ops.attention_fwd(q[:, :8, :4096], k[:, :1, :4096], v[:, :1, :4096], p, d ** -0.5)[0]
                    chk = ops.attention_fwd(q[:, :8, :4096], k[:, :1, :4096], v[:, :1, :4096], p, d ** -0.5, cfg=cfg)[0]
                    row["rel_rmse_vs_default"] = rel_rmse(chk, ref)
                    r = time_fn(lambda: ops.attention_fwd(q, k, v, p, d ** -0.5, cfg=cfg), device="cuda", warmup=2,
                                reps=10, max_time_s=1.5)
                    row.update(status=r["status"], message=(r.get("message") or "")[:200], median_ms=r["median_ms"],
                               tflops=4 * hq * d * dens * L * L / (r["median_ms"] * 1e-3) / 1e12 if r["median_ms"] else None)
                except Exception as e:  # noqa: BLE001
                    row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
    ops._module = _real_module
    if args.out:
        with open(f"{args.out}/triton_fwd_variants.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'variant':<8} {'pattern':<7} {'config':<18} {'ms':>8} {'TF/s':>6}  note")
    for r in rows:
        c = r["cfg"]
        cs = f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
        print(f"{r['variant']:<8} {r['pattern']:<7} {cs:<18} {r.get('median_ms') or 0:>8.3f} {r.get('tflops') or 0:>6.0f}  "
              f"{r['status']} {r.get('message', '')[:80]} rmse={r.get('rel_rmse_vs_default', '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
