"""Scalar-gated linear attention ("simple GLA") on the GPU: attnzoo's Triton kernels against the PyTorch
chunked form, flash-linear-attention's ``chunk_simple_gla`` (when importable) and dense causal SDPA
(cuDNN) at the same shape; then the decoding step's bandwidth.

    PYTHONPATH=src python3 benchmarks/linear_bench.py --out DIR [--sweep] [--quick]

1. Correctness at a mid size first (B=2, H=4, T=1000, bf16 / fp16 / fp32, random log-sigmoid gates and
   no gate, initial state, outputs poisoned with NaN): o, final state, dq, dk, dv, dg, d initial state against
   the float64 chunked form (itself tested against the recurrence), with the protocol's rule: 16-bit results
   (and the float32 results of a 16-bit run) within 2x the error of the same chunked computation done by
   the PyTorch math path in that dtype + 1e-5 and rel RMSE < 5e-3; float32 within rel 1e-4. Also recorded,
   for information: the error ratio against the PyTorch tier as the library runs it (float32 compute),
   flash-linear-attention's error at the same inputs, and the step kernel against the recurrence.
2. Speed: bf16, 16 heads, head dim 128, B*T in {16K, 64K} tokens at several T; forward and forward+backward
   (random gates, as in training). CUDA events, L2 flushed, median and 20/80th percentiles
   (attnzoo.bench.timing). Backends: ``triton`` (attnzoo.linear.triton_kernels.simple_gla), ``torch-chunk``
   (the PyTorch tier's chunked form, float32 compute, chunk 64), ``fla`` (fla.ops.simple_gla.chunk_simple_gla,
   [B, T, H, D] layout, 'unsupported' when not importable), ``sdpa-cudnn`` and ``sdpa-flash`` (dense causal
   softmax attention: how linear attention compares with FlashAttention at this length).
3. Decode: one token against a 128x128 float32 state per head, 16 heads, B in 1..64: the step kernel
   (in place and out of place) and the PyTorch step, CUDA-graph replay and eager; GB/s = bytes of state read
   and written (2 x B x H x 128 x 128 x 4) plus the token's q, k, v, o, over the median time; fraction of the
   H100 SXM peak (3.35 TB/s). flash-linear-attention's fused_recurrent_simple_gla with T=1 when importable.
   Then the fused step of GLA (per-channel decay), Gated DeltaNet and KDA (the delta rule in the kernel,
   ``triton_kernels.step(..., beta=)``) against their PyTorch step and fla's fused recurrent kernels; and
   ``copy-roof``, a plain device copy of the state (read and written once): the bandwidth a step can reach.
4. Gated DeltaNet (S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t): correctness of the
   Triton kernels (attnzoo.linear.triton_delta) at B=2, H=4, T=1000 against the float64 chunked form, the
   low-precision baseline being the token recurrence evaluated in that dtype (PyTorch has no 16-bit
   triangular solve); and in the speed table, at the same shapes (keys L2-normalised, beta = sigmoid,
   g = logsigmoid / 16): ``gdn-triton``, ``gdn-torch-chunk`` (the PyTorch tier, float32 compute, chunk 64)
   and ``fla-gdn`` (fla.ops.gated_delta_rule.chunk_gated_delta_rule, [B, T, H, D] layout, 'unsupported'
   when not importable).
5. KDA (S_t = (I - beta_t k_t^T k_t) Diag(exp g_t) S_{t-1} + beta_t k_t^T v_t, per-channel gates): in the speed
   table, same shapes and inputs with g (B, H, T, D) = logsigmoid / 16: ``kda-triton``
   (attnzoo.linear.triton_kda.kda_triton), ``kda-torch-chunk`` (the PyTorch tier) and ``fla-kda``
   (fla.ops.kda.chunk_kda, [B, T, H, D] layout, 'unsupported' when not importable).
``--sweep`` also times block-size variants of the Triton kernels (``tk.config`` keys) at B=8, T=2048.
``--fla-unguarded`` times fla's gated chunk backward on Hopper although fla 0.6.0 refuses it there with Triton
< 3.7.1 (#640), and records how far fla's outputs and gradients are from ours (rows of kind "fla-agreement").

One JSON line per measurement (every parameter, device, versions, status) in DIR/linear_bench.jsonl.
"""
import argparse
import contextlib
import inspect
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from attnzoo.bench.speed import hbm_peak_bytes_s
from attnzoo.bench.timing import time_fn
from attnzoo.linear import _core
from attnzoo.linear import triton_kernels as tk
from attnzoo.testing import check_close, max_err, rel_rmse

H, D = 16, 128
SKIP_TORCH = False  # --no-torch: leave out the PyTorch chunk-form baselines (slow at 64K tokens)
OPS = {"simple_gla", "gla", "gdn", "kda", "sdpa"}  # --ops: which ops the speed table times
# GLA config variants checked by the protocol's rule on the GPU too (with --check), so that a faster variant is
# only adopted if it passes: "split" (the state kernels' hi/lo split, the default before split_h=False) and the
# inter-chunk backward per Dk block.
GLA_CHECK_VARIANTS = [("split", dict(split_h=True)), ("inter-split", dict(inter="split", BK_Q=64, warps_q=4)),
                      ("scores-split", dict(intra_f="split", warps_f=4)),
                      ("diag-dot", dict(intra_f="split", warps_f=4, diag_lim=60, diag_lim_b=60)),
                      ("no-dot", dict(intra_f="fused", diag_lim=0, diag_lim_b=0))]
# every opt-in storage change of KDA's kernels at once (fifteenth session): P, dP / dA and the main backward's
# shares of dq / dk in 16 bits, dg from the intra backward, the gate cumsum from _gate_rows, dP in _bwd_dul
KDA_ALL_OPT_IN = dict(p16=True, da16=True, rc="launches", gc="rows", dp="dul", a16=True)
# KDA's intra backward in one program per sub-chunk (cfg intra_b="fused", the default before the tiled one)
KDA_CHECK_VARIANTS = [("intra_b-fused", dict(intra_b="fused")), ("no-pre", dict(pre=False)),
                      ("main-split", dict(main="split", BK_M=32, BV_M=32, warps_mk=8, warps_mv=8)),
                      ("inv-dbl", dict(inv="dbl")), ("prep-split-dbl", dict(prep="split", inv="dbl")),
                      ("main-seq", dict(main="seq")), ("unroll4", dict(unroll_i=4, unroll_ib=4)),
                      ("unroll16", dict(unroll_i=16, unroll_ib=16)),
                      ("ib-chunk", dict(intra_b="chunk", BK_I=32, warps_ib=8)),
                      ("chunk", dict(intra="chunk", BK_F=64, warps_i=8, intra_b="chunk", BK_I=32, warps_ib=8)),
                      ("diag-dot", dict(diag_lim=60, diag_lim_b=60)), ("no-dot", dict(diag_lim=0, diag_lim_b=0)),
                      ("dp-dul", dict(dp="dul")), ("da16", dict(da16=True)), ("dp-dul-da16", dict(dp="dul", da16=True)),
                      ("rc", dict(rc="loop")), ("rc-k32", dict(rc="loop", BK_I=32)), ("rc-launches", dict(rc="launches")),
                      ("gc-rows-rc", dict(gc="rows", rc="launches")), ("p16", dict(p16=True)),
                      ("all-opt-in", KDA_ALL_OPT_IN)]
# Gated DeltaNet's main backward in two kernels (cfg main="split") or in one fused program (main="fused", the
# default before the three-pass one); T by block doubling (inv="dbl"); T apart from W and U0 (prep="split")
GDN_CHECK_VARIANTS = [("main-split", dict(main="split", BK_M=64, BK_MV=32, BV_M=32, warps_mk=8, warps_mv=8)),
                      ("inv-dbl", dict(inv="dbl")), ("prep-split-dbl", dict(prep="split", inv="dbl")),
                      ("main-fused", dict(main="fused", BV_B=32)), ("main-seq-b32", dict(main="seq", BV_B=32))]
SINK = None  # main() sets it: each speed row is written (and printed) as soon as it is measured
GDN_SPEED_VARIANTS = []  # --gdn-variants: Gated DeltaNet sweep variants ("+"-joined names) timed in the speed table too
KDA_SPEED_VARIANTS = []  # --kda-variants: the same for KDA (through the autograd op, as the SDPA comparison runs it)
FLA_UNGUARDED = False  # --fla-unguarded: fla's Hopper guard on its gated backward (#640) bypassed, for timing


def op_of(backend: str) -> str:
    """The op a speed-table backend name belongs to (for --ops)."""
    for op in ("gla", "gdn", "kda", "sdpa"):
        if backend.startswith(op) or backend.startswith("fla-" + op):
            return op
    return "simple_gla"


class _Live(list):
    """A row list that hands every row to SINK when it is added, so a time-boxed run keeps what it measured.
    Rows of ops outside ``--ops`` are dropped, unless ``keep_all`` (the sweep and profile sections name their
    ops themselves)."""

    def __init__(self, keep_all=False):
        super().__init__()
        self.keep_all = keep_all

    def append(self, row):
        if not self.keep_all and op_of(row["backend"]) not in OPS:
            return
        super().append(row)
        if SINK is not None:
            SINK(row)

    def extend(self, new):
        for row in new:
            self.append(row)
        return self

    __iadd__ = extend
DEV = "cuda"  # a dry run under the Triton interpreter sets "cpu"


def env():
    import triton
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    info = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    try:
        import fla
        info["fla"] = getattr(fla, "__version__", "unknown")
        if FLA_UNGUARDED:
            info["fla_guard_bypassed"] = True
    except Exception:  # noqa: BLE001 - a missing peer library is recorded, never fatal
        info["fla"] = None
    return info


def fla_chunk():
    """fla's chunk_simple_gla adapted to (B, H, T, D) inputs, or None when not importable."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}

    def run(q, k, v, g, scale, s0=None, final=False):
        t = lambda x: x.transpose(1, 2)  # noqa: E731 - (B, H, T, D) -> (B, T, H, D) views
        o, s = chunk_simple_gla(t(q), t(k), t(v), g=None if g is None else g.transpose(1, 2), scale=scale,
                                initial_state=s0, output_final_state=final, **extra)
        return o.transpose(1, 2), s
    return run


def fla_recurrent():
    try:
        from fla.ops.simple_gla import fused_recurrent_simple_gla
    except Exception:  # noqa: BLE001
        return None
    return fused_recurrent_simple_gla


def torch_chunk(q, k, v, g, scale, s0=None, chunk=64):
    """The PyTorch tier as the library runs it: float32 compute, chunked form."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = lambda x: None if x is None else x.to(cd)  # noqa: E731
    o, s = _core.chunk_gated_linear(c(q) * scale, c(k), c(v), c(g), c(s0), chunk)
    return o.to(q.dtype), s


def math_path(q, k, v, g, scale, s0=None, chunk=64):
    """The same chunked computation in the inputs' own low precision (the protocol's baseline)."""
    dt = q.dtype
    c = lambda x: None if x is None else x.to(dt)  # noqa: E731
    return _core.chunk_gated_linear(q * scale, k, v, c(g), c(s0), chunk)


# ----------------------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------------------

def grads_of(fn, inputs, do, ds):
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items() if x is not None}
    o, s = fn(**leaves)
    loss = (o * do.to(o.dtype)).sum() + (s * ds.to(s.dtype)).sum()
    gr = torch.autograd.grad(loss, list(leaves.values()))
    res = {"o": o.detach(), "state": s.detach()}
    res.update({"d" + n: x for n, x in zip(leaves, gr)})
    return res


def correctness(dtype, gate, b=2, h=4, t=1000, dk=128, dv=128):
    torch.manual_seed(hash((str(dtype), gate)) % 1000)
    dev = DEV
    q, k, v = (torch.randn(b, h, t, d, device=dev).to(dtype) for d in (dk, dk, dv))
    g = F.logsigmoid(torch.randn(b, h, t, device=dev)) if gate == "random" else None
    s0 = torch.randn(b, h, dk, dv, device=dev)
    do = torch.randn(b, h, t, dv, device=dev).to(dtype)
    ds = torch.randn(b, h, dk, dv, device=dev)
    scale = dk ** -0.5
    x = dict(q=q, k=k, v=v, g=g, s0=s0)
    x64 = {n: (None if a is None else a.double()) for n, a in x.items()}
    ref = grads_of(lambda q, k, v, s0, g=None: torch_chunk(q, k, v, g, scale, s0), x64, do.double(), ds.double())
    base = grads_of(lambda q, k, v, s0, g=None: math_path(q, k, v, g, scale, s0), x, do, ds)
    lib = grads_of(lambda q, k, v, s0, g=None: torch_chunk(q, k, v, g, scale, s0), x, do, ds)
    rows, got = [], {}
    row = dict(kind="correctness", dtype=str(dtype).split(".")[-1], gate=gate, B=b, H=h, T=t, dk=dk, dv=dv, **env())
    try:
        o, st = tk.fwd(q, k, v, g, s0, scale, poison=True)
        dq, dk_, dv_, dg, ds0 = tk.bwd(do, ds, q, k, v, g, s0, scale, poison=True)
        got = dict(o=o, state=st, dq=dq, dk=dk_, dv=dv_, ds0=ds0)
        if g is not None:
            got["dg"] = dg
        ratios, fails = {}, []
        for n, val in got.items():
            r, bs = ref[n], base[n]
            try:
                if dtype == torch.float32:
                    check_close(n, val, r)
                elif val.dtype == dtype:
                    check_close(n, val, r, baseline=bs)
                else:  # a float32 result of a 16-bit run: the low-precision rule
                    err, bound, rr = max_err(val, r), 2 * max_err(bs, r) + 1e-5, rel_rmse(val, r)
                    if torch.isnan(val).any() or not (err <= bound and rr < 5e-3):
                        raise AssertionError(f"{n}: max err {err:.3g} (bound {bound:.3g}), rel RMSE {rr:.3g}")
            except AssertionError as e:
                fails.append(str(e))
            ratios[n] = dict(err=max_err(val, r), rel_rmse=rel_rmse(val, r), math_path_err=max_err(bs, r),
                             fp32_tier_err=max_err(lib[n], r))
        rows.append(dict(row, check="triton", status="pass" if not fails else "FAIL", errors=fails, detail=ratios))
    except Exception as e:  # noqa: BLE001
        rows.append(dict(row, check="triton", status="error", errors=[f"{type(e).__name__}: {e}"[:500]]))
    run = fla_chunk()
    if run is None:
        rows.append(dict(row, check="fla", status="unsupported", errors=["flash-linear-attention not importable"]))
    elif dtype != torch.float32:
        try:
            o, s = run(q, k, v, g, scale, s0, True)
            rows.append(dict(row, check="fla", status="info", o_err=max_err(o, ref["o"]),
                             o_rel_rmse=rel_rmse(o, ref["o"]), state_rel_rmse=rel_rmse(s, ref["state"]),
                             triton_o_err=max_err(got["o"], ref["o"]) if "o" in got else None))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(row, check="fla", status="error", errors=[f"{type(e).__name__}: {e}"[:500]]))
    return rows


def step_correctness_gated():
    """The fused step of GLA (per-channel decay), Gated DeltaNet and KDA (the delta rule in the kernel): one
    token, bf16 inputs, float32 state, against the float64 PyTorch step (o by the protocol's low-precision rule,
    the baseline being the same PyTorch step evaluated in bfloat16; the state as float32)."""
    torch.manual_seed(5)
    b, h, dk, dv = 3, 4, 128, 128
    rows = []
    for op, kind, vec, delta in (("gla", "linear", True, False), ("gdn", "delta", False, True),
                                 ("kda", "delta", True, True)):
        s = torch.randn(b, h, dk, dv, device=DEV)
        q, k, v = (torch.randn(b, h, dd, device=DEV, dtype=torch.bfloat16) for dd in (dk, dk, dv))
        if delta:
            k = F.normalize(k.float(), dim=-1).to(torch.bfloat16)
        g = F.logsigmoid(torch.randn(b, h, *((dk,) if vec else ()), device=DEV)) / 4
        beta = torch.sigmoid(torch.randn(b, h, device=DEV)) if delta else None
        d = lambda x: None if x is None else x.double()  # noqa: E731
        want_o, want_s = _core.forward_step(kind, d(q), d(k), d(v), d(g), d(beta), s.double(), 0.1, backend="torch")
        lo = lambda x: None if x is None else x.to(torch.bfloat16)  # noqa: E731
        step_lo = _core.step_gated_delta if delta else _core.step_gated_linear
        base_o = step_lo(*(lo(x) for x in (q * 0.1, k, v, g) + ((beta,) if delta else ())), lo(s))[0]
        row = dict(kind="correctness", check=f"{op}-step", dtype="bfloat16", B=b, H=h, dk=dk, dv=dv, **env())
        try:
            o, s_new = tk.step(q, k, v, g, s, 0.1, poison=True, beta=beta)
            check_close(f"{op}-step/o", o, want_o, baseline=base_o)
            check_close(f"{op}-step/state", s_new, want_s)
            rows.append(dict(row, status="pass"))
        except AssertionError as e:
            rows.append(dict(row, status="FAIL", errors=[str(e)]))
    return rows


def step_correctness():
    torch.manual_seed(1)
    b, h, dk, dv = 3, 4, 128, 128
    s = torch.randn(b, h, dk, dv, device=DEV)
    q, k, v = (torch.randn(b, h, dd, device=DEV, dtype=torch.bfloat16) for dd in (dk, dk, dv))
    g = F.logsigmoid(torch.randn(b, h, device=DEV))
    want_o, want_s = _core.step_gated_linear(q.double() * 0.1, k.double(), v.double(), g.double(), s.double())
    o, s_new = tk.step(q, k, v, g, s, 0.1, poison=True)
    row = dict(kind="correctness", check="step", dtype="bfloat16", B=b, H=h, dk=dk, dv=dv, **env())
    try:
        check_close("step/o", o, want_o, baseline=want_o.to(torch.bfloat16))
        check_close("step/state", s_new, want_s)
        s2 = s.clone()
        o2, _ = tk.step(q, k, v, g, s2, 0.1, inplace=True)
        assert torch.equal(s2, s_new) and torch.equal(o2, o), "in place differs from out of place"
        return [dict(row, status="pass")]
    except AssertionError as e:
        return [dict(row, status="FAIL", errors=[str(e)])]


# ----------------------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------------------

def _record(base, backend, direction, r, tokens, **extra):
    ok = r["status"] == "ok"
    return dict(base, backend=backend, direction=direction, status=r["status"], message=r["message"],
                median_ms=r["median_ms"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"], compile_ms=r["compile_ms"],
                peak_mem_bytes=r["peak_mem_bytes"], reps=r["reps"],
                mtok_per_s=tokens / (r["median_ms"] * 1e-3) / 1e6 if ok else None, **extra)


def _unsupported(base, backend, direction, msg, tokens):
    r = dict(status="unsupported", message=msg, median_ms=None, p20_ms=None, p80_ms=None, compile_ms=None,
             peak_mem_bytes=None, reps=0)
    return _record(base, backend, direction, r, tokens)


def speed(b, t, reps):
    dev, dt = DEV, torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, H, t, D, device=dev, dtype=dt) for _ in range(3))
    g = F.logsigmoid(torch.randn(b, H, t, device=dev)) / 16  # gates as in GLA-style training
    do = torch.randn(b, H, t, D, device=dev, dtype=dt)
    scale = D ** -0.5
    base = dict(kind="speed", B=b, T=t, H=H, D=D, tokens=b * t, dtype="bfloat16", gate="logsigmoid/16", **env())
    rows = _Live()

    def bench(name, fwd_fn, fb_fn):
        if (SKIP_TORCH and "torch-chunk" in name) or op_of(name) not in OPS:
            return
        for direction, fn in (("fwd", fwd_fn), ("fwd+bwd", fb_fn)):
            t0 = time.time()
            r = time_fn(fn, device=dev, warmup=2, reps=reps, max_time_s=3.0)
            rows.append(_record(base, name, direction, r, b * t))
            torch.cuda.empty_cache()
            ms = f"{r['median_ms']:.3f} ms" if r["status"] == "ok" else r["status"]
            print(f"    B={b} T={t} {name:<16}{direction:<8}{ms:>14}  ({time.time() - t0:.1f} s wall)", flush=True)

    def fb(call, leaves):
        def run():
            o = call(*leaves)
            torch.autograd.grad(o, leaves, do)
        return run

    ql, kl, vl, gl = (x.detach().requires_grad_() for x in (q, k, v, g))
    bench("triton", lambda: tk.simple_gla(q, k, v, g, scale),
          fb(lambda q, k, v, g: tk.simple_gla(q, k, v, g, scale)[0], [ql, kl, vl, gl]))
    bench("torch-chunk", lambda: torch_chunk(q, k, v, g, scale),
          fb(lambda q, k, v, g: torch_chunk(q, k, v, g, scale)[0], [ql, kl, vl, gl]))
    run = fla_chunk()
    if run is None:
        for direction in ("fwd", "fwd+bwd"):
            rows.append(_unsupported(base, "fla", direction, "flash-linear-attention not importable", b * t))
    else:
        # fla reads [B, T, H, D]: give it that layout (contiguous), so it is timed on its native layout
        qf, kf, vf = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        gf = g.transpose(1, 2).contiguous().transpose(1, 2)
        lf = [x.detach().requires_grad_() for x in (qf, kf, vf, gf)]
        bench("fla", lambda: run(qf, kf, vf, gf, scale), fb(lambda q, k, v, g: run(q, k, v, g, scale)[0], lf))
    # GLA with per-channel gates: attnzoo's Triton kernels vs the PyTorch chunk form vs fla's chunk_gla
    from attnzoo.linear import gla as gla_op
    from attnzoo.linear.triton_gla import gla_triton
    gv = F.logsigmoid(torch.randn(b, H, t, D, device=dev)) / 16
    gvl = gv.detach().requires_grad_()
    bench("gla-triton", lambda: gla_triton(q, k, v, gv, scale),
          fb(lambda q, k, v, g: gla_triton(q, k, v, g, scale)[0], [ql, kl, vl, gvl]))
    bench("gla-torch-chunk", lambda: gla_op(q, k, v, gv, scale=scale, backend="torch"),
          fb(lambda q, k, v, g: gla_op(q, k, v, g, scale=scale, backend="torch")[0], [ql, kl, vl, gvl]))
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:  # noqa: BLE001 - a missing peer is recorded, not an error
        for direction in ("fwd", "fwd+bwd"):
            rows.append(_unsupported(base, "fla-gla", direction, f"fla.ops.gla not importable: {type(e).__name__}",
                                     b * t))
    else:
        tr = lambda x: x.transpose(1, 2).contiguous()  # fla's [B, T, H, D] layout
        qf, kf, vf, gf = (tr(x) for x in (q, k, v, gv))
        lf = [x.detach().requires_grad_() for x in (qf, kf, vf, gf)]
        dof = tr(do)
        def fla_gla(q, k, v, g):
            return chunk_gla(q, k, v, g, scale=scale)[0]
        def fla_fb():
            o = fla_gla(*lf)
            torch.autograd.grad(o, lf, dof)
        bench("fla-gla", lambda: fla_gla(qf, kf, vf, gf), fla_fb)
    if "gdn" in OPS:
        rows += speed_gdn(b, t, reps, q, k, v, do, base, bench, fb)
    if "kda" in OPS:
        rows += speed_kda(b, t, reps, q, k, v, do, base, bench, fb)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def sdpa(q, k, v, g=None, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        bench(name, lambda: sdpa(q, k, v), fb(sdpa, [ql, kl, vl]))
    return rows


def sweep(reps, b=8, t=2048):
    """Block-size variants of the Triton kernels around tk.config, timed through the launchers."""
    dev, dt = DEV, torch.bfloat16
    q, k, v, do = (torch.randn(b, H, t, D, device=dev, dtype=dt) for _ in range(4))
    g = F.logsigmoid(torch.randn(b, H, t, device=dev)) / 16
    s0 = None
    default = tk.config(D, D, dt, torch.device(dev))
    variants = [("default", {})]
    for bk, bv, w in ((64, 32, 4), (128, 64, 8), (32, 64, 4), (64, 64, 8), (128, 32, 4), (32, 32, 4)):
        variants.append((f"h{bk}x{bv}w{w}", dict(BK_H=bk, BV_H=bv, warps_h=w)))
    for bv, w in ((64, 4), (64, 8), (128, 4), (32, 4)):
        variants.append((f"o{bv}w{w}", dict(BV_O=bv, warps_o=w)))
    for bv, w in ((16, 8), (64, 8), (32, 4), (16, 4)):
        variants.append((f"b{bv}w{w}", dict(BV_B=bv, warps_b=w)))
    for st in (1, 3):
        variants.append((f"stages{st}", dict(stages=st)))
    rows = []
    base = dict(kind="sweep", B=b, T=t, H=H, D=D, dtype="bfloat16", **env())
    for name, over in variants:
        cfg = dict(default, **over)
        for direction, fn in (("fwd", lambda: tk.fwd(q, k, v, g, s0, D ** -0.5, cfg=cfg)),
                              ("bwd", lambda: tk.bwd(do, None, q, k, v, g, s0, D ** -0.5, cfg=cfg))):
            r = time_fn(fn, device=dev, warmup=2, reps=reps, max_time_s=2.0)
            rows.append(_record(base, "triton", direction, r, b * t, variant=name, cfg=cfg))
    return rows


def variant_cfg(op: str, default: dict, over: dict) -> dict:
    """``default`` updated with a variant's ``over``. The diagonal dots (diag_lim / diag_lim_b, on in the 16-bit GPU
    defaults of KDA and GLA) run only in the split intra kernels with the step diagonal: a variant that picks
    another intra path, and does not name the limit itself, runs without them, as it did before they were on."""
    cfg = dict(default, **over)
    if op == "kda":
        fwd_ok = cfg.get("intra") == "split" and cfg.get("diag", "steps") == "steps"
        bwd_ok = cfg.get("intra_b") == "split"
    elif op == "gla":
        fwd_ok = cfg.get("intra_f") == "split"
        bwd_ok = cfg.get("intra") == "split" and cfg.get("diag", "steps") == "steps"
    else:
        return cfg
    for key, ok in (("diag_lim", fwd_ok), ("diag_lim_b", bwd_ok)):
        if not ok and key not in over:
            cfg[key] = 0.0
    if op == "kda":  # the 16-bit dA / dP need the split intra backward, the gate cumsum by _gate_rows needs pre
        if not bwd_ok and "da16" not in over:
            cfg["da16"] = False
        if not cfg.get("pre", False) and "gc" not in over:
            cfg["gc"] = "cumsum"
    return cfg


def sweep_variants(op: str) -> list:
    """[(name, config overrides)] of ``op``'s sweep (gla, gdn, kda), "default" first."""
    variants = [("default", {})]
    if op == "gla":
        for bk, bv, w in ((64, 32, 4), (128, 64, 8), (64, 64, 8), (128, 128, 8)):
            variants.append((f"h{bk}x{bv}w{w}", dict(BK_H=bk, BV_H=bv, warps_h=w)))
        # the state kernels: one rounding of k / q times its decay instead of the hi/lo split, and smaller
        # state tiles (more programs on the sequential walk: B * H programs per tile is few at B = 1)
        variants += [("split", dict(split_h=True)), ("h32x64w4", dict(BK_H=32, BV_H=64)),
                     ("h32x32w4", dict(BK_H=32, BV_H=32))]
        # the inter-chunk backward per Dk block (dq, dk, dg) with dv in its own kernel, as fla splits it
        for bk, w in ((64, 4), (32, 4), (64, 8), (32, 2), (128, 8)):
            variants.append((f"inter-split-k{bk}w{w}", dict(inter="split", BK_Q=bk, warps_q=w)))
        variants += [("bc32", dict(BC=32)), ("bt32", dict(BT=32))]
        variants.append(("intra-fused", dict(intra="fused")))  # the one-kernel intra backward
        for bk, w in ((64, 4), (32, 2), (32, 4), (128, 4), (64, 8)):  # the two-kernel intra backward
            variants.append((f"split-k{bk}w{w}", dict(intra="split", BK_I=bk, warps_i=w)))
        # the diagonal sub-chunk as one broadcast product (forward: BKD channels at a time; backward: the
        # Dk block of the split kernel), instead of 16 dependent key steps
        for bkd, bki, wi, wo in ((32, 32, 2, 8), (16, 32, 2, 8), (32, 32, 4, 8), (32, 16, 2, 8), (64, 32, 4, 8),
                                 (32, 32, 2, 4)):
            variants.append((f"bcast-d{bkd}k{bki}w{wi}o{wo}", dict(diag="bcast", BKD=bkd, BK_I=bki, warps_i=wi,
                                                                  warps_o=wo)))
        # the forward's scores by (BC, BC) tiles (KDA's score kernel without M)
        variants += [(f"scores-split-w{w}", dict(intra_f="split", warps_f=w)) for w in (2, 4, 8)]
        # the diagonal tiles as dots where the sub-chunk's gates span at most 20 nats: intra backward, split
        # scores, both
        variants += [("dot-b20", dict(diag_lim_b=20)),
                     ("dot-f20-w4", dict(intra_f="split", warps_f=4, diag_lim=20)),
                     ("dot-fb20-w4", dict(intra_f="split", warps_f=4, diag_lim=20, diag_lim_b=20)),
                     ("dot-fb20-w8", dict(intra_f="split", warps_f=8, diag_lim=20, diag_lim_b=20))]
    else:
        variants.append(("split", dict(split=True)))
        for bv, w in ((32, 4), (64, 8), (16, 4), (32, 2), (16, 2), (32, 8)):  # 32 x 8: no spills (ptxas sm_90)
            variants.append((f"h{bv}w{w}", dict(BV_H=bv, warps_h=w)))
        variants += [("split-h32w4", dict(split=True, BV_H=32, warps_h=4)), ("bt32", dict(BT=32))]
        if op == "kda":  # the tiled score kernel
            variants += [("intra-fused", dict(intra="fused"))]
            variants += [(f"intra-split-w{w}", dict(intra="split", warps_i=w)) for w in (2, 4, 8)]
            variants += [(f"bcast-d{bkd}w{w}", dict(intra="split", diag="bcast", BKD=bkd, warps_i=w))
                         for bkd, w in ((32, 2), (16, 2), (32, 4), (64, 4))]  # the diagonal tile broadcast
            # the intra backward by (BC, BC) tiles per Dk block
            variants += [(f"ib-k{bk}w{w}", dict(intra_b="split", BK_I=bk, warps_ib=w))
                         for bk, w in ((32, 2), (16, 1), (16, 2), (32, 4), (64, 4), (64, 2))]
            # the state kernels reading their gate factors from one parallel pass (_gate_rows)
            variants += [("no-pre", dict(pre=False)), ("pre-h32", dict(pre=True, BV_H=32))]
            # the diagonal tiles' step loops unrolled, u steps per iteration: intra backward, forward scores
            variants += [(f"unroll-ib{u}", dict(unroll_ib=u)) for u in (2, 4, 16)]
            variants += [(f"unroll-i{u}w{w}", dict(unroll_i=u, warps_i=w))
                         for u, w in ((2, 2), (4, 2), (4, 4), (16, 4))]
            variants += [("unroll-i1", dict(unroll_i=1))]  # the default before unroll_i=2
            # the intra backward per chunk and BK_I-channel block, all sub-chunks at once ((BT, BK) tiles)
            variants += [(f"ib-chunk-k{bk}w{w}", dict(intra_b="chunk", BK_I=bk, warps_ib=w))
                         for bk, w in ((32, 8), (16, 4), (32, 4), (64, 8), (16, 2))]
            # the forward scores per chunk over BK_F-channel blocks (no spills at 64 / 8 and 32 / 4, ptxas sm_90)
            variants += [(f"i-chunk-k{bk}w{w}", dict(intra="chunk", BK_F=bk, warps_i=w))
                         for bk, w in ((64, 8), (32, 4), (32, 8), (16, 4))]
            variants += [("chunk-both", dict(intra="chunk", BK_F=64, warps_i=8, intra_b="chunk", BK_I=32, warps_ib=8))]
            # the diagonal tiles as dots where the sub-chunk's gates span at most L nats (forward, backward, both)
            for lim in (20, 60):
                variants += [(f"dot-f{lim}", dict(diag_lim=lim)), (f"dot-b{lim}", dict(diag_lim_b=lim)),
                             (f"dot-fb{lim}", dict(diag_lim=lim, diag_lim_b=lim))]
            # (the forward with both diagonal paths spills 152 B at 2 warps and none at 4, ptxas sm_90)
            variants += [("dot-f20w4", dict(diag_lim=20, warps_i=4)), ("dot-fb20w4", dict(diag_lim=20, diag_lim_b=20,
                                                                                         warps_i=4)),
                         ("dot-fb20-ib-k16w2", dict(diag_lim=20, diag_lim_b=20, BK_I=16, warps_ib=2)),
                         ("dot-fb20-ib-k64w4", dict(diag_lim=20, diag_lim_b=20, BK_I=64, warps_ib=4))]
            # with the main backward in three passes (lost to the fused one in the eleventh session, 5.92-6.69 ms
            # against 5.70, before the precomputed gate factors and the dots)
            variants += [(f"dot-fb20-main-seq-b{bv}w8",
                          dict(diag_lim=20, diag_lim_b=20, main="seq", BV_B=bv, warps_b=8)) for bv in (32, 64)]
            # dP = dO U^T in _bwd_dul (one program per chunk over every Dv block) instead of the main backward
            # (its stack 248 -> 88 B per thread, ptxas sm_90); BV_O is _fwd_o's Dv block too
            variants += [("dp-dul", dict(dp="dul")), ("dp-dul-o128w8", dict(dp="dul", BV_O=128, warps_o=8)),
                         ("dp-dul-o32", dict(dp="dul", BV_O=32))]
            # dA and dP stored in 16 bits (what every dot reading them rounds them to): half the bytes of the two
            # (64, 64)-per-chunk float32 tensors the main backward writes and the intra backward reads four times
            variants += [("da16", dict(da16=True)), ("da16-dp-dul", dict(da16=True, dp="dul"))]
            # dg written by the intra backward (no DB write-back, no _chunk_rcumsum pass): one program per chunk
            # walking its sub-chunks backwards (rc="loop": ptxas sm_90 252 / 168 / 202 registers at BK_I 64 w4 /
            # 32 w4 / 64 w8, 130 / 96 without, no spills) or one launch per sub-chunk, last to first, the column
            # sums carried between launches (rc="launches": the registers of the kernel without rc)
            variants += [("rc", dict(rc="loop")), ("rc-k32", dict(rc="loop", BK_I=32)),
                         ("rc-w8", dict(rc="loop", warps_ib=8)), ("rc-launches", dict(rc="launches")),
                         ("rc-launches-da16", dict(rc="launches", da16=True))]
            # the gate cumsum formed by _gate_rows (one pass over the float32 gates fewer; with pre only)
            variants += [("gc-rows", dict(gc="rows")), ("gc-rows-rc-launches", dict(gc="rows", rc="launches"))]
            # the main backward's shares of dq, dk (DQP, DKP) stored in 16 bits: half of their 0.54 GB per fwd+bwd
            variants += [("p16", dict(p16=True)), ("p16-da16", dict(p16=True, da16=True)),
                         ("p16-da16-rc-launches-gc-rows", dict(p16=True, da16=True, rc="launches", gc="rows")),
                         ("all-opt-in", KDA_ALL_OPT_IN)]
            # the state kernels' Dv tiles narrowed by fit_state_tiles to 32, not 16, at B * H = 32 (128 programs
            # instead of 256; the sweep passes its cfg directly and never fits, so this row means something only
            # through the op: --kda-variants fit32)
            variants += [("fit32", dict(fit_floor=32))]
            # P stored in 16 bits (its readers round it to 16 bits for their dots: the same bits)
            variants += [("a16", dict(a16=True)), ("a16-p16-da16-rc-launches-gc-rows",
                                                   dict(a16=True, p16=True, da16=True, rc="launches", gc="rows"))]
            # the sixteenth session's ablations of the default (da16, gc="rows", a16 on since the fifteenth): each
            # one off, and all three off (the fourteenth session's default), timed through the op by --kda-variants
            variants += [("no-da16", dict(da16=False)), ("no-gc-rows", dict(gc="cumsum")), ("no-a16", dict(a16=False)),
                         ("s14-default", dict(da16=False, gc="cumsum", a16=False))]
    if op in ("gla", "kda"):  # the default before the diagonal dots (exact steps on every diagonal tile)
        variants.append(("no-dot", dict(diag_lim=0, diag_lim_b=0, **(dict(intra_f="fused") if op == "gla" else
                                                                     dict(BK_I=32)))))
    for bv, w in ((32, 4), (128, 8), (64, 8)):
        variants.append((f"o{bv}w{w}", dict(BV_O=bv, warps_o=w)))
    for bv, w in ((32, 8), (16, 4), (64, 8), (32, 16), (64, 16)):  # 16 warps: the main backward's five
        variants.append((f"b{bv}w{w}", dict(BV_B=bv, warps_b=w)))      # (64 x 64 / 128) float32 accumulators
    if op in ("gdn", "kda"):  # _prep (T, W, U0) with 8 warps: no / few register spills (ptxas sm_90)
        variants += [(f"p{bv}w8", dict(BV_P=bv, warps_p=8)) for bv in (64, 32)]
        # T by block doubling (log2(BT) - 1 levels of two dots) instead of 4 x 15 dependent row steps
        variants += [(f"inv-dbl-w{w}", dict(inv="dbl", warps_p=w)) for w in (4, 8)]
        # T alone (162 / 158 registers at 4 warps, no spills: three programs per SM), then W and U0 by _wu in
        # BN_WU-wide column blocks (88 registers), ptxas sm_90
        variants += [("prep-split", dict(prep="split")), ("prep-split-dbl", dict(prep="split", inv="dbl")),
                     ("prep-split-dbl-n32", dict(prep="split", inv="dbl", BN_WU=32)),
                     ("prep-split-dbl-w8", dict(prep="split", inv="dbl", warps_p=8))]
    if op in ("gdn", "kda"):  # the main backward in three passes over Dv (no spills in its loops at 8 warps)
        variants += [(f"main-seq-b{bv}w{w}", dict(main="seq", BV_B=bv, warps_b=w))
                     for bv, w in ((32, 8), (64, 8), (16, 8), (32, 4), (64, 4))]
        variants.append(("main-fused-b32w8", dict(main="fused", BV_B=32, warps_b=8)))
    if op == "kda":  # the main backward in two kernels (no register spills at 32 / 32 / 8 / 8, ptxas sm_90)
        for bk, bv, wk, wv in ((32, 32, 8, 8), (64, 32, 8, 8), (32, 16, 8, 4), (64, 16, 8, 8)):
            variants.append((f"main-split-k{bk}b{bv}w{wk}{wv}",
                             dict(main="split", BK_M=bk, BV_M=bv, warps_mk=wk, warps_mv=wv)))
    if op == "gdn":  # the main backward in two kernels (no register spills at these sizes, ptxas sm_90)
        for bk, bkv, bv, wk, wv in ((64, 32, 32, 8, 8), (32, 32, 32, 8, 8), (64, 32, 16, 8, 8), (64, 64, 32, 8, 8),
                                    (64, 32, 32, 4, 8)):
            variants.append((f"main-split-k{bk}v{bkv}b{bv}w{wk}{wv}",
                             dict(main="split", BK_M=bk, BK_MV=bkv, BV_M=bv, warps_mk=wk, warps_mv=wv)))
    if op == "gla":  # 2026-12-04: a stages variant of the Gated DeltaNet kernels hit an illegal address
        variants += [("stages1", dict(stages=1)), ("stages3", dict(stages=3))]
    return variants


def sweep_op(op, reps, b=8, t=2048, only=()):
    """Config variants of the GLA / Gated DeltaNet / KDA Triton kernels (their ``config()`` keys) at B=8,
    T=2048, forward and backward timed through the launchers; for every variant also the forward's rel
    RMSE (o and final state, first batch entry) against the float64 chunked form, since ``split`` (the hi/lo 16-bit split of
    the float32 operands of the delta kernels) trades dots for accuracy. The config functions' GPU values
    were first guesses; this is the table that replaces them."""
    from attnzoo.linear import _core as core
    dev, dt = DEV, torch.bfloat16
    torch.manual_seed(1)
    q, k, v, do = (torch.randn(b, H, t, D, device=dev, dtype=dt) for _ in range(4))
    scale = D ** -0.5
    if op == "gla":
        from attnzoo.linear import triton_gla as mod
        g = F.logsigmoid(torch.randn(b, H, t, D, device=dev)) / 16
        args = (q, k, v, g, None)
        ref = lambda: core.chunk_gated_linear(*(x[:1].double() for x in (q * scale, k, v, g)), None, 64)  # noqa: E731
    else:
        mod = __import__("attnzoo.linear.triton_" + ("delta" if op == "gdn" else "kda"), fromlist=["fwd"])
        k = F.normalize(k.float(), dim=-1).to(dt)
        g = F.logsigmoid(torch.randn(b, H, t, *((D,) if op == "kda" else ()), device=dev)) / 16
        beta = torch.sigmoid(torch.randn(b, H, t, device=dev))
        args = (q, k, v, g, beta, None)
        ref = lambda: core.chunk_gated_delta(*(x[:1].double() for x in (q * scale, k, v, g, beta)), None,  # noqa: E731
                                             64)
    default = mod.config(D, D, dt, torch.device(dev))
    variants = sweep_variants(op)
    try:
        r_o, r_s = ref()
    except Exception as e:  # noqa: BLE001 - the accuracy column is then missing, the timing still runs
        print(f"  sweep {op}: float64 reference failed: {type(e).__name__}: {e}"[:200])
        r_o = r_s = None
    rows = _Live(keep_all=True)
    base = dict(kind="sweep", op=op, B=b, T=t, H=H, D=D, dtype="bfloat16", **env())
    if only:
        variants = [vr for vr in variants if vr[0] == "default" or any(o in vr[0] for o in only)]
    for name, over in variants:
        cfg = variant_cfg(op, default, over)
        extra = dict(variant=name, cfg=cfg)
        try:
            o, st = mod.fwd(*args, scale, cfg=cfg)
            if r_o is not None:
                extra.update(o_rel_rmse=rel_rmse(o[:1], r_o), state_rel_rmse=rel_rmse(st[:1], r_s))
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is recorded
            rows.append(dict(base, backend=op + "-triton", direction="fwd", status="error",
                             message=f"{type(e).__name__}: {e}"[:300], median_ms=None, **extra))
            continue
        for direction, fn in (("fwd", lambda: mod.fwd(*args, scale, cfg=cfg)),
                              ("bwd", lambda: mod.bwd(do, None, *args, scale, cfg=cfg))):
            r = time_fn(fn, device=dev, warmup=2, reps=reps, max_time_s=2.0)
            rows.append(_record(base, op + "-triton", direction, r, b * t, **extra))
        f, bw = rows[-2], rows[-1]
        print(f"    sweep {op:<4}{name:<16} fwd {f['median_ms'] or float('nan'):7.3f} bwd "
              f"{bw['median_ms'] or float('nan'):7.3f} ms  o rel RMSE {extra.get('o_rel_rmse', float('nan')):.2g}",
              flush=True)
    return rows


def profile_ops(ops, b=8, t=2048):
    """Per-kernel GPU time of one forward+backward of each op (attnzoo's Triton kernels), torch.profiler
    tables sorted by GPU time: which kernel of the chunked pipeline dominates (the sweep says how much the
    block sizes move it; this says where to look)."""
    from torch.profiler import ProfilerActivity, profile
    from attnzoo.linear import triton_delta, triton_gla, triton_kda
    dev, dt = DEV, torch.bfloat16
    torch.manual_seed(2)
    q, k, v, do = (torch.randn(b, H, t, D, device=dev, dtype=dt) for _ in range(4))
    kn = F.normalize(k.float(), dim=-1).to(dt)
    gs = F.logsigmoid(torch.randn(b, H, t, device=dev)) / 16
    gv = F.logsigmoid(torch.randn(b, H, t, D, device=dev)) / 16
    beta = torch.sigmoid(torch.randn(b, H, t, device=dev))
    scale = D ** -0.5
    KEEP = "all" if tk.SAVE_INTERMEDIATES else True  # noqa: N806 - what the autograd path keeps
    calls = {
        "simple_gla": lambda: (tk.fwd(q, k, v, gs, None, scale), tk.bwd(do, None, q, k, v, gs, None, scale)),
        # GLA, GDN and KDA as autograd runs them: the backward takes what the forward keeps (gate cumsum,
        # scores, and with triton_kernels.SAVE_INTERMEDIATES the chunk states and the delta rules' T, W, U0, U)
        "gla": lambda: triton_gla.bwd(do, None, q, k, v, None, None, scale,
                                      kept=triton_gla.fwd(q, k, v, gv, None, scale, keep=KEEP)[2]),
        "gdn": lambda: triton_delta.bwd(do, None, q, kn, v, None, beta, None, scale,
                                        kept=triton_delta.fwd(q, kn, v, gs, beta, None, scale, keep=True)[2]),
        "kda": lambda: triton_kda.bwd(do, None, q, kn, v, None, beta, None, scale,
                                      kept=triton_kda.fwd(q, kn, v, gv, beta, None, scale, keep=KEEP)[2]),
    }
    for op in ops:
        fn = calls[op]
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                fn()
            if dev == "cuda":
                torch.cuda.synchronize()
        print(f"\nprofile {op} (B={b}, T={t}, 3 x fwd + bwd):")
        print(prof.key_averages().table(sort_by="cuda_time_total" if dev == "cuda" else "cpu_time_total",
                                        row_limit=14))


def profile_fla(ops, b=8, t=2048):
    """The same per-kernel table for flash-linear-attention's chunked op (forward + backward through its
    autograd, (B, T, H, D) inputs), kernel by kernel against ours. Run after the speed table, whose calls
    warm fla's autotuner; an op fla lacks or refuses is reported and skipped."""
    from torch.profiler import ProfilerActivity, profile
    dev, dt = DEV, torch.bfloat16
    torch.manual_seed(2)
    q, k, v, do = (torch.randn(b, t, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(4))
    gv = (F.logsigmoid(torch.randn(b, t, H, D, device=dev)) / 16).requires_grad_()
    for op in ops:
        try:
            if op == "gla":
                from fla.ops.gla import chunk_gla
                fn = lambda: chunk_gla(q, k, v, gv, scale=D ** -0.5)[0].backward(do)  # noqa: E731
            elif op == "kda":
                from fla.ops.kda import chunk_kda
                beta = torch.sigmoid(torch.randn(b, t, H, device=dev))
                kn = F.normalize(k.detach().float(), dim=-1).to(dt)
                fn = lambda: chunk_kda(q.detach(), kn, v.detach(), gv.detach(), beta, scale=D ** -0.5)  # noqa: E731
            else:
                print(f"\nprofile fla {op}: not profiled (only gla, kda)")
                continue
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a missing or refusing peer is reported, never fatal
            print(f"\nprofile fla {op}: {type(e).__name__}: {e}"[:300])
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        what = "fwd + bwd" if op == "gla" else "fwd"
        print(f"\nprofile fla {op} (B={b}, T={t}, 3 x {what}):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16))


def unguard_fla():
    """Bypass fla's refusal of its gated chunk backward (``chunk_bwd_dqkwg``) on Hopper with Triton 3.4-3.7.0
    (fla #640: "produces incorrect results"), so that its backward can be *timed*; whether its gradients are
    right on this machine is then measured by :func:`fla_agreement`, never assumed. Returns a message."""
    try:
        import fla.ops.common.chunk_o as co
    except Exception as e:  # noqa: BLE001 - a missing peer library is recorded, never fatal
        return f"fla not importable ({type(e).__name__}): nothing to bypass"
    if not hasattr(co, "TRITON_ABOVE_3_7_1"):
        return "this fla has no Triton-version guard in chunk_o: nothing bypassed"
    co.TRITON_ABOVE_3_7_1 = True  # the guard reads this module global at call time
    return "fla's Hopper guard on chunk_bwd_dqkwg bypassed (timing only; gradients compared with ours below)"


def fla_agreement(b=8, t=2048):
    """fla's outputs and gradients against attnzoo's (which pass the float64 check on this GPU) for simple GLA
    and Gated DeltaNet at the speed shape: rel RMSE per tensor, so that a timed-but-unguarded fla backward is
    known to compute the same thing (or known not to). Rows of kind 'fla-agreement'."""
    from attnzoo.linear.triton_delta import gated_delta_triton
    dev, dt = DEV, torch.bfloat16
    torch.manual_seed(3)
    q, k, v, do = (torch.randn(b, H, t, D, device=dev, dtype=dt) for _ in range(4))
    kn = F.normalize(k.float(), dim=-1).to(dt)
    g = F.logsigmoid(torch.randn(b, H, t, device=dev)) / 16
    beta = torch.sigmoid(torch.randn(b, H, t, device=dev))
    scale = D ** -0.5
    tr = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731 - fla's [B, T, H, ...] layout
    cases = []
    run_s, run_g = fla_chunk(), fla_gdn()
    if run_s is not None:
        cases.append(("simple_gla", dict(q=q, k=k, v=v, g=g),
                      lambda q, k, v, g: tk.simple_gla(q, k, v, g, scale)[0],
                      lambda q, k, v, g: run_s(q, k, v, g, scale)[0]))
    if run_g is not None:
        cases.append(("gdn", dict(q=q, k=kn, v=v, g=g, beta=beta),
                      lambda q, k, v, g, beta: gated_delta_triton(q, k, v, g, beta, scale)[0],
                      lambda q, k, v, g, beta: tr(run_g(*(tr(x) for x in (q, k, v, g, beta)), scale)[0])))
    rows = []
    for op, x, ours, theirs in cases:
        row = dict(kind="fla-agreement", op=op, B=b, T=t, H=H, D=D, **env())
        try:
            res = []
            for fn in (ours, theirs):
                leaves = {n: a.detach().clone().requires_grad_() for n, a in x.items()}
                o = fn(**leaves)
                gr = torch.autograd.grad(o, list(leaves.values()), do)
                res.append({"o": o.detach(), **{"d" + n: a for n, a in zip(leaves, gr)}})
            detail = {n: rel_rmse(res[1][n].float(), res[0][n].float()) for n in res[0]}
            rows.append(dict(row, status="info", detail=detail))
            print(f"  fla vs attnzoo {op}: " + "  ".join(f"{n} {e:.2g}" for n, e in detail.items())
                  + "   (rel RMSE of fla's result against ours)", flush=True)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(row, status="error", errors=[f"{type(e).__name__}: {e}"[:500]]))
            print(f"  fla vs attnzoo {op}: {type(e).__name__}: {e}"[:300], flush=True)
    return rows


def fla_gdn():
    """fla's chunk_gated_delta_rule adapted to (B, H, T, D) inputs, or None when not importable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 - a missing peer library is recorded, never fatal
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_gated_delta_rule).parameters else {}

    def run(q, k, v, g, beta, scale, s0=None, final=False):
        # q, k, v already in [B, T, H, D], g and beta in [B, T, H]
        return chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=s0,
                                      output_final_state=final, **extra)
    return run


def gdn_inputs(b, h, t, dk, dv, dtype, dev=None):
    """Gated DeltaNet inputs as in training: L2-normalised keys, beta = sigmoid, g = logsigmoid / 16."""
    dev = dev or DEV
    q = torch.randn(b, h, t, dk, device=dev).to(dtype)
    k = F.normalize(torch.randn(b, h, t, dk, device=dev), dim=-1).to(dtype)
    v = torch.randn(b, h, t, dv, device=dev).to(dtype)
    g = F.logsigmoid(torch.randn(b, h, t, device=dev)) / 16
    beta = torch.sigmoid(torch.randn(b, h, t, device=dev))
    return q, k, v, g, beta


def variant_overrides(op: str, spec: str) -> dict:
    """The config overrides of sweep variants named in ``spec``, joined by "+" (later names win on a shared key)."""
    known = dict(sweep_variants(op))
    out = {}
    for name in filter(None, spec.split("+")):
        if name not in known:
            raise SystemExit(f"--{op}-variants: {op} has no sweep variant {name!r}; known: {', '.join(known)}")
        out.update(known[name])
    return out


@contextlib.contextmanager
def config_override(kind: str, over: dict):
    """Inside the block, ``attnzoo.linear.triton_<kind>.config`` returns its 16-bit GPU config updated with ``over``
    (what the autograd path's launches read when no config is passed)."""
    mod = __import__(f"attnzoo.linear.triton_{kind}", fromlist=["config"])
    orig = mod.config

    def patched(dk, dv, dtype, device):
        cfg = orig(dk, dv, dtype, device)
        return variant_cfg(kind, cfg, over) if device.type == "cuda" and dtype != torch.float32 else cfg
    mod.config = patched
    try:
        yield
    finally:
        mod.config = orig


def speed_gdn(b, t, reps, q, k, v, do, base, bench, fb):
    """Gated DeltaNet rows of the speed table (``bench`` / ``fb`` from :func:`speed`, which records them)."""
    from attnzoo.linear import gated_delta_rule
    from attnzoo.linear.triton_delta import gated_delta_triton
    rows = []
    scale = D ** -0.5
    kn = F.normalize(k.float(), dim=-1).to(k.dtype)  # the papers' L2-normalised keys
    g = F.logsigmoid(torch.randn(b, H, t, device=DEV)) / 16
    beta = torch.sigmoid(torch.randn(b, H, t, device=DEV))
    ql, kl, vl, gl, bl = (x.detach().requires_grad_() for x in (q, kn, v, g, beta))
    bench("gdn-triton", lambda: gated_delta_triton(q, kn, v, g, beta, scale),
          fb(lambda q, k, v, g, beta: gated_delta_triton(q, k, v, g, beta, scale)[0], [ql, kl, vl, gl, bl]))
    for name in GDN_SPEED_VARIANTS:  # --gdn-variants: the same autograd path on a sweep variant's config
        with config_override("delta", variant_overrides("gdn", name)):
            bench(f"gdn-triton[{name}]", lambda: gated_delta_triton(q, kn, v, g, beta, scale),
                  fb(lambda q, k, v, g, beta: gated_delta_triton(q, k, v, g, beta, scale)[0], [ql, kl, vl, gl, bl]))
    bench("gdn-torch-chunk", lambda: gated_delta_rule(q, kn, v, g, beta, scale=scale, backend="torch"),
          fb(lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, scale=scale, backend="torch")[0],
             [ql, kl, vl, gl, bl]))
    run = fla_gdn()
    if run is None:
        for direction in ("fwd", "fwd+bwd"):
            rows.append(_unsupported(base, "fla-gdn", direction, "fla.ops.gated_delta_rule not importable", b * t))
        return rows
    tr = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731 - fla's [B, T, H, ...] layout
    qf, kf, vf, gf, bf = (tr(x) for x in (q, kn, v, g, beta))
    lf = [x.detach().requires_grad_() for x in (qf, kf, vf, gf, bf)]
    dof = tr(do)

    def fla_fb():
        o = run(*lf, scale)[0]
        torch.autograd.grad(o, lf, dof)
    bench("fla-gdn", lambda: run(qf, kf, vf, gf, bf, scale), fla_fb)
    return rows


def fla_kda():
    """fla's chunk_kda ([B, T, H, D] inputs, g in log space), or None when not importable."""
    try:
        from fla.ops.kda import chunk_kda
    except Exception:  # noqa: BLE001 - a missing peer library is recorded, never fatal
        return None

    def run(q, k, v, g, beta, scale, s0=None, final=False):
        return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=s0, output_final_state=final)
    return run


def speed_kda(b, t, reps, q, k, v, do, base, bench, fb):
    """KDA rows of the speed table (``bench`` / ``fb`` from :func:`speed`, which records them)."""
    from attnzoo.linear import kda
    from attnzoo.linear.triton_kda import kda_triton
    rows = []
    scale = D ** -0.5
    kn = F.normalize(k.float(), dim=-1).to(k.dtype)
    g = F.logsigmoid(torch.randn(b, H, t, D, device=DEV)) / 16
    beta = torch.sigmoid(torch.randn(b, H, t, device=DEV))
    ql, kl, vl, gl, bl = (x.detach().requires_grad_() for x in (q, kn, v, g, beta))
    bench("kda-triton", lambda: kda_triton(q, kn, v, g, beta, scale),
          fb(lambda q, k, v, g, beta: kda_triton(q, k, v, g, beta, scale)[0], [ql, kl, vl, gl, bl]))
    for name in KDA_SPEED_VARIANTS:  # --kda-variants: the same autograd path on a sweep variant's config
        with config_override("kda", variant_overrides("kda", name)):
            bench(f"kda-triton[{name}]", lambda: kda_triton(q, kn, v, g, beta, scale),
                  fb(lambda q, k, v, g, beta: kda_triton(q, k, v, g, beta, scale)[0], [ql, kl, vl, gl, bl]))
    bench("kda-torch-chunk", lambda: kda(q, kn, v, g, beta, scale=scale, backend="torch"),
          fb(lambda q, k, v, g, beta: kda(q, k, v, g, beta, scale=scale, backend="torch")[0],
             [ql, kl, vl, gl, bl]))
    run = fla_kda()
    if run is None:
        for direction in ("fwd", "fwd+bwd"):
            rows.append(_unsupported(base, "fla-kda", direction, "fla.ops.kda.chunk_kda not importable", b * t))
        return rows
    tr = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731 - fla's [B, T, H, ...] layout
    qf, kf, vf, gf, bf = (tr(x) for x in (q, kn, v, g, beta))
    lf = [x.detach().requires_grad_() for x in (qf, kf, vf, gf, bf)]
    dof = tr(do)

    def fla_fb():
        o = run(*lf, scale)[0]
        torch.autograd.grad(o, lf, dof)
    bench("fla-kda", lambda: run(qf, kf, vf, gf, bf, scale), fla_fb)
    return rows


def _judge(row, got, ref, base):
    """The protocol's rule for every output and gradient in ``got`` against the float64 ``ref``: the
    low-precision rule against ``base`` (the plain recurrence in the same dtype), or the float32 rule when
    ``base`` is None -> the correctness row."""
    fails, detail = [], {}
    for n, val in got.items():
        r = ref[n]
        try:
            if base is None:
                check_close(n, val, r)
            else:  # the low-precision rule, whatever dtype the kernel returns the result in
                err, bound, rr = max_err(val, r), 2 * max_err(base[n], r) + 1e-5, rel_rmse(val, r)
                if torch.isnan(val).any() or not (err <= bound and rr < 5e-3):
                    raise AssertionError(f"{n}: max err {err:.3g} (bound {bound:.3g}), rel RMSE {rr:.3g}")
        except AssertionError as e:
            fails.append(str(e))
        detail[n] = dict(err=max_err(val, r), rel_rmse=rel_rmse(val, r),
                         math_path_err=None if base is None else max_err(base[n], r))
    return dict(row, status="pass" if not fails else "FAIL", errors=fails, detail=detail)


def correctness_gdn(dtype, b=2, h=4, t=1000, dk=128, dv=128, kda=False, variant="default", over=None):
    """Triton Gated DeltaNet, or KDA with ``kda=True`` (per-channel gates), against the float64 chunked form:
    forward, final state and every gradient; ``over``: config keys over the kernels' default (a sweep variant)."""
    if kda:
        from attnzoo.linear import triton_kda as td
    else:
        from attnzoo.linear import triton_delta as td
    name = "kda" if kda else "gdn"
    torch.manual_seed(hash((name, str(dtype))) % 1000)
    q, k, v, g, beta = gdn_inputs(b, h, t, dk, dv, dtype)
    if kda:
        g = F.logsigmoid(torch.randn(b, h, t, dk, device=DEV)) / 16
    s0 = torch.randn(b, h, dk, dv, device=DEV)
    do = torch.randn(b, h, t, dv, device=DEV).to(dtype)
    ds = torch.randn(b, h, dk, dv, device=DEV)
    scale = dk ** -0.5
    x = dict(q=q, k=k, v=v, g=g, beta=beta, s0=s0)

    def chunk64(q, k, v, g, beta, s0):
        return _core.chunk_gated_delta(q * scale, k, v, g, beta, s0, 64)

    def recurrence(q, k, v, g, beta, s0):
        return _core.recurrent(_core.step_gated_delta, q * scale, k, v, g, beta, s0)

    row = dict(kind="correctness", check=f"{name}-triton", dtype=str(dtype).split(".")[-1], gate="logsigmoid/16", B=b,
               H=h, T=t, dk=dk, dv=dv, variant=variant, **env())
    try:
        ref = grads_of(chunk64, {n: a.double() for n, a in x.items()}, do.double(), ds.double())
        base = grads_of(recurrence, {n: a.to(dtype) for n, a in x.items()}, do, ds) if dtype != torch.float32 \
            else None
        cfg = variant_cfg("kda" if kda else "gdn", td.config(dk, dv, dtype, q.device), over) if over else None
        o, st = td.fwd(q, k, v, g, beta, s0, scale, cfg=cfg, poison=True)
        dq, dk_, dv_, dg, dbeta, ds0 = td.bwd(do, ds, q, k, v, g, beta, s0, scale, cfg=cfg, poison=True)
        got = dict(o=o, state=st, dq=dq, dk=dk_, dv=dv_, dg=dg, dbeta=dbeta, ds0=ds0)
        return [_judge(row, got, ref, base)]
    except Exception as e:  # noqa: BLE001
        return [dict(row, status="error", errors=[f"{type(e).__name__}: {e}"[:500]])]


def correctness_gla(dtype, b=2, h=4, t=1000, dk=128, dv=128, variant="default", over=None):
    """Triton GLA (per-channel gates, logsigmoid / 16) against the float64 chunked form: forward, final state
    and every gradient, with the kernels' default config updated by ``over`` (a sweep variant's keys)."""
    from attnzoo.linear import triton_gla as tg
    torch.manual_seed(hash(("gla", str(dtype))) % 1000)
    q, k, v = (torch.randn(b, h, t, d, device=DEV).to(dtype) for d in (dk, dk, dv))
    g = F.logsigmoid(torch.randn(b, h, t, dk, device=DEV)) / 16
    s0 = torch.randn(b, h, dk, dv, device=DEV)
    do = torch.randn(b, h, t, dv, device=DEV).to(dtype)
    ds = torch.randn(b, h, dk, dv, device=DEV)
    scale = dk ** -0.5
    x = dict(q=q, k=k, v=v, g=g, s0=s0)

    def chunk64(q, k, v, g, s0):
        return _core.chunk_gated_linear(q * scale, k, v, g, s0, 64)

    def recurrence(q, k, v, g, s0):
        return _core.recurrent(_core.step_gated_linear, q * scale, k, v, g, None, s0)

    row = dict(kind="correctness", check="gla-triton", variant=variant, dtype=str(dtype).split(".")[-1],
               gate="logsigmoid/16", B=b, H=h, T=t, dk=dk, dv=dv, **env())
    try:
        ref = grads_of(chunk64, {n: a.double() for n, a in x.items()}, do.double(), ds.double())
        base = grads_of(recurrence, {n: a.to(dtype) for n, a in x.items()}, do, ds) if dtype != torch.float32 \
            else None
        cfg = variant_cfg("gla", tg.config(dk, dv, dtype, q.device), over or {})
        o, st = tg.fwd(q, k, v, g, s0, scale, cfg=cfg, poison=True)
        dq, dk_, dv_, dg, ds0 = tg.bwd(do, ds, q, k, v, g, s0, scale, cfg=cfg, poison=True)
        got = dict(o=o, state=st, dq=dq, dk=dk_, dv=dv_, dg=dg, ds0=ds0)
        return [_judge(row, got, ref, base)]
    except Exception as e:  # noqa: BLE001
        return [dict(row, status="error", errors=[f"{type(e).__name__}: {e}"[:500]])]


# ----------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------

def graphed(fn):
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    return gr.replay


def _packed_sets(text):
    """'64x64-512,128x128-2048' -> [(64, 64, 512), (128, 128, 2048)] (argparse type)."""
    out = []
    for part in text.split(","):
        try:
            n, rng = part.strip().split("x")
            lo, hi = rng.split("-")
            out.append((int(n), int(lo), int(hi)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad packed set {part!r}: expected NSEQxLO-HI, e.g. 64x64-512") from None
        if not (out[-1][0] >= 1 and 1 <= out[-1][1] <= out[-1][2]):
            raise argparse.ArgumentTypeError(f"bad packed set {part!r}: need NSEQ >= 1 and 1 <= LO <= HI")
    return out


def packed_inputs(nseq, lo, hi, dev, h=None, d=None):
    """``nseq`` sequence lengths uniform in [lo, hi] (seed 5), their cu_seqlens and packed Gated DeltaNet inputs
    (B = 1, bf16 q / k / v / dO, keys L2-normalised, float32 gates logsigmoid / 16 and beta):
    -> (lens, cu_seqlens, (q, k, v, g, beta), dO)."""
    h, d, dt = h or H, d or D, torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    lens = torch.randint(lo, hi + 1, (nseq,), generator=gen).tolist()
    cu = torch.tensor([0] + lens, device=dev).cumsum(0)
    t = int(cu[-1])
    q, k, v, do = (torch.randn(1, h, t, d, device=dev, dtype=dt) for _ in range(4))
    k = F.normalize(k.float(), dim=-1).to(dt)
    g = F.logsigmoid(torch.randn(1, h, t, device=dev)) / 16
    beta = torch.sigmoid(torch.randn(1, h, t, device=dev))
    return lens, cu, (q, k, v, g, beta), do


def packed(reps, nseq=64, lo=64, hi=512):
    """Packed variable-length input (cu_seqlens, B = 1): ``nseq`` sequences of uniform random lengths in [lo, hi],
    Gated DeltaNet on the Triton kernels, fwd and fwd+bwd through the public op, the sequences grouped into padded
    batches (`_core.run_sequences`) by the default cost model (`_core.length_buckets`: padded tokens + a cost per
    group), by cheaper and dearer groups (2048 and 32768 tokens a group: more groups, less padding, and the
    reverse) and by the greedy waste bound 1.25 (the rule before the cost model), each in two rounds (the second in
    reverse order), then one call per sequence, same inputs."""
    from attnzoo.linear import _core, gated_delta_rule
    dev = DEV
    lens, cu, (q, k, v, g, beta), do = packed_inputs(nseq, lo, hi, dev)
    t = int(cu[-1])
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    orig_run, orig_buckets = _core.run_sequences, _core.length_buckets
    default_cost = _core.group_tokens(H, D, D)
    modes = [("cost", dict(group_cost=default_cost)), ("cost-2k", dict(group_cost=2048)),
             ("cost-32k", dict(group_cost=32768)), ("greedy-1.25", dict(waste=1.25))]
    # two rounds, the second in reverse order (a mode timed first also pays the allocator's growth and any late
    # compilation: the first H100 run of 2026-12-05 put the first mode's p20 and p80 2x apart), then one call per
    # sequence once
    plan = [(1, m) for m in modes] + [(2, m) for m in modes[::-1]] + [(1, ("per-sequence", None))]
    rows = []
    for rnd, (mode, kw) in plan:
        buckets = orig_buckets(lens, **kw) if kw else [[n] for n in range(nseq)]
        groups, padded = len(buckets), sum(len(b) * max(lens[n] for n in b) for b in buckets)
        base = dict(kind="packed", op="gdn", sequences=nseq, lengths=f"{lo}-{hi}", tokens=t, groups=groups, H=H,
                    D=D, dtype="bfloat16", grouping=mode, round=rnd, padded_tokens=padded, **env())

        def run_seq(*a, batched=True, _mode=mode, **kw2):
            return orig_run(*a, batched=batched and _mode != "per-sequence", **kw2)
        _core.run_sequences = run_seq
        _core.length_buckets = lambda *a, _b=buckets, **k2: _b
        try:
            def fwd():
                return gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, backend="triton")

            def fb():
                o = gated_delta_rule(*leaves, cu_seqlens=cu, backend="triton")[0]
                torch.autograd.grad(o, leaves, do)
            for direction, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                r = time_fn(fn, device=dev, warmup=5, reps=reps, max_time_s=3.0)
                rows.append(_record(base, "gdn-triton-" + mode, direction, r, t))
                print(f"  packed {nseq} seqs of {lo}-{hi} ({t} tokens, {groups} groups, {padded} padded) {mode:<13}"
                      f"{direction:<8} round {rnd}{r['median_ms'] or float('nan'):9.3f} ms (p20 "
                      f"{r['p20_ms'] or float('nan'):.3f}, p80 {r['p80_ms'] or float('nan'):.3f})", flush=True)
        finally:
            _core.run_sequences, _core.length_buckets = orig_run, orig_buckets
    return rows


def decode(b, reps):
    dev = DEV
    dt = torch.bfloat16
    q, k, v = (torch.randn(b, H, D, device=dev, dtype=dt) for _ in range(3))
    g = F.logsigmoid(torch.randn(b, H, device=dev))
    s = torch.randn(b, H, D, D, device=dev) * 0.01
    nbytes = 2 * b * H * D * D * 4 + 4 * b * H * D * 2 + b * H * 4
    peak = hbm_peak_bytes_s(torch.cuda.get_device_name()) if dev == "cuda" else None
    base = dict(kind="decode", B=b, H=H, dk=D, dv=D, dtype="bfloat16", state_dtype="float32", bytes=nbytes, **env())
    rows = []
    fns = {
        "triton-inplace": lambda: tk.step(q, k, v, g, s, 0.1, inplace=True),
        "triton": lambda: tk.step(q, k, v, g, s, 0.1),
        "torch": lambda: _core.step_gated_linear(q.float() * 0.1, k.float(), v.float(), g, s),
    }
    rec = fla_recurrent()
    if rec is not None:
        t1 = lambda x: x.unsqueeze(1)  # noqa: E731 - [B, 1, H, D]
        fns["fla-fused-recurrent"] = lambda: rec(t1(q), t1(k), t1(v), g=g.unsqueeze(1), scale=0.1, initial_state=s,
                                                 output_final_state=True)
    else:
        rows.append(dict(base, backend="fla-fused-recurrent", mode="-", status="unsupported",
                         message="flash-linear-attention not importable"))
    # the fused step of the other ops (triton_kernels.step with a per-channel gate and / or the delta rule)
    # against their PyTorch step; bytes: the state read and written, q, k, v, o, the gate and beta
    gv = F.logsigmoid(torch.randn(b, H, D, device=dev)) / 16
    beta = torch.sigmoid(torch.randn(b, H, device=dev))
    kn = F.normalize(k.float(), dim=-1).to(dt)
    extra = {}
    for op, kind, gate, bt in (("gla", "linear", gv, None), ("gdn", "delta", g, beta), ("kda", "delta", gv, beta)):
        more = gate.numel() * 4 + (0 if bt is None else bt.numel() * 4)
        kk = k if bt is None else kn
        extra[op + "-step"] = (lambda kind=kind, kk=kk, gate=gate, bt=bt: tk.step(q, kk, v, gate, s, 0.1, beta=bt),
                               nbytes - b * H * 4 + more)
        extra[op + "-step-torch"] = (lambda kind=kind, kk=kk, gate=gate, bt=bt: _core.forward_step(
            kind, q, kk, v, gate, bt, s, 0.1, backend="torch"), nbytes - b * H * 4 + more)
    # fla's fused recurrent kernels on one token ([B, 1, H, ...] layout, same state layout), when importable
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec_gdn
        from fla.ops.gla import fused_recurrent_gla as fla_rec_gla
    except Exception as e:  # noqa: BLE001 - a missing peer library is recorded, never fatal
        for op in ("gla", "gdn", "kda"):
            rows.append(dict(base, backend=f"fla-{op}-step", mode="-", status="unsupported",
                             message=f"fla fused_recurrent not importable: {type(e).__name__}"))
    else:
        t1 = lambda x: x.unsqueeze(1)  # noqa: E731
        more_v, more_s = gv.numel() * 4, g.numel() * 4
        extra["fla-gla-step"] = (lambda: fla_rec_gla(t1(q), t1(k), t1(v), gk=t1(gv), scale=0.1, initial_state=s,
                                                     output_final_state=True), nbytes - b * H * 4 + more_v)
        extra["fla-gdn-step"] = (lambda: fla_rec_gdn(t1(q), t1(kn), t1(v), g=t1(g), beta=t1(beta), scale=0.1,
                                                     initial_state=s, output_final_state=True),
                                 nbytes - b * H * 4 + more_s + beta.numel() * 4)
        extra["fla-kda-step"] = (lambda: fla_rec_gdn(t1(q), t1(kn), t1(v), gk=t1(gv), beta=t1(beta), scale=0.1,
                                                     initial_state=s, output_final_state=True),
                                 nbytes - b * H * 4 + more_v + beta.numel() * 4)
    fns = {name: (fn, nbytes) for name, fn in fns.items()}
    fns.update(extra)
    # the reachable roof: a plain device copy of the state (its bytes read and written once, as a step does)
    dst = torch.empty_like(s)
    fns["copy-roof"] = (lambda: dst.copy_(s), 2 * s.numel() * 4)
    for name, (fn, nb) in fns.items():
        for mode in ("graph", "eager"):
            try:
                f = graphed(fn) if mode == "graph" else fn
                r = time_fn(f, device=dev, warmup=3, reps=reps, max_time_s=2.0)
            except Exception as e:  # noqa: BLE001
                r = dict(status="error", message=str(e)[:300], median_ms=None, p20_ms=None, p80_ms=None,
                         compile_ms=None, peak_mem_bytes=None, reps=0)
            ok = r["status"] == "ok"
            bw = nb / (r["median_ms"] * 1e-3) if ok else None
            rows.append(dict(base, backend=name, mode=mode, bytes=nb, status=r["status"], message=r["message"],
                             median_ms=r["median_ms"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"],
                             gbps=bw / 1e9 if ok else None,
                             frac_peak=bw / peak if ok and peak else None, peak_bytes_s=peak))
    return rows


# ----------------------------------------------------------------------------------------------------------

def main():
    global SKIP_TORCH, OPS, SINK, FLA_UNGUARDED
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time block-size variants of the Triton kernels")
    ap.add_argument("--quick", action="store_true", help="one shape per token count, B in {1, 16, 64} for decode")
    ap.add_argument("--check", choices=("full", "quick", "none"), default="full",
                    help="correctness checks before timing: every dtype (full), bf16 only (quick), or none")
    ap.add_argument("--no-torch", action="store_true", help="leave out the PyTorch chunk-form baselines")
    ap.add_argument("--ops", default=",".join(sorted(OPS)),
                    help=f"comma-separated ops of the speed table (default all: {','.join(sorted(OPS))})")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated BxT speed shapes, e.g. 8x2048,1x8192 (default: the built-in list)")
    ap.add_argument("--no-decode", action="store_true", help="leave out the decode table")
    ap.add_argument("--profile-ops", default="", help="comma-separated ops (simple_gla, gla, gdn, kda) to "
                    "profile per kernel (one fwd+bwd at B=8, T=2048), before everything else")
    ap.add_argument("--sweep-only", default="", help="comma-separated substrings: only the sweep variants whose "
                    "names contain one (and the default)")
    ap.add_argument("--sweep-ops", default="", help="comma-separated ops (gla, gdn, kda) whose Triton config "
                    "variants to time at B=8, T=2048 (with the forward's accuracy), before the speed table")
    ap.add_argument("--sweep-shape", default="8x2048", help="BxT of the --sweep-ops variants (default 8x2048)")
    ap.add_argument("--packed", action="store_true", help="also time packed variable-length input (cu_seqlens): "
                    "Gated DeltaNet on --packed-sets, the padded batches by each grouping vs one call per sequence")
    ap.add_argument("--packed-sets", type=_packed_sets, default=[(64, 64, 512)],
                    help="packed sets as NSEQxLO-HI, comma-separated (default 64x64-512)")
    ap.add_argument("--gdn-variants", default="", help="comma-separated Gated DeltaNet sweep variants (names joined "
                    "by '+' combine) timed in the speed table through autograd as gdn-triton[NAME], next to fla")
    ap.add_argument("--kda-variants", default="", help="comma-separated KDA sweep variants (names joined by '+' "
                    "combine) timed in the speed table through autograd as kda-triton[NAME], next to SDPA")
    ap.add_argument("--fla-unguarded", action="store_true", help="time fla's gated backward on Hopper although "
                    "fla refuses it there with Triton < 3.7.1 (#640), and compare its gradients with ours")
    ap.add_argument("--profile-shape", default="8x2048", help="BxT of --profile-ops (default 8x2048)")
    ap.add_argument("--profile-fla", default="", help="comma-separated ops (gla, kda): flash-linear-attention's "
                    "per-kernel table at B=8, T=2048, after the speed table (which warms its autotuner)")
    args = ap.parse_args()
    GDN_SPEED_VARIANTS[:] = list(filter(None, args.gdn_variants.split(",")))
    for spec in GDN_SPEED_VARIANTS:
        variant_overrides("gdn", spec)  # an unknown name stops here, before any timing
    KDA_SPEED_VARIANTS[:] = list(filter(None, args.kda_variants.split(",")))
    for spec in KDA_SPEED_VARIANTS:
        variant_overrides("kda", spec)
    SKIP_TORCH = args.no_torch
    try:
        prof_b, prof_t = (int(x) for x in args.profile_shape.split("x"))
        assert prof_b > 0 and prof_t > 0
    except (ValueError, AssertionError):
        ap.error(f"--profile-shape: expected BxT, got {args.profile_shape!r}")
    try:
        sweep_b, sweep_t = (int(x) for x in args.sweep_shape.split("x"))
        assert sweep_b > 0 and sweep_t > 0
    except (ValueError, AssertionError):
        ap.error(f"--sweep-shape: expected BxT, got {args.sweep_shape!r}")
    ops = set(args.ops.split(","))
    if not ops <= OPS:
        ap.error(f"--ops: unknown {sorted(ops - OPS)}; choose from {sorted(OPS)}")
    OPS = ops
    try:
        custom = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
        assert custom is None or all(len(c) == 2 and min(c) > 0 for c in custom)
    except (ValueError, AssertionError):
        ap.error(f"--shapes: expected BxT[,BxT...], got {args.shapes!r}")
    if not torch.cuda.is_available():
        sys.exit("linear_bench.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "linear_bench.jsonl")
    rows = []
    with open(path, "a") as f:
        def emit(new):
            rows.extend(new)
            for r in new:
                f.write(json.dumps(r, default=str) + "\n")
            f.flush()

        t0 = time.time()
        full = args.check == "full"
        if args.check != "none":
            for dtype in ((torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)):
                for gate in (("random", "none") if full else ("random",)):
                    emit(correctness(dtype, gate))
            if full:
                emit(correctness(torch.bfloat16, "random", dk=64, dv=128, t=777))
            emit(step_correctness())
            emit(step_correctness_gated())
            for dtype in ((torch.bfloat16, torch.float32) if full else (torch.bfloat16,)):
                emit(correctness_gdn(dtype))
                emit(correctness_gdn(dtype, kda=True))
                emit(correctness_gla(dtype))
            for name, over in GLA_CHECK_VARIANTS:  # sweep variants that would change GLA's precision
                emit(correctness_gla(torch.bfloat16, variant=name, over=over))
            for name, over in KDA_CHECK_VARIANTS:
                emit(correctness_gdn(torch.bfloat16, kda=True, variant=name, over=over))
            for name, over in GDN_CHECK_VARIANTS:
                emit(correctness_gdn(torch.bfloat16, variant=name, over=over))
        checks = [r for r in rows if r["kind"] == "correctness" and r.get("check") in ("triton", "step", "gla-step", "gdn-step", "kda-step", "gdn-triton", "kda-triton",
                                                                                   "gla-triton")]
        bad = [r for r in checks if r["status"] != "pass"]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} pass ({time.time() - t0:.0f} s)")
        for r in bad:
            print("  FAIL", r.get("dtype"), r.get("gate"), r.get("check"), r.get("errors"))
        for r in rows:
            if r["kind"] == "correctness" and r.get("check") == "triton" and "detail" in r:
                print(f"  {r['dtype']:<9}{r['gate']:<7}{r['dk']:>4}x{r['dv']:<4}" + "  ".join(
                    f"{n} {d['err'] / max(d['fp32_tier_err'], 1e-30):.2f}x" for n, d in r["detail"].items())
                    + "   (max err / PyTorch float32-compute tier's)")
            if r.get("check") in ("gdn-triton", "kda-triton", "gla-triton") and "detail" in r:
                print(f"  {r['check'][:3]} {r.get('variant', '')} {r['dtype']:<9}" + "  ".join(
                    f"{n} {d['rel_rmse']:.2g}" for n, d in r["detail"].items()) + "   (rel RMSE vs float64)")
            if r.get("check") == "fla" and r["status"] == "info":
                print(f"  fla {r['dtype']:<9}{r['gate']:<7} o max err {r['o_err']:.3g} "
                      f"(triton {r['triton_o_err'] or float('nan'):.3g})")

        # decode first (seconds), then the speed shapes, most wanted first, so that a time-boxed run keeps
        # the comparisons that matter: B*T = 16K at T = 2048 (the shape), then B=1 at T = 8K and 64K
        # (the scaling ratio, 64K over 8K, ideal 8), then 16K and B*T = 64K
        if not args.no_decode:
            for b in ((1, 16, 64) if args.quick else (1, 2, 4, 8, 16, 32, 64)):
                emit(decode(b, args.reps))
            print(f"  done decode ({time.time() - t0:.0f} s)", flush=True)
        shapes = [(8, 2048), (1, 8192), (1, 65536), (1, 16384), (32, 2048)]
        if not args.quick:
            shapes += [(2, 8192), (8, 8192)]
        SINK = lambda row: emit([row])  # noqa: E731
        prof_ops = list(filter(None, args.profile_ops.split(",")))
        bad_ops = [op for op in prof_ops if op not in ("simple_gla", "gla", "gdn", "kda")]
        if bad_ops:
            ap.error(f"--profile-ops: unknown {bad_ops}; choose from simple_gla, gla, gdn, kda")
        if prof_ops:
            profile_ops(prof_ops, b=prof_b, t=prof_t)
        for op in filter(None, args.sweep_ops.split(",")):
            if op not in ("gla", "gdn", "kda"):
                ap.error(f"--sweep-ops: unknown op {op!r}; choose from gla, gdn, kda")
            sweep_op(op, args.reps, only=tuple(filter(None, args.sweep_only.split(","))), b=sweep_b, t=sweep_t)
        if args.fla_unguarded:
            FLA_UNGUARDED = True
            print(unguard_fla(), flush=True)
        for b, t in custom or shapes:
            speed(b, t, args.reps)  # rows go to the file (and to ``rows``) through SINK as they are measured
            print(f"  done B={b} T={t} ({time.time() - t0:.0f} s)", flush=True)
        if args.fla_unguarded:
            emit(fla_agreement(*(custom or shapes)[0]))
        fla_prof = list(filter(None, args.profile_fla.split(",")))
        if fla_prof:
            profile_fla(fla_prof)
        if args.packed:
            for nseq, lo, hi in args.packed_sets:
                emit(packed(args.reps, nseq, lo, hi))
        if args.sweep:
            emit(sweep(args.reps, sweep_b, sweep_t))
    report(rows)
    print(f"wrote {path}")


def report(rows):
    """The tables: correctness summary lines are printed as they come; speed, sweep, decode here."""
    print(f"\n{'B':>3}{'T':>7}  {'backend':<13}{'fwd ms':>12}{'f+b ms':>12}{'Mtok/s f+b':>11}"
          f"  {'vs triton (f / f+b)':>20}")
    sp = {}
    for r in rows:
        if r["kind"] == "speed":
            sp.setdefault((r["B"], r["T"]), {}).setdefault(r["backend"], {})[r["direction"]] = r
    for (b, t), by in sp.items():
        tri = by.get("triton", {})
        for name, d in by.items():
            cells = []
            for direction in ("fwd", "fwd+bwd"):
                r = d.get(direction)
                ok = r and r["status"] == "ok"
                cells.append(f"{r['median_ms']:12.3f}" if ok else f"{(r or {}).get('status', '-')[:11]:>12}")
            fbr = d.get("fwd+bwd")
            mt = f"{fbr['mtok_per_s']:11.1f}" if fbr and fbr["status"] == "ok" else f"{'':>11}"
            rel = []
            for direction in ("fwd", "fwd+bwd"):
                a, c = tri.get(direction), d.get(direction)
                ok = a and c and a["status"] == "ok" and c["status"] == "ok"
                rel.append(f"{c['median_ms'] / a['median_ms']:.2f}x" if ok else "-")
            print(f"{b:>3}{t:>7}  {name:<13}{cells[0]}{cells[1]}{mt}  {' / '.join(rel):>20}")
    if any(r["kind"] == "sweep" for r in rows):
        print("\nsweep, ms:")
        sw = {}
        for r in rows:
            if r["kind"] == "sweep":
                sw.setdefault((r.get("op", "simple_gla"), r["variant"]), {})[r["direction"]] = r["median_ms"]
        for (op, name), d in sw.items():
            print(f"  {op:<11}{name:<14} fwd {d.get('fwd') or float('nan'):8.3f}  bwd "
                  f"{d.get('bwd') or float('nan'):8.3f}")
    print(f"\n{'B':>3}  {'backend':<22}{'mode':<7}{'us':>9}{'GB/s':>9}{'peak':>7}")
    for r in rows:
        if r["kind"] != "decode":
            continue
        if r["status"] != "ok":
            print(f"{r['B']:>3}  {r['backend']:<22}{r['mode']:<7} {r['status']}: {r.get('message', '')[:60]}")
            continue
        print(f"{r['B']:>3}  {r['backend']:<22}{r['mode']:<7}{r['median_ms'] * 1e3:9.1f}{r['gbps']:9.0f}"
              + (f"{r['frac_peak']:7.1%}" if r.get("frac_peak") is not None else f"{'-':>7}"))


if __name__ == "__main__":
    main()
