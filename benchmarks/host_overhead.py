"""Host-side cost of one Triton attention call, layer by layer (issue 3: small shapes are host-bound).

On the H200 (2026-12-04) the MQAR training shape (B=128, 2 heads, 256 tokens, D=64) took 1.31 ms per
fwd+bwd of wall time for ~0.22 ms of GPU work. This script splits the host time into its layers, each
timed as the mean wall time of many back-to-back calls with no synchronisation inside the loop (at a
shape this small the GPU keeps up, so the loop measures the host):

    launch-empty   an empty Triton kernel with the forward kernel's number of arguments
    attention_fwd  attnzoo.backends.triton.ops.attention_fwd (layout / config lookups + the launch)
    attention_bwd  ops.attention_bwd (2-3 launches and the allocations)
    op-fwd         the torch.library custom op around attention_fwd, no grad
    api-fwd        attnzoo.attention(..., backend="triton"), no grad
    api-fwd+bwd    attnzoo.attention(...).backward(dout) with grad
    sdpa-fwd+bwd   F.scaled_dot_product_attention with grad, for scale

    PYTHONPATH=src python3 benchmarks/host_overhead.py [--out FILE.jsonl]
    PYTHONPATH=src python3 benchmarks/host_overhead.py --mock     # CPU: kernels replaced by no-ops

``--mock`` (no GPU needed) replaces every Triton launch by a no-op and times the Python layers of
attnzoo alone on CPU tensors: what is left of the GPU run's host time after subtracting it is Triton's
launcher and the CUDA driver.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def timed(fn, n, sync):
    for _ in range(5):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mock", action="store_true", help="CPU: replace the Triton launches by no-ops")
    ap.add_argument("--n", type=int, default=200, help="calls per measurement")
    ap.add_argument("--shape", default="128x2x256x64", help="BxHxLxD")
    ap.add_argument("--out", default=None, help="append one JSON record per layer")
    ap.add_argument("--profile", action="store_true",
                    help="also print cProfile's top functions (own time) of the API's fwd+bwd and of ops.attention_fwd")
    args = ap.parse_args()
    if args.mock:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F

    import attnzoo as az
    from attnzoo.backends.triton import ops

    b, h, l, d = (int(x) for x in args.shape.split("x"))
    dev = "cpu" if args.mock else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: run with --mock on CPU")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dtype = torch.float32 if args.mock else torch.bfloat16
    if args.mock:
        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *a, **k: None

        real = ops.kernel_module

        def mocked(*a, **k):
            mod = real(*a, **k)
            fake = type("Mocked", (), {})()
            for name in dir(mod):
                if name.startswith("attn_"):
                    setattr(fake, name, _NoLaunch())
            return fake

        ops.kernel_module = mocked
        ops._module.cache_clear()
    pat = az.SlidingWindow(31)
    q, k, v, do = (torch.randn(b, h, l, d, device=dev, dtype=dtype) for _ in range(4))
    scale = d ** -0.5
    rows = []

    def rec(name, us):
        rows.append(dict(layer=name, us_per_call=round(us, 2), shape=args.shape, mock=args.mock,
                         device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (mocked launches)",
                         torch=torch.__version__))
        print(f"  {name:<15}{us:9.1f} us per call", flush=True)

    n = args.n
    if not args.mock:
        import triton
        import triton.language as tl

        @triton.jit
        def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17,  # noqa: ARG001
                   a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35):
            # only the launch is timed; Triton kernels take no *args
            pass

        nargs = 36
        fake_args = [q] * 6 + [1] * (nargs - 6)
        rec("launch-empty", timed(lambda: _empty[(1,)](*fake_args), n, sync))
        del tl
    out, lse = ops.attention_fwd(q, k, v, pat, scale)
    rec("attention_fwd", timed(lambda: ops.attention_fwd(q, k, v, pat, scale), n, sync))
    rec("attention_bwd", timed(lambda: ops.attention_bwd(do, None, q, k, v, out, lse, pat, scale), n, sync))
    pid = ops.pattern_id(pat)
    with torch.no_grad():
        rec("op-fwd", timed(lambda: ops._fwd_op(q, k, v, pid, scale), n, sync))
        rec("api-fwd", timed(lambda: az.attention(q, k, v, pat, backend="triton"), n, sync))
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))

    def step():
        az.attention(ql, kl, vl, pat, backend="triton").backward(do)
    rec("api-fwd+bwd", timed(step, n, sync))
    if args.profile:
        import cProfile
        import pstats
        for name, fn in (("api-fwd+bwd", step), ("attention_fwd", lambda: ops.attention_fwd(q, k, v, pat, scale))):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                fn()
            prof.disable()
            sync()
            print(f"-- cProfile of {n} x {name}, by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    if not args.mock:
        def sdpa_step():
            F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(do)
        rec("sdpa-fwd+bwd", timed(sdpa_step, n, sync))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
