"""GatedAttention (Qiu et al. 2025) and MoH (Jin et al. 2024) against loop-free float64 references.

The references below are written from the papers' formulas, with explicit softmax attention, RoPE, gates
and routing; they share only the parameters with the layers."""
import math

import pytest
import torch

import attnzoo as az
from attnzoo.layers.attention import Attention
from attnzoo.layers.gated import GatedAttention
from attnzoo.layers.moh import MoH
import attnzoo.layers.moh as moh_module

F64 = torch.float64


# --- the references -----------------------------------------------------------------------------------
def ref_mask(t, window=None):
    """Causal (optionally a causal window of ``window + 1`` keys) visibility, (T, T) bool."""
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    ok = j <= i
    return ok if window is None else ok & (i - j <= window)


def ref_rope(x, base=10000.0):
    """Rotate pairs (x[i], x[i + D/2]) of (B, H, T, D) by angle pos * base^(-2i/D)."""
    t, d = x.shape[-2:]
    ang = torch.arange(t, dtype=F64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=F64) / d)[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def linear(layer, x):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def ref_heads(layer, x, window=None):
    """Per-head attention outputs (B, H, T, D) of an `Attention`-like layer, explicitly."""
    b, t, _ = x.shape
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = linear(layer.q_proj, x).view(b, t, h, d).transpose(1, 2)
    k = linear(layer.k_proj, x).view(b, t, hkv, d).transpose(1, 2)
    v = linear(layer.v_proj, x).view(b, t, hkv, d).transpose(1, 2)
    if layer.q_norm is not None:
        def rms(y, w):
            return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        q, k = rms(q, layer.q_norm.weight), rms(k, layer.k_norm.weight)
    if layer.rotary is not None:
        q, k = ref_rope(q), ref_rope(k)
    kv_of = torch.arange(h) // (h // hkv)                      # query head -> its key/value head
    k, v = k[:, kv_of], v[:, kv_of]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~ref_mask(t, window), float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return p @ v


def ref_gated(layer, x, window=None):
    """Y' = Y * sigmoid(X W_theta) per head (and channel), then the output projection."""
    o = ref_heads(layer, x, window)
    b, h, t, d = o.shape
    if layer.gate_proj is not None:
        g = torch.sigmoid(linear(layer.gate_proj, x))          # (B, T, H*D) or (B, T, H)
        g = g.view(b, t, h, -1).transpose(1, 2)                # (B, H, T, D or 1)
        o = o * g
    return linear(layer.o_proj, o.transpose(1, 2).reshape(b, t, h * d))


def ref_routing(layer, x):
    """Paper eqs. 5-6: (weights (B, T, H), selected (B, T, H), routed probs (B, T, R))."""
    b, t, _ = x.shape
    hs, r, k = layer.num_shared_heads, layer.num_routed_heads, layer.top_k
    ws = torch.softmax(linear(layer.shared_router, x), -1) if hs > 1 else torch.ones(b, t, hs, dtype=F64)
    if r:
        logits = linear(layer.router, x)
        pr = torch.softmax(logits, -1)
        kth = logits.sort(-1, descending=True).values[..., k - 1: k]
        sel_r = logits >= kth                                  # the top_k (no ties with random inputs)
        wr = pr * sel_r
    else:
        pr, sel_r, wr = None, torch.zeros(b, t, 0, dtype=torch.bool), torch.zeros(b, t, 0, dtype=F64)
    if layer.weighting == "scaled":
        ws = ws * hs
        wr = wr / wr.sum(-1, keepdim=True) * k if r else wr
    if hs and r:
        alpha = torch.softmax(linear(layer.mix, x), -1) * (2 if layer.weighting == "scaled" else 1)
        ws, wr = alpha[..., :1] * ws, alpha[..., 1:] * wr
    sel = torch.cat([torch.ones(b, t, hs, dtype=torch.bool), sel_r], -1)
    return torch.cat([ws, wr], -1), sel, pr


def ref_moh(layer, x, window=None):
    """y_t = sum_i g_{t,i} H^i_t W_O^i (the summation form), with the explicit routing."""
    o = ref_heads(layer, x, window)                            # (B, H, T, D)
    w, _, _ = ref_routing(layer, x)
    wo = layer.o_proj.weight.view(layer.dim, layer.num_heads, layer.head_dim)   # W_O^i = wo[:, i, :]
    y = torch.einsum("bht,bhtd,ehd->bte", w.transpose(1, 2), o, wo)
    return y if layer.o_proj.bias is None else y + layer.o_proj.bias


def close(layer):
    """Tolerances against the reference: tight, except that attention.py's RoPE rotates in float32 even for
    float64 inputs (so a float64 layer with rope=True is float32-accurate)."""
    return dict(rtol=1e-10, atol=1e-10) if layer.rotary is None else dict(rtol=1e-5, atol=1e-5)


def randomize(layer, scale=0.5):
    """Fresh random values for every parameter (zero-initialised gates included), so tests see generic layers."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, scale / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1)
    return layer


# --- GatedAttention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
@pytest.mark.parametrize("kv_heads,qk_norm,rope,bias,window", [(4, False, True, False, None), (2, True, True, True, 3),
                                                               (1, False, False, True, None)])
def test_gated_matches_reference(gate, kv_heads, qk_norm, rope, bias, window):
    torch.manual_seed(0)
    pattern = None if window is None else az.SlidingWindow(window)
    layer = randomize(GatedAttention(24, 4, kv_heads, 6, rope, qk_norm, pattern, bias, gate=gate).double(), 2.0)
    x = torch.randn(2, 9, 24, dtype=F64)
    torch.testing.assert_close(layer(x), ref_gated(layer, x, window), **close(layer))
    g = layer.gate_scores(x)
    assert g.shape == (2, 4, 9, 6 if gate == "elementwise" else 1)
    assert g.min() < 0.25 and g.max() > 0.75                  # the gates really vary with the query


@pytest.mark.parametrize("none", [None, "none"])
def test_gate_none_equals_attention_and_fresh_gate_is_one_half(none):
    torch.manual_seed(1)
    base = randomize(Attention(32, 4, 2, qk_norm=True, bias=True).double())
    plain = GatedAttention(32, 4, 2, qk_norm=True, bias=True, gate=none).double()
    plain.load_state_dict(base.state_dict())                  # strict: exactly Attention's parameters
    assert plain.gate_proj is None and plain.gate is None
    x = torch.randn(2, 7, 32, dtype=F64)
    torch.testing.assert_close(plain(x), base(x), rtol=0, atol=0)
    for gate in ("elementwise", "headwise"):                   # documented init: W_theta = 0 -> gates 1/2
        fresh = GatedAttention(32, 4, 2, qk_norm=True, bias=True, gate=gate).double()
        fresh.load_state_dict(base.state_dict(), strict=False)
        assert fresh.gate_proj.weight.abs().sum() == 0 and fresh.gate_proj.bias.abs().sum() == 0
        torch.testing.assert_close(fresh(x), 0.5 * base(x) + 0.5 * base.o_proj.bias)


@pytest.mark.parametrize("pattern,window", [(None, None), (az.SlidingWindow(2), 2)])
@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gated_decoding_token_by_token_equals_full_forward(pattern, window, gate):
    torch.manual_seed(2)
    layer = randomize(GatedAttention(32, 4, 2, None, True, True, pattern, gate=gate).double())
    x = torch.randn(2, 10, 32, dtype=F64)
    full = layer(x)
    torch.testing.assert_close(full, ref_gated(layer, x, window), **close(layer))
    cache = layer.new_cache()
    parts = [layer(x[:, :3], cache)] + [layer(x[:, t:t + 1], cache) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen == 10 and cache.k.shape == (2, 2, 10, 8)   # keys and values only: no gate state
    assert layer.kv_cache_values_per_token() == 2 * 2 * 8 == Attention(32, 4, 2).kv_cache_values_per_token()


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gated_gradients(gate):
    torch.manual_seed(3)
    layer = randomize(GatedAttention(8, 2, 1, 2, False, False, None, True, gate=gate).double(), 2.0)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, 4, 8, dtype=F64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params))
    # and every gradient equals the reference's on a larger layer
    layer = randomize(GatedAttention(24, 4, 2, qk_norm=True, gate=gate).double(), 2.0)
    x = torch.randn(2, 6, 24, dtype=F64, requires_grad=True)
    w = torch.randn(2, 6, 24, dtype=F64)
    got = torch.autograd.grad((layer(x) * w).sum(), [x, *layer.parameters()])
    want = torch.autograd.grad((ref_gated(layer, x) * w).sum(), [x, *layer.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **close(layer))


# --- MoH ----------------------------------------------------------------------------------------------
MOH_CONFIGS = [  # heads, kv heads, shared, top_k, weighting, window
    (8, 8, 2, 2, "paper", None),
    (8, 2, 4, 2, "paper", 3),
    (6, 3, 0, 2, "scaled", None),
    (6, 1, 2, 1, "scaled", 2),
    (4, 2, 4, 0, "paper", None),                             # every head shared
    (4, 4, 1, 3, "paper", None),                             # every routed head on: soft weighting only
]


@pytest.mark.parametrize("heads,kv,shared,top_k,weighting,window", MOH_CONFIGS)
@pytest.mark.parametrize("compute", ["dense", "sparse", "auto"])
def test_moh_matches_reference(heads, kv, shared, top_k, weighting, window, compute):
    torch.manual_seed(4)
    pattern = None if window is None else az.SlidingWindow(window)
    layer = randomize(MoH(24, heads, kv, 4, True, True, pattern, True, shared, top_k, compute=compute,
                          weighting=weighting).double(), 2.0)
    x = torch.randn(2, 7, 24, dtype=F64)
    torch.testing.assert_close(layer(x), ref_moh(layer, x, window), **close(layer))
    _, sel, pr = ref_routing(layer, x)
    want = 0.0 if pr is None else (sel[..., shared:].double().flatten(0, 1).mean(0) * pr.flatten(0, 1).mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss, torch.as_tensor(want, dtype=F64))


@pytest.mark.parametrize("heads,kv,shared,top_k,weighting,window", MOH_CONFIGS)
def test_moh_routing_invariants(heads, kv, shared, top_k, weighting, window):
    torch.manual_seed(5)
    layer = randomize(MoH(24, heads, kv, 4, num_shared_heads=shared, top_k=top_k, weighting=weighting).double(), 3.)
    x = torch.randn(3, 11, 24, dtype=F64)
    w, sel, pr = layer.route(x)
    rw, rsel, rpr = ref_routing(layer, x)
    torch.testing.assert_close(w, rw)
    assert torch.equal(sel, rsel)
    assert (sel.sum(-1) == shared + top_k).all()               # exactly shared + top_k heads per token
    assert sel[..., :shared].all()                             # the shared heads always
    assert (w[~sel] == 0).all() and (w[sel] > 0).all()         # weights only on the heads in use
    if pr is not None:                                         # the top_k routed heads have the largest probs
        chosen = pr.masked_fill(~sel[..., shared:], float("inf")).amin(-1)
        others = pr.masked_fill(sel[..., shared:], float("-inf")).amax(-1)
        assert (chosen > others).all()
    ws, wr = w[..., :shared].sum(-1), w[..., shared:].sum(-1)
    if weighting == "paper":   # alpha_1 * (shared softmax sums to 1) + alpha_2 * (part of a softmax) <= 1
        assert (w.sum(-1) <= 1 + 1e-12).all()
        if shared and heads > shared:
            alpha = torch.softmax(layer.mix(x), -1)
            torch.testing.assert_close(ws, alpha[..., 0])
            torch.testing.assert_close(w[..., shared:], alpha[..., 1:] * pr * sel[..., shared:])
        elif shared:
            torch.testing.assert_close(ws, torch.ones_like(ws))
    else:                      # the authors' scaling: each group's weights sum to (2 alpha) * its head count
        alpha = torch.softmax(layer.mix(x), -1) * 2 if shared and heads > shared else torch.ones(3, 11, 2, dtype=F64)
        torch.testing.assert_close(ws, alpha[..., 0] * shared)
        torch.testing.assert_close(wr, alpha[..., 1] * top_k)


@pytest.mark.parametrize("heads,kv,shared,top_k,window", [(8, 8, 2, 2, None), (8, 2, 2, 3, 2), (6, 3, 0, 1, None)])
@pytest.mark.parametrize("compute", ["dense", "sparse", "auto"])
def test_moh_decoding_token_by_token_equals_full_forward(heads, kv, shared, top_k, window, compute):
    torch.manual_seed(6)
    pattern = None if window is None else az.SlidingWindow(window)
    layer = randomize(MoH(32, heads, kv, 4, True, False, pattern, False, shared, top_k, compute=compute).double(), 2.)
    x = torch.randn(2, 9, 32, dtype=F64)
    full = layer(x)
    cache = layer.new_cache()
    parts = [layer(x[:, :3], cache)] + [layer(x[:, t:t + 1], cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen == 9 and cache.k.shape == (2, kv, 9, 4)   # every kv head cached, whatever the routing
    assert layer.kv_cache_values_per_token() == 2 * kv * 4


def test_moh_sparse_path_computes_only_the_active_heads(monkeypatch):
    """One token uses shared heads 0, 1 and one routed head r: the sparse path attends with those query heads
    only, grouped by key/value head (each group padded to the fullest group's count) with only the kv heads of
    those groups, and agrees with the dense path in the output and every gradient."""
    calls = []
    real = moh_module.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1]))
        return real(q, k, v, **kw)
    monkeypatch.setattr(moh_module, "attention", spy)
    torch.manual_seed(7)
    for kv in (8, 4, 2, 1):
        layer = randomize(MoH(16, 8, kv, 4, num_shared_heads=2, top_k=1).double(), 2.)
        x = torch.randn(1, 1, 16, dtype=F64, requires_grad=True)
        r = 2 + int(layer.router(x)[0, 0].argmax())
        groups = {}
        for h in (0, 1, r):
            groups.setdefault(h // (8 // kv), []).append(h)
        expect = len(groups) * max(len(hs) for hs in groups.values()), len(groups)
        outs, grads = [], []
        for mode in ("dense", "sparse"):
            layer.compute = mode
            calls.clear()
            y = layer(x)
            assert layer.last_compute == mode and calls == [(8, kv) if mode == "dense" else expect]
            outs.append(y)
            grads.append(torch.autograd.grad((y * torch.arange(16.)).sum() + layer.aux_loss,
                                             [x, *layer.parameters()]))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_moh_gradcheck_and_reference_gradients(compute):
    torch.manual_seed(8)
    layer = randomize(MoH(8, 4, 2, 2, False, False, None, False, 1, 2, compute=compute).double(), 2.)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(1, 4, 8, dtype=F64, requires_grad=True)

    def f(x, *ps):   # the output and the load-balance loss (its gradient reaches the router through P_i)
        y = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return y, layer.aux_loss
    assert torch.autograd.gradcheck(f, (x, *params))
    layer = randomize(MoH(24, 6, 2, None, True, True, az.SlidingWindow(3), True, 2, 2, compute=compute).double(), 2.)
    x = torch.randn(2, 8, 24, dtype=F64, requires_grad=True)
    w = torch.randn(2, 8, 24, dtype=F64)
    got = torch.autograd.grad((layer(x) * w).sum() + layer.aux_loss, [x, *layer.parameters()])
    _, sel, pr = ref_routing(layer, x)
    aux = (sel[..., 2:].double().flatten(0, 1).mean(0) * pr.flatten(0, 1).mean(0)).sum()
    want = torch.autograd.grad((ref_moh(layer, x, 3) * w).sum() + aux, [x, *layer.parameters()])
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], got, want):
        torch.testing.assert_close(a, b, msg=name, **close(layer))


def test_moh_per_head_pattern_and_auto_choice():
    torch.manual_seed(9)
    per_head = az.PerHead([az.SlidingWindow(w) for w in range(8)])       # a different window per head
    layer = randomize(MoH(16, 8, 8, 2, pattern=per_head, num_shared_heads=2, top_k=1).double(), 2.)
    x = torch.randn(1, 10, 16, dtype=F64)
    active = layer.route(x).selected.flatten(0, 1).any(0)
    assert not active.all() and active[int((~active).nonzero()[0]):].any()   # a gap: heads must be re-indexed
    outs = []
    for mode in ("dense", "sparse"):
        layer.compute = mode
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    # auto: a long call whose tokens all route alike (few active heads) goes sparse; one decode token dense
    layer = randomize(MoH(16, 8, 8, 2, num_shared_heads=2, top_k=1).double(), 2.)
    x = torch.randn(1, 1, 16, dtype=F64).expand(1, 512, 16) + 1e-3 * torch.randn(1, 512, 16, dtype=F64)
    assert (layer.route(x).selected.flatten(0, 1).any(0)).sum() == 3
    y = layer(x)
    assert layer.last_compute == "sparse"
    layer.compute = "dense"
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.compute = "auto"
    layer(x[:, :1])
    assert layer.last_compute == "dense"


def test_moh_defaults_and_cache_size():
    m = MoH(64, 8)
    assert (m.num_shared_heads, m.num_routed_heads, m.top_k, m.compute, m.weighting) == (4, 4, 2, "auto", "paper")
    assert MoH(64, 1).top_k == 1 and MoH(64, 2).num_shared_heads == 1
    assert MoH(64, 8, 2).kv_cache_values_per_token() == Attention(64, 8, 2).kv_cache_values_per_token() == 32
    assert MoH(64, 8, 2, pattern=az.SlidingWindow(15)).state_size(100) == 2 * 2 * 8 * 16
    y = MoH(64, 8)(torch.randn(2, 5, 64))
    assert y.shape == (2, 5, 64) and y.dtype == torch.float32


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="gate"):
        GatedAttention(32, 4, gate="sigmoid")
    with pytest.raises(TypeError, match="gate"):
        GatedAttention(32, 4, gate=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedAttention(32, 4, 3)
    with pytest.raises(ValueError, match="num_shared_heads"):
        MoH(32, 4, num_shared_heads=5)
    with pytest.raises(TypeError, match="num_shared_heads"):
        MoH(32, 4, num_shared_heads=1.0)
    with pytest.raises(ValueError, match="top_k"):
        MoH(32, 4, num_shared_heads=2, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        MoH(32, 4, num_shared_heads=2, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        MoH(32, 4, num_shared_heads=4, top_k=1)
    with pytest.raises(TypeError, match="top_k"):
        MoH(32, 4, top_k=True)
    with pytest.raises(ValueError, match="compute"):
        MoH(32, 4, compute="fast")
    with pytest.raises(ValueError, match="weighting"):
        MoH(32, 4, weighting="official")
    per_head_mask = az.Mask(lambda b, h, q, k: (k <= q) & (h >= 0), per_head=True)
    with pytest.raises(ValueError, match="compute='sparse'"):
        MoH(32, 4, pattern=per_head_mask, compute="sparse")
    layer = MoH(32, 4, pattern=per_head_mask)                   # auto falls back to dense
    layer(torch.randn(1, 3, 32))
    assert layer.last_compute == "dense"
    with pytest.raises(ValueError, match="compute"):
        layer.compute = "sparse"
    for layer in (GatedAttention(32, 4), MoH(32, 4)):
        with pytest.raises(ValueError, match=r"\(batch, length, 32\)"):
            layer(torch.randn(2, 5, 16))
        with pytest.raises(TypeError, match="new_cache"):
            layer(torch.randn(2, 5, 32), cache={})
