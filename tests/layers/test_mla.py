"""MLA (multi-head latent attention) and to_mla (TransMLA): against a loop-free reference, absorbed == naive,
decoding == full forward, gradients, exact conversion of GQA/MHA/MQA, rank curves, cache sizes, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.layers import Attention, KVCache
from attnzoo.layers.mla import MLA, LatentRotary, MLACache, to_mla, to_mla_error_curve

F64 = torch.float64


def rope_ref(x, pos, inv_freq):
    """Rotate pairs (x[p], x[p + W/2]) by pos * inv_freq[p] (x: (..., T, W))."""
    ang = pos.to(F64)[:, None] * inv_freq.to(F64)[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms_ref(y, norm):
    if isinstance(norm, torch.nn.Identity):
        return y
    return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight


def mla_reference(m: MLA, x, mask):
    """The DeepSeek-V2 equations written out, one einsum each (no attnzoo.attention, no cache)."""
    b, t, _ = x.shape
    h, n, r, dv = m.num_heads, m.nope_head_dim, m.rope_dim, m.v_head_dim
    pos = torch.arange(t)
    inv = m.rotary.inv_freq
    if m.q_rank is None:
        q = F.linear(x, m.q_proj.weight, m.q_proj.bias)
    else:
        q = F.linear(rms_ref(F.linear(x, m.q_down.weight, m.q_down.bias), m.q_norm), m.q_up.weight)
    q = q.view(b, t, h, n + r)
    q_nope, q_rope = q[..., :n], rope_ref(q[..., n:].transpose(1, 2), pos, inv)      # (B,T,H,n), (B,H,T,r)
    c = rms_ref(F.linear(x, m.kv_down.weight, m.kv_down.bias), m.kv_norm)             # (B, S, kv_rank)
    scores = torch.zeros(b, h, t, t, dtype=x.dtype)
    if n:
        k_nope = torch.einsum("bsc,hnc->bshn", c, m.k_up.weight.view(h, n, -1))
        scores = scores + torch.einsum("bthn,bshn->bhts", q_nope, k_nope)
    if r:
        k_rope = rope_ref(F.linear(x, m.kr_proj.weight, m.kr_proj.bias), pos, inv)   # (B, S, r)
        scores = scores + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)
    scores = (scores * m.softmax_scale).masked_fill(~mask, float("-inf"))
    v = torch.einsum("bsc,hvc->bshv", c, m.v_up.weight.view(h, dv, -1))
    o = torch.einsum("bhts,bshv->bthv", scores.softmax(-1), v).reshape(b, t, h * dv)
    return F.linear(o, m.o_proj.weight, m.o_proj.bias)


def randomize_norms(m):
    with torch.no_grad():
        for norm in (m.kv_norm, m.q_norm):
            if isinstance(norm, torch.nn.RMSNorm):
                norm.weight.uniform_(0.5, 1.5)


CONFIGS = [dict(), dict(q_rank=12, bias=True), dict(latent_norm=False, kv_rank=20, rope_dim=4, v_head_dim=6),
           dict(rope_dim=0), dict(nope_head_dim=0, rope_dim=10)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("absorb", [False, True])
def test_matches_loop_free_reference(cfg, absorb):
    torch.manual_seed(0)
    m = MLA(32, 4, absorb=absorb, **cfg).double()
    randomize_norms(m)
    x = torch.randn(2, 9, 32, dtype=F64)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(m(x), mla_reference(m, x, causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", [None, az.SlidingWindow(3), az.Sinks(2) | az.SlidingWindow(2)])
def test_absorbed_equals_naive(pattern):
    torch.manual_seed(1)
    m = MLA(32, 4, q_rank=16, pattern=pattern).double()
    randomize_norms(m)
    x = torch.randn(3, 10, 32, dtype=F64)
    m.absorb = False
    naive = m(x)
    m.absorb = True
    torch.testing.assert_close(m(x), naive, rtol=1e-10, atol=1e-10)
    # float32: the tolerance rule for float32 kernels (relative error < 1e-4)
    m32 = m.float()
    x32 = x.float()
    m32.absorb = True
    a = m32(x32)
    m32.absorb = False
    assert ((a - m32(x32)).norm() / naive.float().norm()) < 1e-4


@pytest.mark.parametrize("pattern", [None, az.SlidingWindow(3), az.Sinks(2) | az.SlidingWindow(2)])
@pytest.mark.parametrize("absorb", [None, True, False])
def test_decoding_token_by_token_equals_full_forward(pattern, absorb):
    torch.manual_seed(2)
    m = MLA(32, 4, kv_rank=16, rope_dim=4, pattern=pattern, absorb=absorb).double()
    x = torch.randn(2, 11, 32, dtype=F64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        parts = [m(x[:, :4], cache)] + [m(x[:, t:t + 1], cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen == 11 and cache.latent.shape == (2, 11, 16 + 4)
    assert cache.c_kv.shape == (2, 11, 16) and cache.k_rope.shape == (2, 11, 4)
    assert cache.buf.shape[1] == 16  # 4, then grown in place by doubling (8, 16) under no_grad


def test_absorb_none_picks_the_absorbed_path_for_short_decodes_only():
    m = MLA(64, 4, kv_rank=32, nope_head_dim=16, v_head_dim=16, rope_dim=8)
    cache = m.new_cache()
    assert not m.use_absorbed(1, None)            # training / no cache: naive
    assert m.use_absorbed(1, cache)               # 1 * (64 - 32) < 32 * 32
    assert not m.use_absorbed(64, cache)          # long prefill: naive
    m.absorb = True
    assert m.use_absorbed(64, None)
    with pytest.raises(TypeError, match="absorb"):
        m.absorb = 1


@pytest.mark.parametrize("absorb", [False, True])
def test_gradcheck_tiny_layer(absorb):
    torch.manual_seed(3)
    m = MLA(8, 2, kv_rank=4, q_rank=4, nope_head_dim=2, rope_dim=2, v_head_dim=3, absorb=absorb).double()
    randomize_norms(m)
    x = torch.randn(1, 4, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: m(inp), (x,))


def test_parameter_gradients_match_reference_and_cached_path():
    torch.manual_seed(4)
    m = MLA(16, 2, kv_rank=8, q_rank=8, rope_dim=4).double()
    randomize_norms(m)
    x = torch.randn(2, 6, 16, dtype=F64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    w = torch.randn(2, 6, 16, dtype=F64)
    params = [p for p in m.parameters()]
    want = torch.autograd.grad((mla_reference(m, x, causal) * w).sum(), params)
    for absorb in (False, True):
        m.absorb = absorb
        got = torch.autograd.grad((m(x) * w).sum(), params)
        for g1, g2 in zip(got, want):
            torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)
    # through the cache (autograd on: the cache concatenates out of place)
    m.absorb = None
    xg = x.clone().requires_grad_(True)
    cache = m.new_cache()
    y = torch.cat([m(xg[:, :3], cache), m(xg[:, 3:4], cache), m(xg[:, 4:], cache)], dim=1)
    g1 = torch.autograd.grad((y * w).sum(), xg)[0]
    g2 = torch.autograd.grad((m(xg) * w).sum(), xg)[0]
    torch.testing.assert_close(g1, g2)


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("heads,kv_heads,rope,bias", [(4, 2, True, False), (4, 4, True, True), (4, 1, True, False),
                                                     (4, 2, False, False), (4, 4, False, True)])
def test_to_mla_full_rank_reproduces_gqa(heads, kv_heads, rope, bias):
    torch.manual_seed(5)
    gqa = Attention(32, heads, kv_heads, rope=rope, bias=bias).double()
    x = torch.randn(2, 12, 32, dtype=F64)
    want = gqa(x)
    mla = to_mla(gqa)
    assert mla.kv_cache_values_per_token() <= gqa.kv_cache_values_per_token()
    for absorb in (False, True):
        mla.absorb = absorb
        assert rel(mla(x), want) < 1e-5
    with torch.no_grad():   # and generation through the MLA cache
        cache = mla.new_cache()
        mla.absorb = None
        y = torch.cat([mla(x[:, :5], cache)] + [mla(x[:, t:t + 1], cache) for t in range(5, 12)], dim=1)
    assert rel(y, want) < 1e-5


def test_to_mla_full_rank_with_pattern_float32_and_backend():
    torch.manual_seed(6)
    gqa = Attention(32, 4, 2, pattern=az.SlidingWindow(4), backend="reference")
    x = torch.randn(2, 10, 32)
    mla = to_mla(gqa)
    assert mla.pattern == gqa.pattern and mla.backend == "reference" and mla.q_proj.weight.dtype == torch.float32
    assert rel(mla(x), gqa(x)) < 1e-4


@pytest.mark.parametrize("rorope", ["pca", "balanced"])
def test_rorope_mixing_keeps_every_score_before_rope_is_dropped(rorope):
    """With rope_dim < G*D and the full latent, the conversion only approximates by dropping RoPE from the
    mixed components; with positions switched off in both layers it must be exact (M and M^-T invert)."""
    torch.manual_seed(7)
    gqa = Attention(32, 4, 2, bias=True).double()
    calib = torch.randn(4, 16, 32, dtype=F64) + 0.5
    x = torch.randn(2, 9, 32, dtype=F64)
    for rope_dim, calib_x in ((4, None), (8, calib), (0, calib)):
        mla = to_mla(gqa, rank=2 * 16 - rope_dim, rope_dim=rope_dim, calib_x=calib_x, rorope=rorope,
                     balance_kv=True)
        mla.rotary = LatentRotary(torch.zeros(rope_dim // 2))   # no positions
        rotary, gqa.rotary = gqa.rotary, None
        try:
            assert rel(mla(x), gqa(x)) < 1e-9
        finally:
            gqa.rotary = rotary


def test_to_mla_error_falls_as_rank_rises():
    torch.manual_seed(8)
    gqa = Attention(32, 4, 2).double()
    x = torch.randn(2, 16, 32, dtype=F64)
    # all key dims keep RoPE: the latent holds the values only, exact at rank 16
    rows = to_mla_error_curve(gqa, x, [2, 4, 8, 12, 16], rope_dim=16)
    errs = [r["rel_error"] for r in rows]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])) and errs[0] > 0.1 and errs[-1] < 1e-5
    assert [r["cache"] for r in rows] == [18, 20, 24, 28, 32] and rows[0]["gqa_cache"] == 32
    # TransMLA's setting: one head of RoPE, the rest NoPE in the latent, PCA from calibration data
    calib = torch.randn(8, 16, 32, dtype=F64)
    errs = [r["rel_error"] for r in to_mla_error_curve(gqa, x, [2, 8, 16, 24], rope_dim=8, calib_x=calib)]
    assert errs[0] > errs[1] > errs[2] > errs[3]


def test_cache_sizes_per_token():
    assert MLA(64, 8, kv_rank=32, rope_dim=8).kv_cache_values_per_token() == 40
    assert Attention(64, 8).kv_cache_values_per_token() == 128                 # MHA
    assert Attention(64, 8, 2).kv_cache_values_per_token() == 32               # GQA
    big = MLA(4096, 32)                                                         # DeepSeek-like widths
    assert (big.kv_rank, big.rope_dim, big.nope_head_dim, big.v_head_dim) == (512, 64, 128, 128)
    assert big.kv_cache_values_per_token() == 576 < Attention(4096, 32, 8).kv_cache_values_per_token() == 2048
    m = MLA(64, 4, kv_rank=16, rope_dim=4, pattern=az.SlidingWindow(7))
    assert m.state_size(100) == 20 * 8 and MLA(64, 4, kv_rank=16, rope_dim=4).state_size(100) == 2000
    assert isinstance(m.new_cache(), MLACache) and m.new_cache().seen == 0
    gqa = Attention(64, 8, 2)
    assert to_mla(gqa).kv_cache_values_per_token() == gqa.kv_cache_values_per_token()
    assert to_mla(Attention(64, 8, rope=False)).kv_cache_values_per_token() == 64   # x's rank: half of MHA


def test_converted_rotary_survives_state_dict_and_half():
    gqa = Attention(32, 4, 2)
    mla = to_mla(gqa, rank=8, rope_dim=6)
    sd = mla.state_dict()
    fresh = MLA(32, 4, kv_rank=8, nope_head_dim=mla.nope_head_dim, rope_dim=6, v_head_dim=8, latent_norm=False,
                softmax_scale=mla.softmax_scale)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.rotary.inv_freq, mla.rotary.inv_freq, rtol=0, atol=0)
    assert mla.half().rotary.inv_freq.dtype == F64


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        MLA(30, 4)
    with pytest.raises(ValueError, match="kv_rank"):
        MLA(32, 4, kv_rank=0)
    with pytest.raises(ValueError, match="q_rank"):
        MLA(32, 4, q_rank=-1)
    with pytest.raises(ValueError, match="rope_dim must be even"):
        MLA(32, 4, rope_dim=3)
    with pytest.raises(ValueError, match="nope_head_dim"):
        MLA(32, 4, nope_head_dim=-1)
    with pytest.raises(ValueError, match="nope_head_dim \\+ rope_dim"):
        MLA(32, 4, nope_head_dim=0, rope_dim=0)
    with pytest.raises(ValueError, match="v_head_dim"):
        MLA(32, 4, v_head_dim=0)
    with pytest.raises(TypeError, match="Pattern"):
        MLA(32, 4, pattern="causal")
    with pytest.raises(TypeError, match="latent_norm"):
        MLA(32, 4, latent_norm="yes")
    with pytest.raises(TypeError, match="absorb"):
        MLA(32, 4, absorb="yes")
    with pytest.raises(ValueError, match="softmax_scale"):
        MLA(32, 4, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="rope_inv_freq"):
        MLA(32, 4, rope_dim=4, rope_inv_freq=[1.0])
    with pytest.raises(ValueError, match="rope_base"):
        MLA(32, 4, rope_base=1)
    m = MLA(32, 4, kv_rank=8, rope_dim=4)
    with pytest.raises(ValueError, match=r"\(batch, length, 32\)"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(TypeError, match="new_cache"):
        m(torch.randn(2, 5, 32), cache=KVCache())
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.randn(2, 5, 32), cache)
        with pytest.raises(ValueError, match="cannot append"):
            m(torch.randn(3, 1, 32), cache)
    assert cache.seen == 5  # the failed call lost nothing

    gqa = Attention(32, 4, 2)
    with pytest.raises(TypeError, match="gqa_layer"):
        to_mla(m)
    with pytest.raises(NotImplementedError, match="qk_norm"):
        to_mla(Attention(32, 4, 2, qk_norm=True))
    with pytest.raises(ValueError, match="rank"):
        to_mla(gqa, rank=0)
    with pytest.raises(ValueError, match=r"rank must be None or an integer in \[1, 16\]"):
        to_mla(gqa, rank=17, rope_dim=16)
    with pytest.raises(ValueError, match="rope_dim"):
        to_mla(gqa, rank=8, rope_dim=5)
    with pytest.raises(ValueError, match="rope_dim"):
        to_mla(Attention(32, 4, 2, rope=False), rope_dim=4)
    with pytest.raises(ValueError, match="calib_x"):
        to_mla(gqa, rank=8, calib_x=torch.randn(4, 16))
    with pytest.raises(ValueError, match="freq_fold"):
        to_mla(gqa, rank=8, freq_fold=0)
    with pytest.raises(ValueError, match="rorope"):
        to_mla(gqa, rank=8, rorope="svd")
    assert math.isfinite(to_mla_error_curve(gqa, torch.randn(1, 4, 32), [8])[0]["rel_error"])


def test_works_as_a_token_mixer_factory():
    from attnzoo.layers import TinyLM, register_mixer, unregister_mixer

    register_mixer("mla_under_test", MLA)
    try:
        model = TinyLM(64, 32, 2, mixer="mla_under_test:kv_rank=8", n_heads=2)
        assert model(torch.randint(0, 64, (2, 7))).shape == (2, 7, 64)
        assert model.state_size(10) == 2 * (8 + 8) * 10    # default rope_dim = head_dim // 2 = 8
    finally:
        unregister_mixer("mla_under_test")
