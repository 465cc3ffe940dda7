"""`HiP` (hierarchical top-k pruning): masks against a loop-based reference written from the paper's
description, the search invariants (exactly top_k disjoint groups per level, halving sizes), routed
attention against float64 dense masked attention (forward and grads), `evaluate`, argument errors."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.routing import HiP, evaluate
from attnzoo.testing import check_close

import routing_helpers as H


def ref_hip(q, k, bs, top_k, representative="center", sinks=1, local=1, causal=True):
    """HiP with Python lists: per (batch, head, query block), the candidate key blocks in order, top_k
    groups dividing them evenly, then halve every group and keep the top_k halves by the score of the
    representative key against the block's mean query, until all groups are single blocks."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nb = -(-lk // bs)
    off = lk - lq
    mask = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            keys = k[bi, h // (hq // hkv)].double()
            for r in range(nb):
                rows = [p - off for p in range(r * bs, (r + 1) * bs) if off <= p < lk]
                if not rows:
                    continue
                qm = q[bi, h, rows].double().mean(0)
                allowed = [c for c in range(nb) if not causal or c <= r]
                near = [c for c in allowed if (0 <= r - c < local if causal else abs(r - c) < local)]
                forced = [c for c in allowed if c < sinks or c in near]
                cands = [c for c in allowed if c not in forced]

                def score(group):
                    n = len(group)
                    centre = n * bs // 2                  # virtual token of the half's centre
                    blk = group[centre // bs]
                    if representative == "center":
                        key = keys[min(blk * bs + centre % bs, lk - 1)]
                    else:
                        key = keys[blk * bs:min((blk + 1) * bs, lk)].mean(0)
                    return float(qm @ key)

                n = len(cands)
                groups = [cands[j * n // top_k:(j + 1) * n // top_k] for j in range(top_k)]
                groups = [gr for gr in groups if gr]
                while any(len(gr) > 1 for gr in groups):
                    halves = []
                    for gr in groups:
                        m = (len(gr) + 1) // 2
                        halves += [gr[:m]] + ([gr[m:]] if gr[m:] else [])
                    groups = sorted(halves, key=score, reverse=True)[:top_k]
                for c in forced + [gr[0] for gr in groups]:
                    mask[bi, h, r, c] = True
    return mask


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, bs)
    (1, 2, 2, 128, 128, 8, 8),      # 16 blocks, several levels
    (2, 4, 2, 100, 100, 8, 8),      # batch, GQA, ragged last block
    (2, 2, 1, 37, 90, 8, 5),        # cross (bottom-right), MQA, odd block size
    (1, 2, 1, 1, 70, 8, 4),         # one query (decode)
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", [dict(top_k=2), dict(top_k=3, sinks=0, local=0), dict(top_k=1, sinks=2, local=2,
                                  representative="mean"), dict(top_k=40)])
def test_mask_matches_loop_reference(shape, causal, opts):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=sum(shape))
    m = HiP(bs, causal=causal, **opts)(q, k)
    assert m.dtype == torch.bool and m.shape == (b, hq, -(-lk // bs), -(-lk // bs))
    assert torch.equal(m, ref_hip(q, k, bs, causal=causal, **opts))


def test_low_precision_routes():
    q, k, _ = H.qkv(1, 2, 1, 64, 64, 16, seed=1, dtype=torch.bfloat16)
    m = HiP(8, top_k=2)(q, k)
    assert torch.equal(m, ref_hip(q.float(), k.float(), 8, 2))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_invariants(causal, top_k):
    """Per level: exactly min(top_k, n_r) non-empty groups, disjoint, inside [0, n_r), at most
    ceil(ceil(n_r / K) / 2^level) blocks each; the last level single blocks. The mask: causal, rows
    without queries empty, sinks and local kept, forced + min(top_k, n_r) blocks per row."""
    b, hq, hkv, lq, lk, d, bs, sinks, local = 2, 2, 1, 150, 200, 8, 8, 2, 2
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=top_k)
    router = HiP(bs, top_k=top_k, sinks=sinks, local=local, causal=causal)
    trace = []
    with torch.no_grad():
        m = router._route(q, k, trace=trace)
    assert torch.equal(m, router(q, k))
    nb, first = -(-lk // bs), (lk - lq) // bs
    n = router._candidates(nb, first, q.device)[0]                  # (nb,) candidates per row
    assert len(trace) == 1 + math.ceil(math.log2(math.ceil(nb / top_k)))
    for level, (lo, hi) in enumerate(trace):
        size = hi - lo
        assert (size >= 0).all() and (lo >= 0).all() and (hi <= n[:, None]).all()
        assert torch.equal((size > 0).sum(-1), n.clamp(max=top_k).expand(b, hq, nb))
        cap = -(-(-(-n // top_k)) // 2 ** level)                    # ceil(ceil(n / K) / 2^level)
        assert (size <= cap[:, None]).all()
        cover = torch.zeros(b, hq, nb, nb + 1, dtype=torch.long)    # disjoint: every virtual block at most once
        for j in range(top_k):
            pos = torch.arange(nb + 1)
            cover += ((pos >= lo[..., j, None]) & (pos < hi[..., j, None])).long()
        assert cover.max() <= 1
    assert ((trace[-1][1] - trace[-1][0]) <= 1).all()
    rows = torch.arange(first, nb)
    assert not m[:, :, :first].any()
    if causal:
        assert not torch.triu(m, diagonal=1).any()
    assert m[:, :, rows, :sinks].all() and m[:, :, rows, rows].all() and m[:, :, rows[1:], rows[1:] - 1].all()
    _, forced = H.allowed_forced(nb, torch.arange(nb) >= first, causal, sinks, local)
    want = forced.sum(-1) + n.clamp(max=top_k)
    assert torch.equal(m.sum(-1), want.expand(b, hq, nb))


def test_everything_selected_is_causal_attention():
    q, k, v = H.qkv(2, 2, 1, 40, 40, 8, seed=2)
    out = az.attention(q, k, v, pattern=HiP(8, top_k=5), backend="reference")
    check_close("out", out, az.attention(q, k, v, pattern=az.Causal(), backend="reference"))


CASES = [  # (B, Hq, Hkv, Lq, Lk, D, router)
    (2, 4, 2, 100, 100, 8, HiP(8, top_k=2)),
    (1, 2, 1, 45, 77, 8, HiP(8, top_k=2, representative="mean", sinks=0, local=2)),
    (2, 2, 2, 64, 64, 8, HiP(8, top_k=1, causal=False)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c[-1])[:50])
def test_routed_attention_matches_dense(case):
    b, hq, hkv, lq, lk, d, router = case
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=lq, grad=True)
    out = az.attention(q, k, v, pattern=router, backend="reference")
    w = H.rand(*out.shape, seed=3)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, router.block_size, router.causal)
    assert not m.all(), "the case should be sparse"
    ref = H.dense_attention(q, k, v, m)
    rgrads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    check_close("out", out, ref)
    for name, x, y in zip(("dq", "dk", "dv"), grads, rgrads):
        check_close(name, x, y)


def test_evaluate_recall_rises_with_top_k():
    q, k, v = H.qkv(1, 4, 2, 256, 256, 16, seed=4)
    q = q * 2
    recall = [evaluate(q, k, v, HiP(16, top_k=t))["recall"].mean().item() for t in (1, 3, 6, 16)]
    assert recall[0] < recall[1] < recall[2] < recall[3]
    assert abs(recall[3] - 1) < 1e-12


def test_repr_equality_exports():
    ns = {name: getattr(az, name) for name in az.__all__}
    r = HiP(32, top_k=4, representative="mean", sinks=2, local=3, causal=False)
    again = eval(repr(r), ns)
    assert again == r and hash(again) == hash(r) and HiP(32, top_k=4) != HiP(32, top_k=5)
    assert az.HiP is az.routing.HiP is HiP and "HiP" in az.routing.__all__


def test_routing_is_not_differentiated():
    q, k, _ = H.qkv(1, 2, 2, 32, 32, 8, grad=True)
    assert not HiP(8, top_k=1)(q, k).requires_grad


@pytest.mark.parametrize("ctor,exc,words", [
    (lambda: HiP(0, top_k=1), ValueError, "block_size"),
    (lambda: HiP(8.0, top_k=1), TypeError, "block_size"),
    (lambda: HiP(8, top_k=0), ValueError, "top_k"),
    (lambda: HiP(8, top_k=None), TypeError, "top_k"),
    (lambda: HiP(8, top_k=2, representative="first"), ValueError, "representative"),
    (lambda: HiP(8, top_k=2, sinks=-1), ValueError, "sinks"),
    (lambda: HiP(8, top_k=2, local=1.0), TypeError, "local"),
    (lambda: HiP(8, top_k=2, causal=1), TypeError, "causal"),
])
def test_constructor_errors(ctor, exc, words):
    with pytest.raises(exc, match=words):
        ctor()


def test_call_errors():
    with pytest.raises(ValueError, match="q length <= k length"):
        HiP(8, top_k=1)(torch.randn(1, 1, 9, 4), torch.randn(1, 1, 8, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        HiP(8, top_k=1)(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4))
