"""Linear-attention layers: streaming with the recurrent cache (any split, token by token) equals one
parallel call, outputs are causal, gradients reach every parameter, bad arguments raise clear errors."""
import pytest
import torch

from attnzoo.layers.linear import (GLA, KDA, Based, DeltaNet, GatedDeltaNet, LinearAttention, LinearCache,
                                   Lightning, ShortConv, lightning_log_decay)

LAYERS = {"linear": lambda: LinearAttention(32, 2, chunk_size=8),
          "linear-taylor-norm": lambda: LinearAttention(32, 4, feature_map="taylor", normalize=True, chunk_size=8),
          "lightning": lambda: Lightning(32, 2, chunk_size=8),
          "gla": lambda: GLA(32, 2, chunk_size=8),
          "deltanet": lambda: DeltaNet(32, 2, chunk_size=8),
          "gated_deltanet": lambda: GatedDeltaNet(32, 2, chunk_size=8),
          "kda": lambda: KDA(32, 2, chunk_size=8),
          "based": lambda: Based(32, 2, feature_dim=4, window=6, chunk_size=8)}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return LAYERS[name]().double()


@pytest.mark.parametrize("name", LAYERS)
def test_streaming_equals_parallel(name):
    m = _model(name)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    y = m(x)
    for splits in ([0, 7, 8, 16, 23], list(range(24))):  # uneven pieces, then token by token
        cache, ys = None, []
        for a, b in zip(splits[:-1], splits[1:]):
            out, cache = m(x[:, a:b], cache=cache, use_cache=True)
            ys.append(out)
        torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-9, atol=1e-10)
        assert isinstance(cache, LinearCache) and cache.seen == 23 and cache.state is not None


@pytest.mark.parametrize("name", LAYERS)
def test_causal_and_gradients(name):
    m = _model(name, seed=1)
    x = torch.randn(1, 19, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y[:, 10].sum().backward()
    assert torch.all(x.grad[:, 11:] == 0) and x.grad[:, :11].abs().sum() > 0
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert m.state_size(19) > 0


def test_state_sizes_do_not_grow_except_window():
    assert LinearAttention(32, 2).state_size(10) == LinearAttention(32, 2).state_size(10_000) == 2 * 16 * 16
    b = Based(32, 2, feature_dim=4, window=6)
    assert b.state_size(100) == b.state_size(10_000) > b.state_size(3)


def test_lightning_decay_schedule():
    d = lightning_log_decay(8)
    assert d.shape == (8,) and torch.all(d < 0) and torch.all(d[1:] > d[:-1])
    torch.testing.assert_close(d[0].exp(), torch.tensor(1 - 2 ** -5))


def test_short_conv_is_causal_and_streams():
    c = ShortConv(6, 4).double()
    x = torch.randn(1, 9, 6, dtype=torch.float64)
    y, _ = c(x)
    y1, cache = c(x[:, :4])
    y2, _ = c(x[:, 4:], cache)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        GLA(30, 4)
    with pytest.raises(ValueError, match="conv_size"):
        DeltaNet(32, 2, conv_size=-1)
    m = GLA(32, 2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(TypeError, match="cache"):
        m(torch.randn(2, 5, 32), cache={"state": None})
