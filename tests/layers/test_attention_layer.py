"""The Attention layer's contract: constructor, QK-norm, KV cache for generation, cache size, errors."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.layers import Attention, KVCache


@pytest.mark.parametrize("pattern", [None, az.SlidingWindow(3), az.Sinks(2) | az.SlidingWindow(2)])
@pytest.mark.parametrize("kv_heads,qk_norm,rope", [(4, False, True), (2, True, True), (1, True, False)])
def test_decoding_token_by_token_equals_full_forward(pattern, kv_heads, qk_norm, rope):
    torch.manual_seed(0)
    layer = Attention(32, 4, kv_heads, None, rope, qk_norm, pattern).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache()
    parts = [layer(x[:, :4], cache)] + [layer(x[:, t:t + 1], cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen == 11 and cache.k.shape == (2, kv_heads, 11, 8)


def test_qk_norm_and_head_dim_match_a_loop_free_reference():
    torch.manual_seed(1)
    layer = Attention(24, num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=True, rope=False).double()
    with torch.no_grad():
        layer.q_norm.weight.uniform_(0.5, 1.5)
        layer.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    b, t, _ = x.shape

    def rms(y, w):
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q = rms(layer.q_proj(x).view(b, t, 2, 16), layer.q_norm.weight).transpose(1, 2)
    k = rms(layer.k_proj(x).view(b, t, 1, 16), layer.k_norm.weight).transpose(1, 2)
    v = layer.v_proj(x).view(b, t, 1, 16).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(16)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = layer.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32))
    torch.testing.assert_close(layer(x), want)


def test_cache_size_per_token_and_defaults():
    assert Attention(64, 8).kv_cache_values_per_token() == 2 * 8 * 8          # MHA
    assert Attention(64, 8, 2).kv_cache_values_per_token() == 2 * 2 * 8       # GQA
    assert Attention(64, 8, 1, head_dim=32).kv_cache_values_per_token() == 64  # MQA
    layer = Attention(64, 8, 2, pattern=az.SlidingWindow(15))
    assert layer.state_size(100) == 2 * 2 * 8 * 16
    assert isinstance(layer.new_cache(), KVCache) and layer.new_cache().seen == 0


def test_gradients_flow_through_the_cached_path():
    torch.manual_seed(2)
    layer = Attention(16, 2, 1).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    cache = layer.new_cache()
    y = torch.cat([layer(x[:, :3], cache), layer(x[:, 3:], cache)], dim=1)
    g1 = torch.autograd.grad(y.square().sum(), x)[0]
    g2 = torch.autograd.grad(layer(x).square().sum(), x)[0]
    torch.testing.assert_close(g1, g2)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(32, 4, 3)
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(32, 4, head_dim=0)
    with pytest.raises(TypeError, match="qk_norm"):
        Attention(32, 4, qk_norm="yes")
    with pytest.raises(TypeError, match="Pattern"):
        Attention(32, 4, pattern="causal")
    layer = Attention(32, 4)
    with pytest.raises(ValueError, match=r"\(batch, length, 32\)"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(TypeError, match="new_cache"):
        layer(torch.randn(2, 5, 32), cache={})
    cache = layer.new_cache()
    layer(torch.randn(2, 5, 32), cache)
    with pytest.raises(ValueError, match="cannot append"):
        layer(torch.randn(3, 1, 32), cache)
    assert cache.seen == 5  # the failed call lost nothing


def test_rotary_frequencies_stay_exact_after_dtype_moves():
    from attnzoo.layers import RotaryEmbedding
    rope = RotaryEmbedding(32)
    want = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    for move in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        rope = move(rope)
        assert rope.inv_freq.dtype == torch.float64
        torch.testing.assert_close(rope.inv_freq, want, rtol=0, atol=0)
    x = torch.randn(1, 1, 5, 32, dtype=torch.float64)
    y = rope(x)
    assert y.dtype == torch.float64
    pos = torch.arange(5, dtype=torch.float64)[:, None] * want[None, :]
    cos, sin = torch.cat([pos.cos(), pos.sin()], -1).chunk(2, -1)[0].repeat(1, 2), pos.sin().repeat(1, 2)
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(y, x * cos + torch.cat([-x2, x1], -1) * sin, rtol=1e-14, atol=1e-14)
