"""Compressed Convolutional Attention (CCA) and its grouped-query form (CCGQA), with a streaming cache.

Figliolia, Alonso, Iyer, Anthony, Millidge (Zyphra, 2025), "Compressed Convolutional Attention: Efficient
Attention in a Compressed Latent Space" (arXiv:2510.04476); CCGQA is the attention of the ZAYA1 models.

    layer = CCA(dim=2048, num_heads=4, compression=4)      # latent 512 = 4 heads of 128
    y = layer(x)                                            # x, y: (batch, length, dim)
    cache = layer.new_cache(); y1 = layer(x[:, :5], cache); y2 = layer(x[:, 5:6], cache)   # generation

Queries, keys and values are down-projected from ``dim`` to a latent of width ``dim / C`` (``C`` is
``compression``) and the *whole* attention runs in that latent; one up-projection maps the latent output back
to ``dim``. Parameters of the attention block, attention FLOPs and the KV cache all shrink by ``C`` (CCGQA
shares each key/value head among ``num_heads / num_kv_heads`` query heads on top: the cache shrinks by that
factor more). To make the small latent expressive the paper adds, step by step (``t`` is the position)::

    q~ = x W_q,  k~ = x W_k                        (B, T, dim/C) and (B, T, dim/(C*g))        latent q, k
    [q, k] = conv2(conv1([q~, k~]))                causal over the sequence:                   conv mixing
             conv1: depthwise, kernel conv_size    each channel with its own past
             conv2: grouped, one group per head,   each output channel sees every channel of its head
                    kernel conv_size               over the last conv_size positions
    q += (q~ + k~)/2 ,  k += mean_group(q~ + k~)/2  per head, from the pre-convolution tensors  q-k mean
    v  = [x_t W_v1 , x_(t-1) W_v2]                 half of the value channels come from the    value shift
                                                   previous token (zero before the first)
    q = sqrt(D) q/|q| ,  k = sqrt(D) tau_h k/|k|   L2 norm per head, learnable temperature      QK norm
                                                   per key/value head
    q, k = RoPE(q), RoPE(k)                        in the latent heads (head width D)
    o = attention(q, k, v, pattern)  (scale 1/sqrt(D)),  y = o W_o    (dim/C -> dim)

With a cache (``new_cache()``) the layer streams: the cache keeps the latent keys (after the convolutions,
the norm and RoPE) and values of every token seen, plus two constant-size states: the last
``2 * (conv_size - 1)`` pre-convolution latent inputs of q and k (the receptive field of the two causal
convolutions beyond the current token) and the previous token's shifted-value projection. Prefill then
token-by-token decoding (any split) equals one full forward.

Geometry. ``num_heads`` counts the *latent* query heads, so the head width is ``D = dim / (C * num_heads)``.
The paper's kernels and ZAYA1 keep MHA's head width and cut the number of heads instead: for a model with
``H`` heads of width ``dim / H`` pass ``num_heads = H // C`` (``CCA(2048, 16 // 4, compression=4)``: 4 heads
of 128). Called as a token mixer ``factory(d_model, n_heads)`` the layer keeps ``n_heads`` heads of width
``d_model / (C * n_heads)``, which works for any head count.

What follows the paper / the ZAYA1 reference implementation and what is ours:

- Followed: down-projections to ``dim / C``; two causal convolutions on q and k only (depthwise over the
  sequence, then grouped across the channels of each head, no nonlinearity between them, biases on both);
  the q-k mean skip added after the convolutions (for CCGQA the key's mean is the group average of the
  query-side means); the value shift of half the value channels (the second half, from ``x_(t-1)``); L2
  norm to length ``sqrt(D)`` with a learnable temperature per key head multiplying the keys; RoPE in the
  latent heads after the norm; attention and the single up-projection in the latent.
- Ours: the value shift projects every token once and shifts the projection by one position (the same as
  projecting ``x_(t-1)`` with its own matrix, but the cache keeps ``dim/(2 C g)`` values instead of the
  previous ``x``); the temperature starts at 1 (logits = ``sqrt(D) cos(q, k)`` at initialisation; the
  ZAYA1 code leaves its initial value to the checkpoint); both convolutions share one kernel size
  (``conv_size``, default 2 as in ZAYA1, or a pair); ``qk_mean``, ``value_shift`` and ``qk_norm`` can be
  switched off for ablations; any attnzoo ``pattern`` may restrict the attention. The paper's fused
  kernel is not reproduced: this layer calls ``attnzoo.attention`` on the latent q, k, v.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention
from ..patterns import Causal, Pattern
from .attention import KVCache, RotaryEmbedding, kv_cache_len


class CCACache(KVCache):
    """Streaming state of one `CCA`/`CCGQA` layer; ``forward(x, cache)`` updates it in place.

    ``k``/``v`` (from `KVCache`): latent keys and values ``(B, num_kv_heads, seen, head_dim)``, keys after
    the convolutions, the norm and RoPE. ``conv``: ``(B, q_latent + k_latent, 2 * (conv_size - 1))``, the
    last pre-convolution latent q and k (zeros before the sequence starts). ``v_prev``: ``(B, 1, n)``, the
    previous token's projection for the shifted half of the value channels. ``seen``: tokens so far.
    """

    def __init__(self):
        super().__init__()
        self.conv: Optional[torch.Tensor] = None
        self.v_prev: Optional[torch.Tensor] = None

    def __repr__(self):
        shape = None if self.k is None else tuple(self.k.shape)
        conv = None if self.conv is None else tuple(self.conv.shape)
        return f"CCACache(seen={self.seen}, k={shape}, conv={conv})"


def _positive_int(owner: str, name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner} {name} must be a positive integer, got {n!r}")
    return n


def _kernel_sizes(owner: str, conv_size) -> tuple:
    sizes = (conv_size, conv_size) if not isinstance(conv_size, (tuple, list)) else tuple(conv_size)
    if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"{owner} conv_size must be a positive integer or a pair of them (kernel of the "
                         f"sequence conv, kernel of the channel conv), got {conv_size!r}")
    return sizes


def default_kv_heads(num_heads: int) -> int:
    """CCGQA's default key/value heads: the largest divisor of ``num_heads`` that is at most
    ``num_heads // 4`` (4 query heads per key/value head, ZAYA1's layout), at least 1."""
    cap = max(1, num_heads // 4)
    return max(d for d in range(1, cap + 1) if num_heads % d == 0)


class CCGQA(nn.Module):
    """Compressed Convolutional Grouped-Query Attention: `CCA` with ``num_kv_heads`` key/value heads
    shared by ``num_heads`` query heads in the latent (see the module docstring for the computation).

    Args:
        dim: width of the input and output.
        num_heads: query heads in the latent; head width ``D = dim / (compression * num_heads)``.
        num_kv_heads: key/value heads in the latent, a divisor of ``num_heads`` (default: 4 query heads per
            key/value head where ``num_heads`` allows, see `default_kv_heads`).
        compression: ``C``; the query latent is ``dim / C`` wide, keys and values ``dim / (C * g)`` with
            ``g = num_heads / num_kv_heads``. Default 2 (ZAYA1: 2x on queries, 8x on the KV cache).
        pattern: an attnzoo ``Pattern`` for the latent attention (default ``Causal()``).
        conv_size: kernel of the two causal convolutions on q and k (an int, or a pair: sequence conv,
            channel conv); default 2.
        rope: rotate the latent q and k by position (``rope_base``).
        bias: biases on the q, k, v and output projections (the convolutions always have biases).
        qk_mean, value_shift, qk_norm: the paper's q-k mean skip, value shift and L2 QK norm with
            temperature (all on by default; off for ablations).
        backend: passed to ``attnzoo.attention``.

    ``forward(x, cache=None)``: ``(B, T, dim) -> (B, T, dim)``; with ``cache = new_cache()`` the tokens
    continue the cached sequence and the cache is updated in place.
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: Optional[int] = None, compression: int = 2,
                 pattern: Optional[Pattern] = None, conv_size: Union[int, Sequence[int]] = 2, rope: bool = True,
                 bias: bool = False, *, qk_mean: bool = True, value_shift: bool = True, qk_norm: bool = True,
                 rope_base: float = 10000.0, backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        _positive_int(owner, "dim", dim)
        _positive_int(owner, "num_heads", num_heads)
        if isinstance(compression, bool) or not isinstance(compression, int) or compression < 1:
            raise ValueError(f"{owner} compression must be a positive integer (the latent is dim / compression "
                             f"wide), got {compression!r}")
        if num_kv_heads is None:
            num_kv_heads = default_kv_heads(num_heads)
        bad_kv = isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1
        if bad_kv or num_heads % num_kv_heads:
            raise ValueError(f"{owner} num_kv_heads must be a positive divisor of num_heads={num_heads}, "
                             f"got {num_kv_heads!r}")
        if dim % (compression * num_heads):
            raise ValueError(f"{owner} dim={dim} must be divisible by compression * num_heads = "
                             f"{compression} * {num_heads} (the latent is dim / compression wide, split into "
                             f"num_heads heads)")
        head_dim = dim // (compression * num_heads)
        if rope and head_dim % 2:
            raise ValueError(f"{owner} head_dim = dim / (compression * num_heads) = {head_dim} must be even for "
                             "rotary embeddings; change dim, num_heads or compression, or pass rope=False")
        k0, k1 = _kernel_sizes(owner, conv_size)
        pattern = Causal() if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise TypeError(f"{owner} pattern must be an attnzoo Pattern, got {type(pattern).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"{owner} backend must be a string, got {type(backend).__name__}")
        for name, flag in (("rope", rope), ("bias", bias), ("qk_mean", qk_mean), ("value_shift", value_shift),
                           ("qk_norm", qk_norm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner} {name} must be True or False, got {flag!r}")

        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.compression, self.conv_size = compression, (k0, k1)
        self.pattern, self.backend = pattern, backend
        self.qk_mean, self.value_shift, self.qk_norm = qk_mean, value_shift, qk_norm
        self.q_latent, self.kv_latent = num_heads * head_dim, num_kv_heads * head_dim
        self.conv_pad = (k0 - 1) + (k1 - 1)              # past positions the two convolutions read
        self.shifted = self.kv_latent // 2 if value_shift else 0  # value channels taken from x_(t-1)

        self.q_proj = nn.Linear(dim, self.q_latent, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_latent, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_latent, bias=bias)
        self.o_proj = nn.Linear(self.q_latent, dim, bias=bias)
        channels = self.q_latent + self.kv_latent
        # conv1: depthwise along the sequence; conv2: grouped, one group per (query or key) head
        self.conv1 = nn.Conv1d(channels, channels, k0, groups=channels)
        self.conv2 = nn.Conv1d(channels, channels, k1, groups=num_heads + num_kv_heads)
        self.temperature = nn.Parameter(torch.ones(num_kv_heads)) if qk_norm else None
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None

    # -- pieces ------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, cache) -> None:
        owner = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{owner} input must be (batch, length, {self.dim}), got {got}")
        if cache is None:
            return
        if not isinstance(cache, CCACache):
            raise TypeError(f"{owner} cache must come from new_cache() (a CCACache) or be None, "
                            f"got {type(cache).__name__}")
        # checked before anything is computed, so that a refused call leaves the cache as it was
        want = (x.shape[0], self.num_kv_heads, self.head_dim)
        if cache.k is not None and (cache.k.shape[0], cache.k.shape[1], cache.k.shape[-1]) != want:
            raise ValueError(f"{owner} cache holds keys of shape {tuple(cache.k.shape)}; cannot append keys of "
                             f"(batch={want[0]}, heads={want[1]}, head_dim={want[2]}) (another batch size or "
                             "layer?)")
        if cache.conv is not None and tuple(cache.conv.shape) != (x.shape[0], self.q_latent + self.kv_latent,
                                                                    self.conv_pad):
            raise ValueError(f"{owner} cache holds a convolution state of shape {tuple(cache.conv.shape)}; "
                             f"cannot continue it with a batch of {x.shape[0]} (another batch size or layer?)")

    def positions(self, x: torch.Tensor, cache: Optional[CCACache]) -> torch.Tensor:
        start = 0 if cache is None else cache.seen
        return torch.arange(start, start + x.shape[1], device=x.device)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, heads, self.head_dim).transpose(1, 2)

    def mix_qk(self, q0: torch.Tensor, k0: torch.Tensor, state: Optional[torch.Tensor]):
        """The two causal convolutions and the q-k mean on the latent ``q0`` (B, T, q_latent) and ``k0``
        (B, T, kv_latent); ``state`` holds the previous ``conv_pad`` inputs (None: zeros).
        Returns q (B, H, T, D), k (B, Hkv, T, D) and the new state."""
        b, t, _ = q0.shape
        qk = torch.cat([q0, k0], dim=-1).transpose(1, 2)  # (B, C, T)
        if self.conv_pad:
            if state is None:
                state = qk.new_zeros(b, qk.shape[1], self.conv_pad)
            qk = torch.cat([state.to(qk.dtype), qk], dim=-1)
        new_state = qk[..., qk.shape[-1] - self.conv_pad:]
        y = F.conv1d(qk, self.conv1.weight, self.conv1.bias, groups=self.conv1.groups)
        y = F.conv1d(y, self.conv2.weight, self.conv2.bias, groups=self.conv2.groups)  # (B, C, T)
        y = y.transpose(1, 2).contiguous()  # (B, T, C): heads below get the usual layout, head_dim stride 1
        h, hkv = self.num_heads, self.num_kv_heads
        q, k = self._heads(y[..., :self.q_latent], h), self._heads(y[..., self.q_latent:], hkv)
        if self.qk_mean:
            qh, kh = self._heads(q0, h), self._heads(k0, hkv)
            g = h // hkv
            if g == 1:
                mean_q = mean_k = (qh + kh) / 2
            else:
                mean_q = (qh + kh.repeat_interleave(g, dim=1)) / 2                 # per query head
                mean_k = mean_q.reshape(b, hkv, g, t, self.head_dim).mean(dim=2)  # per key head: its group's mean
            q, k = q + mean_q, k + mean_k
        return q, k, new_state

    def values(self, x: torch.Tensor, prev: Optional[torch.Tensor]):
        """Latent values (B, Hkv, T, D): the last ``shifted`` channels from the previous token's projection
        (``prev`` (B, 1, shifted) before the first token; None: zeros). Returns (v, new prev)."""
        v = self.v_proj(x)
        new_prev = None
        if self.shifted:
            cut = self.kv_latent - self.shifted
            cur, sh = v[..., :cut], v[..., cut:]
            if prev is None:
                prev = sh.new_zeros(sh.shape[0], 1, self.shifted)
            sh = torch.cat([prev.to(sh.dtype), sh], dim=1)
            v = torch.cat([cur, sh[:, :-1]], dim=-1)
            new_prev = sh[:, -1:]
        return self._heads(v, self.num_kv_heads), new_prev

    def project_qkv(self, x: torch.Tensor, cache: Optional[CCACache] = None):
        """Latent q (B, H, T, D) and k, v (B, Hkv, T, D), ready for attention, and the new streaming states
        ``(conv state, previous shifted value)``; the cache itself is not touched."""
        q, k, conv_state = self.mix_qk(self.q_proj(x), self.k_proj(x), None if cache is None else cache.conv)
        v, v_prev = self.values(x, None if cache is None else cache.v_prev)
        if self.qk_norm:
            scale = math.sqrt(self.head_dim)
            q = F.normalize(q, dim=-1) * scale
            k = F.normalize(k, dim=-1) * (scale * self.temperature.to(k.dtype).view(1, -1, 1, 1))
        if self.rotary is not None:
            pos = self.positions(x, cache)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        return q, k, v, (conv_state, v_prev)

    def forward(self, x: torch.Tensor, cache: Optional[CCACache] = None) -> torch.Tensor:
        self.check_input(x, cache)
        q, k, v, (conv_state, v_prev) = self.project_qkv(x, cache)
        if cache is not None:
            k, v = cache.append(k, v)
            # copies: the states are slices of this call's (B, C, T + pad) buffers, which must not stay alive
            cache.conv = conv_state.clone()
            cache.v_prev = None if v_prev is None else v_prev.clone()
        o = attention(q, k, v, pattern=self.pattern, backend=self.backend)  # (B, H, T, D)
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.q_latent))

    # -- cache -------------------------------------------------------------------------------------------
    def new_cache(self) -> CCACache:
        """An empty cache for generation: ``y = layer(x_prefix, cache); y_next = layer(x_next, cache)``."""
        return CCACache()

    def kv_cache_values_per_token(self) -> int:
        """Values the cache stores per token: the latent keys and values, ``2 * num_kv_heads * head_dim``
        (= ``2 * dim / (compression * g)``; MHA stores ``2 * dim``). The constant convolution and
        value-shift state is `conv_state_values`."""
        return 2 * self.num_kv_heads * self.head_dim

    def conv_state_values(self) -> int:
        """Values of the constant-size state per sequence: ``(q_latent + kv_latent) * 2 (conv_size - 1)``
        pre-convolution inputs plus the previous token's shifted-value channels."""
        return (self.q_latent + self.kv_latent) * self.conv_pad + self.shifted

    def state_size(self, seq_len: int) -> int:
        """Floats one sequence keeps after ``seq_len`` tokens: the keys ``pattern`` still needs
        (`kv_cache_len`) times `kv_cache_values_per_token`, plus `conv_state_values`."""
        return self.kv_cache_values_per_token() * kv_cache_len(self.pattern, seq_len) + self.conv_state_values()

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, compression={self.compression}, conv_size={self.conv_size}, "
                f"rope={self.rotary is not None}, qk_mean={self.qk_mean}, value_shift={self.value_shift}, "
                f"qk_norm={self.qk_norm}, pattern={self.pattern!r}, backend={self.backend!r}")


class CCA(CCGQA):
    """Compressed Convolutional Attention: every query head has its own key/value head in the latent
    (`CCGQA` with ``num_kv_heads = num_heads``). Latent width ``dim / compression`` for q, k and v, so
    parameters of the attention block, attention FLOPs and the KV cache are ``compression`` times smaller
    than MHA's; ``num_heads`` latent heads of width ``dim / (compression * num_heads)``. Default
    compression 4. Arguments as `CCGQA`.
    """

    def __init__(self, dim: int, num_heads: int = 1, compression: int = 4, pattern: Optional[Pattern] = None,
                 conv_size: Union[int, Sequence[int]] = 2, rope: bool = True, bias: bool = False, *,
                 qk_mean: bool = True, value_shift: bool = True, qk_norm: bool = True,
                 rope_base: float = 10000.0, backend: str = "auto"):
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"{type(self).__name__} num_heads must be a positive integer, got {num_heads!r}")
        super().__init__(dim, num_heads, num_heads, compression, pattern, conv_size, rope, bias, qk_mean=qk_mean,
                         value_shift=value_shift, qk_norm=qk_norm, rope_base=rope_base, backend=backend)
