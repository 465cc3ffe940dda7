"""Launching the Triton kernels: configs, cached layouts, generated kernels, and the `torch.library` ops.

`attention_fwd` / `attention_bwd` launch the kernels directly. `triton_attention` is the differentiable
entry point: the custom ops ``attnzoo::triton_attention_fwd`` / ``attnzoo::triton_attention_bwd`` with
fake (meta) implementations, so `torch.compile` can trace through them, and an autograd registration.
Custom ops cannot take Python objects, so patterns travel as integer ids of a process-wide registry.

Routed patterns (`RoutedBlocks`, a device block mask made anew by a router at every call) take another
road, so that nothing grows per call: no cache is keyed by the pattern object. Their layouts are
classified on the device at every call (no host sync; see `_routed_layouts`), the generated kernel is
keyed by the pattern's static part (`RoutedBlocks.static_key`: grid shape, block size, causal) and reads
the mask itself as its AUX tensor, and through the custom ops the registry holds only
``("RoutedBlocks", block_size, causal)`` while the mask travels as the ops' ``blocks`` tensor input.
"""
from __future__ import annotations

import functools
import heapq
import os
import warnings
from typing import Optional

import torch

from ...patterns import Full, RoutedBlocks
from .codegen import InPlaceTiled, generate, generate_routed, row_maps
from . import tuning
from .kernels import BWD, FWD, kernel_module

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def config(d: int, dv: int, device: torch.device, pattern=None, kind: str = "fwd", dtype=torch.bfloat16) -> dict:
    """Block sizes and launch parameters of the forward (or backward) kernel without a search: a cached
    tuning winner, else the measured table (see `tuning`)."""
    return tuning.choose(kind, d, dv, dtype, pattern, device)


def bwd_config(d: int, dv: int, device: torch.device, pattern=None, dtype=torch.bfloat16) -> dict:
    return config(d, dv, device, pattern, "bwd", dtype)


def _band_kernel(pattern, device: str) -> bool:
    """Whether the layouts of ``pattern`` come from the fused layout kernel (`band_layout`): banded patterns,
    on CUDA or in the interpreter; the others keep `Pattern.block_layout` (PyTorch ops)."""
    if not (device.startswith("cuda") or interpreting()):
        return False
    from .band_layout import supported
    return supported(pattern)[0]


@functools.lru_cache(maxsize=128)
def _layout(pattern, lq, lk, bm, bn, hq, device: str):
    pattern = pattern or Full()
    if _band_kernel(pattern, device):
        from .band_layout import band_layout
        return band_layout(pattern, lq, lk, bm, bn, device, num_heads=hq)
    return pattern.block_layout(lq, lk, bm, bn, device=device, num_heads=hq)


@functools.lru_cache(maxsize=128)
def _full_contiguous(pattern, lq, lk, bm, bn, hq, device: str) -> bool:
    """Whether every row's list of full kv blocks in `_layout` is a contiguous run (one host sync, cached):
    the forward's IDX 2 then computes the blocks instead of loading them."""
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    idx, n = lay.full_kv_indices, lay.full_kv_num_blocks
    j = torch.arange(idx.shape[-1], device=idx.device)
    return bool((((idx - idx[..., :1]) == j) | (j >= n[..., None])).all())


@functools.lru_cache(maxsize=128)
def _narrow_rows(pattern, lq, lk, bm, bn, hq, device: str, sn: int):
    """The forward's NARROW rows (cfg NARROW = sn): an int32 flag per query block, 1 where block 0 is the
    first of the block's partial kv blocks (for every head) and none of its queries sees a key of block 0 at
    or past ``sn`` -- block 0 then holds only keys below sn that it sees (attention sinks behind a window),
    and the kernel runs it as an sn-wide tile. None where no block qualifies, sn does not fit in a kv block,
    or the pattern depends on the head or has no elementwise mask here (one host sync, cached)."""
    pattern = pattern or Full()
    if not 16 <= sn < bn or sn & (sn - 1) or lk < bn or getattr(pattern, "head_dependent", True) \
            or isinstance(pattern, InPlaceTiled):
        return None
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    nq = lay.num_q_blocks
    kvn = lay.kv_num_blocks.reshape(-1, nq)
    first = lay.kv_indices[..., 0].reshape(-1, nq)
    first0 = ((kvn > 0) & (first == 0)).all(0)
    dev = first.device
    seen = pattern.mask(torch.arange(lq, device=dev)[:, None], torch.arange(sn, bn, device=dev)[None, :],
                        lq, lk).any(1)
    seen = torch.nn.functional.pad(seen, (0, nq * bm - lq)).reshape(nq, bm).any(1)
    flags = first0 & ~seen
    if not bool(flags.any()):
        return None
    return flags.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=128)
def _tlayout(pattern, lq, lk, bm, bn, hq, device: str):
    """The transposed layout: for each kv block, the query blocks that see it (partial / full)."""
    from ...patterns import BlockLayout

    if _band_kernel(pattern or Full(), device):
        from .band_layout import band_layout
        return band_layout(pattern or Full(), lq, lk, bm, bn, device, num_heads=hq, transposed=True)
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    part, full = lay.partial_blocks(), lay.full_blocks()
    t = lambda x: x.transpose(1, 2).contiguous()
    return BlockLayout.from_bool(t(part | full), t(full), block_q=bn, block_k=bm, q_len=lk, kv_len=lq)


@functools.lru_cache(maxsize=128)
def _bwd_plan(pattern, lq, lk, bm, bn, hq, device: str, cap: int | None = None):
    """Work items of the dk/dv kernel, longest first: rows (kv block, start, end, workspace slot or -1) over
    the kv block's list of visiting query blocks (full then partial), and the reduction table
    (kv block, first slot, number of slots) of the columns split over several items.

    A column longer than ``cap`` (default: twice the mean column, at least 16) is split evenly."""
    tlay = _tlayout(pattern, lq, lk, bm, bn, hq, device)
    cnt = (tlay.kv_num_blocks + tlay.full_kv_num_blocks)[0].amax(0).tolist()  # per kv block, max over heads
    nk = len(cnt)
    if cap is None:
        cap = max(16, 2 * -(-sum(cnt) // max(1, nk)))
    items, red, slot = [], [], 0
    for n, c in enumerate(cnt):
        pieces = max(1, -(-c // cap))
        if pieces == 1:
            items.append((n, 0, c, -1))
            continue
        per = -(-c // pieces)
        red.append((n, slot, pieces))
        for i in range(pieces):
            items.append((n, i * per, min(c, (i + 1) * per), slot + i))
        slot += pieces
    items.sort(key=lambda it: it[1] - it[2])  # longest first (stable: kv order among equals)
    it = torch.tensor(items, dtype=torch.int32).reshape(-1, 4).to(device)
    it.host_steps = tuple(e - s for _, s, e, _ in items)  # each item's query blocks, for TAIL_ORDER without a sync
    rd = torch.tensor(red, dtype=torch.int32).reshape(-1, 3).to(device)
    return it, rd, slot


# the dk/dv kernel never on fewer query rows per step than keys per program without KT (see attention_bwd);
# False: as the config asks (benchmarks/nbhd_inplace_repro.py, the repro of the wrong dk with 32 x 64 tiles)
SQUARE_KV = True


@functools.lru_cache(maxsize=128)
def _module(pattern, lq, lk, device: str, tile: tuple | None = None):
    """The pattern's kernel module and its AUX buffer; ``tile`` (BLOCK_M, BLOCK_N): the mask may assume
    those tiles (see `codegen.generate`). Patterns without block masks give the same source either way."""
    lines, aux = generate(pattern, lq, lk, tile)
    mod = kernel_module(lines, FWD, BWD, rows=row_maps(pattern, tile))
    aux = aux.to(device) if aux is not None else torch.zeros(1, dtype=torch.int32, device=device)
    return mod, aux


def _pack(want: int, g: int, lay, mod) -> int:
    """How many query heads of a GQA group one forward program takes: the largest power of two <= ``want``
    dividing the group size ``g``, and 1 when the layout or the mask depends on the head."""
    if want <= 1 or mod.uses_head or _lay_strides(lay)[0] or _lay_strides(lay)[2]:
        return 1
    p = 1
    while p * 2 <= want and g % (p * 2) == 0:
        p *= 2
    return p


# -- routed patterns: nothing cached per pattern object -------------------------------------------
def _routed(pattern) -> bool:
    return isinstance(pattern, RoutedBlocks)


@functools.lru_cache(maxsize=128)
def _routed_module_cached(key: tuple, lq: int, lk: int, nested: bool):
    return kernel_module(generate_routed(key, lq, lk, nested), FWD, BWD)


def _routed_module(pattern: RoutedBlocks, lq, lk, bm, bn, device: str):
    """(kernel module, AUX): the module is shared by every call with the same static key and shape; AUX is
    the call's own block mask, one byte per block, on the device (a view, no copy)."""
    mod = _routed_module_cached(pattern.static_key(), lq, lk, pattern.nested(lq, lk, bm, bn))
    aux = pattern._table(device).contiguous().view(-1).view(torch.uint8)
    return mod, aux


def _routed_layouts(pattern: RoutedBlocks, lq, lk, bm, bn, hq, device: str, transposed: bool):
    """(layout, transposed layout or None), classified on the device for this call (not cached), by the
    fused Triton kernel of `routed_layout` (the same lists as `RoutedBlocks.layouts`, in one pass)."""
    from .routed_layout import routed_layouts
    return routed_layouts(pattern, lq, lk, bm, bn, device, num_heads=hq, transposed=transposed)


@functools.lru_cache(maxsize=64)
def _routed_items(nk: int, device: str):
    """dk/dv work items of a routed call: one per kv block over its whole column (end 2**30 runs to the
    column's end), no split and so no reduction. Building the split plan of `_bwd_plan` would read the
    column lengths back to the host at every call; kv order launches the long columns of routed masks
    (sink blocks, the early causal columns) first. Cached per (nk, device): a handful of entries."""
    n = torch.arange(nk, dtype=torch.int32)
    items = torch.stack([n, torch.zeros_like(n), torch.full_like(n, 2**30), torch.full_like(n, -1)], 1)
    return items.to(device), torch.zeros((0, 3), dtype=torch.int32, device=device), 0


def _lay_strides(lay):
    """(head stride or 0 when the layout broadcasts over heads, row stride) of the counts and indices."""
    kvn, kvi = lay.kv_num_blocks, lay.kv_indices
    per_head = kvn.shape[1] > 1
    return (kvn.stride(1) if per_head else 0, kvn.stride(2), kvi.stride(1) if per_head else 0, kvi.stride(2))


def _prec(dtype) -> str:
    """tl.dot's input precision for inputs of ``dtype``. float32 follows PyTorch's own switch,
    ``torch.set_float32_matmul_precision``: "highest" (the default) computes in full float32 ("ieee", the
    precision the float64-reference tests hold float32 to); "high" or "medium" lets the products run on the
    tensor cores as TF32, as PyTorch's matmuls and SDPA do under the same setting -- several times faster
    (the small-batch float32 training shape ran 10x slower than bfloat16 with "ieee" on an H200). 16-bit
    inputs: "tf32" is ignored for them."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def attention_fwd(q, k, v, pattern, scale: float, poison: bool = False, cfg: dict | None = None):
    """-> (out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32)."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cfg is None:
        cfg = tuning.choose("fwd", d, dv, q.dtype, pattern, q.device,
                            run=lambda c: attention_fwd(q, k, v, pattern, scale, cfg=c))
    dev = str(q.device)
    for gcfg in (cfg.get("GLUON_CFG"), cfg if cfg.get("GLUON") else None):
        # the Gluon forward (Hopper) where it applies: the class default's GLUON_CFG, or a config asking for it;
        # elsewhere the Triton kernel below runs (with the class's own Triton config, or the asked-for tiles)
        got = _gluon_fwd(q, k, v, pattern, scale, poison, gcfg) if gcfg else None
        if got is not None:
            return got
    cfg = {key: val for key, val in cfg.items() if key != "GLUON_CFG"}
    sn = cfg.get("NARROW") or 0
    if isinstance(sn, bool) or not isinstance(sn, int) or (sn and (sn < 16 or sn & (sn - 1))):
        raise ValueError(f"cfg NARROW (keys of the narrow sink tile) must be 0 or a power of two >= 16, got {sn!r}")
    if _routed(pattern) and "UNPACKED" in cfg:  # per-call layouts, per head: build them once, unpacked
        cfg = cfg["UNPACKED"]
    while True:
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        if _routed(pattern):
            lay = _routed_layouts(pattern, lq, lk, bm, bn, hq, dev, transposed=False)[0]
            mod, aux = _routed_module(pattern, lq, lk, bm, bn, dev)
        else:
            lay = _layout(pattern, lq, lk, bm, bn, hq, dev)
            mod, aux = _module(pattern, lq, lk, dev, (bm, bn))
        pack = _pack(cfg.get("PACK", 1), hq // hkv, lay, mod)
        if pack == cfg.get("PACK", 1) or "UNPACKED" not in cfg:
            break
        cfg = cfg["UNPACKED"]  # a packed config whose packing does not apply here: its unpacked alternative
    smaller = _SHRUNK.get((mod.__name__, repr(cfg))) if _SHRUNK else None
    if smaller is not None:  # this config did not fit this kernel before: go straight to what did
        return attention_fwd(q, k, v, pattern, scale, poison, cfg=smaller)
    out, lse = _fwd_outputs(q, dv, poison)
    idx_mode = int(cfg.get("IDX", 0))
    if idx_mode == 2 and (_routed(pattern) or not _full_contiguous(pattern, lq, lk, bm, bn, hq, dev)):
        idx_mode = 1
    grid = (lay.num_q_blocks, b * hq // pack)
    try:
        nrow = _narrow_rows(pattern, lq, lk, bm, bn, hq, dev, int(cfg["NARROW"])) \
            if cfg.get("NARROW") and not _routed(pattern) else None
        _launch_fwd(mod, grid, q, k, v, out, lse, aux, lay, hq, hkv, lq, lk, d, dv, scale, bm, bn, pack, idx_mode, cfg,
                    nrow=nrow)
    except Exception as e:  # Triton's OutOfResources: this pattern's mask needs more shared memory (see _shrink)
        smaller = _shrink(cfg) if type(e).__name__ == "OutOfResources" else None
        if smaller is None:
            raise
        _SHRUNK[(mod.__name__, repr(cfg))] = smaller
        return attention_fwd(q, k, v, pattern, scale, poison, cfg=smaller)
    return out, lse


# (kernel module, config) -> the smaller config that replaced it after Triton ran out of shared memory
_SHRUNK: dict = {}


def _shrink(cfg: dict) -> dict | None:
    """The next config to try when ``cfg`` does not fit in shared memory: one pipeline stage fewer, then the
    unpacked alternative; None when nothing is left. (A mask that gathers per element, e.g. a block-sparse
    table lookup, is multi-buffered by Triton's pipeliner: 3 stages of a 256 x 64 int32 gather do not fit
    next to the K/V tiles on an H200.)"""
    if cfg["num_stages"] > 1:
        return dict(cfg, num_stages=cfg["num_stages"] - 1)
    return cfg.get("UNPACKED")


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=16)
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


@functools.lru_cache(maxsize=16)
def _has_tma(device: torch.device) -> bool:
    """Tensor-memory accelerator: Hopper (sm_90) and later; the interpreter (CPU tensors) runs descriptors too."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _kv_descriptors(k, v, bn: int, even: bool):
    """Tensor descriptors (TMA on Hopper) over K's and V's (B * Hkv * Lk, D) views with (bn, D) blocks, or
    None where they do not apply: lengths not multiples of the block (a block would run into the next
    head's rows), non-contiguous K / V, or no descriptor support in this Triton. (The backward also takes
    q and dO through it.)"""
    if not (even and k.is_contiguous() and v.is_contiguous()) or not _has_tma(k.device):
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton before 3.4
        return None
    k2, v2 = k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])
    return (TensorDescriptor.from_tensor(k2, [bn, k2.shape[1]]), TensorDescriptor.from_tensor(v2, [bn, v2.shape[1]]))


def _launch_fwd(mod, grid, q, k, v, out, lse, aux, lay, hq, hkv, lq, lk, d, dv, scale, bm, bn, pack, idx_mode, cfg,
                nrow=None):
    kvn, kvi, fkvn, fkvi = lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks, lay.full_kv_indices
    even = lq % bm == 0 and lk % bn == 0 and d == _pow2(d) and dv == _pow2(dv)
    desc = _kv_descriptors(k, v, bn, even) if cfg.get("TMA") and not mod.maps_k else None
    extra = dict(KD=desc[0], VD=desc[1], TMA=True) if desc else {}
    if cfg.get("WS"):
        extra["WS"] = True
    if cfg.get("MERGE"):  # full and partial blocks in one loop (kernels._fwd_blocks_merged)
        extra["MERGE"] = True
    if cfg.get("LAZY"):  # rescale acc only when a row's maximum grew by more than kernels' LAZY_TAU
        extra["LAZY"] = True
    if cfg.get("PIPE"):  # the merged loop with the next block's scores in flight during the softmax
        extra["PIPE"] = True
    if nrow is not None:  # block 0 as a NARROW-key tile on the rows that see only sinks in it
        extra.update(NROW=nrow, NARROW=int(cfg["NARROW"]))
    mod.attn_fwd[grid](q, k, v, out, lse, aux, kvn, kvi, fkvn, fkvi,
               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
               *_lay_strides(lay),
               hq, hq // hkv, lq, lk, lk - lq, d, dv, scale * LOG2E,
               BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_M=bm, BLOCK_N=bn,
               EVEN=even, PREC=_prec(q.dtype), PACK=pack, FOLD=bool(cfg.get("FOLD", True)) and scale > 0,
               IDX=idx_mode, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)


def _fwd_outputs(q, dv: int, poison: bool):
    """The forward's (out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32), NaN-filled with ``poison``."""
    b, hq, lq, _ = q.shape
    fill = torch.full if poison else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    return (fill((b, hq, lq, dv), float("nan"), dtype=q.dtype, device=q.device),
            fill((b, hq, lq), float("nan"), dtype=torch.float32, device=q.device))


def _gluon_fwd(q, k, v, pattern, scale: float, poison: bool, gcfg: dict):
    """The forward through the Gluon kernel with config ``gcfg`` -> (out, lse), or None where it does not apply
    (`gluon_plan`; the cheap checks first, so other devices and shapes build no layout for it)."""
    if gcfg.get("GLUON") not in ("ws", "wsp"):
        raise ValueError(f"cfg GLUON must be 'ws' (warp-specialised) or 'wsp' (its persistent form), got "
                         f"{gcfg.get('GLUON')!r} (the single-partition form, GLUON=True, was removed)")
    programs = gcfg.get("PROGRAMS")
    if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int) or programs < 1):
        raise ValueError(f"cfg PROGRAMS (the persistent Gluon grid's size) must be a positive int, got {programs!r}")
    xpipe = gcfg.get("XPIPE", False)
    if type(xpipe) not in (int, bool) or xpipe not in (0, 1):
        raise ValueError(f"cfg XPIPE (the persistent Gluon forward's item boundary) must be a bool, got {xpipe!r} (the "
                         "thirtieth session's form 2, the last P V before the next item's scores, was slower: removed)")
    xn = gcfg.get("XPIPE_NARROW", False)
    if not (xn == "fold" or (type(xn) in (int, bool) and xn in (0, 1))):
        raise ValueError(f"cfg XPIPE_NARROW (XPIPE with the narrow sink tile) must be a bool or 'fold' (the sinks "
                         f"folded into a partial block's tile), got {xn!r} (2, consumer 0's narrow step before the "
                         "item boundary, was slower in the thirty-second session: removed)")
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    bm, bn = gcfg["BLOCK_M"], gcfg["BLOCK_N"]
    if q.device.type != "cuda" or _routed(pattern) or lq % bm or lk % bn or (hq // hkv) % gcfg.get("PACK", 1) \
            or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    dev = str(q.device)
    lay = _layout(pattern, lq, lk, bm, bn, hq, dev)
    mod, aux = _module(pattern, lq, lk, dev, (bm, bn))
    pack = _pack(gcfg.get("PACK", 1), hq // hkv, lay, mod)
    if not gluon_plan(q, k, v, pattern, gcfg, pack, mod, _full_contiguous(pattern, lq, lk, bm, bn, hq, dev))[0]:
        return None
    key = (_gluon_module(pattern, lq, lk, (bm, bn)).__name__, repr(sorted(gcfg.items())), pack, q.dtype, d)
    if key in _GLUON_FAILED:
        return None
    out, lse = _fwd_outputs(q, dv, poison)
    launch = lambda: _launch_gluon(pattern, lq, lk, q, k, v, out, lse, aux, lay, scale, gcfg, pack)  # noqa: E731
    return (out, lse) if _gluon_launch(key, "forward", launch) else None


# Gluon is experimental and changes between Triton releases: a Gluon kernel that fails on its first launch here (a
# compile error on this Triton, resources) is recorded, with a warning, and the Triton kernel runs in its place from
# then on. A kernel that has run before re-raises (that is a real error).
_GLUON_FAILED: dict = {}
_GLUON_RAN: set = set()


def _gluon_launch(key, what: str, launch) -> bool:
    """Run ``launch()`` (a Gluon kernel, cache key ``key``) -> True, or False (warning once, see _GLUON_FAILED)."""
    try:
        launch()
    except Exception as e:  # noqa: BLE001 - see _GLUON_FAILED
        if key in _GLUON_RAN:
            raise
        _GLUON_FAILED[key] = f"{type(e).__name__}: {e}"
        warnings.warn(f"attnzoo: the Gluon {what} failed to build here ({_GLUON_FAILED[key][:300]}); the Triton "
                      "kernel runs instead", RuntimeWarning, stacklevel=4)
        return False
    _GLUON_RAN.add(key)
    return True


def gluon_ws_smem(cfg: dict, d: int, esize: int) -> int:
    """Shared memory (bytes) of the warp-specialised Gluon forward: both heads' Q tiles (QBUF buffers in the
    persistent form, one otherwise), the K and V ring, and a narrow K and V tile (cfg NARROW keys) per Q buffer."""
    qbuf = int(cfg.get("QBUF", 1)) if cfg.get("GLUON") == "wsp" else 1
    narrow = int(cfg.get("NARROW") or 0)
    return 2 * esize * d * ((cfg["BLOCK_M"] + narrow) * qbuf + cfg["num_stages"] * cfg["BLOCK_N"])


def _gluon_why_not(q, v) -> str | None:
    """Why no Gluon kernel (forward or dk / dv) runs on these inputs at all, or None: the device, this Triton's Gluon,
    the dtype and the head dims."""
    from . import gluon_fwd
    if q.device.type != "cuda" or interpreting():
        return "Gluon kernels run on CUDA only (not in the interpreter)"
    if not _is_hopper(q.device):
        return "the Gluon kernels are written for Hopper (sm_90: warpgroup MMA)"
    if not gluon_fwd.available():
        return "this Triton has no Gluon Hopper API"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "float16 / bfloat16 only"
    if q.shape[3] != v.shape[3] or q.shape[3] not in (64, 128):
        return "head dims 64 or 128 with Dv = D only"
    return None


def gluon_plan(q, k, v, pattern, cfg: dict, pack: int, mod, contiguous_full: bool) -> tuple[bool, str]:
    """Whether the forward can run the Gluon kernel (`gluon_fwd`, cfg GLUON) here -> (ok, why not)."""
    lq, d, lk = q.shape[2], q.shape[3], k.shape[2]
    why = _gluon_why_not(q, v)
    if why:  # (the reasons common to the Gluon kernels first)
        pass
    elif cfg["BLOCK_M"] != 64 or cfg["BLOCK_N"] not in (64, 128) or lq % 64 or lk % cfg["BLOCK_N"]:
        why = "64-row query blocks, 64- or 128-key blocks, lengths multiples of them"
    elif pack != 2 or cfg.get("PACK") != 2:
        why = ("PACK 2: two query heads of a GQA group per program, one consumer warpgroup each (a group it divides; a "
               "head-independent mask and layout)")
    elif gluon_ws_smem(cfg, d, q.element_size()) > 227 * 1024:
        why = "Q buffers and the K / V ring must fit in 227 KB of shared memory"
    elif mod.maps_q or mod.maps_k or _routed(pattern):
        why = "no row maps (tiled neighborhoods) or routed patterns"
    elif not contiguous_full:
        why = "each query block's full kv blocks must form one contiguous run"
    elif not all(t.is_contiguous() for t in (q, k, v)):
        why = "contiguous q, k, v"
    elif _gluon_module(pattern, lq, lk, (cfg["BLOCK_M"], cfg["BLOCK_N"])) is None:
        why = "a mask without lookup tables"
    return why is None, why or ""


@functools.lru_cache(maxsize=128)
def _gluon_module(pattern, lq, lk, tile: tuple):
    """The Gluon forward's module with the pattern's mask, or None where that mask is not plain arithmetic."""
    from . import gluon_fwd
    lines = generate(pattern, lq, lk, tile)[0]
    far = generate(pattern, lq, lk, tile, kmin=tile[1])[0]  # (MASK_FAR: the kv blocks past the first)
    return gluon_fwd.gluon_module(lines, far) if gluon_fwd.plain_mask(lines) and gluon_fwd.plain_mask(far) else None


# NARROW in the Gluon kernels (block 0 as a NARROW-key sink tile, loaded with Q for every work item, its step run on
# every item and kept where flagged). Earlier forms -- the tile's own mbarriers, then its load predicated and its step
# behind a branch -- faulted or gave wrong outputs on the unflagged items of the persistent kernel with two Q buffers
# (H100, eighteenth / nineteenth sessions, benchmarks/gluon_narrow_map.py); this one was right there and runs sinks +
# window 1024 at 16K in 1.146 ms against 1.188 without it (benchmarks/results/h100-2026-12-06-s19/c3). False: a Gluon
# config's NARROW is ignored (block 0 runs as a full tile).
GLUON_NARROW = True

def gluon_narrow(cfg: dict, pattern, lq: int, lk: int, hq: int, device: str):
    """(NARROW keys, the int32 flag per query block) the Gluon kernel runs with, or (0, None): no cfg NARROW, no
    query block whose block 0 holds only sinks (`_narrow_rows`), or GLUON_NARROW off."""
    sn = int(cfg.get("NARROW") or 0) if GLUON_NARROW else 0
    nrow = _narrow_rows(pattern, lq, lk, cfg["BLOCK_M"], cfg["BLOCK_N"], hq, device, sn) if sn else None
    return (sn, nrow) if nrow is not None else (0, None)


@functools.lru_cache(maxsize=128)
def _mask_far_ok(pattern, lq, lk, bm, bn, hq, device: str) -> bool:
    """Whether cfg MASK_FAR applies (the Gluon forward runs block 0 first where it is a partial block, and its main
    loop takes the mask for keys past block 0, `generate(..., kmin=BLOCK_N)`): the mask past block 0 is shorter, and
    wherever block 0 is in a query block's partial list it is the list's first entry (one host sync, cached)."""
    if generate(pattern, lq, lk, (bm, bn), kmin=bn)[0] == generate(pattern, lq, lk, (bm, bn))[0]:
        return False
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    idx, cnt = lay.kv_indices, lay.kv_num_blocks
    j = torch.arange(idx.shape[-1], device=idx.device)
    return not bool(((idx == 0) & (j > 0) & (j < cnt[..., None])).any())


@functools.lru_cache(maxsize=128)
def _narrow_merge_ok(pattern, lq, lk, bm, bn, hq, device: str, sn: int) -> bool:
    """Whether every query block flagged by `_narrow_rows` keeps at least one kv block besides block 0 (for every
    head): the Gluon kernel's NARROW_MERGE issues the narrow tile's scores with its first regular step's, so an item
    with the narrow tile alone (sinks without a window) has no such step (one host sync, cached)."""
    flags = _narrow_rows(pattern, lq, lk, bm, bn, hq, device, sn)
    if flags is None:
        return False
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    total = (lay.kv_num_blocks + lay.full_kv_num_blocks).reshape(-1, lay.num_q_blocks)
    return bool((total[:, flags.bool()] >= 2).all())


@functools.lru_cache(maxsize=128)
def _narrow_fold(pattern, lq, lk, bm, bn, hq, device: str, sn: int):
    """The Gluon forward's NFOLD (cfg XPIPE_NARROW="fold"): for each query block flagged by `_narrow_rows`, a slot of
    sn key columns (an sn-aligned piece of one of its partial kv blocks other than block 0) that none of its queries
    sees -- the kernel loads the sinks there instead. -> (an int32 per query block: 0 where unflagged, else 1 + the
    slot's index in its block; the layout's partial indices with that block moved to the entry after block 0, so
    that the kernel runs it first), or None where a flagged block has no such slot or the layout differs by head
    (one host sync, cached). A window's first block starts with unseen keys where its query block is odd (64-row
    blocks, 128-key blocks, a window of a multiple of 128), its diagonal block ends with them where it is even."""
    flags = _narrow_rows(pattern, lq, lk, bm, bn, hq, device, sn)
    if flags is None:
        return None
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    kvi, kvn = lay.kv_indices, lay.kv_num_blocks
    if kvi.shape[0] != 1 or bool((kvi != kvi[:, :1]).any()) or bool((kvn != kvn[:, :1]).any()):
        return None
    fq = flags.nonzero().squeeze(1)
    cand = kvi[0, 0, fq, 1:].long()  # (F, m - 1): each flagged block's partial blocks past block 0
    ncand = kvn[0, 0, fq].long() - 1
    dev, ch = cand.device, bn // sn
    qpos = (fq.long()[:, None] * bm + torch.arange(bm, device=dev))[:, None, :, None]  # (F, 1, bm, 1)
    free = torch.zeros(cand.shape + (ch,), dtype=torch.bool, device=dev)
    for c in range(cand.shape[1]):
        kpos = (cand[:, c, None] * bn + torch.arange(bn, device=dev)).reshape(-1, ch, 1, sn)  # (F, ch, 1, sn)
        seen = pattern.mask(qpos, kpos, lq, lk).any(-1).any(-1)
        free[:, c] = ~seen & (c < ncand)[:, None]
    free = free.reshape(len(fq), -1)
    if not bool(free.any(1).all()):
        return None
    pick = free.to(torch.int8).argmax(1)  # the first free slot: (entry - 1) * ch + slot
    entry, slot = pick // ch + 1, pick % ch
    nrow = torch.zeros(lay.num_q_blocks, dtype=torch.int32, device=dev)
    nrow[fq] = (slot + 1).to(torch.int32)
    kvi2 = kvi.clone()
    rows, f = kvi2[0, :, fq], torch.arange(len(fq), device=dev)  # (H, F, m): swap entry 1 with the fold block's entry
    first, chosen = rows[:, f, 1].clone(), rows[:, f, entry].clone()
    rows[:, f, entry] = first
    rows[:, f, 1] = chosen
    kvi2[0, :, fq] = rows
    return nrow, kvi2


@functools.lru_cache(maxsize=128)
def _every_row_visits(pattern, lq, lk, bm, bn, hq, device: str) -> bool:
    """Whether every query block visits at least one kv block (for every head): the persistent Gluon forward's XPIPE
    issues each item's first scores at the previous item's end (one host sync, cached)."""
    lay = _layout(pattern, lq, lk, bm, bn, hq, device)
    return bool(((lay.kv_num_blocks + lay.full_kv_num_blocks) >= 1).all())


# launches of the Gluon forward so far (benchmarks check that a GLUON config ran it, rather than the fallback), and
# of its persistent form with the narrow tile last (NARROW_LAST) and with XPIPE among them
GLUON_LAUNCHES = GLUON_NLAST_LAUNCHES = GLUON_XPIPE_LAUNCHES = 0
GLUON_FOLD_LAUNCHES = 0  # (XPIPE with the sinks folded into a partial block, NFOLD)


def _launch_gluon(pattern, lq, lk, q, k, v, out, lse, aux, lay, scale, cfg, pack):
    global GLUON_LAUNCHES
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    gmod = _gluon_module(pattern, lq, lk, (bm, bn))
    gdt = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    glay = gl.NVMMASharedLayout.get_default_for([bn, d], gdt)
    k2, v2 = k.view(-1, d), v.view(-1, d)
    kd = GluonDescriptor(k2, list(k2.shape), list(k2.stride()), [bn, d], glay)
    vd = GluonDescriptor(v2, list(v2.shape), list(v2.stride()), [bn, d], glay)
    # a producer warp and two consumer warpgroups (gluon_fwd's gluon_attn_fwd_ws / _wsp)
    q2 = q.view(-1, d)
    qlay = gl.NVMMASharedLayout.get_default_for([bm, d], gdt)
    qd = GluonDescriptor(q2, list(q2.shape), list(q2.stride()), [bm, d], qlay)
    # registers: the launch reserves MAXNREG for each of the 12 warps (3 warpgroups, the producer's rounded up);
    # the producer gives its own back (24) and the consumers take REGS. 64-key tiles fit in 168 (no spills at
    # ptxas sm_90), 128-key tiles need 232 (44 spill loads / stores a step at 168)
    regs = int(cfg.get("REGS", 168 if bn == 64 else 232))
    maxnreg = int(cfg.get("MAXNREG", 168))
    # NARROW: block 0 as a NARROW-key tile on the query blocks _narrow_rows flags (its own descriptors)
    sn, nrow = gluon_narrow(cfg, pattern, lq, lk, hq, str(q.device))
    if nrow is None:
        kdn, vdn, nrow = kd, vd, lay.kv_num_blocks
    else:
        nlay = gl.NVMMASharedLayout.get_default_for([sn, d], gdt)
        kdn = GluonDescriptor(k2, list(k2.shape), list(k2.stride()), [sn, d], nlay)
        vdn = GluonDescriptor(v2, list(v2.shape), list(v2.stride()), [sn, d], nlay)
    def kernel_args(flags, kv_indices):  # (the flags and the partial lists: NFOLD passes its own, _narrow_fold)
        return (qd, kd, vd, kdn, vdn, out, lse, aux, flags, lay.kv_num_blocks, kv_indices, lay.full_kv_num_blocks,
                lay.full_kv_indices, *_lay_strides(lay), hq, hq // hkv, lq, lk, lk - lq)

    args = kernel_args(nrow, lay.kv_indices)
    # NARROW_MERGE (opt-in, nineteenth session, not yet run): the narrow tile's scores issued and softmaxed with the
    # first regular step's instead of in a step of their own (where every flagged block has such a step)
    merge = bool(cfg.get("NARROW_MERGE")) and sn > 0 and _narrow_merge_ok(pattern, lq, lk, bm, bn, hq,
                                                                           str(q.device), sn)
    meta = dict(D=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=int(cfg["num_stages"]), PINGPONG=bool(cfg.get("PINGPONG")),
                CONSUMER_REGS=regs, NARROW=sn, NMERGE=merge,
                FAR=bool(cfg.get("MASK_FAR")) and _mask_far_ok(pattern, lq, lk, bm, bn, hq, str(q.device)),
                num_warps=4, maxnreg=maxnreg)
    if cfg["GLUON"] == "wsp":  # persistent: at most one program per SM, walking the work items
        items = lay.num_q_blocks * b * hq // 2
        # (cfg PROGRAMS: fewer programs than SMs -- a diagnostic knob; 1 walks every item in turn)
        grid = (min(items, int(cfg.get("PROGRAMS") or _sm_count(q.device))),)
        # NARROW_LAST (persistent form; twenty-eighth session): the narrow tile at the item's end, its scores issued
        # with the last block's P V (where every flagged block has such a block, as for NARROW_MERGE)
        # (2: consumer 1 only, consumer 0 at the start as before -- their narrow steps at different times)
        ok = sn > 0 and not merge and _narrow_merge_ok(pattern, lq, lk, bm, bn, hq, str(q.device), sn)
        meta["NLAST"] = int(cfg.get("NARROW_LAST") or 0) if ok else 0
        global GLUON_NLAST_LAUNCHES, GLUON_XPIPE_LAUNCHES
        # XPIPE (thirtieth session): each item's first scores issued with the previous item's last P V (no turn
        # barriers, every query block with a kv block). Where the narrow tile applies, only with XPIPE_NARROW (opt-in):
        # the narrow tile then runs at the item's end in both consumers, and every flagged item must keep a regular
        # step (as for NARROW_LAST). It also needs two Q buffers: its narrow step (which reads the item's Q buffer and
        # frees it) comes after the next item's first scores, whose Q would wait for that very buffer with one
        narrow_ok = sn == 0 or (bool(cfg.get("XPIPE_NARROW")) and ok and int(cfg.get("QBUF", 1)) >= 2)
        meta["XPIPE"] = bool(cfg.get("XPIPE")) and narrow_ok and not meta["PINGPONG"] \
            and _every_row_visits(pattern, lq, lk, bm, bn, hq, str(q.device))
        GLUON_XPIPE_LAUNCHES += meta["XPIPE"]
        if meta["XPIPE"]:
            meta["NLAST"] = 0  # (XPIPE's own boundary takes the narrow tile)
            # XPIPE_NARROW="fold" (thirty-second session): the sinks into an unseen slot of a partial block's tile
            # instead of the narrow tile (gluon_fwd's NFOLD: that block runs first, so it needs MASK_FAR's order)
            fold = _narrow_fold(pattern, lq, lk, bm, bn, hq, str(q.device), sn) \
                if sn > 0 and cfg.get("XPIPE_NARROW") == "fold" and meta["FAR"] else None
            if fold is not None:
                global GLUON_FOLD_LAUNCHES
                GLUON_FOLD_LAUNCHES += 1
                meta["NFOLD"] = True
                args = kernel_args(*fold)
        GLUON_NLAST_LAUNCHES += bool(meta["NLAST"])
        gmod.gluon_attn_fwd_wsp[grid](*args, lay.num_q_blocks, items, scale * LOG2E,
                                      QBUF=int(cfg.get("QBUF", 1)), ORDER=int(cfg.get("ORDER", 1)), **meta)
    else:
        gmod.gluon_attn_fwd_ws[(lay.num_q_blocks, b * hq // 2)](*args, scale * LOG2E, **meta)
    GLUON_LAUNCHES += 1


def kv_tiles(cfg: dict, pattern, gpu: bool) -> tuple:
    """(cfg, BM_KV, BN_KV): the dk/dv kernel's tiles, its own (BM_KV query rows per step, BN_KV keys per
    program) or the dq kernel's. On the GPU it never takes fewer query rows per step than keys per program
    without KT: on the H200 (2026-12-05, benchmarks/nbhd_inplace_repro.py) 32 x 64 and 16 x 64 (P and dS
    transposed) gave a wrong dk on scattered rows, now and then (2 to 5 of 12 tile / warps / stages / MERGE
    variants per run, on the in-place and the gathered order; dv, dq, square tiles, 64 x 32, 32 x 128 and KT
    right in every run, and all of them in the interpreter): a race the kernel's source does not show. Square
    tiles instead (BM_KV = BN_KV), or KT where both kernels share one tile (routed patterns)."""
    bm2, bn2 = cfg.get("BM_KV", cfg["BLOCK_M"]), cfg.get("BN_KV", cfg["BLOCK_N"])
    if bm2 < bn2 and not cfg.get("KT") and SQUARE_KV and gpu:
        if _routed(pattern):
            return dict(cfg, KT=True), bm2, bn2
        return cfg, bn2, bn2
    return cfg, bm2, bn2


def attention_bwd(dout, dlse, q, k, v, out, lse, pattern, scale: float, cfg: dict | None = None,
                  poison: bool = False, split_cap: int | None = None):
    """Gradients (dq, dk, dv) of the loss given dout (and dlse, the lse's gradient, or None).

    ``cfg`` (default: `tuning.choose`): BLOCK_M / BLOCK_N / num_warps / num_stages of both kernels; optional
    keys: TMA, MERGE, PACK_DQ, and for the dk/dv kernel alone KT (its tiles keys by queries), BM_KV / BN_KV
    (its own tiles: query rows per step, keys per program; its own transposed layout, plan and module),
    WARPS_KV / STAGES_KV. Routed patterns keep one tile for both kernels. ATOMIC_DQ: no dq kernel; the dk/dv
    kernel adds each tile's dS K to a float32 accumulator by atomics (not bitwise deterministic). GLUON_BWD (Hopper,
    True or a dict, checked by `gluon_bwd_settings`): the Gluon dk / dv kernel (num_stages, REGS, ACC_INIT, ROWS,
    FUSED_DQ, T_STATS, TAIL_ORDER; SPLIT_CAP: its work items' most query blocks, where ``split_cap`` is None) and the
    Gluon dq kernel (GLUON_DQ, DQ_STAGES; SEP_DELTA: delta by its own kernel first; DQ_PERSIST, DQ_QBUF, DQ_PIPE,
    DQ_PREF: its persistent form; TRITON_DKDV: with the Triton dk / dv kernel); each falls back to its Triton kernel
    where it does not apply or its first launch fails."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    q, k, v, out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    if cfg is None:
        cfg = tuning.choose("bwd", d, dv, q.dtype, pattern, q.device,
                            run=lambda c: attention_bwd(dout, dlse, q, k, v, out, lse, pattern, scale, cfg=c,
                                                        split_cap=split_cap))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    gbwd = _gluon_bwd_cfg(q, k, v, dout, pattern, cfg)
    if gbwd is not None and not gbwd.get("TRITON_DKDV"):  # the Gluon dk / dv kernel's tiles: 64 query rows a step,
        cfg, bm2, bn2 = dict(cfg, GLUON_BWD=gbwd), 64, 128  # 128 keys a program
    else:
        cfg, bm2, bn2 = kv_tiles({key: val for key, val in cfg.items() if key != "GLUON_BWD"}, pattern, q.is_cuda)
        if gbwd is not None:  # TRITON_DKDV: the Gluon dq kernel with the Triton dk / dv kernel on its own tiles
            cfg = dict(cfg, GLUON_BWD=gbwd)
    dev = str(q.device)
    if _routed(pattern):  # one classification for both kernels: the dq kernel's tiles
        bm2, bn2 = bm, bn
        lay, tlay = _routed_layouts(pattern, lq, lk, bm, bn, hq, dev, transposed=True)
        mod, aux = _routed_module(pattern, lq, lk, bm, bn, dev)
        mod_kv, aux_kv = mod, aux
    else:
        lay = _layout(pattern, lq, lk, bm, bn, hq, dev)
        tlay = _tlayout(pattern, lq, lk, bm2, bn2, hq, dev)
        mod, aux = _module(pattern, lq, lk, dev, (bm, bn))
        mod_kv, aux_kv = (mod, aux) if (bm2, bn2) == (bm, bn) else _module(pattern, lq, lk, dev, (bm2, bn2))
    smaller = _SHRUNK.get((mod.__name__, "bwd", repr(cfg))) if _SHRUNK else None
    if smaller is not None:  # this config did not fit these kernels before (see attention_fwd)
        return attention_bwd(dout, dlse, q, k, v, out, lse, pattern, scale, smaller, poison, split_cap)
    bd, bdv, prec = _pow2(d), _pow2(dv), _prec(q.dtype)
    delta = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)  # written by attn_bwd_dq
    has_dlse = dlse is not None
    dl = dlse.float().contiguous() if has_dlse else delta
    fill = torch.full if poison else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    dq = fill(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    dk = fill(k.shape, float("nan"), dtype=k.dtype, device=k.device)
    dvv = fill(v.shape, float("nan"), dtype=v.dtype, device=v.device)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    if _routed(pattern):
        items, red, nslots = _routed_items(tlay.num_q_blocks, dev)
    else:
        if split_cap is None and gbwd is not None and not gbwd.get("TRITON_DKDV"):  # (GLUON_BWD SPLIT_CAP)
            split_cap = gbwd.get("SPLIT_CAP")
        items, red, nslots = _bwd_plan(pattern, lq, lk, bm2, bn2, hq, dev, split_cap)
    if nslots:  # fp32 workspaces of the split columns' partials
        wsk = torch.empty((nslots, b * hkv, bn2, bd), dtype=torch.float32, device=q.device)
        wsv = torch.empty((nslots, b * hkv, bn2, bdv), dtype=torch.float32, device=q.device)
    else:  # no split column: the kernel never touches them (two allocations fewer per call)
        wsk = wsv = delta
    try:
        _launch_bwd(mod, cfg, q, k, v, dout, lse, delta, dq, dk, dvv, out, dl, aux, lay, tlay, items, red, wsk, wsv,
                    common, b, hq, hkv, lq, lk, d, dv, scale, bd, bdv, prec, has_dlse,
                    kv=(mod_kv, aux_kv, bm2, bn2), pattern=pattern)
    except Exception as e:  # Triton's OutOfResources (see attention_fwd): one pipeline stage fewer, remembered
        if type(e).__name__ != "OutOfResources" or cfg["num_stages"] <= 1:
            raise
        smaller = dict(cfg, num_stages=cfg["num_stages"] - 1)
        if cfg.get("STAGES_KV", 1) > 1:
            smaller["STAGES_KV"] = cfg["STAGES_KV"] - 1
        _SHRUNK[(mod.__name__, "bwd", repr(cfg))] = smaller
        return attention_bwd(dout, dlse, q, k, v, out, lse, pattern, scale, smaller, poison, split_cap)
    return dq, dk, dvv


def _launch_bwd(mod, cfg, q, k, v, dout, lse, delta, dq, dk, dvv, out, dl, aux, lay, tlay, items, red, wsk, wsv,
                common, b, hq, hkv, lq, lk, d, dv, scale, bd, bdv, prec, has_dlse, kv=None, pattern=None):
    bm, bn, nw, ns = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
    mod_kv, aux_kv, bm2, bn2 = kv if kv is not None else (mod, aux, bm, bn)
    # TMA (cfg "TMA"): K / V of the dq kernel and q / dO of the dk/dv kernel through tensor descriptors
    even = (lq % bm == 0 and lk % bn == 0 and lq % bm2 == 0 and lk % bn2 == 0 and d == bd and dv == bdv)
    # (only over rows that are not mapped: see InPlaceTiled)
    kvd = _kv_descriptors(k, v, bn, even) if cfg.get("TMA") and not mod.maps_k else None
    # the Gluon dk / dv kernel, where asked (TRITON_DKDV: the Gluon dq kernel with the Triton dk / dv kernel)
    gluon_kv = bool(cfg.get("GLUON_BWD")) and not cfg["GLUON_BWD"].get("TRITON_DKDV")
    # (none for the Gluon dk / dv kernel, which makes its own)
    qd = _kv_descriptors(q, dout, bm2, even) if cfg.get("TMA") and not mod_kv.maps_q and not gluon_kv else None
    tma_dq = dict(KD=kvd[0], VD=kvd[1], TMA=True) if kvd else {}
    tma_dkdv = dict(QD=qd[0], DOD=qd[1], TMA=True) if qd else {}
    if cfg.get("MERGE"):  # full and partial blocks in one loop in both kernels
        tma_dq["MERGE"] = tma_dkdv["MERGE"] = True
    if cfg.get("KT"):  # the dk/dv kernel's tiles keys by queries (no transpose of P or dS)
        tma_dkdv["KT"] = True
    # the dk/dv kernel's own warps and stages (WARPS_KV / STAGES_KV), else the config's
    nw_kv, ns_kv = cfg.get("WARPS_KV", nw), cfg.get("STAGES_KV", ns)
    dqa = None
    # FUSED_DQ (a GLUON_BWD option): dq from the Gluon kernel by TMA reduce-adds, as ATOMIC_DQ has it from the Triton
    # one -- delta first, a float32 accumulator, no dq kernel; the Triton kernel with ATOMIC is its fallback
    fused = gluon_kv and bool(cfg["GLUON_BWD"].get("FUSED_DQ"))
    if cfg.get("ATOMIC_DQ") or fused:
        # dq from the dk/dv kernel (each tile's dS K added in float32 to a row accumulator: five products per
        # tile instead of seven over the two kernels, not bitwise deterministic); delta by its own small kernel
        _delta(mod_kv, out, dout, lse, dl, delta, hq, lq, dv, bdv, has_dlse)
        dqa = torch.zeros((b * hq * lq, bd), dtype=torch.float32, device=q.device)
        tma_dkdv.update(DQA=dqa, ATOMIC=True)
    gluon_dq = False
    if cfg.get("GLUON_BWD") and cfg["GLUON_BWD"].get("GLUON_DQ") and _gluon_dq_ok(pattern, q, k, v, dout, out):
        # GLUON_DQ: the Gluon dq kernel, which writes delta as it goes (SEP_DELTA: delta by its own kernel first);
        # where its first launch fails, the Triton dq kernel below (which writes delta too)
        if cfg["GLUON_BWD"].get("SEP_DELTA"):
            _delta(mod_kv, out, dout, lse, dl, delta, hq, lq, dv, bdv, has_dlse)
        gluon_dq = _gluon_dq(pattern, q, k, v, dout, lse, delta, dq, scale, cfg["GLUON_BWD"], out, dl, has_dlse)
    if not (cfg.get("ATOMIC_DQ") or fused or gluon_dq):
        # dq first: it also writes delta, which the dk/dv kernel reads
        pack = _pack(cfg.get("PACK_DQ", 1), hq // hkv, lay, mod)
        mod.attn_bwd_dq[(lay.num_q_blocks, b * hq // pack)](
            q, k, v, dout, lse, delta, dq, out, dl, aux, lay.kv_num_blocks, lay.kv_indices,
            lay.full_kv_num_blocks, lay.full_kv_indices, *common,
            dq.stride(0), dq.stride(1), dq.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *_lay_strides(lay), hq, hq // hkv, lq, lk, lk - lq, d, dv, scale * LOG2E, scale,
            BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm, BLOCK_N=bn, PREC=prec, HAS_DLSE=has_dlse, PACK=pack,
            EVEN_N=lk % bn == 0, num_warps=nw, num_stages=ns, **tma_dq)
    if gluon_kv and _gluon_bwd(pattern, cfg["GLUON_BWD"], q, k, v, dout, lse, delta, dk, dvv, wsk, wsv, items, aux_kv,
                               tlay, scale, dqa):
        pass
    else:
        if gluon_kv:  # its first launch failed: the Triton kernel on its tiles (64 rows x 128 keys), keys
            # by queries (KT), the form that is right with fewer query rows a step than keys (see kv_tiles)
            tma_dkdv["KT"] = True
        _triton_dkdv(mod_kv, aux_kv, items, q, k, v, dout, lse, delta, dk, dvv, wsk, wsv, tlay, common, b, hq, hkv, lq,
                     lk, d, dv, scale, bd, bdv, bm2, bn2, prec, nw_kv, ns_kv, tma_dkdv)
    if red.shape[0]:
        mod_kv.attn_bwd_reduce[(red.shape[0], b * hkv)](
            wsk, wsv, red, dk, dvv, dk.stride(0), dk.stride(1), dk.stride(2), dvv.stride(0), dvv.stride(1),
            dvv.stride(2), hkv, lk, d, dv, scale, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_N=bn2, num_warps=4)
    if dqa is not None:
        dq.copy_(dqa.view(b, hq, lq, bd)[..., :d].mul_(scale))


def _delta(mod, out, dout, lse, dl, delta, hq, lq, dv, bdv, has_dlse):
    """delta (each row's dO . O, less dlse) by its own small kernel, where dq does not come from the Triton dq kernel
    (which writes it as it goes)."""
    mod.attn_bwd_delta[(-(-lq // 64), out.shape[0] * hq)](
        out, dout, lse, dl, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), hq, lq, dv, BLOCK_M=64, BLOCK_DV=bdv, HAS_DLSE=has_dlse, num_warps=4)


def _gluon_dq_ok(pattern, q, k, v, dout, out) -> bool:
    """Whether the Gluon dq kernel (`gluon_fwd.gluon_attn_bwd_dq`) applies: the ws forward's rules on 64 x 64 tiles
    (`gluon_plan`: Hopper, PACK 2, a plain mask, full blocks in one run per query block, contiguous tensors)."""
    lq, lk, hq, hkv = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    if q.device.type != "cuda" or lq % 64 or lk % 64 or not dout.is_contiguous() or not out.is_contiguous():
        return False
    dev = str(q.device)
    gcfg = dict(BLOCK_M=64, BLOCK_N=64, num_stages=2, PACK=2, GLUON="ws")
    lay = _layout(pattern, lq, lk, 64, 64, hq, dev)
    mod = _module(pattern, lq, lk, dev, (64, 64))[0]
    pack = _pack(2, hq // hkv, lay, mod)
    return gluon_plan(q, k, v, pattern, gcfg, pack, mod, _full_contiguous(pattern, lq, lk, 64, 64, hq, dev))[0]


def _gluon_dq(pattern, q, k, v, dout, lse, delta, dq, scale, g: dict, out, dl, has_dlse: bool) -> bool:
    """The Gluon dq kernel into dq (B, Hq, Lq, D) -> True, or False (a warning, once) where its first launch fails.
    It also writes delta (rowsum(out * dout) - dlse) unless g has SEP_DELTA (delta written before, by attn_bwd_delta)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dev = str(q.device)
    gmod = _gluon_module(pattern, lq, lk, (64, 64))
    stages = int(g.get("DQ_STAGES", 2))
    fuse = not g.get("SEP_DELTA")
    qbuf = int(g.get("DQ_QBUF", 2)) if g.get("DQ_PERSIST") else 0  # (0: a program per work item)
    pipe, pref = bool(g.get("DQ_PIPE")), bool(g.get("DQ_PREF"))  # (both need DQ_PERSIST: gluon_bwd_settings)
    key = (gmod.__name__, "dq", stages, q.dtype, d, fuse, has_dlse, qbuf, pipe, pref)
    if key in _GLUON_FAILED:
        return False
    lay = _layout(pattern, lq, lk, 64, 64, hq, dev)
    aux = _module(pattern, lq, lk, dev, (64, 64))[1]
    lay64 = gl.NVMMASharedLayout.get_default_for([64, d], gl.float16 if q.dtype == torch.float16 else gl.bfloat16)
    qd, dod, kd, vd = (GluonDescriptor(x2, list(x2.shape), list(x2.stride()), [64, d], lay64)
                       for x2 in (t.view(-1, d) for t in (q, dout, k, v)))
    args = (qd, dod, kd, vd, dq, lse, delta, out, dl, aux, lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks,
            lay.full_kv_indices, *_lay_strides(lay), hq, hq // hkv, lq, lk, lk - lq)
    meta = dict(D=d, STAGES=stages, BLOCK_M=64, BLOCK_N=64, CONSUMER_REGS=240, FUSE_DELTA=fuse,
                HAS_DLSE=fuse and has_dlse, num_warps=4, maxnreg=168)
    if qbuf:  # the persistent form: at most one program per SM walking the (query block, head pair) items
        items = lay.num_q_blocks * b * hq // 2
        launch = lambda: gmod.gluon_attn_bwd_dqp[(min(items, _sm_count(q.device)),)](  # noqa: E731
            *args, lay.num_q_blocks, items, scale * LOG2E, scale, QBUF=qbuf, ORDER=1, PIPE=pipe, PREF=pref,
            **meta)
    else:
        launch = lambda: gmod.gluon_attn_bwd_dq[(lay.num_q_blocks, b * hq // 2)](  # noqa: E731
            *args, scale * LOG2E, scale, **meta)
    if not _gluon_launch(key, "dq kernel", launch):
        return False
    global GLUON_DQ_LAUNCHES, GLUON_DQP_LAUNCHES
    GLUON_DQ_LAUNCHES += 1
    GLUON_DQP_LAUNCHES += bool(qbuf)
    return True


# launches of the Gluon dq kernel so far (tests and benchmarks check that a GLUON_DQ config ran it), and of its
# persistent form (DQ_PERSIST) among them
GLUON_DQ_LAUNCHES = GLUON_DQP_LAUNCHES = 0


def _triton_dkdv(mod_kv, aux_kv, items, q, k, v, dout, lse, delta, dk, dvv, wsk, wsv, tlay, common, b, hq, hkv, lq,
                 lk, d, dv, scale, bd, bdv, bm2, bn2, prec, nw_kv, ns_kv, tma_dkdv):
    mod_kv.attn_bwd_dkdv[(items.shape[0], b * hkv)](
        q, k, v, dout, lse, delta, dk, dvv, wsk, wsv, items, aux_kv, tlay.kv_num_blocks, tlay.kv_indices,
        tlay.full_kv_num_blocks, tlay.full_kv_indices, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dvv.stride(0), dvv.stride(1), dvv.stride(2),
        *_lay_strides(tlay), hq, hkv, hq // hkv, lq, lk, lk - lq, d, dv, scale * LOG2E, scale,
        BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm2, BLOCK_N=bn2, PREC=prec, EVEN_N=lk % bn2 == 0, num_warps=nw_kv,
        num_stages=ns_kv, **tma_dkdv)


# The Gluon dk / dv kernel (`gluon_bwd.py`, cfg GLUON_BWD: True or a dict of num_stages / REGS / ACC_INIT / FUSED_DQ /
# ROWS; opt-in, written in the eighteenth session, first run in the nineteenth). A first launch that fails
# warns once and the Triton kernel runs, as for the Gluon forward (_gluon_launch).
def gluon_bwd_plan(q, k, v, dout, pattern, cfg: dict) -> tuple[bool, str]:
    """Whether the backward can run the Gluon dk / dv kernel here -> (ok, why not)."""
    lq, lk = q.shape[2], k.shape[2]
    why = "not asked for (cfg GLUON_BWD)" if not cfg.get("GLUON_BWD") else _gluon_why_not(q, v)
    if why:  # (the reasons common to the Gluon kernels first)
        pass
    elif lq % 64 or lk % 128:
        why = "query lengths a multiple of 64, key lengths a multiple of 128"
    elif cfg.get("ATOMIC_DQ"):
        why = "dq by atomics (cfg ATOMIC_DQ) comes from the Triton dk / dv kernel"
    elif _routed(pattern) or _module(pattern, lq, lk, str(q.device), (64, 128))[0].maps_q \
            or _module(pattern, lq, lk, str(q.device), (64, 128))[0].maps_k:
        why = "no routed patterns or row maps (tiled neighborhoods)"
    elif _gluon_bwd_module(pattern, lq, lk) is None:
        why = "a mask without lookup tables"
    return why is None, why or ""


def _gluon_bwd_cfg(q, k, v, dout, pattern, cfg: dict):
    """The Gluon dk / dv kernel's settings (num_stages, REGS) where cfg asks for it and it applies, else None."""
    g = cfg.get("GLUON_BWD")
    if not g:
        return None
    out = gluon_bwd_settings(g, q.shape[-1])  # (a wrong setting is an error where the kernel would not run, too)
    return out if gluon_bwd_plan(q, k, v, dout, pattern, cfg)[0] else None


# the settings cfg GLUON_BWD takes (`gluon_bwd_settings`)
GLUON_BWD_KEYS = ("num_stages", "REGS", "ACC_INIT", "FUSED_DQ", "ROWS", "GLUON_DQ", "DQ_STAGES", "SEP_DELTA",
                  "TRITON_DKDV", "DQ_PERSIST", "DQ_QBUF", "DQ_PIPE", "DQ_PREF", "T_STATS", "TAIL_ORDER",
                  "SPLIT_CAP")


def gluon_bwd_settings(g, d: int) -> dict:
    """cfg GLUON_BWD (True or a dict) as the launch takes it, checked: known settings, ROWS without the transposed
    form's ACC_INIT, shared memory within Hopper's (`gluon_bwd_smem`) at a head dim d it takes."""
    g = g if isinstance(g, dict) else {}
    unknown = sorted(set(g) - set(GLUON_BWD_KEYS))
    if unknown:  # (DQ_LAG, the twentieth session's: removed, it changed nothing; PIPE, the twenty-third's,
        # PINGPONG, the twenty-fourth's, and S_AHEAD and DQ_BN, the thirty-fourth's: slower, removed)
        raise ValueError(f"cfg GLUON_BWD: unknown settings {unknown} ({', '.join(GLUON_BWD_KEYS)})")
    out = dict(num_stages=int(g.get("num_stages", 2)), REGS=int(g.get("REGS", 240)),
               ACC_INIT=bool(g.get("ACC_INIT", False)), FUSED_DQ=bool(g.get("FUSED_DQ", False)))
    if g.get("ROWS"):  # (only where asked: the settings of the other forms stay as they were)
        if g["ROWS"] not in (True, 1, 2):  # (ROWS 3, the twenty-third session's: no faster, removed)
            raise ValueError(f"cfg GLUON_BWD ROWS must be True / 1 (dP's MMA issued with S's) or 2 (with dV's), got "
                             f"{g['ROWS']!r}")
        if out["ACC_INIT"]:
            raise ValueError("cfg GLUON_BWD: ROWS (scores with the query rows as rows) does not take ACC_INIT (the "
                             "transposed form's: its lse and delta are per row already)")
        out["ROWS"] = int(g["ROWS"])
    if g.get("T_STATS"):  # (thirty-fourth session) the transposed form's lse / delta rows by TMA with Q / dO
        if out.get("ROWS") or out["FUSED_DQ"] or out["ACC_INIT"]:
            raise ValueError(f"cfg GLUON_BWD: T_STATS (lse / delta through shared memory) is for the transposed form "
                             f"alone: no ROWS, FUSED_DQ or ACC_INIT, got {g}")
        out["T_STATS"] = True
    for only_dq, what in (("SEP_DELTA", "delta by its own kernel before the Gluon dq kernel"),
                          ("TRITON_DKDV", "the Gluon dq kernel with the Triton dk / dv kernel"),
                          ("DQ_PERSIST", "the Gluon dq kernel's persistent form")):
        if g.get(only_dq) and not (g.get("GLUON_DQ") or g.get("DQ_STAGES")):
            raise ValueError(f"cfg GLUON_BWD: {only_dq} ({what}) needs GLUON_DQ")
    if g.get("GLUON_DQ") or g.get("DQ_STAGES"):  # the Gluon dq kernel (and its ring), where dq has its own kernel
        if out["FUSED_DQ"]:
            raise ValueError("cfg GLUON_BWD: GLUON_DQ (dq by the Gluon dq kernel) and FUSED_DQ (dq in the dk / dv "
                             "kernel) exclude each other")
        stages = g.get("DQ_STAGES", 2)
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 4:
            raise ValueError(f"cfg GLUON_BWD DQ_STAGES (the Gluon dq kernel's K / V ring) must be 1 .. 4, got "
                             f"{stages!r}")
        out.update(GLUON_DQ=True, DQ_STAGES=stages)
        out.update({key: True for key in ("SEP_DELTA", "TRITON_DKDV") if g.get(key)})
        qbuf = g.get("DQ_QBUF", 2) if g.get("DQ_PERSIST") else 1
        if isinstance(qbuf, bool) or qbuf not in (1, 2):
            raise ValueError(f"cfg GLUON_BWD DQ_QBUF (the persistent dq kernel's Q / dO buffers) must be 1 or 2, "
                             f"got {qbuf!r}")
        # (16-bit Q and dO of both heads per buffer -- one buffer in the one-item form --, the K / V ring)
        dq_need = (4 * qbuf + 2 * stages) * 64 * d * 2 + 1024
        if d in (64, 128) and dq_need > GLUON_SMEM:
            raise ValueError(f"cfg GLUON_BWD {g}: the Gluon dq kernel needs {dq_need} bytes of shared memory at D = "
                             f"{d}, more than the {GLUON_SMEM} a block has on Hopper (fewer DQ_STAGES or DQ_QBUF)")
        if g.get("DQ_PERSIST"):  # one program per SM walking the items, DQ_QBUF Q / dO buffers of both heads
            out.update(DQ_PERSIST=True, DQ_QBUF=qbuf)
    tail = g.get("TAIL_ORDER", False)  # (thirty-fifth session) the dk / dv kernel's 1-D grid, its tail heads fastest
    if not isinstance(tail, int) or tail < 0:
        raise ValueError(f"cfg GLUON_BWD TAIL_ORDER must be True (the tail's length chosen per call), False or a "
                         f"number of items >= 0, got {tail!r}")
    if tail is not False:
        out["TAIL_ORDER"] = tail
    cap = g.get("SPLIT_CAP")  # (thirty-fifth session) the dk / dv kernel's longest work item, in query blocks
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"cfg GLUON_BWD SPLIT_CAP (the most query blocks a dk / dv work item takes; longer key "
                             f"columns are split, their float32 partials summed after) must be an int >= 1, got "
                             f"{cap!r}")
        out["SPLIT_CAP"] = cap
    for dkdv_only in ("T_STATS", "TAIL_ORDER", "SPLIT_CAP"):
        if dkdv_only in out and out.get("TRITON_DKDV"):
            raise ValueError(f"cfg GLUON_BWD: {dkdv_only} changes the Gluon dk / dv kernel, which TRITON_DKDV "
                             "replaces by the Triton one")
    if g.get("DQ_QBUF") and "DQ_PERSIST" not in out:
        raise ValueError("cfg GLUON_BWD: DQ_QBUF (the persistent dq kernel's buffers) needs GLUON_DQ and DQ_PERSIST")
    if g.get("DQ_PIPE"):  # (the default since the twenty-ninth session) the dq MMA issued a step late
        if "DQ_PERSIST" not in out:
            raise ValueError("cfg GLUON_BWD: DQ_PIPE (each step's dq MMA issued behind the next step's S and dP) "
                             "needs GLUON_DQ and DQ_PERSIST")
        if out["DQ_STAGES"] < 3:  # (step j - 1's K tile stays until step j's end: two slots held, one loading)
            raise ValueError(f"cfg GLUON_BWD: DQ_PIPE needs DQ_STAGES >= 3, got {out['DQ_STAGES']}")
        out["DQ_PIPE"] = True
    if g.get("DQ_PREF"):  # (the default since the twenty-ninth session) the next item's O and lse loaded an item ahead
        if "DQ_PERSIST" not in out:
            raise ValueError("cfg GLUON_BWD: DQ_PREF (each item's O and lse loaded during the item before) needs "
                             "GLUON_DQ and DQ_PERSIST")
        out["DQ_PREF"] = True
    need = gluon_bwd_smem(out, d)
    if d in (64, 128) and need > GLUON_SMEM:  # (other head dims: the Triton kernel runs, `gluon_bwd_plan`)
        raise ValueError(f"cfg GLUON_BWD {g}: the Gluon dk / dv kernel needs {need} bytes of shared memory at D = "
                         f"{d}, more than the {GLUON_SMEM} a block has on Hopper (fewer num_stages)")
    return out


# dynamic shared memory a block may use on Hopper (sm_90: 227 KiB)
GLUON_SMEM = 227 * 1024


def gluon_bwd_smem(g: dict, d: int) -> int:
    """Shared memory of the Gluon dk / dv kernel (settings ``g`` as `_gluon_bwd_cfg` gives them, head dim d),
    bytes: the Q / dO ring (64 rows), the block's K and V (128 keys), with ROWS each consumer's P and dS (64 x 64),
    with FUSED_DQ both consumers' dS twice over and their float32 dq tiles (64 x d / 2); 16-bit inputs."""
    need = g["num_stages"] * 2 * 64 * d * 2 + 2 * 128 * d * 2
    if g.get("ROWS"):
        need += 2 * 64 * 64 * 2 * (1 if g["FUSED_DQ"] else 2)
    if g["FUSED_DQ"]:
        need += 4 * 64 * 64 * 2 + 2 * 64 * (d // 2) * 4
    return need + 1024  # (mbarriers, alignment)


@functools.lru_cache(maxsize=128)
def _gluon_bwd_module(pattern, lq, lk):
    """The Gluon dk / dv module with the pattern's mask (64 x 128 tiles), or None where the mask is not plain."""
    from . import gluon_bwd, gluon_fwd
    lines = generate(pattern, lq, lk, (64, 128))[0]
    return gluon_bwd.gluon_bwd_module(lines) if gluon_fwd.plain_mask(lines) else None


def _gluon_bwd(pattern, g: dict, q, k, v, dout, lse, delta, dk, dvv, wsk, wsv, items, aux, tlay, scale,
               dqa=None) -> bool:
    """Run the Gluon dk / dv kernel -> True, or False (with a warning, once) where its first launch fails.
    ``dqa``: with g's FUSED_DQ, the float32 (B * H * Lq, D) accumulator its dq products are added to."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    gmod = _gluon_bwd_module(pattern, lq, lk)
    key = (gmod.__name__, "bwd", repr(sorted(g.items())), q.dtype, d)
    if key in _GLUON_FAILED:
        return False
    lay64 = gl.NVMMASharedLayout.get_default_for([64, d], gl.float16 if q.dtype == torch.float16 else gl.bfloat16)
    # (row-major (B * H * L, D) views: a strided dout -- a slice, a transpose upstream -- is copied first)
    qd, dod, kd, vd = (GluonDescriptor(x2, list(x2.shape), list(x2.stride()), [64, d], lay64)
                       for x2 in (t.contiguous().view(-1, d) for t in (q, dout, k, v)))
    if g["FUSED_DQ"]:  # the accumulator's tiles of 64 rows x D / 2 columns (one per consumer), float32
        dqd = GluonDescriptor(dqa, list(dqa.shape), list(dqa.stride()), [64, d // 2],
                              gl.NVMMASharedLayout.get_default_for([64, d // 2], gl.float32))
    else:  # (unused: a stand-in of the same kind)
        dqd = qd
    if g.get("T_STATS"):  # lse in log2 units (+inf where a row sees nothing: p = 0) and delta, as (rows / 64, 64)
        # float32 views whose 64-float rows the producer loads with each step's Q / dO tiles
        lse2 = torch.where(lse == float("-inf"), float("inf"), lse * LOG2E).contiguous()
        stat = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        ld, dd = (GluonDescriptor(x2, list(x2.shape), list(x2.stride()), [1, 64], stat)
                  for x2 in (t.view(-1, 64) for t in (lse2, delta)))
    else:
        ld = dd = qd
    grid, order = (items.shape[0], b * hkv), {}
    if "TAIL_ORDER" in g:  # (as `gluon_bwd_settings` gives it: absent unless asked) the 1-D grid: n_head items a
        # (batch, KV head) first, then the rest with the (batch, KV head)s fastest (`dkdv_order`)
        n = items.shape[0]
        tail = g["TAIL_ORDER"]
        if tail is True:  # (the plan's steps kept on the host: no device sync per call; else read back)
            steps = getattr(items, "host_steps", None) or tuple((items[:, 2] - items[:, 1]).tolist())
            tail = tail_items(steps, b * hkv, hq // hkv, _sm_count(q.device))
        grid, order = (n * b * hkv,), dict(TAIL_ORDER=True, n_head=n - min(int(tail), n), n_bh=b * hkv)
    launch = lambda: gmod.gluon_attn_bwd_dkdv[grid](  # noqa: E731
        qd, dod, kd, vd, dqd, lse, delta, dk, dvv, wsk, wsv, items, aux, tlay.kv_num_blocks, tlay.kv_indices,
        tlay.full_kv_num_blocks, tlay.full_kv_indices, *_lay_strides(tlay), hq, hkv, hq // hkv, lq, lk, lk - lq,
        scale * LOG2E, scale, D=d, STAGES=g["num_stages"], BLOCK_M=64, HALF=64, CONSUMER_REGS=g["REGS"],
        ACC_INIT=g["ACC_INIT"], FUSED_DQ=g["FUSED_DQ"], ROWS=g.get("ROWS", 0),
        ld=ld, dd=dd, TSTATS=g.get("T_STATS", False), num_warps=4, maxnreg=168, **order)
    if not _gluon_launch(key, "dk / dv kernel", launch):
        return False
    global GLUON_BWD_LAUNCHES
    GLUON_BWD_LAUNCHES += 1
    return True


# launches of the Gluon dk / dv kernel so far (tests and benchmarks check that a GLUON_BWD config ran it)
GLUON_BWD_LAUNCHES = 0


def dkdv_order(n: int, tail: int, nbh: int) -> list[tuple[int, int]]:
    """(work item, batch * KV head) of each program of the Gluon dk / dv kernel's TAIL_ORDER grid in launch order (the
    kernel's own map, on the host): the first n - tail items of each (batch, KV head) in turn, as the 2-D grid runs
    them, then the last ``tail`` items (the shortest: `_bwd_plan` sorts them longest first) with the (batch, KV
    head)s fastest."""
    head = n - min(tail, n)
    return [(i, bh) for bh in range(nbh) for i in range(head)] + [(i, bh) for i in range(head, n) for bh in range(nbh)]


def schedule_span(costs, sms: int) -> float:
    """When the last of programs with these costs (in launch order) ends, each started on the first free SM."""
    free = [0.0] * sms
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


@functools.lru_cache(maxsize=256)
def tail_items(steps: tuple, nbh: int, group: int, sms: int) -> int:
    """TAIL_ORDER=True: how many of the work items (``steps``: each one's query blocks, longest first) the dk / dv
    kernel's grid runs with the (batch, KV head)s fastest. Of 0, n / 16, n / 8, n / 4, n / 2 and n, the one whose
    greedy schedule over ``sms`` SMs ends first (a program's cost: its steps times the group's heads, plus two steps
    for its K / V loads and stores), the smallest within 0.2 %; 0 beyond 20000 programs (many waves: little tail).
    The 2-D grid's order (0) leaves window 4096's 32 shorter items of each KV head to the last wave at 16K tokens:
    4.5 % longer than the mean SM's work in this model, 0.0 % with those items' heads fastest
    (benchmarks/dkdv_waves.py)."""
    n = len(steps)
    if n * nbh > 20000:
        return 0
    best, best_span = 0, None
    for tail in sorted({0, n // 16, n // 8, n // 4, n // 2, n}):
        span = schedule_span([steps[i] * group + 2 for i, _ in dkdv_order(n, tail, nbh)], sms)
        if best_span is None or span < best_span * 0.998:
            best, best_span = tail, span
    return best


# -- torch.library custom ops ----------------------------------------------------------------------
_PATTERN_IDS: dict = {}
_PATTERNS: list = []


@torch.compiler.assume_constant_result
def pattern_id(pattern) -> int:
    """A stable integer id for a (hashable, immutable) pattern, so custom ops can carry it. Under
    `torch.compile` it runs at trace time (a constant of the graph), so the registration is real.
    A `RoutedBlocks` is not registered (it is per call): `triton_attention` registers its
    ``_routed_spec`` and passes the mask as a tensor."""
    if isinstance(pattern, RoutedBlocks):
        raise TypeError("pattern_id: a RoutedBlocks is a per-call pattern and is not registered (the registry "
                        "would grow at every call); register _routed_spec(pattern) and pass its block_mask")
    pid = _PATTERN_IDS.get(pattern)
    if pid is None:
        pid = _PATTERN_IDS[pattern] = len(_PATTERNS)
        _PATTERNS.append(pattern)
    return pid


def _routed_spec(pattern: RoutedBlocks) -> tuple:
    """What the ops' registry keeps of a routed pattern: the parts its mask tensor does not carry."""
    return ("RoutedBlocks", pattern.block_size, pattern.causal)


def _op_pattern(pattern: int, blocks):
    """The pattern of an op call: the registered one, or for a routed spec the routed pattern over
    ``blocks`` (a new object per call, cached nowhere)."""
    p = _PATTERNS[pattern]
    if blocks is None:
        return p
    if not (isinstance(p, tuple) and p and p[0] == "RoutedBlocks"):
        raise ValueError(f"blocks given but pattern id {pattern} is not a routed spec: {p!r}")
    return RoutedBlocks(blocks, p[1], causal=p[2])


@torch.library.custom_op("attnzoo::triton_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: int, scale: float,
            blocks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, _op_pattern(pattern, blocks), scale)


@_fwd_op.register_fake
def _(q, k, v, pattern, scale, blocks=None):
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hq, lq, v.shape[-1])), q.new_empty((b, hq, lq), dtype=torch.float32)


@torch.library.custom_op("attnzoo::triton_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, pattern: int, scale: float,
            blocks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(dout, dlse, q, k, v, out, lse, _op_pattern(pattern, blocks), scale)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, pattern, scale, blocks=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, scale = inputs[:5]
    blocks = inputs[5] if len(inputs) > 5 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, blocks)
    ctx.pattern, ctx.scale = pattern, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, blocks = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, dlse, q, k, v, out, lse, ctx.pattern, ctx.scale, blocks)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def tiled_neighborhood(req):
    """(perm, inv, TiledNeighborhood) when the request is a multi-axis `Neighborhood` whose grid can be
    cut into tiles of the kernel's block (see `neighborhood_tiling`), else None."""
    return _nbhd_tiling(req.pattern, req.D, req.Dv, req.device, req.dtype)


def _nbhd_tiling(p, d: int, dv: int, device: torch.device, dtype):
    from ...patterns import Neighborhood, neighborhood_tiling

    if not isinstance(p, Neighborhood) or p.grid is None or len(p.grid) < 2:
        return None
    # the layout stays exact for any block size; tile for the forward's query block
    return neighborhood_tiling(p, config(d, dv, device, p, "fwd", dtype)["BLOCK_M"], device=device)


@torch.compiler.assume_constant_result
def in_place_pattern_id(pattern, d: int, dv: int, device: str, dtype) -> int:
    """Under `torch.compile`: the registered id (`pattern_id`) of the `InPlaceTiled` that runs this N-D
    neighborhood in tile order over the tensors as they are, or -1 when it is not tiled (see
    `tiled_neighborhood`). Evaluated once at trace time, so the tiling search never enters the graph."""
    tiling = _nbhd_tiling(pattern, d, dv, torch.device(device), dtype)
    return -1 if tiling is None else pattern_id(InPlaceTiled(tiling[2]))


class _Eager(torch.autograd.Function):
    """The eager-mode path: the same launchers as the custom ops, without their dispatch and autograd
    wrapper, which cost about half of attnzoo's host time per forward+backward (``benchmarks/host_overhead.py
    --mock``, launches replaced by no-ops, 2-core CPU: 311-326 us through the ops, 157-162 us here) -- what
    small shapes are bound by. ``torch.compile`` still traces the custom ops (see `triton_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale):
        out, lse = attention_fwd(q, k, v, pattern, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale = pattern, scale
        ctx.set_materialize_grads(False)  # an unused lse brings no zeros (and no dlse pass in the kernels)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_bwd(dout, dlse, q, k, v, out, lse, ctx.pattern, ctx.scale)
        return dq, dk, dv, None, None


def triton_attention(q, k, v, pattern, scale: float):
    """Differentiable attention -> (out, lse). In eager mode through `_Eager` (an autograd.Function over
    the launchers); under `torch.compile` through the custom ops, whose fake implementations let the
    compiler trace them. A `RoutedBlocks` goes to the ops as its static spec (a registry entry per block
    size and causality, not per call) plus its mask as a tensor input."""
    if not torch.compiler.is_compiling():
        return _Eager.apply(q, k, v, pattern, float(scale))
    if _routed(pattern):
        return _fwd_op(q, k, v, pattern_id(_routed_spec(pattern)), float(scale), pattern.block_mask)
    return _fwd_op(q, k, v, pattern_id(pattern), float(scale))
