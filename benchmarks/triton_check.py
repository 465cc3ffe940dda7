"""Triton forward kernel on the GPU: correctness at real sizes (poisoned outputs, protocol rule) and
forward time against compiled FlexAttention on the same pattern and cuDNN SDPA dense, one process.

    python benchmarks/triton_check.py --out DIR
"""
import argparse
import json
import sys
import time

import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton.ops import _layout, attention_fwd, config
from attnzoo.bench.timing import time_fn
from attnzoo.testing import check_close

sys.path.insert(0, "benchmarks")
from gpu_check import dense_math  # noqa: E402


def correctness(name, pattern, b, hq, hkv, lq, lk, d, dv, baseline=True):
    torch.manual_seed(hash(name) % 2**31)
    q, k, v = (torch.randn(b, h, n, e, device="cuda", dtype=torch.float64)
               for h, n, e in ((hq, lq, d), (hkv, lk, d), (hkv, lk, dv)))
    with torch.no_grad():
        ro, rl = reference_attention(q, k, v, pattern)
        ql, kl, vl = (t.to(torch.bfloat16) for t in (q, k, v))
        out, lse = attention_fwd(ql, kl, vl, pattern, d ** -0.5, poison=True)
        res = dict(case=name, kind="correctness")
        try:
            if baseline:
                check_close("out", out, ro, baseline=dense_math(ql, kl, vl, pattern, d ** -0.5)[0])
            else:
                from attnzoo.testing import rel_rmse
                assert not torch.isnan(out).any() and rel_rmse(out, ro) < 5e-3, f"rel RMSE {rel_rmse(out, ro)}"
            assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "lse -inf rows differ"
            fin = torch.isfinite(rl)
            err = (lse[fin] - rl[fin]).abs().max().item()
            assert err < 1e-2, f"lse max err {err}"
            res.update(status="pass", lse_max_err=err)
        except AssertionError as e:
            res.update(status="FAIL", error=str(e))
    return res


def api_correctness(name, pattern, b, hq, hkv, L, d):
    """Through attention(backend="triton"): N-D neighborhoods take the tiled token order."""
    torch.manual_seed(hash(name) % 2**31)
    q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=torch.float64) for h in (hq, hkv, hkv))
    with torch.no_grad():
        ro, rl = reference_attention(q, k, v, pattern)
        ql, kl, vl = (t.to(torch.bfloat16) for t in (q, k, v))
        out, lse = az.attention(ql, kl, vl, pattern, backend="triton", return_lse=True)
    res = dict(case=name, kind="correctness")
    try:
        check_close("out", out, ro, baseline=dense_math(ql, kl, vl, pattern, d ** -0.5)[0])
        err = (lse - rl).abs().max().item()
        assert err < 1e-2, f"lse max err {err}"
        res.update(status="pass", lse_max_err=err)
    except AssertionError as e:
        res.update(status="FAIL", error=str(e))
    return res


def speed(name, pattern, L, hq=64, hkv=8, d=128, reps=10):
    q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
    dens = (pattern or az.Full()).density(L, L)
    flops = 4 * hq * d * dens * L * L
    rows = []
    runs = {"triton": lambda: az.attention(q, k, v, pattern, backend="triton"),
            "flex": lambda: az.attention(q, k, v, pattern, backend="flex")}
    if pattern is None or isinstance(pattern, az.Causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
                    is_causal=pattern is not None)
        runs["sdpa-cudnn"] = cudnn
    for backend, fn in runs.items():
        r = time_fn(fn, device="cuda", warmup=2, reps=reps, max_time_s=3.0)
        tf = flops / (r["median_ms"] * 1e-3) / 1e12 if r["status"] == "ok" else None
        rows.append(dict(case=name, kind="speed", L=L, backend=backend, density=dens, status=r["status"],
                         message=r.get("message"), median_ms=r["median_ms"], tflops=tf,
                         compile_ms=r["compile_ms"]))
    # layout construction cost (uncached) at this size
    cfg = config(d, d, torch.device("cuda"), pattern)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    (pattern or az.Full()).block_layout(L, L, cfg["BLOCK_M"], cfg["BLOCK_N"], device="cuda", num_heads=hq)
    torch.cuda.synchronize()
    rows.append(dict(case=name, kind="layout", L=L, layout_ms=(time.perf_counter() - t0) * 1e3))
    _layout.cache_clear()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="16384,65536")
    args = ap.parse_args()
    g2 = (64, 64)
    results = []
    for c in [("causal-4K", az.Causal(), 1, 16, 8, 4096, 4096, 128, 128),
              ("sinks+window-gqa", az.SlidingWindow(1023) | az.Sinks(4), 2, 8, 2, 4001, 4001, 128, 128),
              ("window-cross", az.SlidingWindow(300, 20), 1, 8, 1, 777, 2500, 64, 64),
              ("doc&causal", az.Document([1000, 37, 2000, 1059]) & az.Causal(), 1, 8, 8, 4096, 4096, 128, 128),
              ("nbhd2d-dil-causal", az.Neighborhood((7, 9), dilation=(2, 3), causal=(True, False), grid=g2),
               1, 8, 8, 4096, 4096, 128, 128),
              ("nbhd3d-stride", az.Neighborhood((5, 7, 7), stride=(1, 2, 2), grid=(8, 16, 32)), 1, 8, 8, 4096, 4096, 128, 128),
              ("perhead", az.PerHead([az.Causal(), az.SlidingWindow(511)] * 4), 1, 8, 4, 2048, 2048, 128, 128),
              ("mla-192-128", az.Causal(), 1, 8, 8, 2048, 2048, 192, 128),
              ("d256", az.SlidingWindow(255), 1, 8, 8, 2048, 2048, 256, 256)]:
        t0 = time.time()
        try:
            r = correctness(*c)
        except Exception as e:
            r = dict(case=c[0], kind="correctness", status="ERROR", error=f"{type(e).__name__}: {e}"[:400])
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    for c in [("api-nbhd2d-13x13-tiled", az.Neighborhood((13, 13), grid=(64, 64)), 1, 8, 2, 4096, 128),
              ("api-nbhd3d-5x7x7-tiled", az.Neighborhood((5, 7, 7), grid=(8, 16, 32)), 1, 8, 8, 4096, 128),
              ("api-nbhd2d-dil-causal", az.Neighborhood((7, 7), dilation=(2, 1), causal=(True, False), grid=(64, 64)),
               1, 8, 8, 4096, 128)]:
        try:
            r = api_correctness(*c)
        except Exception as e:
            r = dict(case=c[0], kind="correctness", status="ERROR", error=f"{type(e).__name__}: {e}"[:400])
        results.append(r)
        print(json.dumps(r), flush=True)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    for L in lengths:
        for name, p in [("causal", az.Causal()), ("sw1024", az.SlidingWindow(1023)), ("sw4096", az.SlidingWindow(4095)),
                        ("sinks+sw1024", az.Sinks(4) | az.SlidingWindow(1023))]:
            for r in speed(name, p, L):
                results.append(r)
                print(json.dumps(r), flush=True)
    for name, p in [("nbhd2d-13x13", az.Neighborhood((13, 13), grid=(128, 128))),
                    ("nbhd3d-5x7x7", az.Neighborhood((5, 7, 7), grid=(16, 32, 32)))]:
        for r in speed(name, p, 16384):
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        with open(f"{args.out}/triton_check.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print()
    for r in results:
        if r["kind"] == "correctness":
            print(f"{r['case']:<22} {r['status']}")
    speeds = {}
    for r in results:
        if r["kind"] == "speed" and r["status"] == "ok":
            speeds[(r["case"], r["L"], r["backend"])] = r
    print(f"\n{'pattern':<14} {'L':>6} {'triton ms':>10} {'flex ms':>9} {'tri/flex':>9} {'tri TF/s':>9} {'layout ms':>9}")
    lay = {(r["case"], r["L"]): r["layout_ms"] for r in results if r["kind"] == "layout"}
    for (case, L) in lay:
        t, f = speeds.get((case, L, "triton")), speeds.get((case, L, "flex"))
        if t and f:
            print(f"{case:<14} {L:>6} {t['median_ms']:>10.3f} {f['median_ms']:>9.3f} {f['median_ms'] / t['median_ms']:>9.2f} "
                  f"{t['tflops']:>9.0f} {lay[(case, L)]:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
