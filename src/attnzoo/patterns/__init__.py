"""Attention patterns: what may attend to what. See `attnzoo.patterns.base` for the contract."""
from .base import Intersection, Pattern, PerHead, Union
from .basic import (BlockSparse, Causal, Chunked, Dilated, Document, Full, Mask, PowerAttention,
                    PrefixLM, Sinks, SlidingWindow, Strided)
from .layout import BlockLayout
from .neighborhood import Neighborhood, TiledNeighborhood, neighborhood_tiling
from .routed import RoutedBlocks

__all__ = ["Pattern", "Union", "Intersection", "PerHead", "BlockLayout", "Full", "Causal", "SlidingWindow",
           "Sinks", "Chunked", "Dilated", "Strided", "PrefixLM", "Document", "Neighborhood",
           "TiledNeighborhood", "neighborhood_tiling", "PowerAttention", "Mask", "BlockSparse", "RoutedBlocks"]
