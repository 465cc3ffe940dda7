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


def same(lay, ref) -> bool:
    for n, i, rn, ri in ((lay.kv_num_blocks, lay.kv_indices, ref.kv_num_blocks, ref.kv_indices),
                         (lay.full_kv_num_blocks, lay.full_kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices)):
        if not torch.equal(n, rn):
            return False
        valid = torch.arange(i.shape[-1], device=i.device) < n[..., None]
        if not torch.equal(torch.where(valid, i, -1), torch.where(valid, ri, -1)):
            return False
    return True


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    t0 = time.time()
    dev = "cuda"
    ok = True
    for p in (az.SlidingWindow(100) | az.Sinks(4), az.Document([300, 700, 1048]) & az.Causal()):
        ref = p.block_layout(2048, 2048, 64, 64, device=dev)
        part, full = ref.partial_blocks(), ref.full_blocks()
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        tref = az.patterns.BlockLayout.from_bool(t(part | full), t(full), block_q=64, block_k=64, q_len=2048,
                                                 kv_len=2048)
        r = (same(band_layout(p, 2048, 2048, 64, 64, dev), ref)
             and same(band_layout(p, 2048, 2048, 64, 64, dev, transposed=True), tref))
        print(f"band layout {p!r}: {'ok' if r else 'DIFFERS'}")
        ok &= r
    gen = torch.Generator(device=dev).manual_seed(0)
    mask = torch.rand(4, 32, 32, device=dev, generator=gen) < 0.3
    rp = az.RoutedBlocks(mask, (64, 64), causal=True)
    ref, tref = rp.layouts(2048, 2048, 64, 64, device=dev, num_heads=4, transposed=True)
    got, tgot = routed_layouts(rp, 2048, 2048, 64, 64, dev, num_heads=4, transposed=True)
    r = same(got, ref) and same(tgot, tref)
    print(f"routed layout: {'ok' if r else 'DIFFERS'}")
    ok &= r
    for p in (az.SlidingWindow(255) | az.Sinks(4), rp):
        q = torch.randn(1, 4, 2048, 64, device=dev, dtype=torch.bfloat16, generator=gen, requires_grad=True)
        k, v = (torch.randn(1, 2, 2048, 64, device=dev, dtype=torch.bfloat16, generator=gen, requires_grad=True)
                for _ in range(2))
        out = az.attention(q, k, v, p, backend="triton")
        out.float().square().sum().backward()
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        ro = reference_attention(qd, kd, vd, p, 64 ** -0.5)[0]
        ro.square().sum().backward()
        errs = [rel_rmse(out, ro)] + [rel_rmse(a.grad, b.grad) for a, b in ((q, qd), (k, kd), (v, vd))]
        r = max(errs) < 2e-2
        print(f"triton fwd+bwd {type(p).__name__}: max rel RMSE {max(errs):.2e} {'ok' if r else 'TOO LARGE'}")
        ok &= r
    print(f"{'all ok' if ok else 'FAILED'} ({time.time() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
