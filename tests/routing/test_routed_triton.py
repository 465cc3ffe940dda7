"""Routed attention on the Triton kernels (Triton's CPU interpreter, TRITON_INTERPRET=1 from tests/conftest.py)
against dense masked softmax in float64, forward and every gradient: both in-kernel masks of a `RoutedBlocks`
(kernel blocks inside router blocks: the causal mask alone; otherwise the block mask read in-kernel), the
custom ops, and that repeated routed calls leave the backend's caches and pattern registry as they were."""
import pytest
import torch

import attnzoo as az
from attnzoo.routing import LongHeads, TopKBlocks
from attnzoo.testing import check_close

import routing_helpers as H

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops  # noqa: E402

if not ops.interpreting():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)", allow_module_level=True)


def _dense_grads(q, k, v, mask, bs, causal, w):
    lq, lk = q.shape[2], k.shape[2]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = H.dense_attention(q64, k64, v64, H.token_mask(mask, lq, lk, bs, causal))
    return (ref, *torch.autograd.grad((ref * w).sum(), (q64, k64, v64)))


# (B, Hq, Hkv, Lq, Lk, router block, kernel block (BM, BN), causal, expected nested)
KERNEL_CASES = [
    (2, 2, 1, 64, 64, 32, (16, 16), True, True),      # kernel blocks inside router blocks: causal mask only
    (1, 4, 2, 48, 64, 32, (16, 32), True, True),      # cross attention, offset 16 a multiple of BM
    (1, 2, 2, 64, 64, 32, (16, 16), False, True),     # nested and not causal: no partial block at all
    (1, 2, 1, 40, 64, 16, (16, 16), True, False),     # offset 24: kernel rows straddle router rows
    (2, 2, 1, 45, 45, 8, (16, 16), True, False),      # kernel blocks larger than router blocks, ragged
    (1, 2, 1, 50, 50, 12, (16, 8), False, False),     # not dividing, not causal
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"bs{c[5]}-k{c[6][0]}x{c[6][1]}-"
                         f"{'causal' if c[7] else 'bidir'}-L{c[3]}x{c[4]}")
def test_kernels_both_mask_paths(case):
    b, hq, hkv, lq, lk, bs, (bm, bn), causal, nested = case
    q, k, v = H.qkv(b, hq, hkv, lq, lk, 16, seed=lq + bs, dtype=torch.float32)
    router = TopKBlocks(bs, top_k=1, causal=causal)
    call = router.plan(q, k, v)
    p = call.pattern
    assert isinstance(p, az.RoutedBlocks) and p.nested(lq, lk, bm, bn) == nested
    if nested:  # the in-kernel mask is Causal's (Full's): the very same compiled module
        mod = ops._routed_module(p, lq, lk, bm, bn, "cpu")[0]
        assert mod is ops._module(az.Causal() if causal else az.Full(), lq, lk, "cpu")[0]
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=1, num_stages=1)
    scale = 16 ** -0.5
    out, lse = ops.attention_fwd(call.q, call.k, call.v, p, scale, poison=True, cfg=cfg)
    w = H.rand(b, hq, lq, 16, seed=9)
    wf = w.reshape(1, b * hq, lq, 16).float()
    dq, dk, dv = ops.attention_bwd(wf, None, call.q, call.k, call.v, out, lse, p, scale, cfg=cfg, poison=True)
    ref, rq, rk, rv = _dense_grads(q, k, v, call.mask, bs, causal, w)
    check_close("out", call.unfold(out), ref)
    for name, x, y in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        check_close(name, x.reshape(y.shape), y)


@pytest.mark.parametrize("router, shape", [
    (TopKBlocks(16, top_k=1), (2, 4, 2, 64, 64)),                        # nested under the 16 x 16 config
    (TopKBlocks(8, threshold=0.5, pooling="maxmin"), (1, 2, 1, 37, 53)),  # block mask read in-kernel
    (LongHeads(16, top_k=1, causal=False), (2, 2, 2, 40, 40)),
])
def test_attention_api_forward_and_grads(router, shape):
    """az.attention(..., pattern=router, backend='triton'): the custom ops (forward and backward) with the
    mask as a tensor input."""
    b, hq, hkv, lq, lk = shape
    q, k, v = H.qkv(b, hq, hkv, lq, lk, 16, seed=lq, dtype=torch.float32, grad=True)
    out, lse = az.attention(q, k, v, pattern=router, backend="triton", return_lse=True)
    w = H.rand(*out.shape, seed=3)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    mask = router(q, k)
    ref, *rgrads = _dense_grads(q, k, v, mask, router.block_size, router.causal, w)
    check_close("out", out, ref)
    for name, x, y in zip(("dq", "dk", "dv"), grads, rgrads):
        check_close(name, x, y)
    assert lse.shape == (b, hq, lq)


def _cache_sizes():
    from attnzoo.backends.triton import kernels
    from attnzoo.patterns import basic

    fns = (ops._layout, ops._tlayout, ops._bwd_plan, ops._module, ops._routed_module_cached, ops._routed_items,
           basic._bs_table, basic._bs_sat)
    return dict({f.__name__: f.cache_info().currsize for f in fns}, registry=len(ops._PATTERNS),
                registry_ids=len(ops._PATTERN_IDS), modules=len(kernels._modules))


def test_repeated_routed_calls_do_not_grow_caches():
    router = TopKBlocks(8, top_k=1)
    before = None
    for seed in range(4):
        q, k, v = H.qkv(1, 2, 1, 24, 24, 16, seed=seed, dtype=torch.float32, grad=True)
        out = az.attention(q, k, v, pattern=router, backend="triton")
        out.sum().backward()
        if seed == 0:   # the first call may compile and register the router's static spec
            before = _cache_sizes()
    assert _cache_sizes() == before


def test_routed_ops_opcheck_and_registry():
    q, k, v = (H.rand(1, 2, 24, 16, seed=s, dtype=torch.float32) for s in range(3))
    mask = TopKBlocks(8, top_k=1)(q, k)[0]
    p = az.RoutedBlocks(mask, 8, causal=True)
    with pytest.raises(TypeError, match="per-call"):
        ops.pattern_id(p)
    pid = ops.pattern_id(ops._routed_spec(p))
    assert pid == ops.pattern_id(ops._routed_spec(az.RoutedBlocks(mask.clone(), 8, causal=True)))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ops._fwd_op, (qg, kg, vg, pid, 0.25, mask),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="not a routed spec"):
        ops._fwd_op(q, k, v, ops.pattern_id(az.Causal()), 0.25, mask)


def test_routed_inference_with_few_queries_takes_the_forward_kernel(monkeypatch):
    """Lq <= 16 without grad would be the decode route; a routed (per-call device) mask stays on the forward
    kernel, so nothing is copied to the host or cached per call, and the result matches the reference."""
    from attnzoo.backends.triton import decode

    def no_decode(*a, **kw):
        raise AssertionError("a routed call reached the decode kernel")
    monkeypatch.setattr(decode, "attention_decode", no_decode)
    router = TopKBlocks(16, top_k=1)
    q, k, v = H.qkv(1, 4, 2, 3, 70, 16, seed=5, dtype=torch.float32)
    with torch.no_grad():
        out = az.attention(q, k, v, pattern=router, backend="triton")
        ref = az.attention(q, k, v, pattern=router, backend="reference")
        with pytest.raises(AssertionError, match="decode kernel"):  # the spy is live for static patterns
            az.attention(q, k, v, pattern=az.Causal(), backend="triton")
    check_close("out", out, ref)
