"""Which narrow-tile case of the persistent Gluon forward faults (eighteenth session: an illegal memory access in
test_gluon_narrow_sink_tile[wsp] with the first form of NARROW; the present form has not run yet). Each case in its
own process with CUDA_LAUNCH_BLOCKING=1, so one fault does not hide the next:
python3 benchmarks/gluon_narrow_diag.py [case name ...]"""
import os
import subprocess
import sys

CASES = {
    "sw300+sinks4 n16": "az.SlidingWindow(300) | az.Sinks(4), 2048, 2048, 16",
    "sw129+sinks16 n16": "az.SlidingWindow(129) | az.Sinks(16), 2048, 2048, 16",
    "sinks4 n16": "az.Sinks(4), 2048, 2048, 16",
    "sinks4 n0": "az.Sinks(4), 2048, 2048, 0",
    "cross sw200+sinks4 n16": "az.SlidingWindow(200) | az.Sinks(4), 512, 1536, 16",
    "sw300+sinks4 n16 o0": "az.SlidingWindow(300) | az.Sinks(4), 2048, 2048, 16, 0",
    "sw300+sinks4 n16 q1": "az.SlidingWindow(300) | az.Sinks(4), 2048, 2048, 16, 1, 1",
    "sw300+sinks4 n16 ws": "az.SlidingWindow(300) | az.Sinks(4), 2048, 2048, 16, 1, 2, 'ws'",
}
CHILD = '''
import sys, torch, attnzoo as az
from attnzoo.backends.triton import ops
ops.GLUON_NARROW = True  # (on by default since the nineteenth session)
sys.path.insert(0, "tests/backends")
from test_gluon_fwd import _inputs, _check, GCFG
def run(pattern, lq, lk, narrow, order=1, qbuf=2, form="wsp"):
    hq, hkv = (16, 4) if lq == lk else (4, 2)
    q, k, v = _inputs(2 if lq == lk else 1, hq, hkv, lq, lk, 128, torch.bfloat16, seed=9)
    cfg = dict(GCFG, BLOCK_N=128, num_stages=2, GLUON=form, QBUF=qbuf, REGS=240, NARROW=narrow, ORDER=order)
    ran = _check(q, k, v, pattern, cfg)
    torch.cuda.synchronize()
    print("RAN" if ran else "FELL BACK")
run({args})
'''

if __name__ == "__main__":
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    only = sys.argv[1:]  # case names to run (all by default)
    for name, args in CASES.items():
        if only and name not in only:
            continue
        r = subprocess.run([sys.executable, "-c", CHILD.format(args=args)], capture_output=True, text=True, env=env,
                           timeout=120)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        err = [l for l in r.stderr.splitlines() if "Error" in l or "error" in l][-1:] 
        print(f"{name:28s} rc={r.returncode} {last} {err[0][:160] if (r.returncode and err) else ''}", flush=True)
