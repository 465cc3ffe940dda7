"""SeerAttention's gate, router, distillation targets and training loop (`attnzoo.routing.seer`) against
direct dense computations, and distillation on synthetic data with a learnable block structure."""
import io

import pytest
import torch

import attnzoo as az
from attnzoo.layers import Attention, TinyLM
from attnzoo.layers.attention import RotaryEmbedding
from attnzoo.routing import SeerGate, SeerRouter, TopKBlocks, capture_qk, distill_gate, evaluate, seer_targets
from attnzoo.routing.seer import _rope, recording_qk, seer_loss
from attnzoo.testing import check_close

import routing_helpers as H

INF = float("inf")


# -- targets -------------------------------------------------------------------------------------------
def _direct_targets(q, k, bs, causal, pooling):
    """The whole (Lq, Lk) attention map in float64, pooled into cells with a scatter, rows normalised."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    nb = -(-lk // bs)
    base = H.token_mask(torch.ones(b, hq, nb, nb, dtype=torch.bool), lq, lk, bs, causal)
    s = (q.double() @ H.expand_heads(k.double(), hq).transpose(-1, -2)) * d ** -0.5
    p = torch.softmax(torch.where(base, s, -INF), -1)
    cell = H.block_ids(lq, bs, lk - lq)[:, None] * nb + H.block_ids(lk, bs)[None, :]
    cell = cell.expand(b, hq, lq, lk).reshape(b, hq, -1)
    out = torch.zeros(b, hq, nb * nb, dtype=torch.float64)
    out = out.scatter_reduce(2, cell, p.reshape(b, hq, -1), "amax" if pooling == "max" else "sum")
    out = out.view(b, hq, nb, nb)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-300)


TARGET_SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, bs)
    (2, 4, 2, 50, 50, 8, 8),        # ragged last block, GQA
    (1, 2, 1, 30, 75, 8, 16),       # cross: queries start mid-grid, rows without queries
    (2, 2, 2, 64, 64, 8, 16),       # multiples of the block
]


@pytest.mark.parametrize("shape", TARGET_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_targets_match_direct_dense(shape, causal, pooling):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=lq + lk)
    q = q * 2  # peakier attention: cells differ clearly
    t = seer_targets(q, k, bs, causal=causal, pooling=pooling)
    want = _direct_targets(q, k, bs, causal, pooling)
    assert t.shape == want.shape and t.dtype == torch.float64
    torch.testing.assert_close(t, want, rtol=1e-10, atol=1e-12)
    has_q = H.onehot(lq, bs, t.shape[-1], lk - lq).sum(1) > 0
    torch.testing.assert_close(t.sum(-1)[:, :, has_q], torch.ones(b, hq, int(has_q.sum()), dtype=torch.float64))
    assert (t[:, :, ~has_q] == 0).all()


@pytest.mark.parametrize("shape", TARGET_SHAPES[:2])
def test_targets_chunked_equal_unchunked(shape, monkeypatch):
    import attnzoo.routing.seer as seer

    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=9, dtype=torch.float32)
    whole = seer_targets(q, k, bs, rows_per_chunk=1000)
    for rows in (1, 2, 3):
        torch.testing.assert_close(seer_targets(q, k, bs, rows_per_chunk=rows), whole, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(seer, "_TILE", 1)      # default chunking at its smallest: one block row at a time
    torch.testing.assert_close(seer_targets(q, k, bs), whole, rtol=1e-6, atol=1e-7)
    assert whole.dtype == torch.float32


# -- the gate ------------------------------------------------------------------------------------------
def _twin_scores(gate, q, k):
    """The gate's scores from scratch: un-rotate, one-hot/scatter pooling, per-head maps, re-rotate."""
    lq, lk, bs = q.shape[2], k.shape[2], gate.block_size
    nb = -(-lk // bs)
    q, k = q.double(), k.double()
    if gate.rope_base is not None:
        q = _rope(q, torch.arange(lk - lq, lk), gate.rope_base, inverse=True)
        k = _rope(k, torch.arange(lk), gate.rope_base, inverse=True)

    def pooled(x, hows, offset):
        parts = {"avg": H.pool_mean(x, bs, nb, offset)}
        if "max" in hows or "min" in hows:
            assert offset == 0
            parts["max"], parts["min"] = H.pool_maxmin(x, bs, nb)
        return torch.cat([parts[h] for h in hows], -1)

    qf = torch.einsum("bhni,hie->bhne", pooled(q, gate.q_pooling, lk - lq), gate.q_weight.double())
    kf = torch.einsum("bhni,hie->bhne", pooled(k, gate.k_pooling, 0), gate.k_weight.double())
    if gate.rope_base is not None:
        qf = _rope(qf, torch.arange(nb) * bs, gate.rope_base)
        kf = _rope(kf, torch.arange(nb) * bs, gate.rope_base)
    return qf @ H.expand_heads(kf, q.shape[1]).transpose(-1, -2) * gate.hidden_size ** -0.5


@pytest.mark.parametrize("shape,opts", [
    ((2, 4, 2, 50, 50, 8), dict(block_size=8)),
    ((2, 4, 2, 50, 50, 8), dict(block_size=8, q_pooling=("avg", "max", "min"), k_pooling=("max", "min", "avg"),
                                hidden_size=6, rope_base=10000.0)),
    ((1, 2, 1, 30, 75, 8), dict(block_size=16, rope_base=500.0)),       # cross, rows without queries
])
def test_gate_scores_and_distribution(shape, opts):
    b, hq, hkv, lq, lk, d = shape
    torch.manual_seed(0)
    gate = SeerGate(hq, d, hkv, **opts)
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=4)
    nb = -(-lk // gate.block_size)
    s = gate.scores(q, k)
    assert s.shape == (b, hq, nb, nb) and s.dtype == torch.float64
    torch.testing.assert_close(s, _twin_scores(gate, q, k), rtol=1e-6, atol=1e-6)
    for causal in (True, False):
        p = gate(q, k, causal=causal)
        allowed, _ = H.allowed_forced(nb, H.onehot(lq, gate.block_size, nb, lk - lq).sum(1) > 0, causal, 0, 0)
        has_q = allowed.any(-1)
        assert (p[:, :, ~allowed] == 0).all() and (p >= 0).all()
        torch.testing.assert_close(p.sum(-1)[:, :, has_q], torch.ones(b, hq, int(has_q.sum()), dtype=p.dtype))
        logp = gate(q, k, causal=causal, log=True)
        torch.testing.assert_close(logp.exp(), p)
        want = torch.softmax(torch.where(allowed, s, -INF), -1).nan_to_num(0.0)
        torch.testing.assert_close(p, want)


def test_rope_undo_matches_the_layers_rotary():
    x = H.rand(2, 3, 20, 8, seed=1)
    pos = torch.arange(5, 25)
    rot = RotaryEmbedding(8, base=1000.0)(x, pos)
    torch.testing.assert_close(_rope(rot, pos, 1000.0, inverse=True), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_rope(x, pos, 1000.0), rot, rtol=1e-12, atol=1e-12)


def test_gate_with_rope_base_sees_the_unrotated_inputs():
    """On q, k rotated by the layer's RoPE, a gate with rope_base scores as a gate without it on the
    pre-RoPE q, k, with its projected block features then rotated at the block positions."""
    b, h, L, d = 1, 2, 48, 8
    q, k, _ = H.qkv(b, h, h, L, L, d, seed=6)
    rot = RotaryEmbedding(d)
    torch.manual_seed(1)
    gate = SeerGate(h, d, block_size=16, rope_base=10000.0)
    s = gate.scores(rot(q), rot(k))
    raw = SeerGate(h, d, block_size=16)
    raw.load_state_dict(gate.state_dict())
    nb = L // 16
    qf, kf = raw.features(q, k)                       # pooled pre-RoPE features, not rotated
    qf, kf = (_rope(t, torch.arange(nb) * 16, 10000.0) for t in (qf, kf))
    torch.testing.assert_close(s, qf @ kf.transpose(-1, -2) * d ** -0.5, rtol=1e-8, atol=1e-8)


# -- distillation on data with a learnable block structure ------------------------------------------------
def topic_qk(n, seed, L=128, bs=16, d=16, hq=2, hkv=1, topics=6):
    """Key block c of a sequence carries a random topic; each query block asks for the topic of a random
    block at or before it. Queries and keys are the topic vectors plus noise seen through a fixed random
    linear map and its inverse transpose (so q . k = topic . topic + noise): a structure a gate can learn
    and a random gate does not have."""
    g0 = torch.Generator().manual_seed(1234)
    e = torch.randn(topics, d, generator=g0)
    m = torch.linalg.qr(torch.randn(d, d, generator=g0))[0] * torch.linspace(0.5, 2.0, d)
    g = torch.Generator().manual_seed(seed)
    nb = L // bs
    tau = torch.randint(topics, (n, hkv, nb), generator=g)
    uk = e[tau].repeat_interleave(bs, 2) + 0.3 * torch.randn(n, hkv, L, d, generator=g)
    pick = (torch.rand(n, hq, nb, generator=g) * (torch.arange(nb) + 1)).long()
    tq = tau.repeat_interleave(hq // hkv, 1).gather(2, pick)
    uq = e[tq].repeat_interleave(bs, 2) + 0.3 * torch.randn(n, hq, L, d, generator=g)
    return uq @ m, uk @ torch.linalg.inv(m).T


@pytest.fixture(scope="module")
def distilled():
    q, k = topic_qk(32, 0)
    torch.manual_seed(0)
    gate = SeerGate(2, 16, 1, block_size=16)
    untrained = SeerGate(2, 16, 1, block_size=16)
    untrained.load_state_dict(gate.state_dict())
    history = distill_gate(gate, (q, k), steps=60, lr=3e-2, batch_size=8, progress=False)
    return gate, untrained, history


def test_distillation_reduces_kl(distilled):
    gate, untrained, history = distilled
    assert len(history) == 60
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.1 * first, (first, last)
    qt, kt = topic_qk(8, 1)
    t = seer_targets(qt, kt, 16)
    with torch.no_grad():
        assert seer_loss(gate, qt, kt, t) < 0.2 * seer_loss(untrained, qt, kt, t)   # held-out data too


def test_trained_router_beats_untrained_at_equal_top_k(distilled):
    gate, untrained, _ = distilled
    qt, kt = topic_qk(16, 1)
    v = H.rand(*kt.shape, seed=3, dtype=torch.float32)
    kw = dict(top_k=1, sinks=0, local=1)
    res = {name: evaluate(qt, kt, v, SeerRouter(g, **kw)) for name, g in (("trained", gate), ("untrained", untrained))}
    torch.testing.assert_close(res["trained"]["density"], res["untrained"]["density"])
    assert res["trained"]["recall"].mean() > res["untrained"]["recall"].mean() + 0.15
    assert res["trained"]["rel_error"].mean() < res["untrained"]["rel_error"].mean()
    # about as good as mean pooling, which is exact for this data
    assert res["trained"]["recall"].mean() > evaluate(qt, kt, v, TopKBlocks(16, **kw))["recall"].mean() - 0.05
    thr = evaluate(qt, kt, v, SeerRouter(gate, threshold=0.9))
    assert thr["recall"].mean() > 0.85 and thr["density"].mean() < 0.9


@pytest.mark.parametrize("case", [(2, 4, 2, 70, 70, 8, True), (1, 2, 1, 33, 60, 8, True), (2, 2, 2, 48, 48, 8, False)])
def test_routed_attention_forward_and_grads(case):
    b, hq, hkv, lq, lk, d, causal = case
    torch.manual_seed(2)
    router = SeerRouter(SeerGate(hq, d, hkv, block_size=8, rope_base=10000.0), top_k=2, causal=causal)
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=lq, grad=True)
    out = az.attention(q, k, v, pattern=router, backend="reference")
    w = H.rand(*out.shape, seed=3)
    dq, dk, dv = torch.autograd.grad((out * w).sum(), (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, 8, causal)
    assert not m.all()
    ref = H.dense_attention(q, k, v, m)
    rq, rk, rv = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, x, y in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        check_close(name, x, y)


def test_router_selection_matches_twin():
    q, k, _ = H.qkv(2, 4, 2, 100, 100, 8, seed=8)
    torch.manual_seed(3)
    gate = SeerGate(4, 8, 2, block_size=16)
    s = _twin_scores(gate, q, k)
    has_q = torch.ones(7, dtype=torch.bool)
    assert torch.equal(SeerRouter(gate, top_k=2)(q, k), H.select(s, has_q, True, 1, 1, top_k=2))
    assert torch.equal(SeerRouter(gate, threshold=0.7, sinks=0)(q, k), H.select(s, has_q, True, 0, 1, threshold=0.7))


# -- the data sources, progress, capture -------------------------------------------------------------
def test_sources_and_progress(capsys):
    q, k = topic_qk(4, 2, L=64)
    pairs = [(q[:2], k[:2]), (q[2:], k[2:])]
    torch.manual_seed(0)
    gate = SeerGate(2, 16, 1, block_size=16)
    assert len(distill_gate(gate, pairs, steps=5, progress=False)) == 5
    assert len(distill_gate(gate, lambda step: pairs[step % 2], steps=3, progress=False)) == 3
    assert len(distill_gate(gate, iter(pairs), steps=10, progress=False)) == 2      # exhausted: stops early
    assert len(distill_gate(gate, (q, k, k), steps=2, progress=False)) == 2          # capture_qk(values=True)
    assert capsys.readouterr().out == ""
    buf = io.StringIO()
    h = distill_gate(gate, (q, k), steps=4, batch_size=2, log_every=2, stream=buf)
    lines = buf.getvalue().splitlines()
    assert len(h) == 4 and len(lines) == 3 and lines[-1].startswith("distill step 4/4")


def test_capture_qk_single_layer_and_tinylm():
    torch.manual_seed(0)
    layer = Attention(32, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 20, 32)
    cap = capture_qk(layer, x)
    q, k, v = layer.project_qkv(x)
    assert list(cap) == ["(model)"]
    torch.testing.assert_close(cap["(model)"][0], q)
    torch.testing.assert_close(cap["(model)"][1], k)
    assert "project_qkv" not in layer.__dict__
    torch.testing.assert_close(capture_qk(layer, x, values=True)["(model)"][2], v)
    model = TinyLM(64, 32, 2, n_heads=2).train()
    idx = torch.randint(64, (3, 24))
    cap = capture_qk(model, idx)
    assert sorted(cap) == ["blocks.0.mixer", "blocks.1.mixer"] and model.training
    assert cap["blocks.1.mixer"][0].shape == (3, 2, 24, 16) and not cap["blocks.1.mixer"][0].requires_grad
    with recording_qk(model) as rec, torch.no_grad():
        model(idx[:1])
        model(idx[1:])
    assert [len(v) for v in rec.values()] == [2, 2]
    torch.testing.assert_close(torch.cat([rec["blocks.0.mixer"][0][1], rec["blocks.0.mixer"][1][1]]),
                               cap["blocks.0.mixer"][1])
    assert all("project_qkv" not in m.__dict__ for m in model.modules())


# -- argument errors -----------------------------------------------------------------------------------
_G = SeerGate(2, 8, block_size=8)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: SeerGate(0, 8), ValueError, "num_heads"),
    (lambda: SeerGate(2, 8.0), TypeError, "head_dim"),
    (lambda: SeerGate(4, 8, num_kv_heads=3), ValueError, "num_kv_heads"),
    (lambda: SeerGate(2, 8, block_size=0), ValueError, "block_size"),
    (lambda: SeerGate(2, 8, hidden_size=0), ValueError, "hidden_size"),
    (lambda: SeerGate(2, 8, q_pooling=("mean",)), ValueError, "q_pooling"),
    (lambda: SeerGate(2, 8, k_pooling=()), TypeError, "k_pooling"),
    (lambda: SeerGate(2, 8, k_pooling=("max", "max")), ValueError, "k_pooling"),
    (lambda: SeerGate(2, 8, rope_base=1.0), ValueError, "rope_base"),
    (lambda: SeerGate(2, 8, rope_base="big"), TypeError, "rope_base"),
    (lambda: SeerGate(2, 7, rope_base=10000.0), ValueError, "even"),
    (lambda: SeerRouter(TopKBlocks(8, top_k=1), top_k=1), TypeError, "SeerGate"),
    (lambda: SeerRouter(_G), ValueError, "exactly one"),
    (lambda: SeerRouter(_G, top_k=1, threshold=0.5), ValueError, "exactly one"),
    (lambda: SeerRouter(_G, top_k=0), ValueError, "top_k"),
    (lambda: SeerRouter(_G, threshold=1.5), ValueError, "threshold"),
    (lambda: SeerRouter(_G, top_k=1, sinks=-1), ValueError, "sinks"),
    (lambda: SeerRouter(_G, top_k=1, causal=None), TypeError, "causal"),
    (lambda: _G(torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)), ValueError, "built for"),
    (lambda: _G(torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)), ValueError, "built for"),
    (lambda: _G(torch.randn(1, 2, 16), torch.randn(1, 2, 16, 8)), ValueError, "q must have 4"),
    (lambda: _G(torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), causal=1), TypeError, "causal"),
    (lambda: seer_targets(torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), 0), ValueError, "block_size"),
    (lambda: seer_targets(torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), 8, pooling="mean"), ValueError,
     "pooling"),
    (lambda: seer_targets(torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), 8, rows_per_chunk=0), ValueError,
     "rows_per_chunk"),
    (lambda: seer_targets(torch.randn(1, 2, 20, 8), torch.randn(1, 2, 16, 8), 8), ValueError, "q length"),
    (lambda: distill_gate(TopKBlocks(8, top_k=1), None), TypeError, "SeerGate"),
    (lambda: distill_gate(_G, [], steps=1), ValueError, "empty"),
    (lambda: distill_gate(_G, 5, steps=1), TypeError, "qk_source"),
    (lambda: distill_gate(_G, [(1, 2)], steps=1), TypeError, r"qk_source\[0\]"),
    (lambda: distill_gate(_G, iter([3]), steps=1), TypeError, "pairs"),
    (lambda: distill_gate(_G, lambda step: None, steps=1), TypeError, r"qk_source\(0\)"),
    (lambda: distill_gate(_G, [], steps=0), ValueError, "steps"),
    (lambda: distill_gate(_G, [], lr=0), ValueError, "lr"),
    (lambda: distill_gate(_G, [], skip_frac=1.0), ValueError, "skip_frac"),
    (lambda: distill_gate(_G, [], target_pooling="avg"), ValueError, "target_pooling"),
    (lambda: distill_gate(_G, [], batch_size=0), ValueError, "batch_size"),
    (lambda: distill_gate(_G, [], progress="yes"), TypeError, "progress"),
    (lambda: capture_qk(torch.nn.Linear(2, 2), torch.randn(1, 2)), ValueError, "no attention layer"),
    (lambda: capture_qk("model"), TypeError, "nn.Module"),
])
def test_argument_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
