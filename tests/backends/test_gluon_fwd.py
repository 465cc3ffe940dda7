"""The Gluon forward (cfg GLUON, `backends/triton/gluon_fwd.py`): Hopper only, so these run on the GPU machine
(`pytest tests/backends/test_gluon_fwd.py` there); on CPU only the fallback rules are tested (Gluon kernels do not
run in Triton's interpreter). Against the float64 reference with the protocol's rule, NaN-poisoned outputs."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton import gluon_fwd, ops, tuning
from attnzoo.testing import check_close

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
gpu = pytest.mark.skipif(not HOPPER, reason="the Gluon forward runs on Hopper GPUs only")

GCFG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, PACK=2, IDX=2, GLUON="ws")
PATTERNS = {"window": az.SlidingWindow(200), "causal": az.Causal(), "sinks+window": az.SlidingWindow(100) | az.Sinks(4),
            "full": None, "chunked": az.Chunked(192), "window-both": az.SlidingWindow(100, 37),
            "dilated": az.Dilated(96, 3), "prefix-lm": az.PrefixLM(100)}


def _inputs(b, hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((hq, lq), (hkv, lk), (hkv, lk))
    return [torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for h, n in shapes]


def _baseline(q, k, v, pattern, scale):
    # the plain math path in the inputs' precision (the protocol's baseline): repeated K / V, the whole score matrix
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if pattern is not None:
        qi, ki = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
        s = s.masked_fill(~pattern.mask(qi, ki, lq, lk), float("-inf"))
    rows = torch.isfinite(s).any(-1, keepdim=True)
    s = torch.where(rows, s, 0.0)
    lse = torch.logsumexp(s.float(), -1, keepdim=True)
    p = (torch.exp(s.float() - lse) * rows).to(q.dtype)
    return p @ v.repeat_interleave(g, 1), torch.where(rows, lse, float("-inf")).squeeze(-1)


def _check(q, k, v, pattern, cfg):
    scale = q.shape[-1] ** -0.5
    before = ops.GLUON_LAUNCHES
    out, lse = ops.attention_fwd(q, k, v, pattern, scale, poison=True, cfg=cfg)
    ran = ops.GLUON_LAUNCHES > before
    ro, rl = reference_attention(q.double(), k.double(), v.double(), pattern, scale)
    bo, bl = _baseline(q, k, v, pattern, scale)
    check_close("out", out, ro, baseline=bo)
    check_close("lse", lse, rl, baseline=bl)
    return ran


@gpu
@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,bn,stages,extra", [(128, 64, 2, dict(GLUON="ws")), (64, 64, 3, dict(GLUON="ws")),
                                               (128, 64, 3, dict(GLUON="ws", PINGPONG=True)),
                                               (128, 128, 2, dict(GLUON="ws")),
                                               (128, 128, 3, dict(GLUON="wsp", QBUF=1)),
                                               (128, 64, 2, dict(GLUON="wsp", QBUF=2, PINGPONG=True)),
                                               (128, 128, 2, dict(GLUON="wsp", QBUF=2, REGS=240, NARROW=16)),
                                               (64, 128, 2, dict(GLUON="ws", NARROW=16)),
                                               (128, 128, 2, dict(GLUON="wsp", QBUF=2, REGS=240, NARROW=16,
                                                                  MASK_FAR=True, NARROW_MERGE=True)),
                                               (128, 128, 2, dict(GLUON="wsp", QBUF=2, REGS=240, NARROW=16,
                                                                  MASK_FAR=True, NARROW_LAST=2)),
                                               (128, 128, 3, dict(GLUON="ws", MASK_FAR=True)),
                                               (128, 128, 2, dict(GLUON="wsp", QBUF=2, REGS=240, XPIPE=True)),
                                               (128, 128, 2, dict(GLUON="wsp", QBUF=2, REGS=240, NARROW=16,
                                                                  MASK_FAR=True, XPIPE=True, XPIPE_NARROW=True)),
                                               (128, 128, 2, dict(GLUON="wsp", QBUF=2, REGS=240, NARROW=16,
                                                                  MASK_FAR=True, XPIPE=True, XPIPE_NARROW="fold"))])
def test_gluon_matches_reference(name, dtype, d, bn, stages, extra, monkeypatch):
    q, k, v = _inputs(2, 8, 2, 512, 512, d, dtype)
    cfg = dict(GCFG, BLOCK_N=bn, num_stages=stages, **extra)
    assert _check(q, k, v, PATTERNS[name], cfg), "the Gluon kernel did not run"


@gpu
def test_gluon_cross_bottom_right():
    # fewer queries than keys, bottom-right aligned (OFF = Lk - Lq), and a longer band than one ring of slots
    q, k, v = _inputs(1, 4, 2, 256, 1024, 128, torch.bfloat16, seed=1)
    for cfg in (GCFG, dict(GCFG, PINGPONG=True), dict(GCFG, GLUON="wsp", QBUF=2), dict(GCFG, BLOCK_N=128)):
        assert _check(q, k, v, az.SlidingWindow(300), cfg)
        assert _check(q, k, v, az.Causal(), cfg)


@gpu
def test_gluon_falls_back_where_it_does_not_apply():
    # an odd length, an odd GQA group (no head pair) and a lookup mask run the Triton kernel, still correct
    q, k, v = _inputs(1, 4, 2, 200, 200, 128, torch.bfloat16, seed=2)
    assert not _check(q, k, v, az.Causal(), GCFG)
    q, k, v = _inputs(1, 3, 1, 256, 256, 128, torch.bfloat16, seed=3)
    assert not _check(q, k, v, az.Causal(), GCFG)
    q, k, v = _inputs(1, 4, 2, 256, 256, 128, torch.bfloat16, seed=4)
    doc = az.Document([100, 156])
    assert not _check(q, k, v, doc, GCFG)


def test_gluon_cfg_names_a_form():
    # GLUON must be "ws" or "wsp" (the single-partition form, GLUON=True, was removed): a clear error, on any device
    q = torch.zeros(1, 2, 64, 64)
    for bad in (True, "single", 1):
        with pytest.raises(ValueError, match="'ws'.*'wsp'"):
            ops.attention_fwd(q, q[:, :1], q[:, :1], None, 0.125, cfg=dict(GCFG, GLUON=bad))
    for bad in (0, -1, 2.5, True):  # PROGRAMS: the persistent grid's size, a positive int
        with pytest.raises(ValueError, match="PROGRAMS"):
            ops.attention_fwd(q, q[:, :1], q[:, :1], None, 0.125, cfg=dict(GCFG, GLUON="wsp", PROGRAMS=bad))
    for bad in (2, -1, 1.5, "1"):  # XPIPE: a bool (0 / 1)
        with pytest.raises(ValueError, match="XPIPE"):
            ops.attention_fwd(q, q[:, :1], q[:, :1], None, 0.125, cfg=dict(GCFG, GLUON="wsp", XPIPE=bad))
    for bad in (2, -1, 1.5, "2"):  # XPIPE_NARROW: a bool or "fold" (the sinks folded into a partial block's tile)
        with pytest.raises(ValueError, match="XPIPE_NARROW"):
            ops.attention_fwd(q, q[:, :1], q[:, :1], None, 0.125, cfg=dict(GCFG, GLUON="wsp", XPIPE=True,
                                                                            XPIPE_NARROW=bad))


def test_gluon_plan_says_why_not_on_cpu():
    q = torch.zeros(1, 2, 64, 64)
    ok, why = ops.gluon_plan(q, q[:, :1], q[:, :1], None, GCFG, 2, None, True)
    assert not ok and "CUDA" in why


@pytest.mark.skipif(not gluon_fwd.available(), reason="this Triton has no Gluon Hopper API")
def test_gluon_module_takes_plain_masks_only():
    # the generated Gluon module (source written and imported; compiling needs a GPU) for an arithmetic mask, and
    # None for a mask that reads a lookup table (documents)
    mod = ops._gluon_module(az.SlidingWindow(100) | az.Sinks(4), 256, 256, (64, 64))
    assert mod is not None and hasattr(mod, "gluon_attn_fwd_ws") and hasattr(mod, "gluon_attn_fwd_wsp")
    assert ops._gluon_module(az.SlidingWindow(100) | az.Sinks(4), 256, 256, (64, 64)) is mod
    assert ops._gluon_module(az.Document([100, 156]), 256, 256, (64, 64)) is None


@gpu
@pytest.mark.parametrize("pattern", [az.Causal(), az.SlidingWindow(4095), None, az.SlidingWindow(299) | az.Sinks(4),
                                     az.SlidingWindow(511)],
                         ids=["causal", "window4096", "full", "sinks+window", "window512"])
def test_default_forward_runs_gluon_and_backward_matches(pattern):
    # the dense and wide classes' default (tuning: GLUON_CFG) runs the Gluon forward; through attention() the
    # backward then works from its lse: output and every gradient against float64. Sinks + window: the local
    # default's NARROW, MASK_FAR and XPIPE with the sinks folded (XPIPE_NARROW="fold") all apply. Where the
    # backward's default names them (wide windows) it runs the Gluon dk / dv kernel (ROWS 2) and the Gluon dq kernel,
    # elsewhere the Triton ones
    q, k, v = _inputs(1, 8, 2, 1024, 1024, 128, torch.bfloat16, seed=5)
    if pattern == az.SlidingWindow(299) | az.Sinks(4):
        assert ops._mask_far_ok(pattern, 1024, 1024, 64, 128, 8, str(q.device))
    do = torch.randn_like(q)
    before, before_bwd, before_dq, before_dqp = (ops.GLUON_LAUNCHES, ops.GLUON_BWD_LAUNCHES, ops.GLUON_DQ_LAUNCHES,
                                                 ops.GLUON_DQP_LAUNCHES)
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    nlast, xpipe, folds = ops.GLUON_NLAST_LAUNCHES, ops.GLUON_XPIPE_LAUNCHES, ops.GLUON_FOLD_LAUNCHES
    out = az.attention(*x, pattern, backend="triton")
    assert ops.GLUON_LAUNCHES > before, "the default forward did not run the Gluon kernel"
    if pattern == az.SlidingWindow(299) | az.Sinks(4):  # (class local: XPIPE with the sinks folded, not NARROW_LAST)
        assert ops.GLUON_XPIPE_LAUNCHES > xpipe, "the default forward did not run XPIPE"
        assert ops.GLUON_FOLD_LAUNCHES > folds, "the default forward did not fold the sinks into a partial block"
        assert ops.GLUON_NLAST_LAUNCHES == nlast
    if pattern == az.SlidingWindow(511):
        assert ops.GLUON_XPIPE_LAUNCHES > xpipe, "the default forward did not run XPIPE"
    grads = torch.autograd.grad(out, x, do)
    g = tuning.default("bwd", 128, 128, tuning.pattern_class(pattern)).get("GLUON_BWD")
    if pattern == az.SlidingWindow(4095):  # (the default as measured: both Gluon kernels on wide windows)
        assert g and g.get("GLUON_DQ") and not g.get("TRITON_DKDV")
    want_kv, want_dq = bool(g) and not g.get("TRITON_DKDV"), bool(g) and bool(g.get("GLUON_DQ"))
    assert (ops.GLUON_BWD_LAUNCHES > before_bwd) == want_kv, "the default backward ran the wrong dk / dv kernel"
    assert (ops.GLUON_DQ_LAUNCHES > before_dq) == want_dq, "the default backward ran the wrong dq kernel"
    assert (ops.GLUON_DQP_LAUNCHES > before_dqp) == (want_dq and bool(g.get("DQ_PERSIST"))), \
        "the default backward ran the wrong form of the Gluon dq kernel"
    scale = 128 ** -0.5
    xr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro = reference_attention(*xr, pattern, scale)[0]
    rg = torch.autograd.grad(ro, xr, do.double())
    xb = [t.detach().requires_grad_() for t in (q, k, v)]
    bo = _baseline(*xb, pattern, scale)[0]
    bg = torch.autograd.grad(bo, xb, do)
    check_close("out", out, ro, baseline=bo)
    for name, a, r, bl in zip(("dq", "dk", "dv"), grads, rg, bg):
        check_close(name, a, r, baseline=bl)


@gpu
def test_a_gluon_kernel_that_fails_to_build_falls_back(monkeypatch):
    # a first launch that raises (a Triton whose Gluon differs): a warning, the Triton kernel's result, no retry
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no such Gluon builtin")

    monkeypatch.setattr(ops, "_launch_gluon", broken)
    monkeypatch.setattr(ops, "_GLUON_FAILED", {})
    monkeypatch.setattr(ops, "_GLUON_RAN", set())
    q, k, v = _inputs(1, 4, 2, 256, 256, 128, torch.bfloat16, seed=6)
    with pytest.warns(RuntimeWarning, match="Gluon forward failed"):
        assert not _check(q, k, v, az.Causal(), GCFG)
    assert not _check(q, k, v, az.Causal(), GCFG) and len(calls) == 1


@gpu
def test_persistent_gluon_walks_more_items_than_programs():
    # more work items than SMs (every program takes several, the ring's phases running on across them), items of
    # different lengths (causal), a Q buffer per item or two, both work-item orders (ORDER 1: a KV head's head pairs
    # innermost), at GQA groups of 4 (two pairs a KV head) and 2 (one)
    q, k, v = _inputs(2, 16, 4, 2048, 2048, 128, torch.bfloat16, seed=7)
    for qbuf, stages, order in ((1, 3, 1), (2, 2, 0), (2, 2, 1)):
        cfg = dict(GCFG, BLOCK_N=128, num_stages=stages, GLUON="wsp", QBUF=qbuf, ORDER=order)
        assert _check(q, k, v, az.Causal(), cfg) and _check(q, k, v, az.SlidingWindow(300) | az.Sinks(4), cfg)
    q, k, v = _inputs(1, 8, 4, 1024, 1024, 128, torch.float16, seed=8)
    assert _check(q, k, v, az.SlidingWindow(200), dict(GCFG, BLOCK_N=128, num_stages=2, GLUON="wsp", QBUF=2))


@gpu
@pytest.mark.parametrize("form", ["ws", "wsp"])
def test_gluon_narrow_sink_tile(form, monkeypatch):
    # NARROW: block 0 as a 16-key tile on the query blocks that see only sinks in it -- mixed with blocks that see
    # more of block 0 (the first ones), sinks of 4 and of 16 keys, a persistent grid walking several narrow items
    # (the narrow buffer's phases) and a cross shape
    monkeypatch.setattr(ops, "GLUON_NARROW", True)
    cfg = dict(GCFG, BLOCK_N=128, num_stages=2, GLUON=form, QBUF=2, REGS=240, NARROW=16)
    q, k, v = _inputs(2, 16, 4, 2048, 2048, 128, torch.bfloat16, seed=9)
    assert ops._narrow_rows(az.SlidingWindow(300) | az.Sinks(4), 2048, 2048, 64, 128, 16, str(q.device), 16) is not None
    for pattern in (az.SlidingWindow(300) | az.Sinks(4), az.SlidingWindow(129) | az.Sinks(16), az.Sinks(4)):
        assert _check(q, k, v, pattern, cfg)
    if form == "wsp":  # one program walking every item in turn, and one Q buffer
        for extra in (dict(PROGRAMS=1), dict(QBUF=1)):
            assert _check(q, k, v, az.SlidingWindow(300) | az.Sinks(4), dict(cfg, **extra))
    for pattern in (az.SlidingWindow(300) | az.Sinks(4), az.SlidingWindow(129) | az.Sinks(16), az.Sinks(4)):
        # NARROW_MERGE: the narrow tile's scores with the first regular step's (sinks alone: not merged); MASK_FAR:
        # block 0 first where it is partial, the shorter mask in the main loop
        for extra in (dict(NARROW_MERGE=True), dict(MASK_FAR=True), dict(MASK_FAR=True, NARROW=0)):
            assert _check(q, k, v, pattern, dict(cfg, **extra))
        if form == "wsp":  # NARROW_LAST: the narrow tile at the item's end (1: both consumers, 2: consumer 1 only;
            # sinks alone: at the start, as before)
            for extra in (dict(NARROW_LAST=1), dict(NARROW_LAST=1, MASK_FAR=True), dict(NARROW_LAST=2, MASK_FAR=True),
                          dict(NARROW_LAST=2, QBUF=1), dict(NARROW_LAST=1, PROGRAMS=1)):
                before = ops.GLUON_NLAST_LAUNCHES
                assert _check(q, k, v, pattern, dict(cfg, **extra))
                assert (ops.GLUON_NLAST_LAUNCHES > before) == (pattern != az.Sinks(4)), (pattern, extra)
    q, k, v = _inputs(1, 4, 2, 512, 1536, 128, torch.float16, seed=10)
    assert _check(q, k, v, az.SlidingWindow(200) | az.Sinks(4), cfg)


@gpu
def test_gluon_xpipe():
    # XPIPE: each item's first scores with the previous item's last P V -- windows, causal, sinks + window with
    # MASK_FAR (the narrow tile off: XPIPE does not take it), a persistent grid of one program, of three (programs with
    # different item counts), one Q buffer with a ring of 3, ORDER 0, a GQA group of 2, a cross shape in float16; the
    # kernel ran with XPIPE each time
    cfg = dict(GCFG, BLOCK_N=128, num_stages=2, GLUON="wsp", QBUF=2, REGS=240, XPIPE=True)
    sinks = az.SlidingWindow(300) | az.Sinks(4)
    q, k, v = _inputs(2, 16, 4, 2048, 2048, 128, torch.bfloat16, seed=13)
    for pattern, extra in ((az.SlidingWindow(1023), {}), (az.SlidingWindow(300), {}), (az.SlidingWindow(200, 37), {}),
                           (az.Causal(), {}), (None, {}), (sinks, dict(MASK_FAR=True)), (sinks, {}),
                           (az.SlidingWindow(300), dict(PROGRAMS=1)), (sinks, dict(PROGRAMS=3, MASK_FAR=True)),
                           (az.SlidingWindow(300), dict(QBUF=1, num_stages=3)), (az.Causal(), dict(ORDER=0))):
        before = ops.GLUON_XPIPE_LAUNCHES
        assert _check(q, k, v, pattern, dict(cfg, **extra)), (pattern, extra)
        assert ops.GLUON_XPIPE_LAUNCHES > before, (pattern, extra)
    q, k, v = _inputs(1, 8, 4, 1024, 1024, 128, torch.bfloat16, seed=14)
    assert _check(q, k, v, az.SlidingWindow(200), cfg)
    q, k, v = _inputs(1, 4, 2, 512, 1536, 128, torch.float16, seed=15)
    for pattern in (az.SlidingWindow(500), az.Causal()):
        before = ops.GLUON_XPIPE_LAUNCHES
        assert _check(q, k, v, pattern, cfg)
        assert ops.GLUON_XPIPE_LAUNCHES > before, pattern
    # where a query block visits nothing, or the narrow tile applies without XPIPE_NARROW (or on sinks alone, where an
    # item has nothing but the narrow tile), the kernel runs without XPIPE (still right)
    q, k, v = _inputs(1, 4, 2, 1024, 512, 128, torch.bfloat16, seed=16)
    before = ops.GLUON_XPIPE_LAUNCHES
    assert _check(q, k, v, az.Causal(), cfg)
    assert ops.GLUON_XPIPE_LAUNCHES == before


@gpu
@pytest.mark.parametrize("mode", [True, "fold"], ids=["after", "fold"])
def test_gluon_xpipe_narrow(mode, monkeypatch):
    # XPIPE_NARROW: XPIPE with the narrow sink tile, run at each item's end in both consumers after the boundary (True)
    # or, "fold", the sinks loaded into an unseen slot of a partial block's tile (with MASK_FAR; where a flagged block
    # has no such slot, the narrow tile as with True) -- flagged and unflagged items mixed (the first query blocks see
    # more of block 0), sinks of 4 and 16, MASK_FAR, one and three programs, one Q buffer, a cross shape in float16
    monkeypatch.setattr(ops, "GLUON_NARROW", True)
    cfg = dict(GCFG, BLOCK_N=128, num_stages=2, GLUON="wsp", QBUF=2, REGS=240, NARROW=16, XPIPE=True,
               XPIPE_NARROW=mode)
    q, k, v = _inputs(2, 16, 4, 2048, 2048, 128, torch.bfloat16, seed=17)
    sinks = az.SlidingWindow(300) | az.Sinks(4)
    far16 = az.SlidingWindow(129) | az.Sinks(16)
    for pattern, extra in ((sinks, {}), (sinks, dict(MASK_FAR=True)), (far16, {}), (far16, dict(MASK_FAR=True)),
                           (az.SlidingWindow(1023) | az.Sinks(4), dict(MASK_FAR=True, NARROW_LAST=2)),
                           (az.SlidingWindow(1074) | az.Sinks(4), dict(MASK_FAR=True)),
                           (sinks, dict(PROGRAMS=1)), (sinks, dict(PROGRAMS=3, MASK_FAR=True))):
        before, nlast, folds = ops.GLUON_XPIPE_LAUNCHES, ops.GLUON_NLAST_LAUNCHES, ops.GLUON_FOLD_LAUNCHES
        assert _check(q, k, v, pattern, dict(cfg, **extra)), (pattern, extra)
        assert ops.GLUON_XPIPE_LAUNCHES > before and ops.GLUON_NLAST_LAUNCHES == nlast, (pattern, extra)
        # the fold ran where asked, with MASK_FAR, and every flagged block has a slot (window 1074 at 64-row blocks:
        # the odd blocks' first kv block has 14 unseen keys)
        fold = mode == "fold" and bool(extra.get("MASK_FAR")) and "1074" not in repr(pattern)
        assert (ops.GLUON_FOLD_LAUNCHES > folds) == fold, (pattern, extra)
    # without XPIPE (still right): sinks alone (an item with nothing but the narrow tile), and one Q buffer (the narrow
    # step frees the item's Q buffer after the next item's first scores, which would wait for it: a deadlock, so ops
    # runs the kernel without XPIPE there -- thirty-first session, the first GPU run of this test hung on it)
    for pattern, extra in ((az.Sinks(4), {}), (sinks, dict(QBUF=1))):
        before = ops.GLUON_XPIPE_LAUNCHES
        assert _check(q, k, v, pattern, dict(cfg, **extra)), (pattern, extra)
        assert ops.GLUON_XPIPE_LAUNCHES == before, (pattern, extra)
    q, k, v = _inputs(1, 4, 2, 512, 1536, 128, torch.float16, seed=18)
    before, folds = ops.GLUON_XPIPE_LAUNCHES, ops.GLUON_FOLD_LAUNCHES
    assert _check(q, k, v, sinks, dict(cfg, MASK_FAR=True))
    assert ops.GLUON_XPIPE_LAUNCHES > before and (ops.GLUON_FOLD_LAUNCHES > folds) == (mode == "fold")


def test_gluon_every_row_visits():
    # XPIPE's condition: every query block visits a kv block -- not so for causal with more queries than keys
    # (bottom-right: the first 512 queries see nothing)
    assert ops._every_row_visits(az.SlidingWindow(300), 1024, 1024, 64, 128, 4, "cpu")
    assert ops._every_row_visits(az.Causal(), 512, 1536, 64, 128, 4, "cpu")
    assert not ops._every_row_visits(az.Causal(), 1024, 512, 64, 128, 4, "cpu")


def test_gluon_narrow_flags(monkeypatch):
    # NARROW in a Gluon config runs on the query blocks whose block 0 holds only sinks, none on a plain window; with
    # ops.GLUON_NARROW off it is ignored
    cfg = dict(GCFG, BLOCK_N=128, GLUON="wsp", NARROW=16)
    sinks = az.SlidingWindow(300) | az.Sinks(4)
    assert ops.GLUON_NARROW
    monkeypatch.setattr(ops, "GLUON_NARROW", False)
    assert ops.gluon_narrow(cfg, sinks, 2048, 2048, 8, "cpu") == (0, None)
    monkeypatch.setattr(ops, "GLUON_NARROW", True)
    sn, flags = ops.gluon_narrow(cfg, sinks, 2048, 2048, 8, "cpu")
    # query block m (64 rows) sees keys >= 16 of block 0 (128 keys) while 64 m - 300 <= 127, i.e. m <= 6
    assert sn == 16 and flags.tolist() == [0] * 7 + [1] * 25
    assert ops.gluon_narrow(cfg, az.SlidingWindow(300), 2048, 2048, 8, "cpu") == (0, None)
    assert ops.gluon_narrow(dict(cfg, NARROW=0), sinks, 2048, 2048, 8, "cpu") == (0, None)
    # MASK_FAR applies where the mask past block 0 is shorter (sinks, not a plain window) and block 0 heads every
    # partial list it is in
    assert ops._mask_far_ok(sinks, 2048, 2048, 64, 128, 8, "cpu")
    assert ops._mask_far_ok(az.PrefixLM(100), 2048, 2048, 64, 128, 8, "cpu")
    assert not ops._mask_far_ok(az.SlidingWindow(300), 2048, 2048, 64, 128, 8, "cpu")
    # NARROW_MERGE needs a regular block besides block 0 on every flagged query block: sinks alone have none
    assert ops._narrow_merge_ok(sinks, 2048, 2048, 64, 128, 8, "cpu", 16)
    assert not ops._narrow_merge_ok(az.Sinks(4), 2048, 2048, 64, 128, 8, "cpu", 16)
    assert not ops._narrow_merge_ok(az.SlidingWindow(300), 2048, 2048, 64, 128, 8, "cpu", 16)


@pytest.mark.parametrize("left,sinks", [(300, 4), (1023, 4), (129, 16), (1074, 4), (4095, 4)])
def test_gluon_narrow_fold(left, sinks, torch_layouts):
    # XPIPE_NARROW="fold" (ops._narrow_fold): each flagged query block gets a 16-key slot of one of its partial kv
    # blocks (not block 0) that none of its queries sees, checked here against the dense mask; that block moves to
    # the entry after block 0 (the rest of the row a permutation of what it was), every other row unchanged. None
    # where a flagged block has no such slot (window 1074: the odd blocks' first kv block has 14 unseen keys)
    lq, bm, bn, sn = 8192, 64, 128, 16
    pattern = az.SlidingWindow(left) | az.Sinks(sinks)
    flags = ops._narrow_rows(pattern, lq, lq, bm, bn, 4, "cpu", sn)
    lay = ops._layout(pattern, lq, lq, bm, bn, 4, "cpu")
    seen = pattern.mask(torch.arange(lq)[:, None], torch.arange(lq)[None, :], lq, lq)
    seen = seen.reshape(lq // bm, bm, lq // sn, sn).any(3).any(1)  # (query block, 16-key piece)
    kvi, kvn = lay.kv_indices[0, 0], lay.kv_num_blocks[0, 0]
    ch = bn // sn
    slots = {m: [(e, c) for e in range(1, int(kvn[m])) for c in range(ch) if not seen[m, int(kvi[m, e]) * ch + c]]
             for m in flags.nonzero().squeeze(1).tolist()}
    got = ops._narrow_fold(pattern, lq, lq, bm, bn, 4, "cpu", sn)
    assert (got is None) == (not all(slots.values())) == (left == 1074)
    if got is None:
        return
    nrow, kvi2 = got
    assert nrow.dtype == torch.int32 and kvi2.shape == lay.kv_indices.shape
    for m in range(lq // bm):
        n = int(kvn[m])
        row, row2 = kvi[m, :n].tolist(), kvi2[0, 0, m, :n].tolist()
        if m not in slots:
            assert nrow[m] == 0 and row2 == row
            continue
        slot = int(nrow[m]) - 1
        assert 0 <= slot < ch and row2[0] == row[0] == 0 and sorted(row2) == sorted(row)
        assert not seen[m, row2[1] * ch + slot], (m, row2, slot)
    assert bool((kvi2 == kvi2[:, :1]).all())  # (every head the same)


def test_gluon_ws_shared_memory_rule():
    # both heads' Q x buffers + K and V x ring, against the H100's 227 KB per block: the default (64 x 128 tiles,
    # ring 3, one Q buffer) fits with 3 KB to spare; two Q buffers need the ring at 2
    ws = dict(GCFG, BLOCK_N=128, num_stages=3, GLUON="ws")
    assert ops.gluon_ws_smem(ws, 128, 2) == 2 * 2 * 128 * (64 + 3 * 128) == 224 * 1024
    assert ops.gluon_ws_smem(dict(ws, GLUON="wsp", QBUF=2), 128, 2) == 256 * 1024 > 227 * 1024
    assert ops.gluon_ws_smem(dict(ws, GLUON="wsp", QBUF=2, num_stages=2), 128, 2) == 192 * 1024
    assert ops.gluon_ws_smem(dict(ws, QBUF=2), 128, 2) == 224 * 1024  # QBUF counts in the persistent form only
    # a narrow sink tile's K and V (NARROW keys) per Q buffer: ring 2 with two Q buffers keeps 19 KB to spare
    assert ops.gluon_ws_smem(dict(ws, GLUON="wsp", QBUF=2, num_stages=2, NARROW=16), 128, 2) == 208 * 1024
    assert ops.gluon_ws_smem(dict(ws, NARROW=16), 128, 2) == 232 * 1024  # the ws form's ring 3: too much
