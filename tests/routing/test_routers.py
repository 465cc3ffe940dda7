"""Router masks against the loop-free twins in routing_helpers (float64 inputs: no near-ties)."""
import pytest
import torch

import attnzoo as az
from attnzoo.routing import Landmark, LongHeads, TopKBlocks

import routing_helpers as H

SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, bs)
    (1, 2, 2, 64, 64, 8, 16),       # lengths multiple of the block
    (2, 4, 2, 100, 100, 8, 16),     # batch, GQA, ragged last block
    (2, 3, 1, 37, 90, 8, 16),       # cross (Lq < Lk, bottom-right), MQA, query rows start mid-grid
    (1, 2, 1, 1, 70, 8, 8),         # one query (decode)
]


def _mean_repr(k, bs, nb):
    return H.pool_mean(k, bs, nb)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", [dict(top_k=2), dict(top_k=1, sinks=0, local=0), dict(top_k=3, sinks=2, local=2),
                                  dict(top_k=50)])
def test_topk_mean(shape, causal, opts):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=sum(shape))
    r = TopKBlocks(bs, causal=causal, **opts)
    m = r(q, k)
    nb = -(-lk // bs)
    assert m.shape == (b, hq, nb, nb) and m.dtype == torch.bool
    assert torch.equal(m, H.ref_mask(q, k, bs, _mean_repr, causal=causal, **opts))


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("causal", [True, False])
def test_topk_maxmin(shape, causal):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=3)
    m = TopKBlocks(bs, top_k=2, pooling="maxmin", causal=causal)(q, k)
    assert torch.equal(m, H.ref_mask(q, k, bs, None, causal=causal, top_k=2, score=H.maxmin_score))


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("threshold", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("pooling", ["mean", "maxmin"])
def test_topk_threshold(shape, threshold, pooling):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=5)
    q = q * 4  # sharper block distributions: the threshold matters
    m = TopKBlocks(bs, threshold=threshold, pooling=pooling, sinks=1, local=1)(q, k)
    kw = dict(score=H.maxmin_score) if pooling == "maxmin" else {}
    assert torch.equal(m, H.ref_mask(q, k, bs, _mean_repr, threshold=threshold, **kw))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_longheads(shape):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=7)
    m = LongHeads(bs, top_k=2, first=1, local=2)(q, k)
    assert torch.equal(m, H.ref_mask(q, k, bs, H.longheads_repr, sinks=1, local=2, top_k=2))


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("rep", ["maxnorm", "mean"])
def test_landmark(shape, rep):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=9)
    m = Landmark(bs, top_k=2, representative=rep, causal=False)(q, k)
    fn = H.landmark_repr if rep == "maxnorm" else _mean_repr
    assert torch.equal(m, H.ref_mask(q, k, bs, fn, causal=False, top_k=2))


def test_mask_invariants_low_precision():
    """bf16 inputs route too (float32 scores); rows without queries are empty, causal rows stay at or left
    of the diagonal, sinks and local blocks are present, the count per row is forced + top_k."""
    q, k, _ = H.qkv(2, 4, 2, 50, 130, 16, seed=11, dtype=torch.bfloat16)
    m = TopKBlocks(16, top_k=2, sinks=1, local=1)(q, k)
    nb = 9
    first_row = (130 - 50) // 16
    assert not m[:, :, :first_row].any()
    assert not torch.triu(m, diagonal=1).any()
    rows = torch.arange(first_row, nb)
    assert m[:, :, rows, 0].all() and m[:, :, rows, rows].all()
    forced = 1 + (rows > 0).long()
    expected = forced + torch.clamp(rows + 1 - forced, max=2)
    assert torch.equal(m[:, :, rows].sum(-1), expected.expand(2, 4, -1))


def test_equality_repr_round_trip():
    ns = {name: getattr(az, name) for name in az.__all__}
    for r in (TopKBlocks(32, top_k=4), TopKBlocks(threshold=0.9, pooling="maxmin", causal=False),
              LongHeads(64, 3, first=2, local=1), Landmark(16, 2, representative="mean", sinks=0)):
        again = eval(repr(r), ns)
        assert again == r and hash(again) == hash(r)
    assert TopKBlocks(32, top_k=4) != TopKBlocks(32, top_k=5)
    assert az.routing.TopKBlocks is TopKBlocks is az.TopKBlocks


def test_routing_is_not_differentiated():
    q, k, _ = H.qkv(1, 2, 2, 32, 32, 8, grad=True)
    m = TopKBlocks(8, top_k=1)(q, k)
    assert not m.requires_grad and q.grad is None


def test_tf32_score_context_restores_the_global_setting():
    """The routers' TF32 block-score context leaves torch's float32 matmul setting as it found it."""
    from attnzoo.routing import base
    m = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before = getattr(m, attr)
    with base._tf32_matmul():
        assert getattr(m, attr) in ("tf32", True)
    assert getattr(m, attr) == before
    with pytest.raises(RuntimeError), base._tf32_matmul():
        raise RuntimeError("boom")
    assert getattr(m, attr) == before
