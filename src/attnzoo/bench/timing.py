"""Timing one callable the way BENCHMARK_PROTOCOL.md asks.

- The first call is timed on its own (``compile_ms``): compilation, autotuning and caches happen there.
- Then ``warmup`` more untimed calls; on CUDA the peak memory is read around them
  (``reset_peak_memory_stats`` / ``max_memory_allocated``), before the L2-flush buffer exists.
- Then ``reps`` timed calls: CUDA events around each call, with the L2 cache flushed (a 256 MiB buffer
  written) before each one, outside the timed region; ``time.perf_counter`` on CPU.
- The result is the median and the 20th / 80th percentiles, in milliseconds.
- On CUDA with NVML (``pynvml``), the SM clock, board power and the share of the timed window spent power-capped or
  thermally slowed (`gpu_state.GpuMonitor`): a long stream of calls runs at a lower clock than a short burst.

Failures never escape: out-of-memory gives ``status="oom"``, a backend that declines (``ValueError`` from
``attnzoo.attention(..., backend=...)``, or `Unsupported`) gives ``status="unsupported"`` with its reason,
anything else ``status="error"`` with the message.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable, Optional

import torch

from .gpu_state import FIELDS as GPU_FIELDS, GpuMonitor

L2_FLUSH_BYTES = 256 * 1024 * 1024
MAX_MESSAGE = 2000


class Unsupported(Exception):
    """Raised by a benchmark callable when the combination cannot run (reported as ``unsupported``)."""


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    xs = sorted(float(x) for x in values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(exc, oom_types):
        return True
    # CPU allocators and some kernels report OOM as a plain RuntimeError
    msg = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg.lower() or "DefaultCPUAllocator: can't allocate memory" in msg)


def classify_exception(exc: BaseException, unsupported=(ValueError, Unsupported)) -> tuple[str, str]:
    """-> (status, message) for an exception raised while benchmarking."""
    msg = f"{type(exc).__name__}: {exc}".strip()
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE] + " ..."
    if _is_oom(exc):
        return "oom", msg
    if isinstance(exc, unsupported):
        return "unsupported", str(exc)[:MAX_MESSAGE]
    return "error", msg


def empty_result(status: str, message: str = "") -> dict:
    """A result with no measurement (every time, the peak memory and the GPU state None)."""
    return dict(status=status, message=message, median_ms=None, p20_ms=None, p80_ms=None, compile_ms=None,
                peak_mem_bytes=None, reps=0, times_ms=[], **dict.fromkeys(GPU_FIELDS))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_fn(fn: Callable[[], object], *, device, warmup: int = 1, reps: int = 10, flush_l2: bool = True,
            max_time_s: Optional[float] = None, min_reps: int = 3, sustain_s: Optional[float] = None,
            unsupported=(ValueError, Unsupported)) -> dict:
    """Time ``fn()`` on ``device``; see the module docstring.

    ``max_time_s`` caps the timed repetitions at about that many seconds (never fewer than
    ``min_reps``), judged from the warm-up calls on CUDA and as they run on CPU; ``reps`` in the result
    is the number actually timed.

    ``sustain_s`` (CUDA): before the timed calls, about that many seconds of untimed calls back to back, so that
    the timed ones run in the clock the GPU holds under a long load (its power cap) rather than a short burst's.

    Returns ``dict(status, message, median_ms, p20_ms, p80_ms, compile_ms, peak_mem_bytes, reps, times_ms,
    sm_clock_mhz, power_w, power_cap_share, thermal_share)``; the times are None unless ``status == "ok"``.
    ``peak_mem_bytes`` is None on CPU; the GPU state fields (over the timed calls) are None on CPU or without NVML.
    """
    device = torch.device(device)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int, got {reps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if sustain_s is not None and (isinstance(sustain_s, bool) or not isinstance(sustain_s, (int, float))
                                  or not sustain_s > 0):
        raise ValueError(f"sustain_s must be a positive number of seconds, got {sustain_s!r}")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flush_buf = None
    gpu = {}
    try:
        # 1. first call, timed alone: compilation / autotuning / metadata caches
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        compile_ms = (time.perf_counter() - t0) * 1e3

        # 2. warm-up, with the peak memory of a steady-state call read on CUDA
        peak = None
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        n_warm = max(warmup, 1 if cuda else 0)
        t0 = time.perf_counter()
        for _ in range(n_warm):
            fn()
        sync()
        per_call_s = (time.perf_counter() - t0) / n_warm if n_warm else None
        if cuda:
            peak = int(torch.cuda.max_memory_allocated(device))
        if max_time_s is not None and per_call_s:
            # cap the repetitions from the steady-state cost of a call (decided up front, so that no
            # synchronisation is added between timed calls on CUDA)
            reps = max(min(reps, min_reps), min(reps, int(max_time_s / per_call_s)))

        # 3. timed repetitions
        times = []
        if cuda:
            if flush_l2:
                flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            monitor = GpuMonitor(device)
            if sustain_s and per_call_s:  # the long load first, untimed (no synchronisation until its end)
                for _ in range(max(1, int(sustain_s / per_call_s))):
                    if flush_buf is not None:
                        flush_buf.zero_()
                    fn()
            torch.cuda.synchronize(device)  # (the window starts with the timed calls)
            monitor.start()
            for i in range(reps):
                if flush_buf is not None:
                    flush_buf.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize(device)
            gpu = monitor.stop()
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            wall0 = time.perf_counter()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                if max_time_s is not None and len(times) >= min_reps and time.perf_counter() - wall0 > max_time_s:
                    break
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record
        failure = classify_exception(exc, unsupported)
    else:
        failure = None
    finally:
        flush_buf = None
    if failure is not None:
        # outside the except block, so that the traceback (and the tensors its frames hold) is gone
        _free(device)
        return empty_result(*failure)
    return dict(status="ok", message="", median_ms=percentile(times, 50), p20_ms=percentile(times, 20),
                p80_ms=percentile(times, 80), compile_ms=compile_ms, peak_mem_bytes=peak, reps=len(times),
                times_ms=[round(t, 6) for t in times], **{f: gpu.get(f) for f in GPU_FIELDS})
