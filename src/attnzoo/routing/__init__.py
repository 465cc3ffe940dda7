"""Content-routed sparse attention: routers choose, from q and k, which key blocks each query block needs.

    import attnzoo as az
    router = az.routing.TopKBlocks(block_size=64, top_k=8)
    out = az.attention(q, k, v, pattern=router)          # routes, then runs the block-sparse attention
    mask = router(q, k)                                  # (B, Hq, nb, nb) bool block mask
    stats = az.routing.evaluate(q, k, v, router)         # recall, rel_error, density per head

See `attnzoo.routing.base` for the block geometry and how a router runs as a pattern. Implemented (training-
free): `TopKBlocks`, `LongHeads`, `Landmark`. Not yet: HiP, KMeansRouting, VerticalSlash, FlexPrefill, and
SeerAttention's learnable gate.
"""
from .base import Router, RoutedCall
from .quality import evaluate
from .routers import Landmark, LongHeads, TopKBlocks

__all__ = ["Router", "RoutedCall", "TopKBlocks", "LongHeads", "Landmark", "evaluate"]
