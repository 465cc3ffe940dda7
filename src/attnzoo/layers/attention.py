"""Multi-head attention as an ``nn.Module``, restricted by any attnzoo pattern, with rotary positions.

    attn = Attention(d_model=128, n_heads=2, pattern=az.SlidingWindow(31))   # a causal window of 32 keys
    y = attn(x)                                                              # x, y: (batch, length, d_model)

The module projects ``x`` to q, k, v (``n_kv_heads < n_heads`` is GQA/MQA), rotates q and k by their
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
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor):
        ang = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]  # (T, D/2)
        ang = torch.cat([ang, ang], dim=-1)  # (T, D)
        return ang.cos(), ang.sin()

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = x.shape[-2]
        if positions is None:
            positions = torch.arange(t, device=x.device)
        cos, sin = self.cos_sin(positions)
        xf = x.float()
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


class Attention(nn.Module):
    """Multi-head (GQA/MQA) attention over ``pattern`` through ``attnzoo.attention``.

    Args:
        d_model: width of the input and output.
        n_heads: query heads; ``head_dim`` defaults to ``d_model // n_heads``.
        n_kv_heads: key/value heads (default ``n_heads``); must divide ``n_heads``.
        pattern: an attnzoo ``Pattern`` (default ``Causal()``); ``SlidingWindow(w - 1)`` is a window of w keys.
        rope: rotate q and k by position (RoPE); ``rope_base`` is its base.
        backend: passed to ``attnzoo.attention`` ("auto", "sdpa", "flex", "reference", ...).
        bias: biases on the four projections.
    """

    def __init__(self, d_model: int, n_heads: int = 1, n_kv_heads: Optional[int] = None, *,
                 pattern: Optional[Pattern] = None, rope: bool = True, rope_base: float = 10000.0,
                 backend: str = "auto", bias: bool = False, head_dim: Optional[int] = None):
        super().__init__()
        for name, n in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"Attention {name} must be a positive integer, got {n!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        bad_kv = isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1
        if bad_kv or n_heads % n_kv_heads:
            raise ValueError(f"Attention n_kv_heads must be a positive divisor of n_heads={n_heads}, got {n_kv_heads!r}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"Attention d_model={d_model} is not divisible by n_heads={n_heads}; "
                                 "pass head_dim explicitly")
            head_dim = d_model // n_heads
        pattern = Causal() if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise TypeError(f"Attention pattern must be an attnzoo Pattern, got {type(pattern).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"Attention backend must be a string, got {type(backend).__name__}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.pattern, self.backend = pattern, backend
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Attention input must be (batch, length, {self.d_model}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        o = attention(q, k, v, pattern=self.pattern, backend=self.backend)  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def state_size(self, seq_len: int) -> int:
        """Floats of the KV cache per sequence after ``seq_len`` tokens: 2 * n_kv_heads * head_dim * keys kept."""
        return 2 * self.n_kv_heads * self.head_dim * kv_cache_len(self.pattern, seq_len)

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, pattern={self.pattern!r}, backend={self.backend!r}")
