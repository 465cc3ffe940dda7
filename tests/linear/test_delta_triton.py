"""The Triton delta-rule kernels (attnzoo.linear.triton_delta: DeltaNet and Gated DeltaNet) against the float64
recurrence of attnzoo.linear.naive.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with chunks of 16
(one row block of the triangular inverse) by default; ``SUB32`` / ``SUB64`` use chunks of 32 / 64 (two / four
row blocks: the blocked forward substitution) with Dv blocks of 16 (several per head, the last one partly
masked when Dv is not a power of two). Outputs of the launchers are poisoned with NaN before the kernels run,
so an element a kernel fails to write fails the check. float32 with IEEE dots: relative error < 1e-4. float16
(the split hi/lo dots of the 16-bit path; the interpreter's tl.dot mishandles bfloat16): the protocol's
low-precision rule, the baseline being the recurrence evaluated in float16 arithmetic (PyTorch has no float16
triangular solve on CPU for the chunked form).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import attnzoo.linear as lin  # noqa: E402
from attnzoo.linear import triton_delta as td  # noqa: E402
from attnzoo.linear.naive import naive_delta_rule, naive_gated_delta_rule  # noqa: E402
from linear_helpers import DELTA_NAMES, DELTA_SMALL, DELTA_SUB32, DELTA_SUB64, DEV, TRITON_MARKS  # noqa: E402
from attnzoo.testing import check_close, max_err, rel_rmse  # noqa: E402

pytestmark = TRITON_MARKS

B, H = 2, 2
_SMALL, SUB32, SUB64, NAMES = DELTA_SMALL, DELTA_SUB32, DELTA_SUB64, DELTA_NAMES




def make(t, dk, dv, gate, seed=0):
    """float32-representable float64 inputs: L2-normalised keys, beta = sigmoid, g (B, H, T) or None
    ("paper": logsigmoid / 4; "strong": about -5 per step, e^-80 over a chunk of 16), s0, cotangents do, ds."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=rnd(B, H, t, dk), k=F.normalize(rnd(B, H, t, dk), dim=-1), v=rnd(B, H, t, dv),
             beta=torch.sigmoid(rnd(B, H, t)), s0=rnd(B, H, dk, dv), do=rnd(B, H, t, dv), ds=rnd(B, H, dk, dv))
    if gate == "paper":
        x["g"] = F.logsigmoid(rnd(B, H, t)) / 4
    elif gate == "strong":
        x["g"] = -5.0 + 0.5 * torch.rand(B, H, t, generator=gen, dtype=torch.float64)
    x = {n: a.float().double() for n, a in x.items()}
    x.setdefault("g", None)
    return x


def reference(x, init, scale, dtype=torch.float64):
    """o, final state and the gradients of <o, do> + <S_T, ds> by autograd through the recurrence, evaluated
    in ``dtype``. ds0 is the gradient with respect to the initial state, also when it is zero (init=False)."""
    leaves = {n: x[n].to(dtype).clone().requires_grad_() for n in NAMES if x[n] is not None}
    if not init:
        leaves["s0"] = torch.zeros_like(leaves["s0"]).requires_grad_()
    q, k, v, beta, s0 = (leaves[n] for n in ("q", "k", "v", "beta", "s0"))
    if "g" in leaves:
        o, s = naive_gated_delta_rule(q * scale, k, v, leaves["g"], beta, state=s0)
    else:
        o, s = naive_delta_rule(q * scale, k, v, beta, state=s0)
    loss = (o * x["do"].to(dtype)).sum() + (s * x["ds"].to(dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res = {"o": o.detach(), "state": s.detach()}
    res.update({"d" + n: gr for n, gr in zip(leaves, grads)})
    return res


def run_kernels(x, init, scale, dtype=torch.float32, cfg=None):
    c = lambda n, dt=dtype: None if x[n] is None else x[n].to(dt).to(DEV)  # noqa: E731
    q, k, v, do = c("q"), c("k"), c("v"), c("do")
    g, beta = c("g", torch.float32), c("beta", torch.float32)
    s0 = c("s0", torch.float32) if init else None
    o, st = td.fwd(q, k, v, g, beta, s0, scale, cfg=cfg, poison=True)
    dq, dk, dv, dg, dbeta, ds0 = td.bwd(do, c("ds", torch.float32), q, k, v, g, beta, s0, scale, cfg=cfg,
                                        poison=True)
    res = dict(o=o, state=st, dq=dq, dk=dk, dv=dv, dbeta=dbeta, ds0=ds0)
    if g is not None:
        res["dg"] = dg
    return res


CASES = [  # t, dk, dv, init, gate, cfg
    (1, 16, 16, False, "paper", None),
    (19, 32, 32, True, "paper", None),
    (40, 16, 32, False, None, None),
    (40, 32, 48, True, "strong", SUB32),
    (100, 48, 32, True, "paper", SUB32),
    (70, 16, 16, True, None, SUB64),
    (100, 32, 16, False, "strong", SUB64),
    # the main backward in two kernels: Dk blocks of 16 (Dk 48: three shares of dA), then of 32 / 16
    (70, 48, 32, True, "strong", dict(SUB64, main="split", BK_M=16, BK_MV=32, BV_M=16, warps_mk=1, warps_mv=1)),
    (40, 32, 48, False, "paper", dict(SUB32, main="split", BK_M=16, BV_M=16, warps_mk=1, warps_mv=1)),
    # the main backward in three passes over Dv (main="seq"): Dv 48 in three 16-wide blocks, Dk 48 padded to 64
    (70, 48, 48, True, "strong", dict(SUB64, main="seq", BV_B=16)),
    (40, 32, 16, False, None, dict(SUB32, main="seq")),
    # T by block doubling (inv="dbl"): chunks of 16 (one level), 32 and 64 (up to four)
    # (the first also with prep="split": T alone, then W and U0 by _wu in column blocks)
    (40, 16, 32, True, "strong", dict(DELTA_SMALL, BT=16, inv="dbl", prep="split")),
    (70, 32, 16, True, "paper", dict(SUB64, inv="dbl")),
    (100, 48, 32, False, "strong", dict(SUB32, inv="dbl")),
    # prep="split" after the row-block substitution: Dk 48 in three 16-wide blocks of W, Dv 32 in two of U0
    (70, 48, 32, True, "strong", dict(SUB64, prep="split", BN_WU=16, warps_wu=1)),
]


@pytest.mark.parametrize("t,dk,dv,init,gate,cfg", CASES,
                         ids=[f"T{c[0]}-{c[1]}x{c[2]}-init{int(c[3])}-{c[4]}-BT{(c[5] or {}).get('BT', 16)}"
                              f"{'-main' + (c[5] or {}).get('main', '') if (c[5] or {}).get('main') else ''}"
                              f"{'-dbl' if (c[5] or {}).get('inv') == 'dbl' else ''}"
                              f"{'-prepsplit' if (c[5] or {}).get('prep') == 'split' else ''}" for c in CASES])
def test_float32_matches_recurrence(t, dk, dv, init, gate, cfg):
    x = make(t, dk, dv, gate, seed=t + dk)
    scale = dk ** -0.5
    want = reference(x, init, scale)
    got = run_kernels(x, init, scale, cfg=cfg)
    for n, val in got.items():
        assert val.dtype == torch.float32
        check_close(f"T{t}/{dk}x{dv}/{gate}/init{init}/{n}", val.cpu(), want[n].float())


@pytest.mark.parametrize("split,main,inv,prep", [(True, "fused", "sub", "fused"), (False, "fused", "sub", "fused"),
                                                 (False, "split", "sub", "split"), (False, "fused", "dbl", "fused"),
                                                 (False, "seq", "dbl", "fused"), (True, "seq", "sub", "fused")])
def test_float16_protocol_rule(split, main, inv, prep):
    """16-bit operands, chunks of 32; with and without the hi/lo split of the float32 dot operands; the main
    backward fused, in two kernels or in three passes (seq); T by row-block substitution or block doubling; W and
    U0 with T or apart."""
    t, dk, dv = 40, 32, 32
    x = make(t, dk, dv, "paper", seed=11)
    for n in ("q", "k", "v", "do"):  # what the kernels see
        x[n] = x[n].half().double()
    scale = dk ** -0.5
    want = reference(x, True, scale)
    base = reference(x, True, scale, dtype=torch.float16)
    got = run_kernels(x, True, scale, dtype=torch.float16,
                      cfg=dict(SUB32, split=split, main=main, BK_M=16, BV_M=16, warps_mk=1, warps_mv=1, inv=inv,
                               prep=prep, BN_WU=16, warps_wu=1))
    for n, val in got.items():
        val = val.cpu()
        assert not torch.isnan(val).any(), f"{n}: NaN"
        err, bound, rr = max_err(val, want[n]), 2 * max_err(base[n], want[n]) + 1e-5, rel_rmse(val, want[n])
        assert err <= bound and rr < 5e-3, f"{n}: max err {err:.3g} (bound {bound:.3g}), rel RMSE {rr:.3g}"


def test_public_function_autograd_strided_inputs():
    """gated_delta_triton through the custom ops, on non-contiguous (transposed) q, k, v."""
    t, dk, dv = 19, 16, 32
    x = make(t, dk, dv, "paper", seed=3)
    want = reference(x, True, 0.25)
    tr = lambda a: a.float().transpose(1, 2).contiguous().transpose(1, 2).to(DEV).requires_grad_()  # noqa: E731
    q, k, v = (tr(x[n]) for n in ("q", "k", "v"))
    g, beta, s0 = (x[n].float().to(DEV).requires_grad_() for n in ("g", "beta", "s0"))
    o, s = td.gated_delta_triton(q, k, v, g, beta, scale=0.25, initial_state=s0, output_final_state=True)
    ((o * x["do"].float().to(DEV)).sum() + (s * x["ds"].float().to(DEV)).sum()).backward()
    check_close("o", o.detach().cpu(), want["o"].float())
    check_close("state", s.detach().cpu(), want["state"].float())
    for n, leaf in zip(("q", "k", "v", "g", "beta", "s0"), (q, k, v, g, beta, s0)):
        check_close("d" + n, leaf.grad.cpu(), want["d" + n].float())


def test_custom_ops_opcheck():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, H, 20, 16, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(1, H, 20, generator=gen)) / 4).to(DEV).requires_grad_()
    beta = torch.rand(1, H, 20, generator=gen).to(DEV).requires_grad_()
    s0 = torch.randn(1, H, 16, 16, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(td._fwd_op, (q, k, v, g, beta, s0, 0.25, False))
    torch.library.opcheck(td._fwd_op, (q, k, v, None, beta, None, 0.25, True))
    do = torch.randn(1, H, 20, 16, generator=gen).to(DEV)
    x = [t.detach() for t in (q, k, v, g, beta)]
    torch.library.opcheck(td._bwd_op, (do, None, *x, None, 0.25, []))
    kept = td._fwd_op(*x, s0.detach(), 0.25, True)[2:]
    torch.library.opcheck(td._bwd_op, (do, None, *x, s0.detach(), 0.25, kept))


def test_kept_forward_tensors_match_recomputation():
    """The backward from the forward's kept intermediates equals the backward that recomputes them; through
    autograd, a call that needs no gradient keeps nothing."""
    gen = torch.Generator().manual_seed(3)
    t = 37
    q, v, do = (torch.randn(1, 2, t, 16, generator=gen).to(DEV) for _ in range(3))
    k = F.normalize(torch.randn(1, 2, t, 16, generator=gen), dim=-1).to(DEV)
    g = (F.logsigmoid(torch.randn(1, 2, t, generator=gen)) / 4).to(DEV)
    beta = torch.rand(1, 2, t, generator=gen).to(DEV)
    s0 = torch.randn(1, 2, 16, 16, generator=gen).to(DEV)
    cfg = dict(td.config(16, 16, q.dtype, q.device), BT=32)
    o, ht, kept = td.fwd(q, k, v, g, beta, s0, 0.25, cfg=cfg, keep=True)
    o2, ht2 = td.fwd(q, k, v, g, beta, s0, 0.25, cfg=cfg)
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    with_kept = td.bwd(do, None, q, k, v, None, beta, s0, 0.25, cfg=cfg, kept=kept)
    recomputed = td.bwd(do, None, q, k, v, g, beta, s0, 0.25, cfg=cfg)
    for x, y in zip(with_kept, recomputed):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="chunk size"):
        td.bwd(do, None, q, k, v, None, beta, s0, 0.25, cfg=dict(cfg, BT=16), kept=kept)
    assert len(td._fwd_op(q, k, v, g, beta, s0, 0.25, td._keep(q, k, v, g, beta, s0))) == 2


def test_empty_sequence():
    q = torch.randn(B, H, 0, 16, device=DEV)
    beta = torch.rand(B, H, 0, device=DEV)
    s0 = torch.randn(B, H, 16, 16, device=DEV)
    o, s = td.gated_delta_triton(q, q, q, beta, beta, initial_state=s0, output_final_state=True)
    assert o.shape == (B, H, 0, 16) and torch.equal(s, s0)


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule"])
def test_backend_matches_torch(op):
    """op(backend="triton") against op(backend="torch"): packed sequences (one empty) with initial states,
    autograd through the public op, including the final state."""
    gen = torch.Generator().manual_seed(7)
    t, dk, dv = 24, 16, 32
    args = dict(q=torch.randn(1, H, t, dk, generator=gen), k=F.normalize(torch.randn(1, H, t, dk, generator=gen), dim=-1),
                v=torch.randn(1, H, t, dv, generator=gen))
    if op == "gated_delta_rule":
        args["g"] = F.logsigmoid(torch.randn(1, H, t, generator=gen)) / 4
    args["beta"] = torch.sigmoid(torch.randn(1, H, t, generator=gen))
    args["initial_state"] = torch.randn(3, H, dk, dv, generator=gen)
    args = {n: a.to(DEV) for n, a in args.items()}
    cu = torch.tensor([0, 7, 7, t], device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        leaves = {n: a.clone().requires_grad_() for n, a in args.items()}
        o, s = getattr(lin, op)(**leaves, cu_seqlens=cu, output_final_state=True, backend=backend, chunk_size=8)
        assert s.dtype == torch.float32 and s.shape == (3, H, dk, dv)
        (o.square().sum() + s.sum()).backward()
        res[backend] = [o.detach(), s.detach()] + [leaves[n].grad for n in leaves]
    for i, (a, b) in enumerate(zip(res["triton"], res["torch"])):
        check_close(f"{op}/{i}", a.cpu(), b.cpu().double())


def test_dispatch_rules(monkeypatch):
    q = torch.randn(1, 1, 5, 16, device=DEV)
    g = torch.zeros(1, 1, 5, device=DEV)
    beta = torch.full((1, 1, 5), 0.5, device=DEV)
    with pytest.raises(ValueError, match="backend must be"):
        lin.gated_delta_rule(q, q, q, g, beta, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        lin.delta_rule(q, q, q, beta, backend="gpu")
    with pytest.raises(ValueError, match="backend must be"):
        lin.kda(q, q, q, torch.zeros_like(q), beta, backend="fast")
    o, _ = lin.kda(q, q, q, torch.zeros_like(q), beta, backend="triton")  # kda has Triton kernels now
    assert o.shape == q.shape and not torch.isnan(o).any()
    with pytest.raises(ValueError, match="dtype"):
        lin.delta_rule(q.double(), q.double(), q.double(), beta, backend="triton")
    with pytest.raises(ValueError, match="mode='recurrent'"):
        lin.gated_delta_rule(q, q, q, g, beta, mode="recurrent", backend="triton")
    big = torch.randn(1, 1, 5, 160, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        lin.delta_rule(big, big, q, beta, backend="triton")
    calls = []
    real = td.delta_chunk
    monkeypatch.setattr(td, "delta_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "0")
    lin.gated_delta_rule(q, q, q, g, beta)
    assert calls == []
    lin.gated_delta_rule(q, q, q, g, beta, backend="triton")  # explicit backend ignores the env switch
    assert calls == [1]
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "1")
    lin.delta_rule(q, q, q, beta)
    assert calls == [1, 1]
    lin.delta_rule(q, q, q, beta, backend="torch")
    lin.delta_rule(big, big, q, beta)  # auto: head dims > 128 stay on PyTorch
    lin.gated_delta_rule(q, q, q, g, beta, mode="naive")
    lin.kda(q, q, q, torch.zeros_like(q), beta)  # auto: kda runs on its own kernels (triton_kda), not these
    assert calls == [1, 1]
    if DEV == "cpu":
        monkeypatch.delenv("ATTNZOO_LINEAR_TRITON")
        lin.gated_delta_rule(q, q, q, g, beta)  # auto on CPU without the opt-in: PyTorch
        assert calls == [1, 1]
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="CUDA"):
            lin.gated_delta_rule(q, q, q, g, beta, backend="triton")


@pytest.mark.parametrize("bad, match", [(dict(main="both"), "main must be"), (dict(inv="lu"), "inv must be"),
                                        (dict(prep="apart"), "prep must be"),
                                        (dict(BK_M=24), "BK_M must be a power of two")])
def test_config_errors_name_the_key(bad, match):
    """A config with an unknown kernel choice or a block that is not a power of two is refused before any launch."""
    x = make(19, 16, 16, "paper", seed=2)
    with pytest.raises(ValueError, match=match):
        run_kernels(x, False, 0.25, cfg=dict(DELTA_SMALL, BT=16, **bad))
