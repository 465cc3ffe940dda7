"""Time `Pattern.block_layout` (uncached) for the long-context patterns, and count its ops / kernel launches.

    PYTHONPATH=src python3 benchmarks/layout_speed.py                  # CPU
    PYTHONPATH=src python3 benchmarks/layout_speed.py --device cuda    # GPU: median of synchronized reps

Every call goes straight to the pattern's ``block_layout`` (no layout cache of any backend in between).
``--path dense`` / ``--path band`` time one of the two construction paths directly (private methods:
``_dense_layout``, ``_band_layout(force=True)``), to re-check which one a device should take.
``--path triton`` times the fused layout kernel the Triton backend uses for banded patterns
(`backends/triton/band_layout.py`, one launch; ``--transposed``: the backward's transposed layout), and
checks its lists against ``block_layout``'s (column ``same``).
Columns:

- ``ms``: median wall time of one call (on CUDA: synchronized before and after every call).
- ``ops``: ATen operations dispatched by the same construction run on the CPU, views and metadata-only ops
  excluded (a device-independent proxy for kernel launches; with ``--device cuda`` and ``--path auto`` it
  counts the dense path, which GPUs take). The band path's numpy row arithmetic is not counted: it
  launches nothing.
- ``launches`` (CUDA only): device kernels + memcpy/memset seen by torch.profiler for one call.
- ``syncs`` (CUDA only): device->host synchronisations of one call (cudaStreamSynchronize calls).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings

import torch

from attnzoo.patterns import Causal, Chunked, Document, Sinks, SlidingWindow


def doc_lengths(total: int, seed: int = 0, lo: int = 256, hi: int = 8192) -> list[int]:
    """Deterministic packed-document lengths that sum to ``total``."""
    rng = random.Random(seed + total)
    out, left = [], total
    while left > 0:
        n = min(left, rng.randint(lo, hi))
        out.append(n)
        left -= n
    return out


def patterns(L: int):
    docs = Document(doc_lengths(L))
    return [
        ("SlidingWindow(1023)", SlidingWindow(1023)),
        ("SlidingWindow(4095)", SlidingWindow(4095)),
        ("SlidingWindow(1023)|Sinks(4)", SlidingWindow(1023) | Sinks(4)),
        ("Causal", Causal()),
        (f"Document({len(docs.lengths)} docs)", docs),
        ("Document&Causal", docs & Causal()),
        ("Chunked(2048)", Chunked(2048)),
    ]


# -- op counting (ATen dispatch) ----------------------------------------------------------------------
def count_ops(fn) -> int | None:
    """Non-view ATen ops dispatched while running fn (None where this torch lacks the dispatch mode)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # pragma: no cover
        return None

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            schema = getattr(func, "_schema", None)
            is_view = bool(schema is not None and any(
                a.alias_info is not None and not a.alias_info.is_write for a in schema.returns))
            name = str(func)
            meta = name.split(".")[0] in ("aten::size", "aten::stride", "aten::sym_size", "aten::sym_stride",
                                          "aten::is_contiguous", "aten::dim", "aten::numel")
            if not is_view and not meta:
                Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


# -- CUDA launches via the profiler -------------------------------------------------------------------
def count_launches(fn):
    """(device kernels + memcpy/memset, stream syncs) of one call, from torch.profiler; (None, None) if unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.autograd import DeviceType
    except ImportError:  # pragma: no cover
        return None, None
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        launches = syncs = 0
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                launches += 1
            elif "StreamSynchronize" in e.name:
                syncs += 1
        return launches, syncs
    except Exception as exc:  # pragma: no cover - profiler quirks of a given build
        print(f"# profiler unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, None


def time_call(fn, device: torch.device, reps: int, warmup: int) -> float:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case (default: 50 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--filter", default=None, help="only patterns whose name contains this")
    ap.add_argument("--no-ops", action="store_true", help="skip the op / launch counts")
    ap.add_argument("--path", choices=["auto", "dense", "band", "triton"], default="auto",
                    help="auto: block_layout as users call it; dense / band: that construction path; "
                         "triton: the fused layout kernel of the Triton backend")
    ap.add_argument("--transposed", action="store_true", help="with --path triton: the transposed layout")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    reps = args.reps or (50 if cuda else 5)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"# block_layout speed: torch {torch.__version__}, device {name}, median of {reps} calls, uncached, "
          f"path {args.path}")

    head = f"{'pattern':<30} {'L':>6} {'block':>5} {'ms':>9} {'ops':>5}"
    if cuda:
        head += f" {'launches':>8} {'syncs':>5}"
    head += f" {'partial':>8} {'full':>8}"
    if args.path == "triton":
        head += f" {'same':>5}"
    print(head)
    print("-" * len(head))
    for L in args.lengths:
        for B in args.blocks:
            for pname, pat in patterns(L):
                if args.filter and args.filter not in pname:
                    continue

                def call(pat=pat, L=L, B=B, device=device):
                    if args.path == "auto":
                        return pat.block_layout(L, L, B, B, device=device)
                    if args.path == "triton":
                        from attnzoo.backends.triton.band_layout import band_layout
                        return band_layout(pat, L, L, B, B, device, transposed=args.transposed)
                    from attnzoo.patterns.base import Ctx
                    ctx = Ctx(L, L, B, B, None, torch.device(device))
                    lay = pat._band_layout(ctx, force=True) if args.path == "band" and pat._banded else None
                    return lay if lay is not None else pat._dense_layout(ctx)

                ms = time_call(call, device, reps, args.warmup)
                lay = call()
                ops = launches = syncs = None
                if not args.no_ops and args.path != "triton":
                    # ops of the same construction, dispatched on the CPU (the device-independent count)
                    ops = count_ops(lambda: call(device="cpu") if args.path != "auto" or not cuda
                                    else _dense_on_cpu(pat, L, B))
                if not args.no_ops and cuda:
                    launches, syncs = count_launches(call)
                row = f"{pname:<30} {L:>6} {B:>5} {ms:>9.3f} {_fmt(ops):>5}"
                if cuda:
                    row += f" {_fmt(launches):>8} {_fmt(syncs):>5}"
                row += f" {int(lay.kv_num_blocks.sum()):>8} {int(lay.full_kv_num_blocks.sum()):>8}"
                if args.path == "triton":
                    row += f" {str(same_lists(lay, pat.block_layout(L, L, B, B, device=device), args.transposed)):>5}"
                print(row, flush=True)
    return 0


def same_lists(lay, ref, transposed: bool) -> bool:
    """Whether ``lay`` lists the same blocks as ``ref`` (or its transpose), entries past the counts ignored."""
    if transposed:
        from attnzoo.patterns import BlockLayout
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        part, full = ref.partial_blocks(), ref.full_blocks()
        ref = BlockLayout.from_bool(t(part | full), t(full), block_q=ref.block_k, block_k=ref.block_q,
                                    q_len=ref.kv_len, kv_len=ref.q_len)
    for n, i, rn, ri in ((lay.kv_num_blocks, lay.kv_indices, ref.kv_num_blocks, ref.kv_indices),
                         (lay.full_kv_num_blocks, lay.full_kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices)):
        if not torch.equal(n, rn):
            return False
        valid = torch.arange(i.shape[-1], device=i.device) < n[..., None]
        if not torch.equal(torch.where(valid, i, -1), torch.where(valid, ri, -1)):
            return False
    return True


def _dense_on_cpu(pat, L, B):
    """What block_layout runs on a GPU (the dense path), dispatched on the CPU to count its ops."""
    from attnzoo.patterns.base import Ctx
    lay = pat._band_layout(Ctx(L, L, B, B, None, torch.device("cuda")))   # None on GPUs: dense
    assert lay is None
    return pat._dense_layout(Ctx(L, L, B, B, None, torch.device("cpu")))


def _fmt(x) -> str:
    return "n/a" if x is None else str(x)


if __name__ == "__main__":
    sys.exit(main())
