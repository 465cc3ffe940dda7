"""Needle-in-a-haystack / key-value retrieval at length (RULER-style, token level): generators, one trained
model, sparse patterns swapped in at inference, a resumable grid runner and a report.

``BENCHMARK_PROTOCOL.md`` (Quality): accuracy per context length and needle depth, for a model trained here,
with each sparse or compressed method applied.

Vocabulary (``V`` tokens, `Vocab`)::

    0                 unused (never generated)
    1                 MARK: opens every needle and the query
    [2, 2 + n_keys)   key tokens
    [.., + n_values)  value tokens
    [.., V)           filler (haystack) tokens: never the marker, a key or a value

One example of ``L`` tokens with ``P`` needles (``P = 1``: task ``single``; ``P > 1``: task ``multikey``,
RULER's multi-key NIAH), key length ``kl`` and value length ``vl``::

    filler ... [MARK k1..kkl v1..vvl] filler ... [MARK ...] filler ... | MARK k1..kkl v1..v(vl-1)
    \\______________ haystack of H filler tokens + P needles _________/  \\____ query: kl + vl tokens ___/

- ``H = L - (kl + vl) - P * (1 + kl + vl)`` filler tokens, uniform over the filler range.
- Needle ``i`` is inserted after ``o_i`` filler tokens (``0 <= o_i <= H``). The queried needle (needle 0) sits
  at ``o_0 = round(depth * H)``: depth 0.0 is the very start of the context, 1.0 right before the query. The
  other ``P - 1`` needles (distractors) are inserted at uniform random offsets. The ``j``-th needle in order
  of offset starts at position ``o + j * (1 + kl + vl)``.
- Keys of the ``P`` needles differ (distinct first key token); values are drawn at random (distinct first
  value token too, so a wrong needle is always a wrong answer).
- The query repeats the queried needle's marker and key; the answer is its value, teacher-forced: the
  target of position ``L - vl + j - 1`` is value token ``j`` (``-100`` everywhere else), so the loss and the
  accuracy count only the ``vl`` answer tokens. Accuracy is per answer token (= per example when ``vl = 1``).

Everything is a function of ``(seed, split, task, L, depth, ...)`` (`niah_data`): every method is tested on
the same examples.

Training (`train_model`): one `TinyLM` with dense causal attention and rotary positions, trained with
`attnzoo.bench.recall.train` on examples of length ``train_len`` with uniform random depths, half single
needle and half multi-key. Positions are relative (RoPE) and the depth is uniform, so this covers every
needle-query distance up to ``train_len``; shorter contexts are windows of the same task. The checkpoint
(``niah_model_<key>.pt``) is saved in the output folder and reused.

Methods (`parse_method`, applied at inference only by setting ``Attention.pattern`` on every attention layer
of the trained model, see `use_pattern`)::

    dense            Causal()
    window:W         SlidingWindow(W - 1)                  (a causal window of W keys)
    streaming:S,W    Sinks(S) | SlidingWindow(W - 1)       (StreamingLLM)
    chunked:C        Chunked(C) & Causal()
    power:W          PowerAttention(W - 1)                 (window of W keys + power-of-two distances)
    dilated:W,D      Dilated(W, D)                         (W keys, every D-th)

Content-routed methods (`attnzoo.routing` routers: the block mask is chosen per call from q and k; arguments
separated by ``:`` so that they survive comma-separated method lists)::

    topk:B:K         TopKBlocks(block_size=B, top_k=K)     (pooled q . pooled k, K blocks + sink + local)
    longheads:C:K    LongHeads(chunk_size=C, top_k=K)
    landmark:B:K     Landmark(block_size=B, top_k=K)
    hip:B:K          HiP(block_size=B, top_k=K)            (hierarchical top-k pruning)
    vslash:B:V:S     VerticalSlash(V, S, block_size=B)     (MInference: V columns, S diagonals, as blocks)
    flexprefill:B:G[:T]  FlexPrefill(block_size=B, gamma=G, tau=T)  (tau defaults to 0.1)

(`KMeansRouting` is not offered: its centroids are learned per layer, and the model here is trained dense.)

A static pattern's ``density`` is recorded from its closed form; a router's is *measured*: the visible
(query, key) pairs of every routed call of the cell (all layers, heads and examples) over all pairs
(``density_source`` says which).

Expected: dense retrieves within the training length; windows fail once the needle is farther from the query
than the window (two layers reach about 2W back); sinks do not help retrieval.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..routing import Router
from .recall import (IGNORE_INDEX, TrainConfig, _append, _distinct, _figure, _md_table, _prepare_cuda, _slug,
                     default_device, derive_seed, environment, evaluate, latest_records, train)

RESULTS_FILE = "results_niah.jsonl"
REPORT_FILE = "report_niah.md"
SCHEMA_VERSION = 1
MARK = 1
TASKS = ("single", "multikey")


# --------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vocab:
    """Token ranges: MARK = 1, keys, values, then filler up to ``size``."""
    size: int = 512
    n_keys: int = 64
    n_values: int = 64

    def __post_init__(self):
        if self.n_keys < 1 or self.n_values < 1 or self.filler_lo >= self.size:
            raise ValueError(f"vocabulary {self.size} has no room for MARK, {self.n_keys} keys, "
                             f"{self.n_values} values and some filler")

    @property
    def key_lo(self):
        return 2

    @property
    def value_lo(self):
        return 2 + self.n_keys

    @property
    def filler_lo(self):
        return 2 + self.n_keys + self.n_values

    @property
    def n_filler(self):
        return self.size - self.filler_lo


def needle_len(key_len: int = 1, value_len: int = 1) -> int:
    return 1 + key_len + value_len


def haystack_len(seq_len: int, num_needles: int = 1, key_len: int = 1, value_len: int = 1) -> int:
    """Filler tokens in an example: ``L - (kl + vl) - P * (1 + kl + vl)``."""
    return seq_len - (key_len + value_len) - num_needles * needle_len(key_len, value_len)


def niah(num_examples: int, seq_len: int, depth: Optional[float] = None, num_needles: int = 1,
         vocab: Vocab = Vocab(), key_len: int = 1, value_len: int = 1, seed: int = 0, return_info: bool = False):
    """``(inputs, targets)`` int64 (num_examples, seq_len): the layout is in the module docstring.

    ``depth`` in [0, 1] places the queried needle; ``None`` draws a uniform depth per example. With
    ``return_info`` also a dict: ``needle_pos`` (start of the queried needle), ``depth`` (per example),
    ``keys`` (n, P, kl), ``values`` (n, P, vl), ``haystack`` (H)."""
    P, kl, vl, L = num_needles, key_len, value_len, seq_len
    for name, n in (("seq_len", L), ("num_needles", P), ("key_len", kl), ("value_len", vl)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"niah {name} must be a positive integer, got {n!r}")
    H = haystack_len(L, P, kl, vl)
    if H < 0:
        raise ValueError(f"niah seq_len={L} is too short for {P} needles of {needle_len(kl, vl)} tokens and a "
                         f"query of {kl + vl} tokens")
    if P > vocab.n_keys or P > vocab.n_values:
        raise ValueError(f"{P} needles need {P} distinct keys and values; the vocabulary has {vocab.n_keys} keys "
                         f"and {vocab.n_values} values")
    if depth is not None and not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"niah depth must be in [0, 1], got {depth!r}")
    n = num_examples
    gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    x = torch.randint(vocab.filler_lo, vocab.size, (n, L), generator=gen)
    keys = torch.randint(vocab.key_lo, vocab.value_lo, (n, P, kl), generator=gen)
    keys[:, :, 0] = _distinct(n, P, vocab.n_keys, gen) + vocab.key_lo
    values = torch.randint(vocab.value_lo, vocab.filler_lo, (n, P, vl), generator=gen)
    values[:, :, 0] = _distinct(n, P, vocab.n_values, gen) + vocab.value_lo
    if depth is None:
        d = torch.rand(n, generator=gen, dtype=torch.float64)
    else:
        d = torch.full((n,), float(depth), dtype=torch.float64)
    offsets = torch.randint(0, H + 1, (n, P), generator=gen)
    offsets[:, 0] = torch.round(d * H).long()
    # order needles by offset; ties: the queried needle first (stable sort on offset*2 + (i>0))
    order = torch.argsort(offsets * 2 + (torch.arange(P) > 0).long(), dim=1, stable=True)
    nl = needle_len(kl, vl)
    starts_sorted = offsets.gather(1, order) + torch.arange(P) * nl           # (n, P) in sorted order
    starts = torch.empty_like(starts_sorted).scatter_(1, order, starts_sorted)  # back to needle index
    needle = torch.cat([torch.full((n, P, 1), MARK, dtype=torch.int64), keys, values], dim=2)  # (n, P, nl)
    pos = starts[:, :, None] + torch.arange(nl)                                 # (n, P, nl)
    x.scatter_(1, pos.reshape(n, -1), needle.reshape(n, -1))
    t0 = L - (kl + vl)
    x[:, t0] = MARK
    x[:, t0 + 1:t0 + 1 + kl] = keys[:, 0]
    if vl > 1:
        x[:, t0 + 1 + kl:] = values[:, 0, :vl - 1]
    y = torch.full((n, L), IGNORE_INDEX, dtype=torch.int64)
    y[:, t0 + kl:] = values[:, 0]
    if not return_info:
        return x, y
    return x, y, dict(needle_pos=starts[:, 0], depth=d, keys=keys, values=values, haystack=H)


def niah_data(split: str, num_examples: int, task: str, seq_len: int, depth: Optional[float], num_needles: int,
              vocab: Vocab, key_len: int = 1, value_len: int = 1, seed: int = 0):
    """The ``split`` set of a task (``single`` or ``multikey``) with its own seed stream."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if task not in TASKS:
        raise ValueError(f"unknown niah task {task!r}; choose from {', '.join(TASKS)}")
    P = 1 if task == "single" else num_needles
    s = derive_seed("niah", seed, split, task, seq_len, depth, P, vocab.size, vocab.n_keys, vocab.n_values,
                    key_len, value_len)
    return niah(num_examples, seq_len, depth, P, vocab, key_len, value_len, seed=s)


# --------------------------------------------------------------------------------------------------
# Methods (patterns swapped in at inference)
# --------------------------------------------------------------------------------------------------
def _router_methods() -> dict:
    """Router methods: name -> (usage, integer fields, optional float fields, builder from the parsed fields)."""
    from .. import routing as R

    def opt(a, i, key):
        return {key: a[i]} if len(a) > i else {}
    table = {
        "topk": ("topk:B:K", 2, 0, lambda a: R.TopKBlocks(block_size=a[0], top_k=a[1])),
        "longheads": ("longheads:C:K", 2, 0, lambda a: R.LongHeads(chunk_size=a[0], top_k=a[1])),
        "landmark": ("landmark:B:K", 2, 0, lambda a: R.Landmark(block_size=a[0], top_k=a[1])),
        "vslash": ("vslash:B:V:S", 3, 0, lambda a: R.VerticalSlash(a[1], a[2], block_size=a[0])),
        "flexprefill": ("flexprefill:B:G[:T]", 1, 2,
                        lambda a: R.FlexPrefill(block_size=a[0], gamma=a[1], **opt(a, 2, "tau"))),
    }
    if hasattr(R, "HiP"):
        table["hip"] = ("hip:B:K", 2, 0, lambda a: R.HiP(block_size=a[0], top_k=a[1]))
    return table


def _parse_router(name: str, fields: list, spec: str):
    """``fields``: the ``:``-separated arguments. Integer fields first, then float fields (the first required)."""
    usage, n_int, n_float, build = _router_methods()[name]
    n_min = n_int + min(n_float, 1)
    if not n_min <= len(fields) <= n_int + n_float:
        raise ValueError(f"method {spec!r}: expected {usage}")
    args = []
    for i, f in enumerate(fields):
        kind = int if i < n_int else float
        try:
            args.append(kind(f))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"method {spec!r}: field {i + 1} ({f!r}) must be {what}; expected {usage}") from None
    try:
        return build(args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"method {spec!r}: {e}") from None


def method_names() -> str:
    """The method syntax, for error messages and help."""
    return ("dense, window:W, streaming:S,W, chunked:C, power:W, dilated:W,D, "
            + ", ".join(m[0] for m in _router_methods().values()))


def parse_method(spec: str):
    """A method name -> its pattern, or its router for the routed methods (see the module docstring)."""
    from ..patterns import Causal, Chunked, Dilated, PowerAttention, Sinks, SlidingWindow
    name, _, arg = str(spec).strip().partition(":")
    if name.lower() in _router_methods():
        return _parse_router(name.lower(), arg.split(":") if arg else [], spec)
    try:
        nums = [int(a) for a in arg.split(",")] if arg else []
    except ValueError:
        raise ValueError(f"method {spec!r}: arguments must be integers") from None
    name = name.lower()
    want = {"dense": 0, "window": 1, "streaming": 2, "chunked": 1, "power": 1, "dilated": 2}
    if name not in want:
        raise ValueError(f"unknown niah method {spec!r}; choose from {method_names()}")
    if len(nums) != want[name] or any(v < 1 for v in nums):
        raise ValueError(f"method {spec!r} takes {want[name]} positive integer argument(s)")
    if name == "dense":
        return Causal()
    if name == "window":
        return SlidingWindow(nums[0] - 1)
    if name == "streaming":
        return Sinks(nums[0]) | SlidingWindow(nums[1] - 1)
    if name == "chunked":
        return Chunked(nums[0]) & Causal()
    if name == "power":
        return PowerAttention(nums[0] - 1)
    return Dilated(nums[0], nums[1])


def attention_layers(model) -> list:
    from ..layers import Attention
    return [m for m in model.modules() if isinstance(m, Attention)]


def _visible_pairs(mask: torch.Tensor, q_len: int, kv_len: int, bs: int, causal: bool) -> int:
    """Visible (query, key) pairs of a router's block mask (B, H, nb, nb), queries bottom-right aligned."""
    nb = mask.shape[-1]
    dev = mask.device
    pos = torch.arange(kv_len - q_len, kv_len, device=dev)                  # query positions
    k0 = torch.arange(nb, device=dev) * bs                                   # key block c: [k0, k0 + w)
    w = (k0 + bs).clamp(max=kv_len) - k0
    keys = ((pos[:, None] + 1 - k0[None, :]).clamp(min=0)).minimum(w) if causal else w.expand(q_len, nb)
    pairs = torch.zeros(nb, nb, dtype=torch.int64, device=dev).index_add_(0, pos // bs, keys.to(torch.int64))
    return int((mask.to(torch.int64) * pairs).sum())


class MeasuredRouter(Router):
    """Routes exactly as ``router`` (its ``plan``) and counts the visible pairs of every call: ``density`` is
    the measured pair density so far (None before the first call)."""

    def __init__(self, router: Router):
        self.inner, self.block_size, self.causal = router, router.block_size, router.causal
        self.visible, self.pairs = 0, 0

    def __call__(self, q, k):
        return self.inner(q, k)

    def pattern(self, mask):
        return self.inner.pattern(mask)

    def plan(self, q, k, v, mask=None):
        call = self.inner.plan(q, k, v, mask)
        b, h, lq, _ = q.shape
        self.visible += _visible_pairs(call.mask, lq, k.shape[2], self.block_size, self.causal)
        self.pairs += b * h * lq * k.shape[2]
        return call

    @property
    def density(self) -> Optional[float]:
        return self.visible / self.pairs if self.pairs else None

    def __repr__(self):
        return repr(self.inner)


@contextmanager
def use_pattern(model, pattern):
    """Set ``pattern`` on every `Attention` layer of ``model`` (its ``pattern`` attribute; Attention has no
    setter) for the duration of the block, then restore the old ones. No retraining."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError("the model has no attnzoo Attention layer to swap a pattern into")
    old = [m.pattern for m in layers]
    try:
        for m in layers:
            m.pattern = pattern
        yield model
    finally:
        for m, p in zip(layers, old):
            m.pattern = p


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------
@dataclass
class NiahGrid:
    name: str
    train_len: int = 256
    lengths: tuple = (256, 512, 1024)
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    methods: tuple = ("dense", "window:64", "streaming:4,64", "chunked:64", "power:16", "dilated:32,4")
    tasks: tuple = TASKS
    num_needles: int = 4             # multikey
    vocab_size: int = 512
    n_keys: int = 64
    n_values: int = 64
    key_len: int = 1
    value_len: int = 1
    d_model: int = 64
    n_layers: int = 2
    n_heads: Optional[int] = None
    mlp: bool = False
    lr: float = 3e-3
    batch_size: int = 64
    steps: int = 1200
    n_train: int = 16_000
    n_val: int = 512
    eval_every: int = 200
    early_stop_acc: Optional[float] = 0.995
    n_test: int = 100                # per (task, method, length, depth) cell
    eval_batch_size: int = 50
    seed: int = 0

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.vocab_size, self.n_keys, self.n_values)


def cpu_grid() -> NiahGrid:
    """A few minutes on 2 CPU cores: the single-needle task only, trained at 256 (up to 1000 steps, early stop
    at 0.995), tested at 256/512/1024 (1x, 2x, 4x) on 5 depths, windows of 64 keys, 64 examples per cell.

    Multi-key is left to the ``full`` grid (``--niah-tasks single,multikey`` adds it here): a 2-layer d_model 64 model
    trained on the mix for 1500 steps at L=128 solved the single needle but stayed at chance (~0.25) on
    4-pair multi-key, which needs an induction circuit (match the key, copy the next token) and more steps
    than a CPU smoke run has."""
    return NiahGrid(name="cpu", tasks=("single",), steps=1000, n_test=64, eval_batch_size=64)


def full_grid() -> NiahGrid:
    """For a GPU: train at 1024, test 1K..8K, 11 depths, windows of 256 keys, a wider 4-layer model."""
    return NiahGrid(name="full", train_len=1024, lengths=(1024, 2048, 4096, 8192),
                    depths=tuple(i / 10 for i in range(11)),
                    methods=("dense", "window:256", "streaming:4,256", "chunked:256", "power:64", "dilated:64,8"),
                    num_needles=8, vocab_size=2048, n_keys=256, n_values=256, d_model=128, n_layers=4, lr=1e-3,
                    batch_size=32, steps=6000, n_train=100_000, n_val=1000, eval_every=500, n_test=200,
                    eval_batch_size=8)


def get_grid(name: str) -> NiahGrid:
    grids = {"cpu": cpu_grid, "full": full_grid}
    if name not in grids:
        raise ValueError(f"unknown niah grid {name!r}; choose from {', '.join(grids)}")
    return grids[name]()


def check_grid(grid: NiahGrid) -> None:
    for m in grid.methods:
        parse_method(m)
    for t in grid.tasks:
        if t not in TASKS:
            raise ValueError(f"unknown niah task {t!r}; choose from {', '.join(TASKS)}")
    for d in grid.depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {d!r}")
    grid.vocab  # noqa: B018 - validates
    for L in tuple(grid.lengths) + (grid.train_len,):
        if haystack_len(int(L), grid.num_needles, grid.key_len, grid.value_len) < 0:
            raise ValueError(f"length {L} is too short for {grid.num_needles} needles")


def model_params(grid: NiahGrid) -> dict:
    """Everything that determines the trained model."""
    return dict(train_len=grid.train_len, tasks=list(grid.tasks), num_needles=grid.num_needles,
                vocab_size=grid.vocab_size, n_keys=grid.n_keys, n_values=grid.n_values, key_len=grid.key_len,
                value_len=grid.value_len, d_model=grid.d_model, n_layers=grid.n_layers, n_heads=grid.n_heads,
                mlp=grid.mlp, lr=grid.lr, batch_size=grid.batch_size, steps=grid.steps, n_train=grid.n_train,
                n_val=grid.n_val, eval_every=grid.eval_every, early_stop_acc=grid.early_stop_acc, seed=grid.seed)


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_key(grid: NiahGrid) -> str:
    return _hash(model_params(grid))


def checkpoint_path(grid: NiahGrid, out_dir) -> Path:
    return Path(out_dir) / f"niah_model_{model_key(grid)}.pt"


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    length: int
    depth: float

    def label(self) -> str:
        return f"{self.task} {self.method} L={self.length} depth={self.depth:g}"


def plan_cells(grid: NiahGrid) -> list:
    check_grid(grid)
    return [Cell(t, m, int(L), float(d)) for t in grid.tasks for m in grid.methods for L in grid.lengths
            for d in grid.depths]


def cell_params(grid: NiahGrid, cell: Cell) -> dict:
    return dict(model_key=model_key(grid), task=cell.task, method=cell.method, length=cell.length, depth=cell.depth,
                n_test=grid.n_test, seed=grid.seed)


def cell_key(grid: NiahGrid, cell: Cell) -> str:
    return _hash(cell_params(grid, cell))


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------
def build_model(grid: NiahGrid):
    from ..layers import TinyLM
    torch.manual_seed(derive_seed("niah-init", grid.seed, grid.d_model, grid.n_layers))
    return TinyLM(grid.vocab_size, grid.d_model, grid.n_layers, "attention", n_heads=grid.n_heads, mlp=grid.mlp)


def _mixed_set(grid: NiahGrid, split: str, n: int):
    """``n`` examples at train_len, uniform depths, split evenly over the grid's tasks."""
    xs, ys = [], []
    for i, t in enumerate(grid.tasks):
        k = n // len(grid.tasks) + (1 if i < n % len(grid.tasks) else 0)
        x, y = niah_data(split, k, t, grid.train_len, None, grid.num_needles, grid.vocab, grid.key_len,
                         grid.value_len, grid.seed)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def train_model(grid: NiahGrid, out_dir, device, on_step=None, log=None):
    """The trained model of ``grid``: loaded from ``out_dir`` when its checkpoint exists, else trained and saved.
    Returns ``(model, info)``; ``info`` has the training summary and ``resumed``."""
    path = checkpoint_path(grid, out_dir)
    model = build_model(grid)
    if path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["state_dict"])
        return model.to(device), dict(ck["info"], resumed=True)
    train_set = _mixed_set(grid, "train", grid.n_train)
    val_set = _mixed_set(grid, "test", grid.n_val)
    cfg = TrainConfig(lr=grid.lr, batch_size=grid.batch_size, steps=grid.steps, eval_every=grid.eval_every,
                      early_stop_acc=grid.early_stop_acc, seed=grid.seed, eval_batch_size=max(64, grid.batch_size))
    res = train(model.to(device), train_set, val_set, cfg, device, on_step=on_step)
    info = dict(val_acc=res["acc"], best_val_acc=res["best_acc"], train_loss=res["train_loss"], steps=res["steps"],
                train_wall_s=round(res["wall_s"], 2), early_stopped=res["early_stopped"], diverged=res["diverged"],
                history=res["history"], params=model.num_params(), model_key=model_key(grid))
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state_dict=model.state_dict(), info=info, params=model_params(grid)), tmp)
    tmp.replace(path)
    return model, dict(info, resumed=False)


def run_cell(model, grid: NiahGrid, cell: Cell, device, env: dict, model_info: dict) -> dict:
    params = {k: v for k, v in model_params(grid).items() if k != "tasks"}
    params.update(cell_params(grid, cell))
    rec = dict(schema=SCHEMA_VERSION, key=cell_key(grid, cell), grid=grid.name, **params, **env,
               val_acc=model_info.get("val_acc"), train_steps=model_info.get("steps"),
               timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    t0 = time.perf_counter()
    try:
        pattern = parse_method(cell.method)
        rec["pattern"] = repr(pattern)
        if isinstance(pattern, Router):   # no closed form: measured on the cell's own calls
            pattern = MeasuredRouter(pattern)
            rec["density_source"] = "measured"
        else:
            rec["density"] = float(pattern.density(cell.length, cell.length))
            rec["density_source"] = "static"
        x, y = niah_data("test", grid.n_test, cell.task, cell.length, cell.depth, grid.num_needles, grid.vocab,
                         grid.key_len, grid.value_len, grid.seed)
        with use_pattern(model, pattern):
            res = evaluate(model, x, y, grid.eval_batch_size, device)
        if rec["density_source"] == "measured":
            rec["density"] = pattern.density
        rec.update(status="ok", message="", acc=res["acc"], loss=res["loss"], answers=res["count"])
    except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        rec.update(status="oom" if oom else "error", message=f"{type(exc).__name__}: {exc}"[:2000], acc=None)
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


def load_niah_records(path) -> list:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class _Progress:
    """Bars over the training steps, then the cells (see `progress.Bars`)."""

    def __init__(self, enabled: bool = True, stream=None):
        from .progress import Bars
        self.bars, self.enabled, self._task = Bars(enabled, stream), enabled, None
        self.print = self.bars.print

    def begin(self, what: str, total: int):
        self._task = self.bars.task(what, total)

    def train_step(self, step: int, info: dict):
        from .progress import training_description
        if self.bars.rich and self._task is not None and (step % 10 == 0 or info.get("acc") is not None):
            self.bars.update(self._task, completed=step, description=training_description(info, "val acc"))
        elif not self.bars.rich and self.enabled and info.get("acc") is not None and step % 200 == 0:
            self.bars.print(f"  train step {step}: {training_description(info, 'val acc')}")

    def advance(self, description: str = ""):
        if self._task is not None:
            self.bars.update(self._task, advance=1, description=description)

    def close(self):
        self.bars.close()


def run_grid(grid: NiahGrid, out_dir, *, device=None, progress: bool = True, stream=None) -> list:
    """Train (or load) the model, then evaluate every cell not yet recorded ok in ``results_niah.jsonl``
    (one JSON line per cell). Returns the latest records of the grid's cells."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    device = torch.device(device) if device is not None else default_device()
    env = environment(device)
    if device.type == "cuda":
        env.update(_prepare_cuda())
    cells = plan_cells(grid)
    existing = load_niah_records(path)
    done = {r["key"]: r for r in existing if r.get("status") == "ok" and "key" in r}
    todo = [c for c in cells if cell_key(grid, c) not in done]
    prog = _Progress(progress, stream)
    try:
        if todo:
            resumed = checkpoint_path(grid, out_dir).exists()
            if not resumed:
                prog.print(f"training: TinyLM d_model={grid.d_model}, {grid.n_layers} layers, dense causal "
                           f"attention + RoPE, L={grid.train_len}, up to {grid.steps} steps")
                prog.begin("train", grid.steps)
            model, info = train_model(grid, out_dir, device, on_step=prog.train_step)
            prog.print(f"model {'loaded from ' + checkpoint_path(grid, out_dir).name if info['resumed'] else 'trained'}"
                       f": val acc {info['val_acc']:.3f} at L={grid.train_len} after {info['steps']} steps"
                       + (f" ({info['train_wall_s']:.1f} s)" if not info["resumed"] else ""))
            model.eval()
        n_skip = len(cells) - len(todo)
        if n_skip:
            prog.print(f"resumed: {n_skip} of {len(cells)} cells already recorded in {path.name}")
        prog.begin("cells", len(todo))
        for c in todo:
            rec = run_cell(model, grid, c, device, env, info)
            _append(path, rec)
            existing.append(rec)
            msg = f"{c.label()}: " + (f"acc {rec['acc']:.3f}" if rec["status"] == "ok" else rec["status"])
            if rec["status"] != "ok" or not prog.bars.rich:
                prog.print(f"  {msg}" + ("" if rec["status"] == "ok" else f" ({rec['message'][:160]})"))
            prog.advance(msg)
    finally:
        prog.close()
    by_key = {r["key"]: r for r in latest_records(existing) if "key" in r}
    keys = [cell_key(grid, c) for c in cells]
    return [by_key[k] for k in keys if k in by_key]


# --------------------------------------------------------------------------------------------------
# Summary and report
# --------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("task", "method", "pattern") + ("mean acc", "acc @ train len", "acc beyond", "cells")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def summary_rows(records: Sequence[dict]) -> list:
    rows = []
    ok = [r for r in latest_records(records) if r.get("status") == "ok"]
    for t, m in dict.fromkeys((r["task"], r["method"]) for r in ok):
        rs = [r for r in ok if (r["task"], r["method"]) == (t, m)]
        within = [r["acc"] for r in rs if r["length"] <= r["train_len"]]
        beyond = [r["acc"] for r in rs if r["length"] > r["train_len"]]
        rows.append([t, m, rs[0].get("pattern", ""), _f(_mean([r["acc"] for r in rs])), _f(_mean(within)),
                     _f(_mean(beyond)), str(len(rs))])
    return rows


def _groups(ok):
    return list(dict.fromkeys((r["task"], r["method"]) for r in ok))


def plot_heatmap(rs: Sequence[dict], title: str, path: Path) -> None:
    lengths = sorted({r["length"] for r in rs})
    depths = sorted({r["depth"] for r in rs})
    grid = [[float("nan")] * len(depths) for _ in lengths]
    for r in rs:
        grid[lengths.index(r["length"])][depths.index(r["depth"])] = r["acc"]
    fig, (ax,) = _figure(w=1.2 + 0.9 * len(depths) + 1.5, h=1.4 + 0.55 * len(lengths) + 0.8)
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
    for i in range(len(lengths)):
        for j in range(len(depths)):
            v = grid[i][j]
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("needle depth (0 = start of context, 1 = just before the query)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    fig.savefig(path)


def plot_acc_vs_length(ok: Sequence[dict], path: Path) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    fig, axes = _figure(w=max(5.5, 5.0 * len(tasks)), h=4.2, ncols=len(tasks))
    markers = "osD^v<>ph*"
    for ax, t in zip(axes, tasks):
        methods = list(dict.fromkeys(r["method"] for r in ok if r["task"] == t))
        for i, m in enumerate(methods):
            rs = [r for r in ok if (r["task"], r["method"]) == (t, m)]
            Ls = sorted({r["length"] for r in rs})
            ax.plot(Ls, [_mean([r["acc"] for r in rs if r["length"] == L]) for L in Ls],
                    marker=markers[i % len(markers)], label=m, linewidth=1.6)
        train_lens = sorted({r["train_len"] for r in ok if r["task"] == t})
        for tl in train_lens:
            ax.axvline(tl, color="0.5", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        Ls = sorted({r["length"] for r in ok if r["task"] == t})
        ax.set_xticks(Ls, [str(L) for L in Ls])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens; dotted: training length)")
        ax.set_title(f"task {t}", fontsize=10)
        ax.grid(True, alpha=0.35)
    axes[0].set_ylabel("accuracy (mean over depths)")
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


def report_markdown(records: Sequence[dict], plot_files: dict = None, plot_note: str = "") -> str:
    recs = latest_records(records)
    ok = [r for r in recs if r.get("status") == "ok"]
    lines = ["## Needle in a haystack / key-value retrieval at length", ""]
    if not recs:
        return "\n".join(lines + ["No niah results yet.", ""])
    plot_files = plot_files or {}
    r0 = recs[0]
    devs = ", ".join(sorted({r.get("device_name", "?") for r in recs}))
    lines += [f"One TinyLM (d_model {r0.get('d_model')}, {r0.get('n_layers')} layers, dense causal attention with "
              f"rotary positions, no MLP) trained at length {r0.get('train_len')} on uniform needle depths "
              f"(single needle and multi-key with {r0.get('num_needles')} pairs; vocabulary {r0.get('vocab_size')}; "
              f"{r0.get('train_steps')} steps; validation accuracy {_f(r0.get('val_acc'))}), then each method's "
              f"pattern set on every attention layer at inference, without retraining. Accuracy over the answer "
              f"tokens of {r0.get('n_test')} test examples per cell. Device: {devs}.", ""]
    if ok:
        lines += ["### Summary", "", _md_table(list(SUMMARY_COLUMNS), summary_rows(ok)), ""]
    for t, m in _groups(ok):
        rs = [r for r in ok if (r["task"], r["method"]) == (t, m)]
        lengths = sorted({r["length"] for r in rs})
        depths = sorted({r["depth"] for r in rs})
        got = {(r["length"], r["depth"]): r["acc"] for r in rs}
        rows = [[str(L) + (" (train)" if L == rs[0]["train_len"] else "")] +
                [_f(got.get((L, d)), 2) for d in depths] + [_f(_mean([got.get((L, d)) for d in depths]), 2)]
                for L in lengths]
        lines += [f"### `{m}` ({rs[0].get('pattern', '')}), task {t}", "",
                  _md_table(["length \\ depth"] + [f"{d:g}" for d in depths] + ["mean"], rows), ""]
        f = plot_files.get((t, m))
        if f:
            lines += [f"![{f}]({f})", ""]
    if plot_files.get("lines"):
        lines += ["### Accuracy vs length", "", f"![{plot_files['lines']}]({plot_files['lines']})", ""]
    if plot_note:
        lines += [plot_note, ""]
    bad = [r for r in recs if r.get("status") != "ok"]
    if bad:
        lines += ["### Not measured", ""]
        lines += [f"- {r.get('task')} `{r.get('method')}` L={r.get('length')} depth={r.get('depth')}: "
                  f"{r.get('status')}: {(r.get('message') or '').splitlines()[0][:200] if r.get('message') else ''}"
                  for r in bad]
        lines.append("")
    return "\n".join(lines)


def write_niah_report(results, out_dir, plots: bool = True) -> Path:
    """Write ``report_niah.md`` with a heatmap PNG per (task, method) and ``niah_acc_vs_length.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = results if isinstance(results, list) else load_niah_records(results)
    ok = [r for r in latest_records(records) if r.get("status") == "ok"]
    files, note = {}, ""
    if plots and ok:
        try:
            import matplotlib  # noqa: F401
        except Exception as e:  # noqa: BLE001
            note = f"Plots skipped: matplotlib is not importable ({type(e).__name__}: {e})."
        else:
            for t, m in _groups(ok):
                name = f"niah_heatmap_{_slug(t)}_{_slug(m)}.png"
                rs = [r for r in ok if (r["task"], r["method"]) == (t, m)]
                plot_heatmap(rs, f"{m} ({rs[0].get('pattern', '')}), task {t}, trained at L={rs[0]['train_len']}",
                             out_dir / name)
                files[(t, m)] = name
            plot_acc_vs_length(ok, out_dir / "niah_acc_vs_length.png")
            files["lines"] = "niah_acc_vs_length.png"
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    text = f"# attnzoo niah report\n\nWritten {stamp} from `{RESULTS_FILE}`.\n\n" + report_markdown(records, files, note)
    path = out_dir / REPORT_FILE
    path.write_text(text)
    return path
