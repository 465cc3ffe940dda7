"""`KMeansRouting`: the Routing Transformer's online k-means routing (Roy et al. 2021) as a block router.

Per query head, ``num_clusters`` centroids on the unit sphere are shared by queries and keys (a buffer of
shape (H, C, D); under GQA the keys of kv head ``h // G`` are clustered with query head ``h``'s centroids).
Tokens are compared with the centroids after L2 normalisation (cosine similarity; the paper layer-norms q
and k before routing, we only project them to the sphere for clustering -- the attention itself uses the
raw q, k).

Balanced clusters (as in the paper): cluster ``c`` takes the ``ceil(Lq / C)`` queries and the ``ceil(Lk / C)``
keys most similar to its centroid, so every cluster has the same size; a token may belong to several
clusters or to none. (With very few queries, e.g. decoding one token, every cluster takes that query and the
routing becomes nearly dense: balanced clustering is a prefill/training device.)

From tokens to blocks: per cluster, the *block histograms* ``hq[r, c]`` (queries of query block ``r`` in
cluster ``c``) and ``hk[s, c]`` (keys of key block ``s`` in cluster ``c``). Their overlap
``O[r, s] = sum_c hq[r, c] * hk[s, c]`` counts the (query, key) pairs of the two blocks that share a cluster
-- the pairs the token-level Routing Transformer would compute there. A query block attends to the key
blocks with ``O > 0`` (``top_k=None``: the block cover of the token-level routing, a superset of it), or
with ``top_k`` to the ``top_k`` blocks of largest overlap among those (ties: the later block, i.e. the
nearer one when causal), always plus the first ``sinks`` blocks and the ``local`` blocks at the diagonal;
with ``causal`` only blocks at or left of the diagonal, and the attention is token-causal.

Training: the centroid update is part of training, not of autograd. In ``train()`` mode every call
(``router(q, k)``, and so ``attnzoo.attention(q, k, v, pattern=router)``) routes with the current centroids
and then updates them; ``update(q, k)`` does the update alone. Online k-means (the paper's update): every
normalised query and key is assigned to its nearest centroid (plain argmax, not the balanced sets), and
``mu_c <- decay * mu_c + (1 - decay) * mean of the assigned points`` (queries and keys pooled, batch
included; clusters without points keep their centroid), then ``mu_c`` is projected back to the unit sphere.
The centroids are a buffer (saved in ``state_dict``, moved by ``.to``), not a parameter: the attention gets
gradients through q, k, v only; the routing decision is not differentiated.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Router, acc_dtype, check_bool, check_int, check_qk, num_blocks, select_blocks


def _check_decay(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"KMeansRouting decay must be a number in [0, 1), got {type(value).__name__}: {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"KMeansRouting decay must be in [0, 1), got {value}")
    return float(value)


class KMeansRouting(Router, nn.Module):
    """Routing Transformer routing: online k-means centroids shared by queries and keys, balanced clusters,
    a query block attends to the key blocks sharing a cluster with it (see the module docstring).

    ``num_heads``: query heads of the calls (centroids are per query head); ``head_dim``: D;
    ``num_clusters``: centroids per head; ``block_size``: tokens per block (query and key); ``top_k``: at most
    this many key blocks of largest cluster overlap per query block (None: all that share a cluster);
    ``decay``: the EMA factor of the centroid update, in [0, 1); ``sinks``: the first blocks always kept;
    ``local``: the blocks at (and left of, when causal) the diagonal always kept; ``causal``: token-causal
    attention and only blocks at or left of the diagonal. Centroids start as random unit vectors (from
    torch's global generator: seed it for reproducibility).
    """

    centroids: torch.Tensor

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int, block_size: int = 64,
                 top_k: Optional[int] = None, decay: float = 0.999, sinks: int = 0, local: int = 1,
                 causal: bool = True):
        nn.Module.__init__(self)
        self.num_heads = check_int("KMeansRouting num_heads", num_heads, 1)
        self.head_dim = check_int("KMeansRouting head_dim", head_dim, 1)
        self.num_clusters = check_int("KMeansRouting num_clusters", num_clusters, 1)
        self.block_size = check_int("KMeansRouting block_size", block_size, 1)
        self.top_k = None if top_k is None else check_int("KMeansRouting top_k", top_k, 1)
        self.decay = _check_decay(decay)
        self.sinks = check_int("KMeansRouting sinks", sinks, 0)
        self.local = check_int("KMeansRouting local", local, 0)
        self.causal = check_bool("KMeansRouting causal", causal)
        mu = torch.randn(num_heads, num_clusters, head_dim)
        self.register_buffer("centroids", mu / mu.norm(dim=-1, keepdim=True))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_clusters={self.num_clusters}, "
                f"block_size={self.block_size}, top_k={self.top_k}, decay={self.decay}, sinks={self.sinks}, "
                f"local={self.local}, causal={self.causal}")

    # -- checks and similarities --------------------------------------------------------------------
    def _check(self, q, k, who):
        check_qk(q, k, who)
        if q.shape[1] != self.num_heads:
            raise ValueError(f"{who}: q has {q.shape[1]} heads but the router was built with num_heads="
                             f"{self.num_heads}")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"{who}: q has head_dim {q.shape[-1]} but the router was built with head_dim="
                             f"{self.head_dim}")
        if self.centroids.device != q.device:
            raise ValueError(f"{who}: the centroids are on {self.centroids.device} but q is on {q.device}; move "
                             f"the router with .to({str(q.device)!r})")

    def _similarities(self, q, k):
        """Cosine similarities to the centroids: (B, H, C, Lq) for q, (B, H, C, Lk) for k (per query head)."""
        acc = acc_dtype(q.dtype)
        mu = self.centroids.to(acc)                                          # (H, C, D)
        qn = nn.functional.normalize(q.to(acc), dim=-1)
        kn = nn.functional.normalize(k.to(acc), dim=-1)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        sq = torch.matmul(mu, qn.transpose(-1, -2))                          # (B, H, C, Lq)
        sk = torch.matmul(mu.view(1, hkv, hq // hkv * self.num_clusters, d), kn.transpose(-1, -2))
        return sq, sk.view(b, hq, self.num_clusters, lk), qn, kn

    # -- routing ------------------------------------------------------------------------------------
    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The block mask (B, Hq, nb, nb) bool; in training mode the centroids are updated afterwards."""
        self._check(q, k, "KMeansRouting")
        with torch.no_grad():
            sq, sk, qn, kn = self._similarities(q.detach(), k.detach())
            mask = self._mask(sq, sk, q.shape[2], k.shape[2])
            if self.training:
                self._update(sq, sk, qn, kn)
        return mask

    def _route(self, q, k):
        sq, sk, _, _ = self._similarities(q, k)
        return self._mask(sq, sk, q.shape[2], k.shape[2])

    def members(self, sim: torch.Tensor) -> torch.Tensor:
        """Balanced cluster membership from similarities (B, H, C, L): (B, H, C, L) bool, cluster ``c`` holding
        its ``ceil(L / C)`` most similar tokens."""
        n = sim.shape[-1]
        w = -(-n // self.num_clusters)
        idx = sim.topk(min(w, n), dim=-1).indices
        return torch.zeros(sim.shape, dtype=torch.bool, device=sim.device).scatter_(-1, idx, True)

    def _histogram(self, member, nb, offset):
        """Tokens of each block in each cluster: member (B, H, C, L) at positions offset.. -> (B, H, nb, C)."""
        bs = self.block_size
        b, h, c, n = member.shape
        x = nn.functional.pad(member.to(torch.float32), (offset, nb * bs - offset - n))
        return x.view(b, h, c, nb, bs).sum(-1).transpose(-1, -2)

    def _mask(self, sq, sk, lq, lk):
        bs = self.block_size
        nb = num_blocks(lk, bs)
        hq = self._histogram(self.members(sq), nb, lk - lq)                  # (B, H, nb, C)
        hk = self._histogram(self.members(sk), nb, 0)
        overlap = torch.matmul(hq, hk.transpose(-1, -2)).double()           # (B, H, nb, nb) pair counts
        col = torch.arange(nb, device=sq.device, dtype=torch.float64)
        scores = torch.where(overlap > 0, overlap + col / (2 * nb), float("-inf"))   # ties: later block wins
        has_q = torch.arange(nb, device=sq.device) >= (lk - lq) // bs
        return select_blocks(scores, has_q, causal=self.causal, sinks=self.sinks, local=self.local,
                             top_k=nb if self.top_k is None else self.top_k)

    # -- online k-means -----------------------------------------------------------------------------
    def update(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One online k-means step of the centroids from q (B, H, Lq, D) and k (B, Hkv, Lk, D) (see the module
        docstring). Runs in any mode; not differentiated."""
        self._check(q, k, "KMeansRouting.update")
        with torch.no_grad():
            sq, sk, qn, kn = self._similarities(q.detach(), k.detach())
            self._update(sq, sk, qn, kn)

    def _update(self, sq, sk, qn, kn):
        b, h, c, lq = sq.shape
        d = qn.shape[-1]
        g = h // kn.shape[1]
        heads = torch.arange(h, device=sq.device)[None, :, None] * c
        sums = torch.zeros(h * c, d, dtype=qn.dtype, device=qn.device)
        counts = torch.zeros(h * c, dtype=qn.dtype, device=qn.device)
        kx = kn.repeat_interleave(g, dim=1) if g > 1 else kn               # (B, H, Lk, D): keys per query head
        for sim, x in ((sq, qn), (sk, kx)):
            idx = (sim.argmax(2) + heads).reshape(-1)                       # (B * H * L,) flat cluster ids
            sums.index_add_(0, idx, x.reshape(-1, d))
            counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
        mu = self.centroids.to(qn.dtype).reshape(h * c, d)
        mean = sums / counts.clamp(min=1)[:, None]
        new = torch.where(counts[:, None] > 0, self.decay * mu + (1 - self.decay) * mean, mu)
        new = nn.functional.normalize(new, dim=-1)
        self.centroids.copy_(new.view(h, c, d).to(self.centroids.dtype))
