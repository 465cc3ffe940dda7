"""MQAR (multi-query associative recall): the generator, a trainer, a resumable grid runner and a report.

The task (Arora et al. 2023, "Zoology"; ``BENCHMARK_PROTOCOL.md``, Quality). One example of ``L`` input tokens
with ``K`` key-value pairs and vocabulary ``V``::

    position:  0   1   2   3  ... 2K-2 2K-1 | 2K ...                                        L-1
    input:     k1  v1  k2  v2 ... kK   vK   | 0  0 .. kj vj 0 0 .. ki vi 0 ...   (0 = filler)
    target:    -100 everywhere              | -100 .. vj -100 ....... vi -100 ...

- Keys are ``K`` distinct tokens from ``[1, V/2)``, values ``K`` distinct tokens from ``[V/2, V)``; token 0
  is the filler and is never a key or a value.
- After the ``2K``-token prefix the rest is cut into ``S = (L - 2K) // 2`` slots of two tokens; slot ``g``
  starts at position ``2K + 2g``. ``K`` slots are drawn without replacement with probability proportional
  to ``(g + 1) ** (a - 1)`` (a power law, ``a = 0.01``: queries cluster near the prefix, with a long tail).
  Every key is queried exactly once, in random order: the key at the slot's first position, its value at
  the second (the value that follows is visible to later positions, as in Zoology's shifted sequences).
- The target is the value at the query position (the model predicts the next token) and ``-100``
  (ignored) everywhere else: the loss and the accuracy count only the ``K`` answers per example.

The data is a function of ``(seed, split, L, K, V, a)`` only (`mqar_data`), so every mixer, width and
learning rate of a grid trains and is tested on the same examples; the test set is drawn from its own
seed stream, disjoint from training with overwhelming probability.

The trainer: AdamW (weight decay 0.1 on matrices and embeddings, none on norms and biases), linear warm-up
then cosine decay, gradient clipping at 1.0, evaluation every ``eval_every`` steps on the whole test set
(accuracy over answer tokens) and an optional early stop at ``early_stop_acc``.

The runner (`run_grid`) trains one model per cell (mixer, L, K, d_model, lr), appends one JSON line per cell
to ``results_recall.jsonl`` (skipping cells already recorded ok: resumable), flags the best learning rate of
each (mixer, L, K, d_model) and writes ``report_recall.md`` with an accuracy table and plots.

Grids: ``full`` is the protocol (V = 8192, (L, K) in {(64,4), (128,8), (256,16), (512,64)}, d_model in
{64, 128, 256, 512}, lr in {1e-4, 3e-4, 1e-3, 3e-3}, 2 layers, no MLP; 100K training / 3K test examples,
Zoology's batch sizes, up to 20K steps with an early stop at 0.99). ``cpu`` is a smoke run of a few minutes
on 2 cores: the (64, 4) task at d_model 64, attention against a sliding window of 8 keys (two layers of it
see at most 15 tokens back), with V = 2048, fewer examples and steps and lr {1e-3, 3e-3} (`cpu_grid` says
why). Measured on 2 AMD EPYC cores (2m23s in all): attention 0.992 (lr 3e-3, early stop at step 800),
sliding_window:8 0.463 (1.00-0.84 up to distance 15, 0.00 beyond).

Besides the accuracy, each record keeps the accuracy per power-of-two bucket of the query-key distance
(``acc_by_distance``): where a bounded state stops recalling.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .speed import _append, latest_records, read_jsonl  # noqa: F401 - shared with niah

RESULTS_FILE = "results_recall.jsonl"
REPORT_FILE = "report_recall.md"
SCHEMA_VERSION = 1
IGNORE_INDEX = -100
VOCAB_SIZE = 8192
POWER_A = 0.01
PROTOCOL_TASKS = ((64, 4), (128, 8), (256, 16), (512, 64))
PROTOCOL_D_MODELS = (64, 128, 256, 512)
PROTOCOL_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------
def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and platforms, unlike ``hash``)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def check_task(seq_len: int, num_kv_pairs: int, vocab_size: int = VOCAB_SIZE) -> None:
    for name, n in (("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"MQAR {name} must be a positive integer, got {n!r}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"MQAR seq_len={seq_len} is too short for {num_kv_pairs} kv pairs: the prefix takes "
                         f"2*K={2 * num_kv_pairs} tokens and the K queries 2 tokens each (need seq_len >= 4*K)")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(f"MQAR vocab_size={vocab_size} has only {vocab_size // 2 - 1} keys in [1, V/2) for "
                         f"{num_kv_pairs} distinct keys")


def query_slot_probs(num_slots: int, power_a: float = POWER_A) -> torch.Tensor:
    """P(slot g) proportional to (g + 1) ** (a - 1), g = 0 .. num_slots - 1 (float64, sums to 1)."""
    x = torch.arange(1, num_slots + 1, dtype=torch.float64)
    p = power_a * x ** (power_a - 1)
    return p / p.sum()


def _distinct(n: int, k: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) rows of k distinct integers from [0, pool), uniformly (top-k of uniform noise)."""
    return torch.rand(n, pool, generator=gen).topk(k, dim=1).indices


def mqar(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int = VOCAB_SIZE,
         power_a: float = POWER_A, seed: int = 0, chunk: int = 4096):
    """``num_examples`` MQAR examples: ``(inputs, targets)``, both int64 of shape (num_examples, seq_len).

    Deterministic in its arguments (generated on the CPU in chunks of ``chunk`` rows). The layout is in
    the module docstring; ``targets`` is ``-100`` except at the ``num_kv_pairs`` query positions.
    """
    check_task(seq_len, num_kv_pairs, vocab_size)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a!r}")
    K, L = num_kv_pairs, seq_len
    half = vocab_size // 2
    slots = (L - 2 * K) // 2
    probs = query_slot_probs(slots, power_a).float()
    gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    xs, ys = [], []
    for start in range(0, num_examples, chunk):
        n = min(chunk, num_examples - start)
        keys = _distinct(n, K, half - 1, gen) + 1                 # [1, V/2)
        values = _distinct(n, K, vocab_size - half, gen) + half   # [V/2, V)
        gaps = torch.multinomial(probs.expand(n, slots), K, replacement=False, generator=gen)  # slot indices
        order = torch.rand(n, K, generator=gen).argsort(dim=1)    # which key is asked in which slot
        x = torch.zeros(n, L, dtype=torch.int64)
        x[:, 0:2 * K:2] = keys
        x[:, 1:2 * K:2] = values
        qpos = 2 * K + 2 * gaps
        qkeys, qvals = keys.gather(1, order), values.gather(1, order)
        x.scatter_(1, qpos, qkeys)
        x.scatter_(1, qpos + 1, qvals)
        y = torch.full((n, L), IGNORE_INDEX, dtype=torch.int64)
        y.scatter_(1, qpos, qvals)
        xs.append(x)
        ys.append(y)
    if not xs:
        return torch.zeros(0, L, dtype=torch.int64), torch.zeros(0, L, dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys)


def mqar_data(split: str, num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int = VOCAB_SIZE,
              power_a: float = POWER_A, seed: int = 0):
    """The ``split`` ("train" or "test") set of a task: its own seed stream per (seed, split, L, K, V, a)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    s = derive_seed("mqar", seed, split, seq_len, num_kv_pairs, vocab_size, power_a)
    return mqar(num_examples, seq_len, num_kv_pairs, vocab_size, power_a, seed=s)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """How one model is trained. ``steps`` optimizer steps of ``batch_size`` examples, cycling through
    the training set in a fresh seeded order every epoch."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    batch_size: int = 64
    steps: int = 1000
    warmup_frac: float = 0.1          # linear warm-up over this share of the steps
    min_lr_frac: float = 0.0          # the cosine ends at lr * min_lr_frac
    grad_clip: Optional[float] = 1.0
    eval_every: int = 250
    eval_batch_size: int = 512
    early_stop_acc: Optional[float] = 0.99   # stop once the test accuracy reaches this (None: never)
    seed: int = 0                      # model init and batch order


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr_frac * lr."""
    warm = max(1, int(round(cfg.warmup_frac * cfg.steps))) if cfg.warmup_frac > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, cfg.steps - warm)
    t = min(1.0, (step - warm) / span)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: weight decay on parameters with 2+ dimensions (matrices, embeddings), none on the rest."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    kw = {}
    if next(model.parameters()).device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)


def query_distances(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For every answer position (row-major, as ``targets != -100`` selects them): its distance to the
    key's occurrence in the prefix (the last earlier position holding the same token)."""
    b, L = inputs.shape
    rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    same = inputs[rows] == inputs[rows, pos][:, None]                       # (n, L)
    earlier = torch.arange(L, device=inputs.device)[None, :] < pos[:, None]
    j = torch.where(same & earlier, torch.arange(L, device=inputs.device)[None, :], -1).amax(1)
    return torch.where(j >= 0, pos - j, torch.zeros_like(pos))


def distance_buckets(max_len: int) -> list:
    """[lo, hi) bucket edges in powers of two from 1 up to max_len: [1, 2), [2, 4), [4, 8), ..."""
    edges, lo = [], 1
    while lo < max_len:
        edges.append((lo, lo * 2))
        lo *= 2
    return edges


@torch.no_grad()
def evaluate(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 512, device=None,
             by_distance: bool = False) -> dict:
    """Accuracy (argmax) and mean loss over the answer tokens (targets != -100) of a whole set; with
    ``by_distance`` also ``acc_by_distance``: ``[lo, hi, answers, accuracy]`` per power-of-two bucket of the
    query-key distance (needs a model with ``hidden`` and ``lm_head``, as `TinyLM`)."""
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    correct, count, loss_sum = 0, 0, 0.0
    dist_hits, dist_all = [], []
    try:
        for s in range(0, inputs.shape[0], batch_size):
            x = inputs[s:s + batch_size].to(device, non_blocking=True)
            y = targets[s:s + batch_size].to(device, non_blocking=True)
            if by_distance:
                sel = y != IGNORE_INDEX
                logits = model.lm_head(model.hidden(x)[sel]).float()
                tgt = y[sel]
                hit = logits.argmax(-1) == tgt
                n = int(tgt.numel())
                loss = torch.nn.functional.cross_entropy(logits, tgt) if n else torch.zeros(())
                c = hit.sum()
                dist_hits.append(hit.cpu())
                dist_all.append(query_distances(x, y).cpu())
            else:
                loss, c, n = model.loss(x, y)
            correct += int(c)
            count += n
            loss_sum += float(loss) * n
    finally:
        model.train(was_training)
    out = dict(acc=correct / count if count else float("nan"), loss=loss_sum / count if count else float("nan"),
               count=count)
    if by_distance:
        hits, dist = torch.cat(dist_hits), torch.cat(dist_all)
        rows = []
        for lo, hi in distance_buckets(inputs.shape[1]):
            m = (dist >= lo) & (dist < hi)
            n = int(m.sum())
            if n:
                rows.append([lo, hi, n, round(float(hits[m].float().mean()), 5)])
        out["acc_by_distance"] = rows
    return out


def train(model, train_set, test_set, cfg: TrainConfig, device=None,
          on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train ``model`` on ``train_set = (inputs, targets)``; evaluate on ``test_set`` every ``eval_every``
    steps and at the end. Returns acc (last evaluation), best_acc, loss, steps, epochs, wall_s, history
    ([step, test acc, train loss]), early_stopped, diverged. ``on_step(step, info)`` is called every step."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x_train, y_train = train_set
    x_test, y_test = test_set
    n_train = x_train.shape[0]
    if n_train == 0:
        raise ValueError("the training set is empty")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise ValueError(f"steps, batch_size and eval_every must be >= 1, got {cfg.steps}, {cfg.batch_size}, "
                         f"{cfg.eval_every}")
    x_train, y_train = x_train.to(device), y_train.to(device)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(derive_seed("batches", cfg.seed))
    perm, pos, epochs_started = None, n_train, 0
    t0 = time.perf_counter()
    history, best, last_eval, last_loss = [], 0.0, None, float("nan")
    early, diverged, step = False, False, 0
    bs = min(cfg.batch_size, n_train)

    def do_eval(s):
        nonlocal best, last_eval
        last_eval = evaluate(model, x_test, y_test, cfg.eval_batch_size, device)
        best = max(best, last_eval["acc"])
        history.append([s, round(last_eval["acc"], 5), None if math.isnan(last_loss) else round(last_loss, 5)])
        return last_eval["acc"]

    for step in range(1, cfg.steps + 1):
        if pos + bs > n_train:
            perm = torch.randperm(n_train, generator=gen).to(device)
            pos, epochs_started = 0, epochs_started + 1
        idx = perm[pos:pos + bs]
        pos += bs
        lr = lr_at(step - 1, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, _, _ = model.loss(x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 10 == 0 or step == cfg.steps or step % cfg.eval_every == 0:
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                diverged = True
        info = dict(lr=lr, loss=last_loss, acc=last_eval["acc"] if last_eval else None)
        if diverged:
            if on_step:
                on_step(step, info)
            break
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = do_eval(step)
            info["acc"] = acc
            if cfg.early_stop_acc is not None and acc >= cfg.early_stop_acc:
                early = True
                if on_step:
                    on_step(step, info)
                break
        if on_step:
            on_step(step, info)
    if last_eval is None or history[-1][0] != step:
        do_eval(step)
    wall = time.perf_counter() - t0
    by_distance = None
    if hasattr(model, "hidden") and hasattr(model, "lm_head"):
        by_distance = evaluate(model, x_test, y_test, cfg.eval_batch_size, device, by_distance=True)["acc_by_distance"]
    return dict(acc=last_eval["acc"], best_acc=best, test_loss=last_eval["loss"], train_loss=last_loss,
                steps=step, epochs=round(step * bs / n_train, 3), examples_seen=step * bs, wall_s=wall,
                history=history, early_stopped=early, diverged=diverged, answers_tested=last_eval["count"],
                acc_by_distance=by_distance)


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """A recall grid: every (mixer, (L, K), d_model, lr) is a cell; the rest is shared by all cells."""
    name: str
    mixers: tuple
    tasks: tuple                      # ((L, K), ...)
    d_models: tuple
    lrs: tuple
    vocab_size: int = VOCAB_SIZE
    power_a: float = POWER_A
    n_layers: int = 2
    n_heads: Optional[int] = None     # None: TinyLM's default max(1, d_model // 64)
    mlp: bool = False
    n_train: int = 100_000
    n_test: int = 3_000
    batch_size: Union[int, tuple] = 128   # an int, or ((L, batch), ...) per sequence length (else the largest L <=)
    steps: int = 20_000
    eval_every: int = 500
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    early_stop_acc: Optional[float] = 0.99
    seed: int = 0
    speed_len: int = 0                # > 0: also time each trained model's fwd+bwd on 1 x speed_len tokens

    def batch_for(self, seq_len: int) -> int:
        if isinstance(self.batch_size, int):
            return self.batch_size
        table = sorted((int(L), int(b)) for L, b in self.batch_size)
        fits = [b for L, b in table if L <= seq_len]
        return fits[-1] if fits else table[0][1]


# Zoology's batch sizes per length (100K examples, 3K test): 256 up to L=128, 128 at 256, 64 at 512.
FULL_BATCH = ((64, 256), (128, 256), (256, 128), (512, 64))


def cpu_grid() -> Grid:
    """A few minutes on 2 CPU cores: (L, K) = (64, 4), d_model 64, attention vs a window of 8 keys.

    Reduced from the protocol where a laptop needs it: V = 2048 (with V = 8192 and a budget of ~1000
    steps, dense attention sat on a ~0.4 plateau for 2 of 3 seeds, while with V = 2048 it passed 0.99 in
    400-500 steps on the same seeds), 20K training / 1K test examples, batch 128, at most 1000 steps, and the
    learning rates 1e-3 and 3e-3."""
    return Grid(name="cpu", mixers=("attention", "sliding_window:8"), tasks=((64, 4),), d_models=(64,),
                lrs=(1e-3, 3e-3), vocab_size=2048, n_train=20_000, n_test=1_000, batch_size=128, steps=1_000,
                eval_every=100, speed_len=1024)


def full_grid() -> Grid:
    """The protocol's grid (for a GPU): 4 tasks x 4 widths x 4 learning rates per mixer, V = 8192, 100K
    training / 3K test examples, Zoology's batch sizes, up to 20K steps (early stop at 0.99)."""
    return Grid(name="full", mixers=("attention", "sliding_window:32"), tasks=PROTOCOL_TASKS,
                d_models=PROTOCOL_D_MODELS, lrs=PROTOCOL_LRS, batch_size=FULL_BATCH, speed_len=16384)


def get_grid(name: str) -> Grid:
    grids = {"cpu": cpu_grid, "full": full_grid}
    if name not in grids:
        raise ValueError(f"unknown recall grid {name!r}; choose from {', '.join(grids)}")
    return grids[name]()


@dataclass(frozen=True)
class Cell:
    mixer: str
    seq_len: int
    num_kv_pairs: int
    d_model: int
    lr: float

    def label(self) -> str:
        return f"{self.mixer} L={self.seq_len} kv={self.num_kv_pairs} d={self.d_model} lr={self.lr:g}"


def plan_cells(grid: Grid) -> list:
    """Every cell of ``grid``, mixers outermost (so one mixer's results come in together)."""
    from ..layers import build_mixer, layers_label, parse_layers
    cells = []
    for m in grid.mixers:
        specs = parse_layers(m, grid.n_layers)
        label = layers_label(specs)  # the canonical name
        for s in dict.fromkeys(specs):  # bad arguments fail now, not after hours of other cells
            d = min(grid.d_models)
            build_mixer(s, d, grid.n_heads or max(1, d // 64))
        for (L, K) in grid.tasks:
            check_task(L, K, grid.vocab_size)
            for d in grid.d_models:
                for lr in grid.lrs:
                    cells.append(Cell(label, int(L), int(K), int(d), float(lr)))
    return cells


def _cell_params(grid: Grid, cell: Cell) -> dict:
    """Everything that determines a cell's result (its key)."""
    return dict(mixer=cell.mixer, seq_len=cell.seq_len, num_kv_pairs=cell.num_kv_pairs, d_model=cell.d_model,
                lr=cell.lr, vocab_size=grid.vocab_size, power_a=grid.power_a, n_layers=grid.n_layers,
                n_heads=grid.n_heads, mlp=grid.mlp, n_train=grid.n_train, n_test=grid.n_test,
                batch_size=grid.batch_for(cell.seq_len), steps_planned=grid.steps, eval_every=grid.eval_every,
                warmup_frac=grid.warmup_frac, weight_decay=grid.weight_decay, early_stop_acc=grid.early_stop_acc,
                seed=grid.seed)


def cell_key(grid: Grid, cell: Cell) -> str:
    return hashlib.sha1(json.dumps(_cell_params(grid, cell), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device) -> dict:
    import attnzoo
    device = torch.device(device)
    return dict(device=device.type, device_name=_device_name(device), torch_version=torch.__version__,
                attnzoo_version=getattr(attnzoo, "__version__", None), python_version=platform.python_version(),
                cpu_threads=torch.get_num_threads())


def load_recall_records(path) -> list:
    """Every record of a results_recall.jsonl (a directory means the file in it); bad lines are skipped."""
    return read_jsonl(path, RESULTS_FILE, warn=False)


def group_key(r: dict) -> tuple:
    """The cells that compete for the best learning rate: all parameters but lr."""
    p = {k: v for k, v in r.items() if k in _GROUP_FIELDS}
    return tuple(sorted((k, json.dumps(v)) for k, v in p.items()))


_GROUP_FIELDS = ("mixer", "seq_len", "num_kv_pairs", "d_model", "vocab_size", "power_a", "n_layers", "n_heads", "mlp",
                 "n_train", "n_test", "batch_size", "steps_planned", "eval_every", "warmup_frac", "weight_decay",
                 "early_stop_acc", "seed", "device_name")


def mark_best(records: Iterable[dict]) -> list:
    """Latest records with ``best_lr`` set: True on the ok cell of highest accuracy of each group (ties:
    the earlier stop, then the smaller lr), False on the others."""
    recs = [dict(r) for r in latest_records(records)]
    groups = defaultdict(list)
    for r in recs:
        r["best_lr"] = False
        if r.get("status") == "ok" and r.get("acc") is not None:
            groups[group_key(r)].append(r)
    for rs in groups.values():
        max(rs, key=lambda r: (r["acc"], -r.get("steps", 0), -r["lr"]))["best_lr"] = True
    return recs


def _write_records(path: Path, records: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Running one cell and the grid
# --------------------------------------------------------------------------------------------------
def build_model(grid: Grid, cell: Cell):
    from ..layers import TinyLM
    torch.manual_seed(derive_seed("init", grid.seed, cell.mixer, cell.d_model))
    return TinyLM(grid.vocab_size, cell.d_model, grid.n_layers, cell.mixer, n_heads=grid.n_heads, mlp=grid.mlp)


def run_cell(grid: Grid, cell: Cell, device, env: dict, data: dict, on_step=None) -> dict:
    """Train and test one cell; returns its record (failures are records with status 'error' or 'oom')."""
    device = torch.device(device)
    rec = dict(schema=SCHEMA_VERSION, key=cell_key(grid, cell), grid=grid.name, **_cell_params(grid, cell), **env,
               timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    t0 = time.perf_counter()
    try:
        model = build_model(grid, cell).to(device)
        rec.update(n_heads_used=model.n_heads, params=model.num_params(),
                   state_floats=model.state_size(cell.seq_len),
                   state_floats_per_layer=model.state_sizes(cell.seq_len))
        rec["state_bytes_fp32"] = 4 * rec["state_floats"]
        train_set, test_set = data["train"], data["test"]
        cfg = TrainConfig(lr=cell.lr, weight_decay=grid.weight_decay, batch_size=grid.batch_for(cell.seq_len),
                          steps=grid.steps,
                          warmup_frac=grid.warmup_frac, eval_every=grid.eval_every,
                          early_stop_acc=grid.early_stop_acc, seed=grid.seed)
        res = train(model, train_set, test_set, cfg, device, on_step=on_step)
        rec.update(status="ok", message="", **res)
        if grid.speed_len > 0:
            rec.update(measure_speed(model, grid.speed_len, grid.vocab_size, device))
    except Exception as exc:  # noqa: BLE001 - recorded, the grid goes on
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        rec.update(status="oom" if oom else "error", message=f"{type(exc).__name__}: {exc}"[:2000], acc=None)
        rec.setdefault("wall_s", time.perf_counter() - t0)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec["wall_s"] = rec.get("wall_s", time.perf_counter() - t0)
    return rec


def measure_speed(model, seq_len: int, vocab_size: int, device) -> dict:
    """The speed axis of the speed-vs-recall plot: median time of one forward+backward of ``model``'s layer
    stack (the trained TinyLM without its LM head, whose vocabulary-sized logits would swamp the mixers;
    each mixer on its default backend) on one sequence of ``seq_len`` random tokens, with the protocol's
    timer. A failure (e.g. out of memory at that length) is recorded, not raised."""
    from .timing import time_fn

    gen = torch.Generator().manual_seed(derive_seed("speed", seq_len))
    x = torch.randint(0, vocab_size, (1, seq_len), generator=gen).to(device)
    was = model.training
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model.hidden(x).float().square().mean().backward()
    try:
        r = time_fn(step, device=device, warmup=1, reps=5, max_time_s=5.0)
        out = dict(speed_len=seq_len, speed_ms=r["median_ms"], speed_status=r["status"],
                   speed_peak_mem_bytes=r.get("peak_mem_bytes"))
        if r["status"] != "ok":
            out["speed_message"] = str(r.get("message") or "")[:300]
    except Exception as exc:  # noqa: BLE001 - the cell's accuracy stands without its speed
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        out = dict(speed_len=seq_len, speed_ms=None, speed_status="oom" if oom else "error",
                   speed_message=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return out


def _prepare_cuda() -> dict:
    """TF32 matmuls (training-grade precision, much faster), and room for one compiled FlexAttention graph
    per (shape, pattern) of the grid instead of a silent eager fallback after dynamo's default 8."""
    torch.set_float32_matmul_precision("high")
    notes = {"float32_matmul_precision": "high"}
    try:
        import torch._dynamo.config as dc
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(int(getattr(dc, name)), 1024))
        notes["dynamo_recompile_limit"] = 1024
    except Exception:  # noqa: BLE001
        pass
    return notes


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Progress:
    """Bars over the cells and the steps of the current cell (see `progress.Bars`)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        from .progress import Bars
        self.bars = Bars(enabled and total > 0, stream)
        self._cells = self.bars.task("recall", total)
        self._steps = self.bars.task("  steps", 1, visible=False)

    def start(self, cell: Cell, steps: int):
        self.bars.update(self._cells, description=cell.label())
        self.bars.update(self._steps, total=steps, visible=True, description="")

    def step(self, step: int, info: dict):
        if step % 10 == 0 or info.get("acc") is not None:
            from .progress import training_description
            self.bars.update(self._steps, completed=step, description=training_description(info))

    def done(self, rec: dict, resumed: bool = False):
        self.bars.item_done(self._cells, record_line(rec, resumed))

    def close(self):
        self.bars.close()


def record_line(rec: dict, resumed: bool = False) -> str:
    head = (f"{rec['mixer']} L={rec['seq_len']} kv={rec['num_kv_pairs']} d={rec['d_model']} "
            f"lr={rec['lr']:g}")
    if resumed:
        return f"resumed, already recorded: {head}: acc {rec['acc']:.3f}"
    if rec.get("status") != "ok":
        return f"{head}: {rec.get('status')} ({(rec.get('message') or '').splitlines()[0][:160]})"
    flags = (" early stop" if rec.get("early_stopped") else "") + (" diverged" if rec.get("diverged") else "")
    return (f"{head}: acc {rec['acc']:.3f} after {rec['steps']} steps ({rec['epochs']:g} epochs), "
            f"{rec['wall_s']:.1f} s{flags}")


def run_grid(grid: Grid, out_dir, *, device=None, progress: bool = True, stream=None) -> list:
    """Run every cell of ``grid`` not yet recorded ok in ``out_dir/results_recall.jsonl``; append one record per
    cell; at the end rewrite the file with ``best_lr`` flags. Returns the flagged latest records of the grid."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    device = torch.device(device) if device is not None else default_device()
    env = environment(device)
    if device.type == "cuda":
        env.update(_prepare_cuda())
    cells = plan_cells(grid)
    existing = load_recall_records(path)
    done = {r["key"]: r for r in existing if r.get("status") == "ok" and "key" in r}
    prog = _Progress(len(cells), enabled=progress, stream=stream)
    data_cache: dict = {}
    keys = []
    try:
        for cell in cells:
            key = cell_key(grid, cell)
            keys.append(key)
            if key in done:
                prog.done(done[key], resumed=True)
                continue
            task = (cell.seq_len, cell.num_kv_pairs)
            if task not in data_cache:
                data_cache.clear()  # one task's data at a time (cells are ordered by task within a mixer)
                data_cache[task] = dict(
                    train=mqar_data("train", grid.n_train, *task, grid.vocab_size, grid.power_a, grid.seed),
                    test=mqar_data("test", grid.n_test, *task, grid.vocab_size, grid.power_a, grid.seed))
            prog.start(cell, grid.steps)
            rec = run_cell(grid, cell, device, env, data_cache[task], on_step=prog.step)
            _append(path, rec)
            existing.append(rec)
            prog.done(rec)
    finally:
        prog.close()
        flagged = mark_best(existing)
        if flagged:
            _write_records(path, flagged)
    by_key = {r["key"]: r for r in flagged}
    return [by_key[k] for k in dict.fromkeys(keys) if k in by_key]


# --------------------------------------------------------------------------------------------------
# Summary and report
# --------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("mixer", "L", "kv", "d_model", "best lr", "acc", "state floats", "steps", "wall s", "status")


def _fmt_int(n) -> str:
    """8192 -> '8K', 3 * 2**20 -> '3M', 1000 -> '1000'."""
    if n is None:
        return "-"
    n = int(n)
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _lrs(rs) -> list:
    return [f"{x:g}" for x in sorted({r["lr"] for r in rs})]


def best_per_group(records: Iterable[dict]) -> list:
    """The best-lr record of every (mixer, L, kv, d_model, ...) group; a group with no ok cell gives its
    latest record. Sorted by mixer (order of appearance), L, kv, d_model."""
    out = {}
    for r in mark_best(records):
        g = group_key(r)
        if g not in out or r["best_lr"] or (not out[g]["best_lr"] and out[g].get("status") != "ok"):
            out[g] = r
    mixers = list(dict.fromkeys(r.get("mixer") for r in out.values()))
    return sorted(out.values(), key=lambda r: (mixers.index(r.get("mixer")), r.get("seq_len", 0),
                                                r.get("num_kv_pairs", 0), r.get("d_model", 0)))


def summary_rows(records: Iterable[dict]) -> list:
    rows = []
    for r in best_per_group(records):
        ok = r.get("status") == "ok"
        rows.append([r["mixer"], str(r["seq_len"]), str(r["num_kv_pairs"]), str(r["d_model"]),
                     f"{r['lr']:g}" if ok else "-", f"{r['acc']:.3f}" if ok else "-",
                     _fmt_int(r.get("state_floats")), str(r.get("steps", "-")),
                     f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-", r.get("status", "?")])
    return rows


def _md_table(headers, rows) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _slug(s: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9]+", "_", str(s)).strip("_").lower() or "x"


def _figure(w=7.5, h=5.0, ncols=1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=120)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_acc_vs_dmodel(best: Sequence[dict], path: Path) -> bool:
    """One panel per (L, kv): test accuracy (best lr) vs d_model, one line per mixer."""
    ok = [r for r in best if r.get("status") == "ok"]
    if not ok:
        return False
    tasks = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in ok})
    mixers = list(dict.fromkeys(r["mixer"] for r in ok))
    fig, axes = _figure(w=max(5.0, 3.6 * len(tasks)), h=4.2, ncols=len(tasks))
    markers = "osD^v<>ph*"
    for ax, (L, K) in zip(axes, tasks):
        for i, m in enumerate(mixers):
            rs = sorted((r for r in ok if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (L, K)),
                        key=lambda r: r["d_model"])
            if rs:
                ax.plot([r["d_model"] for r in rs], [r["acc"] for r in rs], marker=markers[i % len(markers)],
                        label=m, linewidth=1.8)
        ds = sorted({r["d_model"] for r in ok})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"L={L}, {K} kv pairs", fontsize=10)
        ax.set_xlabel("d_model")
        ax.grid(True, alpha=0.35)
    axes[0].set_ylabel("MQAR test accuracy (best lr)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_acc_vs_state(best: Sequence[dict], path: Path) -> bool:
    """Test accuracy vs recurrent-state floats (log x): a colour per mixer, a marker per (L, kv) task, the
    widths of one mixer and task joined by a line (a larger d_model is a larger state)."""
    from matplotlib.lines import Line2D
    ok = [r for r in best if r.get("status") == "ok" and r.get("state_floats")]
    if not ok:
        return False
    fig, (ax,) = _figure()
    mixers = list(dict.fromkeys(r["mixer"] for r in ok))
    tasks = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in ok})
    markers = "osD^v<>ph*"
    colors = [f"C{i % 10}" for i in range(len(mixers))]
    for i, m in enumerate(mixers):
        for j, t in enumerate(tasks):
            rs = sorted((r for r in ok if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == t),
                        key=lambda r: r["state_floats"])
            if rs:
                ax.plot([r["state_floats"] for r in rs], [r["acc"] for r in rs], color=colors[i],
                        marker=markers[j % len(markers)], markersize=6, linewidth=1.0, alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recurrent state per sequence (floats, all layers, log2 scale)")
    ax.set_ylabel("MQAR test accuracy (best lr)")
    ax.set_title("MQAR accuracy vs state size", fontsize=10)
    ax.grid(True, alpha=0.35)
    handles = [Line2D([], [], color=colors[i], linewidth=2, label=m) for i, m in enumerate(mixers)]
    handles += [Line2D([], [], color="0.3", linestyle="", marker=markers[j % len(markers)],
                       label=f"L={L}, kv={K}") for j, (L, K) in enumerate(tasks)]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return True


def _speed_points(best: Sequence[dict]) -> list:
    return [r for r in best if r.get("status") == "ok" and r.get("speed_ms") and r.get("acc") is not None]


def pareto_front(points: Sequence[tuple]) -> list:
    """Indices of the (time, accuracy) points no other point beats on both (not slower and not less
    accurate, better in one), sorted by time."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_acc = [], float("-inf")
    for i in order:
        if points[i][1] > best_acc:
            front.append(i)
            best_acc = points[i][1]
    return front


def plot_speed_vs_recall(best: Sequence[dict], path: Path) -> bool:
    """One panel per (L, kv) task: MQAR accuracy (best lr) against the forward+backward time of the same
    trained model at ``speed_len`` tokens (log x); a colour per mixer, a marker per d_model, the Pareto
    front (faster and more accurate than every other point) as a dashed step line."""
    from matplotlib.lines import Line2D
    ok = _speed_points(best)
    if not ok:
        return False
    tasks = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in ok})
    mixers = list(dict.fromkeys(r["mixer"] for r in ok))
    ds = sorted({r["d_model"] for r in ok})
    markers = "osD^v<>ph*"
    fig, axes = _figure(w=max(5.5, 4.2 * len(tasks)), h=4.4, ncols=len(tasks))
    for ax, (L, K) in zip(axes, tasks):
        rs = [r for r in ok if (r["seq_len"], r["num_kv_pairs"]) == (L, K)]
        for r in rs:
            ax.plot([r["speed_ms"]], [r["acc"]], linestyle="", color=f"C{mixers.index(r['mixer']) % 10}",
                    marker=markers[ds.index(r["d_model"]) % len(markers)], markersize=7, alpha=0.9)
        front = [rs[i] for i in pareto_front([(r["speed_ms"], r["acc"]) for r in rs])]
        if len(front) > 1:
            ax.step([r["speed_ms"] for r in front], [r["acc"] for r in front], where="post", color="0.35",
                    linestyle="--", linewidth=1.0)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        lens = sorted({r["speed_len"] for r in rs})
        ax.set_xlabel(f"fwd+bwd of the trained model, ms at {'/'.join(_fmt_int(n) for n in lens)} tokens (log)")
        ax.set_title(f"MQAR L={L}, {K} kv pairs", fontsize=10)
        ax.grid(True, alpha=0.35, which="both")
    axes[0].set_ylabel("MQAR test accuracy (best lr)")
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=0, marker="o", label=m) for i, m in enumerate(mixers)]
    handles += [Line2D([], [], color="0.3", linestyle="", marker=markers[j % len(markers)], label=f"d_model {d}")
                for j, d in enumerate(ds)]
    handles.append(Line2D([], [], color="0.35", linestyle="--", label="Pareto front"))
    axes[-1].legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return True


def report_markdown(records: Sequence[dict], plot_files: Sequence[str] = (), plot_note: str = "") -> str:
    """The MQAR section: settings, accuracy per (mixer, L, d_model), per state size, all cells, failures."""
    flagged = mark_best(records)
    best = best_per_group(records)
    ok = [r for r in flagged if r.get("status") == "ok"]
    lines = ["## MQAR (multi-query associative recall)", ""]
    if not flagged:
        return "\n".join(lines + ["No recall results yet.", ""])
    devices = sorted({r.get("device_name", "?") for r in flagged})
    vocab = sorted({r.get("vocab_size") for r in flagged})
    lines += [f"Test accuracy over the answer tokens, best of the learning rates tried per (mixer, L, kv, d_model). "
              f"Device: {', '.join(devices)}. Vocabulary: {', '.join(str(v) for v in vocab)}; "
              f"{', '.join(sorted({str(r.get('n_layers')) for r in flagged}))} layers, "
              f"MLP {'on' if any(r.get('mlp') for r in flagged) else 'off'}; AdamW, weight decay "
              f"{', '.join(sorted({str(r.get('weight_decay')) for r in flagged}))}, warm-up + cosine; "
              f"early stop at {', '.join(sorted({str(r.get('early_stop_acc')) for r in flagged}))}.", ""]
    grids = sorted({r.get("grid", "?") for r in flagged})
    for g in grids:
        rs = [r for r in flagged if r.get("grid") == g]
        batches = "/".join(str(b) for b in sorted({r.get("batch_size") for r in rs if r.get("batch_size")}))
        lines.append(f"- grid `{g}`: {len(rs)} cells; {rs[0].get('n_train')} training / {rs[0].get('n_test')} test "
                     f"examples, batch {batches}, up to {rs[0].get('steps_planned')} steps, lr {', '.join(_lrs(rs))}")
    lines.append("")

    # accuracy per (mixer, L, kv) x d_model
    d_models = sorted({r["d_model"] for r in best})
    rows = []
    for (m, L, K) in dict.fromkeys((r["mixer"], r["seq_len"], r["num_kv_pairs"]) for r in best):
        cells = []
        for d in d_models:
            rs = [r for r in best if (r["mixer"], r["seq_len"], r["num_kv_pairs"], r["d_model"]) == (m, L, K, d)]
            if not rs:
                cells.append("")
            elif rs[0].get("status") == "ok":
                cells.append(f"{rs[0]['acc']:.3f} (lr {rs[0]['lr']:g})")
            else:
                cells.append(rs[0].get("status", "?"))
        rows.append([f"`{m}`", str(L), str(K)] + cells)
    lines += ["### Accuracy per (mixer, L, d_model)", "",
              _md_table(["mixer", "L", "kv pairs"] + [f"d_model={d}" for d in d_models], rows), ""]

    # per state size
    srows = [[f"`{r['mixer']}`", str(r["seq_len"]), str(r["num_kv_pairs"]), str(r["d_model"]),
              _fmt_int(r.get("state_floats")), "/".join(_fmt_int(x) for x in r.get("state_floats_per_layer") or []),
              f"{r['acc']:.3f}"]
             for r in sorted((r for r in best if r.get("status") == "ok"),
                             key=lambda r: (r["seq_len"], r.get("state_floats") or 0, r["mixer"]))]
    lines += ["### Accuracy per recurrent-state size", "",
              "State = floats one sequence keeps to continue generating after L tokens, summed over layers "
              "(attention: its KV cache, 2 x kv_heads x head_dim x keys kept; a window keeps at most its width; "
              "a linear mixer heads x d_k x d_v). Bytes = floats x 2 in bf16, x 4 in fp32.", "",
              _md_table(["mixer", "L", "kv pairs", "d_model", "state floats", "per layer", "acc"], srows), ""]

    # by query-key distance: where a bounded state (a window) stops recalling
    dist = [r for r in best if r.get("status") == "ok" and r.get("acc_by_distance")]
    if dist:
        buckets = sorted({(b[0], b[1]) for r in dist for b in r["acc_by_distance"]})
        drows = []
        for r in dist:
            got = {(b[0], b[1]): b for b in r["acc_by_distance"]}
            drows.append([f"`{r['mixer']}`", str(r["seq_len"]), str(r["num_kv_pairs"]), str(r["d_model"])] +
                         [f"{got[k][3]:.2f}" if k in got else "" for k in buckets])
        lines += ["### Accuracy by query-key distance (best lr)", "",
                  "Distance = query position - position of its key in the prefix, in power-of-two buckets "
                  "(the power law puts most queries close to the prefix).", "",
                  _md_table(["mixer", "L", "kv", "d_model"] + [f"{lo}-{hi - 1}" for lo, hi in buckets], drows), ""]

    # speed against recall
    sp = _speed_points(best)
    if sp:
        on_front = set()
        for task in dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in sp):
            rs = [r for r in sp if (r["seq_len"], r["num_kv_pairs"]) == task]
            on_front |= {id(rs[i]) for i in pareto_front([(r["speed_ms"], r["acc"]) for r in rs])}
        prow = [[f"`{r['mixer']}`", str(r["seq_len"]), str(r["num_kv_pairs"]), str(r["d_model"]), f"{r['acc']:.3f}",
                 f"{r['speed_ms']:.3g}", _fmt_int(r["speed_len"]), "yes" if id(r) in on_front else ""]
                for r in sorted(sp, key=lambda r: (r["seq_len"], r["num_kv_pairs"], r["speed_ms"]))]
        lines += ["### Speed against recall", "",
                  "Speed = one forward+backward of the trained model's layers (no LM head) on one sequence of "
                  "the given length, median of the protocol's timer, on the device of the run; the Pareto front "
                  "holds the cells no other cell of the same task beats in both speed and accuracy.", "",
                  _md_table(["mixer", "L", "kv", "d_model", "acc", "fwd+bwd ms", "at tokens", "Pareto front"],
                            prow), ""]

    for f in plot_files:
        lines += [f"![{f}]({f})", ""]
    if plot_note:
        lines += [plot_note, ""]

    # every cell
    crow = [[f"`{r['mixer']}`", str(r["seq_len"]), str(r["num_kv_pairs"]), str(r["d_model"]), f"{r['lr']:g}",
             f"{r['acc']:.3f}", f"{r.get('best_acc', r['acc']):.3f}", str(r.get("steps")),
             "yes" if r.get("early_stopped") else ("diverged" if r.get("diverged") else ""),
             f"{r.get('wall_s', 0):.1f}", "**best**" if r.get("best_lr") else ""]
            for r in sorted(ok, key=lambda r: (r["mixer"], r["seq_len"], r["d_model"], r["lr"]))]
    lines += ["### Every cell", "",
              _md_table(["mixer", "L", "kv", "d_model", "lr", "acc", "best acc seen", "steps", "early stop", "wall s",
                         ""], crow), ""]
    bad = [r for r in flagged if r.get("status") != "ok"]
    if bad:
        lines += ["### Not measured", ""]
        lines += [f"- `{r['mixer']}` L={r['seq_len']} kv={r['num_kv_pairs']} d={r['d_model']} lr={r['lr']:g}: "
                  f"{r.get('status')}: {(r.get('message') or '').splitlines()[0][:200]}" for r in bad]
        lines.append("")
    return "\n".join(lines)


def write_recall_report(results, out_dir, plots: bool = True) -> Path:
    """Write ``report_recall.md`` (and ``recall_acc_vs_dmodel.png``, ``recall_acc_vs_state.png`` when
    matplotlib is installed) into ``out_dir`` from ``results`` (a results_recall.jsonl, its folder, or records)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = results if isinstance(results, list) else load_recall_records(results)
    best = best_per_group(records)
    files, note = [], ""
    if plots and best:
        try:
            import matplotlib  # noqa: F401
        except Exception as e:  # noqa: BLE001
            note = f"Plots skipped: matplotlib is not importable ({type(e).__name__}: {e})."
        else:
            for name, fn in (("recall_acc_vs_dmodel.png", plot_acc_vs_dmodel),
                             ("recall_acc_vs_state.png", plot_acc_vs_state),
                             ("recall_speed_vs_acc.png", plot_speed_vs_recall)):
                if fn(best, out_dir / name):
                    files.append(name)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    text = f"# attnzoo recall report\n\nWritten {stamp} from `{RESULTS_FILE}`.\n\n" + \
        report_markdown(records, files, note)
    path = out_dir / REPORT_FILE
    path.write_text(text)
    return path
