"""Content-routed sparse attention: routers choose, from q and k, which key blocks each query block needs.

    import attnzoo as az
    router = az.routing.TopKBlocks(block_size=64, top_k=8)
    out = az.attention(q, k, v, pattern=router)          # routes, then runs the block-sparse attention
    mask = router(q, k)                                  # (B, Hq, nb, nb) bool block mask
    stats = az.routing.evaluate(q, k, v, router)         # recall, rel_error, density per head

See `attnzoo.routing.base` for the block geometry and how a router runs as a pattern (a per-call
`attnzoo.patterns.RoutedBlocks` device mask: no host copy, nothing cached per call). Routers:

- training-free: `TopKBlocks` (pooled q/k block scores, top-k or cumulative mass; MoBA/BiFormer-style),
  `LongHeads` (per-head chunk selection), `Landmark` (one representative key per block), `HiP`
  (hierarchical top-k pruning, O(T log T) search), `VerticalSlash` (MInference's columns and diagonals from
  the last queries, at block granularity), `FlexPrefill` (per head, query-aware or vertical-slash by the
  Jensen-Shannon divergence of the estimated and true block distributions of probe queries);
- trainable: `KMeansRouting` (Routing Transformer's online k-means, balanced clusters), `SeerRouter`
  with a `SeerGate` distilled from block-pooled true attention (`distill_gate`, `seer_targets`).
"""
from .base import Router, RoutedCall
from .quality import evaluate
from .routers import Landmark, LongHeads, TopKBlocks

__all__ = ["Router", "RoutedCall", "TopKBlocks", "LongHeads", "Landmark", "evaluate"]

# SeerAttention's learnable gate, distilled from block-pooled true attention (`attnzoo.routing.seer`)
from .seer import SeerGate, SeerRouter, capture_qk, distill_gate, seer_targets  # noqa: E402

__all__ += ["SeerGate", "SeerRouter", "seer_targets", "distill_gate", "capture_qk"]

# Training-free sparse prefill (MInference's vertical-slash, FlexPrefill).
from .flexprefill import FlexPrefill  # noqa: E402
from .vertical_slash import VerticalSlash  # noqa: E402

__all__ += ["VerticalSlash", "FlexPrefill"]

# HiP's hierarchical top-k pruning and the Routing Transformer's online k-means (`attnzoo.routing.hip`, `.kmeans`)
from .hip import HiP  # noqa: E402
from .kmeans import KMeansRouting  # noqa: E402

__all__ += ["HiP", "KMeansRouting"]
