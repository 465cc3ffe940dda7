"""A router as a pattern: `attnzoo.attention(q, k, v, pattern=router)` against dense masked attention in
float64 with the router's own block mask (forward and every gradient), GQA, batch > 1, ragged lengths,
cross attention; `explain`; the Triton kernels through the CPU interpreter on one tiny shape."""
import pytest
import torch

import attnzoo as az
from attnzoo.routing import Landmark, LongHeads, TopKBlocks
from attnzoo.testing import check_close

import routing_helpers as H

CASES = [  # (B, Hq, Hkv, Lq, Lk, D, router)
    (2, 4, 2, 100, 100, 8, TopKBlocks(16, top_k=2)),
    (3, 2, 1, 45, 77, 8, TopKBlocks(8, threshold=0.6, pooling="maxmin")),
    (2, 2, 2, 64, 64, 8, TopKBlocks(16, top_k=1, sinks=0, local=1, causal=False)),
    (2, 4, 1, 50, 50, 8, LongHeads(16, top_k=1)),
    (1, 2, 1, 33, 60, 8, Landmark(8, top_k=2)),
]


def _loss(out, seed=3):
    w = H.rand(*out.shape, seed=seed)
    return (out * w).sum()


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c[-1])[:40] + f"-{c[:6]}")
def test_forward_and_grads_match_dense(case):
    b, hq, hkv, lq, lk, d, router = case
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=lq, grad=True)
    out = az.attention(q, k, v, pattern=router, backend="reference")
    dq, dk, dv = torch.autograd.grad(_loss(out), (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, router.block_size, router.causal)
    assert not m.all(), "the case should be sparse"
    ref = H.dense_attention(q, k, v, m)
    rq, rk, rv = torch.autograd.grad(_loss(ref), (q, k, v))
    for name, x, y in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        check_close(name, x, y)


def test_float32_lse_and_auto_backend():
    b, hq, hkv, lq, lk, d = 2, 4, 2, 70, 70, 16
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=1, dtype=torch.float32)
    router = TopKBlocks(16, top_k=1)
    out, lse = az.attention(q, k, v, pattern=router, return_lse=True)
    assert out.shape == (b, hq, lq, d) and lse.shape == (b, hq, lq) and lse.dtype == torch.float32
    q64, k64, v64 = (t.double() for t in (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, 16, True)
    check_close("out", out, H.dense_attention(q64, k64, v64, m))
    s = torch.where(m, (q64 @ H.expand_heads(k64, hq).transpose(-1, -2)) * d ** -0.5, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_full_coverage_equals_causal_attention():
    q, k, v = H.qkv(2, 2, 1, 40, 40, 8, seed=2)
    out = az.attention(q, k, v, pattern=TopKBlocks(8, top_k=10), backend="reference")
    check_close("out", out, az.attention(q, k, v, pattern=az.Causal(), backend="reference"))


def test_plan_folds_batch_into_heads():
    q, k, v = H.qkv(3, 4, 2, 24, 24, 8, seed=4)
    router = TopKBlocks(8, top_k=1)
    call = router.plan(q, k, v)
    assert call.q.shape == (1, 12, 24, 8) and call.k.shape == (1, 6, 24, 8) and call.v.shape == (1, 6, 24, 8)
    assert call.mask.shape == (3, 4, 3, 3)
    assert isinstance(call.pattern, az.RoutedBlocks) and call.pattern.causal
    assert call.pattern.block_mask.data_ptr() == call.mask.data_ptr()     # the router's mask, not a copy
    assert torch.equal(call.pattern.block_mask, call.mask.reshape(12, 3, 3)) and call.pattern.block_size == (8, 8)
    assert call.unfold(torch.zeros(1, 12, 24, 5)).shape == (3, 4, 24, 5)
    noncausal = TopKBlocks(8, top_k=1, causal=False).plan(q, k, v)
    assert isinstance(noncausal.pattern, az.RoutedBlocks) and not noncausal.pattern.causal


def test_explain_routed():
    q, k, v = H.qkv(2, 2, 2, 16, 16, 8, dtype=torch.float32)
    ex = az.explain(q, k, v, pattern=TopKBlocks(8, top_k=1))
    assert ex.backend is not None and "RoutedBlocks" in ex.request


def test_triton_interpreter_tiny():
    pytest.importorskip("triton")
    from attnzoo.backends.triton.ops import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    b, hq, hkv, lq, lk, d = 2, 2, 1, 40, 40, 16
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=6, dtype=torch.float32, grad=True)
    router = TopKBlocks(8, top_k=1)
    out = az.attention(q, k, v, pattern=router, backend="triton")
    grads = torch.autograd.grad(_loss(out), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = H.dense_attention(q64, k64, v64, H.token_mask(router(q, k), lq, lk, 8, True))
    rgrads = torch.autograd.grad(_loss(ref), (q64, k64, v64))
    check_close("out", out, ref)
    for name, x, y in zip(("dq", "dk", "dv"), grads, rgrads):
        check_close(name, x, y)
