"""Every public constructor and function rejects bad arguments with an error naming the argument."""
import pytest
import torch

import attnzoo as az
from attnzoo.routing import Landmark, LongHeads, TopKBlocks, evaluate


@pytest.mark.parametrize("ctor,exc,words", [
    (lambda: TopKBlocks(0, top_k=1), ValueError, "block_size"),
    (lambda: TopKBlocks(16.0, top_k=1), TypeError, "block_size"),
    (lambda: TopKBlocks(16), ValueError, "top_k"),
    (lambda: TopKBlocks(16, top_k=2, threshold=0.5), ValueError, "exactly one"),
    (lambda: TopKBlocks(16, top_k=0), ValueError, "top_k"),
    (lambda: TopKBlocks(16, top_k=True), TypeError, "top_k"),
    (lambda: TopKBlocks(16, threshold=0), ValueError, "threshold"),
    (lambda: TopKBlocks(16, threshold=1.5), ValueError, "threshold"),
    (lambda: TopKBlocks(16, threshold="0.5"), TypeError, "threshold"),
    (lambda: TopKBlocks(16, top_k=1, pooling="max"), ValueError, "pooling"),
    (lambda: TopKBlocks(16, top_k=1, pooling=None), TypeError, "pooling"),
    (lambda: TopKBlocks(16, top_k=1, sinks=-1), ValueError, "sinks"),
    (lambda: TopKBlocks(16, top_k=1, local=1.5), TypeError, "local"),
    (lambda: TopKBlocks(16, top_k=1, causal=1), TypeError, "causal"),
    (lambda: LongHeads(0, 1), ValueError, "chunk_size"),
    (lambda: LongHeads(8, 0), ValueError, "top_k"),
    (lambda: LongHeads(8, 1, first=-1), ValueError, "first"),
    (lambda: LongHeads(8, 1, local=None), TypeError, "local"),
    (lambda: LongHeads(8, 1, causal="yes"), TypeError, "causal"),
    (lambda: Landmark(8, 1, representative="max"), ValueError, "representative"),
    (lambda: Landmark(8, None), TypeError, "top_k"),
    (lambda: Landmark(-8, 1), ValueError, "block_size"),
])
def test_constructors(ctor, exc, words):
    with pytest.raises(exc, match=words):
        ctor()


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


R = TopKBlocks(8, top_k=1)


@pytest.mark.parametrize("q,k,exc,words", [
    ("x", _t(1, 1, 8, 4), TypeError, "q must be a torch.Tensor"),
    (_t(1, 8, 4), _t(1, 1, 8, 4), ValueError, "q must have 4 dimensions"),
    (_t(1, 1, 8, 4), _t(1, 1, 8, 4, dtype=torch.int32), TypeError, "k must be float"),
    (_t(1, 1, 0, 4), _t(1, 1, 8, 4), ValueError, "q must not be empty"),
    (_t(2, 1, 8, 4), _t(1, 1, 8, 4), ValueError, "batch sizes differ"),
    (_t(1, 1, 8, 4), _t(1, 1, 8, 5), ValueError, "head_dim"),
    (_t(1, 3, 8, 4), _t(1, 2, 8, 4), ValueError, "multiple of key/value heads"),
    (_t(1, 1, 9, 4), _t(1, 1, 8, 4), ValueError, "q length <= k length"),
])
def test_router_call(q, k, exc, words):
    with pytest.raises(exc, match=words):
        R(q, k)


def test_attention_with_router_errors():
    q, k, v = _t(1, 2, 16, 4), _t(1, 2, 16, 4), _t(1, 2, 16, 4)
    with pytest.raises(ValueError, match="same length"):
        az.attention(q, k, v[:, :, :8], pattern=R)
    with pytest.raises(ValueError, match="q length <= k length"):
        az.attention(_t(1, 2, 20, 4), k, v, pattern=R)
    with pytest.raises(ValueError, match="backend"):
        az.attention(q, k, v, pattern=R, backend="nope")
    with pytest.raises(ValueError, match="sdpa"):
        az.attention(q, k, v, pattern=R, backend="sdpa")
    with pytest.raises(TypeError, match="Router"):
        az.attention(q, k, v, pattern="topk")
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        R.plan(q, k, v, mask=torch.ones(1, 2, 3, 3))


def test_evaluate_errors():
    q, k, v = _t(1, 2, 16, 4), _t(1, 2, 16, 4), _t(1, 2, 16, 4)
    with pytest.raises(TypeError, match="router"):
        evaluate(q, k, v, az.Causal())
    with pytest.raises(ValueError, match="v must have shape"):
        evaluate(q, k, v[:, :1], R)
    with pytest.raises(TypeError, match="v must be"):
        evaluate(q, k, "v", R)
    with pytest.raises(TypeError, match="causal"):
        evaluate(q, k, v, R, causal="yes")
    with pytest.raises(TypeError, match="scale"):
        evaluate(q, k, v, R, scale="big")
    with pytest.raises(ValueError, match="scale"):
        evaluate(q, k, v, R, scale=float("nan"))
    with pytest.raises(ValueError, match="mask must be"):
        evaluate(q, k, v, R, mask=torch.ones(1, 2, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        evaluate(q, k[0], v, R)
