"""Why a kernel's rate per visible pair changes with the sequence length (issue 3, twenty-eighth session): window 4096's
forward ran at 667 TF/s at 16K tokens and 601 at 64K (attn_bwd_profile.py --fwd, H100), window 1024's backward 4 %
slower. Same total work at different lengths (B x L = 16K x 1, 16K x 4, 32K x 2, 64K x 1): if B = 4 at 16K is as slow
as 64K, the length is not the cause (the GPU's clock under a longer load is); if it is as fast as B = 1 at 16K, it is.
Each call timed alone by CUDA events over a steady stream of calls (``--seconds`` each), so that the first and last
calls' times show a clock that drops under load. On the GPU machine:
    PYTHONPATH=src python3 benchmarks/len_scale.py [--patterns sw4096] [--shapes 1x16384,4x16384,1x65536] [--bwd]
        [--configs default,rows2 fused] [--rounds 3]
Each row also gives the mean SM clock and board power over its timed calls (`attnzoo.bench.gpu_state`, through
NVML; nan without it), and the energy of a call (mean power x median time): under a long load the H100 holds its
700 W cap by lowering the clock (first measured here, twenty-eighth session), so a kernel's sustained speed follows
its energy per call. (The session's c2, c3 and c7 runs took the power from NVML's one-second average instead.)
--smoke: CPU, float32, tiny shapes under TRITON_INTERPRET=1 (the script's own check)."""
import argparse
import statistics
import sys

import torch

import attnzoo as az
from attnzoo.backends.triton import ops, tuning
from attnzoo.bench.timing import time_fn

PATTERNS = {"sw1024": az.SlidingWindow(1023), "sw4096": az.SlidingWindow(4095),
            "sinks+sw1024": az.SlidingWindow(1023) | az.Sinks(4), "causal": az.Causal()}


# the wide / dense classes' backward default from the twenty-ninth to the thirty-fifth session ("wide pp"), and its
# transposed dk / dv form
_WIDE_PP = dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_PIPE=True, DQ_PREF=True)
_WIDE_T = {key: val for key, val in _WIDE_PP.items() if key != "ROWS"}

# backward configs by name (--configs): GLUON_BWD / ATOMIC_DQ on the Triton kernels' tiles of the default
BWD_CONFIGS = {"default": None, "triton": {}, "triton atomic": dict(ATOMIC_DQ=True),
               "rows2 fused": dict(GLUON_BWD=dict(ROWS=2, FUSED_DQ=True)),
               "rows1 fused": dict(GLUON_BWD=dict(ROWS=True, FUSED_DQ=True)),
               "t fused s3": dict(GLUON_BWD=dict(FUSED_DQ=True, num_stages=3)),
               # the wide / dense classes' default until the twenty-ninth session (Gluon dk / dv ROWS 2 with the
               # persistent Gluon dq kernel), and the local class's (the persistent Gluon dq kernel with the Triton
               # dk / dv kernel); the defaults since then are "wide pp" / "local pp" (DQ_PIPE and DQ_PREF)
               "wide default": dict(GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True)),
               "local default": dict(GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, TRITON_DKDV=True)),
               # (twenty-eighth session) both with DQ_PIPE: the dq MMA issued behind the next step's S and dP
               "wide pipe": dict(GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True,
                                                DQ_PIPE=True)),
               "local pipe": dict(GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, TRITON_DKDV=True,
                                                 DQ_PIPE=True)),
               # (twenty-eighth session) DQ_PREF: each item's O and lse loaded during the item before
               "wide pref": dict(GLUON_BWD=dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True,
                                                DQ_PREF=True)),
               "local pref": dict(GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, TRITON_DKDV=True,
                                                 DQ_PREF=True)),
               "wide pp": dict(GLUON_BWD=_WIDE_PP),
               "local pp": dict(GLUON_BWD=dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, TRITON_DKDV=True,
                                               DQ_PIPE=True, DQ_PREF=True)),
               # (thirty-fourth session) T_STATS: the transposed dk / dv form, lse / delta by TMA with Q / dO (the
               # default on every class since the thirty-fifth; S_AHEAD and DQ_BN 128, measured with it, removed)
               "wide tstats": dict(GLUON_BWD=dict(_WIDE_T, T_STATS=True)),
               # (thirty-fifth session, not yet run) TAIL_ORDER: the dk / dv kernel's 1-D grid, whose last items (the
               # shortest) run with the (batch, KV head)s fastest, so the last wave is not one KV head's short items
               "tstats tail": dict(GLUON_BWD=dict(_WIDE_T, T_STATS=True, TAIL_ORDER=True)),
               # (not yet run) and SPLIT_CAP 9: window 1024's columns split in two (more, shorter work items)
               "tstats tail cap9": dict(GLUON_BWD=dict(_WIDE_T, T_STATS=True, TAIL_ORDER=True, SPLIT_CAP=9))}


# forward configs by name (--configs without --bwd): changes to the default's Gluon config (GLUON_CFG)
FWD_CONFIGS = {"default": None,
               # (thirtieth session) XPIPE: each item's first scores with the previous item's last P V (the narrow
               # sink tile off: XPIPE does not take it)
               "xpipe": dict(XPIPE=True, NARROW=0),
               # XPIPE with the narrow sink tile at each item's end (XPIPE_NARROW)
               "xpipe narrow": dict(XPIPE=True, XPIPE_NARROW=True),
               # (XPIPE_NARROW="fold": the sinks in an unseen slot of a partial block's tile, no narrow step)
               "xpipe fold": dict(XPIPE=True, XPIPE_NARROW="fold")}


def shapes(text: str):
    out = []
    for part in text.split(","):
        b, _, L = part.partition("x")
        out.append((int(b), int(L)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patterns", default="sw4096")
    ap.add_argument("--shapes", default="1x16384,4x16384,2x32768,1x65536,1x16384")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--bwd", action="store_true", help="time the backward (default config) instead of the forward")
    ap.add_argument("--configs", default="default",
                    help=f"configs, comma-separated: backward (--bwd) from {sorted(BWD_CONFIGS)}, forward from "
                         f"{sorted(FWD_CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the configs (round-robin)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    for name in args.patterns.split(","):
        if name not in PATTERNS:
            ap.error(f"unknown pattern {name!r}: choose from {sorted(PATTERNS)}")
    cnames = args.configs.split(",")
    table = BWD_CONFIGS if args.bwd else FWD_CONFIGS
    for c in cnames:
        if c not in table:
            ap.error(f"unknown {'backward' if args.bwd else 'forward'} config {c!r}: choose from {sorted(table)}")
    dev = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke on CPU under TRITON_INTERPRET=1)")
    hq, hkv, d = (4, 2, 32) if args.smoke else (64, 8, 128)
    dt = torch.float32 if args.smoke else torch.bfloat16
    cuda = dev == "cuda"
    what = "backward" if args.bwd else "forward"
    print(f"# {what} per call, {hq} / {hkv} heads, D {d}, {dt}; TF/s on the visible pairs "
          f"({'7' if args.bwd else '2'} products a pair)")
    print(f"{'pattern':13s} {'B x L':>10s} {'config':14s} {'calls':>6s} {'median ms':>10s} {'first 5':>9s} "
          f"{'last 5':>9s} {'TF/s':>6s} {'MHz':>6s} {'W':>5s} {'J/call':>7s}")
    for name in args.patterns.split(","):
        p = PATTERNS[name]
        for b, L in shapes(args.shapes):
            if args.smoke:
                L = min(L // 128, 256)
            gen = torch.Generator(device=dev).manual_seed(0)
            q, do = (torch.randn(b, hq, L, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
            k, v = (torch.randn(b, hkv, L, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
            scale = d ** -0.5
            out, lse = ops.attention_fwd(q, k, v, p, scale)
            best = tuning.choose("bwd", d, d, dt, p, q.device) if not args.smoke else \
                dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
            base = {key: val for key, val in best.items() if key != "GLUON_BWD"}
            fbest = tuning.choose("fwd", d, d, dt, p, q.device)
            pairs = b * hq * p.density(L, L) * L * L
            for rnd in range(args.rounds):
                # (each round starts one config later: none always runs first, on a card that is cooler or warmer)
                for cname in cnames[rnd % len(cnames):] + cnames[:rnd % len(cnames)]:
                    extra = table[cname]
                    if args.bwd:
                        cfg = best if extra is None else dict(base, **extra)
                        fn = lambda: ops.attention_bwd(do, None, q, k, v, out, lse, p, scale, cfg=cfg)  # noqa: E731
                    else:
                        fcfg = fbest if extra is None or "GLUON_CFG" not in fbest else \
                            dict(fbest, GLUON_CFG=dict(fbest["GLUON_CFG"], **extra))
                        fn = lambda: ops.attention_fwd(q, k, v, p, scale, cfg=fcfg)  # noqa: E731
                    # (a stream of calls lasting about --seconds, each timed by CUDA events, no L2 flush between
                    # them; the clock and power over it from `gpu_state.GpuMonitor`, None without NVML)
                    r = time_fn(fn, device=dev, warmup=1, reps=2000, max_time_s=args.seconds, flush_l2=False)
                    if r["status"] != "ok":
                        sys.exit(f"{name} {b}x{L} {cname}: {r['status']}: {r['message']}")
                    ts = r["times_ms"]
                    mhz, watts = (float("nan") if r[f] is None else r[f] for f in ("sm_clock_mhz", "power_w"))
                    med = statistics.median(ts)
                    tf = (7 if args.bwd else 2) * 2 * d * pairs / (med * 1e-3) / 1e12
                    print(f"{name:13s} {f'{b}x{L}':>10s} {cname:14s} {len(ts):6d} {med:10.3f} "
                          f"{statistics.mean(ts[:5]):9.3f} {statistics.mean(ts[-5:]):9.3f} {tf:6.0f} {mhz:6.0f} "
                          f"{watts:5.0f} {watts * med * 1e-3:7.3f}", flush=True)
            del q, k, v, do, out, lse

if __name__ == "__main__":
    main()
