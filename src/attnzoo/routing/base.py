"""The `Router` base class: content-based block masks from q and k, and how a router runs as a pattern.

A router looks at the queries and keys of one attention call and decides, per (batch, query head, query
block), which key blocks are computed. ``router(q, k)`` returns that decision as a bool block mask of
shape (B, Hq, nb, nb) with ``nb = ceil(Lk / block_size)``.

Block geometry follows `BlockSparse` (and every pattern): queries are placed by *position* on the key axis,
bottom-right aligned (query ``i`` of ``Lq`` sits at position ``i + Lk - Lq``), query block row ``r`` holds
the queries at positions ``[r * bs, (r + 1) * bs)``, key block column ``c`` the keys ``[c * bs, (c + 1) * bs)``.
So the mask is square, and with ``Lq < Lk`` its first rows (positions before the first query) are all
False. ``Lq > Lk`` (queries before the first key) is rejected.

Running a router as a pattern (``attnzoo.attention(q, k, v, pattern=router)``): the api calls
`Router.plan`, which routes, folds the batch into the heads (q viewed as (1, B*Hq, Lq, D), k and v as
(1, B*Hkv, Lk, D): query head ``b*Hq + h`` maps to kv head ``(b*Hq + h) // G = b*Hkv + h // G``, so
GQA stays right) and wraps the mask, where it is (no copy, no host sync), in the per-call pattern
``RoutedBlocks(mask.reshape(B*Hq, nb, nb), bs, causal=router.causal)`` (`attnzoo.patterns.routed`: exact
device-side block layout for any kernel block size, token causality folded in, equality by identity so
that no backend caches per call). The api then runs that pattern on the chosen backend and
`RoutedCall.unfold` puts the batch back. (``BlockSparse(mask, bs) & Causal()`` is the same pattern as a
static value: packed on the host, hashable, cached by every backend; right for a mask fixed once.) The routing decision is taken under
``torch.no_grad`` (it is not differentiated); gradients flow to q, k, v through the sparse attention.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..patterns import Pattern, RoutedBlocks

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -- argument checks --------------------------------------------------------------------------------
def check_int(name: str, value, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(map(repr, choices))}; got "
                        f"{type(value).__name__}: {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__}: {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_qk(q, k, who: str = "router") -> None:
    """Shapes, dtypes and devices of the tensors a router reads; errors name the argument."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{who}: {name} must have 4 dimensions (batch, heads, length, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{who}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{who}: {name} must not be empty, got shape {tuple(t.shape)}")
    if q.device != k.device:
        raise ValueError(f"{who}: q and k must be on one device, got q={q.device}, k={k.device}")
    (b, hq, lq, d), (bk, hkv, lk, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"{who}: batch sizes differ: q has {b}, k has {bk}")
    if d != dk:
        raise ValueError(f"{who}: q and k must have the same head_dim, got q={d}, k={dk}")
    if hq % hkv:
        raise ValueError(f"{who}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA")
    if lq > lk:
        raise ValueError(f"{who}: routing needs q length <= k length (queries are aligned bottom-right on the "
                         f"keys), got q length {lq} > k length {lk}")


# -- block helpers shared by the routers ------------------------------------------------------------
def num_blocks(length: int, bs: int) -> int:
    return -(-length // bs)


def blocked(x: torch.Tensor, bs: int, nb: int, offset: int, fill: float = 0.0):
    """x (B, H, L, D) placed at positions offset..offset+L-1 of a grid of ``nb`` blocks of ``bs``:
    -> (x (B, H, nb, bs, D) in x's dtype, padding filled with ``fill``; valid (nb, bs) bool)."""
    b, h, n, d = x.shape
    back = nb * bs - offset - n
    if offset or back:
        x = torch.nn.functional.pad(x, (0, 0, offset, back), value=fill)
    pos = torch.arange(nb * bs, device=x.device)
    valid = ((pos >= offset) & (pos < offset + n)).view(nb, bs)
    return x.reshape(b, h, nb, bs, d), valid


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routers compute scores in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pool(x: torch.Tensor, bs: int, nb: int, offset: int, how: str = "mean"):
    """Per-block pooling in `acc_dtype` of x (B, H, L, D) placed at positions ``offset..``: -> (B, H, nb, D) for
    ``"mean"``; ``(max, min)`` for ``"maxmin"``. Blocks without tokens pool to 0."""
    if how == "mean":
        xb, valid = blocked(x, bs, nb, offset)
        acc = acc_dtype(x.dtype)
        cnt = valid.sum(-1).to(acc).clamp_(min=1)
        return xb.sum(3, dtype=acc) / cnt[:, None]
    big = float("inf")
    xb, valid = blocked(x, bs, nb, offset, fill=-big)
    mx = xb.amax(3).to(acc_dtype(x.dtype))
    if offset or x.shape[2] != nb * bs:
        xb = blocked(x, bs, nb, offset, fill=big)[0]
    mn = xb.amin(3).to(mx.dtype)
    has = valid.any(-1)[:, None]
    return torch.where(has, mx, 0.0), torch.where(has, mn, 0.0)


TF32_SCORES = True  # float32 block scores on CUDA through the tensor cores; benchmarks switch it off


@contextlib.contextmanager
def _tf32_matmul():
    """Float32 CUDA matmuls in TF32 inside the block, whatever the global setting, restored after."""
    m = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    old = getattr(m, attr)
    setattr(m, attr, "tf32" if attr == "fp32_precision" else True)
    try:
        yield
    finally:
        setattr(m, attr, old)


def group_scores(qr: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
    """Block scores ``qr @ kr^T`` under GQA: qr (B, Hq, nq, E), kr (B, Hkv, nk, E) -> (B, Hq, nq, nk).

    Float32 on CUDA runs as TF32 (`TF32_SCORES`): the (H, nb, nb) product is the routers' largest matmul
    (17 GFLOP at 64K tokens, 64 heads, blocks of 64: about 0.3 ms as plain float32 on an H100-class GPU,
    a tenth of that on the tensor cores), and a score only ranks blocks, where TF32's ~1e-3 relative error
    can only swap near-ties. Float64 (the exact reference path) and CPU are unchanged."""
    b, hq, nq, e = qr.shape
    hkv, nk = kr.shape[1], kr.shape[2]
    ctx = _tf32_matmul() if TF32_SCORES and qr.is_cuda and qr.dtype == torch.float32 else contextlib.nullcontext()
    with ctx:
        s = torch.matmul(qr.view(b, hkv, hq // hkv, nq, e), kr.unsqueeze(2).transpose(-1, -2))
    return s.reshape(b, hq, nq, nk)


FUSED_SELECT = True  # benchmarks switch it off to time the PyTorch path


def _fused_select(scores: torch.Tensor) -> bool:
    """Whether `select_blocks`' top-k runs as one Triton kernel (`_triton_select`): CUDA float16/32 scores
    (float64 stays on the exact PyTorch path), Triton importable, rows short enough for registers."""
    if not FUSED_SELECT or not scores.is_cuda or scores.dtype == torch.float64 or scores.numel() == 0:
        return False
    try:
        from ._triton_select import MAX_BLOCKS
    except Exception:  # noqa: BLE001 - no triton: the PyTorch path
        return False
    return scores.shape[-1] <= MAX_BLOCKS


def select_blocks(scores: torch.Tensor, has_q: torch.Tensor, *, causal: bool, sinks: int, local: int,
                  top_k: Optional[int] = None, threshold: Optional[float] = None,
                  scale: float = 1.0) -> torch.Tensor:
    """The block mask from block scores (B, H, nb, nb) (float; larger = more relevant).

    Allowed blocks: rows holding queries (``has_q`` (nb,) bool), and with ``causal`` the columns ``c <= r``.
    Forced blocks (always kept when allowed): the first ``sinks`` columns and the ``local`` blocks nearest
    the diagonal (causal: ``r-local+1 .. r``; otherwise ``|c - r| < local``). Then, among the other
    allowed blocks: with ``top_k``, the ``top_k`` best-scoring ones (all of them if fewer); with
    ``threshold``, the smallest set that brings the estimated mass -- the softmax over the allowed blocks
    of ``scale * scores``, forced blocks counted first -- to at least ``threshold``."""
    nb = scores.shape[-1]
    dev = scores.device
    r = torch.arange(nb, device=dev)[:, None]
    c = torch.arange(nb, device=dev)[None, :]
    allowed = has_q[:, None].expand(nb, nb)
    if causal:
        allowed = allowed & (c <= r)
        near = (c <= r) & (c > r - local)
    else:
        near = (c - r).abs() < local
    forced = allowed & ((c < sinks) | near)
    cand = allowed & ~forced
    neg = float("-inf")
    if top_k is not None and _fused_select(scores):
        from ._triton_select import select_topk
        return select_topk(scores, has_q, causal=causal, sinks=sinks, local=local, top_k=top_k)
    if top_k is not None:
        s = scores.masked_fill(~cand, neg)
        vals, idx = s.topk(min(top_k, nb), dim=-1)
        sel = torch.zeros(scores.shape, dtype=torch.bool, device=dev).scatter_(-1, idx, vals > neg)
        return sel | forced
    p = torch.softmax((scores * scale).masked_fill(~allowed, neg), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows without queries
    base = (p * forced).sum(-1, keepdim=True)
    pc = p.masked_fill(~cand, -1.0)    # non-candidates sort last
    vals, idx = pc.sort(dim=-1, descending=True)
    before = base + vals.clamp(min=0).cumsum(-1) - vals.clamp(min=0)   # mass kept before this block
    keep = (vals >= 0) & (before < threshold)
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=dev).scatter_(-1, idx, keep)
    return sel | forced


# -- the base class and the api glue ----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RoutedCall:
    """One routed attention call, ready for the api: folded tensors, the per-call pattern, the mask."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Pattern
    mask: torch.Tensor          # (B, Hq, nb, nb) bool, as the router returned it
    batch: int

    def unfold(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """An output (1, B*Hq, Lq, ...) of the folded call back to (B, Hq, Lq, ...)."""
        if x is None or self.batch == 1:
            return x
        return x.reshape(self.batch, x.shape[1] // self.batch, *x.shape[2:])


class Router:
    """Base class of the content-based routers. Subclasses set ``block_size`` and ``causal`` and implement
    ``_route(q, k) -> (B, Hq, nb, nb) bool`` (inputs already checked, detached, under no_grad)."""

    block_size: int
    causal: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The block mask (B, Hq, nb, nb) bool, ``nb = ceil(Lk / block_size)`` (see the module docstring)."""
        check_qk(q, k, type(self).__name__)
        with torch.no_grad():
            return self._route(q.detach(), k.detach())

    def _route(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define _route")

    def num_blocks(self, kv_len: int) -> int:
        return num_blocks(kv_len, self.block_size)

    def pattern(self, mask: torch.Tensor) -> Pattern:
        """The per-call pattern of a block mask (H, nb, nb) (batch already folded into heads): a
        `RoutedBlocks` over the mask as it is, on its device."""
        return RoutedBlocks(mask, self.block_size, causal=self.causal)

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> RoutedCall:
        """Route (or take ``mask``), fold the batch into the heads, build the pattern."""
        if mask is None:
            mask = self(q, k)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        nb = self.num_blocks(lk)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, hq, nb, nb):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape {(b, hq, nb, nb)} (B, Hq, nb, nb), got {got}")
        pattern = self.pattern(mask.reshape(b * hq, nb, nb))
        if b > 1:
            q = q.reshape(1, b * hq, lq, d)
            k = k.reshape(1, b * hkv, lk, d)
            v = v.reshape(1, b * hkv, lk, v.shape[-1])
        return RoutedCall(q, k, v, pattern, mask, b)



class ParamsRouter(Router):
    """A router that is a value: ``repr``, equality and hash from its constructor arguments (``_params()``),
    so equal routers are interchangeable (no learned state)."""

    def _params(self) -> dict:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._params().items())})"

    def __eq__(self, other):
        return type(other) is type(self) and other._params() == self._params()

    def __hash__(self):
        return hash((type(self).__name__, tuple(self._params().items())))
