"""Where the persistent Gluon forward's NARROW goes wrong (nineteenth session: the present form no longer faults
under CUDA_LAUNCH_BLOCKING=1 but gives wrong outputs, rel RMSE 0.5-0.6, on windows + sinks at 2048 tokens where
query blocks with and without the narrow tile mix; sinks alone, the ws form and 16K sinks + window 1024 are right).
Each variant in its own process (CUDA_LAUNCH_BLOCKING=1): the wrong query blocks mapped to the persistent grid's
work items (program, place in its sequence, Q buffer, narrow or not, the item before), so the pattern of failures
shows which buffer or phase is at fault:
    python3 benchmarks/gluon_narrow_map.py [variant ...]"""
import os
import subprocess
import sys

# name: (pattern, cfg changes)
VARIANTS = {
    "nm1": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=1)),
    "nm2": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=2)),
    "n0": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW=0)),
    "nm2 sw129+sinks16": ("az.SlidingWindow(129) | az.Sinks(16)", dict(NARROW_MODE=2)),
    "nm1 sw129+sinks16": ("az.SlidingWindow(129) | az.Sinks(16)", dict(NARROW_MODE=1)),
    "nm2 prog1": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=2, PROGRAMS=1)),
    "ws": ("az.SlidingWindow(300) | az.Sinks(4)", dict(GLUON="ws", NARROW_MODE=0)),
    # (call 2 of the nineteenth session: the first form below -- NARROW_MODE 0 -- wrong on the unflagged items)
    "base": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=0)),
    "q1": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=0, QBUF=1)),
    "prog1": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=0, PROGRAMS=1)),
    "pingpong": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=0, PINGPONG=True)),
    "o0": ("az.SlidingWindow(300) | az.Sinks(4)", dict(NARROW_MODE=0, ORDER=0)),
}
CHILD = r'''
import torch, attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton import ops
ops.GLUON_NARROW = True
torch.manual_seed(9)
B, HQ, HKV, L, D, BM = 2, 16, 4, 2048, 128, 64
q, k, v = (torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
pattern = {pattern}
cfg = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, PACK=2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1,
           REGS=240, NARROW=16)
cfg.update({changes})
before = ops.GLUON_LAUNCHES
out, lse = ops.attention_fwd(q, k, v, pattern, D ** -0.5, poison=True, cfg=cfg)
torch.cuda.synchronize()
assert ops.GLUON_LAUNCHES > before, "the Gluon kernel did not run"
ro, rl = reference_attention(q.double(), k.double(), v.double(), pattern, D ** -0.5)
nq = L // BM
err = (out.double() - ro).abs().nan_to_num(1e9).amax(-1).view(B, HQ, nq, BM)  # per row
bad_rows = (err > 0.1)
bad = bad_rows.any(-1)  # (B, HQ, nq)
nrow = ops._narrow_rows(pattern, L, L, 64, 128, HQ, str(q.device), 16)
nrow = nrow.tolist() if nrow is not None and cfg.get("NARROW") else [0] * nq
print(f"wrong query blocks: {{int(bad.sum())}} of {{bad.numel()}}; rows {{int(bad_rows.sum())}} of {{bad_rows.numel()}}; "
      f"narrow blocks {{sum(nrow)}} of {{nq}}; NaN rows {{int(out.isnan().any(-1).sum())}}")
if cfg["GLUON"] == "wsp" and bad.any():
    G, items = HQ // HKV, nq * B * HQ // 2
    P = min(items, cfg.get("PROGRAMS") or torch.cuda.get_device_properties(0).multi_processor_count)
    def item(t):
        if cfg["ORDER"] == 0:
            pid_m, pid_bh = t % nq, t // nq
            b, h = pid_bh // (HQ // 2), (pid_bh % (HQ // 2)) * 2
        else:
            r = t // (G // 2)
            pid_m, bk = r % nq, r // nq
            b, h = bk // HKV, (bk % HKV) * G + (t % (G // 2)) * 2
        return b, h, pid_m
    from collections import Counter
    tally, total, shown = Counter(), Counter(), 0
    for t in range(items):
        b, h, m = item(t)
        i = t // P
        prev = nrow[item(t - P)[2]] if i > 0 else -1
        pq = nrow[item(t - P * cfg["QBUF"])[2]] if i >= cfg["QBUF"] else -1  # the item before on this Q buffer
        key = (f"nw={{nrow[m]}}", f"prev={{prev}}", f"prev_qb={{pq}}", f"qb={{i % cfg['QBUF']}}")
        total[key] += 1
        wrong = bool(bad[b, h, m] or bad[b, h + 1, m])
        tally[key] += wrong
        if wrong and shown < 12:
            shown += 1
            print(f"  item {{t}}: program {{t % P}} #{{i}} b{{b}} h{{h}} m{{m}} nw={{nrow[m]}} prev={{prev}}; wrong rows "
                  f"h: {{int(bad_rows[b, h, m].sum())}}, h+1: {{int(bad_rows[b, h + 1, m].sum())}}; max err "
                  f"{{float(err[b, h:h + 2, m].max()):.3g}}")
    for key in sorted(total):
        print(f"  {{' '.join(key):36s}} wrong {{tally[key]}} of {{total[key]}}")
'''

if __name__ == "__main__":
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for name, (pattern, changes) in VARIANTS.items():
        if sys.argv[1:] and name not in sys.argv[1:]:
            continue
        r = subprocess.run([sys.executable, "-c", CHILD.format(pattern=pattern, changes=changes)], capture_output=True,
                           text=True, env=env, timeout=150)
        print(f"== {name}: {pattern} {changes} rc={r.returncode}", flush=True)
        print(r.stdout.rstrip(), flush=True)
        if r.returncode:
            print("   " + "\n   ".join(r.stderr.strip().splitlines()[-3:]), flush=True)
