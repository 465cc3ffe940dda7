"""The Triton simple-GLA kernels (attnzoo.linear.triton_kernels) against the float64 recurrence.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with chunks of 16.
Outputs of the launchers are poisoned with NaN before the kernels run, so an element a kernel fails to
write fails the check. float32: IEEE dots, relative error < 1e-4 (the protocol's rule). float16 (and
bfloat16 on a GPU; the interpreter's tl.dot mishandles bfloat16 operands): the protocol's low-precision rule
against the float64 recurrence on the same (rounded) inputs, with the baseline error taken from the same
chunked computation done by the PyTorch math path in that dtype (``_core.chunk_gated_linear`` evaluated on
16-bit tensors); results the kernels return in float32 (final state, dg, d initial state) are held to the
same rule.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import attnzoo.linear as lin  # noqa: E402
from attnzoo.linear import _core  # noqa: E402
from attnzoo.linear import triton_kernels as tk  # noqa: E402
from linear_helpers import DEV, TRITON_MARKS  # noqa: E402
from attnzoo.testing import check_close, max_err, rel_rmse  # noqa: E402

pytestmark = TRITON_MARKS

B, H = 2, 2
# blocks smaller than the head dims: several state tiles and Dv blocks per (batch, head)
SPLIT = dict(BT=16, BK_H=16, BV_H=16, BV_O=16, BV_B=16, warps_h=1, warps_o=1, warps_b=1, stages=1)




def recurrence(q, k, v, g, s0, scale):
    """S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, token by token."""
    b, h, t, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if s0 is None else s0
    outs = []
    for i in range(t):
        if g is not None:
            s = g[:, :, i].exp()[..., None, None] * s
        s = s + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append(scale * (q[:, :, i, None, :] @ s).squeeze(-2))
    return (torch.stack(outs, 2) if outs else v.new_zeros(v.shape)), s


def make(t, dk, dv, gate, seed=0):
    """float64 q, k, v, g (B, H, T) or None, s0, and the cotangents do, ds."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, H, t, dk), rnd(B, H, t, dk), rnd(B, H, t, dv)
    if gate == "none":
        g = None
    elif gate == "const":  # RetNet / Lightning: one log gamma per head
        g = torch.log(1 - 2.0 ** -torch.tensor([2.0, 5.0], dtype=torch.float64)).view(1, H, 1).expand(B, H, t)
    else:  # data-dependent, log-sigmoid
        g = F.logsigmoid(rnd(B, H, t))
    return dict(q=q, k=k, v=v, g=g, s0=rnd(B, H, dk, dv), do=rnd(B, H, t, dv), ds=rnd(B, H, dk, dv))


def reference(x, init, scale, fn=recurrence):
    """Outputs and gradients (o, state, dq, dk, dv, dg, ds0) of <o, do> + <S_T, ds>. ds0 is the gradient
    with respect to the initial state, also when it is zero (init=False)."""
    leaves = {n: x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g") if x[n] is not None}
    s0 = x["s0"] if init else torch.zeros_like(x["s0"])
    leaves["s0"] = s0.detach().clone().requires_grad_()
    o, s = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves["s0"], scale)
    loss = (o * x["do"].to(o.dtype)).sum() + (s * x["ds"].to(s.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res = {"o": o.detach(), "state": s.detach()}
    res.update({"d" + n: gr for n, gr in zip(leaves, grads)})
    return res


def run_kernels(x, init, scale, dtype, cfg=None):
    c = lambda t, dt=dtype: None if t is None else t.to(dt)  # noqa: E731
    q, k, v, do = c(x["q"]), c(x["k"]), c(x["v"]), c(x["do"])
    g = c(x["g"], torch.float32)
    s0 = c(x["s0"], torch.float32) if init else None
    o, st = tk.fwd(q, k, v, g, s0, scale, cfg=cfg, poison=True)
    dq, dk, dv, dg, ds0 = tk.bwd(do, c(x["ds"], torch.float32), q, k, v, g, s0, scale, cfg=cfg, poison=True)
    res = dict(o=o, state=st, dq=dq, dk=dk, dv=dv, ds0=ds0)
    if g is not None:
        res["dg"] = dg
    else:
        assert dg is None
    return res


def rounded(x, dtype):
    """The inputs as the kernels see them (q, k, v, do in ``dtype``; g, s0, ds in float32), back in float64."""
    out = dict(x)
    for n in ("q", "k", "v", "do"):
        out[n] = x[n].to(dtype).double()
    for n in ("g", "s0", "ds"):
        out[n] = None if x[n] is None else x[n].float().double()
    return out


@pytest.mark.parametrize("gate", ["none", "const", "random"])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("dk, dv", [(32, 32), (16, 32)])
@pytest.mark.parametrize("t", [1, 17, 40])
def test_float32_matches_recurrence(t, dk, dv, init, gate):
    x = rounded(make(t, dk, dv, gate, seed=t + dk), torch.float32)
    scale = dk ** -0.5
    want = reference(x, init, scale)
    x = {n: (None if a is None else a.to(DEV)) for n, a in x.items()}
    got = run_kernels(x, init, scale, torch.float32, cfg=SPLIT if dk == dv else None)
    for n, val in got.items():
        assert val.dtype == torch.float32
        check_close(f"T{t}/{dk}x{dv}/{gate}/init{init}/{n}", val.cpu(), want[n].float())
    if t == 1 and not init and gate != "none":  # no state before the first token: dg_0 = 0 exactly
        assert (got["dg"] == 0).all()


def _lowp_rule(name, x, ref, base):
    """The protocol's low-precision rule for a result of a 16-bit run, whatever dtype it is returned in."""
    assert not torch.isnan(x).any(), f"{name}: NaN"
    err, bound, rr = max_err(x, ref), 2 * max_err(base, ref) + 1e-5, rel_rmse(x, ref)
    assert err <= bound and rr < 5e-3, f"{name}: max err {err:.3g} (bound {bound:.3g}), rel RMSE {rr:.3g}"


def _math_path(dtype):
    """The chunked form of the PyTorch tier, evaluated in ``dtype`` arithmetic (the low-precision baseline)."""
    def fn(q, k, v, g, s0, scale):
        c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return _core.chunk_gated_linear(c(q) * scale, c(k), c(v), c(g), c(s0), 16)
    return fn


# bfloat16 only on a GPU: the interpreter's tl.dot mishandles bfloat16 operands
LOW = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("gate", ["none", "const", "random"])
@pytest.mark.parametrize("t", [17, 40])
def test_16bit_meets_protocol(t, gate, dtype):
    dk = dv = 32
    x = rounded(make(t, dk, dv, gate, seed=7 + t), dtype)
    scale = dk ** -0.5
    want = reference(x, True, scale)
    base = reference(x, True, scale, fn=_math_path(dtype))
    got = run_kernels({n: (None if a is None else a.to(DEV)) for n, a in x.items()}, True, scale, dtype,
                      cfg=SPLIT if gate == "random" else None)
    for n, val in got.items():
        assert val.dtype == (dtype if n in ("o", "dq", "dk", "dv") else torch.float32)
        if val.dtype == dtype:
            check_close(f"{dtype}/T{t}/{gate}/{n}", val.cpu(), want[n], baseline=base[n])
        else:
            _lowp_rule(f"{dtype}/T{t}/{gate}/{n}", val.cpu(), want[n], base[n])


def test_simple_gla_autograd_strided_inputs():
    """The public op (custom ops + autograd): inputs in (B, T, H, D) memory viewed as (B, H, T, D), a
    stride-0 constant gate, gradients of every input, and without a final-state gradient."""
    t, dk, dv = 23, 32, 16
    x = rounded(make(t, dk, dv, "random", seed=3), torch.float32)
    want = reference(x, True, 0.5)
    leaves = {}
    for n in ("q", "k", "v"):
        leaves[n] = x[n].float().transpose(1, 2).contiguous().to(DEV).transpose(1, 2).requires_grad_()
    leaves["g"] = x["g"].float().to(DEV).requires_grad_()
    leaves["s0"] = x["s0"].float().to(DEV).requires_grad_()
    o, s = lin.triton_kernels.simple_gla(leaves["q"], leaves["k"], leaves["v"], leaves["g"], 0.5, leaves["s0"],
                                         output_final_state=True)
    loss = (o * x["do"].float().to(DEV)).sum() + (s * x["ds"].float().to(DEV)).sum()
    loss.backward()
    check_close("o", o.detach().cpu(), want["o"].float())
    check_close("state", s.detach().cpu(), want["state"].float())
    for n, leaf in leaves.items():
        check_close("d" + n, leaf.grad.cpu(), want["d" + n].float())
    # only the output is used; a per-head constant decay (stride-0 gate) gets its gradient summed
    log_gamma = torch.tensor([-0.1, -0.7], device=DEV, requires_grad=True)
    qkv = [leaves[n].detach().requires_grad_() for n in ("q", "k", "v")]
    o, s = tk.simple_gla(*qkv, log_gamma.view(1, H, 1).expand(B, H, t))
    assert s is None
    (o * x["do"].float().to(DEV)).sum().backward()
    xr = dict(x, g=log_gamma.detach().double().cpu().view(1, H, 1).expand(B, H, t), ds=torch.zeros_like(x["ds"]))
    ref = reference(xr, False, dk ** -0.5)
    check_close("o/const", o.detach().cpu(), ref["o"].float())
    check_close("dlog_gamma", log_gamma.grad.cpu(), ref["dg"].sum((0, 2)).float())
    for n, leaf in zip("qkv", qkv):
        check_close(f"d{n}/const", leaf.grad.cpu(), ref["d" + n].float())


def test_custom_ops_opcheck():
    """Schemas, fake implementations (torch.compile), autograd registration of the custom ops."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, H, 20, 16, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    g = F.logsigmoid(torch.randn(1, H, 20, generator=gen)).to(DEV).requires_grad_()
    s0 = torch.randn(1, H, 16, 16, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(tk._fwd_op, (q, k, v, g, s0, 0.25))
    torch.library.opcheck(tk._fwd_op, (q, k, v, None, None, 0.25))
    do = torch.randn(1, H, 20, 16, generator=gen).to(DEV)
    torch.library.opcheck(tk._bwd_op, (do, None, q.detach(), k.detach(), v.detach(), g.detach(), None, 0.25))


def test_empty_sequence():
    q = torch.randn(B, H, 0, 16, device=DEV)
    s0 = torch.randn(B, H, 16, 16, device=DEV)
    o, s = tk.simple_gla(q, q, q, torch.zeros(B, H, 0, device=DEV), initial_state=s0, output_final_state=True)
    assert o.shape == (B, H, 0, 16) and torch.equal(s, s0)


@pytest.mark.parametrize("gate", ["none", "random"])
def test_step_kernel_equals_recurrence(gate):
    """Decoding token by token (out of place, then in place) reproduces the recurrence and its state."""
    t, dk, dv = 9, 32, 40
    x = rounded(make(t, dk, dv, gate, seed=11), torch.float32)
    want_o, want_s = recurrence(x["q"], x["k"], x["v"], x["g"], x["s0"], 0.3)
    f = lambda a: a.float().to(DEV)  # noqa: E731
    s = f(x["s0"])
    s_in = s.clone()
    outs = []
    for i in range(t):
        g_t = None if x["g"] is None else f(x["g"][:, :, i])
        args = (f(x["q"][:, :, i]), f(x["k"][:, :, i]), f(x["v"][:, :, i]), g_t)
        before = s.clone()
        o, s_new = tk.step(*args, s, 0.3, poison=True, block_v=16)
        assert torch.equal(s, before), "out of place must leave the state alone"
        o2, s_ret = tk.step(*args, s_in, 0.3, inplace=True)
        assert s_ret is s_in
        assert torch.equal(o, o2) and torch.equal(s_new, s_in)
        s = s_new
        outs.append(o)
    check_close("step/o", torch.stack(outs, 2).cpu(), want_o.float())
    check_close("step/state", s.cpu(), want_s.float())
    # the public wrapper, fresh state, float16 token
    o, s1 = tk.simple_gla_step(*(f(x[n][:, :, 0]).half() for n in ("q", "k", "v")), scale=0.3)
    ref_o, ref_s = recurrence(*(x[n][:, :, :1].half().double() for n in ("q", "k", "v")), None, None, 0.3)
    assert o.dtype == torch.float16 and s1.dtype == torch.float32
    check_close("step/fp16/o", o.cpu(), ref_o[:, :, 0], baseline=ref_o[:, :, 0].half())
    check_close("step/fp16/state", s1.cpu(), ref_s.float())


@pytest.mark.parametrize("fmap, decay", [("identity", None), ("elu+1", -0.2), ("relu", "tensor")])
def test_linear_attention_dispatch(fmap, decay):
    """linear_attention(..., backend="triton") agrees with backend="torch" (outputs, state, gradients),
    including packed sequences; the decoding step too."""
    gen = torch.Generator().manual_seed(5)
    t, d, dv = 29, 16, 32
    args = {n: torch.randn(1, H, t, dd, generator=gen).to(DEV) for n, dd in (("q", d), ("k", d), ("v", dv))}
    args["initial_state"] = torch.randn(3, H, d, dv, generator=gen).to(DEV)
    cu = torch.tensor([0, 7, 7, t], device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        leaves = {n: a.clone().requires_grad_() for n, a in args.items()}
        dec = torch.tensor([-0.05, -0.4], device=DEV, requires_grad=True) if decay == "tensor" else decay
        o, s = lin.linear_attention(**leaves, feature_map=fmap, decay=dec, cu_seqlens=cu, output_final_state=True,
                                    backend=backend, chunk_size=8)
        (o.square().sum() + s.sum()).backward()
        res[backend] = [o.detach(), s.detach()] + [leaves[n].grad for n in leaves]
        if decay == "tensor":
            res[backend].append(dec.grad)
    for i, (a, b) in enumerate(zip(res["triton"], res["torch"])):
        check_close(f"{fmap}/{i}", a.cpu(), b.cpu().double())
    tok = [args[n][:, :, 0] for n in ("q", "k", "v")]
    s0 = args["initial_state"][:1]
    dec = torch.tensor([-0.05, -0.4], device=DEV) if decay == "tensor" else decay
    a = lin.linear_attention_step(*tok, s0, feature_map=fmap, decay=dec, backend="triton")
    b = lin.linear_attention_step(*tok, s0, feature_map=fmap, decay=dec, backend="torch")
    for u, w in zip(a, b):
        check_close(f"{fmap}/step", u.cpu(), w.cpu().double())


def test_dispatch_rules(monkeypatch):
    q = torch.randn(1, H, 5, 16, device=DEV)
    with pytest.raises(ValueError, match="normalize=True"):
        lin.linear_attention(q, q, q, normalize=True, backend="triton")
    with pytest.raises(ValueError, match="feature map"):
        lin.linear_attention(q, q, q, feature_map="taylor", backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        lin.linear_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        lin.linear_attention(q.double(), q.double(), q.double(), backend="triton")
    calls = []
    real = tk.linear_attention_chunk
    monkeypatch.setattr(tk, "linear_attention_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "0")
    lin.linear_attention(q, q, q)
    assert not calls
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "1")
    lin.linear_attention(q, q, q)
    assert calls
    if not torch.cuda.is_available():  # CPU default without the opt-in: the PyTorch form
        monkeypatch.delenv("ATTNZOO_LINEAR_TRITON")
        calls.clear()
        lin.linear_attention(q, q, q)
        assert not calls


def test_fit_state_tiles_halves_tiles_for_few_sequences(monkeypatch):
    """Few sequences (B * H) -> smaller state tiles until two programs per SM (or the floor); many sequences
    keep the table's tiles; CPU configs are never touched; the input config is not modified."""
    monkeypatch.setattr(tk, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    base = dict(BK_H=64, BV_H=64, BT=64)
    dims = dict(BK_H=128, BV_H=128)
    assert tk.fit_state_tiles(base, 16, dims, cuda) == dict(base, BK_H=32, BV_H=32)  # 64 -> 256 programs
    assert tk.fit_state_tiles(base, 128, dims, cuda) == base                       # 512 programs already
    assert tk.fit_state_tiles(base, 1, dims, cuda, floor=16) == dict(base, BK_H=16, BV_H=16)
    assert tk.fit_state_tiles(base, 1, dict(BV_H=128), cuda) == dict(base, BV_H=32)  # one key only
    small = tk.fit_state_tiles(base, 16, dict(BK_H=24, BV_H=128), cuda)             # a 24-wide key dim
    assert small["BK_H"] == 64 and small["BV_H"] == 32  # the key tile is 32 wide already (clipped to Dk)
    assert tk.fit_state_tiles(base, 1, dims, torch.device("cpu")) is base
    assert base == dict(BK_H=64, BV_H=64, BT=64)


@pytest.mark.parametrize("name", ["gla", "delta_rule", "gated_delta_rule", "kda"])
def test_gated_step_kernel_equals_recurrence(name):
    """The fused step kernel for GLA (per-channel decay), DeltaNet, Gated DeltaNet and KDA (the delta rule's
    update in the program): decoding a sequence token by token through ``<op>_step(backend="triton")`` (Dv
    blocks of the kernel) reproduces the float64 recurrence and its state in float32; "auto" picks the kernel
    only when no gradient is wanted, and "triton" refuses inputs that require grad."""
    from linear_helpers import OPS, make_inputs
    _, step_fn, _, has_beta = OPS[name]
    x = make_inputs(name, b=2, h=3, t=6, dk=32, dv=40, seed=4, strong=True)
    ref_kind = "delta" if has_beta else "linear"
    want_s = x["initial_state"].detach()
    s = want_s.float().to(DEV)
    for i in range(6):
        tok = {n: x[n].detach()[:, :, i] for n in x if n != "initial_state"}
        want_o, want_s = _core.forward_step(ref_kind, tok["q"], tok["k"], tok["v"], tok.get("g"), tok.get("beta"),
                                            want_s, 0.3, backend="torch")
        args = [tok["q"].float().to(DEV), tok["k"].float().to(DEV), tok["v"].float().to(DEV)]
        if "g" in tok:
            args.append(tok["g"].float().to(DEV))
        if has_beta:
            args.append(tok["beta"].float().to(DEV))
        o, s = step_fn(*args, s, scale=0.3, backend="triton")
        assert s.dtype == torch.float32
        check_close(f"{name}/step{i}/o", o.cpu(), want_o.float())
    check_close(f"{name}/state", s.cpu(), want_s.float())
    leaf = args[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        step_fn(leaf, *args[1:], s, scale=0.3, backend="triton")
    o_auto, _ = step_fn(leaf, *args[1:], s, scale=0.3)  # auto: PyTorch, differentiable
    assert o_auto.requires_grad
