"""The dk / dv kernel's last wave in a model (issue 3, thirty-fifth session; CPU only): for each pattern and length, how
far the last of 132 SMs ends past the mean SM's work when the work items run in the 2-D grid's order (each (batch, KV
head)'s items longest first, one KV head after another), with TAIL_ORDER (`ops.tail_items`' tail with the (batch, KV
head)s fastest) and with TAIL_ORDER plus SPLIT_CAP. A program's cost: its query blocks times the group's heads, plus 2
steps for its K / V loads and stores (`ops.schedule_span`, programs started in launch order on the first free SM).
    PYTHONPATH=src python3 benchmarks/dkdv_waves.py [--lengths 4096,16384,65536] [--cap 9]"""
import argparse

import attnzoo as az
from attnzoo.backends.triton import ops

PATTERNS = {"sw4096": az.SlidingWindow(4095), "causal": az.Causal(), "sw1024": az.SlidingWindow(1023),
            "sinks+sw1024": az.SlidingWindow(1023) | az.Sinks(4)}


def loss(pattern, L: int, hq: int, hkv: int, sms: int, tail, cap=None):
    """(last SM's end / mean SM's work - 1, the tail's items, the steps over the uncapped plan's - 1)."""
    group = hq // hkv
    items = ops._bwd_plan(pattern, L, L, 64, 128, hq, "cpu", cap)[0]
    steps = tuple((items[:, 2] - items[:, 1]).tolist())
    if tail is True:
        tail = ops.tail_items(steps, hkv, group, sms)
    costs = [steps[i] * group + 2 for i, _ in ops.dkdv_order(len(steps), tail, hkv)]
    return ops.schedule_span(costs, sms) / (sum(costs) / sms) - 1, tail, sum(costs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--cap", type=int, default=9, help="SPLIT_CAP of the third column")
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args()
    print(f"{'pattern':13s} {'L':>6s} {'2-D grid':>9s} {'TAIL_ORDER (T)':>15s} {'+ SPLIT_CAP':>12s} {'steps':>7s}")
    for name, p in PATTERNS.items():
        for L in (int(x) for x in args.lengths.split(",")):
            base, _, work = loss(p, L, 64, 8, args.sms, 0)
            tail, t, _ = loss(p, L, 64, 8, args.sms, True)
            capped, _, cwork = loss(p, L, 64, 8, args.sms, True, args.cap)
            print(f"{name:13s} {L:6d} {base:9.1%} {tail:9.1%} ({t:3d}) {capped:12.1%} {cwork / work - 1:+7.1%}")


if __name__ == "__main__":
    main()
