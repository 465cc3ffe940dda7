"""The speed suite: patterns x lengths x backends x directions, one JSON line per measurement.

Measuring rules are those of ``BENCHMARK_PROTOCOL.md``:

- FLOPs (forward) = 4 * B * Hq * D * visible pairs, with visible pairs = density * Lq * Lk counted exactly
  from the pattern; backward = 2.5 x forward, forward+backward = 3.5 x forward. TFLOP/s are *effective*:
  on the pairs the pattern keeps.
- Fraction of ideal = (dense time / pattern time) / (dense FLOPs / pattern FLOPs), the dense time being the
  fastest full (non-causal) attention of the same shape and direction measured in the same results file.
  The dense baseline runs with every SDPA kernel (flash, cuDNN, efficient, math on CUDA) and FlexAttention.
- Timing with `attnzoo.bench.timing.time_fn` (CUDA events, L2 flush, median and 20th/80th percentiles).

Three suites: ``cpu`` (a one-minute smoke run of the whole machinery on a laptop), ``cuda`` (the standard
long-context grid of the protocol: bf16, D=128, Hq=64, Hkv=8, B=1, N = 4K, 16K, 64K or with ``full_grid``
1K...64K; dense, causal, windows, sinks, documents, chunks, N-D neighborhoods and random block-sparse masks)
and ``flash`` (the FlashAttention grid: bf16, B*N = 16K tokens for N = 512...16K, 16 heads without GQA,
head dims 64 and 128, full and causal, fwd and fwd+bwd). Besides attnzoo's backends (each SDPA kernel
separately, compiled FlexAttention, the Triton kernels, the reference) the CUDA suites measure other
libraries (`attnzoo.bench.peers`: flash-attn, xFormers, NATTEN) on the patterns they support; a peer that
is not installed is recorded as ``unsupported`` with the reason. Every record carries the peak CUDA memory
(``peak_mem_bytes``). A run appends to ``results.jsonl`` in its output folder and skips the cases already
recorded there with status ``ok`` (resumable).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import functools
import gc
import hashlib
import json
import os
import platform
import random
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from .peers import PEERS
from .gpu_state import describe as describe_gpu_state
from .timing import Unsupported, classify_exception, empty_result, time_fn

RESULTS_FILE = "results.jsonl"
SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------------------
# FLOPs and derived numbers
# --------------------------------------------------------------------------------------------------
DIRECTIONS = ("fwd", "fwdbwd")
DIRECTION_LABELS = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}
_DIRECTION_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
_DIRECTION_ALIASES = {"fwd": "fwd", "forward": "fwd", "fwdbwd": "fwdbwd", "fwd+bwd": "fwdbwd",
                      "fwd_bwd": "fwdbwd", "fwd-bwd": "fwdbwd", "bwd": "bwd"}


def normalize_direction(direction: str) -> str:
    try:
        return _DIRECTION_ALIASES[direction]
    except (KeyError, TypeError):
        raise ValueError(f"direction must be one of 'fwd', 'fwdbwd' (or 'fwd+bwd'), got {direction!r}") from None


def visible_pairs(density: float, q_len: int, kv_len: int) -> float:
    """Visible (query, key) pairs of one head: density * Lq * Lk."""
    return float(density) * q_len * kv_len


def attention_flops(B: int, Hq: int, D: int, q_len: int, kv_len: int, density: float = 1.0,
                    direction: str = "fwd", Dv: Optional[int] = None) -> float:
    """FLOPs of one attention call by the protocol's rule.

    Forward: 2 * B * Hq * (D + Dv) * visible pairs (= 4 * B * Hq * D * pairs when Dv == D: one multiply-add
    per element of QK^T and of PV). Backward = 2.5 x forward; ``fwdbwd`` = 3.5 x forward.
    """
    Dv = D if Dv is None else Dv
    fwd = 2.0 * B * Hq * (D + Dv) * visible_pairs(density, q_len, kv_len)
    return fwd * _DIRECTION_FACTOR[normalize_direction(direction)]


def tflops_of(flops: Optional[float], ms: Optional[float]) -> Optional[float]:
    """Effective TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    if flops is None or not ms or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def fraction_of_ideal(dense_ms: Optional[float], pattern_ms: Optional[float], dense_flops: float,
                      pattern_flops: float) -> Optional[float]:
    """(dense time / pattern time) / (dense FLOPs / pattern FLOPs): 1.0 = the speed-up equals the FLOP saving."""
    if dense_ms is None or not pattern_ms or pattern_ms <= 0 or not pattern_flops or not dense_flops:
        return None
    return (dense_ms / pattern_ms) / (dense_flops / pattern_flops)


# --------------------------------------------------------------------------------------------------
# Patterns of the suites
# --------------------------------------------------------------------------------------------------
# Document lengths are drawn (seeded) from a fixed histogram of (length, weight) until the sequence is
# full; the last document is cut to fit. Packed causal LM training: Document(lengths) & Causal().
CPU_DOC_HISTOGRAM = ((64, 2), (128, 3), (256, 3), (512, 2))
CUDA_DOC_HISTOGRAM = ((128, 2), (256, 3), (512, 3), (1024, 3), (2048, 2))
DOC_SEED = 0


def document_lengths(total: int, histogram=CUDA_DOC_HISTOGRAM, seed: int = DOC_SEED) -> tuple:
    """Deterministic document lengths summing to ``total``, drawn from ``histogram`` with ``seed``."""
    rng = random.Random(seed)
    sizes = [int(s) for s, _ in histogram]
    weights = [float(w) for _, w in histogram]
    out, used = [], 0
    while used < total:
        n = min(rng.choices(sizes, weights)[0], total - used)
        out.append(n)
        used += n
    return tuple(out)


@dataclass(frozen=True)
class PatternSpec:
    """A named pattern of a suite. ``make(L)`` builds it for length L; ``length`` pins a fixed length.

    ``kind`` ("full", "causal" or "pattern") picks attnzoo's backends; ``family`` (default: the kind for full
    and causal) the peers that run it: "window" (a lone SlidingWindow), "neighborhood" (a lone
    Neighborhood), ... (see `attnzoo.bench.peers.pattern_family`)."""
    name: str
    description: str
    make: Callable[[int], object] = field(compare=False, repr=False)
    length: Optional[int] = None
    kind: str = "pattern"  # "full", "causal" or "pattern": which backends apply
    family: Optional[str] = None

    def build(self, L: int):
        return self.make(L)

    @property
    def peer_family(self) -> Optional[str]:
        return self.family if self.family is not None else (self.kind if self.kind in ("full", "causal") else None)


def _az():
    import attnzoo
    return attnzoo


def _specs_cpu() -> list:
    az = _az()
    return [
        PatternSpec("full", "dense attention (the baseline)", lambda L: az.Full(), kind="full"),
        PatternSpec("causal", "causal attention", lambda L: az.Causal(), kind="causal"),
        PatternSpec("sw256", "causal sliding window of 256 keys: SlidingWindow(255)",
                    lambda L: az.SlidingWindow(255)),
        PatternSpec("sinks+sw256", "4 attention sinks + window of 256: Sinks(4) | SlidingWindow(255)",
                    lambda L: az.Sinks(4) | az.SlidingWindow(255)),
        PatternSpec("chunked512", "block-diagonal chunks of 512: Chunked(512)", lambda L: az.Chunked(512)),
        PatternSpec("document", f"packed documents (lengths from a fixed histogram, seed {DOC_SEED}), causal "
                    "inside each: Document(lengths) & Causal()",
                    lambda L: az.Document(document_lengths(L, CPU_DOC_HISTOGRAM)) & az.Causal()),
        PatternSpec("nbhd2d-7x7", "2-D neighborhood, 7x7 kernel on a 32x32 grid: Neighborhood(7, grid=(32, 32))",
                    lambda L: az.Neighborhood(7, grid=(32, 32)), length=32 * 32),
    ]


# Random block-sparse masks of the long-context grid: blocks of 128, a share of the causal block triangle
# kept (the diagonal always), causal inside the blocks.
BLOCKSPARSE_DENSITIES = (0.1, 0.2, 0.3, 0.5)
BLOCKSPARSE_BLOCK = 128
BLOCKSPARSE_SEED = 0


@functools.lru_cache(maxsize=64)
def blocksparse_pattern(L: int, density: float, block: int = BLOCKSPARSE_BLOCK, seed: int = BLOCKSPARSE_SEED):
    """The suite's block-sparse pattern at length L: ``BlockSparse.random(L, L, density, block, causal=True,
    seed) & Causal()`` (cached: the same object for every case of that length)."""
    az = _az()
    return az.BlockSparse.random(L, L, density, block_size=block, causal=True, seed=seed) & az.Causal()


def _blocksparse_specs() -> list:
    return [PatternSpec(f"blocksparse-{d:g}",
                        f"random block-sparse mask: blocks of {BLOCKSPARSE_BLOCK}, {d:.0%} of the causal block "
                        f"triangle kept (the diagonal always; seed {BLOCKSPARSE_SEED}), causal inside: "
                        f"BlockSparse.random(L, L, {d:g}, block_size={BLOCKSPARSE_BLOCK}, causal=True, "
                        f"seed={BLOCKSPARSE_SEED}) & Causal()",
                        functools.partial(blocksparse_pattern, density=d), family="blocksparse")
            for d in BLOCKSPARSE_DENSITIES]


def _specs_cuda() -> list:
    az = _az()
    return [
        PatternSpec("full", "dense attention (the baseline)", lambda L: az.Full(), kind="full"),
        PatternSpec("causal", "causal attention", lambda L: az.Causal(), kind="causal"),
        PatternSpec("sw1024", "causal sliding window of 1024 keys: SlidingWindow(1023)",
                    lambda L: az.SlidingWindow(1023), family="window"),
        PatternSpec("sw4096", "causal sliding window of 4096 keys: SlidingWindow(4095)",
                    lambda L: az.SlidingWindow(4095), family="window"),
        PatternSpec("sinks+sw1024", "4 attention sinks + window of 1024: Sinks(4) | SlidingWindow(1023)",
                    lambda L: az.Sinks(4) | az.SlidingWindow(1023)),
        PatternSpec("document", f"packed documents (lengths from a fixed histogram, seed {DOC_SEED}), causal "
                    "inside each: Document(lengths) & Causal()",
                    lambda L: az.Document(document_lengths(L, CUDA_DOC_HISTOGRAM)) & az.Causal()),
        PatternSpec("chunked2048", "block-diagonal chunks of 2048: Chunked(2048)", lambda L: az.Chunked(2048)),
        PatternSpec("nbhd2d-13x13", "2-D neighborhood, 13x13 kernel on 128x128 tokens",
                    lambda L: az.Neighborhood(13, grid=(128, 128)), length=128 * 128, family="neighborhood"),
        PatternSpec("nbhd2d-31x31", "2-D neighborhood, 31x31 kernel on 128x128 tokens",
                    lambda L: az.Neighborhood(31, grid=(128, 128)), length=128 * 128, family="neighborhood"),
        PatternSpec("nbhd3d-5x7x7", "3-D neighborhood, 5x7x7 kernel on 16x32x32 tokens",
                    lambda L: az.Neighborhood((5, 7, 7), grid=(16, 32, 32)), length=16 * 32 * 32,
                    family="neighborhood"),
    ] + _blocksparse_specs()


def _specs_flash() -> list:
    az = _az()
    return [
        PatternSpec("full", "dense attention (the baseline)", lambda L: az.Full(), kind="full"),
        PatternSpec("causal", "causal attention", lambda L: az.Causal(), kind="causal"),
    ]


# --------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------
SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
# bench backend label -> attnzoo backend name
API_BACKEND = {"reference": "reference", "flex": "flex", "flex-eager": "flex", "sdpa": "sdpa", "triton": "triton",
               **{k: "sdpa" for k in SDPA_KERNELS}}


def api_backend(label: str) -> Optional[str]:
    """The attnzoo backend a bench label runs: ``API_BACKEND``'s, and "triton" for a variant label such as
    ``triton[tail]`` (triton with settings merged over its kernel configs, see `plan`'s ``variants``)."""
    base, bracket, _ = label.partition("[")
    return API_BACKEND.get(base if bracket and base == "triton" else label)


VARIANT_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,40}")


def parse_variant(text: str) -> tuple:
    """``NAME=JSON`` (``attnzoo bench run --variant``) -> (NAME, JSON): a triton variant, timed as the backend
    ``triton[NAME]`` beside ``triton`` with JSON's settings merged over its kernel configs (the format of
    ``ATTNZOO_TRITON_OVERRIDE``). Raises ValueError with the reason."""
    name, eq, spec = str(text).partition("=")
    name, spec = name.strip(), spec.strip()
    if not eq or not spec:
        raise ValueError("a variant is NAME=JSON, e.g. "
                         f"'tail={{\"bwd\": {{\"GLUON_BWD\": {{\"TAIL_ORDER\": true}}}}}}', got {text!r}")
    if not VARIANT_NAME.fullmatch(name):
        raise ValueError(f"variant name {name!r}: use 1-40 letters, digits or _ . + -")
    from ..backends.triton import tuning  # ImportError when the Triton backend cannot load
    try:
        tuning.parse_overrides(spec)
    except ValueError as e:
        raise ValueError(f"variant {name!r}: {e}") from None
    return name, spec


@contextlib.contextmanager
def _variant_settings(case: "Case"):
    """A variant case's settings merged over the Triton configs for the duration of the block."""
    if case.override is None:
        yield
        return
    from ..backends.triton import tuning
    with tuning.overriding_json(case.override):
        yield


# other libraries' kernels (attnzoo.bench.peers), measured on the pattern families each supports
CUDA_PEERS = ("flash-attn", "xformers", "natten")


@dataclass(frozen=True)
class Suite:
    name: str
    device: str
    dtype: str
    B: int
    Hq: int
    Hkv: int
    D: int
    lengths: tuple
    backends: tuple            # every backend label of the suite
    full_backends: tuple       # backends that run the dense baseline (Full)
    pattern_backends: tuple    # backends that run the other patterns (Causal gets both lists)
    specs: tuple = field(repr=False)
    reps: int = 10
    warmup: int = 2
    max_time_s: float = 2.0
    skip_rule: Optional[Callable] = field(default=None, repr=False, compare=False)
    fwdbwd_max_len: Optional[int] = None  # default fwd+bwd only up to this length (None: all)
    head_dims: tuple = ()          # head dims of the grid (empty: just D)
    tokens: Optional[int] = None   # B * L held constant: B = tokens // L (None: B is fixed)
    peers: tuple = ()              # peer labels (attnzoo.bench.peers), also listed in ``backends``

    def backends_for(self, kind: str, family: Optional[str] = None) -> tuple:
        """Backends of a pattern of this kind; with ``family``, plus the peers that run that family."""
        if kind == "full":
            out = self.full_backends
        elif kind == "causal":
            out = tuple(dict.fromkeys(self.full_backends + self.pattern_backends))
        else:
            out = self.pattern_backends
        if family is None and kind in ("full", "causal"):
            family = kind
        extra = tuple(p for p in self.peers if p in PEERS and family in PEERS[p].families and p not in out)
        return out + extra

    def dims(self) -> tuple:
        return tuple(self.head_dims) or (self.D,)

    def batch(self, L: int) -> int:
        return max(1, self.tokens // L) if self.tokens else self.B


CUDA_LENGTHS = (4096, 16384, 65536)
CUDA_FULL_GRID = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
CPU_LENGTHS = (1024, 2048, 4096)
FLASH_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
FLASH_TOKENS = 16384
FLASH_HEAD_DIMS = (64, 128)
SUITES = ("cpu", "cuda", "flash")


def _cpu_skip(spec: PatternSpec, L: int, direction: str, backend: str) -> Optional[str]:
    why = ("skipped by the CPU suite plan to keep it near one minute: the reference and eager FlexAttention "
           "compute all L^2 scores whatever the pattern (about {:.1f} s per call here); run with --no-skip "
           "to measure it")
    if backend == "sdpa":
        return None
    if L >= 4096 and not (spec.name in ("causal", "sw256") and direction == "fwd"):
        return why.format(1.5 * (L / 4096) ** 2 * (3 if direction == "fwdbwd" else 1))
    if L >= 2048 and spec.name not in ("causal", "sw256"):
        return why.format(0.4 * (L / 2048) ** 2 * (3 if direction == "fwdbwd" else 1))
    return None


def _cuda_skip(spec: PatternSpec, L: int, direction: str, backend: str) -> Optional[str]:
    if backend == "reference" and L > 4096:
        return ("skipped: the reference backend (chunked exact O(L^2) math) is measured on CUDA only up to "
                "4096 tokens; run with --no-skip to measure it")
    return None


def cpu_suite() -> Suite:
    return Suite("cpu", "cpu", "float32", B=1, Hq=4, Hkv=2, D=64, lengths=CPU_LENGTHS,
                 backends=("sdpa", "flex-eager", "reference"), full_backends=("sdpa",),
                 pattern_backends=("flex-eager", "reference"), specs=tuple(_specs_cpu()),
                 reps=5, warmup=0, max_time_s=1.0, skip_rule=_cpu_skip, fwdbwd_max_len=1024)


def cuda_suite(full_grid: bool = False) -> Suite:
    """The long-context grid: bf16, B=1, Hq=64, Hkv=8, D=128; 4K/16K/64K (``full_grid``: 1K...64K)."""
    sdpa = tuple(SDPA_KERNELS)
    own = ("flex", "triton", "reference")
    return Suite("cuda", "cuda", "bfloat16", B=1, Hq=64, Hkv=8, D=128,
                 lengths=CUDA_FULL_GRID if full_grid else CUDA_LENGTHS,
                 backends=sdpa + own + CUDA_PEERS, full_backends=sdpa + own,
                 pattern_backends=own, specs=tuple(_specs_cuda()),
                 reps=10, warmup=2, max_time_s=2.0, skip_rule=_cuda_skip, peers=CUDA_PEERS)


def flash_suite() -> Suite:
    """The FlashAttention grid: bf16, B*N = 16K tokens (N = 512...16K, B = 16K / N), 16 heads (no GQA), head
    dims 64 and 128, full and causal, fwd and fwd+bwd."""
    sdpa = tuple(SDPA_KERNELS)
    own = ("flex", "triton", "reference")
    peers = ("flash-attn", "xformers")
    return Suite("flash", "cuda", "bfloat16", B=1, Hq=16, Hkv=16, D=128, lengths=FLASH_LENGTHS,
                 backends=sdpa + own + peers, full_backends=sdpa + own, pattern_backends=own,
                 specs=tuple(_specs_flash()), reps=10, warmup=2, max_time_s=2.0, skip_rule=_cuda_skip,
                 head_dims=FLASH_HEAD_DIMS, tokens=FLASH_TOKENS, peers=peers)


def get_suite(name: str = "auto", full_grid: bool = False, require_device: bool = True) -> Suite:
    """The suite called ``name`` ('auto': cuda with a GPU, else cpu). ``require_device=False`` builds a CUDA
    suite without a GPU (to plan it: ``--dry-run``); running it still needs one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return cpu_suite()
    if name in ("cuda", "flash"):
        if require_device and not torch.cuda.is_available():
            raise ValueError(f"suite {name!r} needs a CUDA device, and torch.cuda.is_available() is False here; "
                             "use --suite cpu")
        return cuda_suite(full_grid) if name == "cuda" else flash_suite()
    raise ValueError(f"suite must be 'auto', 'cpu', 'cuda' or 'flash', got {name!r}")


@dataclass(frozen=True)
class Case:
    spec: PatternSpec
    B: int
    Hq: int
    Hkv: int
    L: int
    D: int
    dtype: str
    direction: str
    backend: str
    skip: Optional[str] = None
    override: Optional[str] = None  # a variant's settings (JSON, the ATTNZOO_TRITON_OVERRIDE format); see plan()

    @property
    def pattern(self) -> str:
        return self.spec.name

    def key(self, device_name: str, signature: str = "") -> str:
        """Identity of a measurement for resuming: parameters, backend, device and the pattern's signature
        (so that a suite pattern redefined later is measured again)."""
        return (f"{self.spec.name}|{signature}|B{self.B}|Hq{self.Hq}|Hkv{self.Hkv}|Lq{self.L}|Lk{self.L}|D{self.D}|"
                f"Dv{self.D}|{self.dtype}|{self.direction}|{self.backend}|{device_name}"
                + (f"|override{hashlib.sha1(self.override.encode()).hexdigest()[:10]}" if self.override else ""))

    def label(self) -> str:
        return f"{self.spec.name} L={self.L} B={self.B} D={self.D} {DIRECTION_LABELS[self.direction]} {self.backend}"


def _split(values) -> list:
    """Flatten repeated / comma-separated command-line values."""
    out = []
    for v in values or ():
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


def _match_name(name: str, wanted: Sequence[str]) -> bool:
    """`flex` matches `flex-eager`, `sdpa` every `sdpa-*`; shell wildcards work too."""
    for w in wanted:
        if name == w or name.startswith(w + "-") or fnmatch.fnmatchcase(name, w):
            return True
    return False


def plan(suite: Suite, *, patterns=None, backends=None, lengths=None, directions=None, no_skip: bool = False,
         baseline: bool = True, variants=()) -> list:
    """The cases of ``suite`` after the command-line filters, dense baselines first in each shape: lengths x
    head dims (``suite.dims()``) x directions x patterns x their backends (peers on the pattern families
    they run), with B = ``suite.batch(L)`` (B * L constant in the FlashAttention grid).

    ``lengths`` replaces the suite's lengths (fixed-size patterns run at their own length when it is
    among them). With ``baseline`` the dense full-attention baseline of each (length, direction) is kept
    whatever the pattern / backend filters, so that fractions of ideal can be computed.
    ``variants``: (NAME, JSON) pairs (`parse_variant`); each triton case is followed by one case per variant,
    backend ``triton[NAME]``, run with JSON's settings merged over the Triton kernel configs, so that candidate
    configs are timed in one process beside the default and the peers.
    Raises ValueError naming the valid choices when a filter matches nothing.
    """
    patterns, backends = _split(patterns), _split(backends)
    variants = list(variants or ())
    if len({n for n, _ in variants}) != len(variants):
        raise ValueError("variant names must differ: " + ", ".join(n for n, _ in variants))
    if variants and "triton" not in suite.backends:
        raise ValueError(f"variants run attnzoo's triton backend, which the {suite.name} suite does not time")
    names = [s.name for s in suite.specs]
    for p in patterns:
        if not _match_name_any(p, names):
            raise ValueError(f"--pattern {p!r} matches no pattern of the {suite.name} suite; choose from "
                             + ", ".join(names))
    for b in backends:
        if not _match_name_any(b, suite.backends):
            raise ValueError(f"--backend {b!r} matches no backend of the {suite.name} suite; choose from "
                             + ", ".join(suite.backends))
    if lengths is None:
        lens = list(suite.lengths)
        explicit_lengths = False
    else:
        lens = sorted({int(x) for x in lengths})
        if not lens or any(x <= 0 for x in lens):
            raise ValueError(f"--lengths must be positive integers, got {lengths!r}")
        explicit_lengths = True
    dirs = [normalize_direction(d) for d in (directions or DIRECTIONS)]
    if any(d == "bwd" for d in dirs):
        raise ValueError("direction 'bwd' alone is not measured; use 'fwd' or 'fwdbwd'")
    dirs_explicit = directions is not None
    cases = []
    for L in lens:
        B = suite.batch(L)
        for D in suite.dims():
            for direction in DIRECTIONS:
                if direction not in dirs:
                    continue
                if (direction == "fwdbwd" and not dirs_explicit and not explicit_lengths
                        and suite.fwdbwd_max_len is not None and L > suite.fwdbwd_max_len):
                    continue
                for spec in suite.specs:
                    if spec.length is not None and spec.length != L:
                        continue
                    is_baseline = spec.kind == "full"
                    if patterns and not _match_name(spec.name, patterns) and not (baseline and is_baseline):
                        continue
                    for b in suite.backends_for(spec.kind, spec.peer_family):
                        if backends and not _match_name(b, backends):
                            if not (baseline and is_baseline and b.startswith("sdpa")):
                                continue
                        skip = None if no_skip or suite.skip_rule is None else suite.skip_rule(spec, L, direction, b)
                        cases.append(Case(spec, B, suite.Hq, suite.Hkv, L, D, suite.dtype, direction, b, skip))
                        if b == "triton":
                            cases += [Case(spec, B, suite.Hq, suite.Hkv, L, D, suite.dtype, direction,
                                           f"triton[{name}]", skip, text) for name, text in variants]
    if variants and not any(c.override for c in cases):
        raise ValueError("variants are timed beside the triton cases, and the filters leave none (add --backend triton)")
    return cases


def _match_name_any(w: str, names: Iterable[str]) -> bool:
    return any(_match_name(n, [w]) for n in names)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


# HBM bandwidth of the GPUs the project measures on (vendor peak, bytes/s), for "fraction of peak" columns
HBM_PEAK_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12, "B200": 8.0e12, "A100": 2.0e12}


def hbm_peak_bytes_s(device_name: str) -> float | None:
    """The vendor HBM peak for a device name such as 'NVIDIA H200' (SXM parts), or None when unknown."""
    for key, peak in HBM_PEAK_BYTES_S.items():
        if key in device_name:
            return peak
    return None


def environment(device) -> dict:
    device = torch.device(device)
    import attnzoo
    env = dict(device=device.type, torch_version=torch.__version__, triton_version=_version("triton"),
               attnzoo_version=getattr(attnzoo, "__version__", None), python_version=platform.python_version(),
               platform=platform.platform(), cpu_threads=torch.get_num_threads())
    for var in ("ATTNZOO_TRITON_OVERRIDE", "ATTNZOO_AUTOTUNE"):  # settings that change which kernels run
        if os.environ.get(var):
            env[var.lower()] = os.environ[var]
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        env.update(device_name=torch.cuda.get_device_name(idx), cuda_version=torch.version.cuda,
                   cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   gpu_memory_bytes=torch.cuda.get_device_properties(idx).total_memory)
    else:
        env.update(device_name=_cpu_name())
    return env


def _prepare_cuda_compile() -> str:
    """Let dynamo compile every (pattern, shape) of the suite instead of silently running eager
    FlexAttention (which materialises the scores) once its recompile limit is hit."""
    try:
        import torch._dynamo.config as dc
    except Exception:  # noqa: BLE001
        return ""
    notes = []
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            try:
                setattr(dc, name, max(int(getattr(dc, name)), 4096))
                notes.append(f"{name}=4096")
            except Exception:  # noqa: BLE001
                pass
    if hasattr(dc, "fail_on_recompile_limit_hit"):
        dc.fail_on_recompile_limit_hit = True
        notes.append("fail_on_recompile_limit_hit=True")
    return "torch._dynamo.config: " + ", ".join(notes) if notes else ""


# --------------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@functools.lru_cache(maxsize=256)
def _density(spec_name: str, pattern, L: int, Hq: int) -> float:
    return float(pattern.density(L, L, num_heads=Hq if pattern.head_dependent else None))


def _describe(obj) -> str:
    """A complete, deterministic description of a pattern (its repr may abbreviate, e.g. Document)."""
    import dataclasses
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        inner = ",".join(f"{f.name}={_describe(getattr(obj, f.name))}" for f in dataclasses.fields(obj))
        return f"{type(obj).__name__}({inner})"
    if isinstance(obj, (tuple, list)):
        return "(" + ",".join(_describe(x) for x in obj) + ")"
    if callable(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return repr(obj)


@functools.lru_cache(maxsize=256)
def pattern_signature(pattern) -> str:
    """Short stable hash of a pattern's full definition."""
    return hashlib.sha1(_describe(pattern).encode()).hexdigest()[:10]


def case_key(case: "Case", device_name: str, sustain_s: Optional[float] = None) -> str:
    """The record key of ``case`` (`Case.key` with the pattern's signature); a sustained measurement (``sustain_s``,
    CUDA) is a different measurement, so it has its own key."""
    key = case.key(device_name, _case_signature(case))
    return key + (f"|sustain{float(sustain_s):g}" if sustain_s else "")


def _case_signature(case: "Case") -> str:
    try:
        return pattern_signature(case.spec.build(case.L))
    except Exception:  # noqa: BLE001 - an invalid pattern is recorded (as unsupported/error) by run_case
        return "invalid"


class _Runner:
    """The callable that is timed: one attention call (and its backward for ``fwdbwd``)."""

    def __init__(self, case: Case, pattern, device: torch.device, seed: int):
        self.case, self.pattern, self.device = case, pattern, device
        dt = _DTYPES[case.dtype]
        self.peer = PEERS.get(case.backend)
        if self.peer is not None:  # a missing package or API, or a case it cannot run: before any allocation
            self.peer.check(torch.empty(0, dtype=dt, device=device), pattern)
        g = torch.Generator(device=device).manual_seed(seed)
        shape_q = (case.B, case.Hq, case.L, case.D)
        shape_kv = (case.B, case.Hkv, case.L, case.D)
        self.grad = case.direction == "fwdbwd"
        self.q = torch.randn(shape_q, generator=g, device=device, dtype=dt)
        self.k = torch.randn(shape_kv, generator=g, device=device, dtype=dt)
        self.v = torch.randn(shape_kv, generator=g, device=device, dtype=dt)
        self.dout = (torch.randn(shape_q, generator=g, device=device, dtype=dt) if self.grad and self.peer is None
                     else None)  # a peer's is made on its first call, shaped like its output
        for t in (self.q, self.k, self.v):
            t.requires_grad_(self.grad)
        self.api_backend = api_backend(case.backend)
        self.kernel = SDPA_KERNELS.get(case.backend)
        self.impl = "attnzoo.attention(backend=%r)" % self.api_backend
        self.note = ""
        self._probed = False
        self._direct = None  # (q, k, v) with K/V heads repeated, when an SDPA kernel lacks GQA
        self._peer_call = None
        if self.peer is not None:
            self._peer_call = self.peer.prepare(self.q, self.k, self.v, pattern)
            self.impl, self.note = self._peer_call.impl, self._peer_call.note
            self._gen = g
            self.q = self.k = self.v = None  # the peer holds its own copies: keep the peak memory comparable
        elif self.api_backend is None:
            raise Unsupported(f"unknown backend {case.backend!r}")

    def _api(self):
        from attnzoo import attention
        return attention(self.q, self.k, self.v, self.pattern, backend=self.api_backend)

    def _sdpa_direct(self):
        import torch.nn.functional as F
        q, k, v = self._direct
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.case.spec.kind == "causal")

    def _setup_direct(self):
        rep = self.case.Hq // self.case.Hkv
        k = self.k.detach().repeat_interleave(rep, 1).requires_grad_(self.grad)
        v = self.v.detach().repeat_interleave(rep, 1).requires_grad_(self.grad)
        self._direct = (self.q, k, v)
        self.impl = "torch SDPA direct, K/V heads repeated"
        self.note = (f"the {self.kernel} kernel declined GQA (enable_gqa) through attnzoo; timed torch SDPA "
                     f"directly with K/V heads repeated {rep}x outside the timed region")

    def _forward(self):
        if self.kernel is None:
            return self._api()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, self.kernel)):
            if self._direct is not None:
                return self._sdpa_direct()
            if self._probed:
                return self._api()
            return self._probe()

    def _probe(self):
        """First call of an SDPA kernel: through attnzoo; if the kernel declines (it may not take GQA),
        fall back to torch SDPA on repeated K/V heads; collect the kernel's reasons when it cannot run."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = self._api()
                self._probed = True
                return out
            except RuntimeError as e:
                if "No available kernel" not in str(e):
                    raise
                why = "; ".join(str(w.message).strip().replace("\n", " ") for w in caught)
        if self.case.Hq == self.case.Hkv:
            raise Unsupported(f"torch SDPA {self.kernel} kernel cannot run this: {why or 'no reason given'}")
        self._setup_direct()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return self._sdpa_direct()
            except RuntimeError as e:
                if "No available kernel" not in str(e):
                    raise
                why2 = "; ".join(str(w.message).strip().replace("\n", " ") for w in caught)
        self._direct = None
        raise Unsupported(f"torch SDPA {self.kernel} kernel cannot run this (with or without GQA): "
                          f"{why2 or why or 'no reason given'}")

    def _peer(self):
        try:
            out = self._peer_call()
            if not self.grad:
                return out
            if self.dout is None:
                self.dout = torch.randn(out.shape, generator=self._gen, device=out.device, dtype=out.dtype)
            if not out.requires_grad:
                raise Unsupported(f"{self.peer.name} returned an output without autograd graph (no backward)")
            return torch.autograd.grad(out, self._peer_call.inputs, self.dout)
        except NotImplementedError as e:  # a peer's way of declining a shape, dtype or mask
            raise Unsupported(f"{self.peer.name} declined: {type(e).__name__}: {e}") from None

    def __call__(self):
        if self._peer_call is not None:
            return self._peer()
        out = self._forward()
        if not self.grad:
            return out
        if not out.requires_grad:
            raise Unsupported(f"backend {self.case.backend!r} returned an output without autograd graph")
        inputs = self._direct if self._direct is not None else (self.q, self.k, self.v)
        return torch.autograd.grad(out, inputs, self.dout)


def _dense_key(rec: dict) -> tuple:
    key = (rec.get("device_name"), rec.get("B"), rec.get("Hq"), rec.get("Hkv"), rec.get("Lq"), rec.get("Lk"),
           rec.get("D"), rec.get("Dv"), rec.get("dtype"), rec.get("direction"))
    # a sustained measurement (--sustain-s) against the dense one taken the same way
    return key + (("sustain", rec["sustain_s"]),) if rec.get("sustain_s") else key


def dense_baselines(records: Iterable[dict]) -> dict:
    """Fastest ok full-attention record per shape and direction: key -> (median_ms, backend)."""
    best = {}
    for r in records:
        if r.get("status") != "ok" or r.get("pattern_kind") != "full" or not r.get("median_ms"):
            continue
        k = _dense_key(r)
        if k not in best or r["median_ms"] < best[k][0]:
            best[k] = (r["median_ms"], r["backend"])
    return best


def with_derived(rec: dict, baselines: dict) -> dict:
    """``rec`` with flops, tflops, dense_ms and frac_ideal (re)computed against ``baselines``."""
    rec = dict(rec)
    if rec.get("density") is None:
        return rec
    flops = attention_flops(rec["B"], rec["Hq"], rec["D"], rec["Lq"], rec["Lk"], rec["density"],
                            rec["direction"], rec.get("Dv"))
    dense_flops = attention_flops(rec["B"], rec["Hq"], rec["D"], rec["Lq"], rec["Lk"], 1.0, rec["direction"],
                                  rec.get("Dv"))
    rec["flops"] = flops
    rec["dense_flops"] = dense_flops
    rec["tflops"] = tflops_of(flops, rec.get("median_ms")) if rec.get("status") == "ok" else None
    base = baselines.get(_dense_key(rec))
    rec["dense_ms"], rec["dense_backend"] = (base if base else (None, None))
    rec["frac_ideal"] = (fraction_of_ideal(base[0], rec.get("median_ms"), dense_flops, flops)
                         if base and rec.get("status") == "ok" else None)
    return rec


def run_case(case: Case, device, env: dict, *, seed: int = 0, reps: int = 10, warmup: int = 2,
             max_time_s: Optional[float] = None, flush_l2: bool = True, baselines: Optional[dict] = None,
             suite: str = "", sustain_s: Optional[float] = None) -> dict:
    """Measure one case and return its record (never raises for a failing backend)."""
    device = torch.device(device)
    rec = dict(schema=SCHEMA_VERSION, suite=suite, pattern=case.pattern, pattern_kind=case.spec.kind,
               pattern_repr=None, pattern_description=case.spec.description, density=None, B=case.B, Hq=case.Hq,
               Hkv=case.Hkv, Lq=case.L, Lk=case.L, D=case.D, Dv=case.D, dtype=case.dtype, direction=case.direction,
               backend=case.backend, api_backend=api_backend(case.backend), sdpa_kernel=SDPA_KERNELS.get(case.backend),
               impl=None, note="", seed=seed, warmup=warmup, reps_requested=reps, flush_l2=flush_l2 and device.type == "cuda",
               **env, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    sustain_s = sustain_s if device.type == "cuda" else None  # (CPU clocks are not the question)
    rec["key"] = case_key(case, env["device_name"], sustain_s)
    if sustain_s:
        rec["sustain_s"] = float(sustain_s)
    if case.override is not None:
        rec["variant"], rec["variant_override"] = case.backend.partition("[")[2].rstrip("]"), case.override
    peer = PEERS.get(case.backend)
    if peer is not None:
        rec["peer"] = peer.name
        rec["peer_version"] = peer.version()
    result = empty_result("unsupported", case.skip or "")
    runner = None
    try:
        pattern = case.spec.build(case.L)
        rec["pattern_repr"] = repr(pattern)
        rec["density"] = _density(case.pattern, pattern, case.L, case.Hq)
        if case.skip is None:
            with _variant_settings(case):
                runner = _Runner(case, pattern, device, seed)
                rec["impl"] = runner.impl
                if device.type == "cuda":  # inputs, a peer's copies of them, caches: all part of the peak below
                    rec["allocated_before_bytes"] = int(torch.cuda.memory_allocated(device))
                result = time_fn(runner, device=device, warmup=warmup, reps=reps, flush_l2=flush_l2,
                                 max_time_s=max_time_s, sustain_s=sustain_s)
            rec["impl"], rec["note"] = runner.impl, runner.note
        else:
            rec["planned_skip"] = True
    except Exception as exc:  # noqa: BLE001 - pattern construction or input allocation failed
        status, message = classify_exception(exc)
        result.update(status=status, message=message)
    runner = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rec.update(result)
    rec["times_ms"] = result.get("times_ms", [])
    return with_derived(rec, baselines or {})


# --------------------------------------------------------------------------------------------------
# Records file
# --------------------------------------------------------------------------------------------------
def read_jsonl(path, filename: str = RESULTS_FILE, warn: bool = True) -> list:
    """Every record of a JSON-lines results file (a directory means ``filename`` in it); lines that do not
    parse are skipped, with a warning when ``warn``."""
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if warn:
                    warnings.warn(f"{path}:{i}: not a JSON record, skipped")
    return out


def load_records(path) -> list:
    """Every record of a results.jsonl (lines that do not parse are skipped with a warning)."""
    return read_jsonl(path)


def latest_records(records: Iterable[dict]) -> list:
    """One record per case key: the last ok one if any, else the last one. Order of first appearance."""
    best, order = {}, []
    for r in records:
        k = r.get("key")
        if k not in best:
            order.append(k)
            best[k] = r
        elif r.get("status") == "ok" or best[k].get("status") != "ok":
            best[k] = r
    return [best[k] for k in order]


def _append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# Progress and summary
# --------------------------------------------------------------------------------------------------
def _fmt(x, spec=".3g", none="-"):
    if x is None:
        return none
    return format(x, spec)


def record_line(rec: dict) -> str:
    """One line about a record, for progress output."""
    head = case_label_of(rec)
    if rec.get("status") == "ok":
        tf = rec.get("tflops")
        gpu = describe_gpu_state(rec)
        return (f"{head}: {rec['median_ms']:.3f} ms [{rec['p20_ms']:.3f}, {rec['p80_ms']:.3f}] x{rec['reps']}, "
                f"{_fmt(tf, '.3g')} TFLOP/s, first call {rec['compile_ms']:.0f} ms" + (f" ({gpu})" if gpu else ""))
    msg = (rec.get("message") or "").splitlines()[0][:160] if rec.get("message") else ""
    return f"{head}: {rec.get('status')}" + (f" ({msg})" if msg else "")


class _Progress:
    """One bar over the cases (see `progress.Bars`)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        from .progress import Bars
        self.bars = Bars(enabled and total > 0, stream)
        self._task = self.bars.task("bench", total)

    def start(self, case: Case):
        self.bars.update(self._task, description=case.label())

    def done(self, rec: dict, resumed: bool = False):
        line = ("resumed, already recorded ok: " + case_label_of(rec)) if resumed else record_line(rec)
        self.bars.item_done(self._task, line)

    def close(self):
        self.bars.close()


def case_label_of(rec: dict) -> str:
    return (f"{rec['pattern']} L={rec['Lq']} B={rec.get('B')} D={rec.get('D')} "
            f"{DIRECTION_LABELS.get(rec['direction'], rec['direction'])} {rec['backend']}")


SUMMARY_COLUMNS = ("pattern", "L", "B", "D", "backend", "direction", "ms", "TFLOP/s", "frac ideal", "peak MB",
                   "status")


def summary_rows(records: Iterable[dict]) -> list:
    rows = []
    for r in records:
        ok = r.get("status") == "ok"
        rows.append([r["pattern"], str(r["Lq"]), str(r.get("B", "")), str(r.get("D", "")), r["backend"],
                     DIRECTION_LABELS.get(r["direction"], r["direction"]),
                     _fmt(r.get("median_ms"), ".3f") if ok else "-", _fmt(r.get("tflops"), ".3g") if ok else "-",
                     _fmt(r.get("frac_ideal"), ".2f") if ok else "-",
                     _fmt(r["peak_mem_bytes"] / 2**20, ".0f") if ok and r.get("peak_mem_bytes") else "-",
                     r.get("status", "?")])
    return rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(str(c)))
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], stream=None) -> None:
    """Print a table: with rich when installed and writing to a terminal, else plain text."""
    stream = stream or sys.stdout
    if getattr(stream, "isatty", lambda: False)():
        try:
            from rich.console import Console
            from rich.table import Table
            t = Table(title=title)
            for h in headers:
                t.add_column(h, overflow="fold")
            for r in rows:
                t.add_row(*[str(c) for c in r])
            Console(file=stream).print(t)
            return
        except Exception:  # noqa: BLE001
            pass
    print(title, file=stream)
    print(format_table(headers, rows), file=stream)


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------
def run_suite(cases: Sequence[Case], out_dir, *, suite: Suite, reps: Optional[int] = None,
              warmup: Optional[int] = None, max_time_s: Optional[float] = None, seed: int = 0,
              progress: bool = True, flush_l2: bool = True, stream=None, sustain_s: Optional[float] = None) -> list:
    """Run ``cases``, appending a record per measurement to ``out_dir/results.jsonl``.

    Cases already recorded there with status ok (same key: parameters, backend and device name) are
    skipped, and so are planned skips already recorded. Returns the latest record of every case.
    ``sustain_s`` (CUDA): each case's timed calls follow that many seconds of untimed ones (see `timing.time_fn`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    device = torch.device(suite.device)
    env = environment(device)
    reps = suite.reps if reps is None else reps
    warmup = suite.warmup if warmup is None else warmup
    max_time_s = suite.max_time_s if max_time_s is None else max_time_s
    if device.type == "cuda":
        note = _prepare_cuda_compile()
        if note:
            env["compile_config"] = note
    existing = load_records(path)
    done = {}
    for r in existing:
        if r.get("status") == "ok" or (r.get("planned_skip") and r.get("status") == "unsupported"):
            done.setdefault(r.get("key"), r)
    all_records = list(existing)
    baselines = dense_baselines(all_records)
    prog = _Progress(len(cases), enabled=progress, stream=stream)
    keys = []
    try:
        for case in cases:
            key = case_key(case, env["device_name"], sustain_s if device.type == "cuda" else None)
            keys.append(key)
            prev = done.get(key)
            if prev is not None and (prev.get("status") == "ok" or prev.get("message") == case.skip):
                prog.done(prev, resumed=prev.get("status") == "ok")
                continue
            prog.start(case)
            rec = run_case(case, device, env, seed=seed, reps=reps, warmup=warmup, max_time_s=max_time_s,
                           flush_l2=flush_l2, baselines=baselines, suite=suite.name, sustain_s=sustain_s)
            if rec.get("status") == "ok" and rec.get("pattern_kind") == "full":
                baselines = dense_baselines(all_records + [rec])
                rec = with_derived(rec, baselines)
            _append(path, rec)
            all_records.append(rec)
            prog.done(rec)
    finally:
        prog.close()
    baselines = dense_baselines(all_records)
    latest = {r["key"]: r for r in latest_records(all_records)}
    return [with_derived(latest[k], baselines) for k in dict.fromkeys(keys) if k in latest]


def describe_plan(cases: Sequence[Case]) -> str:
    rows = [[c.pattern, str(c.L), str(c.B), str(c.D), c.backend, DIRECTION_LABELS[c.direction],
             ("skip: " + c.skip[:60]) if c.skip else ("run (peer)" if c.backend in PEERS else "run")]
            for c in cases]
    n_run = sum(1 for c in cases if not c.skip)
    return format_table(("pattern", "L", "B", "D", "backend", "direction", "plan"), rows) + \
        f"\n{len(cases)} cases, {n_run} to measure, {len(cases) - n_run} planned skips"
