"""`FlexPrefill` against a loop-based reference (probe sums, Jensen-Shannon decision, query-aware threshold set,
smallest column/diagonal sets); the cumulative set reaches gamma and is minimal; the decision switches on
constructed heads; routed attention and gradients against float64 dense masked softmax; `evaluate`."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.routing import FlexPrefill, TopKBlocks, evaluate
from attnzoo.routing.vertical_slash import cumulative_set, probe_attention
from attnzoo.testing import check_close

import routing_helpers as H
from test_vertical_slash import blocks_of, probe_sums, token_pattern

SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, bs)
    (1, 2, 2, 64, 64, 8, 16),
    (2, 4, 2, 100, 100, 8, 16),     # batch, GQA, ragged last block
    (2, 3, 1, 37, 90, 8, 16),       # cross (Lq < Lk), MQA
    (1, 2, 1, 5, 70, 8, 8),         # a probe shorter than the block
    (1, 2, 1, 96, 96, 8, 4),        # many small blocks: a sparse block mask
]


# -- loop-based reference -------------------------------------------------------------------------------
def smallest_set(scores, gamma, min_count=0, max_count=None):
    """Per head: take entries by decreasing score until the kept mass reaches gamma of the total, then grow
    to min_count / cut to max_count."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:-1])).view(-1, scores.dim() - 1):
        s = scores[tuple(idx)]
        order = s.argsort(descending=True).tolist()
        kept, mass = [], 0.0
        for j in order:
            if mass >= gamma * s.sum():
                break
            kept.append(j)
            mass += s[j]
        n = max(len(kept), min(min_count, len(order)))
        if max_count is not None:
            n = min(n, max_count)
        out[tuple(idx)][order[:n]] = True
    return out


def js(p, r):
    mid = (p + r) / 2
    kl = lambda a, b: sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(a, b) if x > 0)  # noqa: E731
    return math.sqrt(max(0.5 * kl(p, mid) + 0.5 * kl(r, mid), 0.0))


def ref_flexprefill(q, k, bs, gamma, tau, min_budget=0, max_budget=None, sinks=1, local=1):
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    nb = -(-lk // bs)
    m = min(bs, lq)
    vert, sl = probe_sums(q, k, bs)
    kbar = H.expand_heads(H.pool_mean(k, bs, nb), hq)                     # (B, Hq, nb, D)
    qbar = q[:, :, lq - m:].double().mean(2)                               # (B, Hq, D)
    dist = torch.zeros(b, hq, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            true = torch.zeros(nb, dtype=torch.float64)
            for j in range(lk):
                true[j // bs] += vert[bi, h, j]
            est = torch.softmax(kbar[bi, h] @ qbar[bi, h] * d ** -0.5, 0)
            dist[bi, h] = js(true, est)
    qa = dist < tau
    has_q = H.onehot(lq, bs, nb, lk - lq).sum(1) > 0
    s = H.pool_mean(q, bs, nb, lk - lq) @ kbar.transpose(-1, -2) * d ** -0.5
    m_qa = H.select(s, has_q, True, sinks, local, threshold=gamma)
    if min_budget:
        m_qa |= H.select(s, has_q, True, sinks, local, top_k=-(-min_budget // bs))
    cols = smallest_set(vert, gamma, min_budget, max_budget)
    diags = smallest_set(sl, gamma, min_budget, max_budget)
    m_vs = blocks_of(token_pattern(cols, diags, lq, lk), lk, bs) | H.allowed_forced(nb, has_q, True, sinks, local)[1]
    return torch.where(qa[..., None, None], m_qa, m_vs), qa, dist


# -- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [dict(gamma=0.9, tau="mid"), dict(gamma=0.6, tau=0.0, min_budget=3, max_budget=6),
                                  dict(gamma=0.3, tau=0.0),
                                  dict(gamma=0.5, tau=1.0, min_budget=9, sinks=0, local=2)])
def test_matches_loop_reference(shape, opts):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=sum(shape))
    q = q * 3  # peaked attention: the sets are small
    opts = dict(opts)
    if opts["tau"] == "mid":  # between the two middle divergences: both decisions occur
        _, _, dist = ref_flexprefill(q, k, bs, 0.9, 0.0)
        v = dist.flatten().sort().values
        opts["tau"] = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    r = FlexPrefill(block_size=bs, **opts)
    m = r(q, k)
    want, qa, dist = ref_flexprefill(q, k, bs, **opts)
    torch.testing.assert_close(r.last_js, dist, rtol=1e-9, atol=1e-12)
    assert torch.equal(r.last_decision, qa)
    if opts["tau"] == 0.0:
        assert not qa.any()
    if opts["tau"] == 1.0:
        assert qa.all()
    assert torch.equal(m, want)
    assert not m.triu(1).any()


def test_cumulative_set_reaches_gamma_and_is_minimal():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 50, generator=g, dtype=torch.float64) ** 4
    for gamma in (0.3, 0.9, 1.0):
        sel = cumulative_set(scores, gamma)
        total = scores.sum(-1)
        kept = (scores * sel).sum(-1)
        assert (kept >= gamma * total * (1 - 1e-12)).all()
        # minimal: dropping the smallest kept entry falls below gamma (so no smaller set can reach it)
        smallest = torch.where(sel, scores, float("inf")).amin(-1)
        assert (kept - smallest < gamma * total).all()
        # the kept entries are the best ones
        assert (torch.where(sel, scores, float("inf")).amin(-1) >= torch.where(sel, -1.0, scores).amax(-1)).all()
        assert torch.equal(sel, smallest_set(scores, gamma))
    assert (cumulative_set(scores, 0.01, min_count=7).sum(-1) == 7).all()
    assert (cumulative_set(scores, 1.0, max_count=5).sum(-1) == 5).all()
    assert (cumulative_set(scores, 0.5, min_count=80).sum(-1) == 50).all()


def _constructed(bs=8, nb=8, d=16):
    """Head 0: keys constant within each block, every query the same vector -- block-pooled scores are the true
    ones (the last block, partly visible to the probe, scores low): the estimate matches, small divergence.
    Head 1: a column pattern the pooled keys cannot see -- in block 3 a key +a*u and a key -a*u (they cancel
    in the mean), every query along u: all attention on key 26, the estimate is flat, large divergence."""
    lk = bs * nb
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(1, 2, lk, d, dtype=torch.float64)
    k = torch.zeros(1, 2, lk, d, dtype=torch.float64)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(nb, d, generator=g, dtype=torch.float64)
    w[-1] = -3 * u
    q[0, 0] = u
    k[0, 0] = w.repeat_interleave(bs, 0)
    k[0, 1] = torch.randn(lk, d, generator=g, dtype=torch.float64) * 0.05
    k[0, 1, 26] = 3 * u
    k[0, 1, 27] = -3 * u
    q[0, 1] = u
    return q, k


def test_decision_switches_on_constructed_heads():
    bs = 8
    q, k = _constructed(bs)
    r = FlexPrefill(block_size=bs, gamma=0.9, tau=0.3)
    m = r(q, k)
    assert r.last_decision.tolist() == [[True, False]]
    assert r.last_js[0, 0] < 0.05 and r.last_js[0, 1] > 0.5
    # head 0 runs the query-aware set: TopKBlocks' threshold rule on pooled q and k
    assert torch.equal(m[0, 0], TopKBlocks(bs, threshold=0.9, sinks=1, local=1)(q, k)[0, 0])
    # head 1 found the column: block column 3 is on from row 3 down, and the output there is exact
    assert m[0, 1, 3:, 3].all() and not m[0, 1].all()
    out = az.attention(q, k, q, pattern=r, backend="reference")
    ref = az.attention(q, k, q, pattern=az.Causal(), backend="reference")
    torch.testing.assert_close(out[0, 1, 32:], ref[0, 1, 32:], rtol=0, atol=1e-6)
    # thresholds: tau = 0 always vertical-slash, tau above sqrt(ln 2) always query-aware
    FlexPrefill(block_size=bs, tau=0)(q, k)
    FlexPrefill(block_size=bs, tau=0.9)(q, k)


def test_vertical_slash_heads_cover_gamma_of_the_probe():
    """With the vertical-slash decision, the probe queries' true attention on the computed keys is >= gamma."""
    b, hq, hkv, lq, lk, d, bs = 2, 4, 2, 90, 120, 16, 16
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=21, dtype=torch.float32)
    q = q * 3
    for gamma in (0.5, 0.8):
        r = FlexPrefill(block_size=bs, gamma=gamma, tau=0.0)
        m = r(q, k)
        assert not r.last_decision.any()
        p = probe_attention(q, k, bs)                                       # (B, Hq, bs, Lk)
        vis = H.token_mask(m, lq, lk, bs, True)[:, :, -bs:]
        assert ((p * vis).sum(-1).mean(-1) >= gamma - 1e-5).all()


CASES = [  # (B, Hq, Hkv, Lq, Lk, D, router)
    (2, 4, 2, 100, 100, 8, FlexPrefill(16, gamma=0.7, tau=0.2)),
    (1, 2, 1, 45, 77, 8, FlexPrefill(8, gamma=0.5, tau=0.0)),
    (2, 2, 2, 64, 64, 8, FlexPrefill(8, gamma=0.6, tau=1.0, local=1, sinks=0)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:6]}")
def test_forward_and_grads_match_dense(case):
    b, hq, hkv, lq, lk, d, router = case
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=lq, grad=True)
    with torch.no_grad():
        q *= 3
    out = az.attention(q, k, v, pattern=router, backend="reference")
    w = H.rand(*out.shape, seed=3)
    dq, dk, dv = torch.autograd.grad((out * w).sum(), (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, router.block_size, True)
    assert not m.all(), "the case should be sparse"
    ref = H.dense_attention(q, k, v, m)
    rq, rk, rv = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, x, y in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        check_close(name, x, y)


def test_evaluate_runs():
    q, k, v = H.qkv(2, 4, 2, 96, 96, 8, seed=5, dtype=torch.float32)
    res = evaluate(q * 3, k, v, FlexPrefill(16, gamma=0.8, tau=0.2))
    assert res["recall"].shape == (2, 4) and (res["recall"] > 0.5).all() and (res["recall"] <= 1 + 1e-9).all()
    assert (res["density"] <= 1).all() and res["mask"].shape == (2, 4, 6, 6)
    full = evaluate(q, k, v, FlexPrefill(16, gamma=1.0, tau=0.0, min_budget=96))
    torch.testing.assert_close(full["recall"], torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("ctor,exc,words", [
    (lambda: FlexPrefill(0), ValueError, "block_size"),
    (lambda: FlexPrefill(16, gamma=0), ValueError, "gamma"),
    (lambda: FlexPrefill(16, gamma=1.5), ValueError, "gamma"),
    (lambda: FlexPrefill(16, gamma="0.9"), TypeError, "gamma"),
    (lambda: FlexPrefill(16, tau=-0.1), ValueError, "tau"),
    (lambda: FlexPrefill(16, tau=float("nan")), ValueError, "tau"),
    (lambda: FlexPrefill(16, tau=None), TypeError, "tau"),
    (lambda: FlexPrefill(16, min_budget=-1), ValueError, "min_budget"),
    (lambda: FlexPrefill(16, max_budget=0), ValueError, "max_budget"),
    (lambda: FlexPrefill(16, min_budget=8, max_budget=4), ValueError, "max_budget"),
    (lambda: FlexPrefill(16, sinks=1.0), TypeError, "sinks"),
    (lambda: FlexPrefill(16, local=-2), ValueError, "local"),
])
def test_constructor_errors(ctor, exc, words):
    with pytest.raises(exc, match=words):
        ctor()


def test_call_errors_repr_and_equality():
    r = FlexPrefill(8)
    assert r.last_decision is None
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        r(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4))
    assert r == FlexPrefill(8) and hash(r) == hash(FlexPrefill(8)) and r != FlexPrefill(8, gamma=0.8)
    assert "gamma=0.9" in repr(r) and r.causal
