"""`HiP`: hierarchical top-k pruning of key blocks (HiP Attention, Lee et al. 2024), training-free.

HiP estimates the top-k keys of a query without scoring them all: it cuts the keys into ``k`` groups, splits
every group in two, scores each half by one *representative* key -- the key at the half's centre, relying on
the "attention locality" of trained models (neighbouring keys score alike) -- keeps the best ``k`` halves,
and repeats until every kept group is a single unit. That is ``log2(T / k)`` levels of ``2k`` scores: an
O(T log T) mask search (O(T k log T) work for the whole sequence) instead of the O(T^2) of exact top-k.

Here the unit is a key block and the query side is one query block, summarised by its mean query (as in the
other routers; HiP's block approximation). Per (batch, query head, query block ``r``):

1. Candidates: the key blocks that are allowed (causal: ``c <= r``; rows without queries have none) and
   not forced (forced = the first ``sinks`` blocks and the ``local`` blocks at the diagonal, always kept).
   They are numbered ``0 .. n_r - 1`` left to right -- causal: a contiguous range; non-causal: the local
   window is cut out -- and the search runs on that numbering ("virtual blocks").
2. Start: ``top_k`` groups dividing ``[0, n_r)`` evenly (group ``j`` = ``[j n_r // K, (j+1) n_r // K)``;
   with ``n_r < K`` some are empty and the others are single blocks).
3. Each level: every group ``[a, b)`` splits into ``[a, m)`` and ``[m, b)`` with ``m = a + ceil((b-a)/2)``
   (a single block stays whole; its other half is empty). A non-empty half ``[a, b)`` of ``n`` blocks is
   scored by the key at its centre token, ``a * bs + (n * bs) // 2`` in virtual token positions (for one
   block: the key in the middle of that block; clamped to the last key for a ragged last block), against
   the mean query, scaled by 1/sqrt(D). The best ``top_k`` non-empty halves are kept (empty halves score
   -inf and are never kept). The number of levels is ``ceil(log2(ceil(nb / K)))``, after which every kept
   group is one block.
4. Mask: the blocks of the kept groups, plus the forced blocks.

So every row selects exactly ``min(top_k, n_r)`` candidate blocks, and every level keeps exactly
``min(top_k, n_r)`` disjoint groups. Vectorised over (batch, head, query block); the only Python loop runs
over the levels. Each level gathers ``2 * top_k`` representative keys per query block: O(nb * K * D) work per
head and level, never nb x nb scores. The selection is not differentiated; gradients reach q, k, v through
the sparse attention.

Choice (documented deviation): HiP's representative is the centre *token* of a branch at every level; we
keep that, so at the last level a block is judged by its middle key. ``representative="mean"`` scores a
half instead by the mean key of the block holding its centre (steadier on untrained/noisy keys, costs one
block pooling).
"""
from __future__ import annotations

import math

import torch

from .base import ParamsRouter, check_bool, check_choice, check_int, num_blocks, pool


class HiP(ParamsRouter):
    """Hierarchical top-k pruning (HiP): per query block, ``top_k`` key blocks found by repeatedly halving
    groups and keeping the best halves by the score of their centre key, plus the first ``sinks`` blocks and
    the ``local`` blocks at (and left of, when causal) the diagonal. See the module docstring.

    ``block_size``: tokens per block (query and key). ``top_k``: candidate blocks selected per query block
    (beyond the forced ones). ``representative``: ``"center"`` (HiP: the key at the half's centre token) or
    ``"mean"`` (the mean key of the block at the half's centre). ``causal``: token-causal attention and only
    blocks at or left of the diagonal.
    """

    def __init__(self, block_size: int = 64, top_k: int = 8, representative: str = "center", sinks: int = 1,
                 local: int = 1, causal: bool = True):
        self.block_size = check_int("HiP block_size", block_size, 1)
        self.top_k = check_int("HiP top_k", top_k, 1)
        self.representative = check_choice("HiP representative", representative, ("center", "mean"))
        self.sinks = check_int("HiP sinks", sinks, 0)
        self.local = check_int("HiP local", local, 0)
        self.causal = check_bool("HiP causal", causal)

    def _params(self) -> dict:
        return dict(block_size=self.block_size, top_k=self.top_k, representative=self.representative,
                    sinks=self.sinks, local=self.local, causal=self.causal)

    # -- per-row candidate numbering ----------------------------------------------------------------
    def _candidates(self, nb: int, first_row: int, device):
        """Per query block row: (n (nb,) candidates, gap_start (nb,), gap_len (nb,)): virtual block v maps to
        real block ``sinks + v``, shifted right by ``gap_len`` once it reaches ``gap_start`` (the local window
        cut out of a non-causal row)."""
        r = torch.arange(nb, device=device)
        s, loc = self.sinks, self.local
        if self.causal:
            n = (r + 1 - loc - s).clamp(min=0)
            gap_start = torch.full_like(r, nb)
            gap_len = torch.zeros_like(r)
        else:
            gap_start = (r - loc + 1).clamp(min=s)
            gap_end = (r + loc).clamp(max=nb)
            gap_len = (gap_end - gap_start).clamp(min=0) if loc > 0 else torch.zeros_like(r)
            n = (nb - s - gap_len).clamp(min=0)
        n = torch.where(r >= first_row, n, 0)
        return n, gap_start, gap_len

    def _route(self, q, k, trace=None):
        """The mask; with ``trace`` a list, the kept groups of every level are appended to it as
        (lo, hi) virtual block ranges (B, Hq, nb, top_k), level 0 first (for tests and analysis)."""
        bs, kk = self.block_size, self.top_k
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        g = hq // hkv
        nb = num_blocks(lk, bs)
        dev = q.device
        first_row = (lk - lq) // bs
        n, gap_start, gap_len = self._candidates(nb, first_row, dev)          # (nb,)
        qm = pool(q, bs, nb, lk - lq, "mean") * d ** -0.5                     # (B, Hq, nb, D), float32/64
        keys = pool(k, bs, nb, 0, "mean") if self.representative == "mean" else k   # (B, Hkv, nb|Lk, D)

        # level 0: top_k groups dividing [0, n) evenly; lo, hi (nb, K) broadcast over (B, Hq)
        j = torch.arange(kk + 1, device=dev)
        edges = (j[None, :] * n[:, None]) // kk                               # (nb, K+1)
        lo = edges[:, :-1].expand(b, hq, nb, kk)
        hi = edges[:, 1:].expand(b, hq, nb, kk)
        levels = max(0, math.ceil(math.log2(max(1, -(-nb // kk)))))
        if trace is not None:
            trace.append((lo, hi))
        for _ in range(levels):
            size = hi - lo
            mid = lo + (size + 1) // 2
            clo = torch.cat((lo, mid), -1)                                    # (B, Hq, nb, 2K)
            chi = torch.cat((mid, hi), -1)
            score = self._rep_scores(qm, keys, clo, chi - clo, gap_start, gap_len, g, lk)
            score = score.masked_fill(chi <= clo, float("-inf"))
            idx = score.topk(kk, dim=-1).indices
            lo, hi = clo.gather(-1, idx), chi.gather(-1, idx)
            if trace is not None:
                trace.append((lo, hi))
        # kept non-empty groups are single blocks; empty ones go to a spare column that is dropped
        real = torch.where(hi > lo, self._to_real(lo, gap_start, gap_len), nb)
        mask = torch.zeros(b, hq, nb, nb + 1, dtype=torch.bool, device=dev)
        mask.scatter_(-1, real, True)
        return mask[..., :nb] | self._forced(nb, first_row, dev)

    def _to_real(self, v, gap_start, gap_len):
        """Virtual block numbers (B, H, nb, X) -> real key block numbers."""
        real = self.sinks + v
        return real + (real >= gap_start[:, None]) * gap_len[:, None]

    def _rep_scores(self, qm, keys, lo, size, gap_start, gap_len, g, lk):
        """Scores (B, Hq, nb, X) of the halves [lo, lo + size) by their representative key."""
        bs = self.block_size
        nb = qm.shape[2]
        vblock = lo + size // 2
        block = self._to_real(vblock, gap_start, gap_len).clamp(max=nb - 1)
        if self.representative == "mean":
            pos = block
        else:
            pos = (block * bs + (size % 2) * (bs // 2)).clamp(max=lk - 1)
        b, hq, _, x = pos.shape
        hkv, dim = keys.shape[1], keys.shape[-1]
        # GQA: the query heads of one kv head read that kv head's keys
        flat = pos.reshape(b, hkv, g * nb * x)
        rep = keys.gather(2, flat[..., None].expand(b, hkv, g * nb * x, dim))
        rep = rep.reshape(b, hq, nb, x, dim).to(qm.dtype)
        return torch.matmul(rep, qm.unsqueeze(-1)).squeeze(-1)

    def _forced(self, nb, first_row, dev):
        r = torch.arange(nb, device=dev)[:, None]
        c = torch.arange(nb, device=dev)[None, :]
        allowed = (r >= first_row).expand(nb, nb)
        if self.causal:
            allowed = allowed & (c <= r)
            near = (c <= r) & (c > r - self.local)
        else:
            near = (c - r).abs() < self.local
        return allowed & ((c < self.sinks) | near)
