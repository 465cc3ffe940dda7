"""The fused block pooling (`routing/_triton_pool.py`, Triton's CPU interpreter) against `pool`'s PyTorch
path: mean and max-min, block sizes that do and do not divide the length, queries at an offset (the
bottom-right alignment of cross attention), empty trailing blocks, head dims that are not powers of two,
16-bit inputs and non-contiguous views."""
import pytest
import torch

from attnzoo.routing import base

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops  # noqa: E402
from attnzoo.routing._triton_pool import pool_fused  # noqa: E402

if not ops.interpreting() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, bs, nb, offset, how, monkeypatch):
    monkeypatch.setattr(base, "FUSED_POOL", False)
    return base.pool(x, bs, nb, offset, how)


@pytest.mark.parametrize("how", ["mean", "maxmin"])
@pytest.mark.parametrize("n, bs, offset, extra", [(64, 16, 0, 0), (50, 16, 0, 0), (37, 8, 11, 0), (40, 16, 0, 2),
                                                  (5, 32, 3, 1)])
@pytest.mark.parametrize("d", [32, 20])
def test_matches_pytorch_path(how, n, bs, offset, extra, d, monkeypatch):
    gen = torch.Generator().manual_seed(n * 7 + bs + offset + d)
    x = (torch.randn(2, 3, n, d, generator=gen) * 2).to(DEV)
    nb = -(-(n + offset) // bs) + extra
    got = pool_fused(x, bs, nb, offset, how)
    ref = _reference(x, bs, nb, offset, how, monkeypatch)
    for g, r in zip(got if how == "maxmin" else [got], ref if how == "maxmin" else [ref]):
        assert g.dtype == torch.float32 and g.shape == (2, 3, nb, d)
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    if extra:  # blocks past the data pool to 0
        assert torch.all((got[0] if how == "maxmin" else got)[:, :, -extra:] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_and_strided_views(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, 4, 32, generator=gen).to(DEV, dtype).transpose(1, 2)  # (1, 4, 24, 32), strided
    for how in ("mean", "maxmin"):
        got = pool_fused(x, 8, 3, 0, how)
        ref = _reference(x, 8, 3, 0, how, monkeypatch)
        for g, r in zip(got if how == "maxmin" else [got], ref if how == "maxmin" else [ref]):
            torch.testing.assert_close(g, r.float(), rtol=1e-3, atol=1e-3)
