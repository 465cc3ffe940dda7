"""SeerAttention's learnable block gate, its router, the distillation targets and the training loop.

SeerAttention (Gao et al. 2024, "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
arXiv:2410.13276) adds to each attention layer a small *AttnGate* that predicts, from block-pooled queries and
keys, how the layer's attention is distributed over key blocks, and trains it by self-distillation against
the layer's own attention map pooled into blocks (the model's weights stay frozen).

    gate = SeerGate(num_heads=4, head_dim=64, num_kv_heads=2, block_size=64, rope_base=10000.0)
    qk = capture_qk(model, idx)                               # {layer name: (q, k)} of every Attention layer
    history = distill_gate(gate, qk["blocks.1.mixer"], steps=300, lr=1e-3, batch_size=16)
    router = SeerRouter(gate, top_k=8)                         # or threshold=0.9
    out = attnzoo.attention(q, k, v, pattern=router)           # routed block-sparse attention

What is here, against the paper and its code (github.com/microsoft/SeerAttention):

- `SeerGate` (AttnGate). Per block of ``block_size`` tokens the queries are pooled with ``q_pooling`` and the
  keys with ``k_pooling`` (any of ``"avg"``, ``"max"``, ``"min"``; the poolings are concatenated on the feature
  axis). Defaults: q ``("avg",)``, k ``("max", "min")`` -- the paper's default gate ("Qavg_Kmaxmin"; its
  later configs add avg to k, ``k_pooling=("max", "min", "avg")``). Then one linear map per head without bias
  (per query head for q, per key/value head for k: GQA as in the code's repeat_kv), to ``hidden_size``
  features (paper: 128 = head_dim), and the scaled dot product ``qh . kh / sqrt(hidden_size)`` gives block
  scores; a softmax over the allowed key blocks (causal: ``c <= r``, the diagonal included) gives the gate's
  block distribution.
- RoPE. The paper's gate reads q and k *before* RoPE and applies RoPE to the projected features at the
  position of each block's first token (``r * block_size``), so that the gate sees block distances. A router
  here receives q and k *after* the model's RoPE (what ``attnzoo.attention`` gets). With ``rope_base`` set,
  the gate first undoes a "rotate half" RoPE of that base (the layout of `attnzoo.layers.Attention`: keys at
  positions ``0 .. Lk-1``, queries bottom-right at ``Lk-Lq .. Lk-1``, as during a cached forward) -- rotation
  is orthogonal, so this recovers the pre-RoPE q and k exactly -- then pools, projects and rotates the
  features at the block positions, as the paper does. With ``rope_base=None`` (default) q and k are pooled as
  given (right for models without RoPE; with RoPE the averages of rotated vectors blur the high
  frequencies, which the linear maps can partly learn around).
- `seer_targets`: the distillation ground truth. The paper's kernel (``attn_pooling_kernel.py``) computes
  the true softmax attention and 2-D *max*-pools it into (query block, key block) cells, then divides each
  query-block row by its sum. That is ``pooling="max"`` here (default). ``pooling="sum"``: the attention
  mass of each key block summed over the block's queries, renormalised -- the per-row share of true
  attention each key block holds (what ``evaluate``'s recall counts). Computed query-block chunk by chunk in
  float32 (float64 for float64 inputs): one (chunk x Lk) score tile at a time, never Lq x Lk.
- `distill_gate`: KL(target || gate) per query-block row, averaged over the rows, AdamW. The paper uses
  ``KLDivLoss`` on the gate's log-softmax (default reduction: a mean over every cell, i.e. this loss / nb)
  and drops the first quarter of the query blocks "for training stability" (their rows see few key
  blocks; ``skip_frac=0.25`` here, the same). Constant learning rate.
- `SeerRouter`: the block mask from the gate's scores with `select_blocks` -- top-k per query block, or the
  smallest set of blocks whose gate probability (softmax over the allowed blocks) reaches ``threshold``,
  always keeping ``sinks`` first and ``local`` diagonal blocks. (The paper's inference keeps the blocks whose
  gate probability exceeds a threshold, or a top-k ratio; cumulative mass is this library's convention.)
  The routing decision is not differentiated; the sparse attention is, to q, k, v.
- `capture_qk`: q and k (after RoPE, as the router will see them) of every attention layer of a model on
  given inputs, recorded by a temporary wrapper around each layer's ``project_qkv`` (duck-typed: any module
  with that method, e.g. `attnzoo.layers.Attention`), removed afterwards.

Not here: the paper's fused kernel that emits the pooled map during FlashAttention (the targets are a
chunked float reference), decode-time gates (SeerAttention-R), fine-tuning the model jointly with the gate.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import (Router, acc_dtype, check_bool, check_choice, check_fraction, check_int, check_qk, group_scores,
                   num_blocks, pool, select_blocks)

_POOLS = ("avg", "max", "min")
# Elements of one score tile of `seer_targets` (B * Hq * chunk queries * Lk): 2^22 floats = 16 MiB in float32.
_TILE = 1 << 22


# -- RoPE ("rotate half", as attnzoo.layers.RotaryEmbedding) ---------------------------------------------
def _rope(x: torch.Tensor, positions: torch.Tensor, base: float, inverse: bool = False) -> torch.Tensor:
    """Rotate x (..., T, D) by the RoPE angles of ``positions`` (T,), or back with ``inverse``."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(device=x.device, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if inverse:
        sin = -sin
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _check_pooling(name: str, value) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"SeerGate {name} must be a non-empty tuple of 'avg', 'max', 'min', got {value!r}")
    for v in value:
        check_choice(f"SeerGate {name}", v, _POOLS)
    if len(set(value)) != len(value):
        raise ValueError(f"SeerGate {name} must not repeat a pooling, got {tuple(value)!r}")
    return tuple(value)


def _block_masks(nb: int, lq: int, lk: int, bs: int, causal: bool, device):
    """(allowed (nb, nb) bool, has_q (nb,) bool): rows holding queries; causal: columns c <= r."""
    r = torch.arange(nb, device=device)
    has_q = r >= (lk - lq) // bs
    allowed = has_q[:, None].expand(nb, nb)
    if causal:
        allowed = allowed & (r[None, :] <= r[:, None])
    return allowed, has_q


# -- the gate ----------------------------------------------------------------------------------------
class SeerGate(nn.Module):
    """SeerAttention's AttnGate: block scores from pooled q and k through per-head linear maps.

    Args:
        num_heads: query heads (Hq) of the attention it serves.
        head_dim: D of q and k.
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        block_size: tokens per block (query and key).
        hidden_size: features per head after the linear maps (default ``head_dim``).
        q_pooling, k_pooling: poolings concatenated per block, from ``"avg"``, ``"max"``, ``"min"``.
        rope_base: when set, q and k are taken to carry a "rotate half" RoPE of this base (positions as in the
            module docstring): it is undone before pooling and re-applied to the projected features at the
            block positions ``r * block_size``. Needs even ``head_dim`` and ``hidden_size``.

    ``scores(q, k)``: (B, Hq, nb, nb) raw scores, ``nb = ceil(Lk / block_size)``, bottom-right geometry of
    `attnzoo.routing.base`. ``forward(q, k, causal=True, log=False)``: the block distribution (softmax over
    the allowed key blocks; 0 elsewhere and on rows without queries), or its log (-inf where not allowed).
    Scores are computed in float32 (float64 for float64 inputs), whatever the parameters' dtype. The maps
    start normal(0, 1/sqrt(fan_in)) (the paper's code: normal(0, 0.02), the LLM's initializer range).
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: Optional[int] = None, block_size: int = 64,
                 hidden_size: Optional[int] = None, q_pooling=("avg",), k_pooling=("max", "min"),
                 rope_base: Optional[float] = None):
        super().__init__()
        self.num_heads = check_int("SeerGate num_heads", num_heads, 1)
        self.head_dim = check_int("SeerGate head_dim", head_dim, 1)
        nkv = self.num_heads if num_kv_heads is None else check_int("SeerGate num_kv_heads", num_kv_heads, 1)
        if self.num_heads % nkv:
            raise ValueError(f"SeerGate num_kv_heads ({nkv}) must divide num_heads ({self.num_heads})")
        self.num_kv_heads = nkv
        self.block_size = check_int("SeerGate block_size", block_size, 1)
        self.hidden_size = self.head_dim if hidden_size is None else check_int("SeerGate hidden_size",
                                                                                hidden_size, 1)
        self.q_pooling = _check_pooling("q_pooling", q_pooling)
        self.k_pooling = _check_pooling("k_pooling", k_pooling)
        if rope_base is not None:
            if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)):
                raise TypeError(f"SeerGate rope_base must be a number > 1 or None, got {rope_base!r}")
            if not (math.isfinite(rope_base) and rope_base > 1):
                raise ValueError(f"SeerGate rope_base must be a finite number > 1, got {rope_base!r}")
            if self.head_dim % 2 or self.hidden_size % 2:
                raise ValueError(f"SeerGate rope_base needs an even head_dim and hidden_size, got head_dim="
                                 f"{self.head_dim}, hidden_size={self.hidden_size}")
            rope_base = float(rope_base)
        self.rope_base = rope_base
        din_q, din_k = self.head_dim * len(self.q_pooling), self.head_dim * len(self.k_pooling)
        self.q_weight = nn.Parameter(torch.randn(self.num_heads, din_q, self.hidden_size) * din_q ** -0.5)
        self.k_weight = nn.Parameter(torch.randn(self.num_kv_heads, din_k, self.hidden_size) * din_k ** -0.5)

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, hidden_size={self.hidden_size}, q_pooling={self.q_pooling}, "
                f"k_pooling={self.k_pooling}, rope_base={self.rope_base}")

    def _check(self, q, k):
        check_qk(q, k, "SeerGate")
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"SeerGate was built for q (B, {self.num_heads}, Lq, {self.head_dim}) and k (B, "
                             f"{self.num_kv_heads}, Lk, {self.head_dim}), got q {tuple(q.shape)}, k {tuple(k.shape)}")

    def _pooled(self, x: torch.Tensor, nb: int, offset: int, hows: Tuple[str, ...]) -> torch.Tensor:
        bs = self.block_size
        parts = {}
        if "avg" in hows:
            parts["avg"] = pool(x, bs, nb, offset, "mean")
        if "max" in hows or "min" in hows:
            parts["max"], parts["min"] = pool(x, bs, nb, offset, "maxmin")
        return torch.cat([parts[h] for h in hows], dim=-1)

    def features(self, q: torch.Tensor, k: torch.Tensor):
        """The pooled, projected (and, with ``rope_base``, re-rotated) block features: (B, Hq, nb, E) for q
        and (B, Hkv, nb, E) for k, in float32 (float64 for float64 inputs)."""
        self._check(q, k)
        lq, lk, bs = q.shape[2], k.shape[2], self.block_size
        nb, off = num_blocks(lk, bs), lk - lq
        dt = acc_dtype(q.dtype)
        q, k = q.to(dt), k.to(dt)
        if self.rope_base is not None:
            kpos = torch.arange(lk, device=q.device)
            q = _rope(q, kpos[off:], self.rope_base, inverse=True)
            k = _rope(k, kpos, self.rope_base, inverse=True)
        qf = torch.matmul(self._pooled(q, nb, off, self.q_pooling), self.q_weight.to(device=q.device, dtype=dt))
        kf = torch.matmul(self._pooled(k, nb, 0, self.k_pooling), self.k_weight.to(device=q.device, dtype=dt))
        if self.rope_base is not None:
            bpos = torch.arange(nb, device=q.device) * bs
            qf, kf = _rope(qf, bpos, self.rope_base), _rope(kf, bpos, self.rope_base)
        return qf, kf

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Raw block scores (B, Hq, nb, nb): ``qh . kh / sqrt(hidden_size)``, no mask."""
        qf, kf = self.features(q, k)
        return group_scores(qf, kf) * self.hidden_size ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True, log: bool = False) -> torch.Tensor:
        """The gate's block distribution (B, Hq, nb, nb) (``log``: its log, -inf where not allowed)."""
        causal = check_bool("SeerGate causal", causal)
        s = self.scores(q, k)
        allowed, has_q = _block_masks(s.shape[-1], q.shape[2], k.shape[2], self.block_size, causal, s.device)
        logp = torch.log_softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        logp = logp.masked_fill(~has_q[:, None], float("-inf"))   # rows without queries: no distribution
        return logp if log else logp.exp()


# -- the router --------------------------------------------------------------------------------------
class SeerRouter(Router):
    """Routing by a (distilled) `SeerGate`: top-k key blocks per query block by gate score, or the smallest
    set reaching the gate's cumulative probability ``threshold``; ``sinks`` first and ``local`` diagonal
    blocks always kept. The block size is the gate's. ``causal``: token-causal attention and only blocks at
    or left of the diagonal (the gate must be trained with the same setting)."""

    def __init__(self, gate: SeerGate, top_k: Optional[int] = None, threshold: Optional[float] = None,
                 sinks: int = 1, local: int = 1, causal: bool = True):
        if not isinstance(gate, SeerGate):
            raise TypeError(f"SeerRouter gate must be a SeerGate, got {type(gate).__name__}")
        if (top_k is None) == (threshold is None):
            raise ValueError("SeerRouter: give exactly one of top_k (blocks per query block) and threshold "
                             f"(cumulative gate probability in (0, 1]), got top_k={top_k!r}, threshold={threshold!r}")
        self.gate = gate
        self.block_size = gate.block_size
        self.top_k = None if top_k is None else check_int("SeerRouter top_k", top_k, 1)
        self.threshold = None if threshold is None else check_fraction("SeerRouter threshold", threshold)
        self.sinks = check_int("SeerRouter sinks", sinks, 0)
        self.local = check_int("SeerRouter local", local, 0)
        self.causal = check_bool("SeerRouter causal", causal)

    def __repr__(self):
        sel = f"top_k={self.top_k}" if self.top_k is not None else f"threshold={self.threshold}"
        return (f"SeerRouter(block_size={self.block_size}, {sel}, sinks={self.sinks}, local={self.local}, "
                f"causal={self.causal})")

    def _route(self, q, k):
        s = self.gate.scores(q, k)
        _, has_q = _block_masks(s.shape[-1], q.shape[2], k.shape[2], self.block_size, self.causal, s.device)
        return select_blocks(s, has_q, causal=self.causal, sinks=self.sinks, local=self.local, top_k=self.top_k,
                             threshold=self.threshold)


# -- the distillation targets ------------------------------------------------------------------------
def seer_targets(q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool = True, pooling: str = "max",
                 scale: Optional[float] = None, rows_per_chunk: Optional[int] = None) -> torch.Tensor:
    """The block-pooled true attention (B, Hq, nb, nb), each query-block row normalised to sum 1 (rows
    without queries are 0).

    The attention is ``softmax(scale * q k^T)`` (``scale`` default ``1/sqrt(D)``) with the causal mask
    bottom-right when ``causal``. ``pooling="max"``: the largest probability in each (query block, key block)
    cell (SeerAttention's ground truth); ``"sum"``: the probability summed over the cell. Computed under
    no_grad in float32 (float64 for float64 inputs), ``rows_per_chunk`` query blocks at a time (default:
    as many as keep one score tile under 2^22 elements)."""
    check_qk(q, k, "seer_targets")
    bs = check_int("seer_targets block_size", block_size, 1)
    causal = check_bool("seer_targets causal", causal)
    pooling = check_choice("seer_targets pooling", pooling, ("max", "sum"))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"seer_targets: scale must be a finite float or None, got {scale!r}")
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, nb, off = hq // hkv, num_blocks(lk, bs), lk - lq
    if rows_per_chunk is None:
        rows = max(1, _TILE // (b * hq * bs * lk))
    else:
        rows = check_int("seer_targets rows_per_chunk", rows_per_chunk, 1)
    dt, dev = acc_dtype(q.dtype), q.device
    red = (lambda x, dim: x.amax(dim)) if pooling == "max" else (lambda x, dim: x.sum(dim))
    with torch.no_grad():
        kt = k.detach().to(dt).unsqueeze(2).transpose(-1, -2)          # (B, Hkv, 1, D, Lk)
        qg = q.detach().to(dt).view(b, hkv, g, lq, d)
        kidx = torch.arange(lk, device=dev)
        out = torch.zeros(b, hkv, g, nb, nb, dtype=dt, device=dev)
        for r0 in range(off // bs, nb, rows):
            r1 = min(nb, r0 + rows)
            p0, p1 = max(r0 * bs, off), min(r1 * bs, lk)              # query positions of these rows
            s = torch.matmul(qg[:, :, :, p0 - off:p1 - off], kt) * scale  # (B, Hkv, G, n, Lk)
            if causal:
                pos = torch.arange(p0, p1, device=dev)
                s = s.masked_fill(kidx[None, :] > pos[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = F.pad(p, (0, nb * bs - lk)).view(b, hkv, g, p1 - p0, nb, bs)
            p = red(p, -1)                                              # (B, Hkv, G, n, nb)
            p = F.pad(p, (0, 0, p0 - r0 * bs, r1 * bs - p1)).view(b, hkv, g, r1 - r0, bs, nb)
            out[:, :, :, r0:r1] = red(p, -2)
        out = out / out.sum(-1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
        return out.reshape(b, hq, nb, nb)


# -- the training loop -------------------------------------------------------------------------------
def seer_loss(gate: SeerGate, q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, causal: bool = True,
              skip_frac: float = 0.25) -> torch.Tensor:
    """KL(target || gate) of each query-block row, averaged over batch, heads and the rows holding queries
    after skipping the first ``skip_frac`` of them (SeerAttention skips a quarter; all rows if none is left)."""
    logp = gate(q, k, causal=causal, log=True)
    nb = logp.shape[-1]
    t = target.to(logp.dtype)
    kl = torch.where(t > 0, torch.xlogy(t, t) - t * logp, torch.zeros_like(t)).sum(-1)   # (B, Hq, nb)
    first = (k.shape[2] - q.shape[2]) // gate.block_size
    start = first + int(skip_frac * (nb - first))
    if start >= nb:
        start = first
    return kl[:, :, start:].mean()


class _Reporter:
    """rich bar on a terminal (when rich is installed), else a line every ``every`` steps; or nothing."""

    def __init__(self, steps: int, enabled: bool, every: int, stream):
        self.steps, self.enabled, self.every, self.stream = steps, enabled, every, stream or sys.stdout
        self._bar = self._task = None
        self.t0 = time.perf_counter()
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
                self._bar = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.description}"), console=Console(file=self.stream))
                self._bar.start()
                self._task = self._bar.add_task("", total=steps)
            except Exception:  # noqa: BLE001 - rich missing or unusable: plain lines
                self._bar = None

    def step(self, step: int, loss: float):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=f"KL {loss:.4f}")
        elif step == 1 or step % self.every == 0 or step == self.steps:
            print(f"distill step {step}/{self.steps}  KL {loss:.5f}  ({time.perf_counter() - self.t0:.1f}s)",
                  file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.stop()


def _is_pair(x) -> bool:
    """(q, k), or (q, k, v) as ``capture_qk(..., values=True)`` gives it (v unused)."""
    return isinstance(x, (tuple, list)) and len(x) in (2, 3) and all(isinstance(t, torch.Tensor) for t in x)


def _batches(source, batch_size, target_fn, gen):
    """(q, k, target) per step from the kinds of ``qk_source`` `distill_gate` takes."""
    if _is_pair(source):
        q, k = source[0], source[1]
        t = target_fn(q, k)                                 # once, for the whole set
        n = q.shape[0]
        while True:
            if batch_size is None or batch_size >= n:
                yield q, k, t
            else:
                idx = torch.randperm(n, generator=gen)[:batch_size].to(q.device)
                yield q[idx], k[idx], t[idx]
    elif callable(source):
        for step in itertools.count():
            item = source(step)
            if not _is_pair(item):
                raise TypeError(f"distill_gate: qk_source({step}) must return a (q, k) pair of tensors, got "
                                f"{type(item).__name__}")
            yield item[0], item[1], target_fn(item[0], item[1])
    elif isinstance(source, Sequence):
        if not source:
            raise ValueError("distill_gate: qk_source is an empty sequence")
        cache = {}
        for i in itertools.cycle(range(len(source))):
            if i not in cache:
                if not _is_pair(source[i]):
                    raise TypeError(f"distill_gate: qk_source[{i}] must be a (q, k) pair of tensors")
                cache[i] = target_fn(source[i][0], source[i][1])
            yield source[i][0], source[i][1], cache[i]
    else:
        for item in source:
            if not _is_pair(item):
                raise TypeError("distill_gate: the items of qk_source must be (q, k) pairs of tensors, got "
                                f"{type(item).__name__}")
            yield item[0], item[1], target_fn(item[0], item[1])


def distill_gate(gate: SeerGate, qk_source, steps: int = 200, lr: float = 1e-3, *, causal: bool = True,
                 target_pooling: str = "max", skip_frac: float = 0.25, batch_size: Optional[int] = None,
                 weight_decay: float = 0.0, scale: Optional[float] = None, seed: int = 0, progress: bool = True,
                 log_every: Optional[int] = None, stream=None) -> List[float]:
    """Train ``gate`` by distillation from block-pooled true attention; returns the loss of every step.

    ``qk_source`` (q (B, Hq, Lq, D), k (B, Hkv, Lk, D), detached, as the attention receives them):

    - a pair ``(q, k)`` of tensors (or ``(q, k, v)``, v unused): a fixed set; targets computed once, each
      step a random minibatch of ``batch_size`` sequences (all of them when None);
    - a sequence of ``(q, k)`` pairs: cycled, targets computed once per item;
    - a callable ``step -> (q, k)``: fresh data each step;
    - any other iterable of ``(q, k)`` pairs: consumed; training stops early when it is exhausted.

    Loss: `seer_loss` (KL of each query-block row, ``skip_frac`` of the first rows skipped) against
    `seer_targets` with ``target_pooling`` (``"max"``: the paper's; ``"sum"``: block attention mass), the
    attention's ``scale`` (default 1/sqrt(D)) and ``causal``. Optimizer: AdamW at a constant ``lr``.
    ``progress``: a rich bar on a terminal, else a line every ``log_every`` steps (default steps // 10);
    ``False``: silent.
    """
    if not isinstance(gate, SeerGate):
        raise TypeError(f"distill_gate: gate must be a SeerGate, got {type(gate).__name__}")
    steps = check_int("distill_gate steps", steps, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"distill_gate lr must be a positive number, got {lr!r}")
    causal = check_bool("distill_gate causal", causal)
    target_pooling = check_choice("distill_gate target_pooling", target_pooling, ("max", "sum"))
    if isinstance(skip_frac, bool) or not isinstance(skip_frac, (int, float)) or not 0 <= skip_frac < 1:
        raise ValueError(f"distill_gate skip_frac must be in [0, 1), got {skip_frac!r}")
    if batch_size is not None:
        batch_size = check_int("distill_gate batch_size", batch_size, 1)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"distill_gate weight_decay must be a number >= 0, got {weight_decay!r}")
    progress = check_bool("distill_gate progress", progress)
    every = max(1, steps // 10) if log_every is None else check_int("distill_gate log_every", log_every, 1)
    if not (_is_pair(qk_source) or callable(qk_source) or isinstance(qk_source, Iterable)):
        raise TypeError("distill_gate: qk_source must be a (q, k) pair, a sequence or iterable of pairs, or a "
                        f"callable step -> (q, k); got {type(qk_source).__name__}")

    def target_fn(q, k):
        return seer_targets(q, k, gate.block_size, causal=causal, pooling=target_pooling, scale=scale)

    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(gate.parameters(), lr=float(lr), weight_decay=float(weight_decay))
    history: List[float] = []
    rep = _Reporter(steps, progress, every, stream)
    was_training = gate.training
    gate.train()
    try:
        for step, (q, k, t) in enumerate(_batches(qk_source, batch_size, target_fn, gen), start=1):
            loss = seer_loss(gate, q.detach(), k.detach(), t, causal=causal, skip_frac=skip_frac)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            rep.step(step, history[-1])
            if step >= steps:
                break
    finally:
        rep.close()
        gate.train(was_training)
    return history


# -- capturing q and k from a model ------------------------------------------------------------------
@contextlib.contextmanager
def recording_qk(model: nn.Module, values: bool = False):
    """Within the block, every call of ``project_qkv`` of ``model``'s attention layers (modules with that
    method, ``model`` included) appends its ``(q, k)`` (``(q, k, v)`` with ``values``; detached) to
    ``records[layer name]``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = 3 if check_bool("values", values) else 2
    records: Dict[str, list] = {}
    patched = []
    for name, m in model.named_modules():
        orig = getattr(m, "project_qkv", None)
        if not callable(orig):
            continue
        key = name or "(model)"
        records[key] = []

        def wrapper(*args, _orig=orig, _rec=records[key], **kwargs):
            out = _orig(*args, **kwargs)
            _rec.append(tuple(t.detach() for t in out[:n]))
            return out
        had = "project_qkv" in m.__dict__
        patched.append((m, had, m.__dict__.get("project_qkv")))
        m.__dict__["project_qkv"] = wrapper                  # instance attribute: shadows the method
    if not records:
        raise ValueError(f"{type(model).__name__} has no attention layer (no module with a project_qkv method)")
    try:
        yield records
    finally:
        for m, had, old in patched:
            if had:
                m.__dict__["project_qkv"] = old
            else:
                del m.__dict__["project_qkv"]


def capture_qk(model: nn.Module, *args, values: bool = False, **kwargs) -> Dict[str, Tuple[torch.Tensor, ...]]:
    """Run ``model(*args, **kwargs)`` (eval mode, no_grad) and return ``{layer name: (q, k)}`` for every
    attention layer: q (B, Hq, L, D), k (B, Hkv, L, D) after QK-norm and RoPE, as ``attnzoo.attention``
    received them (``values=True``: ``(q, k, v)``). A layer called several times gets its calls
    concatenated along the batch."""
    was_training = model.training if isinstance(model, nn.Module) else False
    with recording_qk(model, values) as rec, torch.no_grad():
        model.eval()
        try:
            model(*args, **kwargs)
        finally:
            model.train(was_training)
    out = {}
    for name, calls in rec.items():
        if not calls:
            continue
        if len(calls) == 1:
            out[name] = calls[0]
            continue
        try:
            out[name] = tuple(torch.cat(ts) for ts in zip(*calls))
        except RuntimeError as exc:
            raise ValueError(f"layer {name!r} was called {len(calls)} times with different shapes; use "
                             "recording_qk to get every call") from exc
    return out


__all__ = ["SeerGate", "SeerRouter", "seer_targets", "seer_loss", "distill_gate", "capture_qk", "recording_qk"]
