"""The protocol's correctness rule, shared by the tests and the GPU checks.

A low-precision result passes when its max error against the float64 reference is at most
2 x the max error of the plain PyTorch math path in the same low precision, plus 1e-5
(FlashAttention's rule), and its relative RMSE is under 5e-3. float32 results: relative error
under 1e-4 (TF32 off) or 5e-3 (TF32 on). NaN never passes.
"""
from __future__ import annotations

import torch


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    d = (x.double() - ref.double())
    d = torch.where(fin, d, torch.where(x.double() == ref.double(), 0.0, float("inf")))
    return d.abs().max().item() if d.numel() else 0.0


def check_close(name: str, x: torch.Tensor, ref: torch.Tensor, *, baseline: torch.Tensor | None = None,
                tf32: bool = False) -> None:
    """Raise AssertionError with a readable message if ``x`` fails the protocol's rule against ``ref``.

    ``baseline``: the same computation by the plain math path in ``x``'s low precision (required
    for float16/bfloat16). Infinite reference entries (lse = -inf of empty rows) must match exactly.
    """
    if torch.isnan(x).any():
        raise AssertionError(f"{name}: NaN in result")
    if x.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    err = max_err(x, ref)
    fin = torch.isfinite(ref)
    rr = rel_rmse(torch.where(fin, x.double(), 0.0), torch.where(fin, ref.double(), 0.0))
    if x.dtype in (torch.float16, torch.bfloat16):
        if baseline is None:
            raise ValueError("check_close: a low-precision result needs the math-path baseline")
        bound = 2 * max_err(baseline, ref) + 1e-5
        if not (err <= bound and rr < 5e-3):
            raise AssertionError(f"{name}: max err {err:.3g} (bound {bound:.3g}), rel RMSE {rr:.3g} (bound 5e-3)")
    else:
        bound = 5e-3 if tf32 else 1e-4
        if x.dtype == torch.float64:
            bound = 1e-10
        if not (err != float("inf") and rr < bound):
            raise AssertionError(f"{name}: relative error {rr:.3g} (bound {bound:.3g}), max err {err:.3g}")
