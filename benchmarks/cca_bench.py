"""CCA / CCGQA (attnzoo.layers.cca) against MHA (attnzoo.layers.Attention) on the GPU: prefill (forward),
backward and forward+backward of the whole layer and of its attention core, at 16K tokens, bf16, causal.

    PYTHONPATH=src python benchmarks/cca_bench.py --out DIR [--seq-lens 4096,16384] [--variants mha,cca-c4]
    PYTHONPATH=src python benchmarks/cca_bench.py --smoke        # tiny shapes on the CPU: the machinery only

The paper (Figliolia et al., Zyphra 2025, arXiv:2510.04476) reports that its fused CCA/CCGQA kernel cuts
prefill latency by about 1.7x at 16K tokens against MHA on an H100 and speeds up the backward by about
1.3x. The exact compression of that headline figure could not be read from the sources at hand, so the
grid covers the likely ones: C = 2, 4 and 8 with MHA's head width (fewer latent heads of the same width, as
in the paper's kernels and ZAYA1) and ZAYA1's CCGQA layout (C = 2 on queries, 4 query heads per key/value
head: an 8x smaller KV cache). Our layer is *not* the paper's fused kernel: it runs PyTorch projections and
cuDNN convolutions and calls ``attnzoo.attention`` (``--backend``, default auto) on the latent q, k, v, so
the layer-level ratios include that unfused overhead; the ``core`` rows time ``attnzoo.attention`` alone at
each variant's latent shapes (the part the FLOP reduction acts on).

Variants (``dim`` = --dim, ``H`` = --heads, MHA head width w = dim / H; 2048, 16, 128 by default):

    mha            Attention(dim, H)                             KV cache 2*dim per token
    gqa-g4         Attention(dim, H, H/4)                        GQA baseline, cache / 4
    cca-c2         CCA(dim, H/2, compression=2)                  H/2 heads of w, cache / 2
    cca-c4         CCA(dim, H/4, compression=4)                  H/4 heads of w, cache / 4
    cca-c8         CCA(dim, H/8, compression=8)                  H/8 heads of w, cache / 8
    cca-c4-narrow  CCA(dim, H, compression=4)                    H heads of w/4 (the same FLOPs as cca-c4)
    ccgqa-c2-g4    CCGQA(dim, H/2, H/8, compression=2)           ZAYA1's layout, cache / 8
    ccgqa-c4-g2    CCGQA(dim, H/4, H/8, compression=4)           cache / 8

Directions: ``fwd`` (prefill, under ``torch.no_grad``), ``bwd`` (``autograd.grad`` of a kept graph with
``retain_graph``, gradients of the input and every parameter), ``fwd+bwd``. Timing follows
BENCHMARK_PROTOCOL.md through ``attnzoo.bench.timing.time_fn``: the first call timed alone, warm-up,
CUDA events around each repetition with the L2 cache flushed between them, median and 20th/80th
percentiles; peak memory after ``reset_peak_memory_stats``. torch.compile is OFF everywhere (eager
PyTorch around the attention kernels; recorded as ``compile: false``). A correctness line per variant first
(bf16 layer against its float64 copy at a mid size; information, not a gate). One JSON line per measurement
in DIR/cca_bench.jsonl; a table with the ratios to MHA last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import attnzoo
from attnzoo.bench.timing import time_fn
from attnzoo.layers import Attention
from attnzoo.layers.cca import CCA, CCGQA
from attnzoo.testing import max_err, rel_rmse

VARIANTS = ("mha", "gqa-g4", "cca-c2", "cca-c4", "cca-c8", "cca-c4-narrow", "ccgqa-c2-g4", "ccgqa-c4-g2")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def _div(a: int, b: int, what: str) -> int:
    if b < 1 or a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def build(name: str, dim: int, heads: int, backend: str):
    """The module of a variant; ValueError (recorded as unsupported) when the shape does not divide."""
    if name == "mha":
        return Attention(dim, heads, backend=backend)
    if name == "gqa-g4":
        return Attention(dim, heads, _div(heads, 4, "kv heads"), backend=backend)
    if name.startswith("cca-c"):
        c = int(name[5:].split("-")[0])
        h = heads if name.endswith("-narrow") else _div(heads, c, "latent heads")
        return CCA(dim, h, compression=c, backend=backend)
    if name.startswith("ccgqa-c"):
        c, g = (int(p[1:]) for p in name.split("-")[1:3])
        h = _div(heads, c, "latent query heads")
        return CCGQA(dim, h, _div(h, g, "latent kv heads"), compression=c, backend=backend)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def geometry(m) -> dict:
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    return dict(cls=type(m).__name__, q_heads=hq, kv_heads=hkv, head_dim=d,
                compression=getattr(m, "compression", 1), kv_values_per_token=m.kv_cache_values_per_token(),
                conv_state_values=m.conv_state_values() if hasattr(m, "conv_state_values") else 0,
                params=sum(p.numel() for p in m.parameters()))


def attn_flops(b: int, t: int, hq: int, d: int) -> float:
    """Protocol FLOPs of causal attention (forward): 4 * B * Hq * D * visible pairs, pairs = T(T+1)/2."""
    return 4.0 * b * hq * d * (t * (t + 1) / 2)


def env(device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    info = dict(device=name, torch=torch.__version__, attnzoo=attnzoo.__version__, compile=False,
                python=platform.python_version())
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ----------------------------------------------------------------------------------------------------------
def correctness(name, dim, heads, dtype, device, backend, t=1024):
    """bf16 (or the run's dtype) layer against its float64 copy on the reference backend: max error and
    relative RMSE of the output and of the input gradient; information only."""
    torch.manual_seed(0)
    m64 = build(name, dim, heads, "reference").double().to(device)
    m = build(name, dim, heads, backend).to(device)
    m.load_state_dict({k: v.to(dtype) for k, v in m64.state_dict().items()})
    m = m.to(dtype)
    x64 = torch.randn(1, t, dim, dtype=torch.float64, device=device, requires_grad=True)
    dy = torch.randn(1, t, dim, dtype=torch.float64, device=device)
    y64 = m64(x64)
    (gx64,) = torch.autograd.grad(y64, x64, dy)
    x = x64.detach().to(dtype).requires_grad_()
    y = m(x)
    (gx,) = torch.autograd.grad(y, x, dy.to(dtype))
    return dict(y_max_err=max_err(y, y64), y_rel_rmse=rel_rmse(y, y64), dx_max_err=max_err(gx, gx64),
                dx_rel_rmse=rel_rmse(gx, gx64), nan=bool(torch.isnan(y).any() or torch.isnan(gx).any()))


def layer_fns(m, x, dy):
    leaves = [x] + [p for p in m.parameters()]

    def fwd():
        with torch.no_grad():
            m(x)

    def fwdbwd():
        torch.autograd.grad(m(x), leaves, dy)

    def make_bwd():
        y = m(x)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    return fwd, make_bwd, fwdbwd


def core_fns(m, b, t, dtype, device, backend):
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = torch.randn(b, hq, t, d, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(b, hkv, t, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    do = torch.randn(b, hq, t, d, dtype=dtype, device=device)
    pattern = attnzoo.Causal()

    def run():
        return attnzoo.attention(q, k, v, pattern, backend=backend)

    def fwd():
        with torch.no_grad():
            run()

    def fwdbwd():
        torch.autograd.grad(run(), [q, k, v], do)

    def make_bwd():
        o = run()
        return lambda: torch.autograd.grad(o, [q, k, v], do, retain_graph=True)
    picked = attnzoo.explain(q.detach(), k.detach(), v.detach(), pattern).backend if backend == "auto" else backend
    return (fwd, make_bwd, fwdbwd), picked


def measure(fns, device, warmup, reps, max_time_s):
    fwd, make_bwd, fwdbwd = fns
    out = {}
    for direction in DIRECTIONS:
        try:
            fn = fwd if direction == "fwd" else fwdbwd if direction == "fwd+bwd" else make_bwd()
        except Exception as e:  # noqa: BLE001 - the forward that builds the graph failed: record it
            from attnzoo.bench.timing import classify_exception
            status, msg = classify_exception(e)
            out[direction] = dict(status=status, message=msg, median_ms=None, p20_ms=None, p80_ms=None,
                                  compile_ms=None, peak_mem_bytes=None, reps=0)
            continue
        r = time_fn(fn, device=device, warmup=warmup, reps=reps, max_time_s=max_time_s)
        r.pop("times_ms", None)
        out[direction] = r
        fn = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="benchmarks/results", help="folder for cca_bench.jsonl (appended)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16, help="MHA heads (head width dim / heads)")
    ap.add_argument("--tokens", type=int, default=16384, help="B * T per measurement")
    ap.add_argument("--seq-lens", default="16384", help="comma-separated T; B = tokens // T")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--levels", default="layer,core", help="layer (the whole module), core (attention alone)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backend", default="auto", help="attnzoo.attention backend for every variant")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=5.0, help="seconds of timed repetitions per case (cap)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness lines")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (dim 128, 8 heads, T 64, B 2), float32, 2 reps: checks the machinery on a CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dim, args.heads, args.tokens, args.seq_lens = 128, 8, 128, "64"
        args.dtype, args.reps, args.warmup, args.max_time = "float32", 2, 1, 1.0
        args.device = args.device or "cpu"
    args.device = torch.device(args.device or "cuda")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("cca_bench.py needs a CUDA GPU (or --smoke / --device cpu for a dry run)")
    dtype = getattr(torch, args.dtype)
    device = args.device
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    levels = [v.strip() for v in args.levels.split(",") if v.strip()]
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cca_bench.jsonl")
    info = env(device)
    print(f"cca_bench: {info['device']}, torch {info['torch']}, {args.dtype}, dim {args.dim}, {args.heads} MHA "
          f"heads, {args.tokens} tokens, causal; torch.compile off; attention backend {args.backend!r}")
    rows = []
    with open(path, "a") as f:
        def emit(r):
            rows.append(r)
            f.write(json.dumps(r, default=str) + "\n")
            f.flush()

        if not args.no_check:
            for name in variants:
                base = dict(kind="correctness", variant=name, dim=args.dim, mha_heads=args.heads, dtype=args.dtype,
                            backend=args.backend, T=1024 if not args.smoke else 64, **info)
                try:
                    res = correctness(name, args.dim, args.heads, dtype, device, args.backend, t=base["T"])
                    emit(dict(base, status="info", **res))
                    print(f"  check {name:<14} y rel RMSE {res['y_rel_rmse']:.2e}  dx rel RMSE "
                          f"{res['dx_rel_rmse']:.2e}{'  NaN!' if res['nan'] else ''}")
                except ValueError as e:
                    emit(dict(base, status="unsupported", message=str(e)))
                except Exception as e:  # noqa: BLE001
                    emit(dict(base, status="error", message=f"{type(e).__name__}: {e}"[:1000]))

        for t in seq_lens:
            b = max(1, args.tokens // t)
            for name in variants:
                base = dict(kind="speed", variant=name, dim=args.dim, mha_heads=args.heads, B=b, T=t, tokens=b * t,
                            dtype=args.dtype, causal=True, backend=args.backend, **info)
                try:
                    torch.manual_seed(0)
                    m = build(name, args.dim, args.heads, args.backend).to(device=device, dtype=dtype)
                except ValueError as e:
                    for level in levels:
                        for direction in DIRECTIONS:
                            emit(dict(base, level=level, direction=direction, status="unsupported", message=str(e)))
                    continue
                geo = geometry(m)
                flops = attn_flops(b, t, geo["q_heads"], geo["head_dim"])
                for level in levels:
                    t0 = time.time()
                    picked = None
                    if level == "layer":
                        x = torch.randn(b, t, args.dim, dtype=dtype, device=device, requires_grad=True)
                        dy = torch.randn(b, t, args.dim, dtype=dtype, device=device)
                        fns = layer_fns(m, x, dy)
                    else:
                        fns, picked = core_fns(m, b, t, dtype, device, args.backend)
                    res = measure(fns, device, args.warmup, args.reps, args.max_time)
                    for direction, r in res.items():
                        factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[direction]
                        ok = r["status"] == "ok"
                        emit(dict(base, level=level, direction=direction, **geo, attn_backend=picked,
                                  attn_flops=flops * factor,
                                  attn_tflops=flops * factor / (r["median_ms"] * 1e-3) / 1e12 if ok else None, **r))
                    fns = None
                    print(f"  T={t:<6} {name:<14} {level:<5} " + "  ".join(
                        f"{d} {r['median_ms']:.3f} ms" if r["status"] == "ok" else f"{d} {r['status']}"
                        for d, r in res.items()) + f"   ({time.time() - t0:.0f} s)")
                m = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print_table(rows)
    print(f"wrote {len(rows)} records to {path}")


def print_table(rows):
    """Median times and speedups against MHA (same T, level, direction)."""
    speed = [r for r in rows if r.get("kind") == "speed"]
    if not speed:
        return
    ms = {(r["T"], r["level"], r["variant"], r["direction"]): r["median_ms"] for r in speed if r["status"] == "ok"}
    meta = {(r["T"], r["variant"]): r for r in speed if "kv_values_per_token" in r}
    print("\nmedian ms (speedup = MHA time / variant time); kv = KV-cache values per token vs MHA; "
          "torch.compile off")
    head = f"{'T':>6} {'level':<5} {'variant':<14} {'heads':>9} {'kv':>5}" + "".join(
        f" {d + ' ms':>11} {'x':>5}" for d in DIRECTIONS)
    print(head)
    print("-" * len(head))
    for t, level in sorted({(r["T"], r["level"]) for r in speed}):
        mha_kv = meta.get((t, "mha"), {}).get("kv_values_per_token")
        for name in [v for v in VARIANTS if any(r["variant"] == v and r["T"] == t for r in speed)]:
            m = meta.get((t, name))
            heads = f"{m['q_heads']}/{m['kv_heads']}x{m['head_dim']}" if m else "-"
            kv = f"{m['kv_values_per_token'] / mha_kv:.3g}" if m and mha_kv else "-"
            line = f"{t:>6} {level:<5} {name:<14} {heads:>9} {kv:>5}"
            for d in DIRECTIONS:
                v, base = ms.get((t, level, name, d)), ms.get((t, level, "mha", d))
                line += f" {v:>11.3f}" if v is not None else f" {'-':>11}"
                line += f" {base / v:>5.2f}" if v and base else f" {'-':>5}"
            print(line)


if __name__ == "__main__":
    main()
