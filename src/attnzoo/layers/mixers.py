"""The token-mixer registry: a mixer is named by a short string and built for a given width.

Spec strings (what ``TinyLM(mixer=...)`` and ``attnzoo bench recall --mixer`` take)::

    "attention"                  causal softmax attention (KV cache grows with the length)
    "sliding_window:64"          causal window of 64 keys: attnzoo.SlidingWindow(63)
    "sink_window:4:60"           4 attention sinks + a window of 60 keys
    "attention:n_kv_heads=1"     keyword arguments of the mixer's factory (here GQA/MQA)
    "attention+sliding_window:32"  a hybrid: one spec per layer, joined by "+" (a "+" followed by a letter;
                                 in "feature_map=elu+1" it is part of a value)

Grammar: ``name[:arg[:arg ...]]``; an ``arg`` is a positional value or ``key=value``; values that look like
integers, floats or ``true``/``false`` are converted. A dict works too: ``{"name": "sliding_window",
"window": 64}`` (keys other than ``name`` and ``args`` are keyword arguments).

A factory is called as ``factory(d_model, n_heads, *args, **kwargs)`` and returns an ``nn.Module`` mapping
``(batch, length, d_model)`` to the same shape, causally. Each mixer reports its recurrent-state size:
the number of floats one layer keeps per sequence to continue generating after ``seq_len`` tokens
(attention: the KV cache, ``2 * kv_heads * head_dim * L``; a window: bounded by the window; a linear
mixer: ``heads * d_k * d_v``). It comes from the module's ``state_size(seq_len)`` method or from the
``state_size(module, seq_len)`` function given to `register_mixer`.

The linear-attention layers (`attnzoo.layers.linear`) fit this protocol as they are (constructor
``(d_model, n_heads, **kw)``, a ``state_size(seq_len)`` method): ``register_mixer("gla", GLA)``. `LinearMixer`
wraps a bare kernel of `attnzoo.linear` (q, k, v -> (o, final_state)) in projections.

Register your own::

    from attnzoo.layers import register_mixer
    register_mixer("my_mixer", lambda d_model, n_heads, width=4: MyMixer(d_model, width),
                   description="what it is", state_size=lambda module, seq_len: module.width * module.d_model)
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..patterns import Causal, Sinks, SlidingWindow
from .attention import Attention

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]*$")


# --------------------------------------------------------------------------------------------------
# Spec strings
# --------------------------------------------------------------------------------------------------
def _convert(text: str):
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


@dataclass(frozen=True)
class MixerSpec:
    """A parsed mixer spec: registry ``name``, positional ``args`` and keyword ``kwargs`` (sorted pairs)."""
    name: str
    args: tuple = ()
    kwargs: tuple = ()

    def __str__(self):
        parts = [self.name] + [_fmt_value(a) for a in self.args] + [f"{k}={_fmt_value(v)}" for k, v in self.kwargs]
        return ":".join(parts)


def parse_mixer(spec: Union[str, dict, MixerSpec]) -> MixerSpec:
    """``"sliding_window:64"`` / ``{"name": "sliding_window", "window": 64}`` -> `MixerSpec` (name checked)."""
    if isinstance(spec, MixerSpec):
        out = spec
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("mixer spec is empty; give a name such as 'attention' or 'sliding_window:64'")
        if len(split_layers(text)) > 1:
            raise ValueError(f"mixer spec {spec!r} names several layers ('+'); pass it as the model's mixer "
                             "(TinyLM(mixer=...)) or split it with parse_layers()")
        name, *rest = text.split(":")
        args, kwargs = [], {}
        for tok in rest:
            if "=" in tok:
                k, v = tok.split("=", 1)
                k = k.strip()
                if not k.isidentifier():
                    raise ValueError(f"mixer spec {spec!r}: {k!r} is not a valid keyword name")
                if k in kwargs:
                    raise ValueError(f"mixer spec {spec!r}: keyword {k!r} given twice")
                kwargs[k] = _convert(v)
            else:
                if kwargs:
                    raise ValueError(f"mixer spec {spec!r}: positional value {tok!r} after a key=value")
                if not tok.strip():
                    raise ValueError(f"mixer spec {spec!r} has an empty argument (two ':' in a row?)")
                args.append(_convert(tok))
        out = MixerSpec(name.strip(), tuple(args), tuple(sorted(kwargs.items())))
    elif isinstance(spec, dict):
        d = dict(spec)
        if "name" not in d:
            raise ValueError(f"mixer spec dict needs a 'name' key, got keys {sorted(d)}")
        name = d.pop("name")
        args = d.pop("args", ())
        if not isinstance(name, str):
            raise TypeError(f"mixer spec 'name' must be a string, got {type(name).__name__}")
        if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
            raise TypeError(f"mixer spec 'args' must be a list, got {type(args).__name__}")
        out = MixerSpec(name, tuple(args), tuple(sorted(d.items())))
    else:
        raise TypeError(f"mixer spec must be a string, a dict or a MixerSpec, got {type(spec).__name__}")
    get_mixer(out.name)  # unknown names fail here, with the list of known ones
    return out


def split_layers(text: str) -> list:
    """``"attention+sliding_window:8"`` -> ``["attention", "sliding_window:8"]``. A ``+`` separates layers only
    when a letter or ``_`` follows it, so values such as ``feature_map=elu+1`` stay whole."""
    return [t for t in re.split(r"\+(?=[A-Za-z_])", text)]


def parse_layers(mixer, n_layers: int) -> list:
    """Per-layer specs for ``n_layers`` layers from one spec (every layer), a ``"a+b"`` string or a list.

    A list (or ``+`` string) shorter than ``n_layers`` repeats when its length divides ``n_layers``
    (``["attention", "sliding_window:8"]`` on 4 layers alternates); otherwise its length must match.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
    if isinstance(mixer, str) and "+" in mixer:
        mixer = split_layers(mixer)
    if isinstance(mixer, (list, tuple)):
        specs = [parse_mixer(m) for m in mixer]
        if not specs:
            raise ValueError("mixer list is empty")
        if n_layers % len(specs):
            raise ValueError(f"{len(specs)} mixer specs do not fit {n_layers} layers: give one spec, one per layer, "
                             "or a list whose length divides n_layers")
        return specs * (n_layers // len(specs))
    return [parse_mixer(mixer)] * n_layers


def layers_label(specs: Sequence[MixerSpec]) -> str:
    """One string for a list of layer specs: ``"attention"`` when all are equal, else ``"a+b"``."""
    specs = list(specs)
    if all(s == specs[0] for s in specs):
        return str(specs[0])
    # shortest repeating unit
    for n in range(1, len(specs) + 1):
        if len(specs) % n == 0 and specs == specs[:n] * (len(specs) // n):
            return "+".join(str(s) for s in specs[:n])
    return "+".join(str(s) for s in specs)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixerEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str = ""
    state_size: Optional[Callable[[nn.Module, int], int]] = None


_REGISTRY: dict = {}


def register_mixer(name: str, factory: Optional[Callable] = None, *, description: str = "",
                   state_size: Optional[Callable[[nn.Module, int], int]] = None, overwrite: bool = False):
    """Register ``factory(d_model, n_heads, *args, **kwargs) -> nn.Module`` under ``name``.

    ``state_size(module, seq_len) -> int`` gives the recurrent-state floats per layer and sequence; without
    it the module's own ``state_size(seq_len)`` method is used. Re-registering a name needs
    ``overwrite=True``. Without ``factory`` it returns a decorator.
    """
    if factory is None:
        return lambda f: register_mixer(name, f, description=description, state_size=state_size,
                                        overwrite=overwrite)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"mixer name must be a string of letters, digits, '_', '-' or '.' starting with a letter "
                         f"(no ':' or '+'), got {name!r}")
    if not callable(factory):
        raise TypeError(f"mixer factory for {name!r} must be callable, got {type(factory).__name__}")
    if state_size is not None and not callable(state_size):
        raise TypeError(f"state_size for {name!r} must be callable (module, seq_len) -> int")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"mixer {name!r} is already registered; pass overwrite=True to replace it")
    if not description:
        doc = inspect.getdoc(factory) or ""
        description = doc.strip().splitlines()[0] if doc.strip() else ""
    _REGISTRY[name] = MixerEntry(name, factory, description, state_size)
    return factory


def unregister_mixer(name: str) -> None:
    """Remove ``name`` from the registry (``KeyError`` when absent)."""
    del _REGISTRY[name]


def mixer_names() -> list:
    return list(_REGISTRY)


def get_mixer(name: str) -> MixerEntry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_REGISTRY))}") from None


def build_mixer(spec, d_model: int, n_heads: int = 1) -> nn.Module:
    """Build the mixer named by ``spec`` for width ``d_model`` and ``n_heads`` heads."""
    s = parse_mixer(spec)
    entry = get_mixer(s.name)
    kwargs = dict(s.kwargs)
    try:
        inspect.signature(entry.factory).bind(d_model, n_heads, *s.args, **kwargs)
    except TypeError as e:
        raise ValueError(f"mixer {str(s)!r}: bad arguments for {s.name!r} ({e}); "
                         f"signature: {s.name}{_public_signature(entry.factory)}") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    module = entry.factory(d_model, n_heads, *s.args, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"mixer factory {s.name!r} returned {type(module).__name__}, not an nn.Module")
    module.mixer_spec = str(s)
    module.mixer_name = s.name
    return module


def _public_signature(factory) -> str:
    try:
        params = list(inspect.signature(factory).parameters.values())[2:]
    except (TypeError, ValueError):
        return "(...)"
    return "(" + ", ".join(str(p) for p in params) + ")"


def mixer_state_size(module: nn.Module, seq_len: int) -> int:
    """Recurrent-state floats of one built mixer layer per sequence after ``seq_len`` tokens."""
    name = getattr(module, "mixer_name", None)
    entry = _REGISTRY.get(name) if name else None
    if entry is not None and entry.state_size is not None:
        return int(entry.state_size(module, seq_len))
    fn = getattr(module, "state_size", None)
    if callable(fn):
        return int(fn(seq_len))
    raise ValueError(f"mixer {name or type(module).__name__!r} does not report its state size: give it a "
                     "state_size(seq_len) method or pass state_size=... to register_mixer")


def describe_mixers() -> list:
    """``[name, signature, description]`` rows of the registry."""
    return [[e.name, _public_signature(e.factory), e.description] for e in _REGISTRY.values()]


# --------------------------------------------------------------------------------------------------
# Built-in mixers: attention over any pattern
# --------------------------------------------------------------------------------------------------
def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _attention(d_model, n_heads, *, n_kv_heads=None, rope=True, backend="auto"):
    """causal softmax attention (KV cache: 2 * kv_heads * head_dim * L floats)"""
    return Attention(d_model, n_heads, n_kv_heads, pattern=Causal(), rope=rope, backend=backend)


def _sliding_window(d_model, n_heads, window, *, n_kv_heads=None, rope=True, backend="auto"):
    """causal sliding window of `window` keys (the query's own included): SlidingWindow(window - 1)"""
    w = _positive("sliding_window window", window)
    return Attention(d_model, n_heads, n_kv_heads, pattern=SlidingWindow(w - 1), rope=rope, backend=backend)


def _sink_window(d_model, n_heads, sinks, window, *, n_kv_heads=None, rope=True, backend="auto"):
    """`sinks` attention sinks plus a causal window of `window` keys: Sinks(n) | SlidingWindow(window - 1)"""
    n, w = _positive("sink_window sinks", sinks), _positive("sink_window window", window)
    return Attention(d_model, n_heads, n_kv_heads, pattern=Sinks(n) | SlidingWindow(w - 1), rope=rope,
                     backend=backend)


register_mixer("attention", _attention)
register_mixer("sliding_window", _sliding_window)
register_mixer("sink_window", _sink_window)


# --------------------------------------------------------------------------------------------------
# Linear-attention family: an adapter around kernels (B, H, T, D) -> (o, final_state)
# --------------------------------------------------------------------------------------------------
class LinearMixer(nn.Module):
    """Projections around a linear-attention kernel ``kernel(q, k, v, **kernel_kwargs) -> (o, final_state)``.

    ``kernel`` is a callable or the name of a function in ``attnzoo.linear`` (looked up when the module is
    built). q, k, v are ``(batch, heads, length, head_dim)``; the recurrent state is ``heads * d_k * d_v``
    floats whatever the length. Gated kernels (GLA, gated DeltaNet, KDA) need gate/beta projections of their
    own: subclass and override ``kernel_inputs``.
    """

    def __init__(self, d_model: int, n_heads: int = 1, kernel: Union[str, Callable] = "linear_attention", *,
                 head_dim: Optional[int] = None, bias: bool = False, **kernel_kwargs: Any):
        super().__init__()
        _positive("LinearMixer d_model", d_model)
        _positive("LinearMixer n_heads", n_heads)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"LinearMixer d_model={d_model} is not divisible by n_heads={n_heads}")
            head_dim = d_model // n_heads
        if isinstance(kernel, str):
            kernel_name = kernel
            try:
                import attnzoo.linear as _linear
            except ImportError as e:
                raise ValueError(f"linear mixer kernel {kernel!r} needs attnzoo.linear, which is not importable "
                                 f"({e})") from None
            if not callable(getattr(_linear, kernel, None)):
                raise ValueError(f"attnzoo.linear has no function {kernel!r}")
            kernel = getattr(_linear, kernel)
        else:
            if not callable(kernel):
                raise TypeError(f"LinearMixer kernel must be callable or a name, got {type(kernel).__name__}")
            kernel_name = getattr(kernel, "__name__", type(kernel).__name__)
        self.kernel, self.kernel_name, self.kernel_kwargs = kernel, kernel_name, dict(kernel_kwargs)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def kernel_inputs(self, x: torch.Tensor) -> dict:
        b, t, _ = x.shape
        heads = lambda y: y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        return dict(q=heads(self.q_proj(x)), k=heads(self.k_proj(x)), v=heads(self.v_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        out = self.kernel(**self.kernel_inputs(x), **self.kernel_kwargs)
        o = out[0] if isinstance(out, (tuple, list)) else out
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def state_size(self, seq_len: int) -> int:
        """Floats of the kernel's final state for one sequence (probed once with ``output_final_state=True``
        on a 2-token input, so feature maps that widen the keys and normalisers are counted); kernels that
        do not return a state count as ``heads * head_dim * head_dim``."""
        if getattr(self, "_state_floats", None) is None:
            self._state_floats = self.n_heads * self.head_dim * self.head_dim
            p = next(self.parameters())
            x = torch.randn(1, 2, self.d_model, device=p.device, dtype=p.dtype)
            try:
                with torch.no_grad():
                    out = self.kernel(**self.kernel_inputs(x), **self.kernel_kwargs, output_final_state=True)
                state = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
                if isinstance(state, torch.Tensor):
                    self._state_floats = int(state.numel())
            except TypeError:  # the kernel has no output_final_state
                pass
        return self._state_floats

    def extra_repr(self):
        return f"kernel={self.kernel_name}, d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}"
