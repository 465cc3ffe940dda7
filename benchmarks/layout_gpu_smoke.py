"""A short GPU check of the fused layout kernels (band and routed) against the PyTorch layouts, and of one
windowed and one routed forward+backward against float64: the compile-and-agree check to run after changing
the layout kernels, in well under a minute.

    PYTHONPATH=src python3 benchmarks/layout_gpu_smoke.py
"""
import sys
import time

import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton.band_layout import band_layout
from attnzoo.backends.triton.routed_layout import routed_layouts
from attnzoo.testing import rel_rmse

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from layout_speed import same_lists  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    t0 = time.time()
    dev = "cuda"
    ok = True
    for p in (az.SlidingWindow(100) | az.Sinks(4), az.Document([300, 700, 1048]) & az.Causal()):
        ref = p.block_layout(2048, 2048, 64, 64, device=dev)
        r = (same_lists(band_layout(p, 2048, 2048, 64, 64, dev), ref, False)
             and same_lists(band_layout(p, 2048, 2048, 64, 64, dev, transposed=True), ref, True))
        print(f"band layout {p!r}: {'ok' if r else 'DIFFERS'}")
        ok &= r
    gen = torch.Generator(device=dev).manual_seed(0)
    mask = torch.rand(4, 32, 32, device=dev, generator=gen) < 0.3
    rp = az.RoutedBlocks(mask, (64, 64), causal=True)
    ref, tref = rp.layouts(2048, 2048, 64, 64, device=dev, num_heads=4, transposed=True)
    got, tgot = routed_layouts(rp, 2048, 2048, 64, 64, dev, num_heads=4, transposed=True)
    r = same_lists(got, ref, False) and same_lists(tgot, tref, False)
    print(f"routed layout: {'ok' if r else 'DIFFERS'}")
    ok &= r
    # (pattern, length, query heads, kv heads, head dim): at D 128 the block-sparse mask with one bit per
    # tile (128-token blocks hold the 64-token tiles) and a 4096-key window on the dense class's tiles
    bs = az.BlockSparse.random(4096, 4096, 0.3, block_size=128, causal=True, seed=0) & az.Causal()
    cases = ((az.SlidingWindow(255) | az.Sinks(4), 2048, 4, 2, 64), (rp, 2048, 4, 2, 64),
             (bs, 4096, 8, 2, 128), (az.SlidingWindow(4095), 8192, 8, 2, 128))
    for p, L, hq, hkv, d in cases:
        q = torch.randn(1, hq, L, d, device=dev, dtype=torch.bfloat16, generator=gen, requires_grad=True)
        k, v = (torch.randn(1, hkv, L, d, device=dev, dtype=torch.bfloat16, generator=gen, requires_grad=True)
                for _ in range(2))
        out = az.attention(q, k, v, p, backend="triton")
        out.float().square().sum().backward()
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        ro = reference_attention(qd, kd, vd, p, d ** -0.5)[0]
        ro.square().sum().backward()
        errs = [rel_rmse(out, ro)] + [rel_rmse(a.grad, b.grad) for a, b in ((q, qd), (k, kd), (v, vd))]
        r = max(errs) < 2e-2
        print(f"triton fwd+bwd {type(p).__name__} L={L} D={d}: max rel RMSE {max(errs):.2e} "
              f"{'ok' if r else 'TOO LARGE'}")
        ok &= r
    print(f"{'all ok' if ok else 'FAILED'} ({time.time() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
