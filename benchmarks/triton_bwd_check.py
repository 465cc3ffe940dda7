"""Triton backward on the GPU: gradient correctness at real sizes (poisoned outputs, protocol rule,
float64 reference) and forward+backward time against compiled FlexAttention on the same pattern and
cuDNN SDPA (dense/causal), in one process; plus a small search over backward block sizes.

    PYTHONPATH=src python3 benchmarks/triton_bwd_check.py --out DIR [--lengths 16384,65536] [--tune]
"""
import argparse
import json
import sys
import time

import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton.ops import attention_bwd, attention_fwd
from attnzoo.bench.timing import time_fn
from attnzoo.testing import check_close, rel_rmse

sys.path.insert(0, "benchmarks")
from gpu_check import dense_math  # noqa: E402


def _grads(fn, q, k, v, do, dl):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out * do.to(out.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * dl.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v))


def correctness(name, pattern, b, hq, hkv, lq, lk, d, dv, baseline=True):
    torch.manual_seed(hash(name) % 2**31)
    q, k, v = (torch.randn(b, h, n, e, device="cuda", dtype=torch.float64)
               for h, n, e in ((hq, lq, d), (hkv, lk, d), (hkv, lk, dv)))
    do = torch.randn(b, hq, lq, dv, device="cuda", dtype=torch.float64)
    dl = torch.randn(b, hq, lq, device="cuda", dtype=torch.float32)
    scale = d ** -0.5
    ref = _grads(lambda q, k, v: reference_attention(q, k, v, pattern), q, k, v, do, dl)
    ql, kl, vl = (t.to(torch.bfloat16) for t in (q, k, v))
    with torch.no_grad():
        out, lse = attention_fwd(ql, kl, vl, pattern, scale)
        got = attention_bwd(do.to(torch.bfloat16), dl, ql, kl, vl, out, lse, pattern, scale, poison=True)
    base = (_grads(lambda q, k, v: dense_math(q, k, v, pattern, scale), ql, kl, vl, do, dl) if baseline
            else (None,) * 3)
    res = dict(case=name, kind="correctness")
    try:
        for nm, g, r, bl in zip(("dq", "dk", "dv"), got, ref, base):
            if bl is not None:
                check_close(nm, g, r, baseline=bl)
            else:
                assert not torch.isnan(g).any() and rel_rmse(g, r) < 5e-3, f"{nm}: rel RMSE {rel_rmse(g, r)}"
            res[f"{nm}_rel_rmse"] = rel_rmse(g, r)
        res["status"] = "pass"
    except AssertionError as e:
        res.update(status="FAIL", error=str(e)[:500])
    return res


def speed(name, pattern, L, hq=64, hkv=8, d=128, reps=10):
    mk = lambda h: torch.randn(1, h, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    do = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16)
    dens = (pattern or az.Full()).density(L, L)
    flops = 3.5 * 4 * hq * d * dens * L * L
    runs = {}
    for be in ("triton", "flex"):
        def f(be=be):
            out = az.attention(q, k, v, pattern, backend=be)
            return torch.autograd.grad(out, (q, k, v), do)
        runs[be] = f
    if pattern is None or isinstance(pattern, az.Causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=pattern is not None,
                                                                       enable_gqa=True)
            return torch.autograd.grad(out, (q, k, v), do)
        runs["sdpa-cudnn"] = cudnn
    rows = []
    for be, fn in runs.items():
        r = time_fn(fn, device="cuda", warmup=2, reps=reps, max_time_s=4.0)
        tf = flops / (r["median_ms"] * 1e-3) / 1e12 if r["status"] == "ok" else None
        rows.append(dict(case=name, kind="fwdbwd", L=L, backend=be, density=dens, status=r["status"],
                         message=r.get("message"), median_ms=r["median_ms"], tflops=tf, compile_ms=r["compile_ms"],
                         peak_mem_bytes=r.get("peak_mem_bytes")))
    return rows


def tune(name, pattern, L, hq=64, hkv=8, d=128):
    """Backward alone for several block configs."""
    mk = lambda h: torch.randn(1, h, L, d, device="cuda", dtype=torch.bfloat16)
    q, k, v, do = mk(hq), mk(hkv), mk(hkv), mk(hq)
    with torch.no_grad():
        out, lse = attention_fwd(q, k, v, pattern, d ** -0.5)
    dens = (pattern or az.Full()).density(L, L)
    flops = 2.5 * 4 * hq * d * dens * L * L
    rows = []
    for bm, bn, nw, ns in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2),
                           (128, 128, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
        r = time_fn(lambda: attention_bwd(do, None, q, k, v, out, lse, pattern, d ** -0.5, cfg=cfg),
                    device="cuda", warmup=1, reps=5, max_time_s=2.0)
        tf = flops / (r["median_ms"] * 1e-3) / 1e12 if r["status"] == "ok" else None
        rows.append(dict(case=name, kind="bwd_tune", L=L, cfg=cfg, status=r["status"],
                         message=(r.get("message") or "")[:200], median_ms=r["median_ms"], tflops=tf))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="16384")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args()
    results = []

    def emit(r):
        results.append(r)
        print(json.dumps(r), flush=True)

    g2 = (64, 64)
    cases = [("causal-4K", az.Causal(), 1, 16, 8, 4096, 4096, 128, 128),
             ("sinks+window-gqa", az.SlidingWindow(1023) | az.Sinks(4), 2, 8, 2, 4001, 4001, 128, 128),
             ("window4096-gqa", az.SlidingWindow(4095), 1, 8, 2, 8192, 8192, 128, 128),  # (class wide)
             ("window-cross", az.SlidingWindow(300, 20), 1, 8, 1, 777, 2500, 64, 64),
             ("full-cross-lq>lk", None, 1, 4, 4, 3000, 1000, 128, 128),
             ("doc&causal", az.Document([1000, 37, 2000, 1059]) & az.Causal(), 1, 8, 8, 4096, 4096, 128, 128),
             ("nbhd2d-dil-causal", az.Neighborhood((7, 9), dilation=(2, 3), causal=(True, False), grid=g2),
              1, 8, 8, 4096, 4096, 128, 128),
             ("nbhd3d-stride", az.Neighborhood((5, 7, 7), stride=(1, 2, 2), grid=(8, 16, 32)), 1, 8, 8, 4096, 4096,
              128, 128),
             ("perhead", az.PerHead([az.Causal(), az.SlidingWindow(511)] * 4), 1, 8, 4, 2048, 2048, 128, 128),
             ("mla-192-128", az.Causal(), 1, 8, 8, 2048, 2048, 192, 128),
             ("d256", az.SlidingWindow(255), 1, 8, 8, 2048, 2048, 256, 256),
             ("sinks+window-64K", az.SlidingWindow(1023) | az.Sinks(4), 1, 8, 2, 65536, 65536, 128, 128, False)]
    if not args.skip_correctness:
        for c in cases:
            t0 = time.time()
            try:
                r = correctness(*c)
            except Exception as e:
                r = dict(case=c[0], kind="correctness", status="ERROR", error=f"{type(e).__name__}: {e}"[:400])
            r["seconds"] = round(time.time() - t0, 1)
            emit(r)
    if args.tune:
        for name, p in [("causal", az.Causal()), ("sw1024", az.SlidingWindow(1023))]:
            for r in tune(name, p, 16384):
                emit(r)
    for L in [int(x) for x in args.lengths.split(",") if x]:
        pats = [("causal", az.Causal()), ("sw1024", az.SlidingWindow(1023)), ("sw4096", az.SlidingWindow(4095)),
                ("sinks+sw1024", az.Sinks(4) | az.SlidingWindow(1023))]
        if L == 16384:
            pats += [("nbhd2d-13x13", az.Neighborhood((13, 13), grid=(128, 128))),
                     ("nbhd3d-5x7x7", az.Neighborhood((5, 7, 7), grid=(16, 32, 32)))]
        for name, p in pats:
            for r in speed(name, p, L):
                emit(r)
    if args.out:
        with open(f"{args.out}/triton_bwd_check.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print()
    for r in results:
        if r["kind"] == "correctness":
            print(f"{r['case']:<22} {r['status']} {r.get('error', '')[:200]}")
    for r in results:
        if r["kind"] == "bwd_tune":
            c = r["cfg"]
            print(f"tune {r['case']:<8} {c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}: "
                  f"{r['status']} {r['median_ms'] or 0:.2f} ms {r['tflops'] or 0:.0f} TF/s {r['message'] or ''}")
    sp = {(r["case"], r["L"], r["backend"]): r for r in results if r["kind"] == "fwdbwd" and r["status"] == "ok"}
    print(f"\n{'fwd+bwd':<14} {'L':>6} {'triton ms':>10} {'flex ms':>9} {'tri/flex':>9} {'tri TF/s':>9} {'cudnn ms':>9}")
    for (case, L, be), t in sp.items():
        if be != "triton":
            continue
        f = sp.get((case, L, "flex"))
        c = sp.get((case, L, "sdpa-cudnn"))
        print(f"{case:<14} {L:>6} {t['median_ms']:>10.2f} {f['median_ms'] if f else float('nan'):>9.2f} "
              f"{f['median_ms'] / t['median_ms'] if f else float('nan'):>9.2f} {t['tflops']:>9.0f} "
              f"{c['median_ms'] if c else float('nan'):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
