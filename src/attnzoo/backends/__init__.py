"""Backends: how attention is computed. `dispatch` picks one and explains the choice."""
from .base import Backend, Request
from .dispatch import BACKENDS, AUTO_ORDER, Explanation, capabilities, explain_request, select
from .reference import reference_attention

__all__ = ["Backend", "Request", "BACKENDS", "AUTO_ORDER", "Explanation", "capabilities", "explain_request",
           "select", "reference_attention"]
