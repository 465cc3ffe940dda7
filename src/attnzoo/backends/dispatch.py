"""Picks a backend for a request and explains why every other one declined."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import Backend, Request
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SDPABackend
from .triton import MAX_HEAD_DIM as TRITON_MAX_HEAD_DIM, TritonBackend, decode_route

BACKENDS: dict[str, Backend] = {b.name: b for b in (SDPABackend(), FlexBackend(), TritonBackend(), ReferenceBackend())}

# Order in which `auto` tries the backends: the fastest exact one that can run and accepts auto.
AUTO_ORDER = ("sdpa", "triton", "flex", "reference")


def auto_order(req: Request) -> tuple:
    """`AUTO_ORDER`, except that short-query inference with head dims above 256 on CUDA (MLA's absorbed
    decode: one latent head, D=576, Dv=512) tries triton first: SDPA has no flash kernel for such heads and
    ran it on a generic kernel at 99 GB/s (3.1 ms for batch 8 x 32K keys, BENCHMARKS.md "MLA decode at 32K
    context"), where the split-K decode kernel reads the latent cache once, as it does for GQA decode."""
    if (req.device.type == "cuda" and max(req.D, req.Dv) > TRITON_MAX_HEAD_DIM and decode_route(req)):
        return ("triton",) + tuple(n for n in AUTO_ORDER if n != "triton")
    return AUTO_ORDER


@dataclass
class Explanation:
    """Which backend `auto` picks for a request, and why each of the others declined."""
    backend: str | None
    request: str
    reasons: dict = field(default_factory=dict)  # name -> (ok, reason)

    def __str__(self):
        lines = [f"request: {self.request}", f"auto picks: {self.backend or 'nothing'}"]
        for name, (ok, why) in self.reasons.items():
            mark = "picked" if name == self.backend else ("could run" if ok else "declined")
            lines.append(f"  {name:<10} {mark:<9} {why}")
        return "\n".join(lines)


def explain_request(req: Request) -> Explanation:
    reasons, chosen = {}, None
    for name in auto_order(req):
        b = BACKENDS[name]
        ok, why = b.can_run(req)
        if ok:
            aok, awhy = b.auto_ok(req)
            if not aok:
                ok, why = False, awhy
        if ok and chosen is None:
            chosen = name
        reasons[name] = (ok, why)
    return Explanation(chosen, req.describe(), reasons)


def select(req: Request, backend: str) -> Backend:
    if backend == "auto":
        ex = explain_request(req)
        if ex.backend is None:
            detail = "; ".join(f"{n}: {w}" for n, (_, w) in ex.reasons.items())
            raise ValueError(f"backend='auto': no backend can run this request ({detail})")
        return BACKENDS[ex.backend]
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose from 'auto', "
                         + ", ".join(repr(n) for n in BACKENDS))
    b = BACKENDS[backend]
    ok, why = b.can_run(req)
    if not ok:
        raise ValueError(f"backend={backend!r} cannot run this request: {why}")
    return b


def capabilities() -> list[dict]:
    """One row per backend for `attnzoo list`."""
    return [dict(backend=b.name, patterns=b.patterns, devices=", ".join(b.devices),
                 dtypes=b.dtypes, lse="yes" if b.supports_lse else "no", grad=b.grad, description=b.description)
            for b in BACKENDS.values()]
