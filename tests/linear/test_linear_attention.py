"""Linear attention: feature maps, decay, normalisation, non-causal form; three forms against each other and
against the quadratic (masked q k^T) form; packed sequences, decoding, Hedgehog."""
import functools

import pytest
import torch

import attnzoo.linear as lin
from attnzoo.linear import feature_maps as fm
from attnzoo.testing import check_close

from linear_helpers import cast, outputs_and_grads

B, H, T, D, DV = 2, 2, 37, 6, 5


def _args(fmap="identity", decay=False, normalize=False, state=True, b=B, t=T, seed=0, n_state=None):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    args = {"q": rnd(b, H, t, D), "k": rnd(b, H, t, D), "v": rnd(b, H, t, DV)}
    if decay:
        args["decay"] = -torch.rand(H, generator=gen, dtype=torch.float64) * 0.5
    if state:
        f = fm.feature_dim(fmap, D) if isinstance(fmap, str) else fmap.output_dim
        s0 = rnd(b if n_state is None else n_state, H, f, DV + normalize)
        if normalize:  # a plausible key sum: positive for positive maps
            s0[..., -1] = s0[..., -1].abs() + 1
        args["initial_state"] = s0
    return {key: x.requires_grad_() for key, x in args.items()}


def _hedgehog():
    torch.manual_seed(3)
    m = lin.HedgehogFeatureMap(D, 4, heads=H).double()
    with torch.no_grad():
        m.weight.add_(0.3 * torch.randn_like(m.weight))
        m.bias.normal_()
    return m


CASES = [  # feature map, decay, normalize
    ("identity", False, False), ("identity", True, False), ("elu+1", False, True), ("elu+1", True, True),
    ("relu", True, False), ("taylor", False, True), ("taylor", True, False), ("hedgehog", True, True),
]


@pytest.mark.parametrize("fmap, decay, normalize", CASES)
def test_forms_agree_float64(fmap, decay, normalize):
    phi = _hedgehog() if fmap == "hedgehog" else fmap
    args = _args(phi, decay, normalize)
    results = {}
    for mode, cs in (("naive", 64), ("recurrent", 64), ("chunk", 8), ("chunk", 64), ("chunk", 5)):
        fn = functools.partial(lin.linear_attention, feature_map=phi, normalize=normalize, mode=mode,
                               chunk_size=cs, output_final_state=True)
        if fmap == "hedgehog":
            phi.zero_grad()
        res = outputs_and_grads(fn, cast(args, torch.float64))
        if fmap == "hedgehog":
            o, s = fn(**cast(args, torch.float64))
            (o.sum() + s.sum()).backward()
            res["dweight"], res["dbias"] = phi.weight.grad.clone(), phi.bias.grad.clone()
        results[(mode, cs)] = res
    want = results.pop(("naive", 64))
    assert want["state"].shape[-1] == DV + normalize
    for (mode, cs), got in results.items():
        for key in want:
            check_close(f"{fmap}/{mode}{cs}/{key}", got[key], want[key])


@pytest.mark.parametrize("fmap, decay, normalize", [("identity", True, False), ("elu+1", True, True),
                                                    ("taylor", False, True)])
def test_float32_chunk_meets_protocol(fmap, decay, normalize):
    args = _args(fmap, decay, normalize)
    fn = functools.partial(lin.linear_attention, feature_map=fmap, normalize=normalize, output_final_state=True)
    want = outputs_and_grads(functools.partial(fn, mode="naive"), args)
    for cs in (16, 64):
        got = outputs_and_grads(functools.partial(fn, chunk_size=cs), cast(args, torch.float32))
        for key in want:
            check_close(f"{fmap}/fp32/{key}", got[key], want[key])


@pytest.mark.parametrize("normalize", [False, True])
def test_naive_matches_quadratic_form(normalize):
    """o = ((scale q k^T) * gamma^(t-s) * causal) v, normalised by the row sums."""
    a = {k: x.detach() for k, x in _args("elu+1", decay=True, state=False).items()}
    fq, fk = fm.elu_plus_one(a["q"]), fm.elu_plus_one(a["k"])
    idx = torch.arange(T, dtype=torch.float64)
    dist = idx[:, None] - idx[None, :]
    decay = torch.where(dist >= 0, a["decay"].view(H, 1, 1) * dist, -torch.inf).exp()  # gamma^(t-s), causal
    w = (fq @ fk.transpose(-1, -2)) * D ** -0.5 * decay
    want = w @ a["v"]
    if normalize:
        want = want / (w.sum(-1, keepdim=True) + 1e-6)
    for mode in ("naive", "chunk"):
        got = lin.linear_attention(**a, feature_map="elu+1", normalize=normalize, mode=mode)[0]
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_taylor_map_is_second_order_exp():
    q, k = torch.randn(3, 2, 5, 16, dtype=torch.float64), torch.randn(3, 2, 5, 16, dtype=torch.float64)
    s = (q * k).sum(-1) / 4.0  # q . k / sqrt(d)
    fq, fk = fm.taylor(q), fm.taylor(k)
    assert fq.shape[-1] == 1 + 16 + 256 == fm.feature_dim("taylor", 16)
    torch.testing.assert_close((fq * fk).sum(-1), 1 + s + s ** 2 / 2)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["chunk", "recurrent", "naive"])
def test_non_causal(mode, normalize):
    a = {k: x.detach() for k, x in _args("elu+1", normalize=normalize).items()}
    o, s = lin.linear_attention(**a, feature_map="elu+1", normalize=normalize, causal=False, mode=mode,
                                output_final_state=True)
    fq, fk = fm.elu_plus_one(a["q"]) * D ** -0.5, fm.elu_plus_one(a["k"])
    v1 = torch.cat([a["v"], torch.ones_like(a["v"][..., :1])], -1) if normalize else a["v"]
    want_s = a["initial_state"] + fk.transpose(-1, -2) @ v1
    want = fq @ want_s
    if normalize:
        want = want[..., :DV] / (want[..., DV:] + 1e-6)
    torch.testing.assert_close(o, want)
    torch.testing.assert_close(s, want_s)


@pytest.mark.parametrize("mode", ["chunk", "recurrent", "naive"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences(mode, causal):
    cu = torch.tensor([0, 9, 30, 30, 37])
    a = _args("elu+1", decay=causal, normalize=True, b=1, n_state=4)
    s0 = a.pop("initial_state")
    kw = dict(feature_map="elu+1", normalize=True, causal=causal, output_final_state=True)
    o, s = lin.linear_attention(**a, initial_state=s0, cu_seqlens=cu, mode=mode, chunk_size=8, **kw)
    for n in range(4):
        lo, hi = cu[n].item(), cu[n + 1].item()
        part = {k: (x if k == "decay" else x[:, :, lo:hi]) for k, x in a.items()}
        on, sn = lin.linear_attention(**part, initial_state=s0[n:n + 1], mode="naive", **kw)
        check_close(f"seq{n}/state", s[n:n + 1], sn)
        if hi > lo:
            check_close(f"seq{n}/o", o[:, :, lo:hi], on)


@pytest.mark.parametrize("fmap, decay, normalize", [("identity", True, False), ("taylor", False, True),
                                                    ("hedgehog", True, True)])
def test_decoding_token_by_token(fmap, decay, normalize):
    phi = _hedgehog() if fmap == "hedgehog" else fmap
    a = {k: x.detach() for k, x in _args(phi, decay, normalize).items()}
    kw = dict(feature_map=phi, normalize=normalize)
    dec = a.pop("decay", None)
    full_o, full_s = lin.linear_attention(**a, decay=dec, output_final_state=True, **kw)
    o, s = lin.linear_attention(**{k: (x if k == "initial_state" else x[:, :, :15]) for k, x in a.items()},
                                decay=dec, output_final_state=True, **kw)
    outs = [o]
    for t in range(15, T):
        ot, s = lin.linear_attention_step(a["q"][:, :, t], a["k"][:, :, t], a["v"][:, :, t], s, decay=dec, **kw)
        outs.append(ot.unsqueeze(2))
    check_close("decode/o", torch.cat(outs, 2), full_o)
    check_close("decode/state", s, full_s)
    # from scratch with state=None
    o0, _ = lin.linear_attention_step(a["q"][:, :, 0], a["k"][:, :, 0], a["v"][:, :, 0], None, decay=dec, **kw)
    ref = lin.linear_attention(**{k: x[:, :, :1] for k, x in a.items() if k != "initial_state"}, decay=dec, **kw)[0]
    check_close("decode/first", o0, ref[:, :, 0])


def test_float_decay_equals_tensor_decay_and_scalar_tensor():
    a = {k: x.detach() for k, x in _args(state=False).items()}
    x = lin.linear_attention(**a, decay=-0.2)[0]
    y = lin.linear_attention(**a, decay=torch.full((H,), -0.2, dtype=torch.float64))[0]
    z = lin.linear_attention(**a, decay=torch.tensor(-0.2, dtype=torch.float64))[0]
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(x, z)


def test_hedgehog_module():
    m = lin.HedgehogFeatureMap(D, 3)
    x = torch.randn(2, H, 7, D)
    y = m(x)
    assert y.shape == (2, H, 7, 6) and m.output_dim == 6 and (y > 0).all()
    torch.testing.assert_close(y.sum(-1), torch.full((2, H, 7), 2.0))
    per_head = lin.HedgehogFeatureMap(D, 3, heads=H)
    o = lin.linear_attention(x, x, torch.randn(2, H, 7, DV), feature_map=per_head, normalize=True)[0]
    o.sum().backward()
    assert per_head.weight.grad is not None and per_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="heads"):
        per_head(torch.randn(2, H + 1, 7, D))
    with pytest.raises(ValueError, match="feature_dim"):
        lin.HedgehogFeatureMap(D, 0)
