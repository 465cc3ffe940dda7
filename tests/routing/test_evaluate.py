"""`attnzoo.routing.evaluate` against a direct dense computation on small shapes."""
import pytest
import torch

from attnzoo.routing import LongHeads, TopKBlocks, evaluate

import routing_helpers as H


def _direct(q, k, v, mask, bs, causal):
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    base = H.token_mask(torch.ones_like(mask), lq, lk, bs, causal)
    vis = H.token_mask(mask, lq, lk, bs, causal)
    s = (q @ H.expand_heads(k, hq).transpose(-1, -2)) * d ** -0.5
    p = torch.softmax(torch.where(base, s, float("-inf")), -1)
    recall = (p * vis).sum(-1).mean(-1)
    od = H.dense_attention(q, k, v, base)
    os_ = H.dense_attention(q, k, v, vis)
    err = (os_ - od).flatten(2).norm(dim=-1) / od.flatten(2).norm(dim=-1)
    density = vis.sum((-1, -2)).double() / base.sum((-1, -2))
    return recall, err, density, vis.sum((-1, -2)).double() / (lq * lk)


@pytest.mark.parametrize("shape,router", [
    ((2, 4, 2, 90, 90, 8), TopKBlocks(16, top_k=1)),
    ((1, 2, 1, 30, 75, 8), TopKBlocks(8, threshold=0.5, pooling="maxmin")),
    ((2, 2, 2, 48, 48, 8), LongHeads(8, top_k=2, causal=False)),
])
def test_matches_direct_dense(shape, router, monkeypatch):
    import attnzoo.routing.quality as ev

    monkeypatch.setattr(ev, "_TILE", 2000)  # several query chunks
    q, k, v = H.qkv(*shape, seed=shape[3])
    res = evaluate(q, k, v, router)
    mask = router(q, k)
    assert torch.equal(res["mask"], mask)
    recall, err, density, pair = _direct(q, k, v, mask, router.block_size, router.causal)
    for key, want in (("recall", recall), ("rel_error", err), ("density", density), ("pair_density", pair)):
        assert res[key].shape == shape[:2]
        torch.testing.assert_close(res[key], want, rtol=1e-10, atol=1e-12, msg=key)
    assert (res["recall"] < 1).all() and (res["density"] < 1).all()


def test_everything_covered_gives_recall_one_error_zero():
    q, k, v = H.qkv(2, 4, 2, 50, 70, 8, seed=5, dtype=torch.float32)
    res = evaluate(q, k, v, TopKBlocks(16, top_k=5))
    torch.testing.assert_close(res["recall"], torch.ones(2, 4, dtype=torch.float64))
    assert res["rel_error"].max() < 1e-12
    torch.testing.assert_close(res["density"], torch.ones(2, 4, dtype=torch.float64))


def test_causal_override_and_given_mask():
    q, k, v = H.qkv(1, 2, 2, 32, 32, 8, seed=8)
    router = TopKBlocks(8, top_k=1, causal=False)
    mask = router(q, k)
    a = evaluate(q, k, v, router, causal=True, mask=mask)
    recall, err, density, _ = _direct(q, k, v, mask, 8, True)
    torch.testing.assert_close(a["recall"], recall)
    torch.testing.assert_close(a["rel_error"], err)
