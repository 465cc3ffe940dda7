"""Feature maps phi for linear attention: exp(q . k) is replaced by phi(q) . phi(k), so that attention becomes
the recurrence S_t = S_{t-1} + phi(k_t)^T v_t, o_t = scale * phi(q_t) S_t.

Every map acts on the last dimension of (B, H, T, D) tensors and returns (B, H, T, F):

- ``"identity"``: phi(x) = x (F = D).
- ``"elu+1"``: phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020) (F = D).
- ``"relu"``: phi(x) = max(x, 0) (F = D).
- ``"taylor"``: the second-order Taylor map of BASED (Arora et al., 2024)::

      phi(x) = [1,  x / d^(1/4),  vec(x x^T) / (sqrt(2) * sqrt(d))]        F = 1 + D + D^2

  so that phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d): the softmax temperature 1/sqrt(d) is
  inside the map ("the scaled q, k" are x / d^(1/4)), and 1 + s + s^2/2 > 0 for every s. The op's
  ``scale`` still multiplies phi(q) on top; with ``normalize=True`` it cancels.
- a learnable map: any callable or ``nn.Module`` taking (B, H, T, D) to (B, H, T, F), e.g.
  :class:`HedgehogFeatureMap` (Zhang et al., 2024): phi(x) = [softmax(x W + b), softmax(-(x W + b))]
  over the feature axis, a per-head (or shared) linear projection followed by exp-style normalisation,
  F = 2 * feature_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("identity", "elu+1", "relu", "taylor")


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def taylor(x: torch.Tensor) -> torch.Tensor:
    """BASED's map: phi(q) . phi(k) = 1 + s + s^2/2, s = q . k / sqrt(D); output dim 1 + D + D^2."""
    d = x.shape[-1]
    xs = x * d ** -0.25
    second = (xs.unsqueeze(-1) * xs.unsqueeze(-2)).flatten(-2) * 0.5 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), xs, second], -1)


_BY_NAME = {"identity": identity, "elu+1": elu_plus_one, "relu": relu, "taylor": taylor}


def feature_dim(feature_map, dim: int) -> int:
    """Output dimension F of a named map for head dimension ``dim`` (modules: their ``output_dim``)."""
    if feature_map == "taylor":
        return 1 + dim + dim * dim
    if isinstance(feature_map, str):
        return dim
    return int(feature_map.output_dim)


class HedgehogFeatureMap(torch.nn.Module):
    """Hedgehog's learnable feature map: phi(x) = [softmax(x W + b), softmax(-(x W + b))].

    Args:
        dim: head dimension D of the inputs.
        feature_dim: width of the projection (output dim is ``2 * feature_dim``); default ``dim``.
        heads: 1 to share the projection across heads, or H for one projection per head (then the
            inputs must have exactly H heads).

    The projection starts as the (rectangular) identity with zero bias, so at initialisation phi is a
    softmax of the raw features; train it (e.g. to mimic softmax attention weights) like any module.
    """

    def __init__(self, dim: int, feature_dim: int | None = None, heads: int = 1):
        super().__init__()
        feature_dim = dim if feature_dim is None else feature_dim
        for name, val in (("dim", dim), ("feature_dim", feature_dim), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"HedgehogFeatureMap: {name} must be a positive int, got {val!r}")
        self.dim, self.feature_dim, self.heads = dim, feature_dim, heads
        self.weight = torch.nn.Parameter(torch.eye(dim, feature_dim).expand(heads, dim, feature_dim).clone())
        self.bias = torch.nn.Parameter(torch.zeros(heads, feature_dim))

    @property
    def output_dim(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"HedgehogFeatureMap expects (batch, heads, length, {self.dim}), got {tuple(x.shape)}")
        if self.heads != 1 and x.shape[1] != self.heads:
            raise ValueError(f"HedgehogFeatureMap has {self.heads} per-head projections, input has {x.shape[1]} heads")
        dt = torch.promote_types(x.dtype, self.weight.dtype)
        z = torch.einsum("bhtd,hdf->bhtf", x.to(dt), self.weight.to(dt)) + self.bias.to(dt)[:, None]
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, feature_dim={self.feature_dim}, heads={self.heads}"


def resolve(feature_map):
    """Name or callable -> callable; ValueError for an unknown name, TypeError for anything else."""
    if isinstance(feature_map, str):
        if feature_map not in _BY_NAME:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {feature_map!r}")
        return _BY_NAME[feature_map]
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a name {FEATURE_MAPS} or a callable, got {type(feature_map).__name__}")
    return feature_map


def apply(phi, q: torch.Tensor, k: torch.Tensor):
    """phi(q), phi(k), checked: (B, H, T, F) each, one F, floating point, same batch/heads/length."""
    fq, fk = phi(q), phi(k)
    for name, x, ref in (("feature_map(q)", fq, q), ("feature_map(k)", fk, k)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must return a floating-point tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[:3] != ref.shape[:3] or x.shape[-1] == 0:
            raise ValueError(f"{name} must return (batch, heads, length, features) matching "
                             f"{tuple(ref.shape[:3])}, got {tuple(x.shape)}")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map gave {fq.shape[-1]} features for q but {fk.shape[-1]} for k")
    return fq, fk
