"""The Triton GLA kernels (attnzoo.linear.triton_gla, per-channel gates) against the float64 recurrence.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with chunks of 16
(one sub-chunk) by default; ``SUB`` uses chunks of 32 with two sub-chunks of 16, which exercises the
cross-sub-chunk (boundary-referenced) path. Outputs of the launchers are poisoned with NaN before the kernels
run, so an element a kernel fails to write fails the check. float32 with IEEE dots: relative error < 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import attnzoo.linear as lin  # noqa: E402
from attnzoo.linear import triton_gla as tg  # noqa: E402
from attnzoo.linear.naive import naive_gla  # noqa: E402
from linear_helpers import DEV, TRITON_MARKS  # noqa: E402
from attnzoo.testing import check_close  # noqa: E402
from tiers import tiered  # noqa: E402

pytestmark = TRITON_MARKS

B, H = 2, 2
# two sub-chunks per chunk and state tiles / Dv blocks smaller than the head dims
SUB = dict(BT=32, BC=16, BK_H=16, BV_H=16, BV_O=16, BV_B=16, warps_h=1, warps_o=1, warps_b=1, stages=1)




def make(t, dk, dv, gate, seed=0):
    """float32-representable float64 q, k, v, g (B, H, T, Dk), s0 and cotangents do, ds."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, H, t, dk), rnd(B, H, t, dk), rnd(B, H, t, dv)
    g = F.logsigmoid(rnd(B, H, t, dk))
    if gate == "paper":
        g = g / 16
    else:  # strong: about -5 per step on every third channel (e^-80 over a chunk of 16), mild elsewhere
        strong = (torch.arange(dk) % 3 == 0).to(torch.float64)
        g = strong * (-5.0 + 0.5 * torch.rand(B, H, t, dk, generator=gen, dtype=torch.float64)) + (1 - strong) * g
    x = dict(q=q, k=k, v=v, g=g, s0=rnd(B, H, dk, dv), do=rnd(B, H, t, dv), ds=rnd(B, H, dk, dv))
    return {n: a.float().double() for n, a in x.items()}


def reference(x, init, scale):
    """o, state and the gradients of <o, do> + <S_T, ds> by autograd through the float64 recurrence."""
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "g")]
    s0 = (x["s0"] if init else torch.zeros_like(x["s0"])).clone().requires_grad_()
    o, s = naive_gla(leaves[0] * scale, *leaves[1:], state=s0)
    grads = torch.autograd.grad((o * x["do"]).sum() + (s * x["ds"]).sum(), leaves + [s0])
    res = dict(o=o.detach(), state=s.detach())
    res.update(zip(("dq", "dk", "dv", "dg", "ds0"), grads))
    return res


def run_kernels(x, init, scale, cfg=None):
    f = lambda a: a.float().to(DEV)  # noqa: E731
    q, k, v, g, do = (f(x[n]) for n in ("q", "k", "v", "g", "do"))
    s0 = f(x["s0"]) if init else None
    o, st = tg.fwd(q, k, v, g, s0, scale, cfg=cfg, poison=True)
    dq, dk, dv, dg, ds0 = tg.bwd(do, f(x["ds"]), q, k, v, g, s0, scale, cfg=cfg, poison=True)
    return dict(o=o, state=st, dq=dq, dk=dk, dv=dv, dg=dg, ds0=ds0)


# (the `full` tier, tests/tiers.py: the initial state with the paper's gates and none with strong ones)
@pytest.mark.parametrize("init,gate", tiered([(False, "paper"), (True, "strong"), (False, "strong"), (True, "paper")],
                                             {"False-strong", "True-paper"}))
@pytest.mark.parametrize("dk,dv", [(32, 32), (16, 32)])
@pytest.mark.parametrize("t", [1, 19, 40])
def test_float32_matches_recurrence(t, dk, dv, init, gate):
    scale = dk ** -0.5
    x = make(t, dk, dv, gate, seed=t + dk)
    want = reference(x, init, scale)
    got = run_kernels(x, init, scale)
    for n, val in got.items():
        assert val.dtype == torch.float32
        assert torch.isfinite(val).all(), f"{n}: non-finite"
        check_close(f"T{t}/{dk}x{dv}/{gate}/init{init}/{n}", val.cpu(), want[n].float())
    if t == 1 and not init:  # no state before the first token: dg_0 = 0 exactly
        assert (got["dg"] == 0).all()


@pytest.mark.parametrize("init,gate", [(False, "paper"), (True, "strong")])
def test_subchunks(init, gate):
    """Chunks of 32 = two sub-chunks: the cross-sub-chunk factorisation, state tiles smaller than Dk x Dv."""
    t, dk, dv = 40, 32, 48
    x = make(t, dk, dv, gate, seed=5)
    want = reference(x, init, 0.3)
    for n, val in run_kernels(x, init, 0.3, cfg=SUB).items():
        assert torch.isfinite(val).all(), f"{n}: non-finite"
        check_close(f"sub/{gate}/init{init}/{n}", val.cpu(), want[n].float())


def test_gla_triton_autograd_strided_inputs():
    """The public function through the custom ops, on non-contiguous (transposed) q, k, v, g."""
    t, dk, dv = 19, 16, 32
    x = make(t, dk, dv, "paper", seed=3)
    want = reference(x, True, 0.25)
    tr = lambda a: a.float().transpose(1, 2).contiguous().transpose(1, 2).to(DEV).requires_grad_()  # noqa: E731
    q, k, v, g = (tr(x[n]) for n in ("q", "k", "v", "g"))
    s0 = x["s0"].float().to(DEV).requires_grad_()
    o, s = tg.gla_triton(q, k, v, g, scale=0.25, initial_state=s0, output_final_state=True)
    ((o * x["do"].float().to(DEV)).sum() + (s * x["ds"].float().to(DEV)).sum()).backward()
    check_close("o", o.detach().cpu(), want["o"].float())
    check_close("state", s.detach().cpu(), want["state"].float())
    for n, leaf in zip(("q", "k", "v", "g", "s0"), (q, k, v, g, s0)):
        check_close("d" + n, leaf.grad.cpu(), want["d" + n].float())


def test_custom_ops_opcheck():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, H, 20, 16, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(1, H, 20, 16, generator=gen)) / 4).to(DEV).requires_grad_()
    s0 = torch.randn(1, H, 16, 16, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(tg._fwd_op, (q, k, v, g, s0, 0.25, False))
    torch.library.opcheck(tg._fwd_op, (q, k, v, g, None, 0.25, True))
    do = torch.randn(1, H, 20, 16, generator=gen).to(DEV)
    x = [t.detach() for t in (q, k, v, g)]
    for keep_all in (False, True):
        kept = tg._fwd_op(*x, None, 0.25, keep_all)[2:]
        assert len(kept) == (3 if keep_all else 2)
        torch.library.opcheck(tg._bwd_op, (do, None, *x[:3], None, 0.25, kept))


def test_kept_forward_tensors_match_recomputation():
    """The backward from the forward's kept (gc, A) equals the backward that recomputes them."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, H, 37, 16, generator=gen).to(DEV) for _ in range(4))
    g = (F.logsigmoid(torch.randn(2, H, 37, 16, generator=gen)) / 4).to(DEV)
    o, ht, kept = tg.fwd(q, k, v, g, None, 0.25, keep=True)
    o2, ht2 = tg.fwd(q, k, v, g, None, 0.25)
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    with_kept = tg.bwd(do, None, q, k, v, None, None, 0.25, kept=kept)
    recomputed = tg.bwd(do, None, q, k, v, g, None, 0.25)
    o3, _, kept_all = tg.fwd(q, k, v, g, None, 0.25, keep="all")  # the chunk states too
    assert torch.equal(o, o3) and len(kept_all) == 3
    with_all = tg.bwd(do, None, q, k, v, None, None, 0.25, kept=kept_all)
    for x, y, z in zip(with_kept, recomputed, with_all):
        assert torch.equal(x, y) and torch.equal(x, z)
    cfg = dict(tg.config(16, 16, q.dtype, q.device), BT=32, BC=16)
    with pytest.raises(ValueError, match="chunk size"):
        tg.bwd(do, None, q, k, v, None, None, 0.25, cfg=cfg, kept=kept)


def test_empty_sequence():
    q = torch.randn(B, H, 0, 16, device=DEV)
    s0 = torch.randn(B, H, 16, 16, device=DEV)
    o, s = tg.gla_triton(q, q, q, q, initial_state=s0, output_final_state=True)
    assert o.shape == (B, H, 0, 16) and torch.equal(s, s0)


def test_gla_backend_matches_torch():
    """gla(backend="triton") against gla(backend="torch"): packed sequences with initial states, autograd."""
    gen = torch.Generator().manual_seed(7)
    t, dk, dv = 24, 16, 32
    args = dict(q=torch.randn(1, H, t, dk, generator=gen), k=torch.randn(1, H, t, dk, generator=gen),
                v=torch.randn(1, H, t, dv, generator=gen),
                g=F.logsigmoid(torch.randn(1, H, t, dk, generator=gen)) / 4,
                initial_state=torch.randn(3, H, dk, dv, generator=gen))
    args = {n: a.to(DEV) for n, a in args.items()}
    cu = torch.tensor([0, 7, 7, t], device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        leaves = {n: a.clone().requires_grad_() for n, a in args.items()}
        o, s = lin.gla(**leaves, cu_seqlens=cu, output_final_state=True, backend=backend, chunk_size=8)
        (o.square().sum() + s.sum()).backward()
        res[backend] = [o.detach(), s.detach()] + [leaves[n].grad for n in leaves]
    for i, (a, b) in enumerate(zip(res["triton"], res["torch"])):
        check_close(f"gla/{i}", a.cpu(), b.cpu().double())


def test_dispatch_rules(monkeypatch):
    q = torch.randn(1, 1, 5, 16, device=DEV)
    g = torch.zeros(1, 1, 5, 16, device=DEV)
    with pytest.raises(ValueError, match="backend must be"):
        lin.gla(q, q, q, g, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        lin.gla(q.double(), q.double(), q.double(), g, backend="triton")
    with pytest.raises(ValueError, match="mode='recurrent'"):
        lin.gla(q, q, q, g, mode="recurrent", backend="triton")
    big = torch.randn(1, 1, 5, 160, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        lin.gla(big, big, q, torch.zeros_like(big), backend="triton")
    calls = []
    real = tg.gla_chunk
    monkeypatch.setattr(tg, "gla_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "0")
    lin.gla(q, q, q, g)
    assert calls == []
    lin.gla(q, q, q, g, backend="triton")  # explicit backend ignores the env switch
    assert calls == [1]
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "1")
    lin.gla(q, q, q, g)
    assert calls == [1, 1]
    lin.gla(q, q, q, g, backend="torch")
    lin.gla(big, big, q, torch.zeros_like(big))  # auto: head dims > 128 stay on PyTorch
    lin.gla(q, q, q, g, mode="naive")
    assert calls == [1, 1]
    if DEV == "cpu":
        monkeypatch.delenv("ATTNZOO_LINEAR_TRITON")
        lin.gla(q, q, q, g)  # auto on CPU without the opt-in: PyTorch
        assert calls == [1, 1]
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="CUDA"):
            lin.gla(q, q, q, g, backend="triton")


SPLIT_INTRA = dict(SUB, BT=64, BC=16, intra="split", BK_I=16, warps_i=1)


@pytest.mark.parametrize("t,gate", tiered([(19, "strong"), (70, "paper")], {"70-paper"}))
def test_split_intra_backward_matches_recurrence(t, gate):
    """The two-kernel intra-chunk backward (dA once per chunk, Dk blocks of 16, four sub-chunks per chunk)
    against the float64 recurrence, and equal to the fused kernel up to float32 rounding."""
    dk, dv = 32, 32
    scale = dk ** -0.5
    x = make(t, dk, dv, gate, seed=t + 7)
    want = reference(x, True, scale)
    got = run_kernels(x, True, scale, cfg=SPLIT_INTRA)
    fused = run_kernels(x, True, scale, cfg=dict(SPLIT_INTRA, intra="fused"))
    for n, val in got.items():
        assert val.dtype == torch.float32
        check_close(f"T{t}/{gate}/{n}", val.cpu(), want[n].float())
        torch.testing.assert_close(val, fused[n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t,gate,dk", tiered([(19, "strong", 32), (70, "paper", 24)], {"70-paper-24"}))
def test_broadcast_diagonal_matches_recurrence(t, gate, dk):
    """``diag="bcast"``: the diagonal sub-chunk of the forward scores (BKD channels at a time) and of the split
    intra backward as one broadcast product instead of a loop over key steps; against the float64 recurrence
    and equal to the step loop up to float32 rounding (Dk 24: a padded channel block)."""
    dv = 16
    scale = dk ** -0.5
    x = make(t, dk, dv, gate, seed=t + 11)
    want = reference(x, True, scale)
    cfg = dict(SPLIT_INTRA, diag="bcast", BKD=16)
    got = run_kernels(x, True, scale, cfg=cfg)
    steps = run_kernels(x, True, scale, cfg=SPLIT_INTRA)
    for n, val in got.items():
        check_close(f"T{t}/{gate}/{n}", val.cpu(), want[n].float())
        torch.testing.assert_close(val, steps[n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t,gate,dk,dv,h0", tiered([(19, "strong", 32, 32, True), (40, "paper", 24, 48, False)],
                                                  {"40-paper-24-48-False"}))
def test_split_inter_backward_matches_recurrence(t, gate, dk, dv, h0):
    """``inter="split"``: dq / dk / dg per Dk block (``_bwd_dqkg``, blocks of 16) and dv in its own kernel
    (``_bwd_dv``), against the float64 recurrence and equal to the one-kernel ``_bwd_inter`` up to float32
    rounding (Dk 24, Dv 48: padded blocks; with and without an initial state, whose dg rule differs)."""
    scale = dk ** -0.5
    x = make(t, dk, dv, gate, seed=t + 13)
    want = reference(x, h0, scale)
    cfg = dict(SPLIT_INTRA, inter="split", BK_Q=16, BV_D=16, warps_q=1)
    got = run_kernels(x, h0, scale, cfg=cfg)
    one = run_kernels(x, h0, scale, cfg=SPLIT_INTRA)
    for n, val in got.items():
        check_close(f"T{t}/{gate}/{n}", val.cpu(), want[n].float())
        torch.testing.assert_close(val, one[n], rtol=1e-4, atol=1e-4)


def test_split_scores_match_recurrence():
    """``intra_f="split"``: the forward's scores by (BC, BC) tiles (KDA's score kernel without M), against the
    float64 recurrence and equal to ``_intra_a`` up to float32 rounding (T 70: a partial last chunk; Dk 24)."""
    t, dk, dv = 70, 24, 16
    scale = dk ** -0.5
    x = make(t, dk, dv, "paper", seed=17)
    want = reference(x, True, scale)
    got = run_kernels(x, True, scale, cfg=dict(SPLIT_INTRA, intra_f="split", warps_f=1))
    fused = run_kernels(x, True, scale, cfg=SPLIT_INTRA)
    for n, val in got.items():
        check_close(f"split scores/{n}", val.cpu(), want[n].float())
        torch.testing.assert_close(val, fused[n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t,gate,dk", tiered([(70, "paper", 24), (19, "strong", 32), (64, "strong", 32)],
                                             {"64-strong-32"}))
def test_diagonal_dots_match_recurrence(t, gate, dk):
    """``diag_lim`` / ``diag_lim_b``: the diagonal tiles of the split scores and of the split intra backward as
    dots where the sub-chunk's gates span at most the limit: "paper" gates (spans of ~1 nat: every tile by dots,
    so the results differ from the steps in the last bits), "strong" ones (every third channel ~-5 a step: full
    sub-chunks keep the steps, bit-identical at T 64; T 19 ends in a 3-step sub-chunk that takes the dots);
    against the float64 recurrence and the steps (Dk 24: a padded channel block)."""
    dv = 16
    scale = dk ** -0.5
    x = make(t, dk, dv, gate, seed=t + 19)
    want = reference(x, True, scale)
    steps_cfg = dict(SPLIT_INTRA, intra_f="split", warps_f=1)
    got = run_kernels(x, True, scale, cfg=dict(steps_cfg, diag_lim=tg.DIAG_LIM_MAX, diag_lim_b=tg.DIAG_LIM_MAX))
    steps = run_kernels(x, True, scale, cfg=steps_cfg)
    for n, val in got.items():
        check_close(f"dots T{t}/{gate}/{n}", val.cpu(), want[n].float())
        torch.testing.assert_close(val, steps[n], rtol=1e-4, atol=1e-4)
    differ = [n for n in got if not torch.equal(got[n], steps[n])]
    if gate == "paper":
        assert {"o", "dq", "dk"} & set(differ), "the dot paths never ran"
    elif t == 64:
        assert not differ, differ


def test_bad_intra_choice():
    q = torch.randn(1, 1, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="intra"):
        tg.bwd(q, None, q, q, q, q, None, 0.25, cfg=dict(SUB, intra="bogus"))
    with pytest.raises(ValueError, match="diag"):
        tg.fwd(q, q, q, q, None, 0.25, cfg=dict(SUB, diag="bogus"))
    with pytest.raises(ValueError, match="intra_f"):
        tg.fwd(q, q, q, q, None, 0.25, cfg=dict(SUB, intra_f="bogus"))
    with pytest.raises(ValueError, match="inter"):
        tg.bwd(q, None, q, q, q, q, None, 0.25, cfg=dict(SUB, inter="bogus"))
    with pytest.raises(ValueError, match="BK_Q"):
        tg.bwd(q, None, q, q, q, q, None, 0.25, cfg=dict(SUB, inter="split", BK_Q=24))
    with pytest.raises(ValueError, match="BKD"):
        tg.fwd(q, q, q, q, None, 0.25, cfg=dict(SUB, diag="bcast", BKD=12))
    for bad in (dict(SUB, intra_f="split", diag_lim=-1.0), dict(SUB, intra_f="split", diag_lim=61),
                dict(SUB, intra_f="split", diag_lim=True), dict(SUB, diag_lim=20),
                dict(SUB, diag_lim_b=20), dict(SUB, intra="split", diag="bcast", BKD=16, diag_lim_b=20)):
        with pytest.raises(ValueError, match="diag_lim"):
            tg.bwd(q, None, q, q, q, q, None, 0.25, cfg=bad)


@pytest.mark.parametrize("t,dk,bt", [(40, 24, 16), (64, 8, 32), (5, 130, 16)])
def test_chunk_cumsum_kernel_is_the_sequential_chunk_scan(t, dk, bt):
    """The Triton chunk cumsum equals the in-order float32 scan per chunk (zero gates past T), on a strided
    (transposed) g, and never increases inside a chunk for non-positive gates."""
    gen = torch.Generator().manual_seed(t + dk)
    g = F.logsigmoid(torch.randn(B, t, H, dk, generator=gen)).transpose(1, 2).to(DEV)   # (B, H, T, Dk), strided
    got = tg.chunk_cumsum(g, bt).cpu()
    nt = -(-t // bt)
    ref = F.pad(g.cpu().float(), (0, 0, 0, nt * bt - t)).reshape(B * H, nt, bt, dk).cumsum(2)
    assert got.shape == (B * H, nt * bt, dk)
    assert torch.allclose(got, ref.reshape(B * H, nt * bt, dk), rtol=1e-6, atol=1e-6)
    steps = got.reshape(B * H, nt, bt, dk).diff(dim=2)
    assert bool((steps <= 0).all())
