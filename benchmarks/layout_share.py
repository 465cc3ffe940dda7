"""Issue 3's layout target: block-layout construction at most 5 % of the forward at 64K tokens.

    PYTHONPATH=src python3 benchmarks/layout_share.py --out results.jsonl        # CUDA only

For each long-context pattern and length (bf16, B 1, 64 query / 8 KV heads, D 128: the protocol's grid),
in one run: the Triton forward with its layout cached (what a training step pays after the first call),
and three uncached layout constructions of the forward's block sizes:

- ``torch``: `Pattern.block_layout` (PyTorch ops; what the backend used before the fused kernel),
- ``kernel``: `band_layout`, the fused kernel the backend now uses (one launch),
- ``kernel_t``: its transposed layout (the backward's; built on the first backward).

Each is the median of ``--reps`` synchronized calls (wall clock, so host time counts: a layout is host-bound).
``share`` columns are layout ÷ forward. ``same`` checks the kernel's lists against ``block_layout``'s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from layout_speed import doc_lengths, same_lists  # noqa: E402

import attnzoo as az  # noqa: E402
from attnzoo.backends.triton import ops  # noqa: E402
from attnzoo.backends.triton.band_layout import band_layout  # noqa: E402


def patterns(L: int):
    docs = az.Document(doc_lengths(L))
    return [("sw1024", az.SlidingWindow(1023)), ("sw4096", az.SlidingWindow(4095)),
            ("sinks+sw1024", az.SlidingWindow(1023) | az.Sinks(4)), ("causal", az.Causal()),
            ("docs&causal", docs & az.Causal())]


def wall_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--filter", default=None)
    ap.add_argument("--out", default=None, help="append one JSON record per case")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("layout_share.py needs CUDA", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"# layout share: {name}, torch {torch.__version__}, bf16 B1 Hq64 Hkv8 D128, median of {args.reps}")
    head = (f"{'pattern':<14} {'L':>6} {'blk':>7} {'fwd ms':>8} {'torch ms':>9} {'kernel ms':>9} {'kernel_t':>9} "
            f"{'share torch':>11} {'share kernel':>12} {'same':>5}")
    print(head)
    print("-" * len(head))
    for L in args.lengths:
        gen = torch.Generator(device=dev).manual_seed(L)
        q = torch.randn(1, 64, L, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(1, 8, L, 128, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
        for pname, pat in patterns(L):
            if args.filter and args.filter not in pname:
                continue
            cfg = ops.config(128, 128, dev, pat)
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            fwd = wall_ms(lambda: ops.attention_fwd(q, k, v, pat, 128 ** -0.5), args.reps)
            t_torch = wall_ms(lambda: pat.block_layout(L, L, bm, bn, device=dev), args.reps)
            t_kern = wall_ms(lambda: band_layout(pat, L, L, bm, bn, dev), args.reps)
            t_kt = wall_ms(lambda: band_layout(pat, L, L, bm, bn, dev, transposed=True), args.reps)
            ref = pat.block_layout(L, L, bm, bn, device=dev)
            same = (same_lists(band_layout(pat, L, L, bm, bn, dev), ref, False)
                    and same_lists(band_layout(pat, L, L, bm, bn, dev, transposed=True), ref, True))
            rec = dict(device_name=name, pattern=pname, L=L, block=[bm, bn], fwd_ms=fwd, torch_layout_ms=t_torch,
                       kernel_layout_ms=t_kern, kernel_t_layout_ms=t_kt, share_torch=t_torch / fwd,
                       share_kernel=t_kern / fwd, same=same)
            print(f"{pname:<14} {L:>6} {bm:>3}x{bn:<3} {fwd:>8.3f} {t_torch:>9.3f} {t_kern:>9.3f} {t_kt:>9.3f} "
                  f"{t_torch / fwd:>11.3f} {t_kern / fwd:>12.3f} {str(same):>5}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
