"""The Triton KDA kernels (attnzoo.linear.triton_kda: the delta rule with per-channel gates) against the float64
recurrence of attnzoo.linear.naive.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Chunks of 16 by default
(one sub-chunk: only the exact diagonal path of the gate-weighted products); ``SUB32`` / ``SUB64`` use chunks of
32 / 64 (two / four sub-chunks: the referenced off-diagonal products and the blocked triangular inverse) with Dv
blocks of 16. Outputs of the launchers are poisoned with NaN. float32 (IEEE dots): relative error < 1e-4 for the
output, the final state and every gradient. float16: the protocol's low-precision rule against the recurrence
evaluated in float16 arithmetic.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import attnzoo.linear as lin  # noqa: E402
from attnzoo.linear import triton_kda as tk  # noqa: E402
from attnzoo.linear.naive import naive_kda  # noqa: E402
from linear_helpers import DELTA_NAMES, DELTA_SMALL, DELTA_SUB32, DELTA_SUB64, DEV, TRITON_MARKS  # noqa: E402
from attnzoo.testing import check_close, max_err, rel_rmse  # noqa: E402
from tiers import tiered  # noqa: E402

pytestmark = TRITON_MARKS

B, H = 1, 2
_SMALL, SUB32, SUB64, NAMES = DELTA_SMALL, DELTA_SUB32, DELTA_SUB64, DELTA_NAMES




def make(t, dk, dv, gate, seed=0):
    """float32-representable float64 inputs: L2-normalised keys, beta = sigmoid, g (B, H, T, Dk): "mild"
    (logsigmoid / 4), "strong" (uniform in [-5, 0] per step and channel), "extreme" (about -5 everywhere:
    e^-320 over a chunk of 64); s0 and the cotangents do, ds."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    uni = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=rnd(B, H, t, dk), k=F.normalize(rnd(B, H, t, dk), dim=-1), v=rnd(B, H, t, dv),
             beta=torch.sigmoid(rnd(B, H, t)), s0=rnd(B, H, dk, dv), do=rnd(B, H, t, dv), ds=rnd(B, H, dk, dv))
    x["g"] = {"mild": lambda: F.logsigmoid(rnd(B, H, t, dk)) / 4, "strong": lambda: -5 * uni(B, H, t, dk),
              "extreme": lambda: -5 + 0.5 * uni(B, H, t, dk)}[gate]()
    return {n: a.float().double() for n, a in x.items()}


def reference(x, init, scale, dtype=torch.float64):
    leaves = {n: x[n].to(dtype).clone().requires_grad_() for n in NAMES}
    if not init:
        leaves["s0"] = torch.zeros_like(leaves["s0"]).requires_grad_()
    q, k, v, g, beta, s0 = (leaves[n] for n in NAMES)
    o, s = naive_kda(q * scale, k, v, g, beta, state=s0)
    loss = (o * x["do"].to(dtype)).sum() + (s * x["ds"].to(dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res = {"o": o.detach(), "state": s.detach()}
    res.update({"d" + n: gr for n, gr in zip(NAMES, grads)})
    return res


def run_kernels(x, init, scale, dtype=torch.float32, cfg=None):
    c = lambda n, dt=dtype: x[n].to(dt).to(DEV)  # noqa: E731
    q, k, v, do = c("q"), c("k"), c("v"), c("do")
    g, beta = c("g", torch.float32), c("beta", torch.float32)
    s0 = c("s0", torch.float32) if init else None
    o, st = tk.fwd(q, k, v, g, beta, s0, scale, cfg=cfg, poison=True)
    dq, dk, dv, dg, dbeta, ds0 = tk.bwd(do, c("ds", torch.float32), q, k, v, g, beta, s0, scale, cfg=cfg,
                                        poison=True)
    return dict(o=o, state=st, dq=dq, dk=dk, dv=dv, dg=dg, dbeta=dbeta, ds0=ds0)


CASES = [  # t, dk, dv, init, gate, cfg
    (1, 16, 16, True, "mild", None),  # (without an initial state the true dg is 0 at T = 1: no relative error)
    (19, 32, 32, True, "strong", None),
    (40, 32, 48, True, "strong", SUB32),
    (70, 48, 32, False, "mild", SUB64),
    (100, 32, 16, True, "extreme", SUB64),
    (70, 48, 32, True, "strong", dict(SUB64, intra="split", warps_i=1)),  # the tiled score kernel
    (40, 32, 48, False, "extreme", dict(SUB32, intra="split", warps_i=1)),
    # the diagonal tile as broadcast products, 16 channels at a time (Dk 48: three of them)
    (70, 48, 32, True, "strong", dict(SUB64, intra="split", warps_i=1, diag="bcast", BKD=16)),
    # the intra backward by (BC, BC) tiles per 16-channel block (Dk 48: three blocks; Dk 32 and T 40: a
    # partial last chunk)
    (70, 48, 32, True, "strong", dict(SUB64, intra="split", warps_i=1, intra_b="split", BK_I=16, warps_ib=1)),
    (40, 32, 48, False, "extreme", dict(SUB32, intra_b="split", BK_I=16, warps_ib=1)),
    # the main backward in two kernels, Dk blocks of 16 (Dk 48: three shares of dA and dbeta)
    (70, 48, 32, True, "strong", dict(SUB64, main="split", BK_M=16, BV_M=16, warps_mk=1, warps_mv=1)),
    # the main backward in three passes over Dv (main="seq"): Dv 48 in three 16-wide blocks
    (70, 32, 48, True, "strong", dict(SUB64, main="seq", BV_B=16)),
    (40, 48, 16, False, "extreme", dict(SUB32, main="seq")),
    # T by block doubling (inv="dbl"): chunks of 32 and 64
    (70, 48, 32, True, "strong", dict(SUB64, inv="dbl")),
    (40, 32, 48, True, "extreme", dict(SUB32, inv="dbl")),
    # T alone, then W and U0 by triton_delta._wu (VEC: per-channel gates) in 16-wide column blocks
    (70, 48, 32, True, "strong", dict(SUB64, prep="split", BN_WU=16, warps_wu=1)),
    # the forward scores per chunk over 16-channel blocks (Dk 48: three; 32: two), with either intra backward
    (70, 48, 32, True, "strong", dict(SUB64, intra="chunk", BK_F=16, warps_i=1)),
    (40, 32, 48, False, "extreme", dict(SUB32, intra="chunk", BK_F=16, warps_i=1, intra_b="chunk", BK_I=16,
                                        warps_ib=1)),
    # the intra backward per chunk and 16-channel block, every sub-chunk at once (Dk 48: three blocks; T 70 and
    # 40: partial last chunks; chunks of 64 and 32, i.e. four and two sub-chunks)
    (70, 48, 32, True, "strong", dict(SUB64, intra_b="chunk", BK_I=16, warps_ib=1)),
    (70, 48, 32, False, "strong", dict(SUB64, intra_b="chunk", BK_I=32, warps_ib=2)),  # a partial channel block
    (40, 32, 48, False, "extreme", dict(SUB32, intra_b="chunk", BK_I=32, warps_ib=1)),
    (100, 32, 16, True, "extreme", dict(SUB64, intra="split", warps_i=1, intra_b="chunk", BK_I=16, warps_ib=1)),
    # the diagonal tiles' step loops unrolled (forward scores and intra backward; T 70: a partial last chunk)
    (70, 48, 32, True, "strong", dict(SUB64, intra="split", warps_i=1, unroll_i=4, intra_b="split", BK_I=16,
                                      warps_ib=1, unroll_ib=2)),
    (40, 32, 48, False, "extreme", dict(SUB32, intra="split", unroll_i=16, intra_b="split", BK_I=32,
                                        unroll_ib=16)),
    # the diagonal tiles as dots where the sub-chunk's gates span at most diag_lim nats: mild gates (every tile
    # by dots), strong gates (spans of about 20-60 over 16 steps: some tiles by dots with factors up to e^40, the
    # rest by steps), extreme gates (spans of about 80: every tile by steps); T 70 / 40: partial last chunks
    (70, 48, 32, True, "mild", dict(SUB64, intra="split", warps_i=1, diag_lim=20, intra_b="split", BK_I=16,
                                    warps_ib=1, diag_lim_b=20)),
    (70, 48, 32, False, "strong", dict(SUB64, intra="split", warps_i=1, diag_lim=40, unroll_i=2, intra_b="split",
                                       BK_I=32, warps_ib=1, diag_lim_b=40)),
    (40, 32, 48, True, "extreme", dict(SUB32, intra="split", diag_lim=60, intra_b="split", BK_I=16,
                                       diag_lim_b=60)),
    # dg written by the intra backward (cfg rc: one program per chunk, or one launch per sub-chunk): partial last
    # chunks, with and without dots
    (70, 48, 32, True, "strong", dict(SUB64, intra_b="split", BK_I=32, warps_ib=1, rc="loop")),
    (40, 32, 48, False, "mild", dict(SUB32, intra="split", diag_lim=20, intra_b="split", BK_I=16, diag_lim_b=20,
                                     rc="launches")),
    # the gate cumsum formed by _gate_rows with the gate factors (cfg gc="rows", needs pre): Dk 48 (a partial
    # 64-channel block), T 70 / 40 (partial last chunks)
    (70, 48, 32, True, "strong", dict(SUB64, pre=True, gc="rows")),
    (40, 32, 48, False, "extreme", dict(SUB32, pre=True, gc="rows", intra_b="split", BK_I=16, rc="launches")),
]


CASE_IDS = [f"T{c[0]}-{c[1]}x{c[2]}-init{int(c[3])}-{c[4]}-BT{(c[5] or {}).get('BT', 16)}"
             f"{'-' + (c[5] or {}).get('intra', '') if (c[5] or {}).get('intra') else ''}"
             f"{'-bcast' if (c[5] or {}).get('diag') == 'bcast' else ''}"
             f"{'-ib' + (c[5] or {}).get('intra_b', '') if (c[5] or {}).get('intra_b') else ''}"
             f"{'-main' + (c[5] or {}).get('main', '') if (c[5] or {}).get('main') else ''}"
             f"{'-dbl' if (c[5] or {}).get('inv') == 'dbl' else ''}"
             f"{'-prepsplit' if (c[5] or {}).get('prep') == 'split' else ''}"
             f"{'-unroll' if (c[5] or {}).get('unroll_ib') else ''}"
             f"{'-dot' if (c[5] or {}).get('diag_lim') else ''}"
             f"{'-rc' if (c[5] or {}).get('rc') else ''}"
             f"{'-gcrows' if (c[5] or {}).get('gc') else ''}" for c in CASES]
# the `full` tier (tests/tiers.py): T 70 / 100 twins of options that a T 40 case covers as well
FULL_CASES = {"T100-32x16-init1-extreme-BT64", "T70-48x32-init1-strong-BT64-split-ibsplit",
              "T70-48x32-init1-strong-BT64-ibchunk", "T70-32x48-init1-strong-BT64-mainseq",
              "T70-48x32-init1-strong-BT64-dbl", "T70-48x32-init1-strong-BT64-chunk",
              "T100-32x16-init1-extreme-BT64-split-ibchunk", "T70-48x32-init1-strong-BT64-split-ibsplit-unroll",
              "T70-48x32-init1-mild-BT64-split-ibsplit-dot", "T70-48x32-init0-strong-BT64-split-ibsplit-dot",
              "T70-48x32-init1-strong-BT64-ibsplit-rc", "T70-48x32-init1-strong-BT64-gcrows",
              "T70-48x32-init1-strong-BT64-split"}


@pytest.mark.parametrize("t,dk,dv,init,gate,cfg", tiered(CASES, FULL_CASES, CASE_IDS))
def test_float32_matches_recurrence(t, dk, dv, init, gate, cfg):
    x = make(t, dk, dv, gate, seed=t + dk)
    scale = dk ** -0.5
    want = reference(x, init, scale)
    got = run_kernels(x, init, scale, cfg=cfg)
    for n, val in got.items():
        assert val.dtype == torch.float32
        check_close(f"T{t}/{dk}x{dv}/{gate}/init{init}/{n}", val.cpu(), want[n].float())


F16_CASES = [(True, "fused", "fused"), (False, "fused", "fused"),
             (False, "chunk", "fused"), (True, "chunk", "fused"),
             (False, "split", "split"), (False, "fused", "seq"),
             (True, "fused", "seq"), (False, "split", "fused+dul"),
             (True, "fused", "fused+dul"), (False, "split", "fused+da16"),
             (False, "split", "fused+dul+da16"), (False, "split", "split+da16"),
             (False, "split", "fused+rc"), (True, "split", "fused+da16+rc"),
             (False, "split", "fused+rcloop"), (False, "split", "fused+p16"),
             (False, "fused", "seq+p16"), (False, "split", "split+p16"),
             (False, "split", "fused+p16+da16+rc+gcrows+dul+a16"),
             (False, "split", "fused+rc+gcrows")]
F16_IDS = [f"{'split' if c[0] else 'nosplit'}-{c[1]}-{c[2]}" for c in F16_CASES]
# the `full` tier (tests/tiers.py): combinations whose options the other cases take one at a time
F16_FULL = {"nosplit-fused-fused", "split-chunk-fused", "split-fused-seq", "split-fused-fused+dul",
            "nosplit-split-fused+dul+da16", "nosplit-split-split+da16", "nosplit-split-fused+rc",
            "split-split-fused+da16+rc", "nosplit-split-split+p16"}


@pytest.mark.parametrize("split,intra_b,main", tiered(F16_CASES, F16_FULL, F16_IDS))
def test_float16_protocol_rule(split, intra_b, main):
    """16-bit operands, chunks of 32, strong gates; with and without the hi/lo split of the float32 dot
    operands (the GPU default is without); the intra backward in one program per sub-chunk, per sub-chunk and
    16-channel block (split) or per chunk and 16-channel block (chunk, with the forward scores per chunk too);
    the main backward fused, split (with prep="split": W, U0 by _wu) or in three passes (seq); "+dul": dP formed
    by _bwd_dul (cfg dp="dul") instead of the main backward; "+da16": dA and dP stored in 16 bits (cfg da16);
    "+p16": the main backward's shares of dq, dk stored in 16 bits (cfg p16); "+a16": P in 16 bits (cfg a16);
    "+rc" / "+rcloop": dg written by the intra backward (cfg rc "launches" / "loop"); "+gcrows": the gate cumsum by _gate_rows (cfg gc="rows")."""
    main, *flags = main.split("+")
    t, dk, dv = 40, 32, 32
    x = make(t, dk, dv, "strong", seed=11)
    for n in ("q", "k", "v", "do"):  # what the kernels see
        x[n] = x[n].half().double()
    scale = dk ** -0.5
    want = reference(x, True, scale)
    base = reference(x, True, scale, dtype=torch.float16)
    got = run_kernels(x, True, scale, dtype=torch.float16,
                      cfg=dict(SUB32, split=split, intra_b=intra_b, BK_I=16, warps_ib=1, main=main, BK_M=16,
                               # the chunk intra backward with the chunk forward scores
                               intra="chunk" if intra_b == "chunk" else "fused", BK_F=16, warps_i=1,
                               BV_M=16, warps_mk=1, warps_mv=1, prep="split" if main == "split" else "fused", BN_WU=16,
                               warps_wu=1, dp="dul" if "dul" in flags else "main", BV_O=16,
                               da16="da16" in flags, p16="p16" in flags, a16="a16" in flags,
                               rc="loop" if "rcloop" in flags else "launches" if "rc" in flags else False,
                               **(dict(pre=True, gc="rows") if "gcrows" in flags else {})))
    for n, val in got.items():
        val = val.cpu()
        assert not torch.isnan(val).any(), f"{n}: NaN"
        err, bound, rr = max_err(val, want[n]), 2 * max_err(base[n], want[n]) + 1e-5, rel_rmse(val, want[n])
        assert err <= bound and rr < 5e-3, f"{n}: max err {err:.3g} (bound {bound:.3g}), rel RMSE {rr:.3g}"


@pytest.mark.parametrize("dtype,split", tiered([(torch.float32, False), (torch.float16, True), (torch.float16, False)],
                                               {"f16-split"}, ["f32", "f16-split", "f16"]))
def test_pregated_rows_match_in_kernel_gates(dtype, split):
    """cfg pre=True (the state kernels read k * exp(b_L - b) and scale * q * exp(b) from _gate_rows) gives the
    same bits as pre=False (each state kernel program computes the factors itself)."""
    x = make(40, 32, 32, "strong", seed=5)
    cfg = dict(SUB32, split=split, BV_H=16)
    got = [run_kernels(x, True, 32 ** -0.5, dtype=dtype, cfg=dict(cfg, pre=pre)) for pre in (True, False)]
    for n in got[0]:
        assert torch.equal(got[0][n], got[1][n]), n


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "loop"), (torch.float16, "launches")])
def test_intra_dg_matches_separate_cumsum(dtype, mode):
    """cfg rc (the intra backward writes dg itself: one program per chunk, or one launch per sub-chunk with
    the column sums carried between launches) gives the same bits as the separate reverse cumsum for
    everything but dg, and dg within float32 rounding of a different summation order (T 40 with chunks of 32:
    a partial last chunk, whose padded rows count too)."""
    x = make(40, 48, 32, "strong", seed=9)
    cfg = dict(SUB32, intra_b="split", BK_I=32, warps_ib=1)
    got = [run_kernels(x, True, 48 ** -0.5, dtype=dtype, cfg=dict(cfg, rc=rc)) for rc in (mode, False)]
    for n in got[0]:
        if n == "dg":
            torch.testing.assert_close(got[0][n], got[1][n], rtol=1e-5, atol=1e-5 * got[1][n].abs().max().item())
        else:
            assert torch.equal(got[0][n], got[1][n]), n


@pytest.mark.parametrize("dtype,split", [(torch.float32, False), (torch.float16, True), (torch.float16, False)])
def test_gate_rows_form_the_cumsum(dtype, split):
    """_gated_rows with the log gates (cfg gc="rows"): the chunk cumsum within float32 rounding of
    chunk_cumsum's (another summation order; rows past T continue the last sum), and the gate factors it forms
    from it the same bits as _gated_rows reading that cumsum back; a strided g (a view) reads right."""
    x = make(70, 48, 32, "strong", seed=4)
    k, q = (x[n].to(dtype).to(DEV) for n in ("k", "q"))
    g = torch.cat([x["g"], x["g"]], dim=-1).float().to(DEV)[..., :48]  # a view: stride 96 along T
    gc, (ke, qe) = tk._gated_rows(k, q, None, 0.3, 32, split, True, g=g)
    want = tk.chunk_cumsum(g, 32)
    torch.testing.assert_close(gc, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    ke2, qe2 = tk._gated_rows(k, q, gc, 0.3, 32, split, True)
    assert torch.equal(ke, ke2) and torch.equal(qe, qe2)


def test_p16_rounds_only_the_shares_of_dq_dk():
    """cfg p16 (DQP, DKP stored in the 16-bit input dtype): dv, dg, dbeta, ds0 and the forward the same bits as
    without; dq, dk within a few 16-bit roundings of them."""
    x = make(40, 48, 32, "strong", seed=12)
    cfg = dict(SUB32, intra_b="split", BK_I=32, warps_ib=1, split=False)
    got = [run_kernels(x, True, 48 ** -0.5, dtype=torch.float16, cfg=dict(cfg, p16=p)) for p in (True, False)]
    for n in got[0]:
        if n in ("dq", "dk"):
            ref = got[1][n].float()
            torch.testing.assert_close(got[0][n].float(), ref, rtol=4e-3, atol=4e-3 * ref.abs().max().item())
        else:
            assert torch.equal(got[0][n], got[1][n]), n


def test_custom_ops_opcheck():
    gen = torch.Generator().manual_seed(2)
    t = 10  # one chunk: the interpreter runs the ops many times here
    q, k, v = (torch.randn(1, 1, t, 16, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(1, 1, t, 16, generator=gen)) / 4).to(DEV).requires_grad_()
    beta = torch.rand(1, 1, t, generator=gen).to(DEV).requires_grad_()
    s0 = torch.randn(1, 1, 16, 16, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(tk._fwd_op, (q, k, v, g, beta, s0, 0.25, False))
    torch.library.opcheck(tk._fwd_op, (q, k, v, g, beta, s0, 0.25, True))
    do = torch.randn(1, 1, t, 16, generator=gen).to(DEV)
    q, k, v, g, beta = (x.detach() for x in (q, k, v, g, beta))
    for keep_all in (False, True):
        kept = tk._fwd_op(q, k, v, g, beta, None, 0.25, keep_all)[2:]
        assert len(kept) == (8 if keep_all else 3)
        torch.library.opcheck(tk._bwd_op, (do, None, q, k, v, beta, None, 0.25, kept))


def test_custom_ops_opcheck_with_kept_gate_factors(monkeypatch):
    # cfg pre (the 16-bit GPU default): the forward keeps KE and QE too; the fake implementation must say so
    orig = tk.config
    monkeypatch.setattr(tk, "config", lambda *a: dict(orig(*a), pre=True))
    gen = torch.Generator().manual_seed(4)
    t = 10
    q, k, v = (torch.randn(1, 1, t, 16, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(1, 1, t, 16, generator=gen)) / 4).to(DEV).requires_grad_()
    beta = torch.rand(1, 1, t, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(tk._fwd_op, (q, k, v, g, beta, None, 0.25, True))
    kept = tk._fwd_op(*(x.detach() for x in (q, k, v, g, beta)), None, 0.25, True)[2:]
    assert len(kept) == 10
    o, _ = tk.kda_triton(q, k, v, g, beta, scale=0.25)
    o.square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v, g, beta))


def test_custom_ops_opcheck_with_every_opt_in(monkeypatch):
    # float16 with every opt-in storage change (P and dP / dA in 16 bits, 16-bit shares of dq / dk, dg from the
    # intra backward, the gate cumsum from _gate_rows): the fake implementation gives P's 16-bit dtype
    orig = tk.config
    monkeypatch.setattr(tk, "config", lambda *a: dict(orig(*a), pre=True, split=False, a16=True, da16=True, p16=True,
                                                      intra_b="split", BK_I=16, rc="launches", gc="rows"))
    gen = torch.Generator().manual_seed(6)
    t = 10
    q, k, v = (torch.randn(1, 1, t, 16, generator=gen).half().to(DEV).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(1, 1, t, 16, generator=gen)) / 4).to(DEV).requires_grad_()
    beta = torch.rand(1, 1, t, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(tk._fwd_op, (q, k, v, g, beta, None, 0.25, True))
    kept = tk._fwd_op(*(x.detach() for x in (q, k, v, g, beta)), None, 0.25, True)[2:]
    assert kept[1].dtype == torch.float16 and kept[2].dtype == torch.float32  # P in 16 bits, M float32
    o, _ = tk.kda_triton(q, k, v, g, beta, scale=0.25)
    o.float().square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v, g, beta))


@pytest.mark.parametrize("split,intra", tiered([(False, "split"), (False, "chunk"), (False, "fused"), (True, "split")],
                                               {"False-fused", "True-split"}))
def test_a16_gives_the_same_bits(split, intra):
    """cfg a16 (P stored in the 16-bit input dtype, split=False): every output the same bits as with P in float32,
    its readers rounding it to that dtype anyway, whichever kernel forms P; under the hi/lo split P stays float32."""
    x = make(40, 32, 32, "strong", seed=13)
    cfg = dict(SUB32, intra=intra, warps_i=1, BK_F=16, split=split)
    got = [run_kernels(x, True, 32 ** -0.5, dtype=torch.float16, cfg=dict(cfg, a16=a)) for a in (True, False)]
    for n in got[0]:
        assert torch.equal(got[0][n], got[1][n]), n


def test_kept_forward_tensors_match_recomputation():
    """The backward from the forward's kept (gc, P, M) equals the backward that recomputes them."""
    gen = torch.Generator().manual_seed(3)
    t = 21
    q, v, do = (torch.randn(1, 2, t, 16, generator=gen).to(DEV) for _ in range(3))
    k = F.normalize(torch.randn(1, 2, t, 16, generator=gen), dim=-1).to(DEV)
    g = (F.logsigmoid(torch.randn(1, 2, t, 16, generator=gen)) / 4).to(DEV)
    beta = torch.rand(1, 2, t, generator=gen).to(DEV)
    o, ht, kept = tk.fwd(q, k, v, g, beta, None, 0.25, keep=True)
    o2, ht2 = tk.fwd(q, k, v, g, beta, None, 0.25)
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    with_kept = tk.bwd(do, None, q, k, v, None, beta, None, 0.25, kept=kept)
    recomputed = tk.bwd(do, None, q, k, v, g, beta, None, 0.25)
    o3, ht3, kept_all = tk.fwd(q, k, v, g, beta, None, 0.25, keep="all")
    assert torch.equal(o, o3) and torch.equal(ht, ht3) and len(kept_all) == 8
    with_all = tk.bwd(do, None, q, k, v, None, beta, None, 0.25, kept=kept_all)
    for x, y, z in zip(with_kept, recomputed, with_all):
        assert torch.equal(x, y) and torch.equal(x, z)
    # with the state kernels' gate factors from one pass (cfg pre, the 16-bit GPU default) the forward keeps them
    # too (ten tensors) and the backward reads them instead of forming them again
    pre = dict(tk.config(16, 16, q.dtype, q.device), pre=True)
    o4, ht4, kept_pre = tk.fwd(q, k, v, g, beta, None, 0.25, cfg=pre, keep="all")
    assert torch.equal(o, o4) and torch.equal(ht, ht4) and len(kept_pre) == 10
    with_rows = tk.bwd(do, None, q, k, v, None, beta, None, 0.25, cfg=pre, kept=kept_pre)
    for x, y in zip(with_rows, tk.bwd(do, None, q, k, v, g, beta, None, 0.25, cfg=pre)):
        assert torch.equal(x, y)
    for x, y in zip(with_rows, recomputed):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="gate factors"):
        tk.bwd(do, None, q, k, v, None, beta, None, 0.25, kept=kept_pre)  # cfg without pre
    cfg = dict(tk.config(16, 16, q.dtype, q.device), BT=32)
    with pytest.raises(ValueError, match="chunk size"):
        tk.bwd(do, None, q, k, v, None, beta, None, 0.25, cfg=cfg, kept=kept)


def test_empty_sequence():
    q = torch.randn(B, H, 0, 16, device=DEV)
    beta = torch.rand(B, H, 0, device=DEV)
    s0 = torch.randn(B, H, 16, 16, device=DEV)
    o, s = tk.kda_triton(q, q, q, q, beta, initial_state=s0, output_final_state=True)
    assert o.shape == (B, H, 0, 16) and torch.equal(s, s0)


def test_backend_matches_torch():
    """kda(backend="triton") against kda(backend="torch"): packed sequences (one empty) with initial states,
    non-contiguous q, autograd through the public op including the final state."""
    gen = torch.Generator().manual_seed(7)
    t, dk, dv = 24, 16, 32
    args = dict(q=torch.randn(1, t, H, dk, generator=gen).transpose(1, 2),
                k=F.normalize(torch.randn(1, H, t, dk, generator=gen), dim=-1), v=torch.randn(1, H, t, dv, generator=gen),
                g=F.logsigmoid(torch.randn(1, H, t, dk, generator=gen)) / 4,
                beta=torch.sigmoid(torch.randn(1, H, t, generator=gen)),
                initial_state=torch.randn(3, H, dk, dv, generator=gen))
    args = {n: a.to(DEV) for n, a in args.items()}
    cu = torch.tensor([0, 7, 7, t], device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        leaves = {n: a.clone().requires_grad_() for n, a in args.items()}
        o, s = lin.kda(**leaves, cu_seqlens=cu, output_final_state=True, backend=backend, chunk_size=8)
        assert s.dtype == torch.float32 and s.shape == (3, H, dk, dv)
        (o.square().sum() + s.sum()).backward()
        res[backend] = [o.detach(), s.detach()] + [leaves[n].grad for n in leaves]
    for i, (a, b) in enumerate(zip(res["triton"], res["torch"])):
        check_close(f"kda/{i}", a.cpu(), b.cpu().double())


def test_dispatch_rules(monkeypatch):
    q = torch.randn(1, 1, 5, 16, device=DEV)
    g = -torch.rand(1, 1, 5, 16, device=DEV)
    beta = torch.full((1, 1, 5), 0.5, device=DEV)
    calls = []
    real = tk.kda_chunk
    monkeypatch.setattr(tk, "kda_chunk", lambda *a: calls.append(1) or real(*a))
    with pytest.raises(ValueError, match="dtype"):
        lin.kda(q.double(), q.double(), q.double(), g, beta, backend="triton")
    big = torch.randn(1, 1, 5, 160, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        lin.kda(big, big, q, -big.abs(), beta, backend="triton")
    with pytest.raises(ValueError, match="mode='recurrent'"):
        lin.kda(q, q, q, g, beta, mode="recurrent", backend="triton")
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "0")
    lin.kda(q, q, q, g, beta)
    assert calls == []
    lin.kda(q, q, q, g, beta, backend="triton")  # explicit backend ignores the env switch
    assert calls == [1]
    monkeypatch.setenv("ATTNZOO_LINEAR_TRITON", "1")
    lin.kda(q, q, q, g, beta)  # auto: Triton (forward and backward are complete)
    assert calls == [1, 1]
    lin.kda(q, q, q, g, beta, backend="torch")
    lin.kda(big, big, q, -big.abs(), beta)  # auto: head dims > 128 stay on PyTorch
    lin.kda(q, q, q, g, beta, mode="naive")
    assert calls == [1, 1]
    if DEV == "cpu":
        monkeypatch.delenv("ATTNZOO_LINEAR_TRITON")
        lin.kda(q, q, q, g, beta)  # auto on CPU without the opt-in: PyTorch
        assert calls == [1, 1]


def test_split_intra_equals_fused():
    """intra="split" and intra="chunk" write the same score blocks as the fused kernel (up to float32
    rounding)."""
    gen = torch.Generator().manual_seed(9)
    t = 70
    q, v = (torch.randn(1, 2, t, 32, generator=gen).to(DEV) for _ in range(2))
    k = F.normalize(torch.randn(1, 2, t, 32, generator=gen), dim=-1).to(DEV)
    g = (F.logsigmoid(torch.randn(1, 2, t, 32, generator=gen)) / 4).to(DEV)
    beta = torch.rand(1, 2, t, generator=gen).to(DEV)
    a = tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, intra="split", warps_i=1), keep=True)[2]
    b = tk.fwd(q, k, v, g, beta, None, 0.25, cfg=SUB64, keep=True)[2]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    c = tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, intra="split", warps_i=1, diag="bcast", BKD=16),
               keep=True)[2]
    for x, y in zip(c, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="intra"):
        tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, intra="tiles"))
    with pytest.raises(ValueError, match="bcast"):
        tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, diag="bcast", BKD=16))  # needs intra="split"
    e = tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, intra="chunk", BK_F=16, warps_i=1), keep=True)[2]
    for x, y in zip(e, b):  # per chunk over channel blocks: the same scores up to float32 rounding
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    d = tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, intra="split", warps_i=1, unroll_i=8), keep=True)[2]
    for x, y in zip(d, b):  # the unrolled diagonal loop: the same sums in the same order
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for u in (3, 32, 0):
        with pytest.raises(ValueError, match="unroll_i"):
            tk.fwd(q, k, v, g, beta, None, 0.25, cfg=dict(SUB64, intra="split", unroll_i=u))


@pytest.mark.full  # (a cross-check: both forms meet the float64 recurrence in test_float32_matches_recurrence)
def test_chunk_intra_backward_equals_split():
    """intra_b="chunk" (one program per chunk and channel block) gives the gradients of intra_b="split" up to
    float32 rounding (the same sums, grouped at other reference rows), strong gates, a partial last chunk."""
    x = make(70, 32, 16, "extreme", seed=21)
    grads = {}
    for ib in ("split", "chunk"):
        got = run_kernels(x, True, 32 ** -0.5, cfg=dict(SUB64, intra_b=ib, BK_I=16, warps_ib=1))
        grads[ib] = got
    for n in grads["split"]:
        torch.testing.assert_close(grads["chunk"][n], grads["split"][n], rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="intra_b must be"):
        run_kernels(x, True, 32 ** -0.5, cfg=dict(SUB64, intra_b="tiles"))



def test_diagonal_dots_engage_by_gate_span():
    """diag_lim / diag_lim_b: with mild gates (spans of a few nats) the diagonal tiles run as dots (results differ
    from the steps in the last float32 bits, and agree to rounding); with extreme gates (spans of ~80 nats > 60)
    every full sub-chunk keeps the exact steps (bit-identical); bad limits raise."""
    dot = dict(SUB64, intra="split", warps_i=1, intra_b="split", BK_I=16, warps_ib=1)
    # extreme gates at T 64: T 70 would end in a 6-step sub-chunk, whose span of ~25 nats takes the dots
    for gate, same, t in (("mild", False, 70), ("extreme", True, 64)):
        x = make(t, 32, 16, gate, seed=23)
        steps = run_kernels(x, True, 32 ** -0.5, cfg=dot)
        dots = run_kernels(x, True, 32 ** -0.5, cfg=dict(dot, diag_lim=tk.DIAG_LIM_MAX, diag_lim_b=tk.DIAG_LIM_MAX))
        for n in steps:
            if same:
                assert torch.equal(dots[n], steps[n]), n
            else:
                torch.testing.assert_close(dots[n], steps[n], rtol=1e-4, atol=1e-5, msg=n)
        if not same:
            assert any(not torch.equal(dots[n], steps[n]) for n in ("o", "dq", "dk")), "the dot path never ran"
    for bad in (dict(dot, diag_lim=-1), dict(dot, diag_lim=61), dict(dot, diag_lim_b=True),
                dict(dot, diag_lim="20"), dict(SUB64, diag_lim=20), dict(SUB64, diag_lim_b=20),
                dict(dot, diag="bcast", BKD=16, diag_lim=20)):
        with pytest.raises(ValueError, match="diag"):
            run_kernels(x, True, 32 ** -0.5, cfg=bad)


def test_float16_diagonal_dots_protocol_rule():
    """The diagonal dots with 16-bit operands (hi/lo split off, the GPU default, and on), mild gates with the
    limit at 60 (every tile by dots): the protocol rule against float64."""
    t, dk, dv = 70, 32, 32
    x = make(t, dk, dv, "mild", seed=12)
    for n in ("q", "k", "v", "do"):
        x[n] = x[n].half().double()
    scale = dk ** -0.5
    want = reference(x, True, scale)
    base = reference(x, True, scale, dtype=torch.float16)
    for split in (False, True):
        got = run_kernels(x, True, scale, dtype=torch.float16,
                          cfg=dict(SUB64, split=split, intra="split", warps_i=1, diag_lim=tk.DIAG_LIM_MAX,
                                   intra_b="split", BK_I=16, warps_ib=1, diag_lim_b=tk.DIAG_LIM_MAX))
        for n, val in got.items():
            val = val.cpu()
            assert not torch.isnan(val).any(), f"{n}: NaN"
            err, bound, rr = max_err(val, want[n]), 2 * max_err(base[n], want[n]) + 1e-5, rel_rmse(val, want[n])
            assert err <= bound and rr < 5e-3, f"{n} (split {split}): max err {err:.3g} (bound {bound:.3g}), " \
                                               f"rel RMSE {rr:.3g}"


@pytest.mark.parametrize("bad,match", [(dict(dp="kernel"), "dp must be"), (dict(dp="dul", main="seq"), "fused main"),
                                       (dict(da16=True, intra_b="fused"), "da16 needs"),
                                       (dict(rc="loop", intra_b="chunk"), "rc .dg from the intra backward. needs"),
                                       (dict(rc=True), "rc must be"), (dict(p16=1), "p16 must be a bool"),
                                       (dict(fit_floor=24), "fit_floor"),
                                       (dict(gc="rows", pre=False), "gc='rows' .* needs cfg pre"),
                                       (dict(gc="kernel"), "gc must be")])
def test_dp_config_errors(bad, match):
    q = torch.randn(1, 1, 8, 16, device=DEV)
    g = torch.zeros(1, 1, 8, 16, device=DEV)
    beta = torch.rand(1, 1, 8, device=DEV)
    cfg = dict(tk.config(16, 16, q.dtype, q.device), **bad)
    with pytest.raises(ValueError, match=match):
        tk.bwd(q, None, q, q, q, g, beta, None, 0.25, cfg=cfg)
