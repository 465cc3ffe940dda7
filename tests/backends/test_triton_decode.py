"""attnzoo's split-K decode kernel (short queries, long KV) against the float64 reference, run by Triton's
CPU interpreter on small shapes: Lq in {1, 3, 16}, odd key lengths, GQA groups, every pattern family
(per-head and document ones included), fully masked rows, padded head dims, several split counts, fp32
and fp16; outputs (and the split workspace) are poisoned with NaN before each launch."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close

from common import dense, inputs

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton.decode import attention_decode, decode_plan  # noqa: E402


def _docs(lk):
    """Document lengths summing to lk."""
    if lk < 3:
        return [lk]
    a, b = lk // 4, lk // 2
    return [a, b, lk - a - b]


PATTERNS = {
    "full": lambda lk: None,
    "causal": lambda lk: az.Causal(),
    "window": lambda lk: az.SlidingWindow(9),
    "sinks+window": lambda lk: az.SlidingWindow(6) | az.Sinks(3),
    "document&causal": lambda lk: az.Document(_docs(lk)) & az.Causal(),
    "document": lambda lk: az.Document(_docs(lk)),
    "prefix": lambda lk: az.PrefixLM(13),
    "dilated": lambda lk: az.Dilated(5, 3),
    "chunked&causal": lambda lk: az.Chunked(11) & az.Causal(),
    "perhead": lambda lk: az.PerHead([az.Causal(), az.SlidingWindow(4), az.Full(), az.Dilated(3, 2)]),
}


def _check(pattern, shape, dtype=torch.float32, seed=0, **kw):
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    scale = shape[5] ** -0.5
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out, lse = attention_decode(ql, kl, vl, pattern, scale, poison=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    base = dense(ql, kl, vl, pattern)[0] if dtype == torch.float16 else None
    check_close("out", out, ref_o, baseline=base)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "lse: -inf rows differ"
    assert not torch.isnan(lse).any()
    fin = torch.isfinite(ref_l)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse[fin].double(), ref_l[fin].double(), rtol=tol, atol=tol)
    assert torch.all(out[~fin] == 0), "rows that see no key must be 0"
    return out, lse


@pytest.mark.parametrize("pname", PATTERNS)
@pytest.mark.parametrize("lq, lk, hq, hkv", [(1, 200, 4, 2), (3, 37, 4, 1), (16, 200, 4, 2), (3, 1, 4, 2)])
def test_patterns_gqa_lengths(pname, lq, lk, hq, hkv):
    _check(PATTERNS[pname](lk), (1, hq, hkv, lq, lk, 32, 32), seed=lq + lk)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 9])
@pytest.mark.parametrize("pname", ["causal", "sinks+window", "document&causal", "perhead"])
def test_num_splits(pname, num_splits):
    """Splits with no block (9 splits of 3 visited blocks) and splits whose keys are all masked merge to
    the same result; B=2 checks the batch offsets."""
    _check(PATTERNS[pname](37), (2, 4, 2, 3, 37, 32, 32), num_splits=num_splits, seed=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fully_masked_rows(num_splits):
    # Lq > Lk: causal rows at negative positions see nothing
    out, lse = _check(az.Causal(), (1, 4, 2, 16, 5, 32, 32), num_splits=num_splits)
    assert torch.all(torch.isneginf(lse[:, :, :11])) and torch.all(torch.isfinite(lse[:, :, 11:]))
    # rows inside the keys that see nothing: a window of 2 intersected with 3 sinks
    p = az.SlidingWindow(2) & az.Sinks(3)
    out, lse = _check(p, (1, 4, 1, 16, 18, 32, 32), num_splits=num_splits)
    assert torch.all(torch.isfinite(lse[:, :, :3])) and torch.all(torch.isneginf(lse[:, :, 3:]))
    assert torch.all(out[:, :, 3:] == 0)
    # no row sees anything: no block is visited at all
    out, lse = _check(p, (1, 4, 2, 3, 200, 32, 32), num_splits=num_splits)
    assert torch.all(torch.isneginf(lse)) and torch.all(out == 0)


@pytest.mark.parametrize("d, dv, dtype", [(48, 24, torch.float32), (32, 64, torch.float32),
                                          (48, 24, torch.float16), (64, 64, torch.float16)])
def test_head_dims_and_fp16(d, dv, dtype):
    _check(az.SlidingWindow(10) | az.Sinks(2), (1, 4, 2, 3, 73, d, dv), dtype, seed=d + dv, num_splits=3)


@pytest.mark.parametrize("pname", ["full", "perhead8"])
def test_group_cut_into_chunks(pname):
    """A group with more rows than ``max_rows`` is split over programs (heads 0-1, 2-3 of each group)."""
    pattern = (None if pname == "full" else
               az.PerHead([az.Causal(), az.SlidingWindow(4), az.Full(), az.Dilated(3, 2),
                           az.Sinks(2), az.PrefixLM(20), az.SlidingWindow(30), az.Causal()]))
    _check(pattern, (1, 8, 2, 3, 60, 32, 32), max_rows=8, num_splits=2)
    plan = decode_plan(pattern, 3, 60, 16, 8, 2, "cpu", 8)
    assert (plan.chunks, plan.heads_per_chunk) == (2, 2)


def test_block_n_and_plan():
    p = az.SlidingWindow(6) | az.Sinks(3)
    _check(p, (1, 4, 2, 1, 200, 32, 32), block_n=32, num_splits=2)
    plan = decode_plan(p, 1, 200, 16, 4, 2, "cpu")
    # the sink block 0 and block 12 (keys 192..199, ragged; 193..199 visible): both need the mask
    assert plan.owners == 1 and plan.lists[0, :3].tolist() == [2, 0 * 2 + 1, 12 * 2 + 1]
    plan = decode_plan(None, 1, 200, 16, 4, 2, "cpu")
    assert int(plan.lists[0, 0]) == 13 and plan.keys_read == 2 * 200
    assert plan.lists[0, 1:14].tolist() == [2 * i for i in range(13)]


def test_strided_views_of_a_kv_cache():
    """q as a transposed (B, Lq, Hq, D) tensor, K/V as the first Lk positions of a longer cache."""
    b, hq, hkv, lq, lk, d = 2, 4, 2, 3, 45, 32
    q, k, v = (t.detach() for t in inputs(b, hq, hkv, lq, lk + 19, d, d, dtype=torch.float32, seed=5))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    kc, vc = k[:, :, :lk], v[:, :, :lk]
    assert not (q.is_contiguous() or kc.is_contiguous() or vc.is_contiguous())
    p = az.SlidingWindow(9) | az.Sinks(2)
    ref_o, ref_l = reference_attention(*(t.double().contiguous() for t in (q, kc, vc)), p)
    out, lse = attention_decode(q, kc, vc, p, d ** -0.5, poison=True, num_splits=2)
    check_close("out", out, ref_o)
    torch.testing.assert_close(lse.double(), ref_l.double(), rtol=1e-5, atol=1e-5)


def test_backend_routes_short_queries_to_decode(monkeypatch):
    """attention(backend='triton') with Lq <= 16 and no grad takes the decode kernel; with grad the
    forward/backward kernels."""
    import attnzoo as az
    from attnzoo.backends.triton import decode as dec

    calls = []
    real = dec.attention_decode
    monkeypatch.setattr(dec, "attention_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = (t.detach().float() for t in inputs(1, 4, 2, 3, 50, 32, 32))
    p = az.SlidingWindow(9) | az.Sinks(2)
    out = az.attention(q, k, v, p, backend="triton")
    assert calls == [1]
    torch.testing.assert_close(out, az.attention(q, k, v, p, backend="reference"), rtol=1e-4, atol=1e-5)
    out2 = az.attention(q.requires_grad_(), k, v, p, backend="triton")
    assert calls == [1]
    torch.testing.assert_close(out2.detach(), out, rtol=1e-4, atol=1e-5)
