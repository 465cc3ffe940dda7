"""Search block sizes / warps / stages for the Triton forward kernel (H100, bf16, D=128, 64/8 heads).

    python benchmarks/triton_tune.py --out DIR     -> triton_tune.jsonl and a table
"""
import argparse
import json
import sys

import torch

import attnzoo as az
from attnzoo.backends.triton import ops
from attnzoo.bench.timing import time_fn

CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 4),
           (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (256, 64, 8, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    L, hq, hkv, d = 16384, 64, 8, 128
    q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
    pats = {"causal": az.Causal(), "sw1024": az.SlidingWindow(1023), "nbhd2d-13x13": az.Neighborhood((13, 13), grid=(128, 128))}
    rows = []
    for bm, bn, w, s in CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        for name, p in pats.items():
            dens = p.density(L, L)
            r = time_fn(lambda: ops.attention_fwd(q, k, v, p, d ** -0.5, cfg=cfg), device="cuda", warmup=2, reps=10,
                        max_time_s=2.0)
            tf = 4 * hq * d * dens * L * L / (r["median_ms"] * 1e-3) / 1e12 if r["status"] == "ok" else None
            row = dict(pattern=name, L=L, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, status=r["status"],
                       message=(r.get("message") or "")[:200], median_ms=r["median_ms"], tflops=tf)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(f"{args.out}/triton_tune.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'config (BM,BN,warps,stages)':<28}" + "".join(f"{n:>16}" for n in pats))
    for c in CONFIGS:
        cells = []
        for n in pats:
            r = next(x for x in rows if x["pattern"] == n and (x["BLOCK_M"], x["BLOCK_N"], x["num_warps"], x["num_stages"]) == c)
            cells.append(f"{r['tflops']:>12.0f} TF/s" if r["tflops"] else f"{r['status']:>16}")
        print(f"{str(c):<28}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
