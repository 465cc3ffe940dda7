"""Gated attention: a query-dependent, head-specific sigmoid gate on the attention output.

    attn = GatedAttention(dim=128, num_heads=4, gate="elementwise")   # or "headwise", or None
    y = attn(x)                                                       # x, y: (batch, length, dim)

Qiu et al. 2025, "Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free"
(arXiv 2505.06708), position G1 (their best): the output ``Y`` of scaled dot-product attention is multiplied
by ``sigma(X W_theta)`` before the output projection,

    Y' = Y * sigmoid(X W_theta),        y = concat_heads(Y') W_O,

where ``X`` is the layer's input at the query's own position (so the gate is query-dependent and needs no
KV cache) and ``W_theta`` has its own rows for every head (head-specific). ``gate="elementwise"`` gives one
gate per head and channel (``W_theta``: dim -> num_heads * head_dim); ``gate="headwise"`` one scalar per head
(dim -> num_heads), multiplying that head's whole output. ``gate=None`` (or ``"none"``) is the ungated layer:
same parameters and same output as `Attention`.

Initialisation (our choice): ``W_theta`` (and its bias, when ``bias=True``) start at zero, so every gate
starts at exactly ``sigmoid(0) = 1/2`` and a fresh layer is ``0.5 *`` the ungated `Attention` with the same
weights: a smooth, input-independent start from which the gates become query-dependent (and, as the paper
observes after training, sparse) as ``W_theta`` learns; its gradient is not zero (it is ``x`` times the
gradient at the gate). The authors' models fuse ``W_theta`` into the query projection and initialise it like
the other projections (normal, std 0.02), so their gates also start close to 1/2; zero makes that exact
and deterministic. The gate projection has a bias when ``bias=True`` (as the paper's follows ``qkv_bias``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..patterns import Pattern
from .attention import Attention, KVCache

GATES = ("elementwise", "headwise")


def _check_gate(owner: str, gate) -> Optional[str]:
    if gate is None:
        return None
    if not isinstance(gate, str):
        raise TypeError(f"{owner} gate must be 'elementwise', 'headwise' or None, got {type(gate).__name__}")
    if gate == "none":
        return None
    if gate not in GATES:
        raise ValueError(f"{owner} gate must be 'elementwise', 'headwise' or None (or 'none'), got {gate!r}")
    return gate


class GatedAttention(Attention):
    """`Attention` with an output gate ``Y * sigmoid(X W_theta)`` after attention, before ``o_proj``.

    Args: those of `Attention` (``dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, pattern, bias``,
    keyword ``rope_base``, ``backend``), plus
        gate: ``"elementwise"`` (default; one gate per head channel, the paper's best variant),
            ``"headwise"`` (one scalar per head) or ``None``/``"none"`` (no gate: equals `Attention`).

    ``forward(x, cache=None)``: ``(B, T, dim) -> (B, T, dim)``; with a cache (``new_cache()``), as for
    `Attention`: only keys and values are cached (the gate of a token depends on that token's input only), so
    ``kv_cache_values_per_token()`` is that of `Attention`. ``gate_proj`` is the gate's ``nn.Linear`` (None
    without a gate); ``gate_scores(x)`` returns the gates.
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, qk_norm: bool = False,
                 pattern: Optional[Pattern] = None, bias: bool = False, gate: Optional[str] = "elementwise", *,
                 rope_base: float = 10000.0, backend: str = "auto"):
        gate = _check_gate(type(self).__name__, gate)
        super().__init__(dim, num_heads, num_kv_heads, head_dim, rope, qk_norm, pattern, bias,
                         rope_base=rope_base, backend=backend)
        self.gate = gate
        if gate is None:
            self.gate_proj = None
        else:
            width = num_heads * self.head_dim if gate == "elementwise" else num_heads
            self.gate_proj = nn.Linear(dim, width, bias=bias)
            self.reset_gate()

    def reset_gate(self) -> None:
        """Zero ``W_theta`` (and its bias): every gate becomes ``sigmoid(0) = 1/2`` (see the module doc)."""
        if self.gate_proj is not None:
            with torch.no_grad():
                self.gate_proj.weight.zero_()
                if self.gate_proj.bias is not None:
                    self.gate_proj.bias.zero_()

    def gate_scores(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The gates ``sigmoid(x W_theta)`` as ``(B, H, T, head_dim)`` (elementwise) or ``(B, H, T, 1)``
        (headwise), in ``x``'s dtype; None without a gate."""
        if self.gate_proj is None:
            return None
        b, t, _ = x.shape
        return torch.sigmoid(self.gate_proj(x)).view(b, t, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        self.check_input(x, cache)
        q, k, v = self.project_qkv(x, cache)
        o = self.attend(q, k, v, cache)                       # (B, H, T, D)
        if self.gate_proj is not None:
            o = o * self.gate_scores(x).to(o.dtype)
        return self.o_proj(self.merge_heads(o))

    def kv_cache_values_per_token(self) -> int:
        """``2 * num_kv_heads * head_dim``: the gate needs no cache (it depends on the current token only)."""
        return super().kv_cache_values_per_token()

    def extra_repr(self):
        return f"{super().extra_repr()}, gate={self.gate!r}"
