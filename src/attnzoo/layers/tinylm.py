"""TinyLM: a small causal language model whose token mixers come from the mixer registry.

    model = TinyLM(vocab_size=8192, d_model=128, n_layers=2, mixer="attention")        # MQAR baseline
    model = TinyLM(8192, 128, mixer=["attention", "sliding_window:32"])                 # a hybrid
    logits = model(idx)                        # idx (batch, length) int64 -> (batch, length, vocab)
    loss, correct, count = model.loss(idx, targets)   # only where targets != -100

Token embedding -> n_layers x [norm -> token mixer -> residual (-> norm -> MLP -> residual)] -> final norm
-> LM head (tied to the embedding by default). No absolute positions: attention mixers carry rotary
positions, recurrent mixers are ordered by construction. The MLP is off by default (the MQAR protocol).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mixers import build_mixer, layers_label, mixer_state_size, parse_layers

IGNORE_INDEX = -100


class MLP(nn.Module):
    def __init__(self, d_model: int, ratio: int = 4):
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) when the block has an MLP."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model) if mlp else None
        self.mlp = MLP(d_model, mlp_ratio) if mlp else None

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class TinyLM(nn.Module):
    """A causal LM of ``n_layers`` blocks; ``mixer`` is one spec for all layers, a list, or ``"a+b"``.

    ``n_heads`` defaults to ``max(1, d_model // 64)`` (head_dim 64). The LM head shares the embedding's
    weights unless ``tie_embeddings=False``. Weights start as in GPT-2/nanoGPT: normal(0, 0.02), the
    output projections of each residual branch scaled by 1/sqrt(2 * n_layers).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, mixer="attention", *,
                 n_heads: Optional[int] = None, mlp: bool = False, mlp_ratio: int = 4,
                 tie_embeddings: bool = True):
        super().__init__()
        for name, n in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"TinyLM {name} must be a positive integer, got {n!r}")
        n_heads = max(1, d_model // 64) if n_heads is None else n_heads
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"TinyLM n_heads must be a positive integer, got {n_heads!r}")
        self.specs = parse_layers(mixer, n_layers)
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.mixer_label = layers_label(self.specs)

        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, build_mixer(s, d_model, n_heads), mlp, mlp_ratio)
                                    for s in self.specs)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (batch, length, d_model) of token ids ``idx`` (batch, length)."""
        if idx.dim() != 2:
            raise ValueError(f"TinyLM input must be (batch, length) token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TinyLM input must be int64 token ids, got {idx.dtype}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, vocab) of the next token at every position."""
        return self.lm_head(self.hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX):
        """Mean cross-entropy over the positions where ``targets != ignore_index``, and the number of
        those positions predicted right (argmax) and in all. The LM head runs on those positions only."""
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from inputs {tuple(idx.shape)}")
        h = self.hidden(idx)
        sel = targets != ignore_index
        logits = self.lm_head(h[sel])  # (n, vocab)
        tgt = targets[sel]
        n = int(tgt.numel())
        if n == 0:
            return h.sum() * 0.0, 0, 0
        loss = F.cross_entropy(logits.float(), tgt)
        correct = int((logits.argmax(-1) == tgt).sum())
        return loss, correct, n

    # ----------------------------------------------------------------------------------------------
    def state_sizes(self, seq_len: int) -> list:
        """Recurrent-state floats per sequence of each layer's mixer after ``seq_len`` tokens."""
        return [mixer_state_size(b.mixer, seq_len) for b in self.blocks]

    def state_size(self, seq_len: int) -> int:
        """Total recurrent-state floats per sequence (all layers) after ``seq_len`` tokens."""
        return sum(self.state_sizes(seq_len))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
