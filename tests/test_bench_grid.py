"""The speed grids of `attnzoo bench` (fast, CPU): the FlashAttention grid's plan, the block-sparse
patterns of the long-context grid, the peers (other libraries) recorded as unsupported when missing, OOMs
recorded without stopping the suite, and the report's peak-memory section."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import attnzoo as az
from attnzoo.bench import peers as peers_mod
from attnzoo.bench import report as report_mod
from attnzoo.bench.peers import PEERS, pattern_family
from attnzoo.bench.speed import (FLASH_HEAD_DIMS, FLASH_LENGTHS, FLASH_TOKENS, SDPA_KERNELS, PatternSpec, Suite,
                                 cuda_suite, describe_plan, flash_suite, get_suite, load_records, pattern_signature,
                                 plan, run_suite)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------------
# the FlashAttention grid
# ------------------------------------------------------------------------------------------------
def test_flash_suite_plan():
    suite = flash_suite()
    assert (suite.name, suite.dtype, suite.Hq, suite.Hkv) == ("flash", "bfloat16", 16, 16)
    cases = plan(suite)
    assert {c.L for c in cases} == set(FLASH_LENGTHS) == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(c.B * c.L == FLASH_TOKENS == 16384 for c in cases)
    assert {c.D for c in cases} == set(FLASH_HEAD_DIMS) == {64, 128}
    assert {c.direction for c in cases} == {"fwd", "fwdbwd"}          # fwd+bwd at every length
    assert {c.pattern for c in cases} == {"full", "causal"}
    assert all(c.Hq == c.Hkv == 16 for c in cases)
    backends = set(SDPA_KERNELS) | {"flex", "triton", "reference", "flash-attn", "xformers"}
    assert {c.backend for c in cases} == backends
    # every (L, D, direction, pattern) has every backend once: 6 lengths x 2 dims x 2 directions x 2 x 9
    per = Counter((c.L, c.D, c.direction, c.pattern) for c in cases)
    assert len(per) == 6 * 2 * 2 * 2 and set(per.values()) == {len(backends)}
    assert len(cases) == 432 and len({c.key("gpu", "s") for c in cases}) == 432
    # the dense baseline comes first in each shape
    first = {}
    for c in cases:
        first.setdefault((c.L, c.D, c.direction), c.pattern)
    assert set(first.values()) == {"full"}
    text = describe_plan(cases)
    assert "432 cases" in text and "16384  1" in text and "512    32" in text
    # the reference is measured up to 4K only (planned skips, with the reason)
    skips = [c for c in cases if c.skip]
    assert skips and {c.backend for c in skips} == {"reference"} and min(c.L for c in skips) == 8192


def test_flash_suite_filters():
    suite = flash_suite()
    cases = plan(suite, patterns=["causal"], backends=["flash"], lengths=[1024], directions=["fwd"])
    got = {(c.pattern, c.backend, c.D, c.B) for c in cases}
    # `flash` matches flash-attn (not sdpa-flash); the dense SDPA baselines stay
    want = {(p, "flash-attn", d, 16) for p in ("full", "causal") for d in (64, 128)} | \
        {("full", k, d, 16) for k in SDPA_KERNELS for d in (64, 128)}
    assert got == want
    assert {c.backend for c in plan(suite, backends=["xformers"], baseline=False)} == {"xformers"}
    # lengths off the grid keep B * L = 16K (at least B = 1)
    assert {(c.L, c.B) for c in plan(suite, lengths=[2048, 32768])} == {(2048, 8), (32768, 1)}
    with pytest.raises(ValueError, match="choose from"):
        plan(suite, backends=["natten"])          # no neighborhood pattern in this grid: no natten
    with pytest.raises(ValueError, match="choose from"):
        plan(suite, patterns=["sw1024"])


def test_get_suite_names():
    assert get_suite("cpu").name == "cpu"
    assert get_suite("flash", require_device=False).name == "flash"
    assert get_suite("cuda", full_grid=True, require_device=False).lengths[0] == 1024
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            get_suite("flash")
    with pytest.raises(ValueError, match="'flash'"):
        get_suite("tpu")


# ------------------------------------------------------------------------------------------------
# the long-context grid: block-sparse patterns and peers per pattern family
# ------------------------------------------------------------------------------------------------
def test_blocksparse_specs_resolve_in_the_cuda_plan():
    suite = cuda_suite(full_grid=True)
    names = [s.name for s in suite.specs]
    bs = ["blocksparse-0.1", "blocksparse-0.2", "blocksparse-0.3", "blocksparse-0.5"]
    assert [n for n in names if n.startswith("blocksparse")] == bs
    for old in ("full", "causal", "sw1024", "sw4096", "sinks+sw1024", "document", "chunked2048", "nbhd2d-13x13",
                "nbhd2d-31x31", "nbhd3d-5x7x7"):
        assert old in names                                    # the other patterns stay
    cases = plan(suite, patterns=["blocksparse"], lengths=[4096], directions=["fwd"], baseline=False)
    assert {c.pattern for c in cases} == set(bs)
    assert {c.backend for c in cases} == {"flex", "triton", "reference"}   # no peer runs block masks
    assert {c.pattern for c in plan(suite, patterns=["blocksparse-0.5"], lengths=[4096], baseline=False)} == \
        {"blocksparse-0.5"}
    assert {c.pattern for c in plan(suite, patterns=["blocksparse-0.[12]"], lengths=[4096], baseline=False)} == \
        {"blocksparse-0.1", "blocksparse-0.2"}
    nat = plan(suite, backends=["natten"], lengths=[16384], directions=["fwd"], baseline=False)
    assert {(c.pattern, c.backend) for c in nat} == {(p, "natten") for p in ("nbhd2d-13x13", "nbhd2d-31x31",
                                                                            "nbhd3d-5x7x7")}
    sigs = set()
    for c in cases:
        p = c.spec.build(c.L)
        assert p is c.spec.build(c.L)                          # built once per length (cached)
        assert isinstance(p, az.Intersection) and isinstance(p.a, az.BlockSparse) and p.b == az.Causal()
        assert p.a.block_size == (128, 128) and p.a.blocks.shape == (32, 32)
        target = float(c.pattern.split("-")[1])
        tri = 32 * 33 / 2
        assert int(p.a.blocks.sum()) == round(target * tri)   # a share of the causal block triangle
        d = p.density(4096, 4096)
        assert 0 < d < target / 2 + 0.02
        sigs.add(pattern_signature(p))
    assert len(sigs) == 4


def test_peers_by_pattern_family():
    suite = cuda_suite()
    by = {}
    for c in plan(suite, lengths=[4096, 16384], directions=["fwd"]):
        by.setdefault(c.pattern, set()).add(c.backend)
    for p in ("full", "causal", "sw1024", "sw4096"):
        assert {"flash-attn", "xformers"} <= by[p] and "natten" not in by[p]
    for p in ("nbhd2d-13x13", "nbhd2d-31x31"):
        assert "natten" in by[p] and not {"flash-attn", "xformers"} & by[p]
    for p in ("sinks+sw1024", "document", "chunked2048", "blocksparse-0.1"):
        assert not {"flash-attn", "xformers", "natten"} & by[p]
    assert pattern_family(az.SlidingWindow(3)) == "window" and pattern_family(None) == "full"
    assert pattern_family(az.SlidingWindow(3) | az.Sinks(1)) is None
    assert pattern_family(az.Neighborhood(3, grid=(4, 4))) == "neighborhood"
    ok, why = PEERS["natten"].supports(az.Causal())
    assert not ok and "neighborhood" in why


# ------------------------------------------------------------------------------------------------
# running: peers unsupported with a reason, OOM recorded and the suite goes on
# ------------------------------------------------------------------------------------------------
def _tiny_suite(backends, peers=(), specs=None, full=("sdpa",)) -> Suite:
    specs = specs or (
        PatternSpec("full", "dense", lambda L: az.Full(), kind="full"),
        PatternSpec("causal", "causal", lambda L: az.Causal(), kind="causal"),
        PatternSpec("sw16", "window", lambda L: az.SlidingWindow(15), family="window"),
        PatternSpec("nbhd", "2-D neighborhood", lambda L: az.Neighborhood(3, grid=(8, 8)), length=64,
                    family="neighborhood"),
    )
    return Suite("tiny", "cpu", "float32", B=1, Hq=2, Hkv=1, D=16, lengths=(64,), backends=tuple(backends),
                 full_backends=tuple(full), pattern_backends=("reference",), specs=tuple(specs), reps=2, warmup=0,
                 max_time_s=0.5, peers=tuple(peers))


def test_missing_peers_are_recorded_unsupported(tmp_path, monkeypatch):
    for name in ("flash-attn", "natten"):
        ok, why = PEERS[name].available()
        if ok:  # installed here: pretend it is not (the path a missing package takes)
            monkeypatch.setattr(PEERS[name], "available",
                                lambda name=name: (False, f"{name} is not installed (pip install {name})"))
        else:
            assert "not installed" in why or "failed" in why
    monkeypatch.setattr(PEERS["xformers"], "available", lambda: (False, "xformers is not installed (pip install "
                                                                       "xformers)"))
    peers = ("flash-attn", "xformers", "natten")
    suite = _tiny_suite(("sdpa", "reference") + peers, peers)
    cases = plan(suite, directions=["fwd"])
    assert {(c.pattern, c.backend) for c in cases if c.backend in peers} == {
        (p, b) for p in ("full", "causal", "sw16") for b in ("flash-attn", "xformers")} | {("nbhd", "natten")}
    recs = run_suite(cases, tmp_path, suite=suite, progress=False)
    assert len(recs) == len(cases)
    for r in recs:
        if r["backend"] in peers:
            assert r["status"] == "unsupported", r
            assert "not installed" in r["message"] or "failed" in r["message"]
            assert r["peer"] == r["backend"] and r["median_ms"] is None and r["tflops"] is None
        else:
            assert r["status"] == "ok", r
    # in the file too, and the report lists them under "Not measured" with the reason
    on_disk = load_records(tmp_path / "results.jsonl")
    assert sum(r["status"] == "unsupported" for r in on_disk) == 7
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=False).read_text()
    assert "Not measured" in text and "flash-attn is not installed" in text.replace("flash_attn", "flash-attn")


def test_available_peer_on_cpu_is_unsupported_with_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(PEERS["flash-attn"], "available", lambda: (True, ""))
    suite = _tiny_suite(("sdpa", "flash-attn"), ("flash-attn",))
    recs = run_suite(plan(suite, patterns=["causal"], directions=["fwd"], backends=["flash-attn"]), tmp_path,
                     suite=suite, progress=False)
    (r,) = [r for r in recs if r["backend"] == "flash-attn" and r["pattern"] == "causal"]
    assert r["status"] == "unsupported" and "CUDA" in r["message"]


class _FakeFlashAttn:
    """flash_attn_func's documented semantics (layout (B, L, H, D), GQA, bottom-right causal and windows),
    computed densely: enough to check the adapter's layouts and arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        self.calls.append(dict(causal=causal, window_size=window_size))
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        g = hq // hkv
        qq = q.transpose(1, 2)
        kk, vv = (t.transpose(1, 2).repeat_interleave(g, 1) for t in (k, v))
        s = qq @ kk.transpose(-1, -2) * (softmax_scale or d ** -0.5)
        i = torch.arange(lq)[:, None] + lk - lq
        j = torch.arange(lk)[None, :]
        m = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            m &= j <= i
        if window_size != (-1, -1):
            m &= (j >= i - window_size[0]) & (j <= i + window_size[1])
        return (s.masked_fill(~m, float("-inf")).softmax(-1) @ vv).transpose(1, 2)


def test_peer_adapter_layouts_with_a_fake_kernel(monkeypatch):
    """flash-attn's adapter against attnzoo's reference, with the library replaced by a dense twin of its
    documented semantics: layouts, GQA, causal and windows map to the same attention, gradients flow."""
    fake = _FakeFlashAttn()
    peer = PEERS["flash-attn"]
    monkeypatch.setattr(peer, "_fn", lambda: (fake, ""))
    monkeypatch.setattr(peer, "supports", lambda pattern, dtype=None, device=None: (True, ""))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 24, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 24, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    for pattern in (az.Full(), az.Causal(), az.SlidingWindow(5), az.SlidingWindow(3, 2)):
        call = peer.prepare(q, k, v, pattern)
        out = call()
        assert out.shape == (2, 24, 4, 16)
        ref = az.attention(q.detach(), k.detach(), v.detach(), pattern, backend="reference")
        torch.testing.assert_close(out.transpose(1, 2), ref)
        grads = torch.autograd.grad(out, call.inputs, torch.ones_like(out))
        assert all(g is not None and g.shape == t.shape for g, t in zip(grads, call.inputs))
    assert fake.calls[2] == dict(causal=True, window_size=(5, 0))
    assert fake.calls[3] == dict(causal=False, window_size=(3, 2))


def test_oom_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    def boom(q, k, v, pattern):
        def call():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return peers_mod._Call(call, (), "fake")
    peer = PEERS["xformers"]
    monkeypatch.setattr(peer, "available", lambda: (True, ""))
    monkeypatch.setattr(peer, "supports", lambda pattern, dtype=None, device=None: (True, ""))
    monkeypatch.setattr(peer, "prepare", boom)

    def oom_pattern(L):
        raise torch.OutOfMemoryError("CUDA out of memory while building the pattern")
    specs = (PatternSpec("full", "dense", lambda L: az.Full(), kind="full"),
             PatternSpec("huge", "fails to build", oom_pattern),
             PatternSpec("causal", "causal", lambda L: az.Causal(), kind="causal"))
    suite = _tiny_suite(("sdpa", "xformers", "reference"), ("xformers",), specs=specs)
    cases = plan(suite, directions=["fwd"])
    recs = run_suite(cases, tmp_path, suite=suite, progress=False)
    status = {(r["pattern"], r["backend"]): r["status"] for r in recs}
    assert status[("full", "xformers")] == "oom" and status[("causal", "xformers")] == "oom"
    assert status[("huge", "reference")] == "oom"
    assert status[("full", "sdpa")] == status[("causal", "sdpa")] == status[("causal", "reference")] == "ok"
    assert len(recs) == len(cases)


# ------------------------------------------------------------------------------------------------
# the report's peak-memory section
# ------------------------------------------------------------------------------------------------
def _rec(i, pattern, L, backend, ms, mem, status="ok", D=128, B=1, Hq=64, Hkv=8, direction="fwd"):
    return dict(key=f"k{i}", pattern=pattern, pattern_kind="full" if pattern == "full" else "pattern",
                pattern_repr=pattern, pattern_description=pattern, density=1.0 if pattern == "full" else 0.1,
                B=B, Hq=Hq, Hkv=Hkv, Lq=L, Lk=L, D=D, Dv=D, dtype="bfloat16", direction=direction, backend=backend,
                device="cuda", device_name="Test GPU", gpu_memory_bytes=80 * 2**30, status=status,
                message="CUDA out of memory" if status == "oom" else "",
                median_ms=ms if status == "ok" else None, p20_ms=None, p80_ms=None, compile_ms=1.0, reps=3,
                peak_mem_bytes=mem if status == "ok" else None)


def test_report_memory_section(tmp_path):
    recs, i = [], 0
    for L in (1024, 4096, 16384, 65536):
        for b, scale in (("sdpa-math", 4.0), ("triton", 1.0), ("flex", 1.2)):
            st = "oom" if (b == "sdpa-math" and L == 65536) else "ok"
            for p in ("full", "blocksparse-0.1"):
                if p != "full" and b == "sdpa-math":
                    continue
                i += 1
                recs.append(_rec(i, p, L, b, ms=L / 1000 * scale, mem=int(scale * L * 2**16), status=st))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=_has_matplotlib()).read_text()
    assert "### Peak memory (fwd)" in text and "GiB" in text
    sec = text.split("### Peak memory (fwd)")[1]
    assert "| pattern | L | sdpa-math | flex | triton |" in sec
    # 4 * 64K * 2^16 bytes = 16 GiB at L = 64K for flex's 1.2x: 4.8 GiB; sdpa-math ran out of memory
    assert "| full | 64K | OOM | 4.80 | 4.00 |" in sec
    assert "| blocksparse-0.1 | 1K |  | 0.075 | 0.062 |" in sec
    if _has_matplotlib():
        pngs = {p.name for p in tmp_path.glob("mem_*.png")}
        assert pngs == {"mem_full_fwd.png", "mem_blocksparse_0_1_fwd.png"}
        assert all((tmp_path / p).stat().st_size > 5000 for p in pngs)
        assert "![full, fwd: peak memory vs length](mem_full_fwd.png)" in text


def test_report_memory_single_length_and_cpu(tmp_path):
    recs = [_rec(1, "nbhd2d-13x13", 16384, "flex", 2.0, 3 * 2**30), _rec(2, "nbhd2d-13x13", 16384, "triton", 1.0,
                                                                          2 * 2**30)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=_has_matplotlib()).read_text()
    assert "| nbhd2d-13x13 | 16K | 3.00 | 2.00 |" in text
    if _has_matplotlib():
        assert (tmp_path / "mem_nbhd2d_13x13_fwd.png").stat().st_size > 5000
    # CPU records have no peak: no memory section
    cpu = [dict(_rec(1, "full", 128, "sdpa", 1.0, None), device="cpu")]
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "results.jsonl").write_text(json.dumps(cpu[0]) + "\n")
    text = report_mod.write_report(tmp_path / "cpu" / "results.jsonl", tmp_path / "cpu", plots=False).read_text()
    assert "Peak memory" not in text


def test_report_groups_head_dims_of_the_flash_grid(tmp_path):
    recs, i = [], 0
    for D in (64, 128):
        for L in (512, 16384):
            for p in ("full", "causal"):
                i += 1
                recs.append(_rec(i, p, L, "flash-attn", ms=D / 64 * L / 512, mem=2**30, D=D, B=16384 // L, Hq=16,
                                 Hkv=16))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=_has_matplotlib()).read_text()
    for D in (64, 128):
        assert f"### causal (fwd, D={D}, Hq=16, Hkv=16)" in text
        assert f"### Peak memory (fwd, D={D}, Hq=16, Hkv=16)" in text
    # B varies with L inside a group (B * L = 16K): a B column
    assert "| L | B | density | flash-attn |" in text and "| 512 | 32 | 1 | " in text and "| 16K | 1 | 1 | " in text
    if _has_matplotlib():
        names = {p.name for p in tmp_path.glob("*.png")}
        assert {"time_causal_d_64_hq_16_hkv_16_fwd.png", "mem_full_d_128_hq_16_hkv_16_fwd.png"} <= names


def test_a_peer_is_timed_forward_and_backward(tmp_path, monkeypatch):
    """Through the suite runner (with flash-attn's function replaced by its dense twin): ok records, with the
    peer's call described, for fwd and fwd+bwd."""
    peer = PEERS["flash-attn"]
    monkeypatch.setattr(peer, "_fn", lambda: (_FakeFlashAttn(), ""))
    monkeypatch.setattr(peer, "supports", lambda pattern, dtype=None, device=None: (True, ""))
    suite = _tiny_suite(("sdpa", "flash-attn"), ("flash-attn",))
    cases = plan(suite, patterns=["sw16"], backends=["flash-attn"], baseline=False, directions=["fwd", "fwdbwd"])
    assert {(c.pattern, c.direction) for c in cases} == {("sw16", "fwd"), ("sw16", "fwdbwd")}
    recs = run_suite(cases, tmp_path, suite=suite, progress=False)
    for r in recs:
        assert r["status"] == "ok", r
        assert r["impl"].startswith("flash_attn.flash_attn_func") and "window_size=(15, 0)" in r["impl"]
        assert r["median_ms"] > 0 and r["peer"] == "flash-attn"


def test_cli_dry_run_plans_gpu_suites_without_a_gpu(capsys):
    from attnzoo.cli import main

    assert main(["bench", "--suite", "flash", "--dry-run", "--pattern", "causal", "--lengths", "1024"]) == 0
    out = capsys.readouterr().out
    assert "B·L = 16K tokens" in out and "D=64/128" in out and "causal" in out
    assert main(["bench", "--suite", "cuda", "--dry-run", "--pattern", "blocksparse-0.1", "--lengths", "4096"]) == 0
    assert "blocksparse-0.1" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# triton variants (--variant NAME=JSON): candidate configs timed in the same run
# ------------------------------------------------------------------------------------------------
def test_variants_are_planned_after_each_triton_case():
    pytest.importorskip("triton")
    from attnzoo.bench.speed import parse_variant
    suite = _tiny_suite(("sdpa", "triton", "reference"), full=("sdpa", "triton"))
    suite = Suite(**{**suite.__dict__, "pattern_backends": ("triton", "reference")})
    tail = parse_variant('tail = {"bwd": {"GLUON_BWD": {"TAIL_ORDER": true}}}')
    assert tail == ("tail", '{"bwd": {"GLUON_BWD": {"TAIL_ORDER": true}}}')
    cases = plan(suite, directions=["fwd"], variants=[tail, ("b32", '{"fwd": {"BLOCK_M": 32}}')])
    labels = [(c.pattern, c.backend) for c in cases]
    for p in ("full", "causal", "sw16", "nbhd"):
        i = labels.index((p, "triton"))
        assert labels[i + 1:i + 3] == [(p, "triton[tail]"), (p, "triton[b32]")]
    assert [c.override for c in cases if c.backend == "triton[b32]"] == ['{"fwd": {"BLOCK_M": 32}}'] * 4
    # a variant is its own measurement: a different key from triton's, and from the same name with other settings
    c, v = cases[labels.index(("sw16", "triton"))], cases[labels.index(("sw16", "triton[tail]"))]
    other = plan(suite, patterns=["sw16"], directions=["fwd"], variants=[("tail", '{"bwd": {}}')])
    keys = {c.key("gpu"), v.key("gpu"), next(x for x in other if x.override).key("gpu")}
    assert len(keys) == 3
    assert "triton[tail]" in describe_plan(cases)
    for bad, match in (("tail", "NAME=JSON"), ("t=", "NAME=JSON"), ("={}", "variant name"), ("a b={}", "variant name"),
                       ('t={"bwdx": {}}', "kind must be"), ("t={oops", "not valid JSON")):
        with pytest.raises(ValueError, match=match):
            parse_variant(bad)
    with pytest.raises(ValueError, match="names must differ"):
        plan(suite, variants=[tail, tail])
    with pytest.raises(ValueError, match="leave none"):
        plan(suite, backends=["reference"], variants=[tail])
    with pytest.raises(ValueError, match="does not time"):
        plan(_tiny_suite(("sdpa", "reference")), variants=[tail])


def test_a_variant_runs_with_its_settings(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from attnzoo.backends.triton import ops, tuning
    if not ops.interpreting():
        pytest.skip("launches the kernels on CPU tensors (TRITON_INTERPRET=1 only)")
    monkeypatch.delenv("ATTNZOO_TRITON_OVERRIDE", raising=False)
    seen = []  # (a variant's settings active?, the config the kernels got)
    real = tuning._overridden
    monkeypatch.setattr(tuning, "_overridden", lambda *a: seen.append((bool(tuning._overrides), real(*a))) or
                        seen[-1][1])
    spec = PatternSpec("sw16", "window", lambda L: az.SlidingWindow(15), family="window")
    suite = Suite("tiny", "cpu", "float32", B=1, Hq=2, Hkv=1, D=16, lengths=(64,), backends=("triton",),
                  full_backends=(), pattern_backends=("triton",), specs=(spec,), reps=2, warmup=0, max_time_s=0.5)
    over = '{"fwd": {"BLOCK_M": 32, "BLOCK_N": 32}, "bwd@local": {"BLOCK_N": 32}}'
    cases = plan(suite, directions=["fwdbwd"], variants=[("b32", over)])
    recs = run_suite(cases, tmp_path, suite=suite, progress=False)
    assert [(r["backend"], r["status"]) for r in recs] == [("triton", "ok"), ("triton[b32]", "ok")], recs
    assert "variant" not in recs[0] and (recs[1]["variant"], recs[1]["variant_override"]) == ("b32", over)
    assert recs[1]["api_backend"] == "triton" and recs[0]["key"] != recs[1]["key"]
    plain = [cfg for active, cfg in seen if not active]
    varied = [cfg for active, cfg in seen if active]
    assert plain and varied and not tuning._overrides  # both ran; the settings are gone after the case
    assert all(cfg["BLOCK_M"] == 16 and cfg["BLOCK_N"] == 16 for cfg in plain)
    assert all(cfg["BLOCK_N"] == 32 for cfg in varied) and any(cfg["BLOCK_M"] == 32 for cfg in varied)
    # the run resumes: both cases are recorded (the variant under its own key) and not measured again
    n = len(seen)
    assert len(run_suite(cases, tmp_path, suite=suite, progress=False)) == 2 and len(seen) == n


def test_report_compares_each_variant_with_flex(tmp_path):
    recs = [_rec(i, "sw4096", 16384, b, ms, 2**30) for i, (b, ms) in
            enumerate((("flex", 3.0), ("triton", 2.0), ("triton[tail]", 1.5)))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=False).read_text()
    sec = text.split("### attnzoo triton vs compiled FlexAttention")[1]
    assert "| sw4096 | 1.50× |" in sec and "| sw4096 (triton[tail]) | 2.00× |" in sec and "--variant" in sec
