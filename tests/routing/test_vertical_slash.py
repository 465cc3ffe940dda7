"""`VerticalSlash` (MInference) against a loop-based reference: the probe's column and diagonal sums, the kept
columns/diagonals, and the block mask as the blocks touched by the token pattern; invariants; routed attention
and gradients against float64 dense masked softmax; `evaluate`."""
import pytest
import torch

import attnzoo as az
from attnzoo.routing import VerticalSlash, evaluate
from attnzoo.routing.vertical_slash import column_mass, diagonal_mass, probe_attention
from attnzoo.testing import check_close

import routing_helpers as H

SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, bs)
    (1, 2, 2, 64, 64, 8, 16),       # lengths multiple of the block
    (2, 4, 2, 100, 100, 8, 16),     # batch, GQA, ragged last block
    (2, 3, 1, 37, 90, 8, 16),       # cross (Lq < Lk, bottom-right), MQA, query rows start mid-grid
    (1, 2, 1, 1, 70, 8, 8),         # one query (decode)
    (1, 2, 1, 96, 96, 8, 4),        # many small blocks: a sparse block mask
]


# -- loop-based reference (also used by test_flexprefill) ---------------------------------------------
def probe_sums(q, k, n_probe):
    """Per (batch, query head): vertical[j] and slash[o] = mean over the last n_probe queries of the causal
    softmax attention on key j / on key (position - o). Plain loops over heads and probe queries."""
    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    lk = k.shape[2]
    m = min(n_probe, lq)
    vert = torch.zeros(b, hq, lk, dtype=torch.float64)
    slash = torch.zeros(b, hq, lk, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for t in range(m):
                pos = lk - m + t                                   # the query's position on the key axis
                s = k[bi, h // g, :pos + 1].double() @ q[bi, h, lq - m + t].double() * d ** -0.5
                a = torch.softmax(s, 0)                            # over keys j = 0 .. pos
                vert[bi, h, :pos + 1] += a / m
                slash[bi, h, pos - torch.arange(pos + 1)] += a / m  # key j lies on diagonal pos - j
    return vert, slash


def top_with_forced(scores, count, n_forced):
    """The first n_forced entries, then the best others up to count in all (ranks, no top-k)."""
    n = scores.shape[-1]
    forced = torch.arange(n) < n_forced
    s = torch.where(forced, float("inf"), scores)
    rank = (-s).argsort(-1).argsort(-1)
    return forced | (rank < count)


def token_pattern(cols, diags, lq, lk):
    """(B, H, Lq, Lk) bool: query i (position p) sees key j <= p when column j or diagonal p - j is kept."""
    b, h, _ = cols.shape
    t = torch.zeros(b, h, lq, lk, dtype=torch.bool)
    for i in range(lq):
        p = i + lk - lq
        for j in range(p + 1):
            t[:, :, i, j] = cols[:, :, j] | diags[:, :, p - j]
    return t


def blocks_of(tok, lk, bs):
    """(B, H, nb, nb): a block is on when it holds a visible token pair."""
    b, h, lq, _ = tok.shape
    nb = -(-lk // bs)
    m = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    for i in range(lq):
        p = i + lk - lq
        for j in range(lk):
            m[:, :, p // bs, j // bs] |= tok[:, :, i, j]
    return m


def ref_vertical_slash(q, k, vertical, slash, bs, last_q, sink_tokens, local_tokens):
    vert, sl = probe_sums(q, k, last_q)
    cols = top_with_forced(vert, vertical, sink_tokens)
    diags = top_with_forced(sl, slash, local_tokens)
    tok = token_pattern(cols, diags, q.shape[2], k.shape[2])
    return cols, diags, tok, blocks_of(tok, k.shape[2], bs)


# -- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [dict(vertical=6, slash=5, last_q=16, sink_tokens=3, local_tokens=4),
                                  dict(vertical=1, slash=1, last_q=64, sink_tokens=0, local_tokens=0),
                                  dict(vertical=2, slash=3, last_q=5, sink_tokens=10, local_tokens=10)])
def test_matches_loop_reference(shape, opts):
    b, hq, hkv, lq, lk, d, bs = shape
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=sum(shape))
    q = q * 2  # less uniform probe attention
    r = VerticalSlash(block_size=bs, **opts)
    cols, diags = r.indices(q, k)
    rc, rd, _, rm = ref_vertical_slash(q, k, opts["vertical"], opts["slash"], bs, opts["last_q"], opts["sink_tokens"],
                                       opts["local_tokens"])
    assert torch.equal(cols, rc) and torch.equal(diags, rd)
    m = r(q, k)
    nb = -(-lk // bs)
    assert m.shape == (b, hq, nb, nb) and m.dtype == torch.bool
    assert torch.equal(m, rm)


def test_probe_sums_match_loops():
    q, k, _ = H.qkv(2, 4, 2, 30, 45, 8, seed=4)
    p = probe_attention(q, k, 12)
    vert, sl = probe_sums(q, k, 12)
    torch.testing.assert_close(column_mass(p), vert, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(diagonal_mass(p), sl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(diagonal_mass(p).sum(-1), torch.ones(2, 4, dtype=torch.float64))


def test_invariants_counts_causal_coverage():
    """Counts per head = max(budget, forced); causal; rows without queries empty; every token pair of the
    vertical/slash pattern lies in an active block, and every active block holds one (the minimal superset)."""
    b, hq, hkv, lq, lk, d, bs = 2, 4, 2, 50, 130, 16, 16
    q, k, _ = H.qkv(b, hq, hkv, lq, lk, d, seed=11, dtype=torch.bfloat16)
    r = VerticalSlash(7, 9, block_size=bs, last_q=20, sink_tokens=3, local_tokens=12)
    cols, diags = r.indices(q, k)
    assert (cols.sum(-1) == 7).all() and (diags.sum(-1) == 12).all()       # 12 forced diagonals > 9
    assert cols[..., :3].all() and diags[..., :12].all()
    m = r(q, k)
    nb = m.shape[-1]
    assert not m.triu(1).any()
    first_row = (lk - lq) // bs
    assert not m[:, :, :first_row].any() and m.diagonal(dim1=-2, dim2=-1)[..., first_row:].all()
    tok = token_pattern(cols, diags, lq, lk)
    assert torch.equal(m, blocks_of(tok, lk, bs))
    assert nb == 9


def test_constructed_vertical_and_slash_heads():
    """Head 0 attends to one key column (a big key all queries align with): that column is kept and its block
    column is on from its row down. Head 1 attends 3 tokens back (one-hot q/k): offset 3 is kept, and the
    blocks of (p, p - 3) are on."""
    lk, d, bs = 64, 64, 8
    q = torch.zeros(1, 2, lk, d, dtype=torch.float64)
    k = torch.zeros(1, 2, lk, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    k[0, 0] = torch.randn(lk, d, generator=g, dtype=torch.float64) * 0.1
    k[0, 0, 21, 0] = 30.0
    q[0, 0, :, 0] = 1.0
    eye = torch.eye(d, dtype=torch.float64) * 20
    k[0, 1] = eye
    q[0, 1] = eye.roll(3, 0)      # q_p = 20 e_{p-3}: the best key of query p is p - 3
    r = VerticalSlash(2, 2, block_size=bs, last_q=16, sink_tokens=1, local_tokens=1)
    cols, diags = r.indices(q, k)
    assert cols[0, 0, 21] and diags[0, 1, 3]
    m = r(q, k)
    assert m[0, 0, 21 // bs:, 21 // bs].all()
    p = torch.arange(3, lk)
    assert m[0, 1, p // bs, (p - 3) // bs].all()
    out = az.attention(q, k, q, pattern=r, backend="reference")
    ref = az.attention(q, k, q, pattern=az.Causal(), backend="reference")
    check_close("out", out[:, :, 24:], ref[:, :, 24:])  # both heads: what matters is covered


CASES = [  # (B, Hq, Hkv, Lq, Lk, D, router)
    (2, 4, 2, 100, 100, 8, VerticalSlash(5, 5, block_size=16, last_q=16, sink_tokens=2, local_tokens=4)),
    (1, 2, 1, 45, 77, 8, VerticalSlash(3, 8, block_size=8, last_q=8, sink_tokens=1, local_tokens=2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:6]}")
def test_forward_and_grads_match_dense(case):
    b, hq, hkv, lq, lk, d, router = case
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=lq, grad=True)
    out = az.attention(q, k, v, pattern=router, backend="reference")
    w = H.rand(*out.shape, seed=3)
    dq, dk, dv = torch.autograd.grad((out * w).sum(), (q, k, v))
    m = H.token_mask(router(q, k), lq, lk, router.block_size, True)
    assert not m.all(), "the case should be sparse"
    ref = H.dense_attention(q, k, v, m)
    rq, rk, rv = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, x, y in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        check_close(name, x, y)


def test_evaluate_block_recall_at_least_token_recall():
    b, hq, hkv, lq, lk, d, bs = 1, 2, 1, 100, 128, 8, 8
    q, k, v = H.qkv(b, hq, hkv, lq, lk, d, seed=2)
    q = q * 3
    r = VerticalSlash(3, 3, block_size=bs, last_q=16, sink_tokens=1, local_tokens=2)
    res = evaluate(q, k, v, r)
    assert res["recall"].shape == (b, hq) and (res["density"] < 1).all()
    cols, diags = r.indices(q, k)
    tok = token_pattern(cols, diags, lq, lk)
    s = (q @ H.expand_heads(k, hq).transpose(-1, -2)) * d ** -0.5
    nb = -(-lk // bs)
    causal = H.token_mask(torch.ones(b, hq, nb, nb, dtype=torch.bool), lq, lk, bs, True)
    p = torch.softmax(torch.where(causal, s, float("-inf")), -1)
    token_recall = (p * tok).sum(-1).mean(-1)
    assert (res["recall"] >= token_recall - 1e-12).all()
    full = evaluate(q, k, v, VerticalSlash(lk, lk, block_size=bs))
    torch.testing.assert_close(full["recall"], torch.ones(b, hq, dtype=torch.float64))


@pytest.mark.parametrize("ctor,exc,words", [
    (lambda: VerticalSlash(0, 4), ValueError, "vertical"),
    (lambda: VerticalSlash(4, 0), ValueError, "slash"),
    (lambda: VerticalSlash(4, 4.0), TypeError, "slash"),
    (lambda: VerticalSlash(4, 4, block_size=0), ValueError, "block_size"),
    (lambda: VerticalSlash(4, 4, last_q=0), ValueError, "last_q"),
    (lambda: VerticalSlash(4, 4, sink_tokens=-1), ValueError, "sink_tokens"),
    (lambda: VerticalSlash(4, 4, local_tokens=None), TypeError, "local_tokens"),
])
def test_constructor_errors(ctor, exc, words):
    with pytest.raises(exc, match=words):
        ctor()


def test_call_errors_and_repr():
    r = VerticalSlash(4, 4, block_size=8)
    with pytest.raises(ValueError, match="q length <= k length"):
        r.indices(torch.randn(1, 1, 9, 4), torch.randn(1, 1, 8, 4))
    with pytest.raises(ValueError, match="head_dim"):
        r(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 5))
    assert r == VerticalSlash(4, 4, block_size=8) and hash(r) == hash(VerticalSlash(4, 4, block_size=8))
    assert "vertical=4" in repr(r) and r.causal
