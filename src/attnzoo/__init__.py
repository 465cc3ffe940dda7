"""attnzoo: the attention mechanisms of the long-context literature behind one API."""
from .patterns import *  # noqa: F401,F403
from .patterns import __all__ as _patterns_all

__version__ = "0.1.0"
__all__ = list(_patterns_all)
