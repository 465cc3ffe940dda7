"""Multi-head attention as an ``nn.Module``, restricted by any attnzoo pattern, with rotary positions.

    attn = Attention(dim=128, num_heads=2, pattern=az.SlidingWindow(31))   # a causal window of 32 keys
    y = attn(x)                                                            # x, y: (batch, length, dim)
    cache = attn.new_cache(); y1 = attn(x[:, :5], cache); y2 = attn(x[:, 5:6], cache)   # generation

The module projects ``x`` to q, k, v (``num_kv_heads < num_heads`` is GQA/MQA), rotates q and k by their
positions (RoPE, Su et al. 2021, "rotate half" layout as in GPT-NeoX/Llama), calls
``attnzoo.attention(q, k, v, pattern, backend=...)`` and projects the heads back to ``d_model``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..api import attention
from ..patterns import Causal, Dilated, Full, Pattern, Sinks, SlidingWindow
from ..patterns.base import Intersection, Union


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: rotates pairs ``(x[i], x[i + D/2])`` by the angle ``pos * base^(-2i/D)``.

    ``forward(x)`` takes ``(batch, heads, length, head_dim)`` with positions ``0..length-1`` (or
    ``positions``, a 1-D tensor of length ``length``) and returns the rotated tensor in ``x``'s dtype.
    The dot product of a rotated query at ``p`` and a rotated key at ``s`` depends on ``p - s`` only.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even integer >= 2 for rotary embeddings, got {head_dim!r}")
        if not base > 1:
            raise ValueError(f"rotary base must be > 1, got {base!r}")
        self.head_dim, self.base = head_dim, float(base)
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # float64; .to(dtype) of the module keeps it

    def _apply(self, fn, *args, **kwargs):
        # keep inv_freq exact in float64 whatever .half()/.bfloat16() ask for: recompute it from the base
        # (a cast back would keep the rounding) on the device the move chose
        out = super()._apply(fn, *args, **kwargs)
        exact = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        self.inv_freq = exact.to(self.inv_freq.device)
        return out

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        inv = self.inv_freq.to(device=positions.device, dtype=torch.float64)
        ang = (positions.to(torch.float64)[:, None] * inv[None, :]).to(dtype)  # (T, D/2)
        ang = torch.cat([ang, ang], dim=-1)  # (T, D)
        return ang.cos(), ang.sin()

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = x.shape[-2]
        if positions is None:
            positions = torch.arange(t, device=x.device)
        ct = torch.promote_types(x.dtype, torch.float32)  # float64 inputs rotate in float64
        cos, sin = self.cos_sin(positions, ct)
        xf = x.to(ct)
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, base={self.base:g}"


def kv_cache_len(pattern: Optional[Pattern], seq_len: int) -> int:
    """Keys a causal decoder must keep to continue a sequence of ``seq_len`` tokens under ``pattern``.

    Exact for ``None``/``Full``/``Causal`` (every key: ``seq_len``), causal ``SlidingWindow(left)``
    (``left + 1``), ``Sinks(n)``, ``Dilated`` and their unions (sums) and intersections (minimum), always
    capped at ``seq_len``. Any other pattern counts as a full cache (an upper bound).
    """
    def keys(p) -> int:
        if p is None or isinstance(p, (Full, Causal)):
            return seq_len
        if isinstance(p, SlidingWindow):
            return p.left + 1 if p.right == 0 else seq_len
        if isinstance(p, Sinks):
            return p.n
        if isinstance(p, Dilated):
            return (p.window - 1) * p.dilation + 1
        if isinstance(p, Union):
            return keys(p.a) + keys(p.b)
        if isinstance(p, Intersection):
            return min(keys(p.a), keys(p.b))
        return seq_len
    return max(0, min(seq_len, keys(pattern)))


class KVCache:
    """Keys and values one attention layer has seen, for generation; ``forward(x, cache)`` appends in place.

    ``k``/``v`` are ``(batch, kv_heads, seen, head_dim)`` after RoPE (None before the first call);
    ``seen`` counts the tokens, so the next token's position is ``seen``.
    """

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.seen = 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add ``(B, Hkv, T, D)`` keys/values; returns all keys and values so far."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            if k.shape[0] != self.k.shape[0] or k.shape[1] != self.k.shape[1] or k.shape[-1] != self.k.shape[-1]:
                raise ValueError(f"cache holds keys of shape {tuple(self.k.shape)}; cannot append {tuple(k.shape)} "
                                 "(another batch size or layer?)")
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.seen += k.shape[2]
        return self.k, self.v

    def __repr__(self):
        shape = None if self.k is None else tuple(self.k.shape)
        return f"KVCache(seen={self.seen}, k={shape})"


def check_positive_int(owner: str, name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner} {name} must be a positive integer, got {n!r}")
    return n


class Attention(nn.Module):
    """Multi-head (MHA/GQA/MQA) attention over ``pattern`` through ``attnzoo.attention``.

    Args:
        dim: width of the input and output.
        num_heads: query heads; ``head_dim`` defaults to ``dim // num_heads``.
        num_kv_heads: key/value heads (default ``num_heads``; 1 is MQA); must divide ``num_heads``.
        head_dim: width of each head.
        rope: rotate q and k by position (RoPE, "rotate half"); ``rope_base`` is its base.
        qk_norm: RMS-normalise each query and key head (learnable scale) before RoPE.
        pattern: an attnzoo ``Pattern`` (default ``Causal()``); ``SlidingWindow(w - 1)`` is a window of w keys.
        bias: biases on the four projections.
        backend: passed to ``attnzoo.attention`` ("auto", "sdpa", "flex", "triton", "reference", ...).

    ``forward(x, cache=None)`` maps ``(B, T, dim)`` to ``(B, T, dim)``. With a cache (``new_cache()``) the
    tokens continue the cached sequence: their positions start at ``cache.seen``, their keys and values are
    appended to the cache, and the queries attend to every cached key under ``pattern`` aligned bottom-right
    (the last query is the newest position), so prefill then token-by-token decoding equals one full forward.
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, qk_norm: bool = False,
                 pattern: Optional[Pattern] = None, bias: bool = False, *, rope_base: float = 10000.0,
                 backend: str = "auto"):
        super().__init__()
        check_positive_int(type(self).__name__, "dim", dim)
        check_positive_int(type(self).__name__, "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        bad_kv = isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1
        if bad_kv or num_heads % num_kv_heads:
            raise ValueError(f"{type(self).__name__} num_kv_heads must be a positive divisor of "
                             f"num_heads={num_heads}, got {num_kv_heads!r}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{type(self).__name__} dim={dim} is not divisible by num_heads={num_heads}; "
                                 "pass head_dim explicitly")
            head_dim = dim // num_heads
        check_positive_int(type(self).__name__, "head_dim", head_dim)
        pattern = Causal() if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise TypeError(f"{type(self).__name__} pattern must be an attnzoo Pattern, got {type(pattern).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"{type(self).__name__} backend must be a string, got {type(backend).__name__}")
        for name, flag in (("rope", rope), ("qk_norm", qk_norm), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{type(self).__name__} {name} must be True or False, got {flag!r}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.pattern, self.backend = pattern, backend
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None

    # the pieces, so that subclasses (gated, MoH, ...) can reuse them -------------------------------------
    def check_input(self, x: torch.Tensor, cache) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} input must be (batch, length, {self.dim}), got {got}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"{type(self).__name__} cache must come from new_cache() (a KVCache) or be None, "
                            f"got {type(cache).__name__}")

    def positions(self, x: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
        start = 0 if cache is None else cache.seen
        return torch.arange(start, start + x.shape[1], device=x.device)

    def project_qkv(self, x: torch.Tensor, cache: Optional[KVCache] = None):
        """q ``(B, H, T, D)`` and k, v ``(B, Hkv, T, D)`` after QK-norm and RoPE (positions from ``cache``)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            pos = self.positions(x, cache)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Optional[KVCache] = None):
        """``attention(q, k, v)`` under ``pattern``, with the cached keys in front when ``cache`` is given."""
        if cache is not None:
            k, v = cache.append(k, v)
        return attention(q, k, v, pattern=self.pattern, backend=self.backend)  # (B, H, T, D)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, -1)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        self.check_input(x, cache)
        q, k, v = self.project_qkv(x, cache)
        return self.o_proj(self.merge_heads(self.attend(q, k, v, cache)))

    def new_cache(self) -> KVCache:
        """An empty cache for generation: ``y = layer(x_prefix, cache); y_next = layer(x_next, cache)``."""
        return KVCache()

    def kv_cache_values_per_token(self) -> int:
        """Values the cache stores per token for this layer: ``2 * num_kv_heads * head_dim``."""
        return 2 * self.num_kv_heads * self.head_dim

    def state_size(self, seq_len: int) -> int:
        """Floats of the KV cache per sequence after ``seq_len`` tokens, counting only the keys ``pattern``
        still needs (`kv_cache_len`): ``kv_cache_values_per_token() / 2 * 2 * keys kept``."""
        return self.kv_cache_values_per_token() * kv_cache_len(self.pattern, seq_len)

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, rope={self.rotary is not None}, qk_norm={self.q_norm is not None}, "
                f"pattern={self.pattern!r}, backend={self.backend!r}")
