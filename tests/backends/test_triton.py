"""attnzoo's Triton forward kernel against the float64 reference, run by Triton's CPU interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py) on small shapes: every pattern class, GQA, cross
attention both ways, odd lengths, padded head dims (Dv != D), fully masked rows; outputs are
poisoned with NaN before each launch so an unwritten element fails."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close

from common import dense, inputs

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton.ops import attention_fwd  # noqa: E402

GRID = (5, 8)
PATTERNS = {
    "full": None,
    "causal": az.Causal(),
    "window": az.SlidingWindow(9, 3),
    "sinks+window": az.SlidingWindow(6) | az.Sinks(3),
    "chunked&causal": az.Chunked(11) & az.Causal(),
    "dilated": az.Dilated(5, 3),
    "strided": az.Strided(7),
    "prefix": az.PrefixLM(13),
    "power": az.PowerAttention(2, sinks=2),
    "document&causal": az.Document([7, 20, 13]) & az.Causal(),
    "nbhd1d-dil-stride": az.Neighborhood(5, dilation=2, stride=2),
    "nbhd2d": az.Neighborhood((3, 5), grid=GRID),
    "nbhd2d-causal-dil": az.Neighborhood((3, 3), dilation=(1, 2), causal=(True, False), grid=GRID),
    "nbhd3d-stride": az.Neighborhood((2, 3, 3), stride=(1, 2, 3), grid=(2, 4, 5)),
    "perhead": az.PerHead([az.Causal(), az.SlidingWindow(4), az.Full(), az.Neighborhood((3, 3), grid=GRID)]),
}
SELF_ONLY = {k for k, p in PATTERNS.items() if "nbhd" in k or k == "perhead" or "document" in k}


def _check(pattern, shape, dtype, seed=0, cfg=None):
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    scale = shape[5] ** -0.5
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out, lse = attention_fwd(ql, kl, vl, pattern, scale, poison=True, cfg=cfg)
    base = dense(ql, kl, vl, pattern)[0] if dtype == torch.float16 else None
    check_close("out", out, ref_o, baseline=base)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "lse: -inf rows differ"
    fin = torch.isfinite(ref_l)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse[fin].double(), ref_l[fin].double(), rtol=tol, atol=tol)
    return out, lse


@pytest.mark.parametrize("pname", PATTERNS)
def test_every_pattern_self_attention_gqa(pname):
    _check(PATTERNS[pname], (2, 4, 2, 40, 40, 32, 32), torch.float32)


@pytest.mark.parametrize("pname", sorted(set(PATTERNS) - SELF_ONLY))
@pytest.mark.parametrize("lq, lk", [(13, 45), (45, 19), (1, 37)])
def test_cross_attention_bottom_right(pname, lq, lk):
    _check(PATTERNS[pname], (1, 2, 1, lq, lk, 32, 32), torch.float32, seed=lq)


@pytest.mark.parametrize("d, dv", [(64, 64), (48, 24), (32, 64)])
def test_head_dims_and_fp16(d, dv):
    _check(az.SlidingWindow(10) | az.Sinks(2), (1, 2, 2, 33, 33, d, dv), torch.float16)


def test_fully_masked_rows():
    out, lse = _check(az.Causal(), (1, 2, 1, 30, 12, 32, 32), torch.float32)
    assert torch.all(out[:, :, :18] == 0) and torch.all(torch.isneginf(lse[:, :, :18]))


def test_through_attention_api_and_declines():
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 20, 20, 32, 32))
    out = az.attention(q, k, v, az.SlidingWindow(5), backend="triton")
    torch.testing.assert_close(out, az.attention(q, k, v, az.SlidingWindow(5), backend="reference"))
    with pytest.raises(ValueError, match="backward pass is not implemented"):
        az.attention(q.requires_grad_(), k, v, az.Causal(), backend="triton")
    with pytest.raises(ValueError, match="no in-kernel mask"):
        az.attention(q.detach(), k, v, az.Mask(lambda b, h, i, j: i >= j), backend="triton")
    assert az.explain(q.detach(), k, v, az.SlidingWindow(5)).backend == "reference"


@pytest.mark.parametrize("bm, bn", [(32, 16), (16, 32), (64, 64)])
@pytest.mark.parametrize("pname", ["causal", "sinks+window", "nbhd2d", "perhead"])
def test_block_shapes(pname, bm, bn):
    """Rectangular and large tiles (the GPU configs use 128x128, 64x64, 64x32): same results."""
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=1, num_stages=1)
    _check(PATTERNS[pname], (1, 4, 2, 40, 40, 32, 32), torch.float32, seed=bm + bn, cfg=cfg)
