"""GPU correctness check: every backend against the float64 reference at real sizes (protocol rule).

Run on a CUDA machine:  python benchmarks/gpu_check.py [--out DIR]
Forward, lse and all gradients for FlexAttention (compiled) and SDPA, bf16, head_dim 128, GQA,
cross attention and odd lengths. The float64 reference runs on the GPU, chunked.
"""
import argparse
import json
import sys
import time

import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close


def dense_math(q, k, v, pattern, scale):
    """The plain PyTorch math path in the inputs' precision (the protocol's baseline)."""
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if pattern is not None:
        qi, ki = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
        m = pattern.mask(qi, ki, lq, lk) if not pattern.head_dependent else torch.stack(
            [pattern.mask(qi, ki, lq, lk, head=h) for h in range(q.shape[1])])
        s = s.masked_fill(~m, float("-inf"))
    rows = torch.isfinite(s).any(-1, keepdim=True)
    s = torch.where(rows, s, 0.0)
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s, -1) * rows
    return p @ v, torch.where(rows.squeeze(-1), lse, float("-inf"))


def row_sink(path=None):
    """-> (rows, emit, close): ``emit(row)`` appends the row to ``rows``, to the JSON-lines file at ``path``
    (when given; flushed per row, so a time-boxed run keeps what it measured) and to stderr."""
    rows = []
    fout = open(path, "w") if path else None

    def emit(row):
        rows.append(row)
        if fout:
            fout.write(json.dumps(row) + "\n")
            fout.flush()
        print(json.dumps(row), file=sys.stderr, flush=True)

    return rows, emit, (fout.close if fout else (lambda: None))


def median_timer(device, max_time_s):
    """-> ``timed(fn)``: (median ms or None, the `time_fn` record), 2 warm-ups, up to 20 repetitions."""
    from attnzoo.bench.timing import time_fn

    def timed(fn):
        r = time_fn(fn, device=device, warmup=2, reps=20, max_time_s=max_time_s)
        return (r["median_ms"] if r["status"] == "ok" else None), r

    return timed


def run_case(name, backend, pattern, b, hq, hkv, lq, lk, d, dv, dtype, with_baseline=True):
    dev = "cuda"
    torch.manual_seed(hash(name) % 2**31)
    q64 = torch.randn(b, hq, lq, d, device=dev, dtype=torch.float64)
    k64 = torch.randn(b, hkv, lk, d, device=dev, dtype=torch.float64)
    v64 = torch.randn(b, hkv, lk, dv, device=dev, dtype=torch.float64)
    do64 = torch.randn(b, hq, lq, dv, device=dev, dtype=torch.float64)
    scale = d ** -0.5
    use_lse = backend != "sdpa"

    def fwd_bwd(fn, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = fn(q, k, v)
        out.backward(do64.to(out.dtype))
        return out.detach(), (lse.detach() if lse is not None else None), q.grad, k.grad, v.grad

    ref = fwd_bwd(lambda q, k, v: reference_attention(q, k, v, pattern, scale), q64, k64, v64)
    ql, kl, vl = (t.to(dtype) for t in (q64, k64, v64))

    def ours(q, k, v):
        if use_lse:
            return az.attention(q, k, v, pattern, backend=backend, return_lse=True)
        return az.attention(q, k, v, pattern, backend=backend), None

    got = fwd_bwd(ours, ql, kl, vl)
    base = fwd_bwd(lambda q, k, v: dense_math(q, k, v, pattern, scale), ql, kl, vl) if with_baseline else None
    res = dict(case=name, backend=backend, pattern=repr(pattern), shape=[b, hq, hkv, lq, lk, d, dv], dtype=str(dtype))
    ok = True
    for i, part in enumerate(("out", "lse", "dq", "dk", "dv")):
        if part == "lse":
            if not use_lse:
                continue
            x, y = got[1], ref[1].float()
            fin = torch.isfinite(y)
            same_inf = torch.equal(torch.isinf(x), torch.isinf(y))
            err = (x[fin] - y[fin]).abs().max().item() if fin.any() else 0.0
            res["lse_max_err"] = err
            if not same_inf or err > 1e-2 or torch.isnan(x).any():
                ok = False
                res["lse_fail"] = f"max err {err}, -inf rows match: {same_inf}"
            continue
        try:
            if with_baseline:
                check_close(part, got[i], ref[i], baseline=base[i])
            else:
                from attnzoo.testing import rel_rmse
                rr = rel_rmse(got[i], ref[i])
                if rr >= 5e-3 or torch.isnan(got[i]).any():
                    raise AssertionError(f"{part}: rel RMSE {rr:.3g}")
            res[part] = "pass"
        except AssertionError as e:
            ok = False
            res[part] = str(e)
    res["status"] = "pass" if ok else "FAIL"
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bf16 = torch.bfloat16
    grid2 = (64, 64)
    cases = [
        ("causal-sdpa", "sdpa", az.Causal(), 1, 16, 8, 4096, 4096, 128, 128),
        ("full-cross-sdpa", "sdpa", None, 2, 8, 2, 1000, 3001, 128, 128),
        ("causal-flex", "flex", az.Causal(), 1, 16, 8, 4096, 4096, 128, 128),
        ("window1023-flex", "flex", az.SlidingWindow(1023), 1, 16, 8, 4096, 4096, 128, 128),
        ("sinks+window-flex", "flex", az.SlidingWindow(255) | az.Sinks(4), 2, 8, 2, 3001, 3001, 128, 128),
        ("window-cross-flex", "flex", az.SlidingWindow(300, 20), 1, 8, 1, 777, 2500, 64, 64),
        ("causal-longq-flex", "flex", az.Causal(), 1, 4, 4, 1500, 1000, 128, 128),
        ("doc&causal-flex", "flex", az.Document([1000, 37, 2000, 1059]) & az.Causal(), 1, 8, 8, 4096, 4096, 128, 128),
        ("chunked-flex", "flex", az.Chunked(512), 1, 8, 4, 4096, 4096, 64, 64),
        ("na2d-flex", "flex", az.Neighborhood((13, 13), grid=grid2), 1, 8, 8, 4096, 4096, 128, 128),
        ("na2d-dil-causal-flex", "flex", az.Neighborhood((7, 9), dilation=(2, 3), causal=(True, False), grid=grid2), 1, 8, 8, 4096, 4096, 128, 128),
        ("na3d-stride-flex", "flex", az.Neighborhood((5, 7, 7), stride=(1, 2, 2), grid=(8, 16, 32)), 1, 8, 8, 4096, 4096, 128, 128),
        ("perhead-flex", "flex", az.PerHead([az.Causal(), az.SlidingWindow(511)] * 4), 1, 8, 4, 2048, 2048, 128, 128),
        ("dilated-flex", "flex", az.Dilated(256, 4), 1, 8, 8, 4096, 4096, 256, 256),
        ("mla-dims-flex", "flex", az.Causal(), 1, 8, 8, 2048, 2048, 128, 64),
    ]
    results = []
    for c in cases:
        t0 = time.time()
        try:
            r = run_case(c[0], c[1], c[2], *c[3:], bf16)
        except Exception as e:  # record and go on
            r = dict(case=c[0], backend=c[1], status="ERROR", error=f"{type(e).__name__}: {e}"[:500])
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    # one long case: sliding window at 64K, forward + lse only (rel RMSE rule, no dense baseline)
    t0 = time.time()
    try:
        pat = az.SlidingWindow(1023) | az.Sinks(4)
        q, k, v = (torch.randn(1, h, 65536, 128, device="cuda", dtype=torch.float64) for h in (4, 2, 2))
        with torch.no_grad():
            ref_o, ref_l = reference_attention(q, k, v, pat)
            o, l = az.attention(q.to(bf16), k.to(bf16), v.to(bf16), pat, backend="flex", return_lse=True)
        from attnzoo.testing import rel_rmse
        rr = rel_rmse(o, ref_o)
        le = (l - ref_l).abs().max().item()
        r = dict(case="sinks+window-64K-fwd-flex", status="pass" if rr < 5e-3 and le < 1e-2 else "FAIL",
                 out_rel_rmse=rr, lse_max_err=le)
    except Exception as e:
        r = dict(case="sinks+window-64K-fwd-flex", status="ERROR", error=f"{type(e).__name__}: {e}"[:500])
    r["seconds"] = round(time.time() - t0, 1)
    results.append(r)
    print(json.dumps(r), flush=True)
    if args.out:
        with open(f"{args.out}/gpu_check.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print("\n%-28s %-6s %s" % ("case", "status", "seconds"))
    for r in results:
        print("%-28s %-6s %s" % (r["case"], r["status"], r["seconds"]))
    return 0 if all(r["status"] == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
