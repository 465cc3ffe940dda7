"""`KMeansRouting` (Routing Transformer): masks against a loop-based reference, balanced clusters, the block
cover of the token-level routing, the online k-means update (formula, moves toward the assigned points,
train/eval), routed attention against float64 dense masked attention (forward and grads), `evaluate`,
argument errors."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.routing import KMeansRouting, evaluate
from attnzoo.testing import check_close

import routing_helpers as H


def _router(hq, d, c, bs, seed=0, **kw):
    torch.manual_seed(seed)
    return KMeansRouting(hq, d, c, block_size=bs, **kw).eval()


def _unit(x):
    return x / x.norm()


def ref_members(mu, x):
    """Balanced clusters with lists: cluster c takes the ceil(L / C) tokens of largest cosine with mu[c]."""
    n, c = x.shape[0], mu.shape[0]
    w = -(-n // c)
    return [set(sorted(range(n), key=lambda i: -float(mu[j] @ _unit(x[i])))[:w]) for j in range(c)]


def ref_mask(q, k, mu, bs, top_k=None, sinks=0, local=1, causal=True):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nb = -(-lk // bs)
    off = lk - lq
    mu = mu.double()
    mask = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            mq = ref_members(mu[h], q[bi, h].double())
            mk = ref_members(mu[h], k[bi, h // (hq // hkv)].double())
            for r in range(nb):
                if not any(off <= p < lk for p in range(r * bs, (r + 1) * bs)):
                    continue
                overlap = [sum(sum((i + off) // bs == r for i in mq[c]) * sum(j // bs == s for j in mk[c])
                               for c in range(len(mq))) for s in range(nb)]
                allowed = [s for s in range(nb) if not causal or s <= r]
                forced = [s for s in allowed if s < sinks or (0 <= r - s < local if causal else abs(r - s) < local)]
                cands = [s for s in allowed if s not in forced and overlap[s] > 0]
                chosen = sorted(cands, key=lambda s: (overlap[s], s), reverse=True)[:top_k or nb]
                for s in forced + chosen:
                    mask[bi, h, r, s] = True
    return mask


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, bs, C)
    (1, 2, 2, 64, 64, 8, 8, 4),
    (2, 4, 2, 50, 50, 8, 8, 6),     # batch, GQA, ragged last block
    (2, 2, 1, 23, 60, 8, 5, 3),     # cross (bottom-right), MQA
    (1, 2, 1, 48, 48, 8, 2, 16),    # many small clusters, small blocks: sparse even with top_k=None
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", [dict(), dict(top_k=2), dict(top_k=1, sinks=1, local=0)])
def test_mask_matches_loop_reference(shape, causal, opts):
    b, hq, hkv, lq, lk, d, bs, c = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=sum(shape))
    r = _router(hq, d, c, bs, causal=causal, **opts)
    m = r(q, k)
    nb = -(-lk // bs)
    assert m.dtype == torch.bool and m.shape == (b, hq, nb, nb)
    assert torch.equal(m, ref_mask(q, k, r.centroids, bs, causal=causal, **opts))


def test_balanced_clusters_and_block_cover():
    """Every cluster holds exactly ceil(L / C) tokens, the most similar ones; with top_k=None the block mask
    covers every (query, key) pair that shares a cluster (causally), and local blocks are kept."""
    b, hq, hkv, lq, lk, d, bs, c = 2, 4, 2, 70, 100, 8, 8, 5
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=3)
    r = _router(hq, d, c, bs)
    sq, sk, _, _ = r._similarities(q, k)
    for sim, n in ((sq, lq), (sk, lk)):
        mem = r.members(sim)
        assert torch.equal(mem.sum(-1), torch.full((b, hq, c), math.ceil(n / c)))
        lowest_in = sim.masked_fill(~mem, float("inf")).amin(-1)
        highest_out = sim.masked_fill(mem, float("-inf")).amax(-1)
        assert (lowest_in > highest_out).all()
    m = r(q, k)
    share = (r.members(sq).transpose(-1, -2).double() @ r.members(sk).double()) > 0     # (B, H, Lq, Lk)
    pos = torch.arange(lq) + lk - lq
    share &= torch.arange(lk)[None, :] <= pos[:, None]
    assert (H.token_mask(m, lq, lk, bs, True) | ~share).all()
    nb, first = -(-lk // bs), (lk - lq) // bs
    rows = torch.arange(first, nb)
    assert not m[:, :, :first].any() and not torch.triu(m, diagonal=1).any() and m[:, :, rows, rows].all()
    top = _router(hq, d, c, bs, top_k=2)(q, k)
    assert (top <= m).all() and (top.sum(-1) <= 3).all()


def ref_update(mu, q, k, decay):
    """The online k-means step with loops: nearest centroid per normalised token, EMA toward the mean."""
    hq, c, _ = mu.shape
    g = hq // k.shape[1]
    new = mu.double().clone()
    for h in range(hq):
        pts = [[] for _ in range(c)]
        for x in list(q[:, h].reshape(-1, q.shape[-1])) + list(k[:, h // g].reshape(-1, k.shape[-1])):
            x = _unit(x.double())
            pts[int((mu[h].double() @ x).argmax())].append(x)
        for j in range(c):
            if pts[j]:
                v = decay * mu[h, j].double() + (1 - decay) * torch.stack(pts[j]).mean(0)
                new[h, j] = v / v.norm()
    return new


def test_update_formula_and_moves_toward_assigned_points():
    hq, hkv, d, c = 4, 2, 8, 6
    q, k, _ = H.qkv(2, hq, hkv, 40, 40, d, seed=5)
    r = _router(hq, d, c, 8, decay=0.7)
    old = r.centroids.clone()
    want = ref_update(old, q, k, 0.7)
    r.update(q, k)
    torch.testing.assert_close(r.centroids.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.centroids.norm(dim=-1), torch.ones(hq, c))
    # each centroid with points moved toward the mean of its assigned points (higher cosine with it)
    for h in range(hq):
        xs = torch.cat((q[:, h].reshape(-1, d), k[:, h // 2].reshape(-1, d))).double()
        xs = xs / xs.norm(dim=-1, keepdim=True)
        assign = (xs @ old[h].double().T).argmax(-1)
        for j in range(c):
            if (assign == j).any():
                mean = xs[assign == j].mean(0)
                assert float(r.centroids[h, j].double() @ mean) > float(old[h, j].double() @ mean)
            else:
                assert torch.equal(r.centroids[h, j], old[h, j])


def test_online_kmeans_recovers_separated_clusters():
    """Tokens around 3 directions, 3 centroids started from noisy copies: updates pull each centroid onto
    its direction."""
    torch.manual_seed(0)
    d, n = 16, 90
    dirs = torch.nn.functional.normalize(torch.randn(3, d), dim=-1)
    r = KMeansRouting(1, d, 3, block_size=8, decay=0.5)
    r.centroids.copy_(torch.nn.functional.normalize(dirs + 0.2 * torch.randn(3, d), dim=-1)[None])
    x = (dirs.repeat(n // 3, 1) + 0.1 * torch.randn(n, d))[None, None]
    before = (r.centroids[0] * dirs).sum(-1)
    for _ in range(10):
        r.update(x, x)
    after = (r.centroids[0] * dirs).sum(-1)
    assert (after > before).all() and (after > 0.99).all()


def test_training_mode_updates_in_call_eval_does_not():
    b, hq, hkv, lq, lk, d = 1, 2, 1, 48, 48, 8
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=6, grad=True)
    r = _router(hq, d, 4, 8, top_k=2, decay=0.5)
    frozen = _router(hq, d, 4, 8, top_k=2, decay=0.5)
    old = r.centroids.clone()
    az.attention(q, k, v, pattern=r, backend="reference")
    assert torch.equal(r.centroids, old)                       # eval: no update
    r.train()
    out = az.attention(q, k, v, pattern=r, backend="reference")
    assert not torch.equal(r.centroids, old)                   # train: updated after routing
    frozen.centroids.copy_(old)
    ref = H.dense_attention(q, k, v, H.token_mask(frozen(q, k), lq, lk, 8, True))
    check_close("out", out, ref)                               # routed with the centroids before the update
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert list(r.parameters()) == [] and not r.centroids.requires_grad
    assert "centroids" in r.state_dict()


CASES = [  # (B, Hq, Hkv, Lq, Lk, D, bs, C, kw)
    (2, 4, 2, 100, 100, 8, 8, 8, dict(top_k=2)),
    (1, 2, 1, 45, 77, 8, 8, 16, dict(sinks=1)),
    (2, 2, 2, 64, 64, 8, 8, 4, dict(top_k=1, causal=False)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:8]}-{c[8]}")
def test_routed_attention_matches_dense(case):
    b, hq, hkv, lq, lk, d, bs, c, kw = case
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=lq, grad=True)
    router = _router(hq, d, c, bs, **kw)
    out = az.attention(q, k, v, pattern=router, backend="reference")
    w = H.rand(*out.shape, seed=3)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, bs, router.causal)
    assert not m.all(), "the case should be sparse"
    ref = H.dense_attention(q, k, v, m)
    rgrads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    check_close("out", out, ref)
    for name, x, y in zip(("dq", "dk", "dv"), grads, rgrads):
        check_close(name, x, y)


def test_float32_and_bfloat16_route():
    q, k, v = H.qkv(2, 2, 1, 64, 64, 16, seed=8, dtype=torch.float32)
    r = _router(2, 16, 4, 16, top_k=1)
    m = r(q, k)
    assert torch.equal(m, ref_mask(q, k, r.centroids, 16, top_k=1))
    assert r(q.bfloat16(), k.bfloat16()).shape == m.shape


def test_evaluate_recall_rises_with_top_k():
    q, k, v = H.qkv(1, 4, 2, 256, 256, 16, seed=4)
    recall = [evaluate(q, k, v, _router(4, 16, 8, 16, top_k=t))["recall"].mean().item() for t in (1, 3, 6, 16)]
    assert recall[0] < recall[1] < recall[2] < recall[3]


def test_exports_and_repr():
    assert az.KMeansRouting is az.routing.KMeansRouting is KMeansRouting and "KMeansRouting" in az.routing.__all__
    assert "num_clusters=3" in repr(KMeansRouting(2, 8, 3))


@pytest.mark.parametrize("ctor,exc,words", [
    (lambda: KMeansRouting(0, 8, 4), ValueError, "num_heads"),
    (lambda: KMeansRouting(2, 8.0, 4), TypeError, "head_dim"),
    (lambda: KMeansRouting(2, 8, 0), ValueError, "num_clusters"),
    (lambda: KMeansRouting(2, 8, 4, block_size=0), ValueError, "block_size"),
    (lambda: KMeansRouting(2, 8, 4, top_k=0), ValueError, "top_k"),
    (lambda: KMeansRouting(2, 8, 4, decay=1.0), ValueError, "decay"),
    (lambda: KMeansRouting(2, 8, 4, decay="0.9"), TypeError, "decay"),
    (lambda: KMeansRouting(2, 8, 4, sinks=-1), ValueError, "sinks"),
    (lambda: KMeansRouting(2, 8, 4, local=None), TypeError, "local"),
    (lambda: KMeansRouting(2, 8, 4, causal="yes"), TypeError, "causal"),
])
def test_constructor_errors(ctor, exc, words):
    with pytest.raises(exc, match=words):
        ctor()


def test_call_errors():
    r = KMeansRouting(2, 8, 4, block_size=4)
    with pytest.raises(ValueError, match="num_heads=2"):
        r(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="head_dim=8"):
        r(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    with pytest.raises(ValueError, match="q length <= k length"):
        r.update(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="centroids are on meta"):
        r.to("meta")(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
