"""TinyLM, the Attention layer and the mixer registry: shapes, causality, windows, errors, state sizes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.layers import (Attention, LinearMixer, MixerSpec, RotaryEmbedding, TinyLM, build_mixer, get_mixer,
                            kv_cache_len, layers_label, mixer_names, mixer_state_size, parse_layers, parse_mixer,
                            register_mixer, split_layers, unregister_mixer)


def _has_linear() -> bool:
    try:
        import attnzoo.linear as lin
        return callable(getattr(lin, "linear_attention", None))
    except Exception:  # noqa: BLE001
        return False


MIXERS = ["attention", "sliding_window:4", "sink_window:2:3", "attention+sliding_window:3",
          "attention:n_kv_heads=1"]
if _has_linear():  # a bare attnzoo.linear kernel through the LinearMixer adapter
    MIXERS += ["test_linear_op", "test_linear_op:feature_map=elu+1:normalize=true"]
    # the registered linear-attention layers, alone and in hybrids with softmax attention
    MIXERS += ["linear_attention", "lightning", "gla", "deltanet", "gated_deltanet", "kda",
               "based:feature_dim=4:window=5", "gla+attention", "attention+gated_deltanet"]


@pytest.fixture(autouse=True, scope="module")
def _linear_op_mixer():
    if not _has_linear():
        yield
        return
    register_mixer("test_linear_op", lambda d, h, **kw: LinearMixer(d, h, "linear_attention", **kw),
                   overwrite=True)
    yield
    unregister_mixer("test_linear_op")


def _model(mixer, V=50, d=32, n_layers=2, **kw):
    torch.manual_seed(0)
    return TinyLM(V, d, n_layers, mixer, **kw).double().eval()


# ------------------------------------------------------------------------------------------------
# shapes and causality
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes(mixer):
    m = _model(mixer, n_heads=2)
    idx = torch.randint(0, 50, (3, 17))
    assert m(idx).shape == (3, 17, 50)
    assert m.hidden(idx).shape == (3, 17, 32)
    assert len(m.blocks) == 2 and m.n_heads == 2


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal(mixer):
    """Logits at position t do not depend on the tokens after t."""
    m = _model(mixer, n_heads=2)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (2, 24), generator=g)
    base = m(idx)
    for t in (0, 5, 11, 22):
        other = idx.clone()
        other[:, t + 1:] = torch.randint(0, 50, (2, 24 - t - 1), generator=g)
        out = m(other)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # later positions do see the change


def test_window_bounds_the_receptive_field():
    """One layer of a window of 4 keys: position t sees tokens t-3..t and nothing earlier."""
    m = _model("sliding_window:4", n_layers=1)
    idx = torch.randint(0, 50, (1, 20))
    base = m(idx)
    other = idx.clone()
    other[0, 10] = (idx[0, 10] + 1) % 50
    diff = (m(other) - base).abs().amax(-1)[0]
    assert torch.all(diff[:10] == 0) and torch.all(diff[14:] == 0)
    assert torch.all(diff[10:14] > 0)


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, num_kv_heads=1, pattern=az.SlidingWindow(5), rope=True).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, 3, 8).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, 1, 8).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, 1, 8).transpose(1, 2)
    q, k = attn.rotary(q), attn.rotary(k)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    i = torch.arange(t)
    visible = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= 5)
    o = s.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    want = attn.o_proj(o.transpose(1, 2).reshape(b, t, 24))
    torch.testing.assert_close(attn(x), want)


def test_rotary_is_relative():
    rope = RotaryEmbedding(16).double()
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    def score(p, s):
        return float((rope(q, torch.tensor([p])) * rope(k, torch.tensor([s]))).sum())
    assert score(7, 3) == pytest.approx(score(4, 0)) == pytest.approx(score(104, 100))
    assert score(7, 3) != pytest.approx(score(7, 4))
    torch.testing.assert_close(rope(q, torch.tensor([0])), q)  # position 0 is the identity
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


def test_loss_counts_only_answer_positions():
    m = _model("attention")
    idx = torch.randint(0, 50, (2, 10))
    tgt = torch.full((2, 10), -100)
    tgt[0, 3], tgt[1, 7], tgt[1, 9] = 5, 6, 7
    loss, correct, n = m.loss(idx, tgt)
    want = F.cross_entropy(m(idx).reshape(-1, 50), tgt.reshape(-1), ignore_index=-100)
    assert n == 3 and 0 <= int(correct) <= 3
    torch.testing.assert_close(loss, want.to(loss.dtype))
    tgt[:] = -100
    assert m.loss(idx, tgt)[2] == 0
    with pytest.raises(ValueError, match="shape"):
        m.loss(idx, tgt[:, :5])


def test_tied_embeddings_and_mlp():
    m = TinyLM(40, 16, 2, "attention")
    assert m.lm_head.weight is m.embed.weight
    m2 = TinyLM(40, 16, 2, "attention", tie_embeddings=False, mlp=True)
    assert m2.lm_head.weight is not m2.embed.weight and m2.blocks[0].mlp is not None
    assert m.blocks[0].mlp is None  # MQAR default: no MLP
    assert m2.num_params() > m.num_params()


# ------------------------------------------------------------------------------------------------
# spec strings
# ------------------------------------------------------------------------------------------------
def test_parse_specs():
    assert parse_mixer("attention") == MixerSpec("attention")
    s = parse_mixer("sink_window:4:60")
    assert s.args == (4, 60) and str(s) == "sink_window:4:60"
    s = parse_mixer("attention:n_kv_heads=1:rope=false")
    assert dict(s.kwargs) == {"n_kv_heads": 1, "rope": False}
    assert parse_mixer(str(s)) == s
    assert parse_mixer({"name": "sliding_window", "window": 8}) == MixerSpec("sliding_window", (), (("window", 8),))
    assert parse_mixer({"name": "sliding_window", "args": [8]}).args == (8,)
    assert split_layers("attention+linear_attention:feature_map=elu+1") == ["attention",
                                                                            "linear_attention:feature_map=elu+1"]
    specs = parse_layers("attention+sliding_window:8", 4)
    assert [str(x) for x in specs] == ["attention", "sliding_window:8"] * 2
    assert layers_label(specs) == "attention+sliding_window:8"
    assert layers_label(parse_layers("attention", 3)) == "attention"
    m = TinyLM(30, 16, 2, ["attention", {"name": "sliding_window", "window": 3}])
    assert m.blocks[1].mixer.pattern == az.SlidingWindow(2) and m.blocks[0].mixer.pattern == az.Causal()
    assert m.mixer_label == "attention+sliding_window:window=3"


@pytest.mark.parametrize("spec, err, match", [
    ("nope", ValueError, "unknown mixer 'nope'.*attention"),
    ("", ValueError, "empty"),
    ("sliding_window::4", ValueError, "empty argument"),
    ("attention:rope=true:4", ValueError, "positional value"),
    ("attention:1x=2", ValueError, "keyword name"),
    ("attention+attention", ValueError, "several layers"),
    (3, TypeError, "string, a dict"),
    ({"window": 3}, ValueError, "'name'"),
])
def test_bad_specs(spec, err, match):
    with pytest.raises(err, match=match):
        parse_mixer(spec)


def test_bad_arguments_name_the_mixer():
    with pytest.raises(ValueError, match="sliding_window.*window"):
        build_mixer("sliding_window", 32, 1)          # missing window
    with pytest.raises(ValueError, match="sliding_window"):
        build_mixer("sliding_window:4:5:6", 32, 1)    # too many
    with pytest.raises(ValueError, match="positive integer"):
        build_mixer("sliding_window:0", 32, 1)
    with pytest.raises(ValueError, match="unexpected keyword|bad arguments"):
        build_mixer("attention:colour=red", 32, 1)
    with pytest.raises(ValueError, match="do not fit"):
        TinyLM(30, 16, 3, ["attention", "sliding_window:4"])
    with pytest.raises(ValueError, match="divisible"):
        TinyLM(30, 30, 2, "attention", n_heads=4)


def test_register_custom_mixer():
    class Shift(torch.nn.Module):
        """x at t-1 (a causal one-token shift)"""
        def __init__(self, d_model, n_heads, k=1):
            super().__init__()
            self.k = k

        def forward(self, x):
            return F.pad(x, (0, 0, self.k, 0))[:, :x.shape[1]]

    register_mixer("test_shift", Shift, state_size=lambda mod, L: mod.k * 7)
    try:
        assert "test_shift" in mixer_names()
        assert get_mixer("test_shift").description.startswith("x at t-1")
        m = TinyLM(20, 8, 2, "test_shift:2")
        assert m(torch.randint(0, 20, (1, 5))).shape == (1, 5, 20)
        assert m.state_sizes(100) == [14, 14] and m.state_size(100) == 28
        with pytest.raises(ValueError, match="already registered"):
            register_mixer("test_shift", Shift)
        register_mixer("test_shift", Shift, overwrite=True)  # no state_size any more: Shift has no method
        with pytest.raises(ValueError, match="state size"):
            TinyLM(20, 8, 1, "test_shift").state_size(10)
    finally:
        unregister_mixer("test_shift")
    assert "test_shift" not in mixer_names()

    with pytest.raises(ValueError, match="mixer name"):
        register_mixer("a:b", Shift)
    with pytest.raises(ValueError, match="mixer name"):
        register_mixer("a+b", Shift)
    with pytest.raises(TypeError, match="callable"):
        register_mixer("test_bad", 42)
    register_mixer("test_bad", lambda d, h: "not a module")
    try:
        with pytest.raises(TypeError, match="not an nn.Module"):
            build_mixer("test_bad", 8, 1)
    finally:
        unregister_mixer("test_bad")

    @register_mixer("test_deco", description="decorated")
    def _deco(d_model, n_heads):
        return Attention(d_model, n_heads)
    try:
        assert get_mixer("test_deco").description == "decorated"
        assert mixer_state_size(build_mixer("test_deco", 16, 2), 10) == 2 * 16 * 10
    finally:
        unregister_mixer("test_deco")


# ------------------------------------------------------------------------------------------------
# state sizes
# ------------------------------------------------------------------------------------------------
def test_state_sizes():
    d, L = 64, 256
    assert TinyLM(10, d, 2, "attention").state_sizes(L) == [2 * d * L] * 2          # KV cache grows with L
    assert TinyLM(10, d, 2, "attention").state_size(2 * L) == 2 * 2 * d * 2 * L
    assert TinyLM(10, d, 1, "sliding_window:16").state_size(L) == 2 * d * 16          # bounded by the window
    assert TinyLM(10, d, 1, "sliding_window:16").state_size(8) == 2 * d * 8            # ... and by L
    assert TinyLM(10, d, 1, "sink_window:4:16").state_size(L) == 2 * d * 20
    assert TinyLM(10, d, 1, "attention:n_kv_heads=1", n_heads=4).state_size(L) == 2 * 16 * L   # GQA: 1 kv head
    hybrid = TinyLM(10, d, 2, "attention+sliding_window:8")
    assert hybrid.state_sizes(L) == [2 * d * L, 2 * d * 8]
    assert kv_cache_len(az.Dilated(4, 3), 100) == 10
    assert kv_cache_len(az.Sinks(4) & az.Causal(), 100) == 4
    assert kv_cache_len(az.Chunked(8), 100) == 100  # not modelled: a full cache (upper bound)


def test_linear_mixer_adapter():
    """The adapter with a naive causal linear-attention kernel: state = heads * d_k * d_v."""
    def naive(q, k, v, output_final_state=False):
        s = torch.einsum("bhtd,bhte->bhtde", k, v).cumsum(2)
        o = torch.einsum("bhtd,bhtde->bhte", q, s)
        return o, (s[:, :, -1] if output_final_state else None)

    torch.manual_seed(0)
    mix = LinearMixer(32, 4, naive).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y = mix(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 5:] += 1
    torch.testing.assert_close(mix(x2)[:, :5], y[:, :5])
    assert mix.state_size(10) == mix.state_size(10_000) == 4 * 8 * 8
    with pytest.raises(TypeError, match="callable"):
        LinearMixer(32, 4, 3)


@pytest.mark.skipif(not _has_linear(), reason="attnzoo.linear not available")
def test_linear_kernel_state_sizes():
    """LinearMixer probes the kernel's final state: heads x F x (Dv [+1 with the normaliser])."""
    d = 64
    assert TinyLM(10, d, 2, "test_linear_op").state_sizes(512) == [d * d] * 2          # 1 head: Dk * Dv
    assert TinyLM(10, d, 1, "test_linear_op", n_heads=2).state_size(512) == 2 * 32 * 32
    assert TinyLM(10, d, 1, "test_linear_op:normalize=true").state_size(7) == d * (d + 1)
    F_ = 1 + d + d * d  # the Taylor feature map widens the keys
    assert TinyLM(10, d, 1, "test_linear_op:feature_map=taylor").state_size(7) == F_ * d
    with pytest.raises(ValueError, match="no function"):
        LinearMixer(16, 1, "no_such_kernel")
