"""Small-shape, many-batch attention on the GPU (the MQAR training shape: B = 128, 2 heads, 256 tokens,
D = 64): fwd+bwd time of the Triton backend in float32 and bfloat16 on a sliding window and causal, with
the reference backend for scale, then a torch.profiler table of the float32 Triton window call.

    PYTHONPATH=src python3 benchmarks/triton_small_batch_profile.py [--flex]

First measurement (H100, 2026-11-23): float32 Triton SlidingWindow(31) fwd+bwd 14.3 ms at this shape,
where a dense TinyLM step takes 6 ms in total; the cause is not yet known (next GPU session).
FlexAttention is left out unless --flex (its compile at this shape ran past a 60 s time box).
"""
import sys
import time

import torch

import attnzoo as az


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    torch.set_float32_matmul_precision("high")
    backends = ["triton", "reference"] + (["flex"] if "--flex" in sys.argv else [])
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(128, 2, 256, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        for be in backends:
            for pat in (az.SlidingWindow(31), az.Causal()):
                def step():
                    az.attention(q, k, v, pat, backend=be).sum().backward()
                try:
                    print(f"{str(dtype):<15} {be:<10} {pat!r:<20} fwd+bwd {timed(step):8.2f} ms", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{str(dtype):<15} {be:<10} {pat!r:<20} error {type(e).__name__}: {str(e)[:150]}")
    from torch.profiler import ProfilerActivity, profile
    q = torch.randn(128, 2, 256, 64, device="cuda", requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            az.attention(q, q, q, az.SlidingWindow(31), backend="triton").sum().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
