"""Where the attention backward's time goes, kernel by kernel (issue 3: windows' fwd+bwd is 1.15-1.29x flex against the
1.3x target, and the backward is ~80 % of it). For each pattern at L tokens (64 / 8 heads, D 128, bf16): the forward
default once, then the backward under torch.profiler for each backward config -- the Triton default and the Gluon
dk / dv kernel (cfg GLUON_BWD) -- with each kernel's device time a call, its share, and its effective TF/s counted on
the visible pairs (dq kernel 3 products a pair: S, dP, dS K; dk / dv kernel 4: S^T, dP^T, P^T dO, dS^T Q; the Gluon
and Triton forms alike). On the GPU machine:
    PYTHONPATH=src python3 benchmarks/attn_bwd_profile.py [--patterns sw1024,sw4096,causal] [--L 16384] [--reps 10]
--smoke: a small float32 run on CPU under TRITON_INTERPRET=1 (the script's own check; no timings worth reading).
--plain: each backward twice (compile, then the call), with no profiler of its own, for Nsight Compute to read the
kernels' counters (`gpu_pending.sh DIR bwd-ncu`); --configs picks configs by name."""
import argparse
import collections
import os
import sys

import torch

import attnzoo as az
from attnzoo.backends.triton import ops, tuning

PATTERNS = {"causal": az.Causal(), "sw1024": az.SlidingWindow(1023), "sw4096": az.SlidingWindow(4095),
            "sinks+sw1024": az.SlidingWindow(1023) | az.Sinks(4)}
# products a visible pair costs in each kernel (2 D flops each); other kernels (the split columns' reduction) get none
PRODUCTS = {"attn_bwd_dq": 3, "attn_bwd_dkdv": 4, "gluon_attn_bwd_dkdv": 4, "gluon_attn_bwd_dq": 3}  # (FUSED_DQ: the Gluon kernel does 5)


def _products(name: str, fused: bool = False) -> int:
    n = next((n for key, n in PRODUCTS.items() if name.startswith(key)), 0)
    return n + 1 if fused and name.startswith("gluon_attn_bwd_dkdv") else n


def profile_bwd(q, k, v, do, out, lse, pattern, scale, cfg, reps: int):
    """{kernel name: device µs per call} of `ops.attention_bwd` over ``reps`` calls (after one warm-up call)."""
    return profile_call(lambda: ops.attention_bwd(do, None, q, k, v, out, lse, pattern, scale, cfg=cfg), q.is_cuda,
                        reps)


def profile_call(run, cuda: bool, reps: int):
    """{kernel name: device µs per call} of ``run()`` over ``reps`` calls (after one warm-up call)."""
    run()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            run()
        if cuda:
            torch.cuda.synchronize()
    times = collections.Counter()
    for e in prof.key_averages():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.key] += e.self_device_time_total / reps
    return dict(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patterns", default="sw1024,sw4096,causal")
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, 128 tokens: the script's own check")
    ap.add_argument("--configs", help="only the configs whose names contain one of these (comma-separated)")
    ap.add_argument("--fwd", action="store_true",
                    help="also the default forward by kernel (TF/s on the visible pairs, 2 products a pair); with "
                         "--plain, the forward twice (--configs none: no backward)")
    ap.add_argument("--plain", action="store_true",
                    help="no profiler: each backward twice, for an outside profiler (ncu) to read")
    args = ap.parse_args()
    for name in args.patterns.split(","):
        if name not in PATTERNS:
            ap.error(f"unknown pattern {name!r}: choose from {sorted(PATTERNS)}")
    dev = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke on CPU under TRITON_INTERPRET=1)")
    L, hq, hkv, d = (128, 4, 2, 32) if args.smoke else (args.L, 64, 8, 128)
    dt = torch.float32 if args.smoke else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q, do = (torch.randn(1, hq, L, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, hkv, L, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
    scale = d ** -0.5
    print(f"# attention backward by kernel: 1 x {hq} / {hkv} heads x {L} tokens, D {d}, {dt}, {dev}; "
          f"µs a call over {args.reps} calls")
    print(f"{'pattern':14s} {'config':22s} {'kernel':40s} {'µs':>9s} {'share':>6s} {'TF/s':>6s}")
    for name in args.patterns.split(","):
        p = PATTERNS[name]
        pairs = hq * p.density(L, L) * L * L
        out, lse = ops.attention_fwd(q, k, v, p, scale)
        if args.fwd and args.plain:  # the forward once more (its first call above), for an outside profiler
            ops.attention_fwd(q, k, v, p, scale)
            if q.is_cuda:
                torch.cuda.synchronize()
            print(f"{name:14s} {'forward':22s} ran twice", flush=True)
        if args.fwd and not args.plain:
            times = profile_call(lambda: ops.attention_fwd(q, k, v, p, scale), q.is_cuda, args.reps)
            for kern, us in sorted(times.items(), key=lambda kv: -kv[1]):
                tf = 2 * 2 * d * pairs / (us * 1e-6) / 1e12 if us else float("nan")
                print(f"{name:14s} {'forward':22s} {kern[:40]:40s} {us:9.1f} {'':6s} {tf:6.0f}", flush=True)
        best = tuning.choose("bwd", d, d, dt, p, q.device) if not args.smoke else \
            dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        base = {key: val for key, val in best.items() if key != "GLUON_BWD"}  # the Triton kernels' tiles
        configs = (("default", best), ("triton", base), ("gluon dk / dv", dict(base, GLUON_BWD=True)),
                   ("gluon fused dq s3", dict(base, GLUON_BWD=dict(FUSED_DQ=True, num_stages=3))),
                   ("gluon rows s2", dict(base, GLUON_BWD=dict(ROWS=True))),
                   ("gluon rows fused s2", dict(base, GLUON_BWD=dict(ROWS=True, FUSED_DQ=True))),
                   ("gluon rows2 s2", dict(base, GLUON_BWD=dict(ROWS=2))),
                   ("gluon rows2 fused s2", dict(base, GLUON_BWD=dict(ROWS=2, FUSED_DQ=True))),
                   ("gluon dq + rows2 s2", dict(base, GLUON_BWD=dict(ROWS=2, GLUON_DQ=True))),
                   # (the default on wide windows since the twenty-first session; delta written by the dq kernel
                   # since the twenty-second, "sep-delta": by its own kernel first, as before)
                   ("gluon dq s3 + rows2 s3", dict(base, GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True,
                                                                        DQ_STAGES=3))),
                   ("gluon dq s3 + rows2 s3 sep-delta", dict(base, GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True,
                                                                                  DQ_STAGES=3, SEP_DELTA=True))),
                   ("gluon dq s3 + triton dkdv", dict(base, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                           TRITON_DKDV=True))),
                   # (the persistent dq kernel, twenty-second session)
                   ("gluon dqp s3 + triton dkdv", dict(base, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                            DQ_PERSIST=True, TRITON_DKDV=True))),
                   ("gluon dqp s3 + rows2 s3", dict(base, GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True,
                                                                         DQ_STAGES=3, DQ_PERSIST=True))),
                   # (twenty-eighth session, not yet run) DQ_PIPE: the dq MMA issued behind the next step's S and dP
                   ("gluon dqp s3 pipe + triton dkdv", dict(base, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                                 DQ_PERSIST=True, DQ_PIPE=True,
                                                                                 TRITON_DKDV=True))),
                   ("gluon dqp s3 pipe + rows2 s3", dict(base, GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True,
                                                                              DQ_STAGES=3, DQ_PERSIST=True,
                                                                              DQ_PIPE=True))),
                   # (twenty-eighth session, not yet run) DQ_PREF: each item's O and lse loaded during the item before
                   ("gluon dqp s3 pref + triton dkdv", dict(base, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                                 DQ_PERSIST=True, DQ_PREF=True,
                                                                                 TRITON_DKDV=True))),
                   ("gluon dqp s3 pipe pref + triton dkdv", dict(base, GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3,
                                                                                      DQ_PERSIST=True, DQ_PIPE=True,
                                                                                      DQ_PREF=True,
                                                                                      TRITON_DKDV=True))),
                   ("gluon dqp s3 pref + rows2 s3", dict(base, GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True,
                                                                              DQ_STAGES=3, DQ_PERSIST=True,
                                                                              DQ_PREF=True))))
        gb = best.get("GLUON_BWD") if isinstance(best.get("GLUON_BWD"), dict) else {}
        if gb.get("T_STATS"):  # (thirty-fifth session) the default's ring of Q / dO tiles: 2 and 4 slots instead of 3,
            # and the default before it (ROWS 2: the query rows as rows, P and dS through shared memory)
            configs += (("t stats s2", dict(base, GLUON_BWD=dict(gb, num_stages=2))),
                        ("t stats s4", dict(base, GLUON_BWD=dict(gb, num_stages=4))),
                        ("rows2 (before)", dict(base, GLUON_BWD={**{key: val for key, val in gb.items()
                                                                   if key != "T_STATS"}, "ROWS": 2})),
                        # (not yet run) TAIL_ORDER: the dk / dv kernel's 1-D grid, the short items' heads fastest
                        ("t stats tail", dict(base, GLUON_BWD=dict(gb, TAIL_ORDER=True))),
                        # (not yet run) and work items of at most 9 query blocks (window 1024's 17-18-block columns
                        # in two: twice the items, so less of a last wave; float32 partials summed after)
                        ("t stats tail cap9", dict(base, GLUON_BWD=dict(gb, TAIL_ORDER=True, SPLIT_CAP=9))))
        keep = args.configs.split(",") if args.configs else None
        for cname, cfg in configs:
            if keep and not any(x in cname for x in keep):
                continue
            if args.plain:
                for _ in range(2):
                    ops.attention_bwd(do, None, q, k, v, out, lse, p, scale, cfg=cfg)
                if q.is_cuda:
                    torch.cuda.synchronize()
                print(f"{name:14s} {cname:22s} ran twice", flush=True)
                continue
            times = profile_bwd(q, k, v, do, out, lse, p, scale, cfg, args.reps)
            total = sum(times.values()) or float("nan")
            for kern, us in sorted(times.items(), key=lambda kv: -kv[1]):
                n = _products(kern, "fused" in cname)
                tf = n * 2 * d * pairs / (us * 1e-6) / 1e12 if n and us else float("nan")
                print(f"{name:14s} {cname:22s} {kern[:40]:40s} {us:9.1f} {us / total:6.1%} {tf:6.0f}")
            print(f"{name:14s} {cname:22s} {'(all kernels)':40s} {total:9.1f}", flush=True)


if __name__ == "__main__":
    main()
