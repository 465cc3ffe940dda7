"""Where the time of packed variable-length input goes: Gated DeltaNet through the public op with cu_seqlens
(the padded batches of similar lengths, `_core.run_sequences`), fwd+bwd under torch.profiler, the same input as
`linear_bench.py --packed` (64 sequences of 64-512 tokens, H 16, D 128, bf16). Prints the top operators by
device time and by host time, and the wall time per call against the device time, so that host overhead
(launches, index building, syncs) and device work (kernels, gathers, scatters) can be told apart.

    PYTHONPATH=src python3 benchmarks/packed_profile.py [--seqs 64] [--reps 5] [--out FILE]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--lo", type=int, default=64)
    ap.add_argument("--hi", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=18, help="operators listed per table")
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("packed_profile.py times the Triton kernels and needs a CUDA device")
    from attnzoo.linear import gated_delta_rule
    from attnzoo.linear._core import group_tokens, length_buckets
    from linear_bench import packed_inputs  # the inputs of linear_bench.py --packed
    lens, cu, inputs, do = packed_inputs(args.seqs, args.lo, args.hi, "cuda")
    t = int(cu[-1])
    leaves = [x.detach().requires_grad_() for x in inputs]

    def step():
        o = gated_delta_rule(*leaves, cu_seqlens=cu, backend="triton")[0]
        torch.autograd.grad(o, leaves, do)

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.reps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    # kernels only (an operator's own row repeats its kernels' time)
    dev_us = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / args.reps
    groups = len(length_buckets(lens, group_cost=group_tokens(inputs[0].shape[1], inputs[0].shape[-1],
                                                              inputs[2].shape[-1])))
    head = (f"packed Gated DeltaNet fwd+bwd: {args.seqs} sequences, {t} tokens, {groups} groups; "
            f"wall {wall:.3f} ms per call, device busy {dev_us / 1e3:.3f} ms per call ({args.reps} calls profiled)")
    lines = [head, "", "by device time:",
             ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=50),
             "by host time:", ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
