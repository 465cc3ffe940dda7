"""Mixture-of-Head attention (MoH): every token picks the attention heads it uses.

    attn = MoH(dim=256, num_heads=8, num_shared_heads=4, top_k=2)   # 4 shared + 2 of 4 routed heads a token
    y = attn(x); loss = task_loss + 0.01 * attn.aux_loss            # load balance, as in the paper

Jin, Zhu, Yuan, Yan 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention" (arXiv 2410.11842).
Multi-head attention is a sum over heads, ``y_t = sum_i H^i_t W_O^i``; MoH makes it a weighted sum
``y_t = sum_i g_{t,i} H^i_t W_O^i`` where the weights ``g`` come from a per-token router over the layer input
``x_t`` (two-stage routing, the paper's eqs. 5-6): the first ``h_s = num_shared_heads`` heads are shared
(always on), the other ``h - h_s`` are routed, and token ``t`` turns on the ``top_k`` routed heads with the
largest router logits:

    g_{t,i} = alpha_1 * softmax(W_s x_t)_i                    shared head i
    g_{t,i} = alpha_2 * softmax(W_r x_t)_i   if i is in the top_k of (W_r x_t), else 0      routed head i
    [alpha_1, alpha_2] = softmax(W_h x_t)

(the routed softmax runs over all routed heads, before the top-k; no renormalisation). Without shared heads
``g = softmax(W_r x_t) * topk-mask``; without routed heads ``g = softmax(W_s x_t)``. ``weighting="scaled"``
instead follows the authors' released code (SkyworkAI/MoH): the top-k routed weights are renormalised to sum
to 1, then the shared weights are multiplied by ``h_s``, the routed ones by ``top_k`` and ``alpha`` by 2, so an
active head's weight averages 1 as in plain multi-head attention.

Load balance (paper eq. 7), over the ``N = B * T`` tokens of the call, routed heads only:

    aux_loss = sum_i f_i * P_i,   f_i = (1/N) sum_t 1[token t routed to head i],   P_i = (1/N) sum_t softmax(W_r x_t)_i

(the paper adds ``beta * aux_loss`` to the task loss, beta = 0.01; the authors' code uses
``(h - h_s) * sum_i f_i P_i``). It is set as ``layer.aux_loss`` by every forward (a 0-d tensor with gradient;
zero without routed heads).

Two ways to compute the same thing (``compute=``):

- ``"dense"``: attention for every head, then the weights (zero for heads a token did not pick). No host sync.
- ``"sparse"``: only the heads that at least one token of the call routed to. The active query heads are
  gathered per key/value group (GQA), each group padded to the largest number of active heads in a group
  (padding repeats an active head; its result is dropped), and only the key/value heads of active groups are
  used (gathered, a copy, when some group is inactive; untouched when all are active). One call to
  ``attnzoo.attention`` on that smaller problem; the results are scattered back (zeros elsewhere). Needs the
  active set on the host (one small device-to-host copy) and has data-dependent shapes.
- ``"auto"``: sparse when a rough cost model says it saves time, else dense. The model: attention costs
  ``heads_computed * T / 300 + kv_heads_read`` (compute against the key/value reads, 300 being about an
  H100's bf16 flop-to-byte ratio), where gathering a key/value head counts 3 reads (read, write, read
  again); sparse is chosen when it costs under 0.9 of dense. Untimed: a starting point, not a measurement.
  In prefill and training (``T`` large) it saves when the call leaves heads unused; in one-token decoding
  the key/value reads dominate, and gathering them costs more than it saves unless few groups are active.

With a cache, the keys and values of *all* key/value heads are cached (a later token may route anywhere),
so ``kv_cache_values_per_token()`` equals `Attention`'s. Patterns that depend on the head are supported by
the sparse path when they are ``PerHead`` lists of head-independent patterns (the list is re-indexed);
for other head-dependent patterns ``"auto"`` computes densely and ``"sparse"`` is refused.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..api import attention
from ..patterns import Pattern
from ..patterns.base import PerHead
from .attention import Attention, KVCache

COMPUTE_MODES = ("auto", "dense", "sparse")
WEIGHTINGS = ("paper", "scaled")
#: compute / key-value-read cost ratio of the "auto" cost model (tokens per head per key/value head read)
FLOP_PER_BYTE = 300.0


class Routing(NamedTuple):
    """One call's routing. ``weights`` (B, T, H): the head weights ``g`` (zero for heads not used);
    ``selected`` (B, T, H) bool: the heads each token uses (shared heads always True); ``probs``
    (B, T, H - h_s): ``softmax(W_r x)`` over the routed heads (for the load-balance loss)."""
    weights: torch.Tensor
    selected: torch.Tensor
    probs: Optional[torch.Tensor]


def _check_count(owner: str, name: str, n, lo: int, hi: int, hint: str = "") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{owner} {name} must be an integer, got {type(n).__name__}: {n!r}")
    if not lo <= n <= hi:
        raise ValueError(f"{owner} {name} must be in [{lo}, {hi}]{hint}, got {n}")
    return n


def _check_choice(owner: str, name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{owner} {name} must be one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{owner} {name} must be one of {choices}, got {value!r}")
    return value


def _subset_pattern(pattern: Pattern, heads):
    """``pattern`` for the query heads ``heads`` (a list), or None when it cannot be re-indexed."""
    if not pattern.head_dependent:
        return pattern
    if isinstance(pattern, PerHead):
        return PerHead([pattern.patterns[h] for h in heads])
    return None


class MoH(Attention):
    """Mixture-of-Head attention: `Attention` whose heads are weighted per token by a top-k router.

    Args: those of `Attention` (``dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, pattern, bias``,
    keyword ``rope_base``, ``backend``), plus
        num_shared_heads: heads every token uses, the first ones (default ``num_heads // 2``).
        top_k: routed heads per token, in ``[1, num_heads - num_shared_heads]`` (0 only when every head is
            shared); default half the routed heads (at least 1), so the defaults use 3/4 of the heads.
        compute: ``"auto"``, ``"dense"`` or ``"sparse"`` (see the module doc; settable later as ``.compute``).
        weighting: ``"paper"`` (the paper's eqs. 5-6, default) or ``"scaled"`` (the authors' code).

    Parameters: ``router`` (``W_r``, dim -> routed heads), ``shared_router`` (``W_s``, only with >= 2 shared
    heads), ``mix`` (``W_h``, dim -> 2, only with both groups); no biases. After ``forward``: ``aux_loss``
    and ``last_compute`` (``"dense"`` or ``"sparse"``).
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, qk_norm: bool = False,
                 pattern: Optional[Pattern] = None, bias: bool = False, num_shared_heads: Optional[int] = None,
                 top_k: Optional[int] = None, *, compute: str = "auto", weighting: str = "paper",
                 rope_base: float = 10000.0, backend: str = "auto"):
        super().__init__(dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, pattern, bias,
                         rope_base=rope_base, backend=backend)
        owner = type(self).__name__
        if num_shared_heads is None:
            num_shared_heads = num_heads // 2
        _check_count(owner, "num_shared_heads", num_shared_heads, 0, num_heads, f" (num_heads={num_heads})")
        routed = num_heads - num_shared_heads
        if top_k is None:
            top_k = max(1, routed // 2) if routed else 0
        if routed:
            _check_count(owner, "top_k", top_k, 1, routed,
                         f" (the routed heads: num_heads - num_shared_heads = {routed})")
        else:
            _check_count(owner, "top_k", top_k, 0, 0, " (every head is shared, none is routed)")
        self.weighting = _check_choice(owner, "weighting", weighting, WEIGHTINGS)
        self.num_shared_heads, self.num_routed_heads, self.top_k = num_shared_heads, routed, top_k
        self.compute = compute
        self.router = nn.Linear(dim, routed, bias=False) if routed else None
        self.shared_router = nn.Linear(dim, num_shared_heads, bias=False) if num_shared_heads > 1 else None
        self.mix = nn.Linear(dim, 2, bias=False) if (routed and num_shared_heads) else None
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_compute: Optional[str] = None

    @property
    def _can_subset(self) -> bool:
        """Whether the sparse path can re-index ``pattern`` for a subset of the query heads."""
        return _subset_pattern(self.pattern, list(range(self.num_heads))) is not None

    @property
    def compute(self) -> str:
        return self._compute

    @compute.setter
    def compute(self, mode: str) -> None:
        mode = _check_choice(type(self).__name__, "compute", mode, COMPUTE_MODES)
        if mode == "sparse" and not self._can_subset:
            raise ValueError(f"{type(self).__name__} compute='sparse' cannot subset the heads of pattern "
                             f"{self.pattern!r} (head-dependent patterns: only PerHead of head-independent ones); "
                             "use compute='dense' or 'auto'")
        self._compute = mode

    # routing -----------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        """The routing of ``x`` (B, T, dim): weights, selected heads, routed probabilities (see `Routing`).
        Computed in float32 (float64 for float64 input)."""
        rdt = torch.promote_types(x.dtype, torch.float32)
        b, t, _ = x.shape
        parts_w, parts_s, probs, alpha = [], [], None, None
        if self.mix is not None:
            alpha = torch.softmax(self.mix(x).to(rdt), dim=-1)                        # (B, T, 2)
            if self.weighting == "scaled":
                alpha = alpha * 2
        if self.num_shared_heads:
            if self.shared_router is not None:
                ws = torch.softmax(self.shared_router(x).to(rdt), dim=-1)
            else:
                ws = torch.ones(b, t, 1, dtype=rdt, device=x.device)
            if self.weighting == "scaled":
                ws = ws * self.num_shared_heads
            parts_w.append(ws if alpha is None else alpha[..., :1] * ws)
            parts_s.append(torch.ones(b, t, self.num_shared_heads, dtype=torch.bool, device=x.device))
        if self.num_routed_heads:
            logits = self.router(x).to(rdt)
            probs = torch.softmax(logits, dim=-1)
            top = logits.topk(self.top_k, dim=-1).indices
            sel = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            wr = probs * sel
            if self.weighting == "scaled":
                wr = wr / wr.sum(-1, keepdim=True).clamp_min(torch.finfo(rdt).tiny) * self.top_k
            parts_w.append(wr if alpha is None else alpha[..., 1:] * wr)
            parts_s.append(sel)
        return Routing(torch.cat(parts_w, -1), torch.cat(parts_s, -1), probs)

    def balance_loss(self, routing: Routing) -> torch.Tensor:
        """``sum_i f_i P_i`` over the routed heads (paper eq. 7); 0 without routed heads."""
        if routing.probs is None:
            return routing.weights.new_zeros(())
        sel = routing.selected[..., self.num_shared_heads:]
        f = sel.flatten(0, 1).to(routing.probs.dtype).mean(0)
        p = routing.probs.flatten(0, 1).mean(0)
        return (f * p).sum()

    # compute paths -----------------------------------------------------------------------------------
    def _sparse_plan(self, active: torch.Tensor):
        """From the (H,) bool of heads some token uses: (query heads to compute, kv groups, positions of
        the real results among them, their head ids)."""
        g = self.num_heads // self.num_kv_heads
        heads = active.nonzero().flatten().tolist()           # the one host sync
        by_group: dict = {}
        for h in heads:
            by_group.setdefault(h // g, []).append(h)
        groups = sorted(by_group)
        m = max(len(by_group[j]) for j in groups)
        compute, keep, kept = [], [], []
        for gi, j in enumerate(groups):
            hs = by_group[j]
            compute += hs + [hs[0]] * (m - len(hs))
            keep += [gi * m + i for i in range(len(hs))]
            kept += hs
        return compute, groups, keep, kept

    def _sparse_pays(self, n_compute: int, n_groups: int, t: int) -> bool:
        dense = self.num_heads * t / FLOP_PER_BYTE + self.num_kv_heads
        kv = self.num_kv_heads if n_groups == self.num_kv_heads else 3 * n_groups
        return n_compute * t / FLOP_PER_BYTE + kv < 0.9 * dense

    def _attend_sparse(self, q, k, v, plan):
        compute, groups, keep, kept = plan
        dev = q.device
        idx = torch.tensor(compute, device=dev)
        if len(groups) < self.num_kv_heads:
            gidx = torch.tensor(groups, device=dev)
            k, v = k.index_select(1, gidx), v.index_select(1, gidx)
        o_s = attention(q.index_select(1, idx), k, v, pattern=_subset_pattern(self.pattern, compute),
                        backend=self.backend)
        b, _, t, dv = o_s.shape
        real = o_s.index_select(1, torch.tensor(keep, device=dev))     # drop the padding heads
        return o_s.new_zeros(b, self.num_heads, t, dv).index_copy(1, torch.tensor(kept, device=dev), real)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        self.check_input(x, cache)
        routing = self.route(x)
        self.aux_loss = self.balance_loss(routing)
        q, k, v = self.project_qkv(x, cache)
        if cache is not None:
            k, v = cache.append(k, v)                          # every kv head: later tokens may route anywhere
        mode, plan = self.compute, None
        if mode == "auto" and not self._can_subset:
            mode = "dense"
        if mode != "dense":
            plan = self._sparse_plan(routing.selected.flatten(0, 1).any(0))
            if mode == "auto":
                mode = "sparse" if self._sparse_pays(len(plan[0]), len(plan[1]), x.shape[1]) else "dense"
        if mode == "sparse":
            o = self._attend_sparse(q, k, v, plan)
        else:
            o = attention(q, k, v, pattern=self.pattern, backend=self.backend)   # (B, H, T, D)
        self.last_compute = mode
        o = o * routing.weights.transpose(1, 2).unsqueeze(-1).to(o.dtype)
        return self.o_proj(self.merge_heads(o))

    def kv_cache_values_per_token(self) -> int:
        """``2 * num_kv_heads * head_dim``: every key/value head is cached, whatever the routing."""
        return super().kv_cache_values_per_token()

    def extra_repr(self):
        return (f"{super().extra_repr()}, num_shared_heads={self.num_shared_heads}, top_k={self.top_k}, "
                f"compute={self.compute!r}, weighting={self.weighting!r}")
