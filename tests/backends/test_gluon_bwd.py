"""The Gluon dk / dv kernel (cfg GLUON_BWD, `backends/triton/gluon_bwd.py`): Hopper only, so the kernel tests run on
the GPU machine; on CPU the plan's rules. dq comes from the Triton dq kernel either way. Against the float64
reference with the protocol's rule, NaN-poisoned gradients."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton import ops, tuning
from attnzoo.testing import check_close

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
gpu = pytest.mark.skipif(not HOPPER, reason="the Gluon dk / dv kernel runs on Hopper GPUs only")

PATTERNS = {"window": az.SlidingWindow(200), "causal": az.Causal(), "sinks+window": az.SlidingWindow(300) | az.Sinks(4),
            "full": None, "chunked": az.Chunked(192), "window-both": az.SlidingWindow(100, 37),
            "prefix-lm": az.PrefixLM(100)}


def _grads(q, k, v, do, pattern, cfg):
    # (dq, dk, dv) through ops.attention_bwd with cfg, the float64 reference's and the low-precision baseline's
    scale = q.shape[-1] ** -0.5
    out, lse = ops.attention_fwd(q, k, v, pattern, scale)
    got = ops.attention_bwd(do, None, q, k, v, out, lse, pattern, scale, cfg=cfg, poison=True)
    xr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(reference_attention(*xr, pattern, scale)[0], xr, do.double())
    g = q.shape[1] // k.shape[1]
    xb = [t.detach().requires_grad_() for t in (q, k, v)]
    qb, kb, vb = xb[0], xb[1].repeat_interleave(g, 1), xb[2].repeat_interleave(g, 1)
    s = (qb @ kb.transpose(-1, -2)).float() * scale
    if pattern is not None:
        lq, lk = q.shape[2], k.shape[2]
        qi, ki = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
        s = s.masked_fill(~pattern.mask(qi, ki, lq, lk), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    base = torch.autograd.grad(p @ vb, xb, do)
    return got, ref, base


def _bwd_cfg(d, **extra):
    return dict(tuning.default("bwd", d, d, "local"), GLUON_BWD=extra or True)


@gpu
@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,extra", [(128, {}), (64, {}), (128, dict(num_stages=3)), (128, dict(ACC_INIT=True)),
                                     (128, dict(FUSED_DQ=True)), (64, dict(FUSED_DQ=True)),
                                     (128, dict(FUSED_DQ=True, num_stages=3)),
                                     (128, dict(ROWS=True)), (64, dict(ROWS=True, num_stages=3)),
                                     (128, dict(ROWS=True, FUSED_DQ=True)), (64, dict(ROWS=True, FUSED_DQ=True)),
                                     (128, dict(ROWS=2)), (128, dict(ROWS=2, FUSED_DQ=True)),
                                     (128, dict(GLUON_DQ=True)), (64, dict(GLUON_DQ=True, DQ_STAGES=3)),
                                     (128, dict(ROWS=2, GLUON_DQ=True)),
                                     (128, dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3, SEP_DELTA=True)),
                                     (128, dict(GLUON_DQ=True, DQ_STAGES=3, TRITON_DKDV=True)),
                                     (64, dict(GLUON_DQ=True, TRITON_DKDV=True)),
                                     (128, dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True)),
                                     (64, dict(GLUON_DQ=True, DQ_PERSIST=True, DQ_QBUF=1, TRITON_DKDV=True)),
                                     (128, dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True,
                                                DQ_PIPE=True)),
                                     (64, dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_PIPE=True,
                                               TRITON_DKDV=True)),
                                     (128, dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_PREF=True,
                                                TRITON_DKDV=True)),
                                     (128, dict(ROWS=2, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True,
                                                DQ_PIPE=True, DQ_PREF=True)),
                                     (128, dict(T_STATS=True)), (64, dict(T_STATS=True, num_stages=3)),
                                     (128, dict(T_STATS=True, num_stages=3, GLUON_DQ=True, DQ_STAGES=3,
                                                DQ_PERSIST=True, DQ_PIPE=True, DQ_PREF=True)),
                                     (128, dict(T_STATS=True, num_stages=3, TAIL_ORDER=2)),
                                     (64, dict(T_STATS=True, TAIL_ORDER=True)), (128, dict(ROWS=2, TAIL_ORDER=1)),
                                     (128, dict(T_STATS=True, num_stages=3, TAIL_ORDER=True, SPLIT_CAP=2))],
                         ids=["d128", "d64", "d128-s3", "d128-accinit", "d128-fused", "d64-fused", "d128-fused-s3",
                              "d128-rows", "d64-rows-s3", "d128-rows-fused", "d64-rows-fused", "d128-rows2",
                              "d128-rows2-fused", "d128-gdq", "d64-gdq-s3", "d128-rows2-gdq", "d128-rows2-gdq-sep",
                              "d128-gdq-s3-tkv", "d64-gdq-tkv", "d128-rows2-gdqp", "d64-gdqp-q1-tkv",
                              "d128-rows2-gdqp-pipe", "d64-gdqp-pipe-tkv", "d128-gdqp-pref-tkv",
                              "d128-rows2-gdqp-pipe-pref", "d128-tstats", "d64-tstats-s3", "d128-tstats-s3-gdqp",
                              "d128-tstats-s3-tail2", "d64-tstats-tail", "d128-rows2-tail1", "d128-tstats-tail-cap2"])
def test_gluon_dkdv_matches_reference(name, dtype, d, extra):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, h, 512, d, device="cuda", dtype=dtype, generator=g) for h in (8, 2, 2, 8))
    before, before_dq = ops.GLUON_BWD_LAUNCHES, ops.GLUON_DQ_LAUNCHES
    got, ref, base = _grads(q, k, v, do, PATTERNS[name], _bwd_cfg(d, **extra))
    # (TRITON_DKDV: the Triton dk / dv kernel with the Gluon dq kernel)
    assert (ops.GLUON_BWD_LAUNCHES > before) != bool(extra.get("TRITON_DKDV")), "the wrong dk / dv kernel ran"
    if extra.get("GLUON_DQ") and name in ("window", "causal", "sinks+window", "full"):  # (the ws forward's patterns)
        assert ops.GLUON_DQ_LAUNCHES > before_dq, "the Gluon dq kernel did not run"
    for nm, x, r, bl in zip(("dq", "dk", "dv"), got, ref, base):
        check_close(nm, x, r, baseline=bl)


def _check_gluon_dq_with_lse(name, seed, b, hq, hkv, length, extra):
    # attention_bwd with a gradient on lse as well as on out, cfg GLUON_BWD=extra: the Gluon dq kernel must run, and
    # every gradient must match float64 (the Triton kernels' as the baseline)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, length, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for h in (hq, hkv, hkv, hq))
    dlse = torch.randn(b, hq, length, device="cuda", generator=g)
    pattern, scale = PATTERNS[name], 128 ** -0.5
    out, lse = ops.attention_fwd(q, k, v, pattern, scale)
    before = ops.GLUON_DQ_LAUNCHES
    got = ops.attention_bwd(do, dlse, q, k, v, out, lse, pattern, scale, poison=True, cfg=_bwd_cfg(128, **extra))
    assert ops.GLUON_DQ_LAUNCHES > before, "the Gluon dq kernel did not run"
    triton_cfg = {key: val for key, val in tuning.default("bwd", 128, 128, "local").items() if key != "GLUON_BWD"}
    base = ops.attention_bwd(do, dlse, q, k, v, out, lse, pattern, scale, cfg=triton_cfg)
    xr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = reference_attention(*xr, pattern, scale)
    ref = torch.autograd.grad((ro, rl), xr, (do.double(), dlse.double()))
    for nm, x, r, bl in zip(("dq", "dk", "dv"), got, ref, base):
        check_close(nm, x, r, baseline=bl)


@gpu
@pytest.mark.parametrize("sep", [False, True], ids=["delta-in-dq", "delta-kernel"])
@pytest.mark.parametrize("name", ["window", "sinks+window"])
def test_gluon_dq_with_lse_gradient(name, sep):
    # the Gluon dq kernel writes delta = rowsum(O dO) - dlse itself (or reads attn_bwd_delta's: SEP_DELTA)
    _check_gluon_dq_with_lse(name, 2, 2, 8, 2, 1024,
                             dict(ROWS=2, GLUON_DQ=True, DQ_STAGES=3, **(dict(SEP_DELTA=True) if sep else {})))


@gpu
@pytest.mark.parametrize("extra", [dict(DQ_STAGES=3, TRITON_DKDV=True), dict(DQ_QBUF=1, TRITON_DKDV=True),
                                   dict(ROWS=2, num_stages=3, DQ_STAGES=3),
                                   dict(DQ_STAGES=3, TRITON_DKDV=True, DQ_PIPE=True),
                                   dict(DQ_QBUF=1, DQ_STAGES=3, TRITON_DKDV=True, DQ_PIPE=True),
                                   dict(DQ_STAGES=3, TRITON_DKDV=True, DQ_PREF=True),
                                   dict(DQ_QBUF=1, DQ_STAGES=3, TRITON_DKDV=True, DQ_PIPE=True, DQ_PREF=True),
                                   dict(DQ_STAGES=3, num_stages=3, T_STATS=True, DQ_PIPE=True, DQ_PREF=True)],
                         ids=["s3-tkv", "q1-tkv", "s3-rows2", "s3-tkv-pipe", "q1-s3-tkv-pipe", "s3-tkv-pref",
                              "q1-s3-tkv-pipe-pref", "s3-tstats"])
@pytest.mark.parametrize("name", ["window", "sinks+window", "causal"])
def test_gluon_dq_persistent_walks_many_items(name, extra):
    # the persistent dq kernel (DQ_PERSIST) with several work items a program (4096 tokens, 16 heads: 512 items on
    # at most one program per SM), so its Q / dO buffers and K / V ring run on across items
    _check_gluon_dq_with_lse(name, 3, 1, 16, 4, 4096, dict(GLUON_DQ=True, DQ_PERSIST=True, **extra))


@gpu
@pytest.mark.parametrize("extra", [{}, dict(T_STATS=True, num_stages=3, TAIL_ORDER=True), dict(TAIL_ORDER=5)],
                         ids=["default", "tstats-tail", "tail5"])
def test_gluon_dkdv_split_columns_cross_and_long(extra):
    # sinks: block 0's column is seen by every query block, so it is split over several work items (float32
    # partials summed by attn_bwd_reduce); a cross shape (fewer queries than keys, bottom-right); 4096 tokens.
    # TAIL_ORDER: the 1-D grid (its workspace rows indexed by its own count of (batch, KV head)s)
    g = torch.Generator(device="cuda").manual_seed(1)
    for (lq, lk), pattern in (((2048, 2048), az.SlidingWindow(300) | az.Sinks(4)), ((512, 1536), az.SlidingWindow(300)),
                              ((4096, 4096), az.Causal())):
        q, do = (torch.randn(1, 8, lq, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        k, v = (torch.randn(1, 2, lk, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        items, red, nslots = ops._bwd_plan(pattern, lq, lk, 64, 128, 8, str(q.device))
        before = ops.GLUON_BWD_LAUNCHES
        got, ref, base = _grads(q, k, v, do, pattern, _bwd_cfg(128, **extra))
        assert ops.GLUON_BWD_LAUNCHES > before
        for nm, x, r, bl in zip(("dq", "dk", "dv"), got, ref, base):
            check_close(nm, x, r, baseline=bl)
        if lq == 2048:
            assert red.shape[0] > 0 and nslots > 0, "the sinks' column should be split"


def test_gluon_bwd_plan_says_why_not_on_cpu():
    q = torch.zeros(1, 2, 128, 64)
    cfg = _bwd_cfg(64)
    ok, why = ops.gluon_bwd_plan(q, q[:, :1], q[:, :1], q, None, cfg)
    assert not ok and "CUDA" in why
    assert ops.gluon_bwd_plan(q, q[:, :1], q[:, :1], q, None, dict(cfg, GLUON_BWD=False)) == \
        (False, "not asked for (cfg GLUON_BWD)")
    assert ops._gluon_bwd_cfg(q, q[:, :1], q[:, :1], q, None, cfg) is None  # so the Triton kernel runs


def test_gluon_bwd_settings_are_checked_everywhere():
    # the settings as the launch takes them; a wrong one is an error even where the kernel would not run (CPU here)
    base = dict(num_stages=2, REGS=240, ACC_INIT=False, FUSED_DQ=False)
    assert ops.gluon_bwd_settings(True, 128) == base
    assert ops.gluon_bwd_settings(dict(ROWS=True, FUSED_DQ=True), 128) == dict(base, FUSED_DQ=True, ROWS=1)
    assert ops.gluon_bwd_settings(dict(ROWS=2), 128) == dict(base, ROWS=2)
    with pytest.raises(ValueError, match="ROWS must be"):
        ops.gluon_bwd_settings(dict(ROWS=3), 128)
    for bad in (dict(ROW=True), dict(FUSED_DQ=True, DQ_LAG=True), dict(ROWS=2, PIPE=2),
                dict(ROWS=2, PINGPONG=True), dict(ROWS=2, ROWS_PREF=True)):  # (all four removed)
        with pytest.raises(ValueError, match="unknown settings \\['(ROW|DQ_LAG|PIPE|PINGPONG|ROWS_PREF)'\\]"):
            ops.gluon_bwd_settings(bad, 128)
    with pytest.raises(ValueError, match="ROWS"):
        ops.gluon_bwd_settings(dict(ROWS=True, ACC_INIT=True), 128)
    # shared memory: the fused transposed form fits a ring of 3 at D = 128 (it ran), the fused ROWS form does not
    assert ops.gluon_bwd_smem(ops.gluon_bwd_settings(dict(FUSED_DQ=True, num_stages=3), 128), 128) <= ops.GLUON_SMEM
    with pytest.raises(ValueError, match="shared memory"):
        ops.gluon_bwd_settings(dict(ROWS=True, FUSED_DQ=True, num_stages=3), 128)
    ops.gluon_bwd_settings(dict(ROWS=True, FUSED_DQ=True, num_stages=3), 64)  # (half the bytes at D = 64)
    ops.gluon_bwd_settings(dict(num_stages=3), 256)  # (D = 256 runs the Triton kernel: no limit to check)
    # S_AHEAD and DQ_BN (thirty-fourth session: slower on the H100, removed in the thirty-fifth) are unknown now
    for gone in (dict(ROWS=2, S_AHEAD=True), dict(GLUON_DQ=True, DQ_BN=128)):
        with pytest.raises(ValueError, match="unknown settings"):
            ops.gluon_bwd_settings(gone, 128)
    # T_STATS: the transposed form only
    assert ops.gluon_bwd_settings(dict(T_STATS=True, num_stages=3), 128) == dict(base, num_stages=3, T_STATS=True)
    for bad in (dict(ROWS=2, T_STATS=True), dict(FUSED_DQ=True, T_STATS=True), dict(ACC_INIT=True, T_STATS=True)):
        with pytest.raises(ValueError, match="T_STATS .* transposed form"):
            ops.gluon_bwd_settings(bad, 128)
    # TAIL_ORDER: True (the tail chosen per call) or a number of items; the Gluon dk / dv kernel's, like T_STATS
    assert ops.gluon_bwd_settings(dict(TAIL_ORDER=True), 128) == dict(base, TAIL_ORDER=True)
    assert ops.gluon_bwd_settings(dict(TAIL_ORDER=0), 128) == dict(base, TAIL_ORDER=0)
    assert ops.gluon_bwd_settings(dict(TAIL_ORDER=False), 128) == base
    for bad in (-1, 2.5, "all"):
        with pytest.raises(ValueError, match="TAIL_ORDER must be"):
            ops.gluon_bwd_settings(dict(TAIL_ORDER=bad), 128)
    # SPLIT_CAP: the dk / dv kernel's longest work item, in query blocks
    assert ops.gluon_bwd_settings(dict(SPLIT_CAP=9), 128) == dict(base, SPLIT_CAP=9)
    for bad in (0, True, 4.0, "9"):
        with pytest.raises(ValueError, match="SPLIT_CAP .* must be an int >= 1"):
            ops.gluon_bwd_settings(dict(SPLIT_CAP=bad), 128)
    for name in ("T_STATS", "TAIL_ORDER", "SPLIT_CAP"):
        with pytest.raises(ValueError, match=f"{name} changes the Gluon dk / dv kernel"):
            ops.gluon_bwd_settings({name: 1, "GLUON_DQ": True, "TRITON_DKDV": True}, 128)
    # the Gluon dq kernel: its ring checked, not with FUSED_DQ
    assert ops.gluon_bwd_settings(dict(GLUON_DQ=True), 128) == dict(base, GLUON_DQ=True, DQ_STAGES=2)
    assert ops.gluon_bwd_settings(dict(DQ_STAGES=3), 128) == dict(base, GLUON_DQ=True, DQ_STAGES=3)
    assert ops.gluon_bwd_settings(dict(GLUON_DQ=True, SEP_DELTA=True), 128) == \
        dict(base, GLUON_DQ=True, DQ_STAGES=2, SEP_DELTA=True)
    assert ops.gluon_bwd_settings(dict(DQ_STAGES=3, TRITON_DKDV=True), 128) == \
        dict(base, GLUON_DQ=True, DQ_STAGES=3, TRITON_DKDV=True)
    assert ops.gluon_bwd_settings(dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True), 128) == \
        dict(base, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_QBUF=2)
    assert ops.gluon_bwd_settings(dict(GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_PIPE=True), 128) == \
        dict(base, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_QBUF=2, DQ_PIPE=True)
    assert ops.gluon_bwd_settings(dict(GLUON_DQ=True, DQ_PERSIST=True, DQ_PREF=True), 128) == \
        dict(base, GLUON_DQ=True, DQ_STAGES=2, DQ_PERSIST=True, DQ_QBUF=2, DQ_PREF=True)
    for bad, msg in ((dict(GLUON_DQ=True, DQ_PERSIST=True, DQ_QBUF=3), "1 or 2"),
                     (dict(GLUON_DQ=True, DQ_QBUF=1), "needs GLUON_DQ and DQ_PERSIST"),
                     (dict(GLUON_DQ=True, DQ_PIPE=True), "DQ_PIPE .* needs GLUON_DQ and DQ_PERSIST"),
                     (dict(GLUON_DQ=True, DQ_PERSIST=True, DQ_PIPE=True), "DQ_PIPE needs DQ_STAGES >= 3"),
                     (dict(GLUON_DQ=True, DQ_PREF=True), "DQ_PREF .* needs GLUON_DQ and DQ_PERSIST"),
                     (dict(GLUON_DQ=True, DQ_STAGES=4, DQ_PERSIST=True), "Gluon dq kernel needs")):
        with pytest.raises(ValueError, match=msg):
            ops.gluon_bwd_settings(bad, 128)
    ops.gluon_bwd_settings(dict(GLUON_DQ=True, DQ_STAGES=4, DQ_PERSIST=True), 64)  # (half the bytes at D = 64)
    for only_dq in ("SEP_DELTA", "TRITON_DKDV", "DQ_PERSIST"):
        with pytest.raises(ValueError, match=f"{only_dq} .* needs GLUON_DQ"):
            ops.gluon_bwd_settings({only_dq: True}, 128)
    for bad, msg in ((dict(GLUON_DQ=True, FUSED_DQ=True), "exclude"), (dict(GLUON_DQ=True, DQ_STAGES=0), "1 .. 4"),
                     (dict(DQ_STAGES=True), "1 .. 4")):
        with pytest.raises(ValueError, match=msg):
            ops.gluon_bwd_settings(bad, 128)
    q = torch.zeros(1, 2, 128, 64)
    with pytest.raises(ValueError, match="unknown"):
        ops._gluon_bwd_cfg(q, q[:, :1], q[:, :1], q, None, dict(_bwd_cfg(64), GLUON_BWD=dict(STAGES=3)))


def test_gluon_bwd_cfg_is_ignored_where_it_does_not_apply():
    # on CPU (the interpreter) a GLUON_BWD config runs the Triton kernels, with the same gradients as without it
    if not ops.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, h, 64, 16, generator=g) for h in (2, 1, 1, 2))
    scale = 0.25
    out, lse = ops.attention_fwd(q, k, v, az.Causal(), scale)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    plain = ops.attention_bwd(do, None, q, k, v, out, lse, az.Causal(), scale, cfg=cfg)
    asked = ops.attention_bwd(do, None, q, k, v, out, lse, az.Causal(), scale, cfg=dict(cfg, GLUON_BWD=True))
    for a, b in zip(plain, asked):
        assert torch.equal(a, b)


def _pretended(monkeypatch, seed, pattern, settings, **patches):
    # the backward's host path where the Gluon plan says yes (pretended, on CPU): `_gluon_bwd_cfg` gives settings and
    # the named functions of ops are patched -> (the gradients asked with GLUON_BWD, the Triton kernels' on the Gluon
    # kernel's tiles (64 x 128) without it, (dO, out))
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, h, 128, 16, generator=g) for h in (2, 1, 1, 2))
    scale = 0.25
    out, lse = ops.attention_fwd(q, k, v, pattern, scale)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(ops, "_gluon_bwd_cfg", lambda *a: settings)
    for name, fn in patches.items():
        monkeypatch.setattr(ops, name, fn)
    asked = ops.attention_bwd(do, None, q, k, v, out, lse, pattern, scale, cfg=dict(cfg, GLUON_BWD=True))
    monkeypatch.undo()
    plain = ops.attention_bwd(do, None, q, k, v, out, lse, pattern, scale, cfg=dict(cfg, BM_KV=64, BN_KV=128))
    return asked, plain, (do, out)


def test_gluon_bwd_path_reaches_its_launch_with_the_pattern(monkeypatch):
    # the host path where the plan says yes (on CPU: pretended): attention_bwd hands the Gluon launch the pattern and
    # the normalised settings, and with its launch failing (False) the Triton dk / dv kernel gives the same gradients
    # on the Gluon kernel's tiles (64 x 128), keys by queries (KT: the form that is right on the GPU with fewer query
    # rows a step than keys)
    if not ops.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    pattern, settings, calls, triton_kw = az.SlidingWindow(40), dict(num_stages=2, REGS=240, ACC_INIT=False), [], []
    triton_dkdv = ops._triton_dkdv
    asked, plain, _ = _pretended(monkeypatch, 3, pattern, settings, _gluon_bwd=lambda *a: calls.append(a) or False,
                                 _triton_dkdv=lambda *a: triton_kw.append(dict(a[-1])) or triton_dkdv(*a))
    assert len(calls) == 1 and calls[0][0] == pattern and calls[0][1] == settings
    assert len(triton_kw) == 1 and triton_kw[0].get("KT"), "the fallback should run the Triton kernel keys by queries"
    for a, b in zip(plain, asked):
        torch.testing.assert_close(a, b)


def test_gluon_bwd_split_cap_reaches_the_plan(monkeypatch):
    # SPLIT_CAP 1: causal at 128 tokens has one key column seen by two query blocks of 64 -> two work items whose
    # float32 partials are summed after (the Gluon launch gets that plan; its Triton fallback gives the same gradients)
    if not ops.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    settings, items = dict(num_stages=2, REGS=240, ACC_INIT=False, SPLIT_CAP=1), []
    asked, plain, _ = _pretended(monkeypatch, 4, az.Causal(), settings, _gluon_bwd=lambda *a: items.append(a[12]) or False)
    assert len(items) == 1 and items[0].tolist() == [[0, 0, 1, 0], [0, 1, 2, 1]]
    for a, b in zip(plain, asked):
        torch.testing.assert_close(a, b)


def test_gluon_fused_dq_path_and_its_fallback(monkeypatch):
    # FUSED_DQ: no dq kernel; delta first and a float32 accumulator handed to the Gluon launch; where that launch fails
    # the Triton dk / dv kernel adds dq by atomics (its ATOMIC form) on the same 64 x 128 tiles -- same gradients
    if not ops.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    settings, calls = dict(num_stages=2, REGS=240, ACC_INIT=False, FUSED_DQ=True), []
    fused, plain, _ = _pretended(monkeypatch, 4, az.SlidingWindow(40) | az.Sinks(4), settings,
                                 _gluon_bwd=lambda *a: calls.append(a) or False)
    dqa = calls[0][-1]
    assert len(calls) == 1 and calls[0][1] == settings
    assert dqa.dtype == torch.float32 and dqa.shape == (1 * 2 * 128, 16)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sep", [False, True], ids=["delta-in-dq", "delta-kernel"])
def test_gluon_dq_path_and_its_fallback(monkeypatch, sep):
    # GLUON_DQ: the Gluon dq launch is handed the pattern, dq, delta's buffer, out and dlse; it writes delta itself,
    # or (SEP_DELTA) delta's own kernel has written it before; where the launch fails the Triton dq kernel runs (and
    # writes delta) -- the same gradients as without it
    if not ops.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    pattern = az.SlidingWindow(40) | az.Sinks(4)
    settings, calls = dict(num_stages=2, REGS=240, ACC_INIT=False, FUSED_DQ=False, GLUON_DQ=True, DQ_STAGES=2), []
    if sep:
        settings["SEP_DELTA"] = True
    delta_runs = []
    real_delta = ops._delta
    asked, plain, (do, out) = _pretended(
        monkeypatch, 5, pattern, settings, _gluon_bwd=lambda *a: False, _gluon_dq_ok=lambda *a: True,
        _gluon_dq=lambda *a: calls.append([x.clone() if torch.is_tensor(x) else x for x in a]) or False,
        _delta=lambda *a: delta_runs.append(1) or real_delta(*a))
    assert len(calls) == 1 and calls[0][0] == pattern and calls[0][9] == settings
    assert torch.equal(calls[0][10], out) and calls[0][12] is False  # (out for delta; no lse gradient)
    assert len(delta_runs) == (1 if sep else 0), "delta's own kernel runs only with SEP_DELTA"
    if sep:
        torch.testing.assert_close(calls[0][6], (do.float() * out.float()).sum(-1))
    for a, b in zip(plain, asked):
        torch.testing.assert_close(a, b)


def test_gluon_dq_with_the_triton_dkdv_kernel(monkeypatch):
    # TRITON_DKDV: the Gluon dq launch, then the Triton dk / dv kernel on its own tiles (the dq kernel's here, 16 x 16)
    # with no Gluon dk / dv launch; with the dq launch failing, the gradients of the Triton kernels alone
    if not ops.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    pattern = az.SlidingWindow(40) | az.Sinks(4)
    settings = dict(num_stages=2, REGS=240, ACC_INIT=False, FUSED_DQ=False, GLUON_DQ=True, DQ_STAGES=2,
                    TRITON_DKDV=True)
    dq_calls, kv_calls, tiles = [], [], []
    triton_dkdv = ops._triton_dkdv
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (torch.randn(1, h, 128, 16, generator=g) for h in (2, 1, 1, 2))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    out, lse = ops.attention_fwd(q, k, v, pattern, 0.25)
    monkeypatch.setattr(ops, "_gluon_bwd_cfg", lambda *a: settings)
    monkeypatch.setattr(ops, "_gluon_dq_ok", lambda *a: True)
    monkeypatch.setattr(ops, "_gluon_dq", lambda *a: dq_calls.append(a[9]) or False)
    monkeypatch.setattr(ops, "_gluon_bwd", lambda *a: kv_calls.append(1) or True)
    monkeypatch.setattr(ops, "_triton_dkdv", lambda *a: tiles.append(a[-6:-4]) or triton_dkdv(*a))
    asked = ops.attention_bwd(do, None, q, k, v, out, lse, pattern, 0.25, cfg=dict(cfg, GLUON_BWD=True))
    monkeypatch.undo()
    plain = ops.attention_bwd(do, None, q, k, v, out, lse, pattern, 0.25, cfg=cfg)
    assert dq_calls == [settings] and not kv_calls and tiles == [(16, 16)]
    for a, b in zip(plain, asked):
        torch.testing.assert_close(a, b)


def test_dkdv_tail_order_map_and_choice(torch_layouts):
    # the TAIL_ORDER grid's map (the kernel's, on the host): every (item, batch * KV head) once; the head part in the
    # 2-D grid's order, the tail with the (batch, KV head)s fastest
    for n, tail, nbh in ((4, 2, 4), (5, 0, 3), (5, 5, 3), (7, 9, 2), (1, 1, 1)):
        order = ops.dkdv_order(n, tail, nbh)
        assert sorted(order) == [(i, bh) for i in range(n) for bh in range(nbh)]
        head = n - min(tail, n)
        assert order[:head * nbh] == [(i, bh) for bh in range(nbh) for i in range(head)]
        assert order[head * nbh:] == [(i, bh) for i in range(head, n) for bh in range(nbh)]
    # the greedy schedule: three programs of costs 3, 2, 2 on two SMs end at 4; one SM, at the sum
    assert ops.schedule_span([3, 2, 2], 2) == 4 and ops.schedule_span([3, 2, 2], 1) == 7
    # 16K tokens, 64 / 8 heads, 132 SMs: window 4096's 32 shorter columns go to the tail (the 2-D order leaves them to
    # each KV head's last wave); window 1024's columns are all alike (no tail helps); many programs: no search
    for pattern, want in ((az.SlidingWindow(4095), 32), (az.SlidingWindow(1023), 0)):
        items = ops._bwd_plan(pattern, 16384, 16384, 64, 128, 64, "cpu")[0]
        steps = tuple((items[:, 2] - items[:, 1]).tolist())
        assert ops.tail_items(steps, 8, 8, 132) == want
        span = {t: ops.schedule_span([steps[i] * 8 + 2 for i, _ in ops.dkdv_order(len(steps), t, 8)], 132)
                for t in (0, want)}
        assert span[want] <= span[0]
    assert ops.tail_items((5,) * 3000, 8, 8, 132) == 0
