"""Decode (one new query token against a long KV cache) on the GPU: attnzoo's split-K Triton kernel
against FlexAttention (compiled) and SDPA, one process, bf16, B=1, Hq in {64, 32}, Hkv=8, D=128; and MLA's
absorbed decode (32 heads over one 576/512-wide latent head) against SDPA.

    PYTHONPATH=src python3 benchmarks/triton_decode_bench.py [--out benchmarks/results/decode.jsonl]
        [--cases gqa,mla,loop]

First a correctness check at smaller lengths (poisoned outputs, the protocol's rule against the float64
reference, several split counts and block sizes); then times (CUDA events, L2 flushed, median) for a few
(num_splits, block_n) choices, keeping the best (by graph time), and the achieved HBM bandwidth: bytes of K
and V in the kv blocks the kernel actually visits / time, and its fraction of the H100 SXM peak (3.35 TB/s).
For FlexAttention and SDPA the bytes are those the pattern needs (visible keys only).

MLA width (``--cases mla``): MLA's absorbed decode of one token, as `attnzoo.layers.MLA` calls attention(): 32
query heads folded into the query axis over one latent kv head with D = kv_rank + rope = 576 and V = its
first 512 columns (a view of the same cache), 32K and 128K keys, batch 1 and 8, bf16: the wide-head decode
kernel (`attn_decode_wide`, a few (num_splits, block_n, block_dv) choices, best kept) against SDPA (what `auto`
ran before, BENCHMARKS.md "MLA decode at 32K context": 99 GB/s); GB/s counts the latent cache read once
(B x L x 576 x 2 bytes).

Growing Lk (``--cases loop``): a decode loop as a serving engine runs it, eager: one token a step against a KV
cache that grows by one key a step (views of a preallocated cache), 100 steps from each of ``--loop-lengths``,
for the closed-form visit ranges (``visit="range"``, the default for these patterns: nothing is built on the
host per step) and the visit lists (``visit="list"``: rebuilt on the host every step, as before). Per step: the
host time of the call, the wall time (host and GPU overlapped, synchronised once after the loop) and GB/s (bytes
of K and V in the visited blocks / wall time). L2 is not flushed (consecutive steps read the same cache).

Each callable is timed twice: "graph" replays it captured in a CUDA graph (how serving engines run decode
steps; the GPU time alone), "eager" calls it from Python (includes launch overhead wherever the host is
slower than the GPU: two Triton launches cost some tens of us of host time here).
"""
import argparse
import json
import os
import sys
import time

import torch

import attnzoo as az
from attnzoo.backends.triton import decode as dec
from attnzoo.backends.triton.decode import _launch, attention_decode, decode_plan, default_block_n, default_num_splits
from attnzoo.bench.timing import time_fn
from attnzoo.testing import check_close

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import dense_math  # noqa: E402

PEAK_BYTES_S = 3.35e12  # H100 SXM HBM3
PATTERNS = {"full": None, "sw4095+sinks4": az.SlidingWindow(4095) | az.Sinks(4)}
CONFIGS = [(None, 64), (None, 128), (None, 32), (16, 64), (32, 64), (64, 64), (128, 64), (32, 128), (64, 128)]


def env():
    import triton
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)


def correctness(pname, pattern, hq, hkv, lk, d=128, lq=1):
    torch.manual_seed(lk + hq)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.float64) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    ro, rl = az.attention(q, k, v, pattern, backend="reference", return_lse=True)
    ql, kl, vl = (t.to(torch.bfloat16) for t in (q, k, v))
    base = dense_math(ql, kl, vl, pattern, d ** -0.5)[0]
    rows = []
    for ns, bn in ((None, None), (1, 64), (7, 64), (64, 32), (None, 128)):
        res = dict(kind="correctness", pattern=pname, hq=hq, hkv=hkv, lq=lq, L=lk, num_splits=ns, block_n=bn)
        try:
            out, lse = attention_decode(ql, kl, vl, pattern, d ** -0.5, poison=True, num_splits=ns, block_n=bn)
            check_close("out", out, ro, baseline=base)
            assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "lse -inf rows differ"
            fin = torch.isfinite(rl)
            err = (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0
            assert err < 1e-2, f"lse max err {err}"
            res.update(status="pass", lse_max_err=err)
        except AssertionError as e:
            res.update(status="FAIL", error=str(e))
        rows.append(res)
    return rows


def graphed(fn):
    """``fn`` captured in a CUDA graph (how decode steps run in serving engines): -> its replay, timing the
    GPU work without the Python launch overhead."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def speed(pname, pattern, hq, hkv, lk, d=128, reps=30, flex=True):
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
    base = dict(kind="speed", pattern=pname, B=1, hq=hq, hkv=hkv, lq=1, L=lk, d=d, dtype="bfloat16", **env())
    rows = []

    def record(backend, fn, kv_bytes, mode, **extra):
        if mode == "graph":
            try:
                fn = graphed(fn)
            except Exception as e:  # noqa: BLE001 - a backend that cannot be captured is a record
                row = dict(base, backend=backend, mode=mode, status="error", message=f"capture: {e}"[:500],
                           median_ms=None, kv_bytes=kv_bytes, gbps=None, frac_peak=None, **extra)
                rows.append(row)
                return row
        r = time_fn(fn, device="cuda", warmup=3, reps=reps, max_time_s=2.0)
        ok = r["status"] == "ok"
        bw = kv_bytes / (r["median_ms"] * 1e-3) if ok else None
        row = dict(base, backend=backend, mode=mode, status=r["status"], message=r["message"],
                   median_ms=r["median_ms"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"], compile_ms=r["compile_ms"],
                   kv_bytes=kv_bytes, gbps=bw / 1e9 if ok else None, frac_peak=bw / PEAK_BYTES_S if ok else None,
                   **extra)
        rows.append(row)
        return row

    # ours: a few (num_splits, block_n); the best (by graph time) is kept as backend "triton-decode"
    tried = []
    for ns, bn in CONFIGS:
        bn_ = bn or default_block_n(d, d, q.device)
        plan = decode_plan(pattern, 1, lk, bn_, hq, hkv, "cuda")
        ns_ = ns or default_num_splits(hkv * plan.chunks, plan.max_blocks, q.device)
        kv_bytes = plan.keys_read * 2 * d * 2
        fn = lambda: attention_decode(q, k, v, pattern, d ** -0.5, num_splits=ns_, block_n=bn_)  # noqa: E731
        for mode in ("graph", "eager"):
            row = record("triton-decode-cfg", fn, kv_bytes, mode, num_splits=ns_, block_n=bn_, default=ns is None)
            if mode == "graph":
                tried.append(row)
    ok = [r for r in tried if r["status"] == "ok"]
    if ok:
        best = min(ok, key=lambda r: r["median_ms"])
        for r in list(rows):
            same = all(r.get(x) == best[x] for x in ("num_splits", "block_n", "default"))
            if r["backend"] == "triton-decode-cfg" and same:
                rows.append(dict(r, backend="triton-decode"))
    # bytes the pattern needs at key granularity (what any kernel must read at least)
    need = int(round((pattern or az.Full()).density(1, lk) * lk)) * hkv * 2 * d * 2
    for mode in ("graph", "eager"):
        if flex:
            record("flex", lambda: az.attention(q, k, v, pattern, backend="flex"), need, mode)
        if pattern is None:
            record("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                   need, mode)
    return rows


MLA_RANK, MLA_ROPE, MLA_HEADS = 512, 64, 32
MLA_SCALE = (128 + 64) ** -0.5  # DeepSeek-V2/V3: qk_nope 128 + rope 64
# (num_splits, block_n, block_dv, block_dc, num_warps, num_stages); None = the default (16-key blocks, one
# 512-wide Dv slice, 64-wide D chunks, 16 warps, 2 stages). Compiled for sm_90 the defaults use 128 registers
# without spills; (32, 256, 8 warps) uses ~180 (two Dv slices: K read twice, from L2 the second time).
MLA_CONFIGS = [(None, None, None, None, None, None), (None, 32, None, None, None, None),
               (None, 32, 256, None, 8, None), (None, 16, 256, None, 8, None), (None, None, 256, None, None, None),
               (None, None, None, None, None, 3), (None, 64, None, None, None, 1), (8, None, None, None, None, None),
               (32, None, None, None, None, None), (64, None, None, None, None, None),
               (128, None, None, None, None, None)]


def mla_inputs(b, lk, dtype, seed=0):
    """MLA's absorbed one-token call: q (B, 1, H, 576) (heads folded into the query axis), the latent cache as
    one key head (B, 1, L, 576) and V = its first 512 columns (a strided view of the same memory)."""
    torch.manual_seed(seed)
    d = MLA_RANK + MLA_ROPE
    q = torch.randn(b, MLA_HEADS, 1, d, device="cuda", dtype=dtype).transpose(1, 2)
    latent = torch.randn(b, lk, d, device="cuda", dtype=dtype)
    return q, latent[:, None], latent[:, None, :, :MLA_RANK]


def mla_correctness(b, lk):
    q, k, v = mla_inputs(b, lk, torch.float64, seed=lk + b)
    ro, rl = az.attention(q, k, v, None, scale=MLA_SCALE, backend="reference", return_lse=True)
    ql, kl, vl = (t.to(torch.bfloat16) for t in (q, k, v))
    vl = kl[..., :MLA_RANK]  # keep V a view of K, as in the layer
    base = dense_math(ql, kl, vl, None, MLA_SCALE)[0]
    rows = []
    for ns, bn, bdv, bdc in ((None, None, None, None), (1, 32, None, None), (7, 32, 128, None), (64, 16, 256, None),
                             (None, 64, None, 128), (5, 32, 256, 32)):
        res = dict(kind="correctness", pattern="mla-full", B=b, hq=MLA_HEADS, hkv=1, lq=1, L=lk, num_splits=ns,
                   block_n=bn, block_dv=bdv, block_dc=bdc)
        try:
            out, lse = attention_decode(ql, kl, vl, None, MLA_SCALE, poison=True, num_splits=ns, block_n=bn,
                                        block_dv=bdv, block_dc=bdc)
            check_close("out", out, ro, baseline=base)
            assert not torch.isnan(lse).any(), "NaN in lse"
            err = (lse.double() - rl).abs().max().item()
            assert err < 1e-2, f"lse max err {err}"
            res.update(status="pass", lse_max_err=err)
        except AssertionError as e:
            res.update(status="FAIL", error=str(e))
        rows.append(res)
    return rows


def _timed(base, backend, fn, nbytes, mode, reps, **extra):
    """One timing record (see `speed`): ``mode`` "graph" replays ``fn`` captured in a CUDA graph."""
    if mode == "graph":
        try:
            fn = graphed(fn)
        except Exception as e:  # noqa: BLE001 - a backend that cannot be captured is a record
            return dict(base, backend=backend, mode=mode, status="error", message=f"capture: {e}"[:500],
                        median_ms=None, kv_bytes=nbytes, gbps=None, frac_peak=None, **extra)
    r = time_fn(fn, device="cuda", warmup=3, reps=reps, max_time_s=2.0)
    ok = r["status"] == "ok"
    bw = nbytes / (r["median_ms"] * 1e-3) if ok else None
    return dict(base, backend=backend, mode=mode, status=r["status"], message=r["message"],
                median_ms=r["median_ms"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"], compile_ms=r["compile_ms"],
                kv_bytes=nbytes, gbps=bw / 1e9 if ok else None, frac_peak=bw / PEAK_BYTES_S if ok else None, **extra)


def mla_speed(b, lk, reps=30):
    q, k, v = mla_inputs(b, lk, torch.bfloat16)
    cache = b * lk * (MLA_RANK + MLA_ROPE) * 2  # the latent cache, read once (V is a view of K)
    base = dict(kind="speed", pattern="mla-full", B=b, hq=MLA_HEADS, hkv=1, lq=1, L=lk, d=MLA_RANK + MLA_ROPE,
                dv=MLA_RANK, dtype="bfloat16", **env())
    rows, tried = [], []
    for i, (ns, bn, bdv, bdc, nw, st) in enumerate(MLA_CONFIGS):
        fn = lambda: attention_decode(q, k, v, None, MLA_SCALE, num_splits=ns, block_n=bn,  # noqa: E731
                                      block_dv=bdv, block_dc=bdc, num_warps=nw, num_stages=st)
        L = _launch(None, b, 1, 1, MLA_HEADS, dec.lk_bucket(lk), q.shape[-1], v.shape[-1], q.dtype, q.device, ns, bn, nw, st,
                    None, None, bdv, bdc)  # the configuration this call resolves to
        cfg = dict(num_splits=L.splits, block_n=L.meta["BLOCK_N"], block_dv=L.meta["BLOCK_DV"],
                   block_dc=L.meta["BLOCK_DC"], rows=L.meta["ROWS"], num_warps=L.meta["num_warps"],
                   num_stages=L.meta["num_stages"], default=i == 0, cfg_id=i)
        for mode in ("graph", "eager"):
            row = _timed(base, "triton-decode-cfg", fn, cache, mode, reps, **cfg)
            rows.append(row)
            if mode == "graph":
                tried.append(row)
    ok = [r for r in tried if r["status"] == "ok"]
    if ok:
        best = min(ok, key=lambda r: r["median_ms"])
        rows += [dict(r, backend="triton-decode") for r in list(rows)
                 if r["backend"] == "triton-decode-cfg" and r["cfg_id"] == best["cfg_id"]]
    for mode in ("graph", "eager"):
        # what backend="auto" ran before (the layer's folded call through SDPA) and what it runs now
        rows.append(_timed(base, "sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=MLA_SCALE), cache, mode, reps))
        rows.append(_timed(base, "auto", lambda: az.attention(q, k, v, None, scale=MLA_SCALE), cache, mode, reps))
    return rows


def run_mla(args, emit):
    corr = []
    for b in (1, 2):
        corr += mla_correctness(b, 4133)
    emit(corr)
    fails = [r for r in corr if r["status"] != "pass"]
    print(f"MLA correctness: {len(corr) - len(fails)}/{len(corr)} pass")
    for r in fails:
        print("  FAIL", r)
    rows = []
    for b in [int(x) for x in args.mla_batches.split(",")]:
        for lk in [int(x) for x in args.mla_lengths.split(",")]:
            new = mla_speed(b, lk, reps=args.reps)
            emit(new)
            rows += new
            print(f"  done MLA B={b} L={lk}", flush=True)
    print(f"\n{'MLA':<8}{'B':>3}{'L':>8}  {'backend':<18}{'mode':<7}{'splits':>7}{'bn':>5}{'bdv':>5}{'bdc':>5}"
          f"{'nw':>4}{'st':>3}{'us':>9}{'GB/s':>8}{'peak':>7}")
    for r in rows:
        if r["backend"] == "triton-decode-cfg" and r["mode"] == "eager":
            continue
        tag = "  (cfg)" if r["backend"] == "triton-decode-cfg" else ""
        head = f"{'':<8}{r['B']:>3}{r['L']:>8}  {r['backend']:<18}{r['mode']:<7}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}: {str(r['message'])[:60]}")
            continue
        print(f"{head}{str(r.get('num_splits', '')):>7}{str(r.get('block_n', '')):>5}{str(r.get('block_dv', '')):>5}"
              f"{str(r.get('block_dc', '')):>5}{str(r.get('num_warps', '')):>4}{str(r.get('num_stages', '')):>3}"
              f"{r['median_ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['frac_peak']:>7.1%}{tag}")


def _visited_bytes(pattern, hq, hkv, lk, bn, d, itemsize=2):
    """Bytes of K and V in the kv blocks one step visits (lq = 1; a program takes a whole group)."""
    spec = dec.range_spec(pattern)
    keys = sum(min(bn, lk - blk * bn) for blk, _ in dec.range_blocks(spec, 1, lk, bn))
    _, chunks = dec._group_chunks(hq, hkv, 1, dec.MAX_ROWS)
    return keys * hkv * chunks * 2 * d * itemsize


def loop_speed(pname, pattern, hq, hkv, lk0, steps=100, d=128, visit="auto"):
    """``steps`` eager decode steps, Lk = lk0 + 1 .. lk0 + steps (see the module docstring)."""
    cap = lk0 + steps + 1
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    attention_decode(q, k[:, :, :lk0], v[:, :, :lk0], pattern, scale, visit=visit)  # compile; the first step
    torch.cuda.synchronize()
    bn = default_block_n(d, d, q.device)
    nbytes = sum(_visited_bytes(pattern, hq, hkv, lk0 + 1 + i, bn, d) for i in range(steps))
    misses = dec._launch.cache_info().misses
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = 0.0
    t0 = time.perf_counter()
    start.record()
    for i in range(steps):
        lk = lk0 + 1 + i
        h0 = time.perf_counter()
        attention_decode(q, k[:, :, :lk], v[:, :, :lk], pattern, scale, visit=visit)
        host += time.perf_counter() - h0
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return dict(kind="loop", pattern=pname, B=1, hq=hq, hkv=hkv, lq=1, L0=lk0, steps=steps, d=d, dtype="bfloat16",
                visit=visit, host_us=host / steps * 1e6, wall_us=wall / steps * 1e6,
                stream_us=start.elapsed_time(end) / steps * 1e3, gbps=nbytes / wall / 1e9,
                frac_peak=nbytes / wall / PEAK_BYTES_S, launch_misses=dec._launch.cache_info().misses - misses,
                **env())


def run_loop(args, emit):
    rows = []
    for pname, pattern in PATTERNS.items():
        for hq in [int(x) for x in args.heads.split(",")]:
            for lk in [int(x) for x in args.loop_lengths.split(",")]:
                for visit in ("range", "list"):
                    new = [loop_speed(pname, pattern, hq, args.hkv, lk, args.loop_steps, visit=visit)]
                    emit(new)
                    rows += new
    print(f"\n{'growing Lk':<15}{'Hq':>4}{'L0':>8}  {'visit':<7}{'host us':>9}{'wall us':>9}{'GB/s':>8}{'peak':>7}"
          f"{'launches':>9}")
    for r in rows:
        print(f"{r['pattern']:<15}{r['hq']:>4}{r['L0']:>8}  {r['visit']:<7}{r['host_us']:>9.1f}{r['wall_us']:>9.1f}"
              f"{r['gbps']:>8.0f}{r['frac_peak']:>7.1%}{r['launch_misses']:>9}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/decode.jsonl")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--heads", default="64,32")
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cases", default="gqa,mla", help="gqa: the D=128 GQA/pattern cases; mla: MLA's absorbed "
                    "decode (32 heads over one 576/512-wide latent head); loop: a decode loop with growing Lk "
                    "(host + device time a step, eager), visit ranges vs visit lists")
    ap.add_argument("--loop-lengths", default="32768,131072", help="--cases loop: the key lengths the loops start at")
    ap.add_argument("--loop-steps", type=int, default=100)
    ap.add_argument("--mla-lengths", default="32768,131072")
    ap.add_argument("--mla-batches", default="1,8")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    if not cases <= {"gqa", "mla", "loop"}:
        ap.error(f"--cases: unknown {sorted(cases - {'gqa', 'mla', 'loop'})}; choose from gqa, mla, loop")
    if not torch.cuda.is_available():
        sys.exit("triton_decode_bench.py needs a CUDA GPU")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    heads = [int(x) for x in args.heads.split(",")]
    rows = []
    with torch.no_grad(), open(args.out, "a") as f:
        def emit(new):
            rows.extend(new)
            for r in new:
                f.write(json.dumps(r) + "\n")
            f.flush()

        if "gqa" in cases:
            for pname, pattern in PATTERNS.items():
                for hq in heads:
                    for lk in (4133, 8192 + 37):
                        emit(correctness(pname, pattern, hq, args.hkv, lk))
            fails = [r for r in rows if r["status"] != "pass"]
            print(f"correctness: {len(rows) - len(fails)}/{len(rows)} pass")
            for r in fails:
                print("  FAIL", r)
            for pname, pattern in PATTERNS.items():
                for hq in heads:
                    for lk in lengths:
                        emit(speed(pname, pattern, hq, args.hkv, lk, reps=args.reps, flex=not args.no_flex))
                        print(f"  done {pname} Hq={hq} L={lk}", flush=True)
        if "mla" in cases:
            run_mla(args, emit)
        if "loop" in cases:
            run_loop(args, emit)
    if "gqa" in cases:
        print(f"\n{'pattern':<15}{'Hq':>4}{'L':>8}  {'backend':<15}{'mode':<7}{'splits':>7}{'bn':>5}{'us':>9}{'GB/s':>8}"
              f"{'peak':>7}")
        for r in rows:
            if r["kind"] != "speed" or r["backend"] == "triton-decode-cfg" or r["pattern"] == "mla-full":
                continue
            if r["status"] != "ok":
                print(f"{r['pattern']:<15}{r['hq']:>4}{r['L']:>8}  {r['backend']:<15}{r['mode']:<7} {r['status']}: "
                      f"{r['message'][:60]}")
                continue
            print(f"{r['pattern']:<15}{r['hq']:>4}{r['L']:>8}  {r['backend']:<15}{r['mode']:<7}"
                  f"{str(r.get('num_splits', '')):>7}"
                  f"{str(r.get('block_n', '')):>5}{r['median_ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['frac_peak']:>7.1%}")
        print("\nall (num_splits, block_n) tried, us (graph / eager):")
        cfg = {}
        for r in rows:
            if r.get("backend") == "triton-decode-cfg" and r["status"] == "ok" and r["pattern"] != "mla-full":
                key = (r["pattern"], r["hq"], r["L"], r["num_splits"], r["block_n"], r["default"])
                cfg.setdefault(key, {})[r["mode"]] = r["median_ms"] * 1e3
        for (pn, hq, L, ns, bn, dflt), t in cfg.items():
            print(f"  {pn:<15}{hq:>4}{L:>8}  splits={ns:<4} bn={bn:<4}{'(default) ' if dflt else '          '}"
                  f"{t.get('graph', float('nan')):7.1f} / {t.get('eager', float('nan')):7.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
