"""CCA / CCGQA: a loop-free float64 reference written here from the paper's equations (convolutions as
unfolded windows and an einsum per head group, attention as an explicit masked softmax), streaming decode
against the full forward, gradients, cache sizes against MHA, and argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.layers import Attention
from attnzoo.layers.cca import CCA, CCACache, CCGQA, default_kv_heads


# ----------------------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------------------
def rope64(x, base=10000.0):
    """Rotate-half RoPE in float64 on (B, H, T, D), positions 0..T-1."""
    d, t = x.shape[-1], x.shape[-2]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def causal_conv_depthwise(x, w, b):
    """x (B, L, C) already left-padded; w (C, 1, K) -> (B, L - K + 1, C): y[t, c] = sum_j w[c, j] x[t + j, c] + b."""
    win = x.unfold(1, w.shape[-1], 1)             # (B, L-K+1, C, K)
    return (win * w[:, 0, :]).sum(-1) + b


def causal_conv_per_head(x, w, b, groups):
    """x (B, L, C); w (C, C/G, K), one group per head -> (B, L - K + 1, C):
    y[t, g, o] = sum_{i, j} w[g, o, i, j] x[t + j, g, i] + b."""
    bsz, _, c = x.shape
    k = w.shape[-1]
    win = x.unfold(1, k, 1)                        # (B, T, C, K)
    win = win.reshape(bsz, win.shape[1], groups, c // groups, k)
    wg = w.reshape(groups, c // groups, c // groups, k)
    y = torch.einsum("btgij,goij->btgo", win, wg).reshape(bsz, -1, c)
    return y + b


def reference(layer, x, keep):
    """The layer's output from its parameters, written from the equations; ``keep(i, j)`` is the mask."""
    bsz, t, _ = x.shape
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    g = h // hkv
    k0, k1 = layer.conv_size
    q0 = F.linear(x, layer.q_proj.weight, layer.q_proj.bias)      # (B, T, H*D)
    kk0 = F.linear(x, layer.k_proj.weight, layer.k_proj.bias)     # (B, T, Hkv*D)
    v0 = F.linear(x, layer.v_proj.weight, layer.v_proj.bias)
    # two causal convolutions over [q, k]: zero history of (k0 - 1) + (k1 - 1) positions
    qk = torch.cat([q0, kk0], -1)
    qk = torch.cat([qk.new_zeros(bsz, (k0 - 1) + (k1 - 1), qk.shape[-1]), qk], 1)
    y = causal_conv_depthwise(qk, layer.conv1.weight, layer.conv1.bias)
    y = causal_conv_per_head(y, layer.conv2.weight, layer.conv2.bias, h + hkv)
    assert y.shape[1] == t
    q = y[..., : h * d].reshape(bsz, t, h, d)
    k = y[..., h * d:].reshape(bsz, t, hkv, d)
    qh, kh = q0.reshape(bsz, t, h, d), kk0.reshape(bsz, t, hkv, d)
    if layer.qk_mean:
        member = (torch.arange(h)[:, None] // g == torch.arange(hkv)[None, :]).double()   # (H, Hkv): head in group
        q = q + (qh + torch.einsum("hj,btjd->bthd", member, kh)) / 2
        k = k + (torch.einsum("hj,bthd->btjd", member, qh) / g + kh) / 2
    if layer.value_shift:
        n = layer.kv_latent // 2
        cut = layer.kv_latent - n
        shifted = torch.cat([v0.new_zeros(bsz, 1, n), v0[:, :-1, cut:]], 1)   # x_(t-1) W_v2, zero at t = 0
        v0 = torch.cat([v0[..., :cut], shifted], -1)
    v = v0.reshape(bsz, t, hkv, d)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))              # (B, heads, T, D)
    if layer.qk_norm:
        q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(d)
        k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(d) * layer.temperature.view(1, hkv, 1, 1)
    if layer.rotary is not None:
        q, k = rope64(q), rope64(k)
    idx = torch.arange(h) // g                                     # key head of each query head
    s = torch.einsum("bhid,bhjd->bhij", q, k[:, idx]) / math.sqrt(d)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    s = s.masked_fill(~keep(i, j), float("-inf"))
    o = s.softmax(-1) @ v[:, idx]
    return F.linear(o.transpose(1, 2).reshape(bsz, t, h * d), layer.o_proj.weight, layer.o_proj.bias)


def causal(i, j):
    return j <= i


def window(w):
    return lambda i, j: (j <= i) & (j >= i - w)


def randomize(layer):
    """Non-trivial temperatures and biases (the defaults are 1 and small)."""
    with torch.no_grad():
        if layer.temperature is not None:
            layer.temperature.uniform_(0.5, 1.5)
        layer.conv1.bias.normal_()
        layer.conv2.bias.normal_()
    return layer


CONFIGS = [  # (class, kwargs)
    (CCA, dict(dim=32, num_heads=2, compression=2)),
    (CCA, dict(dim=48, num_heads=1, compression=3, conv_size=(3, 2), bias=True)),
    (CCGQA, dict(dim=48, num_heads=4, num_kv_heads=2, compression=2, conv_size=3)),
    (CCGQA, dict(dim=64, num_heads=4, num_kv_heads=1, compression=2)),
    (CCA, dict(dim=32, num_heads=2, compression=2, qk_mean=False, value_shift=False, qk_norm=False)),
]


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", CONFIGS)
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("pattern,keep", [(None, causal), (az.SlidingWindow(3), window(3))])
def test_forward_matches_the_reference(cls, kw, rope, pattern, keep):
    torch.manual_seed(0)
    layer = randomize(cls(**kw, rope=rope, pattern=pattern).double())
    x = torch.randn(2, 13, kw["dim"], dtype=torch.float64)
    # RotaryEmbedding computes in float32 (also for float64 inputs): with RoPE the agreement is ~1e-7
    tol = 1e-5 if rope else 1e-10
    torch.testing.assert_close(layer(x), reference(layer, x, keep), rtol=tol, atol=tol)


@pytest.mark.parametrize("cls,kw", CONFIGS[:4])
@pytest.mark.parametrize("pattern", [None, az.SlidingWindow(3)])
def test_decoding_token_by_token_equals_full_forward(cls, kw, pattern):
    torch.manual_seed(1)
    layer = randomize(cls(**kw, pattern=pattern).double())
    x = torch.randn(2, 12, kw["dim"], dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache()
    # a first piece shorter than the convolutions' history, then a piece, then single tokens
    parts = [layer(x[:, :1], cache), layer(x[:, 1:5], cache)] + [layer(x[:, t:t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen == 12 and cache.k.shape == (2, layer.num_kv_heads, 12, layer.head_dim)
    assert cache.conv.shape == (2, layer.q_latent + layer.kv_latent, layer.conv_pad)


@pytest.mark.parametrize("cls,kw", [CONFIGS[1], CONFIGS[2]])
@pytest.mark.parametrize("rope", [False, True])
def test_gradients_match_the_reference(cls, kw, rope):
    torch.manual_seed(2)
    layer = randomize(cls(**kw, rope=rope).double())
    x = torch.randn(2, 9, kw["dim"], dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, kw["dim"], dtype=torch.float64)
    leaves = [x] + list(layer.parameters())
    got = torch.autograd.grad((layer(x) * w).sum(), leaves)
    want = torch.autograd.grad((reference(layer, x, causal) * w).sum(), leaves)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    tol = 1e-5 if rope else 1e-9
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_gradcheck_tiny_layer():
    torch.manual_seed(3)
    layer = randomize(CCGQA(16, 2, 1, compression=2, rope=False, conv_size=2).double())
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_gradients_flow_through_the_cached_path():
    torch.manual_seed(4)
    layer = randomize(CCGQA(32, 2, 1, compression=2).double())
    x = torch.randn(1, 7, 32, dtype=torch.float64, requires_grad=True)
    cache = layer.new_cache()
    y = torch.cat([layer(x[:, :2], cache), layer(x[:, 2:3], cache), layer(x[:, 3:], cache)], dim=1)
    g1 = torch.autograd.grad(y.square().sum(), x)[0]
    g2 = torch.autograd.grad(layer(x).square().sum(), x)[0]
    torch.testing.assert_close(g1, g2)


def test_outputs_are_causal():
    torch.manual_seed(5)
    layer = CCA(32, 2, compression=2, conv_size=3).double()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 6:] += torch.randn_like(x2[:, 6:])
    y2 = layer(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], rtol=0, atol=0)
    assert not torch.allclose(y2[:, 6:], y[:, 6:])


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,heads,c", [(64, 2, 1), (64, 2, 2), (64, 2, 4), (128, 4, 8), (2048, 4, 4)])
def test_cca_cache_is_compression_times_smaller_than_mha(dim, heads, c):
    mha = Attention(dim, heads).kv_cache_values_per_token()   # MHA with `heads` heads: 2 * dim
    assert mha == 2 * dim
    layer = CCA(dim, heads, compression=c)
    assert layer.kv_cache_values_per_token() * c == mha
    assert layer.head_dim == dim // (c * heads)


def test_ccgqa_cache_shrinks_by_compression_times_group():
    mha = Attention(64, 4).kv_cache_values_per_token()
    layer = CCGQA(64, 4, num_kv_heads=1, compression=2)   # 2x on queries, 4 query heads per key head
    assert layer.kv_cache_values_per_token() * 2 * 4 == mha
    zaya_like = CCGQA(2048, 8, num_kv_heads=2, compression=2)   # ZAYA1's layout: heads of 128, 8x cache
    assert zaya_like.head_dim == 128 and Attention(2048, 16).kv_cache_values_per_token() == 8 * \
        zaya_like.kv_cache_values_per_token()


def test_cache_sizes_match_the_tensors_held():
    torch.manual_seed(6)
    layer = CCGQA(48, 4, 2, compression=2, conv_size=(3, 2))
    x = torch.randn(3, 5, 48)
    cache = layer.new_cache()
    layer(x, cache)
    per_seq_kv = (cache.k.numel() + cache.v.numel()) / (3 * 5)
    assert per_seq_kv == layer.kv_cache_values_per_token()
    assert (cache.conv.numel() + cache.v_prev.numel()) / 3 == layer.conv_state_values()
    assert layer.state_size(100) == 100 * layer.kv_cache_values_per_token() + layer.conv_state_values()
    windowed = CCA(48, 2, compression=2, pattern=az.SlidingWindow(15))
    assert windowed.state_size(100) == 16 * windowed.kv_cache_values_per_token() + windowed.conv_state_values()
    off = CCA(48, 2, compression=2, conv_size=1, value_shift=False)
    assert off.conv_state_values() == 0


def test_defaults_work_as_token_mixer_factories():
    torch.manual_seed(7)
    for d_model, n_heads in ((64, 1), (128, 2), (256, 4), (512, 8)):
        for cls in (CCA, CCGQA):
            layer = cls(d_model, n_heads)
            y = layer(torch.randn(2, 6, d_model))
            assert y.shape == (2, 6, d_model) and torch.isfinite(y).all()
            assert isinstance(layer.new_cache(), CCACache) and layer.new_cache().seen == 0
    assert [default_kv_heads(n) for n in (1, 2, 4, 6, 8, 16)] == [1, 1, 1, 1, 2, 4]
    assert CCA(64, 2).compression == 4 and CCGQA(64, 2).compression == 2


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="compression"):
        CCA(64, 2, compression=0)
    with pytest.raises(ValueError, match="compression"):
        CCA(64, 2, compression=2.0)
    with pytest.raises(ValueError, match="compression"):
        CCA(64, 2, compression=True)
    with pytest.raises(ValueError, match="divisible by compression"):
        CCA(60, 2, compression=8)
    with pytest.raises(ValueError, match="num_heads"):
        CCA(64, 0)
    with pytest.raises(ValueError, match="dim"):
        CCA(-4, 1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CCGQA(64, 4, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CCGQA(64, 4, 0)
    with pytest.raises(ValueError, match="head_dim"):
        CCA(24, 8, compression=1)       # head_dim 3: odd, no RoPE
    CCA(24, 8, compression=1, rope=False)
    with pytest.raises(ValueError, match="conv_size"):
        CCA(64, 2, conv_size=0)
    with pytest.raises(ValueError, match="conv_size"):
        CCA(64, 2, conv_size=(2, 0))
    with pytest.raises(ValueError, match="conv_size"):
        CCA(64, 2, conv_size=(2, 2, 2))
    with pytest.raises(TypeError, match="Pattern"):
        CCA(64, 2, pattern="causal")
    with pytest.raises(TypeError, match="bias"):
        CCA(64, 2, bias="yes")
    with pytest.raises(TypeError, match="value_shift"):
        CCGQA(64, 2, value_shift=1)
    with pytest.raises(TypeError, match="backend"):
        CCA(64, 2, backend=None)
    layer = CCA(32, 2, compression=2)
    with pytest.raises(ValueError, match=r"\(batch, length, 32\)"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(TypeError, match="new_cache"):
        layer(torch.randn(2, 5, 32), cache={})
    with pytest.raises(TypeError, match="new_cache"):
        layer(torch.randn(2, 5, 32), cache=Attention(32, 2).new_cache())
    cache = layer.new_cache()
    layer(torch.randn(2, 5, 32), cache)
    conv, k = cache.conv, cache.k
    with pytest.raises(ValueError, match="cannot append"):
        layer(torch.randn(3, 1, 32), cache)
    assert cache.seen == 5 and cache.conv is conv and cache.k is k   # the refused call changed nothing
    with pytest.raises(ValueError, match="cannot append"):
        CCA(32, 1, compression=2)(torch.randn(2, 1, 32), cache)          # another layer's cache
