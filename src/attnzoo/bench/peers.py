"""Other libraries' attention kernels, measured side by side with attnzoo's backends (the speed suites).

A peer is an adapter around one public function of another package:

- ``name``: the backend label in the records (``--backend flash-attn``);
- ``families``: the pattern families it can run (``full``, ``causal``, ``window``, ``neighborhood``; see
  `pattern_family`); the suites plan a peer only on patterns of those families;
- ``available() -> (bool, reason)``: whether the package imports and has the API the adapter calls;
- ``supports(pattern, dtype, device) -> (bool, reason)``: whether this very case can run;
- ``prepare(q, k, v, pattern)``: from attnzoo's ``(B, H, L, D)`` inputs, build the peer's own inputs once
  (layout changes, repeated K/V heads, outside any timed region) and return the callable that is timed:
  ``call()`` runs one attention and returns the peer's output; ``call.inputs`` are the tensors a
  backward pass differentiates (leaves that require grad when q did).

Nothing here is imported at ``import attnzoo`` time and no peer package is needed: a missing package
or API is an ``(False, reason)`` answer, which the suite records as ``unsupported`` with that reason.
flash-linear-attention is not a peer here: it implements linear attention, not softmax attention.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Optional

import torch

from .timing import Unsupported


def pattern_family(pattern) -> Optional[str]:
    """'full', 'causal', 'window' (a lone `SlidingWindow`), 'neighborhood' (a lone `Neighborhood`), or
    None for every other pattern (no peer runs those)."""
    from ..patterns import Causal, Full, Neighborhood, SlidingWindow
    if pattern is None or type(pattern) is Full:
        return "full"
    if type(pattern) is Causal:
        return "causal"
    if type(pattern) is SlidingWindow:
        return "window"
    if type(pattern) is Neighborhood:
        return "neighborhood"
    return None


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _import(module: str, install: str):
    """-> (module or None, reason). Import failures of an installed package (a binary built for another
    torch or CUDA) are reasons too."""
    try:
        return importlib.import_module(module), ""
    except ModuleNotFoundError as e:
        if e.name and module.split(".")[0] == e.name.split(".")[0]:
            return None, f"{install} is not installed (pip install {install})"
        return None, f"{install} is installed but `import {module}` failed: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a broken extension, an ABI mismatch, ...
        return None, f"{install} is installed but `import {module}` failed: {type(e).__name__}: {e}"


def _params(fn) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


class _Call:
    """The timed callable of a peer: ``fn()`` -> output; ``inputs`` for the backward pass."""

    def __init__(self, fn: Callable, inputs: tuple, impl: str, note: str = ""):
        self.fn, self.inputs, self.impl, self.note = fn, inputs, impl, note

    def __call__(self):
        out = self.fn()
        return out[0] if isinstance(out, (tuple, list)) else out


def _leaf(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` as a new leaf, requiring grad when ``like`` does."""
    return t.detach().contiguous().requires_grad_(like.requires_grad)


def _repeat_kv(q, k, v):
    """K/V with their heads repeated to q's head count (GQA), and the repetition factor."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v, 1
    return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), rep


class Peer:
    name: str = ""
    package: str = ""           # the distribution name (pip install ...)
    description: str = ""
    families: tuple = ()
    dtypes: tuple = (torch.float16, torch.bfloat16)

    def available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def supports(self, pattern, dtype=None, device=None) -> tuple[bool, str]:
        fam = pattern_family(pattern)
        if fam not in self.families:
            return False, (f"{self.name} runs only {', '.join(self.families)} attention, not {pattern!r}")
        if device is not None and torch.device(device).type != "cuda":
            return False, f"{self.name} runs on CUDA devices only, not {torch.device(device).type}"
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return False, f"{self.name} takes {names} inputs, not {str(dtype).replace('torch.', '')}"
        return True, ""

    def version(self) -> Optional[str]:
        return _version(self.package)

    def check(self, q, pattern) -> None:
        """Raise `Unsupported` with the reason when this case cannot run."""
        ok, why = self.available()
        if not ok:
            raise Unsupported(why)
        ok, why = self.supports(pattern, q.dtype, q.device)
        if not ok:
            raise Unsupported(why)

    def prepare(self, q, k, v, pattern) -> _Call:
        raise NotImplementedError

    def __repr__(self):
        return f"<peer {self.name}: {self.description}>"


class FlashAttn(Peer):
    """``flash_attn.flash_attn_func`` (FlashAttention 2): layout (B, L, H, D), GQA native, bottom-right
    causal and ``window_size=(left, right)`` windows with attnzoo's meaning."""
    name = "flash-attn"
    package = "flash-attn"
    description = "FlashAttention 2: flash_attn.flash_attn_func"
    families = ("full", "causal", "window")

    def _fn(self):
        mod, why = _import("flash_attn", self.package)
        if mod is None:
            return None, why
        fn = getattr(mod, "flash_attn_func", None)
        if fn is None:
            return None, f"flash-attn {self.version()} has no flash_attn.flash_attn_func"
        return fn, ""

    def available(self):
        fn, why = self._fn()
        return (fn is not None), why

    def prepare(self, q, k, v, pattern):
        self.check(q, pattern)
        fn, _ = self._fn()
        if q.shape[-1] > 256:
            raise Unsupported(f"flash-attn supports head dims up to 256, not {q.shape[-1]}")
        fam = pattern_family(pattern)
        kw = dict(causal=fam == "causal")
        if fam == "window":
            if "window_size" not in _params(fn):
                raise Unsupported(f"flash-attn {self.version()} has no window_size argument (sliding windows "
                                  "need flash-attn >= 2.3)")
            kw = dict(causal=pattern.right == 0, window_size=(pattern.left, pattern.right))
        qq, kk, vv = (_leaf(t.transpose(1, 2), t) for t in (q, k, v))   # (B, L, H, D)
        return _Call(lambda: fn(qq, kk, vv, **kw), (qq, kk, vv),
                     f"flash_attn.flash_attn_func {self.version()} ({', '.join(f'{a}={b}' for a, b in kw.items())})")


class XFormers(Peer):
    """``xformers.ops.memory_efficient_attention``: layout (B, L, H, D); GQA through the 5-D (B, L, G, H, D)
    form with K/V broadcast over the group; bottom-right causal and local masks from ``fmha.attn_bias``."""
    name = "xformers"
    package = "xformers"
    description = "xFormers: xformers.ops.memory_efficient_attention"
    families = ("full", "causal", "window")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def _mods(self):
        ops, why = _import("xformers.ops", self.package)
        if ops is None:
            return None, None, why
        fn = getattr(ops, "memory_efficient_attention", None)
        if fn is None:
            return None, None, f"xformers {self.version()} has no xformers.ops.memory_efficient_attention"
        bias, _ = _import("xformers.ops.fmha.attn_bias", self.package)
        return fn, bias, ""

    def available(self):
        fn, _, why = self._mods()
        return (fn is not None), why

    def _bias(self, bias_mod, pattern):
        fam = pattern_family(pattern)
        if fam == "full":
            return None
        names = {"causal": "LowerTriangularFromBottomRightMask", "window": "LocalAttentionFromBottomRightMask"}
        cls = getattr(bias_mod, names[fam], None) if bias_mod is not None else None
        if cls is None:
            raise Unsupported(f"xformers {self.version()} has no fmha.attn_bias.{names[fam]}")
        if fam == "causal":
            return cls()
        return cls(window_left=pattern.left, window_right=pattern.right)

    def prepare(self, q, k, v, pattern):
        self.check(q, pattern)
        fn, bias_mod, _ = self._mods()
        bias = self._bias(bias_mod, pattern)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        qq, kk, vv = (_leaf(t.transpose(1, 2), t) for t in (q, k, v))   # (B, L, H, D)
        if hq == hkv:
            return _Call(lambda: fn(qq, kk, vv, attn_bias=bias), (qq, kk, vv),
                         f"xformers.ops.memory_efficient_attention {self.version()} (attn_bias="
                         f"{type(bias).__name__ if bias is not None else None})")
        g = hq // hkv

        def call():   # GQA: (B, L, Hkv, G, D) with K/V broadcast (stride 0) over G; reshaped back
            out = fn(qq.view(b, lq, hkv, g, d), kk[:, :, :, None].expand(b, lk, hkv, g, d),
                     vv[:, :, :, None].expand(b, lk, hkv, g, vv.shape[-1]), attn_bias=bias)
            return out.reshape(b, lq, hq, out.shape[-1])
        return _Call(call, (qq, kk, vv), f"xformers.ops.memory_efficient_attention {self.version()} (5-D GQA form, "
                     f"attn_bias={type(bias).__name__ if bias is not None else None})")


class Natten(Peer):
    """NATTEN's fused neighborhood attention: ``natten.na1d/na2d/na3d`` (NATTEN >= 0.20, with stride), else
    ``natten.functional.na1d/na2d/na3d`` (0.17-0.19, no stride). Layout (B, *grid, H, D); K/V heads are
    repeated for GQA outside the timed region."""
    name = "natten"
    package = "natten"
    description = "NATTEN: fused neighborhood attention (na1d / na2d / na3d)"
    families = ("neighborhood",)

    def _fns(self):
        """-> ({ndim: fn}, api label, reason)."""
        top, why = _import("natten", self.package)
        if top is None:
            return None, "", why
        fns = {n: getattr(top, f"na{n}d", None) for n in (1, 2, 3)}
        if all(fns.values()):
            return fns, "natten.na{n}d", ""
        func, _ = _import("natten.functional", self.package)
        fns = {n: getattr(func, f"na{n}d", None) for n in (1, 2, 3)} if func is not None else {}
        if fns and all(fns.values()):
            return fns, "natten.functional.na{n}d", ""
        return None, "", (f"natten {self.version()} has neither natten.na1d/na2d/na3d nor "
                          "natten.functional.na1d/na2d/na3d (fused neighborhood attention needs natten >= 0.17)")

    def available(self):
        fns, _, why = self._fns()
        return (fns is not None), why

    def prepare(self, q, k, v, pattern):
        self.check(q, pattern)
        fns, api, _ = self._fns()
        b, hq, L, d = q.shape
        grid = pattern.grid if pattern.grid is not None else (L,)
        n = len(grid)
        if k.shape[2] != L or L != int(torch.tensor(grid).prod()):
            raise Unsupported(f"natten: self-attention over the grid {grid} only (Lq = Lk = {L})")
        fn = fns[n]
        params = _params(fn)
        kw = dict(kernel_size=pattern.kernel_size, dilation=pattern.dilation, is_causal=pattern.causal)
        if any(s != 1 for s in pattern.stride):
            if "stride" not in params:
                raise Unsupported(f"{api.format(n=n)} of natten {self.version()} has no stride argument "
                                  f"(stride {pattern.stride} needs natten >= 0.20)")
            kw["stride"] = pattern.stride
        if params and "is_causal" not in params:
            if any(pattern.causal):
                raise Unsupported(f"{api.format(n=n)} of natten {self.version()} has no is_causal argument")
            kw.pop("is_causal")
        if n == 1:   # natten takes ints for 1-D
            kw = {a: (x[0] if isinstance(x, tuple) else x) for a, x in kw.items()}
        kr, vr, rep = _repeat_kv(q, k, v)

        def heads_last(t, like):
            return _leaf(t.transpose(1, 2).reshape(b, *grid, t.shape[1], t.shape[-1]), like)
        qq, kk, vv = heads_last(q, q), heads_last(kr, k), heads_last(vr, v)
        note = (f"natten: K/V heads repeated {rep}x outside the timed region (GQA)" if rep > 1 else "")
        return _Call(lambda: fn(qq, kk, vv, **kw), (qq, kk, vv),
                     f"{api.format(n=n)} {self.version()} ({', '.join(f'{a}={x}' for a, x in kw.items())})", note)


PEERS = {p.name: p for p in (FlashAttn(), XFormers(), Natten())}


def get_peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}") from None


def peer_status() -> dict:
    """name -> (available, reason) of every peer (imports the packages that are installed)."""
    return {name: p.available() for name, p in PEERS.items()}
