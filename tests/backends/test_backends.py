"""Every backend against the float64 reference, and the reference against a dense, obviously
correct implementation written here (forward, lse, and the gradients of q, k, v)."""
import zlib

import pytest
import torch

import attnzoo as az
from attnzoo.backends import BACKENDS, reference_attention
from attnzoo.testing import check_close

from common import dense, grads, inputs


PATTERNS = {
    "full": None,
    "causal": az.Causal(),
    "window": az.SlidingWindow(5, 2),
    "sinks+window": az.SlidingWindow(6) | az.Sinks(2),
    "chunked&causal": az.Chunked(8) & az.Causal(),
    "dilated": az.Dilated(4, 3),
    "power": az.PowerAttention(2, sinks=1),
    "prefix": az.PrefixLM(9),
    "strided": az.Strided(6),
}
SHAPES = {  # b, hq, hkv, lq, lk, d, dv
    "self-gqa": (2, 4, 2, 37, 37, 16, 8),
    "cross-short-q": (1, 3, 1, 11, 45, 8, 8),
    "cross-long-q": (1, 2, 2, 45, 20, 8, 16),  # first queries of causal patterns see nothing
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pname", PATTERNS)
def test_reference_matches_dense(pname, shape):
    pattern = PATTERNS[pname]
    q, k, v = inputs(*SHAPES[shape])
    got = grads(lambda q, k, v: reference_attention(q, k, v, pattern), q, k, v)
    want = grads(lambda q, k, v: dense(q, k, v, pattern), q, k, v)
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(x).any(), name
        assert torch.equal(torch.isinf(x), torch.isinf(y)), name
        fin = torch.isfinite(y)
        torch.testing.assert_close(x[fin].double(), y[fin].double(), rtol=1e-6, atol=1e-9, msg=name)


def test_reference_gradcheck():
    q, k, v = inputs(1, 2, 1, 9, 12, 4, 3)
    fn = lambda q, k, v: reference_attention(q, k, v, az.SlidingWindow(3) | az.Sinks(1))[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_reference_bounded_memory_chunking(monkeypatch):
    """With a tiny tile budget the reference runs in many query chunks and still matches."""
    import attnzoo.backends.reference as ref
    monkeypatch.setattr(ref, "_TILE", 64)
    q, k, v = inputs(1, 2, 1, 33, 40, 8, 8)
    got = grads(lambda q, k, v: reference_attention(q, k, v, az.Causal()), q, k, v)
    want = grads(lambda q, k, v: dense(q, k, v, az.Causal()), q, k, v)
    for x, y in zip(got, want):
        fin = torch.isfinite(y)
        torch.testing.assert_close(x[fin].double(), y[fin].double(), rtol=1e-6, atol=1e-9)


def _run(backend, pattern, q, k, v):
    if backend == "sdpa":
        out = az.attention(q, k, v, pattern, backend="sdpa")
        return out, torch.zeros(out.shape[:3], dtype=torch.float32)
    return az.attention(q, k, v, pattern, backend=backend, return_lse=True)


def _supported(backend, pattern):
    return backend != "sdpa" or pattern is None or isinstance(pattern, (az.Causal, az.Full))


BACKEND_CASES = [(b, p) for b in ("sdpa", "flex")
                 for p in ("full", "causal", "window", "sinks+window", "chunked&causal", "power")
                 if _supported(b, PATTERNS[p])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, pname", BACKEND_CASES)
def test_backend_matches_reference(backend, pname, shape, dtype):
    pattern = PATTERNS[pname]
    q, k, v = inputs(*SHAPES[shape], seed=zlib.crc32(f"{pname}/{shape}".encode()) % 1000)  # hash() is salted per process
    use_lse = backend != "sdpa"
    bwd = backend != "flex"  # FlexAttention has no CPU backward; its gradients are checked on the GPU
    ref = grads(lambda q, k, v: reference_attention(q, k, v, pattern), q, k, v, use_lse=use_lse, backward=bwd)
    ql, kl, vl = (t.detach().to(dtype).requires_grad_(bwd) for t in (q, k, v))
    got = grads(lambda q, k, v: _run(backend, pattern, q, k, v), ql, kl, vl, use_lse=use_lse, backward=bwd)
    base = None
    if dtype in (torch.float16, torch.bfloat16):  # plain math path, same precision
        base = grads(lambda q, k, v: dense(q, k, v, pattern), ql, kl, vl, use_lse=use_lse, backward=bwd)
    names = ("out", "lse", "dq", "dk", "dv")
    for i, (name, x, y) in enumerate(zip(names, got, ref)):
        if name == "lse" and backend == "sdpa":
            continue
        if name == "lse":
            # lse is float32 by contract; compare in float32 terms
            assert torch.equal(torch.isinf(x), torch.isinf(y)), "lse -inf rows"
            fin = torch.isfinite(y)
            torch.testing.assert_close(x[fin].double(), y[fin].double(), rtol=2e-2 if base is not None else 1e-5,
                                       atol=2e-2 if base is not None else 1e-5)
            continue
        check_close(f"{backend}/{pname}/{shape}/{dtype}/{name}", x, y, baseline=None if base is None else base[i])


@pytest.mark.parametrize("backend", ["reference", "flex", "sdpa"])
def test_fully_masked_rows_give_zero_and_neg_inf(backend):
    q, k, v = inputs(1, 2, 1, 12, 5, 8, 8)  # Lq > Lk: with causal, the first 7 queries see nothing
    if backend == "flex":
        q, k, v = (t.detach() for t in (q, k, v))
    out, lse = _run(backend, az.Causal(), q, k, v)
    assert not torch.isnan(out).any()
    assert torch.all(out[:, :, :7] == 0)
    if backend != "sdpa":
        assert torch.all(torch.isneginf(lse[:, :, :7])) and torch.isfinite(lse[:, :, 7:]).all()
    if backend == "flex":
        return
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :7] == 0)


def test_per_head_and_neighborhood_through_flex_and_reference():
    grid = (6, 7)
    pats = [az.Neighborhood((3, 3), grid=grid), az.Neighborhood((3, 5), dilation=(2, 1), causal=(True, False), grid=grid),
            az.PerHead([az.Causal(), az.SlidingWindow(4), az.Neighborhood((3, 3), grid=grid), az.Full()]),
            az.Document([10, 20, 12]) & az.Causal()]
    for p in pats:
        q, k, v = inputs(1, 4, 2, 42, 42, 8, 8)
        want = grads(lambda q, k, v: dense(q, k, v, p), q, k, v)
        for backend in ("reference", "flex"):
            bwd = backend != "flex"
            got = grads(lambda q, k, v: _run(backend, p, q, k, v), q.detach().requires_grad_(bwd),
                        k.detach().requires_grad_(bwd), v.detach().requires_grad_(bwd), backward=bwd)
            for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                fin = torch.isfinite(y)
                torch.testing.assert_close(x[fin].double(), y[fin].double(), rtol=1e-5, atol=1e-6,
                                           msg=f"{backend} {p!r} {name}")


def test_scale_is_used():
    q, k, v = inputs(1, 2, 2, 10, 10, 8, 8)
    q, k, v = (t.detach() for t in (q, k, v))
    for backend in ("reference", "flex", "sdpa"):
        a = az.attention(q, k, v, az.Causal(), scale=0.3, backend=backend)
        b = dense(q, k, v, az.Causal(), scale=0.3)[0]
        torch.testing.assert_close(a, b)
        c = az.attention(q, k, v, az.Causal(), backend=backend)
        assert not torch.allclose(a, c)


def test_output_dtype_and_lse_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = (t.detach() for t in inputs(1, 2, 1, 16, 16, 8, 8, dtype=dtype))
        for backend in ("reference", "flex"):
            out, lse = az.attention(q, k, v, az.Causal(), backend=backend, return_lse=True)
            assert out.dtype == dtype and lse.dtype == torch.float32
            assert out.shape == (1, 2, 16, 8) and lse.shape == (1, 2, 16)


def test_backend_registry():
    assert set(BACKENDS) >= {"reference", "sdpa", "flex"}


def test_flex_on_cpu_declines_backward_clearly():
    q, k, v = inputs(1, 2, 1, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="no backward on CPU"):
        az.attention(q, k, v, az.Causal(), backend="flex")
