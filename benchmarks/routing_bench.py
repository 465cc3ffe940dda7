"""Routed sparse attention vs dense causal SDPA, forward, routing included (issue 7's speed target).

    python benchmarks/routing_bench.py --out benchmarks/results/routing.jsonl          # H100: 32K and 128K
    python benchmarks/routing_bench.py --smoke --out /tmp/routing_smoke.jsonl          # CPU, tiny, seconds

Shape: the long-context grid (B=1, 64 query / 8 KV heads, head_dim 128, bf16). Each router keeps about
``--density`` (default 0.1, i.e. 90 % block sparsity) of the causal blocks: ``top_k`` is solved from the
block grid so that the kept blocks (sinks + local + top-k) are that share of the blocks at or below the
diagonal. Timed, each with `attnzoo.bench.timing.time_fn` (CUDA events, L2 flush, median and p20/p80):

- ``dense``: causal attention through torch SDPA (``backend="sdpa"``; cuDNN/flash) -- the baseline;
- ``route``: ``router(q, k)``, the block mask alone (on CUDA its top-k selection is one fused Triton kernel,
  `routing/_triton_select.py`); ``route_torch_select``: the same with the PyTorch selection path;
- ``layout``: the block layout of the routed pattern (forward only) for the block sizes of the Triton
  forward kernel, as the backend builds it: one fused Triton kernel (`backends/triton/routed_layout.py`);
  ``layout_torch``: the same lists by the PyTorch closed form (`RoutedBlocks.layouts`), what the backend ran
  before 2026-12-03, for comparison (Triton backend only);
- ``attn``: the sparse attention (``backend="triton"``) on the routed call's pattern, built beforehand. A
  routed pattern (`RoutedBlocks`) is per call: no backend caches its layout, so ``attn`` includes ``layout``,
  as in real use;
- ``total``: ``attnzoo.attention(q, k, v, pattern=router, backend="triton")`` end to end: routing + folding
  the batch and wrapping the mask (no copy, no host sync) + the layout + the kernel. Nothing is cached per
  call, so no cache needs clearing between calls (until the routed fast path, this cleared the Triton
  layout caches, and the mask went to the host and into a `BlockSparse`).

Reported (one JSON line per measurement, then a table): the exact visible pairs of the routed pattern and
the ideal speedup (dense causal pairs / routed pairs), speedups of ``attn`` and ``total`` over ``dense``
and their fraction of ideal, the routing share of ``total``, and ``route / attn`` (issue 7 asks for at most
10 % at 64K) -- BENCHMARK_PROTOCOL.md's definitions. ``build = total - route - attn`` is the overhead of
turning the mask into a pattern (the layout is inside ``attn``); ``layout / attn`` is the metadata's share of
the sparse attention (ARCHITECTURE.md's rule: at most 5 %).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import attnzoo as az
from attnzoo.bench.speed import environment
from attnzoo.bench.timing import time_fn

ROUTERS = ("topk", "topk-maxmin", "longheads", "landmark")


def choose_top_k(nb: int, density: float, sinks: int = 1, local: int = 1) -> int:
    """The top_k (blocks beyond the forced ones) whose kept blocks are closest to ``density`` of the causal
    block grid of ``nb`` x ``nb`` blocks (forced: the first ``sinks`` and ``local`` diagonal blocks)."""
    r = torch.arange(nb)
    forced = torch.minimum(r + 1, torch.clamp(r + 1, max=local) + torch.clamp(r + 1 - local, min=0, max=sinks))
    allowed = nb * (nb + 1) // 2
    best, best_err = 1, float("inf")
    for k in range(1, nb + 1):
        kept = int(torch.minimum(r + 1, forced + k).sum())
        err = abs(kept / allowed - density)
        if err < best_err:
            best, best_err = k, err
        if kept / allowed > density:
            break
    return best


def make_router(name: str, block: int, top_k: int):
    if name == "topk":
        return az.routing.TopKBlocks(block, top_k=top_k)
    if name == "topk-maxmin":
        return az.routing.TopKBlocks(block, top_k=top_k, pooling="maxmin")
    if name == "longheads":
        return az.routing.LongHeads(block, top_k=top_k)
    if name == "landmark":
        return az.routing.Landmark(block, top_k=top_k)
    raise ValueError(f"--routers: unknown router {name!r}; choose from {', '.join(ROUTERS)}")


def visible_pairs(mask: torch.Tensor, length: int, bs: int) -> int:
    """Exact visible (query, key) pairs of ``mask`` (B, H, nb, nb) intersected with token causality
    (self-attention of ``length`` tokens), summed over batch and heads."""
    nb = mask.shape[-1]
    size = torch.clamp(length - torch.arange(nb, device=mask.device) * bs, max=bs)       # tokens per block
    r, c = torch.arange(nb, device=mask.device)[:, None], torch.arange(nb, device=mask.device)[None, :]
    pairs = torch.where(c < r, size[:, None] * size[None, :], torch.where(c == r, size * (size + 1) // 2, 0))
    return int((mask.to(torch.int64) * pairs.to(torch.int64)).sum())


def layout_fn(call, args, device, dtype):
    """The forward layout of a routed call for the Triton forward kernel's block sizes: (the backend's fused
    Triton layout kernel, the PyTorch closed form `RoutedBlocks.layouts`), or None when the sparse backend
    is not Triton (or the pattern is not a `RoutedBlocks`)."""
    if args.backend != "triton" or not isinstance(call.pattern, az.RoutedBlocks):
        return None
    from attnzoo.backends.triton.ops import config

    from attnzoo.backends.triton.ops import _routed_layouts

    cfg = config(args.d, args.d, device, call.pattern, "fwd", dtype)
    lq, lk, h = call.q.shape[2], call.k.shape[2], call.q.shape[1]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    fused = lambda: _routed_layouts(call.pattern, lq, lk, bm, bn, h, device, transposed=False)  # noqa: E731
    closed = lambda: call.pattern.layouts(lq, lk, bm, bn, device=device, num_heads=h,  # noqa: E731
                                          transposed=False)
    return fused, closed


def profile_route(router, q, k, label: str, calls: int = 3) -> None:
    """Print the kernels of ``calls`` routing calls by their own device time (torch.profiler): where the
    route time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            router(q, k)
        if q.is_cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if q.is_cuda else "self_cpu_time_total"
    print(f"-- profile of {calls} routing calls, {label}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


def record(out, **kw):
    line = json.dumps(kw, default=str)
    if out is not None:
        out.write(line + "\n")
        out.flush()
    return kw


def _ms(t):
    return t["median_ms"] if t["status"] == "ok" else None


def run(args) -> list:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    sparse_backend = args.backend
    rows = []
    out = open(args.out, "a") if args.out else None
    try:
        for L in args.lengths:
            gen = torch.Generator(device=device).manual_seed(L)
            mk = lambda h, d: torch.randn(1, h, L, d, device=device, dtype=dtype, generator=gen)  # noqa: E731
            try:
                q, k, v = mk(args.hq, args.d), mk(args.hkv, args.d), mk(args.hkv, args.d)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 128K
                rows.append(record(out, L=L, kind="inputs", status="error", message=repr(exc)[:500], **env))
                continue
            nb = -(-L // args.block)
            top_k = args.top_k or choose_top_k(nb, args.density)
            base = dict(L=L, B=1, Hq=args.hq, Hkv=args.hkv, D=args.d, dtype=args.dtype, block=args.block,
                        target_density=args.density, top_k=top_k, backend=sparse_backend, **env)
            timing = dict(device=device, warmup=args.warmup, reps=args.reps, max_time_s=args.max_time_s)
            dense = time_fn(lambda: az.attention(q, k, v, pattern=az.Causal(), backend="sdpa"), **timing)
            dense_pairs = L * (L + 1) // 2 * args.hq
            flops = lambda pairs: 4 * args.d * pairs  # noqa: E731 - protocol: 4 * B * Hq * D * visible pairs
            rows.append(record(out, kind="dense", name="sdpa-causal", status=dense["status"],
                               message=dense["message"], median_ms=_ms(dense), p20_ms=dense["p20_ms"],
                               p80_ms=dense["p80_ms"], visible_pairs=dense_pairs,
                               tflops=flops(dense_pairs) / _ms(dense) / 1e9 if _ms(dense) else None, **base))
            bench_routers(args, q, k, v, L, base, timing, dense, dense_pairs, flops, out, rows)
            q = k = v = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if out is not None:
            out.close()
    return rows


def bench_routers(args, q, k, v, L, base, timing, dense, dense_pairs, flops, out, rows):
    """Every router at one length (a function, so the routed call's tensors are freed on return)."""
    sparse_backend, top_k = args.backend, base["top_k"]
    for name in args.routers:
        router = make_router(name, args.block, top_k)
        try:
            mask = router(q, k)
            call = router.plan(q, k, v, mask)
        except Exception as exc:  # noqa: BLE001
            rows.append(record(out, kind="routed", name=name, status="error", message=repr(exc)[:500],
                               **base))
            continue
        pairs = visible_pairs(mask, L, args.block)
        ideal = dense_pairs / pairs
        route = time_fn(lambda: router(q, k), **timing)
        if args.profile:
            profile_route(router, q, k, f"{name} at L={L}")
        from attnzoo.routing import base as rbase
        rbase.FUSED_SELECT = False  # the PyTorch top-k path, for comparison (what ran before 2026-12-03)
        try:
            route_t = time_fn(lambda: router(q, k), **timing)
            select_match = bool(torch.equal(router(q, k), mask))  # same blocks as the fused selection
        finally:
            rbase.FUSED_SELECT = True
        rbase.TF32_SCORES = False  # float32 block scores without the tensor cores (what ran before 2026-12-04)
        try:
            route_f = time_fn(lambda: router(q, k), **timing)
            m32 = router(q, k)
            agree = float((m32 & mask).sum() / m32.sum().clamp(min=1))  # share of its blocks TF32 also picks
            m32 = None
        finally:
            rbase.TF32_SCORES = True
        lay_fs = layout_fn(call, args, q.device, q.dtype)
        lay, lay_t = (time_fn(f, **timing) for f in lay_fs) if lay_fs is not None else (None, None)
        match = None
        if lay_fs is not None:  # the fused kernel's lists against the closed form's, at this size
            a, b = lay_fs[0]()[0], lay_fs[1]()[0]
            match = bool(torch.equal(a.partial_blocks(), b.partial_blocks())
                         and torch.equal(a.full_blocks(), b.full_blocks()))
            a = b = None
        attn = time_fn(lambda: az.attention(call.q, call.k, call.v, pattern=call.pattern,
                                            backend=sparse_backend), **timing)
        total = time_fn(lambda: az.attention(q, k, v, pattern=router, backend=sparse_backend), **timing)
        d_ms, r_ms, a_ms, t_ms = _ms(dense), _ms(route), _ms(attn), _ms(total)
        l_ms = _ms(lay) if lay is not None else None
        lt_ms = _ms(lay_t) if lay_t is not None else None
        ok = all(x is not None for x in (d_ms, r_ms, a_ms, t_ms))
        status = "ok" if ok else next(t["status"] for t in (dense, route, attn, total) if t["status"] != "ok")
        if match is False:
            status = "FAIL: fused layout differs from RoutedBlocks.layouts"
        if not select_match:
            status = "FAIL: fused top-k selection differs from the PyTorch path"
        message = "; ".join(f"{n}: {t['message']}" for n, t in
                            (("dense", dense), ("route", route), ("attn", attn), ("total", total))
                            if t["message"])
        rows.append(record(
            out, kind="routed", name=name, router=repr(router), status=status, message=message,
            visible_pairs=pairs, density_vs_causal=pairs / dense_pairs,
            block_density=float(mask.float().mean()), ideal_speedup=ideal,
            dense_ms=d_ms, route_ms=r_ms, attn_ms=a_ms, total_ms=t_ms, layout_ms=l_ms,
            layout_over_attn=l_ms / a_ms if (l_ms is not None and a_ms) else None, layout_torch_ms=lt_ms,
            layout_match=match, route_torch_select_ms=_ms(route_t), select_match=select_match,
            route_fp32_scores_ms=_ms(route_f), tf32_block_agreement=agree,
            layout_torch_over_attn=lt_ms / a_ms if (lt_ms is not None and a_ms) else None,
            build_ms=(t_ms - r_ms - a_ms) if ok else None,
            route_p20_ms=route["p20_ms"], route_p80_ms=route["p80_ms"], attn_p20_ms=attn["p20_ms"],
            attn_p80_ms=attn["p80_ms"], total_p20_ms=total["p20_ms"], total_p80_ms=total["p80_ms"],
            attn_compile_ms=attn["compile_ms"], peak_mem_bytes=total["peak_mem_bytes"],
            speedup_attn=d_ms / a_ms if ok else None, speedup_total=d_ms / t_ms if ok else None,
            fraction_of_ideal_attn=d_ms / a_ms / ideal if ok else None,
            fraction_of_ideal_total=d_ms / t_ms / ideal if ok else None,
            routing_share=r_ms / t_ms if ok else None, route_over_attn=r_ms / a_ms if ok else None,
            attn_tflops=flops(pairs) / a_ms / 1e9 if ok else None, **base))


def table(rows) -> str:
    head = (f"{'L':>7} {'router':<12} {'top_k':>5} {'dens':>6} {'ideal':>6} {'dense':>8} {'route':>8} {'attn':>8} "
            f"{'total':>8} {'x attn':>7} {'x total':>7} {'f.ideal':>7} {'r.share':>7} {'r/attn':>6} {'l/attn':>6} {'lt/at':>6} "
            f"{'r fp32':>7} {'agree':>6}  status")
    lines = [head, "-" * len(head)]
    f = lambda x, w, p=2: f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    for r in rows:
        if r.get("kind") != "routed":
            continue
        lines.append(f"{r['L']:>7} {r['name']:<12} {r['top_k']:>5} {f(r.get('density_vs_causal'), 6, 3)} "
                     f"{f(r.get('ideal_speedup'), 6, 1)} {f(r.get('dense_ms'), 8)} {f(r.get('route_ms'), 8)} "
                     f"{f(r.get('attn_ms'), 8)} {f(r.get('total_ms'), 8)} {f(r.get('speedup_attn'), 7)} "
                     f"{f(r.get('speedup_total'), 7)} {f(r.get('fraction_of_ideal_total'), 7)} "
                     f"{f(r.get('routing_share'), 7)} {f(r.get('route_over_attn'), 6)} {f(r.get('layout_over_attn'), 6)} "
                     f"{f(r.get('layout_torch_over_attn'), 6)} {f(r.get('route_fp32_scores_ms'), 7)} "
                     f"{f(r.get('tf32_block_agreement'), 6, 3)}  {r['status']}")
    lines.append("times in ms (median); x = speedup over dense causal SDPA; f.ideal = fraction of ideal (total); "
                 "r.share = routing / total; l/attn = layout (fused Triton kernel, what the backend runs) / attn; "
                 "lt/at = the PyTorch closed-form layout / attn; r fp32 = route with plain float32 block scores (no "
                 "TF32); agree = share of those blocks the TF32 scores also pick")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated sequence lengths (default 32768,131072; --smoke: 256)")
    p.add_argument("--routers", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated, from {', '.join(ROUTERS)} (default: topk,topk-maxmin)")
    p.add_argument("--density", type=float, default=0.1, help="share of the causal blocks kept (default 0.1)")
    p.add_argument("--top-k", type=int, default=None, help="override the top_k solved from --density")
    p.add_argument("--block", type=int, default=None, help="router block size (default 64; --smoke: 16)")
    p.add_argument("--hq", type=int, default=None, help="query heads (default 64)")
    p.add_argument("--hkv", type=int, default=None, help="key/value heads (default 8)")
    p.add_argument("--d", type=int, default=None, help="head dim (default 128)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backend", default=None, help="sparse attention backend (default triton; --smoke on CPU: "
                   "triton under TRITON_INTERPRET=1, else reference)")
    p.add_argument("--device", default=None, help="default cuda (--smoke: cpu)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-time-s", type=float, default=20.0, help="cap on the timed repetitions per measurement")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that exercises every code path")
    p.add_argument("--profile", action="store_true", help="print a kernel profile of the routing calls")
    a = p.parse_args(argv)
    smoke = a.smoke
    a.device = a.device or ("cpu" if smoke else "cuda")
    a.lengths = a.lengths or ([256] if smoke else [32768, 131072])
    a.routers = a.routers or (list(ROUTERS) if smoke else ["topk", "topk-maxmin"])
    for r in a.routers:
        if r not in ROUTERS:
            p.error(f"--routers: unknown router {r!r}; choose from {', '.join(ROUTERS)}")
    a.block = a.block or (16 if smoke else 64)
    a.hq, a.hkv, a.d = a.hq or (4 if smoke else 64), a.hkv or (2 if smoke else 8), a.d or (32 if smoke else 128)
    a.dtype = a.dtype or ("float32" if smoke else "bfloat16")
    if a.backend is None:
        a.backend = "triton" if a.device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1" \
            else "reference"
    if smoke:
        a.reps, a.warmup, a.max_time_s = min(a.reps, 3), min(a.warmup, 1), min(a.max_time_s, 5.0)
    if not 0 < a.density <= 1:
        p.error(f"--density must be in (0, 1], got {a.density}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --smoke for a CPU run)")
    return a


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    rows = run(args)
    print(table(rows))
    print(f"({time.perf_counter() - t0:.1f} s{'; records appended to ' + args.out if args.out else ''})")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
