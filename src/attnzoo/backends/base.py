"""What every backend shares: the validated request and the `Backend` interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..patterns import Causal, Full, Pattern


@dataclass(frozen=True, eq=False)
class Request:
    """One validated attention call. Tensors are (B, H, L, D)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Optional[Pattern]
    scale: float
    return_lse: bool

    @property
    def B(self): return self.q.shape[0]
    @property
    def Hq(self): return self.q.shape[1]
    @property
    def Hkv(self): return self.k.shape[1]
    @property
    def Lq(self): return self.q.shape[2]
    @property
    def Lk(self): return self.k.shape[2]
    @property
    def D(self): return self.q.shape[3]
    @property
    def Dv(self): return self.v.shape[3]
    @property
    def device(self): return self.q.device
    @property
    def dtype(self): return self.q.dtype

    @property
    def kind(self) -> str:
        """'full', 'causal' or 'pattern'."""
        if self.pattern is None or isinstance(self.pattern, Full):
            return "full"
        if isinstance(self.pattern, Causal):
            return "causal"
        return "pattern"

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def describe(self) -> str:
        return (f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Lq={self.Lq} Lk={self.Lk} D={self.D} Dv={self.Dv} "
                f"{str(self.dtype).replace('torch.', '')} on {self.device.type}, pattern={self.pattern!r}")


class Backend:
    """A way to compute attention. Subclasses set `name`, `description`, `devices`, and implement
    `can_run` and `run`."""
    name: str = ""
    description: str = ""
    devices: tuple = ("cpu", "cuda")
    patterns: str = ""
    supports_lse: bool = True
    dtypes: str = "fp16, bf16, fp32, fp64"
    grad: str = "yes"

    def can_run(self, req: Request) -> tuple[bool, str]:
        raise NotImplementedError

    def auto_ok(self, req: Request) -> tuple[bool, str]:
        """Whether `backend="auto"` may pick this backend (beyond `can_run`)."""
        return True, ""

    def run(self, req: Request):
        """-> (out in the input dtype, lse float32 or None)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<backend {self.name}>"
