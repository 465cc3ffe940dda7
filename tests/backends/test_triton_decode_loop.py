"""The split-K decode kernel's closed-form visit ranges (`decode.range_spec`): for Full, Causal, windows, sinks and
chunks the kernel computes the kv blocks its queries visit from the runtime Lk, so a decode loop whose Lk grows by
one each step builds nothing on the host after its first step. Checked under Triton's CPU interpreter: the host
twin of the range (`range_blocks`) against the visit lists of the layout (same blocks, in the same order, masked
wherever the lists mask), the kernel against the float64 reference (NaN-poisoned outputs, output and lse) and
bit for bit against the list path, for narrow and wide (576/512) heads, Lq 1 and 3, GQA, several splits, key
lengths that are not multiples of the block; and a loop over 40 consecutive Lk that must reuse its cached
launch (at most one new entry per length bucket) and build no visit list."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close

from common import inputs

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import decode as dec  # noqa: E402

BIG = dec.BIG
RANGE = {
    "full": None,
    "causal": az.Causal(),
    "window": az.SlidingWindow(9),
    "window-right": az.SlidingWindow(20, 3),
    "sinks+window": az.SlidingWindow(6) | az.Sinks(3),
    "sinks+window-wide": az.Sinks(20) | az.SlidingWindow(40),
    "sinks": az.Sinks(5),
    "chunked": az.Chunked(11),
    "chunked&causal": az.Chunked(11) & az.Causal(),
    "sinks+chunked&causal": az.Sinks(2) | (az.Chunked(24) & az.Causal()),
    "window&causal": az.SlidingWindow(30, 30) & az.Causal(),
}


def test_range_spec():
    assert dec.range_spec(None) == dec.range_spec(az.Full()) == (0, 1, BIG, BIG)
    assert dec.range_spec(az.Causal()) == (0, 1, BIG, 0)
    assert dec.range_spec(az.SlidingWindow(9, 2)) == (0, 1, 9, 2)
    assert dec.range_spec(az.SlidingWindow(6) | az.Sinks(3)) == (3, 1, 6, 0)
    assert dec.range_spec(az.Sinks(3) | az.SlidingWindow(6)) == (3, 1, 6, 0)
    assert dec.range_spec(az.SlidingWindow(30, 30) & az.Causal()) == (0, 1, 30, 0)
    assert dec.range_spec(az.Chunked(11) & az.Causal()) == (0, 2, 11, 0)
    assert dec.range_spec(az.Causal() | az.SlidingWindow(5)) == (0, 1, BIG, 0)
    assert dec.range_spec(az.Full() & (az.Sinks(4) | az.Causal())) == (4, 1, BIG, 0)
    # everything else keeps the visit lists
    lists = [az.PerHead([az.Causal(), az.SlidingWindow(4)]), az.Document([10, 20]), az.Dilated(5, 3),
             az.PrefixLM(13), az.Neighborhood(5), az.SlidingWindow(6) & az.Sinks(3), az.Chunked(8) | az.Causal(),
             az.Chunked(8) & az.SlidingWindow(4), az.BlockSparse(torch.ones(2, 2, dtype=torch.bool), 16),
             az.RoutedBlocks(torch.ones(2, 2, dtype=torch.bool), 16)]
    for p in lists:
        assert dec.range_spec(p) is None, p


@pytest.mark.parametrize("block_n", [16, 32])
def test_range_blocks_match_the_lists(block_n):
    """The blocks a range visits are the layout's, in order; a block runs unmasked only if the layout has it full."""
    for name, p in RANGE.items():
        spec = dec.range_spec(p)
        for lq in (1, 3, 16):
            for lk in list(range(1, 40)) + [63, 64, 65, 95, 96, 97, 130, 200, 257]:
                got = dec.range_blocks(spec, lq, lk, block_n)
                plan = dec.decode_plan(p, lq, lk, block_n, 2, 1, "cpu")
                n = int(plan.lists[0, 0])
                want = [(e >> 1, bool(e & 1)) for e in plan.lists[0, 1:1 + n].tolist()]
                assert [b for b, _ in got] == [b for b, _ in want], (name, lq, lk)
                assert all(m or not w for (_, m), (_, w) in zip(got, want)), (name, lq, lk)
    # the masked flags are tight where they matter: full attention never masks, a window only its edges
    assert not any(m for _, m in dec.range_blocks(dec.range_spec(None), 1, 1000, 16))
    flags = dec.range_blocks(dec.range_spec(az.SlidingWindow(6) | az.Sinks(3)), 1, 200, 16)
    assert flags == [(0, True), (12, True)]
    flags = dec.range_blocks(dec.range_spec(az.SlidingWindow(100)), 3, 1000, 16)
    assert [m for _, m in flags] == [True] + [False] * 5 + [True]


def _run(pattern, shape, dtype=torch.float32, seed=0, **kw):
    """The range path against the float64 reference, and bit for bit against the list path."""
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    scale = shape[5] ** -0.5
    out, lse = dec.attention_decode(ql, kl, vl, pattern, scale, poison=True, visit="range", **kw)
    check_close("out", out, ref_o)
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "lse: -inf rows differ"
    fin = torch.isfinite(ref_l)
    torch.testing.assert_close(lse[fin].double(), ref_l[fin].double(), rtol=1e-5, atol=1e-5)
    assert torch.all(out[~fin] == 0)
    if kw.get("num_splits"):
        o2, l2 = dec.attention_decode(ql, kl, vl, pattern, scale, poison=True, visit="list", **kw)
        assert torch.equal(out, o2) and torch.equal(lse, l2), "range and list paths differ"
    return out, lse


@pytest.mark.parametrize("pname", list(RANGE))
@pytest.mark.parametrize("lq, lk, hq, hkv, splits", [(1, 203, 4, 2, 3), (3, 37, 4, 1, 2), (3, 2, 2, 1, 2),
                                                      (1, 100, 8, 2, 1)])
def test_range_matches_reference_narrow(pname, lq, lk, hq, hkv, splits):
    _run(RANGE[pname], (2 if splits == 3 else 1, hq, hkv, lq, lk, 64, 64), seed=lq + lk, num_splits=splits)


@pytest.mark.parametrize("pname", ["full", "causal", "window", "sinks+window"])
@pytest.mark.parametrize("lq, hq, splits", [(1, 4, 3), (3, 2, 2)])
def test_range_matches_reference_wide(pname, lq, hq, splits):
    _run(RANGE[pname], (1, hq, 1, lq, 150, 576, 512), seed=lq + hq, num_splits=splits)


def test_range_default_splits_and_fp16():
    _run(az.SlidingWindow(20) | az.Sinks(4), (1, 4, 2, 3, 181, 48, 24), seed=3)
    q, k, v = (t.detach() for t in inputs(1, 4, 2, 1, 130, 32, 32, seed=4))
    ref_o = reference_attention(q, k, v, az.Causal())[0]
    out, _ = dec.attention_decode(q.half(), k.half(), v.half(), az.Causal(), 32 ** -0.5, poison=True)
    torch.testing.assert_close(out.double(), ref_o, rtol=2e-2, atol=2e-2)


def test_visit_argument():
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 1, 20, 32, 32))
    with pytest.raises(ValueError, match="visit"):
        dec.attention_decode(q, k, v, az.Dilated(3, 2), 0.1, visit="range")
    with pytest.raises(ValueError, match="visit"):
        dec.attention_decode(q, k, v, None, 0.1, visit="ranges")


def _misses():
    return {f.__name__: f.cache_info().misses for f in (dec.decode_plan, dec.range_plan, dec._kernels, dec._launch)}


@pytest.mark.parametrize("pname, lq, hq, hkv, d, dv", [("full", 1, 4, 2, 64, 64), ("sinks+window", 1, 4, 2, 64, 64),
                                                      ("causal", 3, 4, 1, 64, 64), ("window", 1, 2, 1, 576, 512)])
def test_growing_lk_reuses_the_launch(pname, lq, hq, hkv, d, dv):
    """A decode loop: the cache grows by one key a step over 40 steps (across the 128 bucket boundary). No visit
    list is built, the kernels are generated once, and a launch is made once per length bucket."""
    pattern = RANGE[pname]
    q, k, v = (t.detach().float() for t in inputs(1, hq, hkv, lq, 140, d, dv, seed=hq + d))
    dec.attention_decode(q, k[:, :, :99], v[:, :, :99], pattern, d ** -0.5)  # the first step (bucket 64)
    before = _misses()
    for lk in range(100, 140):
        out, lse = dec.attention_decode(q, k[:, :, :lk], v[:, :, :lk], pattern, d ** -0.5, poison=True)
        if lk % 13 == 0 or lk == 139:
            ref_o, ref_l = reference_attention(*(t.double() for t in (q, k[:, :, :lk], v[:, :, :lk])), pattern)
            check_close("out", out, ref_o)
            torch.testing.assert_close(lse.double(), ref_l.double(), rtol=1e-5, atol=1e-5)
    after = _misses()
    new = {name: after[name] - before[name] for name in after}
    assert new["decode_plan"] == 0 and new["_kernels"] == 0, new
    assert new["_launch"] <= 2 and new["range_plan"] <= 2, new  # buckets 64 -> 64 and 128
