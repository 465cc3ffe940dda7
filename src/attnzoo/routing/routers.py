"""Training-free block routers: `TopKBlocks`, `LongHeads`, `Landmark`.

All three score every (query block, key block) pair from a cheap summary of the block -- O(nb^2 * D)
work per head instead of O(N^2 * D) -- and keep, per query block, the best key blocks (`select_blocks`:
top-k, or for `TopKBlocks` also the smallest set reaching a cumulative estimated mass), plus blocks that are
always kept (the first ``sinks`` blocks and the ``local`` blocks at the diagonal). With ``causal=True`` only
blocks at or left of the diagonal are candidates, and the attention itself is token-causal. The query side
is always the mean of the block's queries (per query head); they differ in how a key block is summarised:

- `TopKBlocks`: mean of the keys (MoBA, BiFormer's region routing), or ``pooling="maxmin"``: per-dimension
  max and min of the keys, scored as ``sum_d max(q_d kmax_d, q_d kmin_d)`` -- the dot product of the
  concatenations ``[q+, q-] . [kmax, kmin]`` (q+ = max(q, 0), q- = min(q, 0)), an upper bound of the
  mean query's score with any key of the block (Quest; SeerAttention's max/min pooled keys).
- `LongHeads`: a chunk representation from its keys: the keys weighted by their softmax similarity
  to the chunk's mean key, ``c = sum_j softmax_j(k_j . k_mean / sqrt(D)) k_j`` (LongHeads' attention-weighted
  chunk summary), with the first and local chunks kept.
- `Landmark`: one representative key per block (``representative="maxnorm"``: the key of largest L2 norm, the
  one that dominates dot products; ``"mean"``: the mean key) -- a training-free stand-in for Landmark
  Attention's learned landmark tokens.

Not differentiated: the selection is a discrete decision. SeerAttention's learnable gate (linear maps on the
pooled q and k distilled from block-pooled true attention) is `attnzoo.routing.seer.SeerRouter`.
"""
from __future__ import annotations

import torch

from .base import (ParamsRouter, acc_dtype, blocked, check_bool, check_choice, check_fraction, check_int,
                   group_scores, num_blocks, pool, select_blocks)


class _BlockRouter(ParamsRouter):
    """Shared by the routers here: mean-pooled queries, a key-block summary (``_key_repr``), selection."""

    top_k = None
    threshold = None


    def _scores(self, q, k, nb):
        """Block scores (B, Hq, nb, nb) float32, scaled by 1/sqrt(D)."""
        qm = pool(q, self.block_size, nb, k.shape[2] - q.shape[2], "mean") * q.shape[-1] ** -0.5  # (B, H, nb, D):
        return group_scores(qm, self._key_repr(k, nb))            # scaled before the product, not the grid after

    def _key_repr(self, k, nb):
        raise NotImplementedError

    def _has_q(self, q, k, nb):
        lq, lk, bs = q.shape[2], k.shape[2], self.block_size
        return torch.arange(nb, device=q.device) >= (lk - lq) // bs

    def _route(self, q, k):
        nb = num_blocks(k.shape[2], self.block_size)
        return select_blocks(self._scores(q, k, nb), self._has_q(q, k, nb), causal=self.causal,
                             sinks=self.sinks, local=self.local, top_k=self.top_k, threshold=self.threshold)


class TopKBlocks(_BlockRouter):
    """Top-k key blocks per query block from pooled q and pooled k (MoBA / BiFormer / training-free
    SeerAttention), or the smallest set of blocks reaching the cumulative estimated mass ``threshold``.

    ``block_size``: tokens per block (query and key). Exactly one of ``top_k`` (blocks chosen per query block
    beyond the forced ones) and ``threshold`` (in (0, 1]: the block softmax of the scores over the allowed
    blocks, forced blocks counted first, then blocks by decreasing score until the mass reaches it).
    ``pooling``: ``"mean"`` or ``"maxmin"`` (see the module docstring). ``sinks``: the first blocks always kept;
    ``local``: the blocks at (and left of, when causal) the diagonal always kept. ``causal``: token-causal
    attention and only blocks at or left of the diagonal.
    """

    def __init__(self, block_size: int = 64, top_k=None, threshold=None, pooling: str = "mean", sinks: int = 1,
                 local: int = 1, causal: bool = True):
        self.block_size = check_int("TopKBlocks block_size", block_size, 1)
        if (top_k is None) == (threshold is None):
            raise ValueError("TopKBlocks: give exactly one of top_k (blocks per query block) and threshold "
                             f"(cumulative mass in (0, 1]), got top_k={top_k!r}, threshold={threshold!r}")
        self.top_k = None if top_k is None else check_int("TopKBlocks top_k", top_k, 1)
        self.threshold = None if threshold is None else check_fraction("TopKBlocks threshold", threshold)
        self.pooling = check_choice("TopKBlocks pooling", pooling, ("mean", "maxmin"))
        self.sinks = check_int("TopKBlocks sinks", sinks, 0)
        self.local = check_int("TopKBlocks local", local, 0)
        self.causal = check_bool("TopKBlocks causal", causal)

    def _params(self):
        return dict(block_size=self.block_size, top_k=self.top_k, threshold=self.threshold, pooling=self.pooling,
                    sinks=self.sinks, local=self.local, causal=self.causal)

    def _scores(self, q, k, nb):
        if self.pooling == "mean":
            return super()._scores(q, k, nb)
        bs = self.block_size
        qm = pool(q, bs, nb, k.shape[2] - q.shape[2], "mean") * q.shape[-1] ** -0.5
        kmax, kmin = pool(k, bs, nb, 0, "maxmin")
        # one product of the concatenations [q+, q-] . [kmax, kmin] instead of two grids and their sum
        return group_scores(torch.cat([qm.clamp(min=0), qm.clamp(max=0)], -1), torch.cat([kmax, kmin], -1))

    def _key_repr(self, k, nb):
        return pool(k, self.block_size, nb, 0, "mean")


class LongHeads(_BlockRouter):
    """LongHeads: per head, each query chunk attends to the ``top_k`` chunks most similar to it, plus the
    first ``first`` chunks and the ``local`` chunks at the diagonal (training-free).

    Similarity: mean query of the chunk against a chunk representation built from the chunk's keys, the
    keys weighted by the softmax of their similarity to the chunk's mean key (see the module docstring).
    """

    def __init__(self, chunk_size: int, top_k: int, first: int = 1, local: int = 1, causal: bool = True):
        self.block_size = check_int("LongHeads chunk_size", chunk_size, 1)
        self.top_k = check_int("LongHeads top_k", top_k, 1)
        self.sinks = check_int("LongHeads first", first, 0)
        self.local = check_int("LongHeads local", local, 0)
        self.causal = check_bool("LongHeads causal", causal)

    @property
    def chunk_size(self) -> int:
        return self.block_size

    def _params(self):
        return dict(chunk_size=self.block_size, top_k=self.top_k, first=self.sinks, local=self.local,
                    causal=self.causal)

    def _key_repr(self, k, nb):
        bs = self.block_size
        km = pool(k, bs, nb, 0, "mean")                                # (B, Hkv, nb, D)
        kb, valid = blocked(k, bs, nb, 0)                              # (B, Hkv, nb, bs, D)
        kb = kb.to(km.dtype)
        w = torch.matmul(kb, km.unsqueeze(-1)).squeeze(-1) * k.shape[-1] ** -0.5   # (B, Hkv, nb, bs)
        w = torch.softmax(w.masked_fill(~valid, float("-inf")), dim=-1)
        return torch.matmul(w.unsqueeze(-2), kb).squeeze(-2)


class Landmark(_BlockRouter):
    """Landmark routing: one representative key per block, the ``top_k`` blocks whose landmark scores best
    against the block's mean query, plus ``sinks`` first and ``local`` diagonal blocks (training-free).

    ``representative``: ``"maxnorm"`` (default; the key of largest L2 norm in the block) or ``"mean"``.
    """

    def __init__(self, block_size: int, top_k: int, representative: str = "maxnorm", sinks: int = 1,
                 local: int = 1, causal: bool = True):
        self.block_size = check_int("Landmark block_size", block_size, 1)
        self.top_k = check_int("Landmark top_k", top_k, 1)
        self.representative = check_choice("Landmark representative", representative, ("maxnorm", "mean"))
        self.sinks = check_int("Landmark sinks", sinks, 0)
        self.local = check_int("Landmark local", local, 0)
        self.causal = check_bool("Landmark causal", causal)

    def _params(self):
        return dict(block_size=self.block_size, top_k=self.top_k, representative=self.representative,
                    sinks=self.sinks, local=self.local, causal=self.causal)

    def _key_repr(self, k, nb):
        bs = self.block_size
        if self.representative == "mean":
            return pool(k, bs, nb, 0, "mean")
        kb, valid = blocked(k, bs, nb, 0)                              # (B, Hkv, nb, bs, D)
        norms = torch.linalg.vector_norm(kb, dim=-1, dtype=acc_dtype(kb.dtype)).masked_fill(~valid, -1.0)  # pads never win
        idx = norms.argmax(-1)                                         # (B, Hkv, nb)
        rep = kb.gather(3, idx[..., None, None].expand(*idx.shape, 1, kb.shape[-1])).squeeze(3)
        return rep.to(acc_dtype(rep.dtype))
