"""Block-size tuning for the Triton kernels: a measured default table plus a small online search whose
winners are cached on disk.

Every launch asks `choose(kind, d, dv, dtype, pattern, device, run)` for its config. The answer is, in
order: a winner already cached for (device name, Triton version, kernel kind, head dims, dtype, pattern
class); else, when tuning is on (``ATTNZOO_AUTOTUNE=1`` or `autotuning(True)`), the fastest of the
kind's few candidates timed on the call's own inputs (CUDA events, 3 repetitions after a warm-up),
which is then cached; else the default from the table (measured on an H100 with
benchmarks/triton_tune.py and benchmarks/triton_bwd_check.py).

The cache is a JSON file, ``$ATTNZOO_CACHE/tuning.json`` (by default under the temp directory), read
once and rewritten atomically after each new winner. `clear()` forgets everything.

Overrides (``ATTNZOO_TRITON_OVERRIDE``, a JSON object such as '{"bwd@wide": {"GLUON_BWD": {"TAIL_ORDER": true}}}',
then any `overriding` blocks in force) are merged over whatever config that order gives: a way to run a candidate
through the whole library (a model, `attnzoo bench`) without editing the table.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time

import torch

from ...patterns import (Causal, Chunked, Document, Full, Intersection, Neighborhood, PrefixLM, SlidingWindow,
                         TiledNeighborhood, Union)

_DENSE_LIKE = (Full, Causal, PrefixLM, Document, Chunked)
_INTERP = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)


# sliding windows at least this wide (keys per query) run the dense class's forward tiles (class 'wide')
WIDE_WINDOW = 4096


def pattern_class(pattern) -> str:
    """'dense' (mostly full blocks), 'nbhd' (N-D neighborhoods), 'wide' (a sliding window of at least
    `WIDE_WINDOW` keys: long rows of full blocks, like dense work) or 'local' (shorter windows and the rest)."""
    if pattern is None or isinstance(pattern, _DENSE_LIKE):
        return "dense"
    if isinstance(pattern, SlidingWindow) and pattern.left + pattern.right + 1 >= WIDE_WINDOW:
        return "wide"
    if isinstance(pattern, (Union, Intersection)):
        a, b = pattern_class(pattern.a), pattern_class(pattern.b)
        return a if a == b else "local"
    if isinstance(pattern, (Neighborhood, TiledNeighborhood)):
        return "nbhd"
    return "local"


def _cfg(bm, bn, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def _gluon(d: int, dv: int, pclass: str) -> dict:
    """The Gluon forward's config where it is the default -- ``{"GLUON_CFG": ...}``, else ``{}``: warp-specialised
    kernels (a producer warp, two consumer warpgroups) on 64 x 128 tiles, two heads of a GQA group per program,
    D = Dv = 128. The forward runs it where `ops.gluon_plan` allows (Hopper, 16-bit, block-multiple lengths, an
    even group, a plain mask) and the class's Triton config elsewhere.

    Dense class: one program per work item (GLUON "ws"), ring 3. H100, 16K, 64 / 8 heads (seventeenth session,
    triton_pack_variants.py --round 13): causal 8.353 -> 6.845 ms (527 -> 643 TF/s; cuDNN's dense rate is ~620).
    Local and wide classes: the persistent form (GLUON "wsp": one program per SM walking the items, the next item's
    Q and K / V loading while the current one finishes), ring 2, two Q buffers, a KV head's head pairs innermost
    (ORDER 1). Eighteenth session, rounds 14 and 15 (benchmarks/results/h100-2026-12-06-s18/call1, call2), ms
    against the Triton local default: window 1024 1.188 -> 1.024 at 16K, 4.885 -> 4.507 at 64K; sinks + window
    1.264 -> 1.218 at 16K (5.082 -> 5.413 at 64K: the Triton kernel's NARROW and four heads a program win there);
    window 4096 3.580 -> 2.960 at 16K, 16.41 -> 13.71-16.33 at 64K. On causal the persistent form is level with
    "ws" (6.99 vs 6.90)."""
    if d != 128 or dv != 128 or pclass not in ("dense", "local", "wide"):
        return {}  # N-D neighborhoods keep their 32 x 32 tiles (every block partial on small kernels)
    if pclass == "dense":
        return {"GLUON_CFG": dict(_cfg(64, 128, 4, 3), PACK=2, IDX=2, GLUON="ws")}
    # REGS 240 (the most three warpgroups leave: 24 for the producer's, 2 x 240 x 128 + 24 x 128 = 168 x 384): no
    # spills in the main loop with sinks (at 232, 10 spill loads there in ORDER 1). Round 16 (call4), ms: sinks +
    # window 1.207 (232) -> 1.184 (240) at 16K, window 1024 1.010 -> 1.001. NARROW 16 (block 0 as a 16-key sink
    # tile where a query block sees only sinks there; nineteenth session, round 16, c3): sinks + window 1.188 ->
    # 1.146 at 16K, window 1024 level (1.019 / 1.021; no block qualifies there, so the kernel runs without it).
    # MASK_FAR (block 0 first where it is partial, the main loop's mask without the sinks' terms; `ops._mask_far_ok`
    # keeps it off where it changes nothing, e.g. a plain window). Twentieth session, round 16, sinks + window, ms
    # (benchmarks/results/h100-2026-12-06-s20/c2, c3): 16K 1.147 -> 1.079, 1.186 -> 1.123; 64K 4.906 -> 4.400,
    # 4.908 -> 4.437 (one 64K run of three had it slower, 4.817 -> 5.356).
    # NARROW_LAST 2 (twenty-eighth session): consumer 1 takes the narrow tile at its items' ends, its scores issued
    # beside the last block's P V, consumer 0 at their starts as before, so the two consumers' narrow steps no longer
    # stall the tensor cores together. Round 16, sinks + window, ms by pass (benchmarks/results/h100-2026-12-07-s28/
    # c10-last2): 16K 1.086 / 1.141 / 1.100 -> 1.071 / 1.088 / 1.082, 64K 5.313 / 4.809 / 4.835 -> 4.621 / 5.045 /
    # 4.604 (both consumers at the end, NARROW_LAST 1: 1.126 and 5.088, slower)
    # XPIPE (thirtieth session; class local only): each item's first scores issued with the previous item's last P V,
    # their softmax while it runs -- where the narrow tile does not apply (a plain window; sinks + window keeps
    # NARROW, which gains more there). Round 26 (benchmarks/results/h100-2026-12-07-s30/c4-xpipe2, H100, 16K, three
    # round-robin passes): window 1024 1.006 -> 0.982 ms, sustained (len_scale.py, three rounds) 1.129 / 1.159 / 1.147
    # -> 1.118 / 1.114 / 1.124; on the H200 (c3) 1.002 -> 0.975. Window 4096 (33 steps an item) 2.908 -> 3.109: slower,
    # so not on class wide
    # XPIPE_NARROW (thirty-first session; class local): XPIPE with the narrow sink tile at each item's end in both
    # consumers, so sinks + window takes XPIPE too (NARROW_LAST then does not apply). Round 26, sinks + window, 16K,
    # H100, three passes (benchmarks/results/h100-2026-12-07-s31/c1): 1.079 (NARROW_LAST 2) -> 1.062 ms, 1.73 -> 1.76x
    # flex (XPIPE without the narrow tile 1.100); sustained (len_scale.py, three rounds) 1.213 / 1.234 / 1.230 ->
    # 1.190 / 1.214 / 1.203 (XPIPE_NARROW=2, consumer 0's narrow step before the boundary: 7-10 % slower, thirty-
    # second session, benchmarks/results/h100-2026-12-07-s32/c1-xstag; removed)
    # XPIPE_NARROW="fold" (thirty-second session; class local): no narrow tile; the sinks go into an unseen 16-key
    # slot of each flagged item's first partial block (gluon_fwd's NFOLD), so an item with sinks costs what it costs
    # without. Round 26, sinks + window, 16K, H100, three passes (benchmarks/results/h100-2026-12-07-s32/c3-fold):
    # 1.052 (XPIPE_NARROW) -> 1.022 ms, 1.83 -> 1.89x flex; sustained, three rounds: 16K 1.154 / 1.196 / 1.190 ->
    # 1.133 / 1.166 / 1.162, 64K 4.676 / 4.637 / 4.683 -> 4.558 / 4.555 / 4.602. Where no slot exists for every
    # flagged block (ops._narrow_fold), the narrow tile as with XPIPE_NARROW=True
    xp = {"XPIPE": True, "XPIPE_NARROW": "fold"} if pclass == "local" else {}
    return {"GLUON_CFG": dict(_cfg(64, 128, 4, 2), PACK=2, IDX=2, GLUON="wsp", QBUF=2, ORDER=1, REGS=240, NARROW=16,
                              MASK_FAR=True, NARROW_LAST=2, **xp)}


def default(kind: str, d: int, dv: int, pclass: str) -> dict:
    """The measured table (H100, bf16). kind: 'fwd' or 'bwd'."""
    dmax = max(d, dv)
    if kind == "bwd":
        # 16K tokens, 64/8 heads, D=128: 64x64/4 warps/2 stages 358 TF/s causal, 311 window 1024; the
        # next best 128x64/8 warps 331 and 254; three stages lose a quarter. TMA (K / V of the dq kernel,
        # q / dO of the dk/dv kernel through tensor descriptors; lengths that are block multiples only),
        # H200 16K (benchmarks/triton_pack_variants.py --round 4): backward 30.66 -> 28.26 ms causal,
        # 4.02 -> 3.74 window 1024, 13.63 -> 12.61 window 4096, 4.71 -> 4.35 sinks + window.
        if dmax > 128:
            return _cfg(32, 32, 4, 1)
        out = dict(_cfg(64, 64, 4, 2), TMA=True)
        if d == dv == 128 and pclass in ("wide", "dense", "local"):
            # Hopper. Wide windows (twenty-first session): the Gluon dk / dv kernel with the query rows as rows (ROWS
            # 2, 3-slot Q / dO ring) and the Gluon dq kernel (3-slot K / V ring), both deterministic; each falls back
            # to its Triton kernel where it does not apply. H100, 16K, 64/8 heads, window 4096, backward ms, three
            # round-robin passes (triton_pack_variants.py --round 19 --repeat 3, benchmarks/results/h100-2026-12-06-
            # s21/c2): Triton 12.02 / 12.05 / 12.40, this 11.38 / 11.25 / 11.42.
            # Twenty-second session: the Gluon dq kernel writes delta itself (no attn_bwd_delta launch, 0.18 ms at
            # 16K). Round 20 (--round 20 --repeat 3, benchmarks/results/h100-2026-12-06-s22/c4), backward ms, medians
            # of three round-robin passes against the Triton kernels: causal 27.084 -> 25.041 with both Gluon kernels
            # (as on wide windows; by kernel 26.77 -> 24.95); on class local the Gluon dq kernel with the Triton
            # dk / dv kernel (TRITON_DKDV), window 1024 3.827 -> 3.754, sinks + window 4.394 -> 4.277 (both Gluon
            # kernels: 3.713 and 4.365 -- sinks + window is where the Gluon dk / dv kernel loses, its sink column split
            # over more work items).
            # Twenty-third session: the persistent Gluon dq kernel (DQ_PERSIST: one program an SM walking the work
            # items, the next item's Q / dO loaded while the last one's dq is stored). Round 21 (--round 21 --repeat
            # 3, benchmarks/results/h100-2026-12-06-s23/c1), backward ms, medians of three round-robin passes,
            # non-persistent -> persistent: window 1024 3.869 -> 3.628, sinks + window 4.240 -> 4.041 (with the
            # Triton dk / dv kernel), window 4096 11.728 -> 11.383, causal 25.563 -> 25.337 (with the Gluon one); by
            # kernel on window 1024, dq 1399 -> 1322 us
            # Twenty-ninth session: DQ_PIPE (each step's dq MMA issued behind the next step's S and dP) with DQ_PREF
            # (each item's O and lse loaded during the item before). Sustained backward at 16K (len_scale.py --bwd
            # --rounds 4: a second of calls a config, round-robin, under the 700 W cap; benchmarks/results/
            # h100-2026-12-07-s29/c2), medians of the four rounds' medians, ms: window 4096 11.40 -> 11.18 (faster in
            # 4 of 4 rounds; DQ_PIPE alone 11.24, DQ_PREF alone 11.44), window 1024 3.747 -> 3.732, sinks + window
            # 4.228 -> 4.196; by kernel (c1), dq / dk-dv time on window 4096 0.580 -> 0.529. Causal (c3, three
            # rounds): 24.68 / 25.10 / 25.42 -> 24.17 / 24.94 / 24.98
            # Thirty-fifth session: T_STATS on every class (the transposed Gluon dk / dv form, P^T and dS^T as register
            # operands, each step's lse (log2 units) and delta rows loaded by TMA with its Q / dO; on class local it
            # replaces the Triton dk / dv kernel). H100, 16K (benchmarks/results/h100-2026-12-07-s35): window 4096 by
            # kernel dk / dv 6.97 -> 5.79 ms, backward 10.78 -> 9.61; sustained (len_scale.py --bwd, medians of each
            # round, ms) window 4096 11.00 / 11.30 / 11.35 -> 10.25 / 10.39 / 10.43, causal 24.09 / 24.79 -> 22.53 /
            # 22.88, window 1024 3.708 / 3.778 -> 3.445 / 3.446, sinks + window 4.170 / 4.272 -> 3.857 / 3.865
            dq = dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_PIPE=True, DQ_PREF=True)
            out["GLUON_BWD"] = dict(dq, T_STATS=True, num_stages=3)
        return out
    if dmax <= 64:
        # H200, 16K, 64/8 heads, D=64 (benchmarks/triton_pack_variants.py --round 3 --d 64): two heads per
        # program at 64x64/4 warps 328 TF/s on a 1024 window vs 308 for 128x64 unpacked; causal 394 both.
        return dict(_cfg(64, 64, 4, 3), PACK=2, UNPACKED=_cfg(128, 64, 4, 3))
    if dmax <= 128:
        # Without packing (H100): causal 457 TF/s at 128x128/8 warps vs 412 at 128x64; a 1024 window 376 at
        # 64x64/4 vs 321 at 128x64. With four query heads of a GQA group per program (PACK 4: 256 rows of
        # 64 positions share each K/V tile; H200, 16K, 64/8 heads, benchmarks/triton_pack_variants.py):
        # causal 459 -> 501 TF/s, window 1024 367 -> 398, window 4096 425 -> 479, sinks + window 352 -> 377.
        # A group that four heads do not divide (MHA, or 2 query heads per KV head) takes UNPACKED.
        # IDX 2 (the full blocks' indices computed when every row's full list is contiguous, else IDX 1:
        # the next index loaded a step ahead), round 3 at 16K: causal 501 -> 527 TF/s, window 1024 401 ->
        # 425, window 4096 482 -> 525, sinks + window 377 -> 403.
        unpacked = _cfg(128, 128, 8, 3) if pclass == "dense" else _cfg(64, 64, 4, 3)
        if pclass == "nbhd":
            # N-D neighborhoods (tiled token order, every block partial for small kernels): smaller tiles waste
            # fewer pairs. H200, 16K, 64/8 heads (benchmarks/triton_nbhd_variants.py): 32x32 with four heads
            # per program 0.834 ms vs 1.072 at 64x64 p4 (13x13), 2.002 vs 2.222 (31x31), 1.310 vs 2.064
            # (5x7x7); unpacked 32x32 loses (1.843 / 5.090 / 2.940), so the unpacked alternative stays 64x64.
            # The next block's index loaded a step ahead (IDX 1) and full and partial blocks in one loop (MERGE),
            # on the in-place order, H100 2026-12-05 (benchmarks/results/h100-2026-12-05-s12/call3/
            # nbhd_fwd_next_log.txt): 0.845 -> 0.800 ms (13x13), 2.012 -> 1.883 (31x31), 1.296 -> 1.310 (5x7x7)
            return dict(_cfg(32, 32, 4, 3), PACK=4, IDX=1, MERGE=True, UNPACKED=unpacked)
        if pclass == "dense":
            # round 4 (H200, 16K, causal): 64x128 tiles with two heads per program and K / V through TMA
            # 8.41 -> 7.66 ms (523 -> 575 TF/s); unpacked, 128x128 with TMA 8.79 -> 7.82 ms. On windows the
            # same tiles won at 4096 then (3.74 -> 3.43 ms, H200) and lost at 1024 (1.26 -> 1.31) and on sinks +
            # window (1.32 -> 1.56). Since the local default took MERGE and NARROW, on the H100 (seventeenth
            # session, triton_pack_variants.py --round 10, 16K) window 4096 runs 3.650 ms on the local default
            # against 3.850 on these tiles, so class 'wide' now takes the local default (below).
            return dict(_cfg(64, 128, 8, 3), PACK=2, IDX=2, TMA=True, UNPACKED=dict(unpacked, IDX=2, TMA=True),
                        **_gluon(d, dv, pclass))
        # round 5 (H200, 16K): the full and partial blocks in one loop (MERGE, one software pipeline) 1.263 ->
        # 1.187 ms on window 1024 (flex / triton 1.29 -> 1.38), 1.325 -> 1.264 on sinks + window (1.42 -> 1.49);
        # on the dense tiles it loses (causal 8.01 -> 8.40, window 4096 3.35 -> 3.78), so only here.
        # NARROW 16 (block 0 as a 16-key tile on the query blocks that see only sinks in it; nothing changes on
        # patterns without such blocks), H100 2026-12-06 (triton_pack_variants.py --round 8): sinks + window 1024
        # 1.276 -> 1.262 ms at 16K, 5.107 -> 5.031 at 64K (flex / triton 1.48 -> 1.50); window 1024 1.206 -> 1.205
        local = dict(_cfg(64, 64, 8, 3), PACK=4, IDX=2, MERGE=True, NARROW=16, UNPACKED=dict(unpacked, IDX=2))
        return dict(local, **_gluon(d, dv, pclass))
    return _cfg(64, 32, 4, 2)


def candidates(kind: str, d: int, dv: int, pclass: str) -> list[dict]:
    """The small search space around the default."""
    dmax = max(d, dv)
    if kind == "bwd":
        if dmax > 128:
            return [_cfg(32, 32, 4, 1), _cfg(32, 32, 4, 2), _cfg(64, 32, 4, 1)]
        # the default (the Gluon kernels where it names them), the Triton one (TMA), its neighbours, and the dk/dv
        # kernel keys by queries (KT) on its own tiles
        best = default(kind, d, dv, pclass)
        return [best] * ("GLUON_BWD" in best) + [
            dict(_cfg(64, 64, 4, 2), TMA=True), _cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 1),
            _cfg(32, 64, 4, 2), dict(_cfg(64, 64, 4, 2), TMA=True, KT=True),
            dict(_cfg(128, 64, 8, 2), TMA=True, KT=True, BM_KV=64, BN_KV=128)]
    if dmax > 128:
        return [_cfg(64, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 32, 8, 2)]
    # the class's measured default, then older neighbours. LAZY rescaling and PIPE (the next scores during the
    # softmax) are left out: on the H200 (2026-12-05, triton_pack_variants.py --round 7, 16K) both lost on every
    # pattern (LAZY 1.08-1.13x slower than the default, PIPE at PACK 2 1.06-1.08x slower than the same tiles merged)
    best = default(kind, d, dv, pclass)
    out = [best, _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3),
           _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 2), dict(_cfg(64, 64, 8, 3), PACK=4, UNPACKED=_cfg(64, 64, 4, 3))]
    if dmax <= 64:
        out.append(_cfg(128, 32, 4, 3))
    return out


# -- the on-disk cache ------------------------------------------------------------------------------
_lock = threading.Lock()
_cache: dict | None = None
_enabled: bool | None = None


def _path() -> str:
    from .kernels import _cache_dir

    return os.path.join(_cache_dir(), "tuning.json")


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            with open(_path()) as f:
                _cache = json.load(f)
        except (OSError, ValueError):
            _cache = {}
    return _cache


def _save() -> None:
    path = _path()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def clear() -> None:
    """Forget every cached winner (memory and disk)."""
    global _cache
    with _lock:
        _cache = {}
        with contextlib.suppress(OSError):
            os.remove(_path())


def enabled() -> bool:
    return _enabled if _enabled is not None else os.environ.get("ATTNZOO_AUTOTUNE") == "1"


@contextlib.contextmanager
def autotuning(on: bool = True):
    """Turn the online search on (or off) inside a ``with`` block, whatever ATTNZOO_AUTOTUNE says."""
    global _enabled
    old, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = old


@functools.lru_cache(maxsize=None)
def _device_tag(dev_type: str, index: int | None) -> str:
    """"<device name>|triton <version>", once per device: the name lookup cost ~15-20 us per launch on the
    H200 (cProfile of the small-shape fwd+bwd, benchmarks/host_overhead.py --profile)."""
    import triton

    name = torch.cuda.get_device_name(index) if dev_type == "cuda" else "cpu-interpreter"
    return f"{name}|triton {triton.__version__}"


def key(kind, d, dv, dtype, pclass, device: torch.device) -> str:
    index = device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device()
    return f"{_device_tag(device.type, index)}|{kind}|d{d}|dv{dv}|{str(dtype).replace('torch.', '')}|{pclass}"


def cached(kind, d, dv, dtype, pclass, device) -> dict | None:
    with _lock:
        hit = _load().get(key(kind, d, dv, dtype, pclass, device))
    return dict(hit["config"]) if hit else None


def _time(run, cfg, device, reps: int = 3) -> float:
    if device.type == "cuda":
        run(cfg)  # compile + warm
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(cfg)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    run(cfg)
    t0 = time.perf_counter()
    for _ in range(reps):
        run(cfg)
    return (time.perf_counter() - t0) * 1e3 / reps


def search(kind, d, dv, dtype, pattern, device, run, cands=None) -> dict:
    """Time every candidate with ``run(cfg)``, cache and return the fastest. A candidate that fails
    to compile or launch (e.g. out of shared memory) is skipped."""
    pclass = pattern_class(pattern)
    cands = cands or candidates(kind, d, dv, pclass)
    results = []
    for cfg in cands:
        try:
            results.append((_time(run, cfg, device), cfg))
        except Exception as e:  # noqa: BLE001 - a config that cannot run is just not a winner
            results.append((float("inf"), dict(cfg, error=f"{type(e).__name__}: {e}"[:200])))
    ms, best = min(results, key=lambda r: r[0])
    if ms == float("inf"):
        raise RuntimeError(f"autotune: no {kind} config ran: " + "; ".join(c.get("error", "") for _, c in results))
    with _lock:
        _load()[key(kind, d, dv, dtype, pclass, device)] = dict(
            config=best, ms=ms, tried=[dict(c, ms=t if t != float("inf") else None) for t, c in results])
        _save()
    return dict(best)


def choose(kind, d, dv, dtype, pattern, device: torch.device, run=None) -> dict:
    """The config for one launch (see the module docstring), with any override in force merged over it
    (`overriding`, ``ATTNZOO_TRITON_OVERRIDE``). ``run(cfg)`` launches the kernel; it is needed only when a
    search may happen."""
    pclass = pattern_class(pattern)
    return _overridden(kind, pclass, _choose(kind, d, dv, dtype, pattern, pclass, device, run))


def _choose(kind, d, dv, dtype, pattern, pclass, device, run) -> dict:
    if device.type != "cuda" and not enabled():
        return dict(_INTERP)
    hit = cached(kind, d, dv, dtype, pclass, device)
    if hit is not None:
        return hit
    if enabled() and run is not None:
        return search(kind, d, dv, dtype, pattern, device, run,
                      cands=None if device.type == "cuda" else [dict(_INTERP), _cfg(32, 32, 1, 1)])
    if device.type != "cuda":
        return dict(_INTERP)
    out = default(kind, d, dv, pclass)
    return out if dtype in (torch.float16, torch.bfloat16) else without_tma(out)


# -- overrides: a config's keys replaced for a while, to compare a candidate with the default through the whole
# library (`attnzoo bench`, a model) without editing the table
KINDS = ("fwd", "bwd")
CLASSES = ("dense", "wide", "local", "nbhd")
_overrides: list = []  # (kind, pclass or None, settings) of the `overriding` blocks in force, innermost last


def _merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys: a value of None removes the key; a dict is merged into the dict ``base`` holds
    under that key and is skipped where it holds none (an override of one kernel's settings applies only where the
    config runs that kernel)."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            if isinstance(out.get(k), dict):
                out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_override(kind, pclass, settings) -> None:
    if kind not in KINDS:
        raise ValueError(f"triton config override: kind must be one of {KINDS}, got {kind!r}")
    if pclass is not None and pclass not in CLASSES:
        raise ValueError(f"triton config override: pattern class must be one of {CLASSES} (or None: every class), "
                         f"got {pclass!r}")
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise ValueError(f"triton config override: settings must be a dict of config keys, got {settings!r}")


@functools.lru_cache(maxsize=8)
def parse_overrides(text: str) -> tuple:
    """``ATTNZOO_TRITON_OVERRIDE``: a JSON object whose keys are a kind ("fwd", "bwd") or kind@class ("bwd@wide")
    and whose values are the settings merged over that config, e.g. '{"bwd": {"GLUON_BWD": {"TAIL_ORDER": true}}}'."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"ATTNZOO_TRITON_OVERRIDE is not valid JSON ({e}): {text!r}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"ATTNZOO_TRITON_OVERRIDE must be a JSON object such as "
                         f"'{{\"bwd@wide\": {{\"GLUON_BWD\": {{\"TAIL_ORDER\": true}}}}}}', got {text!r}")
    out = []
    for name, settings in spec.items():
        kind, _, pclass = name.partition("@")
        _check_override(kind, pclass or None, settings)
        out.append((kind, pclass or None, settings))
    return tuple(out)


def _overridden(kind: str, pclass: str, cfg: dict) -> dict:
    text = os.environ.get("ATTNZOO_TRITON_OVERRIDE")
    for k, c, settings in (parse_overrides(text) if text else ()) + tuple(_overrides):
        if k == kind and c in (None, pclass):
            cfg = _merge(cfg, settings)
    return cfg


@contextlib.contextmanager
def overriding(kind: str, settings: dict, pclass: str | None = None):
    """Inside the block, every config `choose` gives for ``kind`` ("fwd" or "bwd") on pattern class ``pclass``
    (None: every class) has ``settings`` merged over it (after ``ATTNZOO_TRITON_OVERRIDE``, inner blocks last): a key's
    value replaces the config's, None removes the key, and a dict is merged into the dict the config holds under
    that key (a kernel's settings, such as GLUON_BWD) and skipped where it holds none. The merged settings are
    checked where they are used, as the table's are."""
    _check_override(kind, pclass, settings)
    entry = (kind, pclass, dict(settings))
    with _lock:
        _overrides.append(entry)
    try:
        yield
    finally:
        with _lock:
            _overrides.remove(entry)


@contextlib.contextmanager
def overriding_json(text: str):
    """`overriding` for each entry of ``text``, a JSON object in the ``ATTNZOO_TRITON_OVERRIDE`` format (as
    `attnzoo bench run --variant` gives it), for the duration of the block. Raises ValueError as `parse_overrides`."""
    with contextlib.ExitStack() as stack:
        for kind, pclass, settings in parse_overrides(text):
            stack.enter_context(overriding(kind, settings, pclass))
        yield


def without_tma(cfg: dict) -> dict:
    """``cfg`` without TMA loads (also in its unpacked alternative): the table's TMA entries were measured on
    16-bit inputs only, so float32 calls keep the pointer loads."""
    out = {k: v for k, v in cfg.items() if k != "TMA"}
    if "UNPACKED" in out:
        out["UNPACKED"] = without_tma(out["UNPACKED"])
    return out
