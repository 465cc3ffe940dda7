"""`VerticalSlash` (MInference, Jiang et al. 2024): per head, key columns and diagonals estimated from the last queries.

MInference observes that many heads attend along a few *vertical* lines (key columns every query looks at:
sinks, separators, retrieved facts) and a few *slash* lines (diagonals, ``query position - key position =
const``: the local band and periodic offsets). Per head it estimates both from the last ``last_q`` queries:

1. ``A = softmax(q_last k^T / sqrt(D))`` exactly, causal (query ``i`` of the probe sits at position ``p_i``;
   key ``j`` is visible when ``j <= p_i``), shape (last_q, Lk);
2. vertical score of key column ``j``: ``sum_i A[i, j]``; slash score of offset ``o``: ``sum_i A[i, p_i - o]``;
3. keep the ``vertical`` best columns and the ``slash`` best diagonals, the first ``sink_tokens`` columns and
   the ``local_tokens`` nearest diagonals (offsets ``0 .. local_tokens - 1``) always among them (MInference sets
   their scores to +inf: 30 and 100);
4. every query attends to the kept columns and diagonals (causally).

**Block-level adaptation.** MInference runs a dedicated token-level kernel (gathered columns + diagonal
bands). attnzoo's kernels execute block masks, so this router returns, at ``block_size`` granularity, every
(query block, key block) pair that holds at least one (query, key) pair of the token pattern: the pair is on
when the key block contains a kept column (and sits at or left of the diagonal), or when a kept diagonal
passes through it (some query ``p`` of the row block and key ``p - o`` of the column block). That is the
smallest block mask covering the token pattern -- a coarser *superset*: more pairs are computed than
MInference would (never fewer), so recall is at least MInference's and density higher. The exact token-level
vertical/slash kernel is not built here.

The pieces (probe attention, column and diagonal sums, selection, their block masks) are module functions that
`FlexPrefill` reuses. Causal only (MInference is a causal prefill method); ``Lq < Lk`` (queries bottom-right
on the keys) is supported. Not differentiated: the routing is a discrete decision.
"""
from __future__ import annotations

import torch

from .base import ParamsRouter, acc_dtype, check_int, check_qk, group_scores, num_blocks


# -- token-level estimation -------------------------------------------------------------------------
def probe_attention(q: torch.Tensor, k: torch.Tensor, n_probe: int) -> torch.Tensor:
    """Exact causal softmax attention of the last ``n_probe`` queries of ``q`` over all keys, per query head,
    in `acc_dtype`: (B, Hq, m, Lk) with ``m = min(n_probe, Lq)``. The probe queries sit at positions
    ``Lk - m .. Lk - 1`` (bottom-right alignment), so the last one sees every key."""
    lk = k.shape[2]
    m = min(n_probe, q.shape[2])
    acc = acc_dtype(q.dtype)
    s = group_scores(q[:, :, -m:].to(acc), k.to(acc)) * q.shape[-1] ** -0.5      # (B, Hq, m, Lk)
    pos = torch.arange(lk - m, lk, device=q.device)
    causal = torch.arange(lk, device=q.device)[None, :] <= pos[:, None]
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)


def column_mass(p: torch.Tensor) -> torch.Tensor:
    """Vertical scores: the probe's attention per key column, averaged over the probe queries (B, H, Lk);
    each head's scores sum to 1."""
    return p.mean(-2)


def diagonal_mass(p: torch.Tensor) -> torch.Tensor:
    """Slash scores: the probe's attention per diagonal offset ``o = query position - key position``, averaged
    over the probe queries: (B, H, Lk), index ``o`` in ``0 .. Lk - 1`` (causal: no negative offsets); each head's
    scores sum to 1. ``p`` is `probe_attention`'s output (probe rows at the last positions)."""
    b, h, m, lk = p.shape
    # Row t (position lk - m + t) holds offset o at key lk - m + t - o. Shift row t right by m - 1 - t, then
    # column u of every row holds offset lk - 1 - u: pad m zeros on the left and read the rows with a stride
    # one longer than a padded row (element (t, u) of the view is padded[t, u + t + 1]).
    w = lk + m
    padded = torch.nn.functional.pad(p, (m, 0)).contiguous()
    st = padded.stride()
    shifted = padded.as_strided((b, h, m, lk), (st[0], st[1], w + 1, 1), padded.storage_offset() + 1)
    return shifted.sum(-2).flip(-1) / m


def top_set(scores: torch.Tensor, count: int, forced: torch.Tensor) -> torch.Tensor:
    """(B, H, n) bool: the ``forced`` entries ((n,) bool) and the best-scoring others, ``count`` in all (just
    the forced ones when there are more of them than ``count``)."""
    n = scores.shape[-1]
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = min(count, n)
    if k > 0:
        idx = scores.masked_fill(forced, float("inf")).topk(k, dim=-1).indices
        sel.scatter_(-1, idx, True)
    return sel | forced


def cumulative_set(scores: torch.Tensor, gamma: float, min_count: int = 0, max_count=None) -> torch.Tensor:
    """(B, H, n) bool: per head, the smallest set of entries whose scores (non-negative) sum to at least
    ``gamma`` of the head's total -- entries by decreasing score, each kept while the mass before it is below
    ``gamma * total`` -- then grown to ``min_count`` or cut to ``max_count`` entries (best first)."""
    n = scores.shape[-1]
    vals, idx = scores.sort(dim=-1, descending=True)
    before = vals.cumsum(-1) - vals
    count = (before < gamma * vals.sum(-1, keepdim=True)).sum(-1, keepdim=True)
    count = count.clamp(min=min(min_count, n), max=n if max_count is None else min(max_count, n))
    keep = torch.arange(n, device=scores.device) < count
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, keep)


# -- token pattern -> block mask --------------------------------------------------------------------
def block_ranges(lq: int, lk: int, bs: int, device):
    """Query rows and key columns of the block grid: (qlo, qhi) (nb,) first/last query position of each row
    (``qlo > qhi``: the row holds no query), (klo, khi) (nb,) first/last key of each column."""
    nb = num_blocks(lk, bs)
    r = torch.arange(nb, device=device)
    qlo = (r * bs).clamp(min=lk - lq)
    qhi = ((r + 1) * bs).clamp(max=lk) - 1
    return qlo, qhi, r * bs, ((r + 1) * bs).clamp(max=lk) - 1


def columns_to_blocks(cols: torch.Tensor, lq: int, bs: int) -> torch.Tensor:
    """(B, H, nb, nb) bool from kept key columns ``cols`` (B, H, Lk): block (r, c) is on when column block ``c``
    holds a kept column and row ``r`` holds queries with ``c <= r`` (causal: a query block at or right of the
    column's block reaches it)."""
    b, h, lk = cols.shape
    nb = num_blocks(lk, bs)
    any_col = torch.nn.functional.pad(cols, (0, nb * bs - lk)).view(b, h, nb, bs).any(-1)   # (B, H, nb)
    qlo, qhi, _, _ = block_ranges(lq, lk, bs, cols.device)
    r = torch.arange(nb, device=cols.device)
    rows = (qlo <= qhi)[:, None] & (r[None, :] <= r[:, None])                             # (nb, nb)
    return any_col[:, :, None, :] & rows


def diagonals_to_blocks(diags: torch.Tensor, lq: int, bs: int) -> torch.Tensor:
    """(B, H, nb, nb) bool from kept diagonal offsets ``diags`` (B, H, Lk) (index ``o = query pos - key pos``):
    block (r, c) is on when a kept ``o`` lies in ``[qlo_r - khi_c, qhi_r - klo_c]`` (the offsets its token pairs
    span; all of them occur) intersected with ``[0, Lk - 1]``."""
    b, h, lk = diags.shape
    qlo, qhi, klo, khi = block_ranges(lq, lk, bs, diags.device)
    nb = qlo.shape[0]
    lo = (qlo[:, None] - khi[None, :]).clamp(min=0)
    hi = (qhi[:, None] - klo[None, :]).clamp(max=lk - 1)
    ok = (hi >= lo) & (qlo <= qhi)[:, None]
    cnt = torch.nn.functional.pad(diags.to(torch.int32).cumsum(-1), (1, 0))                # (B, H, Lk + 1)
    end = (hi + 1).clamp(min=0)                                   # kept offsets in [lo, hi]: cnt[hi+1] - cnt[lo]
    hits = cnt[..., end.flatten()] - cnt[..., lo.flatten()]
    return (hits > 0).view(b, h, nb, nb) & ok


def forced_blocks(lq: int, lk: int, bs: int, sinks: int, local: int, device) -> torch.Tensor:
    """(nb, nb) bool: the first ``sinks`` key blocks and the ``local`` blocks at and left of the diagonal, in
    rows that hold queries, causal (``c <= r``)."""
    qlo, qhi, _, _ = block_ranges(lq, lk, bs, device)
    nb = qlo.shape[0]
    r = torch.arange(nb, device=device)[:, None]
    c = torch.arange(nb, device=device)[None, :]
    return (qlo <= qhi)[:, None] & (c <= r) & ((c < sinks) | (c > r - local))


# -- the router -------------------------------------------------------------------------------------
class VerticalSlash(ParamsRouter):
    """MInference's vertical-slash pattern per head, estimated from the last ``last_q`` queries, executed as a
    block mask at ``block_size`` granularity (see the module docstring: a coarser superset of MInference's
    token pattern; the token-level kernel is not built).

    ``vertical``: key columns kept per head (MInference's ``vertical_size``), the first ``sink_tokens`` included;
    ``slash``: diagonals kept per head (``slash_size``), the ``local_tokens`` nearest ones (offsets 0 ..
    ``local_tokens - 1``) included. ``last_q``: probe queries (MInference: 64). Causal.

    ``indices(q, k)`` returns the token-level choice (kept columns, kept diagonals) for inspection.
    """

    causal = True

    def __init__(self, vertical: int, slash: int, block_size: int = 64, last_q: int = 64, sink_tokens: int = 30,
                 local_tokens: int = 100):
        self.vertical = check_int("VerticalSlash vertical", vertical, 1)
        self.slash = check_int("VerticalSlash slash", slash, 1)
        self.block_size = check_int("VerticalSlash block_size", block_size, 1)
        self.last_q = check_int("VerticalSlash last_q", last_q, 1)
        self.sink_tokens = check_int("VerticalSlash sink_tokens", sink_tokens, 0)
        self.local_tokens = check_int("VerticalSlash local_tokens", local_tokens, 0)

    def _params(self) -> dict:
        return dict(vertical=self.vertical, slash=self.slash, block_size=self.block_size, last_q=self.last_q,
                    sink_tokens=self.sink_tokens, local_tokens=self.local_tokens)


    def indices(self, q: torch.Tensor, k: torch.Tensor):
        """The token-level choice: ``(columns, diagonals)``, each (B, Hq, Lk) bool -- kept key columns, and kept
        offsets ``o = query position - key position`` (index ``o``)."""
        check_qk(q, k, type(self).__name__)
        with torch.no_grad():
            return self._indices(q.detach(), k.detach())

    def _indices(self, q, k):
        lk = k.shape[2]
        p = probe_attention(q, k, self.last_q)
        ar = torch.arange(lk, device=q.device)
        cols = top_set(column_mass(p), self.vertical, ar < self.sink_tokens)
        diags = top_set(diagonal_mass(p), self.slash, ar < self.local_tokens)
        return cols, diags

    def _route(self, q, k):
        cols, diags = self._indices(q, k)
        lq = q.shape[2]
        return columns_to_blocks(cols, lq, self.block_size) | diagonals_to_blocks(diags, lq, self.block_size)
