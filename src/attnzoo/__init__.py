"""attnzoo: the attention mechanisms of the long-context literature behind one API.

    import attnzoo as az
    out = az.attention(q, k, v, pattern=az.SlidingWindow(1023) | az.Sinks(4))
"""
from . import routing
from .routing import Landmark, LongHeads, TopKBlocks
from .api import attention, explain
from .patterns import *  # noqa: F401,F403
from .patterns import __all__ as _patterns_all

__version__ = "0.1.0"
__all__ = ["attention", "explain", "routing", "TopKBlocks", "LongHeads", "Landmark", *_patterns_all]

from .routing import HiP, KMeansRouting  # noqa: E402

__all__ += ["HiP", "KMeansRouting"]
