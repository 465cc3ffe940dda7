"""Multi-head latent attention (MLA, DeepSeek-V2/V3) and the TransMLA conversion of GQA layers.

    mla = MLA(dim=4096, num_heads=32, kv_rank=512, rope_dim=64)     # nope/v head dims default to 128
    y = mla(x)                                                      # x, y: (batch, length, dim)
    cache = mla.new_cache(); mla(prefix, cache); y_next = mla(x_next, cache)   # caches 512 + 64 per token
    mla2 = to_mla(trained_gqa_attention)                            # the same function, as an MLA
    mla3 = to_mla(trained_gqa_attention, rank=256, calib_x=h)       # compressed (PCA on activations h)

The layer (names as in the DeepSeek-V2 paper, section 2.1)::

    c_kv   = norm(W_dkv x)                    (kv_rank)        cached
    k_rope = RoPE(W_kr x)                     (rope_dim)       cached, one for all heads
    k_h    = [W_uk_h c_kv ; k_rope]           v_h = W_uv_h c_kv        (nope_head_dim + rope_dim), v_head_dim
    c_q    = norm(W_dq x)  (q_rank; or x when q_rank is None)
    q_h    = [W_uq_h c_q ; RoPE(W_qr_h c_q)]
    y      = W_o [softmax(q_h . k_h * scale) v_h]_h            scale = (nope_head_dim + rope_dim) ** -0.5

Two ways to compute the same thing (``absorb``):

* naive: up-project keys and values of every cached token for every head, then ``attnzoo.attention``;
* absorbed: fold W_uk into the queries (``q_lat_h = W_uk_h^T q_nope_h``, width kv_rank), attend in the
  latent space with ONE key/value head shared by all query heads (MQA): keys ``[c_kv ; k_rope]`` (width
  kv_rank + rope_dim), values ``c_kv``, then apply W_uv per head and W_o. It reads only the cache, once.
  W_uv is not folded into W_o (that matrix would be num_heads * kv_rank wide, 4x the FLOPs of W_uv then
  W_o at DeepSeek's widths).

The rotary embedding rotates pairs ``(x[p], x[p + rope_dim / 2])`` ("rotate half", as `Attention`) by
``pos * inv_freq[p]``; ``inv_freq`` defaults to ``rope_base ** (-2p / rope_dim)`` and may be any list of
``rope_dim / 2`` frequencies (a converted layer repeats the frequencies of the GQA head).

`to_mla` converts a trained `Attention` (MHA/GQA/MQA) into an `MLA` (TransMLA, Meng et al. 2025,
arXiv:2502.07864): the keys of all kv heads become one roped key shared by all query heads (a per-head
query projection reads its own group), the values become the latent; exact at full rank. To compress,
RoPE is first concentrated by RoRoPE (per frequency, an orthogonal mixing of the kv heads from PCA: RoPE
acts on every kv head with the same angle, so the mixing commutes with it and keeps every score); the
strongest components keep RoPE, the others lose it (the one approximation besides the latent's rank) and
join the values in a PCA-compressed latent (keys and values balanced first, "BKV"). `to_mla_error_curve`
gives the output error per rank.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..api import attention
from ..patterns import Causal, Full, Pattern
from .attention import Attention, check_positive_int, kv_cache_len

__all__ = ["MLA", "MLACache", "LatentRotary", "to_mla", "to_mla_error_curve"]


# --------------------------------------------------------------------------------------------------
# Rotary embedding with one frequency per pair
# --------------------------------------------------------------------------------------------------
class LatentRotary(nn.Module):
    """RoPE over ``width = 2 * len(inv_freq)`` dims: pair ``(x[p], x[p + width/2])`` turns by ``pos * inv_freq[p]``.

    The frequencies are kept in float64 on the side (not a buffer, so ``.half()`` cannot round them) and
    saved in the state dict as extra state. Angles are computed in float64; the rotation in float64 for
    float64 inputs, float32 otherwise. ``forward(x, positions)`` takes ``(..., length, width)``.
    """

    def __init__(self, inv_freq):
        super().__init__()
        self._set(inv_freq)

    def _set(self, inv_freq):
        f = torch.as_tensor(inv_freq, dtype=torch.float64).detach().cpu().reshape(-1).clone()
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("rope_inv_freq must hold finite, non-negative frequencies")
        self.inv_freq, self._on = f, {}

    @property
    def width(self) -> int:
        return 2 * self.inv_freq.numel()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return x
        dev = positions.device
        if dev not in self._on:
            self._on[dev] = self.inv_freq.to(dev)
        ang = positions.to(torch.float64)[:, None] * self._on[dev][None, :]  # (T, width/2)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = ang.cos().to(cd), ang.sin().to(cd)
        xf = x.to(cd)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def get_extra_state(self):
        return {"inv_freq": self.inv_freq.tolist()}

    def set_extra_state(self, state):
        self._set(state["inv_freq"])

    def extra_repr(self):
        return f"width={self.width}"


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
class MLACache:
    """What an `MLA` layer keeps per token: the latent ``c_kv`` and the roped shared key ``k_rope``.

    Both live side by side in one buffer ``(batch, capacity, kv_rank + rope_dim)``: ``latent`` is the
    filled part ``(batch, seen, kv_rank + rope_dim)``, ``c_kv`` and ``k_rope`` are views of it. Appends
    write in place into spare capacity (grown by doubling), except when autograd is recording through the
    cache (then the buffer is re-concatenated, out of place). ``seen`` counts the tokens: the next token's
    position. Lowering ``seen`` rolls the cache back.
    """

    def __init__(self):
        self.buf: Optional[torch.Tensor] = None
        self.kv_rank: Optional[int] = None
        self.seen = 0

    @property
    def latent(self) -> Optional[torch.Tensor]:
        return None if self.buf is None else self.buf[:, :self.seen]

    @property
    def c_kv(self) -> Optional[torch.Tensor]:
        return None if self.buf is None else self.latent[..., :self.kv_rank]

    @property
    def k_rope(self) -> Optional[torch.Tensor]:
        return None if self.buf is None else self.latent[..., self.kv_rank:]

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Add ``c_kv (B, T, kv_rank)`` and ``k_rope (B, T, rope_dim)``; returns the whole ``latent``."""
        if c_kv.dim() != 3 or k_rope.dim() != 3 or c_kv.shape[:2] != k_rope.shape[:2]:
            raise ValueError(f"MLACache.append takes c_kv (B, T, kv_rank) and k_rope (B, T, rope_dim), got "
                             f"{tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        new = torch.cat([c_kv, k_rope], dim=-1)
        b, t, w = new.shape
        if self.buf is not None:
            if (b, w, self.kv_rank) != (self.buf.shape[0], self.buf.shape[2], c_kv.shape[-1]):
                raise ValueError(f"cache holds latents of shape {tuple(self.latent.shape)} (kv_rank {self.kv_rank}); "
                                 f"cannot append {tuple(new.shape)} (kv_rank {c_kv.shape[-1]}; another batch size "
                                 "or layer?)")
            if new.dtype != self.buf.dtype or new.device != self.buf.device:
                raise ValueError(f"cache holds {self.buf.dtype} on {self.buf.device}; cannot append {new.dtype} "
                                 f"on {new.device}")
        grad = torch.is_grad_enabled() and (new.requires_grad or (self.buf is not None and self.buf.requires_grad))
        if self.buf is None or grad:
            self.buf = new if self.buf is None else torch.cat([self.latent, new], dim=1)
        else:
            end = self.seen + t
            if end > self.buf.shape[1]:
                grown = new.new_empty(b, max(end, 2 * self.buf.shape[1]), w)
                grown[:, :self.seen] = self.latent
                self.buf = grown
            self.buf[:, self.seen:end] = new
        self.kv_rank = c_kv.shape[-1]
        self.seen += t
        return self.latent

    def __repr__(self):
        shape = None if self.buf is None else tuple(self.latent.shape)
        return f"MLACache(seen={self.seen}, latent={shape}, kv_rank={self.kv_rank})"


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------
def _nonneg_int(owner: str, name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{owner} {name} must be a non-negative integer, got {n!r}")
    return n


class MLA(nn.Module):
    """Multi-head latent attention over ``pattern`` through ``attnzoo.attention``.

    Args:
        dim: width of the input and output.
        num_heads: query heads (all read the one latent).
        kv_rank: width of the cached latent ``c_kv`` (default ``min(4 * dim // num_heads, dim // 2)``).
        q_rank: width of the query latent (low-rank queries, DeepSeek-V2); None projects x directly.
        nope_head_dim: per-head key/query width without RoPE (default ``dim // num_heads``; may be 0).
        rope_dim: width of the shared roped key and of each head's roped query part (default
            ``dim // num_heads // 2``, even; 0 means no positions).
        v_head_dim: per-head value width (default ``dim // num_heads``).
        pattern: an attnzoo ``Pattern`` (default ``Causal()``).
        bias: biases on the projections that read x (W_dq or W_q, W_dkv, W_kr) and on W_o.
        latent_norm: RMSNorm on ``c_kv`` (and on the query latent when ``q_rank`` is set), as DeepSeek does.
        absorb: True computes in the latent space (W_uk absorbed), False up-projects K and V, None picks
            the absorbed path when decoding with a cache and ``T * (2 kv_rank - nope - v) < kv_rank * (nope + v)``
            (the absorbed path then does fewer multiply-adds; ``T`` is the number of new tokens).
        rope_base: RoPE base for the default frequencies.
        rope_inv_freq: ``rope_dim / 2`` explicit frequencies (a converted layer uses this).
        softmax_scale: score scale (default ``(nope_head_dim + rope_dim) ** -0.5``).
        backend: passed to ``attnzoo.attention``.

    ``forward(x, cache=None)``: ``(B, T, dim) -> (B, T, dim)``; with a cache from ``new_cache()`` the
    tokens continue the cached sequence (positions from ``cache.seen``) and the cache grows in place.
    """

    def __init__(self, dim: int, num_heads: int = 1, kv_rank: Optional[int] = None, q_rank: Optional[int] = None,
                 nope_head_dim: Optional[int] = None, rope_dim: Optional[int] = None,
                 v_head_dim: Optional[int] = None, pattern: Optional[Pattern] = None, bias: bool = False, *,
                 latent_norm: bool = True, absorb: Optional[bool] = None, rope_base: float = 10000.0,
                 rope_inv_freq=None, softmax_scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        own = type(self).__name__
        check_positive_int(own, "dim", dim)
        check_positive_int(own, "num_heads", num_heads)
        needs_head = nope_head_dim is None or v_head_dim is None or rope_dim is None or kv_rank is None
        if needs_head and dim % num_heads:
            raise ValueError(f"{own} dim={dim} is not divisible by num_heads={num_heads}; pass kv_rank, "
                             "nope_head_dim, rope_dim and v_head_dim explicitly")
        head = dim // num_heads
        if kv_rank is None:
            kv_rank = max(1, min(4 * head, dim // 2))
        check_positive_int(own, "kv_rank", kv_rank)
        if q_rank is not None:
            check_positive_int(own, "q_rank", q_rank)
        nope_head_dim = head if nope_head_dim is None else _nonneg_int(own, "nope_head_dim", nope_head_dim)
        v_head_dim = head if v_head_dim is None else v_head_dim
        check_positive_int(own, "v_head_dim", v_head_dim)
        if rope_dim is None:
            rope_dim = 2 * len(rope_inv_freq) if rope_inv_freq is not None else max(2, head // 2 // 2 * 2)
        _nonneg_int(own, "rope_dim", rope_dim)
        if rope_dim % 2:
            raise ValueError(f"{own} rope_dim must be even (RoPE turns pairs of dims), got {rope_dim}")
        if nope_head_dim + rope_dim == 0:
            raise ValueError(f"{own} nope_head_dim + rope_dim must be positive (the query/key width), got 0")
        pattern = Causal() if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise TypeError(f"{own} pattern must be an attnzoo Pattern, got {type(pattern).__name__}")
        for name, flag in (("bias", bias), ("latent_norm", latent_norm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{own} {name} must be True or False, got {flag!r}")
        if not isinstance(backend, str):
            raise TypeError(f"{own} backend must be a string, got {type(backend).__name__}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 1:
            raise ValueError(f"{own} rope_base must be a number > 1, got {rope_base!r}")
        if rope_inv_freq is None:
            inv_freq = float(rope_base) ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / max(rope_dim, 1))
        else:
            inv_freq = torch.as_tensor(rope_inv_freq, dtype=torch.float64).reshape(-1)
            if 2 * inv_freq.numel() != rope_dim:
                raise ValueError(f"{own} rope_inv_freq must hold rope_dim / 2 = {rope_dim // 2} frequencies, "
                                 f"got {inv_freq.numel()}")
        if softmax_scale is None:
            softmax_scale = (nope_head_dim + rope_dim) ** -0.5
        elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
              or not math.isfinite(softmax_scale) or softmax_scale <= 0):
            raise ValueError(f"{own} softmax_scale must be a positive finite number or None, got {softmax_scale!r}")

        self.dim, self.num_heads, self.kv_rank, self.q_rank = dim, num_heads, kv_rank, q_rank
        self.nope_head_dim, self.rope_dim, self.v_head_dim = nope_head_dim, rope_dim, v_head_dim
        self.pattern, self.backend, self.softmax_scale = pattern, backend, float(softmax_scale)
        self.absorb = absorb
        qk = nope_head_dim + rope_dim
        if q_rank is None:
            self.q_proj = nn.Linear(dim, num_heads * qk, bias=bias)                   # W_q = [W_uq ; W_qr]
            self.q_down = self.q_norm = self.q_up = None
        else:
            self.q_proj = None
            self.q_down = nn.Linear(dim, q_rank, bias=bias)                            # W_dq
            self.q_norm = nn.RMSNorm(q_rank, eps=1e-6) if latent_norm else nn.Identity()
            self.q_up = nn.Linear(q_rank, num_heads * qk, bias=False)                  # [W_uq ; W_qr]
        self.kv_down = nn.Linear(dim, kv_rank, bias=bias)                              # W_dkv
        self.kv_norm = nn.RMSNorm(kv_rank, eps=1e-6) if latent_norm else nn.Identity()
        self.kr_proj = nn.Linear(dim, rope_dim, bias=bias) if rope_dim else None      # W_kr
        self.k_up = nn.Linear(kv_rank, num_heads * nope_head_dim, bias=False) if nope_head_dim else None  # W_uk
        self.v_up = nn.Linear(kv_rank, num_heads * v_head_dim, bias=False)             # W_uv
        self.o_proj = nn.Linear(num_heads * v_head_dim, dim, bias=bias)                # W_o
        self.rotary = LatentRotary(inv_freq)

    @property
    def absorb(self) -> Optional[bool]:
        return self._absorb

    @absorb.setter
    def absorb(self, value):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{type(self).__name__} absorb must be True, False or None, got {value!r}")
        self._absorb = value

    # the pieces ---------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, cache) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} input must be (batch, length, {self.dim}), got {got}")
        if cache is not None and not isinstance(cache, MLACache):
            raise TypeError(f"{type(self).__name__} cache must come from new_cache() (an MLACache) or be None, "
                            f"got {type(cache).__name__}")

    def positions(self, x: torch.Tensor, cache: Optional[MLACache]) -> torch.Tensor:
        start = 0 if cache is None else cache.seen
        return torch.arange(start, start + x.shape[1], device=x.device)

    def project_q(self, x: torch.Tensor, pos: torch.Tensor):
        """``q_nope (B, H, T, nope_head_dim)`` and roped ``q_rope (B, H, T, rope_dim)``."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_head_dim, self.rope_dim], dim=-1)
        return q_nope, self.rotary(q_rope, pos)

    def project_kv(self, x: torch.Tensor, pos: torch.Tensor):
        """The cached quantities of the new tokens: ``c_kv (B, T, kv_rank)``, roped ``k_rope (B, T, rope_dim)``."""
        c = self.kv_norm(self.kv_down(x))
        kr = self.rotary(self.kr_proj(x), pos) if self.kr_proj is not None else x.new_zeros(*x.shape[:2], 0)
        return c, kr

    def use_absorbed(self, t: int, cache: Optional[MLACache]) -> bool:
        if self._absorb is not None:
            return self._absorb
        if cache is None:
            return False
        r, n, dv = self.kv_rank, self.nope_head_dim, self.v_head_dim
        return t * (2 * r - n - dv) < r * (n + dv)

    def attend_naive(self, q_nope, q_rope, c_all, kr_all) -> torch.Tensor:
        """Up-project K and V of every key for every head, then ``attention``: ``(B, H, T, v_head_dim)``."""
        b, s, _ = c_all.shape
        h = self.num_heads
        v = self.v_up(c_all).view(b, s, h, self.v_head_dim).transpose(1, 2)
        ks, qs = [], []
        if self.nope_head_dim:
            ks.append(self.k_up(c_all).view(b, s, h, self.nope_head_dim).transpose(1, 2))
            qs.append(q_nope)
        if self.rope_dim:
            ks.append(kr_all[:, None].expand(b, h, s, self.rope_dim))
            qs.append(q_rope)
        k, q = torch.cat(ks, -1), torch.cat(qs, -1)
        return attention(q, k, v, pattern=self.pattern, scale=self.softmax_scale, backend=self.backend)

    def attend_absorbed(self, q_nope, q_rope, latent) -> torch.Tensor:
        """Attention in the latent space, one shared key/value head: ``(B, H, T, v_head_dim)``."""
        r, h = self.kv_rank, self.num_heads
        qs = []
        if self.nope_head_dim:
            w_uk = self.k_up.weight.view(h, self.nope_head_dim, r)
            qs.append(torch.matmul(q_nope, w_uk))                      # (B, H, T, kv_rank): q_nope . W_uk
        if self.rope_dim:
            qs.append(q_rope)
        q = torch.cat(qs, -1)
        k = latent if self.nope_head_dim else latent[..., r:]          # [c_kv ; k_rope] (or k_rope alone)
        k, v = k[:, None], latent[:, None, :, :r]                       # (B, 1, S, .): one head for all
        b, _, t, _ = q.shape
        if t == 1 and type(self.pattern) in (Causal, Full):
            # one new token sees every key: fold the heads into the query axis (H query rows over one key
            # head, plain attention: kernels without GQA support then read the latent cache once)
            o = attention(q.transpose(1, 2), k, v, pattern=None, scale=self.softmax_scale,
                          backend=self.backend).transpose(1, 2)
        else:
            o = attention(q, k, v, pattern=self.pattern, scale=self.softmax_scale, backend=self.backend)
        w_uv = self.v_up.weight.view(h, self.v_head_dim, r)
        return torch.matmul(o, w_uv.transpose(1, 2))                    # (B, H, T, v_head_dim)

    def forward(self, x: torch.Tensor, cache: Optional[MLACache] = None) -> torch.Tensor:
        self.check_input(x, cache)
        b, t, _ = x.shape
        pos = self.positions(x, cache)
        q_nope, q_rope = self.project_q(x, pos)
        c, kr = self.project_kv(x, pos)
        if cache is not None:
            latent = cache.append(c, kr)
        else:
            latent = torch.cat([c, kr], dim=-1)
        if self.use_absorbed(t, cache):
            o = self.attend_absorbed(q_nope, q_rope, latent)
        else:
            o = self.attend_naive(q_nope, q_rope, latent[..., :self.kv_rank], latent[..., self.kv_rank:])
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def new_cache(self) -> MLACache:
        """An empty cache for generation: ``y = layer(x_prefix, cache); y_next = layer(x_next, cache)``."""
        return MLACache()

    def kv_cache_values_per_token(self) -> int:
        """Values the cache stores per token for this layer: ``kv_rank + rope_dim``."""
        return self.kv_rank + self.rope_dim

    def state_size(self, seq_len: int) -> int:
        """Floats of the cache per sequence after ``seq_len`` tokens (keys ``pattern`` still needs)."""
        return self.kv_cache_values_per_token() * kv_cache_len(self.pattern, seq_len)

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, kv_rank={self.kv_rank}, q_rank={self.q_rank}, "
                f"nope_head_dim={self.nope_head_dim}, rope_dim={self.rope_dim}, v_head_dim={self.v_head_dim}, "
                f"absorb={self._absorb}, pattern={self.pattern!r}, backend={self.backend!r}")


# --------------------------------------------------------------------------------------------------
# TransMLA: GQA -> MLA
# --------------------------------------------------------------------------------------------------
def _augment(lin: nn.Linear) -> torch.Tensor:
    """``[W | b]`` in float64 on the CPU (b = 0 without a bias): acts on ``[x ; 1]``."""
    w = lin.weight.detach().to("cpu", torch.float64)
    b = lin.bias.detach().to("cpu", torch.float64) if lin.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], dim=1)


def _second_moment(calib_x: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """``E[[x;1][x;1]^T]`` over the calibration tokens, or the identity (weights-only SVD) without them."""
    if calib_x is None:
        return torch.eye(dim + 1, dtype=torch.float64)
    xs = calib_x.detach().to("cpu", torch.float64).reshape(-1, dim)
    xs = torch.cat([xs, xs.new_ones(xs.shape[0], 1)], dim=1)
    return xs.T @ xs / xs.shape[0]


def _top_eig(cov: torch.Tensor):
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
    return lam.flip(0), vec.flip(1)


def _rorope(wk, wq, sigma, G, D, rope_dim, freq_fold, method, base):
    """RoRoPE (TransMLA section 4.2): per group of ``freq_fold`` adjacent RoPE frequencies, a mixing ``M`` of
    the ``fold * G`` (frequency, kv head) rows of the keys that commutes with RoPE (it acts on rows, RoPE
    on the (real, imaginary) columns), with the queries mixed by ``M^-T`` so that ``q . k`` is unchanged.

    method "pca" (the paper): ``M`` orthogonal, the eigenvectors of the key second moment; components
    ranked by key energy. "balanced": ``M`` balances the key and query second moments (both become the
    same diagonal, as in balanced truncation), components ranked by those values, ``sqrt(E k_c^2 E q_c^2)``,
    the typical size of the score term a component carries. Returns key rows (kept, dropped), query
    rows (kept, dropped) over the ``G * D`` stacked key dims, and the kept pairs' frequencies.
    """
    GD, half, dim1 = G * D, D // 2, wk.shape[1]
    H = wq.shape[0]
    rep = H // G
    base_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    if rope_dim == GD:   # keep everything: no mixing, exact; reorder to the rotate-half layout of width GD
        re = torch.tensor([j * D + i for j in range(G) for i in range(half)])
        p = torch.eye(GD, dtype=torch.float64)[torch.cat([re, re + half])]
        return p, p.new_zeros(0, GD), p, p.new_zeros(0, GD), base_freq.repeat(G).tolist()
    wk4 = wk.view(G, 2, half, dim1)                     # [j, a, i]: key dim j*D + a*half + i
    # the query's second moment per head, over its D dims: (H, D, D)
    qcov = torch.einsum("hdx,xy,hey->hde", wq, sigma, wq)
    comps = []                                          # (importance, key row re/im, query row re/im, freq)
    for s in range(0, half, freq_fold):
        freqs = list(range(s, min(half, s + freq_fold)))
        m = len(freqs)
        blk = wk4[:, :, freqs].permute(2, 0, 1, 3).reshape(m * G, 2, dim1)    # rows (i, j)
        ck = sum(blk[:, a] @ sigma @ blk[:, a].T for a in range(2))              # (mG, mG)
        if method == "pca":
            lam, vec = _top_eig(ck)
            mk, mq = vec.T, vec.T                          # rows: components
        else:
            # query second moment over the same rows: head h only fills rows (i, g(h))
            cq = ck.new_zeros(m * G, m * G)
            fi = torch.tensor(freqs)
            for h in range(H):
                g = h // rep
                sub = sum(qcov[h][fi + a * half][:, fi + a * half] for a in range(2))   # (m, m)
                rows = torch.arange(m) * G + g
                cq[rows[:, None], rows[None, :]] += sub
            eps = 1e-12 * float(ck.trace() + cq.trace()) / (m * G) + 1e-300
            ck_r = ck + eps * torch.eye(m * G, dtype=torch.float64)
            cq_r = cq + eps * torch.eye(m * G, dtype=torch.float64)
            lk, vk = torch.linalg.eigh((ck_r + ck_r.T) / 2)
            root = vk * lk.clamp_min(eps).sqrt()          # ck ~ root root^T
            s2, v = _top_eig(root.T @ cq_r @ root)        # = V S^2 V^T
            sv = s2.clamp_min(eps ** 2).sqrt().sqrt()     # S^(1/2)
            mq = (v / sv).T @ root.T                      # M^-T rows: S^(-1/2) V^T root^T
            mk = (v * sv).T @ torch.linalg.pinv(root)     # M rows: S^(1/2) V^T root^-1
            lam = s2.clamp_min(0).sqrt()
        for c in range(m * G):
            rows = []
            for coef in (mk[c], mq[c]):
                u = coef.view(m, G)
                re_, im_ = wk.new_zeros(GD), wk.new_zeros(GD)
                for ii, i in enumerate(freqs):
                    idx = torch.arange(G) * D + i
                    re_[idx] = u[ii]
                    im_[idx + half] = u[ii]
                rows.append((re_, im_))
            w = mk[c].view(m, G).pow(2).sum(1)
            f = float((w * base_freq[freqs]).sum() / w.sum().clamp_min(1e-300))
            comps.append((float(lam[c]), rows[0], rows[1], f))
    order = sorted(range(len(comps)), key=lambda c: -comps[c][0])
    kept, dropped = order[:rope_dim // 2], order[rope_dim // 2:]

    def stack(sel, which):
        if not sel:
            return wk.new_zeros(0, GD)
        return torch.stack([comps[c][which][0] for c in sel] + [comps[c][which][1] for c in sel])

    return (stack(kept, 1), stack(dropped, 1), stack(kept, 2), stack(dropped, 2), [comps[c][3] for c in kept])


def to_mla(gqa_layer: Attention, rank: Optional[int] = None, *, rope_dim: Optional[int] = None,
           calib_x: Optional[torch.Tensor] = None, freq_fold: int = 1, balance_kv: bool = True,
           rorope: str = "pca") -> MLA:
    """An `MLA` computing what the trained `Attention` ``gqa_layer`` computes (TransMLA).

    Args:
        gqa_layer: an `Attention` (MHA, GQA or MQA; RoPE on or off; biases allowed; not QK-norm).
        rank: width of the latent ``c_kv``. None: a lossless latent (the NoPE keys and values, or, when
            that is smaller, a basis of what x can produce); with the default ``rope_dim`` the whole
            conversion is then exact and the cache never larger than GQA's.
        rope_dim: roped key width kept (even, at most ``num_kv_heads * head_dim``). Default: all of it when
            ``rank`` is None (exact), else ``head_dim`` (one head's worth, as TransMLA).
        calib_x: optional inputs ``(..., dim)`` of this layer (hidden states); the PCAs then use their
            statistics (activation-based, better) instead of the weights (as if x were white noise).
        freq_fold: RoRoPE over groups of this many adjacent frequencies (FreqFold); the components of a
            group turn at their loading-weighted mean frequency, an approximation; 1 is exact RoRoPE.
        balance_kv: scale the NoPE keys to the values' energy before their joint PCA (BKV).
        rorope: "pca" (the paper's RoRoPE: orthogonal mixing from the keys' PCA, components ranked by key
            energy) or "balanced" (a non-orthogonal mixing, queries mixed by its inverse transpose, that
            balances key and query energies and ranks components by the size of the score terms they
            carry; it uses the queries, which the paper's does not, and is often better on trained layers:
            see benchmarks/mla_rank_error.py).

    Construction (K: the ``G = num_kv_heads`` keys of a token stacked, ``G * head_dim`` values):

    1. Per RoPE frequency f (pair dims ``i, i + head_dim/2`` of each kv head) the ``G x 2`` block of K
       turns by the same angle in every head, so ``U_f K_f`` with ``U_f`` orthogonal (``G x G``, from a PCA
       of the keys) turns alike and ``(U_f q)(U_f k) = q k``: the query of head h, placed in its group's
       rows, is mixed the same way. Nothing changes yet.
    2. The ``rope_dim / 2`` components with the most key energy (over all frequencies) stay roped: they
       form ``k_rope`` (``W_kr = P_rope W_k``), and each head's ``W_qr_h`` is its group's columns of
       ``P_rope`` times ``W_q_h``. The other components drop RoPE (the approximation) and form
       ``K_nope``; a head scores them as ``q_h . A_h^T K_nope`` (``A_h``: its group's columns), so its
       NoPE key is ``A_h^T K_nope`` (``head_dim`` wide) and its NoPE query is ``q_h`` itself (with fewer
       than ``head_dim`` NoPE components: key ``K_nope``, query ``A_h q_h``). With ``rorope="balanced"``
       the keys are mixed by ``M`` and the queries by ``M^-T`` instead of one orthogonal ``U``.
    3. ``[K_nope / alpha ; V]`` is compressed to ``rank`` dims by PCA (calibration activations or weights),
       ``c_kv = R^T [...]``; ``W_uk_h = alpha A_h^T R_K``, ``W_uv_h`` = group rows of ``R_V``.
    """
    if not isinstance(gqa_layer, Attention):
        raise TypeError(f"to_mla gqa_layer must be an attnzoo Attention layer, got {type(gqa_layer).__name__}")
    if gqa_layer.q_norm is not None or gqa_layer.k_norm is not None:
        raise NotImplementedError("to_mla cannot convert a layer with qk_norm=True exactly: the per-head RMSNorm "
                                  "of the keys is not linear in x, so no latent projection reproduces it")
    if isinstance(freq_fold, bool) or not isinstance(freq_fold, int) or freq_fold < 1:
        raise ValueError(f"to_mla freq_fold must be a positive integer, got {freq_fold!r}")
    if not isinstance(balance_kv, bool):
        raise TypeError(f"to_mla balance_kv must be True or False, got {balance_kv!r}")
    if rorope not in ("pca", "balanced"):
        raise ValueError(f"to_mla rorope must be 'pca' or 'balanced', got {rorope!r}")
    layer = gqa_layer
    dim, H, G, D = layer.dim, layer.num_heads, layer.num_kv_heads, layer.head_dim
    GD, rep = G * D, H // G
    has_rope = layer.rotary is not None
    if calib_x is not None:
        if not isinstance(calib_x, torch.Tensor) or calib_x.dim() < 2 or calib_x.shape[-1] != dim:
            got = tuple(calib_x.shape) if isinstance(calib_x, torch.Tensor) else type(calib_x).__name__
            raise ValueError(f"to_mla calib_x must be a tensor (..., {dim}) of this layer's inputs, got {got}")
    if rope_dim is None:
        rope_dim = (GD if rank is None else D) if has_rope else 0
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0 or rope_dim % 2 or rope_dim > GD:
        raise ValueError(f"to_mla rope_dim must be an even integer in [0, num_kv_heads * head_dim = {GD}], "
                         f"got {rope_dim!r}")
    if not has_rope and rope_dim:
        raise ValueError(f"to_mla rope_dim must be 0 (or None) for a layer without RoPE, got {rope_dim}")
    n_nope = GD - rope_dim if has_rope else GD
    nz = n_nope + GD
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= nz):
        raise ValueError(f"to_mla rank must be None or an integer in [1, {nz}] (NoPE key dims {n_nope} + "
                         f"value dims {GD}), got {rank!r}")

    wq = _augment(layer.q_proj).view(H, D, dim + 1)
    wk = _augment(layer.k_proj)                       # (GD, dim + 1), rows j * D + d
    wv = _augment(layer.v_proj)
    sigma = _second_moment(calib_x, dim)

    # 1-2. RoRoPE: key rows (p_*) and query rows (pq_*) over the G*D stacked key dims, kept (roped) then
    # dropped (NoPE); pq = p^-T, so every score is kept until RoPE is dropped
    if not has_rope:
        eye = torch.eye(GD, dtype=torch.float64)
        p_rope = pq_rope = wk.new_zeros(0, GD)
        p_nope = pq_nope = eye
        inv_freq = []
    else:
        p_rope, p_nope, pq_rope, pq_nope, inv_freq = _rorope(wk, wq, sigma, G, D, rope_dim, freq_fold, rorope,
                                                             layer.rotary.base)

    # 3. the latent: [K_nope / alpha ; V], compressed by PCA (or exactly, rank None)
    k_nope_w = p_nope @ wk                            # (n_nope, dim + 1)
    alpha = 1.0
    if rank is not None and balance_kv and n_nope:
        ek = torch.trace(k_nope_w @ sigma @ k_nope_w.T)
        ev = torch.trace(wv @ sigma @ wv.T)
        if ek > 0 and ev > 0:
            alpha = float(torch.sqrt(ek / ev))
    z_w = torch.cat([k_nope_w / alpha, wv])           # (nz, dim + 1)
    has_bias = layer.q_proj.bias is not None
    reach = dim + 1 if has_bias else dim             # what x (and the constant 1) can produce
    if rank is None:
        if nz <= reach:
            basis = torch.eye(nz, dtype=torch.float64)
        else:                                         # lossless: a basis of the rows' column space
            u, _, _ = torch.linalg.svd(z_w if has_bias else z_w[:, :dim], full_matrices=False)
            basis = u[:, :reach]
    elif rank >= nz:
        basis = torch.eye(nz, dtype=torch.float64)
    else:
        _, vec = _top_eig(z_w @ sigma @ z_w.T)
        basis = vec[:, :rank]
    kv_rank = basis.shape[1]
    r_k, r_v = basis[:n_nope], basis[n_nope:]
    w_dkv = basis.T @ z_w                             # (kv_rank, dim + 1)

    # per-head query and up-projections
    nope = min(D, n_nope)
    q_rows, w_uk, w_uv = [], [], []
    for h in range(H):
        g = h // rep
        cols = slice(g * D, (g + 1) * D)
        a_h = pq_nope[:, cols]                        # (n_nope, D)
        if nope == D:
            q_nope_h, uk = wq[h], alpha * a_h.T @ r_k
        else:
            q_nope_h, uk = a_h @ wq[h], alpha * r_k
        q_rows += [q_nope_h, pq_rope[:, cols] @ wq[h]]
        if nope:
            w_uk.append(uk)
        w_uv.append(r_v[cols])
    wq_mla = torch.cat(q_rows)                        # (H * (nope + rope_dim), dim + 1)

    ref = layer.q_proj.weight
    mla = MLA(dim, H, kv_rank=kv_rank, q_rank=None, nope_head_dim=nope, rope_dim=rope_dim, v_head_dim=D,
              pattern=layer.pattern, bias=has_bias, latent_norm=False, rope_inv_freq=inv_freq,
              softmax_scale=D ** -0.5, backend=layer.backend).to(device=ref.device, dtype=ref.dtype)

    def put(lin: Optional[nn.Linear], w_aug: torch.Tensor, aug: bool = True):
        if lin is None:
            return
        with torch.no_grad():
            lin.weight.copy_(w_aug[:, :lin.in_features] if aug else w_aug)
            if lin.bias is not None:
                lin.bias.copy_(w_aug[:, -1])

    put(mla.q_proj, wq_mla)
    put(mla.kv_down, w_dkv)
    put(mla.kr_proj, p_rope @ wk)
    if nope:
        put(mla.k_up, torch.cat(w_uk), aug=False)
    put(mla.v_up, torch.cat(w_uv), aug=False)
    with torch.no_grad():
        mla.o_proj.weight.copy_(layer.o_proj.weight)
        if has_bias:
            mla.o_proj.bias.copy_(layer.o_proj.bias)
    return mla


def to_mla_error_curve(gqa_layer: Attention, x: torch.Tensor, ranks: Sequence[Optional[int]], *,
                       rope_dim: Optional[int] = None, calib_x: Optional[torch.Tensor] = None,
                       freq_fold: int = 1, balance_kv: bool = True, rorope: str = "pca") -> list:
    """Relative output error ``||mla(x) - gqa(x)|| / ||gqa(x)||`` of ``to_mla(gqa_layer, rank, ...)`` per rank.

    Returns one dict per rank: ``rank`` (as asked), ``kv_rank``, ``rope_dim``, ``cache`` (values per token,
    ``kv_rank + rope_dim``), ``gqa_cache`` (``2 * num_kv_heads * head_dim``) and ``rel_error``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"to_mla_error_curve x must be (batch, length, dim), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    rows = []
    with torch.no_grad():
        want = gqa_layer(x)
        for rank in ranks:
            mla = to_mla(gqa_layer, rank, rope_dim=rope_dim, calib_x=calib_x, freq_fold=freq_fold,
                         balance_kv=balance_kv, rorope=rorope)
            got = mla(x)
            err = float((got - want).double().norm() / want.double().norm().clamp_min(1e-300))
            rows.append(dict(rank=rank, kv_rank=mla.kv_rank, rope_dim=mla.rope_dim,
                             cache=mla.kv_cache_values_per_token(),
                             gqa_cache=gqa_layer.kv_cache_values_per_token(), rel_error=err))
    return rows
