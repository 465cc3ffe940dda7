"""`FlexPrefill` (Lai et al., ICLR 2025): per head, a query-aware or a vertical-slash block pattern, chosen from the
input, with the smallest budget reaching a cumulative attention threshold ``gamma``.

Per (batch, query head), on the *probe* -- the last ``block_size`` queries (fewer if ``Lq`` is shorter):

1. **true** block distribution ``a``: the probe's exact causal softmax over all keys (`probe_attention`),
   averaged over the probe queries and summed per key block (sums to 1);
2. **estimated** block distribution ``a_hat = softmax(mean(q_probe) . mean_k(block) / sqrt(D))`` over the key
   blocks (the probe's last query sees every block, so nothing is masked);
3. ``d = sqrt(JSD(a, a_hat))`` (natural log; in ``[0, sqrt(ln 2)]``). ``d < tau``: the pooled estimate is
   trustworthy -> **query-aware** pattern: per query block, block scores from mean-pooled q and k, and the
   smallest set of key blocks whose (causal block-softmax) estimated mass reaches ``gamma`` (`select_blocks`
   with ``threshold=gamma``, sinks and local blocks counted first). ``d >= tau`` -> **vertical-slash** pattern:
   from the probe attention, the smallest set of key columns whose mean probe mass reaches ``gamma`` and the
   smallest set of diagonals likewise (`cumulative_set`), executed as the block mask covering them
   (`VerticalSlash`'s block-level adaptation: a superset of the token pattern).

The first ``sinks`` key blocks and the ``local`` blocks at the diagonal are always kept, in both patterns.
Causal only; ``Lq < Lk`` supported. ``last_decision`` ((B, Hq) bool, True = query-aware) and ``last_js``
((B, Hq), the divergence ``d``) hold the decision of the last call, for inspection (they are overwritten by
every call, and are not thread-safe).

Paper vs here:

- The paper's query-aware selection flattens the whole head's block-softmax matrix and keeps the smallest
  set reaching ``gamma`` of its total (so some query blocks may get more, others less); here each query block
  reaches ``gamma`` of its own estimated mass (the stricter per-row guarantee; `TopKBlocks`' threshold rule).
- The paper's vertical-slash selection counts the tokens needed to reach ``gamma`` and then takes that many
  tokens' worth of the best *blocks* of the block-summed column / diagonal scores; here the smallest token
  sets themselves are taken (the paper's Algorithm 3) and mapped to the blocks they touch.
- ``min_budget`` / ``max_budget`` (tokens; paper defaults 1024 and unbounded, meant for 32K-128K contexts):
  in the vertical-slash pattern, at least ``min_budget`` and at most ``max_budget`` columns, and the same for
  diagonals; in the query-aware pattern, ``ceil(min_budget / block_size)`` best-scoring blocks per query
  block are added to the ``gamma`` set (the paper's code adds a ``min_budget`` vertical-slash pattern there
  instead). The default here is ``min_budget=0``, right for short contexts.
- Paper defaults: ``block_size=128``, ``gamma=0.9`` (0.95 for some models), ``tau=0.1``; the paper keeps
  the first key block and the diagonal block (``sinks=1, local=1``).
"""
from __future__ import annotations

import math

import torch

from .base import ParamsRouter, acc_dtype, check_fraction, check_int, group_scores, num_blocks, pool, select_blocks
from .vertical_slash import (column_mass, columns_to_blocks, cumulative_set, diagonal_mass, diagonals_to_blocks,
                             forced_blocks, probe_attention)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sqrt(JSD(p, q))`` over the last dim (natural log; 0 log 0 = 0), for distributions summing to 1."""
    m = (p + q) / 2
    jsd = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return jsd.clamp(min=0).sqrt()


class FlexPrefill(ParamsRouter):
    """FlexPrefill: per head, a query-aware or a vertical-slash block pattern (Jensen-Shannon test on the probe
    queries), each with the smallest budget reaching cumulative attention ``gamma`` (see the module docstring).

    ``block_size``: tokens per block (also the probe length). ``gamma`` in (0, 1]: the attention mass to cover.
    ``tau`` >= 0: the divergence threshold (0: always vertical-slash; above ``sqrt(ln 2)`` ~ 0.83: always
    query-aware). ``min_budget`` >= 0 and ``max_budget`` (>= min_budget, or None): token budgets (module
    docstring). ``sinks``, ``local``: key blocks always kept (first blocks; blocks at the diagonal).
    """

    causal = True

    def __init__(self, block_size: int = 128, gamma: float = 0.9, tau: float = 0.1, min_budget: int = 0,
                 max_budget=None, sinks: int = 1, local: int = 1):
        self.block_size = check_int("FlexPrefill block_size", block_size, 1)
        self.gamma = check_fraction("FlexPrefill gamma", gamma)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise TypeError(f"FlexPrefill tau must be a number >= 0, got {type(tau).__name__}: {tau!r}")
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"FlexPrefill tau must be a finite number >= 0, got {tau}")
        self.tau = float(tau)
        self.min_budget = check_int("FlexPrefill min_budget", min_budget, 0)
        self.max_budget = None if max_budget is None else check_int("FlexPrefill max_budget", max_budget, 1)
        if self.max_budget is not None and self.max_budget < self.min_budget:
            raise ValueError(f"FlexPrefill max_budget ({self.max_budget}) must be >= min_budget ({self.min_budget})")
        self.sinks = check_int("FlexPrefill sinks", sinks, 0)
        self.local = check_int("FlexPrefill local", local, 0)
        self.last_decision = None
        self.last_js = None

    def _params(self) -> dict:
        return dict(block_size=self.block_size, gamma=self.gamma, tau=self.tau, min_budget=self.min_budget,
                    max_budget=self.max_budget, sinks=self.sinks, local=self.local)


    # -- the pieces (inputs checked, detached) -------------------------------------------------------
    def _divergence(self, q, k, p):
        """(true (B, Hq, nb), estimated (B, Hq, nb), d (B, Hq)) for probe attention ``p`` (B, Hq, m, Lk)."""
        bs, lk = self.block_size, k.shape[2]
        nb = num_blocks(lk, bs)
        true = torch.nn.functional.pad(column_mass(p), (0, nb * bs - lk)).view(*p.shape[:2], nb, bs).sum(-1)
        qbar = q[:, :, -p.shape[2]:].to(acc_dtype(q.dtype)).mean(2, keepdim=True)           # (B, Hq, 1, D)
        est = torch.softmax(group_scores(qbar, pool(k, bs, nb, 0)).squeeze(2) * q.shape[-1] ** -0.5, dim=-1)
        return true, est, js_distance(true, est)

    def _query_aware(self, q, k):
        bs, lq, lk = self.block_size, q.shape[2], k.shape[2]
        nb = num_blocks(lk, bs)
        s = group_scores(pool(q, bs, nb, lk - lq), pool(k, bs, nb, 0)) * q.shape[-1] ** -0.5
        has_q = torch.arange(nb, device=q.device) >= (lk - lq) // bs
        m = select_blocks(s, has_q, causal=True, sinks=self.sinks, local=self.local, threshold=self.gamma)
        extra = -(-self.min_budget // bs)
        if extra:
            m = m | select_blocks(s, has_q, causal=True, sinks=self.sinks, local=self.local, top_k=extra)
        return m

    def _vertical_slash(self, q, k, p):
        lq = q.shape[2]
        cols = cumulative_set(column_mass(p), self.gamma, self.min_budget, self.max_budget)
        diags = cumulative_set(diagonal_mass(p), self.gamma, self.min_budget, self.max_budget)
        bs = self.block_size
        forced = forced_blocks(lq, k.shape[2], bs, self.sinks, self.local, q.device)
        return columns_to_blocks(cols, lq, bs) | diagonals_to_blocks(diags, lq, bs) | forced

    def _route(self, q, k):
        p = probe_attention(q, k, self.block_size)
        _, _, d = self._divergence(q, k, p)
        qa = d < self.tau
        self.last_decision, self.last_js = qa, d
        return torch.where(qa[..., None, None], self._query_aware(q, k), self._vertical_slash(q, k, p))
