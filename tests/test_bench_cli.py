"""Smoke tests of the benchmark machinery and the `attnzoo` command (fast: a few seconds on CPU)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import attnzoo as az
from attnzoo.bench import report as report_mod
from attnzoo.bench.speed import (attention_flops, cpu_suite, dense_baselines, document_lengths,
                                 fraction_of_ideal, load_records, plan, tflops_of, visible_pairs)
from attnzoo.bench.timing import Unsupported, classify_exception, percentile, time_fn
from attnzoo.cli import main, parse_lengths


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------------
# helpers on hand-computed numbers
# ------------------------------------------------------------------------------------------------
def test_flops_by_hand():
    # 4 * B * Hq * D * pairs = 4 * 1 * 2 * 64 * (128 * 128)
    assert attention_flops(1, 2, 64, 128, 128) == 8_388_608
    assert attention_flops(1, 2, 64, 128, 128, direction="fwdbwd") == 3.5 * 8_388_608
    assert attention_flops(1, 2, 64, 128, 128, direction="fwd+bwd") == 3.5 * 8_388_608
    assert attention_flops(1, 2, 64, 128, 128, direction="bwd") == 2.5 * 8_388_608
    assert attention_flops(2, 2, 64, 128, 128, density=0.25) == 2 * 8_388_608 / 4
    # GQA counts query heads; Dv != D: 2 * B * Hq * (D + Dv) * pairs
    assert attention_flops(1, 8, 64, 10, 20, Dv=32) == 2 * 8 * 96 * 200
    assert visible_pairs(0.5, 4, 6) == 12
    with pytest.raises(ValueError, match="direction"):
        attention_flops(1, 1, 1, 1, 1, direction="sideways")


def test_causal_flops_use_exact_density():
    d = az.Causal().density(256, 256)
    assert d == (256 * 257 / 2) / (256 * 256)
    assert attention_flops(1, 4, 64, 256, 256, d) == 4 * 4 * 64 * (256 * 257 / 2)


def test_tflops_and_fraction_of_ideal_by_hand():
    assert tflops_of(2e12, 1000.0) == pytest.approx(2.0)
    assert tflops_of(1e9, 0.5) == pytest.approx(2.0)
    assert tflops_of(1e9, None) is None
    # dense 10 ms for 100 FLOPs; pattern 4 ms for 25 FLOPs: speed-up 2.5 of an ideal 4 -> 0.625
    assert fraction_of_ideal(10.0, 4.0, 100.0, 25.0) == pytest.approx(0.625)
    # a pattern exactly as fast as its FLOP saving predicts
    assert fraction_of_ideal(8.0, 2.0, 4e12, 1e12) == pytest.approx(1.0)
    assert fraction_of_ideal(None, 2.0, 1.0, 1.0) is None


def test_percentile_by_hand():
    xs = [5, 1, 4, 2, 3]
    assert percentile(xs, 50) == 3
    assert percentile(xs, 20) == pytest.approx(1.8)
    assert percentile(xs, 80) == pytest.approx(4.2)
    assert percentile([7.0], 20) == 7.0


def test_document_lengths_deterministic():
    a = document_lengths(4096)
    assert a == document_lengths(4096) and sum(a) == 4096 and min(a) >= 1
    assert sum(document_lengths(65536)) == 65536


def test_parse_lengths():
    assert parse_lengths("1024,2048") == [1024, 2048]
    assert parse_lengths("1K..8k") == [1024, 2048, 4096, 8192]
    assert parse_lengths("256") == [256]


# ------------------------------------------------------------------------------------------------
# time_fn
# ------------------------------------------------------------------------------------------------
def test_time_fn_cpu_ok():
    x = torch.randn(64, 64)
    r = time_fn(lambda: x @ x, device="cpu", warmup=1, reps=5)
    assert r["status"] == "ok" and r["reps"] == 5
    assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert r["compile_ms"] > 0 and r["peak_mem_bytes"] is None


@pytest.mark.parametrize("exc, status", [
    (ValueError("backend='sdpa' cannot run this request: nope"), "unsupported"),
    (Unsupported("no backward"), "unsupported"),
    (RuntimeError("kernel exploded"), "error"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB"), "oom"),
])
def test_time_fn_failures_become_statuses(exc, status):
    def boom():
        raise exc
    r = time_fn(boom, device="cpu", warmup=0, reps=3)
    assert r["status"] == status and r["median_ms"] is None
    assert r["message"]
    assert classify_exception(exc)[0] == status


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------
def test_plan_filters_and_baseline():
    suite = cpu_suite()
    cases = plan(suite, patterns=["sw256"], backends=["reference"], lengths=[512], directions=["fwd"])
    got = {(c.pattern, c.backend) for c in cases}
    assert got == {("full", "sdpa"), ("sw256", "reference")}  # the dense SDPA baseline is kept
    assert cases[0].pattern == "full"  # baselines first
    assert not plan(suite, patterns=["sw256"], backends=["reference"], lengths=[512], directions=["fwd"],
                    baseline=False)[0].pattern == "full"
    # fixed-size patterns run only at their own length
    assert all(c.pattern != "nbhd2d-7x7" for c in plan(suite, lengths=[512]))
    assert any(c.pattern == "nbhd2d-7x7" for c in plan(suite, lengths=[1024]))
    with pytest.raises(ValueError, match="choose from"):
        plan(suite, patterns=["nope"])
    with pytest.raises(ValueError, match="choose from"):
        plan(suite, backends=["cudnn-magic"])


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def test_list_prints_both_tables(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Patterns" in out and "Backends" in out
    for name in ("Full", "Causal", "SlidingWindow", "Neighborhood", "PerHead"):
        assert name in out
    for name in ("sdpa", "flex", "reference"):
        assert name in out
    assert "lse" in out and "grad" in out and "devices" in out


def _ok_counts(path):
    return Counter(r["key"] for r in load_records(path) if r["status"] == "ok")


def test_tiny_bench_records_report_and_resume(tmp_path, capsys):
    out = tmp_path / "bo"
    argv = ["bench", "--out", str(out), "--suite", "cpu", "--pattern", "causal", "--lengths", "256",
            "--reps", "2", "--direction", "fwd", "--backend", "sdpa,reference"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Summary" in text and "report:" in text

    recs = load_records(out / "results.jsonl")
    assert {(r["pattern"], r["backend"]) for r in recs} == {("full", "sdpa"), ("causal", "sdpa"),
                                                             ("causal", "reference")}
    dense = dense_baselines(recs)
    for r in recs:
        assert r["status"] == "ok", r
        assert r["reps"] == 2 and r["Lq"] == r["Lk"] == 256 and r["direction"] == "fwd"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["compile_ms"] > 0
        for key in ("device_name", "torch_version", "attnzoo_version", "timestamp", "dtype", "B", "Hq", "Hkv",
                    "D", "peak_mem_bytes", "triton_version"):
            assert key in r
        pattern = az.Full() if r["pattern"] == "full" else az.Causal()
        density = pattern.density(256, 256)
        assert r["density"] == pytest.approx(density)
        flops = 4 * r["B"] * r["Hq"] * r["D"] * density * 256 * 256
        assert r["flops"] == pytest.approx(flops)
        assert r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12)
        dense_ms = dense[(r["device_name"], 1, r["Hq"], r["Hkv"], 256, 256, r["D"], r["D"], r["dtype"], "fwd")][0]
        assert r["frac_ideal"] == pytest.approx((dense_ms / r["median_ms"]) / (1.0 / density))

    report = (out / "report.md").read_text()
    assert "causal" in report and "Fraction of ideal" in report and "sdpa" in report
    pngs = list(out.glob("*.png"))
    if _has_matplotlib():
        assert pngs, "matplotlib is installed but no plot was written"
        assert all(p.stat().st_size > 1000 for p in pngs)
        assert "![" in report

    # resumable: the same command again measures nothing new
    before = _ok_counts(out / "results.jsonl")
    assert main(argv) == 0
    assert "resumed" in capsys.readouterr().out
    after = _ok_counts(out / "results.jsonl")
    assert after == before and max(after.values()) == 1

    # the report alone
    (out / "report.md").unlink()
    assert main(["bench", "report", "--out", str(out)]) == 0
    assert (out / "report.md").exists()


def test_planned_skip_and_unsupported_are_recorded(tmp_path, capsys):
    # flex-eager has no backward on CPU: recorded as unsupported with the backend's reason
    out = tmp_path / "b2"
    assert main(["bench", "--out", str(out), "--suite", "cpu", "--pattern", "sw256", "--lengths", "128",
                 "--reps", "1", "--direction", "fwdbwd", "--backend", "flex", "--no-baseline", "--quiet",
                 "--no-report"]) == 0
    (rec,) = load_records(out / "results.jsonl")
    assert rec["backend"] == "flex-eager" and rec["status"] == "unsupported" and "backward" in rec["message"]
    assert rec["tflops"] is None and rec["median_ms"] is None
    # the report lists it under "Not measured"
    report_mod.write_report(out / "results.jsonl", out, plots=False)
    assert "Not measured" in (out / "report.md").read_text()


def test_report_without_matplotlib(tmp_path, monkeypatch):
    rec = dict(key="k1", pattern="full", pattern_kind="full", pattern_repr="Full()", pattern_description="dense",
               density=1.0, B=1, Hq=2, Hkv=1, Lq=128, Lk=128, D=16, Dv=16, dtype="float32", direction="fwd",
               backend="sdpa", device="cpu", device_name="test-cpu", status="ok", message="", median_ms=1.0,
               p20_ms=0.9, p80_ms=1.1, compile_ms=2.0, reps=3, peak_mem_bytes=None)
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = report_mod.write_report(tmp_path / "results.jsonl", tmp_path)
    text = path.read_text()
    assert "Plots skipped" in text and "matplotlib" in text
    assert "| 128 | 1 | 1.00 ms / " in text
    assert not list(tmp_path.glob("*.png"))


def test_report_triton_vs_flex_table(tmp_path):
    base = dict(pattern_kind="pattern", pattern_repr="SlidingWindow(1023)", pattern_description="window",
                density=0.1, B=1, Hq=2, Hkv=1, Lk=128, D=16, Dv=16, dtype="bfloat16", direction="fwd",
                device="cuda", device_name="test-gpu", status="ok", message="", p20_ms=None, p80_ms=None,
                compile_ms=1.0, reps=3, peak_mem_bytes=None)
    recs = [dict(base, key=f"k{i}", pattern="sw1024", Lq=L, backend=b, median_ms=ms)
            for i, (L, b, ms) in enumerate([(128, "flex", 3.0), (128, "triton", 2.0), (256, "flex", 5.0)])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=False).read_text()
    assert "### attnzoo triton vs compiled FlexAttention (" in text
    assert "| pattern | L=128 |\n|---|---:|\n| sw1024 | 1.50× |" in text


@pytest.mark.parametrize("argv", [
    ["bench", "--lengths", "abc"],
    ["bench", "--reps", "0"],
    ["bench", "--direction", "sideways"],
    ["bench", "--suite", "tpu"],
    ["bench", "--suite", "cpu", "--pattern", "no-such-pattern", "--dry-run"],
    ["frobnicate"],
])
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    assert "error" in capsys.readouterr().err


def test_report_without_results_fails(tmp_path, capsys):
    assert main(["bench", "report", "--out", str(tmp_path / "empty")]) != 0
    assert "no results.jsonl" in capsys.readouterr().err


def test_console_entry_point_exit_code():
    # the real process: argparse's exit code and message reach the shell
    p = subprocess.run([sys.executable, "-c", "import sys; from attnzoo.cli import main; sys.exit(main())",
                        "bench", "--suite", "cpu", "--pattern", "nope", "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--pattern 'nope'" in p.stderr and "choose from" in p.stderr
    assert math.isfinite(p.returncode)


@pytest.mark.parametrize("value, message", [("{oops", "not valid JSON"), ('{"back": {}}', "kind must be"),
                                            ('{"bwd@huge": {}}', "pattern class")])
def test_bad_triton_override_exits_nonzero(value, message, capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("ATTNZOO_TRITON_OVERRIDE", "")  # (set, so that monkeypatch restores it after the test)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "cpu", "--pattern", "sw256", "--dry-run", "--triton-override", value])
    assert e.value.code not in (0, None)
    assert message in capsys.readouterr().err and os.environ["ATTNZOO_TRITON_OVERRIDE"] == ""  # not set
    with pytest.raises(SystemExit):
        main(["bench", "recall", "--triton-override", '{"bwd": {}}'])
    assert "speed benchmark" in capsys.readouterr().err


def test_triton_override_is_set_for_the_run(capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("ATTNZOO_TRITON_OVERRIDE", "")  # (the CLI sets it: monkeypatch restores it after the test)
    value = '{"bwd@wide": {"GLUON_BWD": {"TAIL_ORDER": true}}}'
    assert main(["bench", "--suite", "cpu", "--pattern", "sw256", "--dry-run", "--triton-override", value]) == 0
    assert os.environ["ATTNZOO_TRITON_OVERRIDE"] == value


def test_variants_on_the_command_line(capsys):
    pytest.importorskip("triton")
    tail = 'tail={"bwd": {"GLUON_BWD": {"TAIL_ORDER": true}}}'
    args = ["bench", "--suite", "cuda", "--dry-run", "--pattern", "sw4096", "--lengths", "16384", "--direction",
            "fwd+bwd", "--backend", "triton", "--backend", "flex", "--no-baseline"]
    assert main(args + ["--variant", tail, "--variant", 'b64={"bwd@wide": {"BLOCK_N": 64}}']) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("sw4096 ")]
    assert [r[4] for r in rows] == ["flex", "triton", "triton[tail]", "triton[b64]"]
    for bad, message in ((["--variant", "tail"], "NAME=JSON"), (["--variant", 't={"fwd": 3}'], "settings must be"),
                         (["--variant", tail, "--variant", tail], "names must differ")):
        with pytest.raises(SystemExit) as e:
            main(args + bad)
        assert e.value.code not in (0, None) and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "niah", "--variant", tail])
    assert "speed benchmark" in capsys.readouterr().err
