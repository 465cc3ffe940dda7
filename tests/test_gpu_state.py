"""The GPU clock / power monitor of the speed benchmark (`attnzoo.bench.gpu_state`), on CPU with a fake NVML."""
import json
import time
import types

import pytest
import torch

from attnzoo.bench import gpu_state
from attnzoo.bench.gpu_state import FIELDS, GpuMonitor, describe, summarize
from attnzoo.bench.report import gpu_state_section
from attnzoo.bench.timing import time_fn


def test_summarize_means_and_shares():
    samples = [(1980.0, 0, None), (1700.0, gpu_state.SW_POWER_CAP, None),
               (1600.0, gpu_state.SW_POWER_CAP | 0x1, None), (None, gpu_state.SW_THERMAL, None)]
    out = summarize(samples, 650.04)
    assert out == dict(sm_clock_mhz=1760.0, power_w=650.0, power_cap_share=0.5, thermal_share=0.25)
    assert summarize([], None) == dict.fromkeys(FIELDS)
    # the hardware power brake counts as power-capped; other reasons (idle, applications clocks) do not
    assert summarize([(1000.0, gpu_state.HW_POWER_BRAKE, None), (1000.0, 0x1 | 0x2, None)])["power_cap_share"] == 0.5
    # instantaneous power samples, where there are any, win over the energy counter's figure
    assert summarize([(1.0, 0, 600.0), (1.0, 0, 700.0), (1.0, 0, None)], 100.0)["power_w"] == 650.0


def test_describe():
    assert describe(dict(sm_clock_mhz=1712.4, power_w=688.2, power_cap_share=0.97, thermal_share=0.0)) == \
        "1712 MHz, 688 W, power-capped 97 %"
    assert describe(dict(sm_clock_mhz=None, power_w=None)) == ""
    assert describe({}) == ""


def test_monitor_without_nvml_records_nothing():
    m = GpuMonitor("cpu")
    assert not m.available
    assert m.start().stop() == {}
    for bad in (0, -0.01, True, "0.01"):
        with pytest.raises(ValueError, match="period_s"):
            GpuMonitor("cpu", period_s=bad)


def test_time_fn_cpu_has_empty_gpu_fields():
    x = torch.randn(16, 16)
    r = time_fn(lambda: x @ x, device="cpu", warmup=0, reps=3)
    assert r["status"] == "ok"
    assert all(f in r and r[f] is None for f in FIELDS)
    bad = time_fn(lambda: (_ for _ in ()).throw(RuntimeError("boom")), device="cpu", reps=2)
    assert bad["status"] == "error" and all(bad[f] is None for f in FIELDS)


class _FakeNvml(types.SimpleNamespace):
    """The pynvml calls the monitor makes: a clock that falls, the power-cap reason from the third sample on, an
    energy counter at 500 W, and (``instant``) instantaneous power readings of 640 W, else a failing field."""

    NVML_CLOCK_SM = 1

    def __init__(self, instant: bool):
        super().__init__(calls=0, t0=time.perf_counter(), instant=instant, field_calls=0)

    def nvmlDeviceGetFieldValues(self, handle, ids):
        assert ids == [gpu_state.POWER_INSTANT_FIELD]
        self.field_calls += 1
        value = types.SimpleNamespace(uiVal=640000)
        return [types.SimpleNamespace(nvmlReturn=0 if self.instant else 3, value=value)]

    def nvmlDeviceGetClockInfo(self, handle, which):
        assert handle == "h0" and which == self.NVML_CLOCK_SM
        self.calls += 1
        return 1980 if self.calls <= 2 else 1500

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return gpu_state.SW_POWER_CAP if self.calls > 2 else 0

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(500.0 * (time.perf_counter() - self.t0) * 1e3)  # mJ


@pytest.mark.parametrize("instant", [True, False])
def test_monitor_with_fake_nvml(monkeypatch, instant):
    fake = _FakeNvml(instant)
    monkeypatch.setattr(gpu_state, "_NVML", {"mod": fake})
    monkeypatch.setattr(gpu_state, "nvml_handle", lambda device: "h0")
    m = GpuMonitor("cuda", period_s=0.005)
    assert m.available
    m.start()
    time.sleep(0.3)
    out = m.stop()
    assert set(out) == set(FIELDS)
    assert fake.calls > 5
    assert 1500 < out["sm_clock_mhz"] < 1980  # the mean of the samples, the first two at 1980
    assert 0.5 < out["power_cap_share"] < 1 and out["thermal_share"] == 0
    if instant:  # the instantaneous readings
        assert out["power_w"] == 640.0 and fake.field_calls == fake.calls
    else:  # the energy counter over the 0.3 s window; the failing field asked once only
        assert out["power_w"] == pytest.approx(500, rel=0.1) and fake.field_calls == 1
    json.dumps(out)  # (goes into the JSON-lines records)
    # a window shorter than MIN_POWER_WINDOW_S gives no power from either source, but still the clock
    m.start()
    out = m.stop()
    assert out["power_w"] is None and out["sm_clock_mhz"] is not None


def test_report_section_lists_cases_with_gpu_state():
    base = dict(status="ok", pattern="sw4096", Lq=16384, direction="fwd", median_ms=3.15)
    recs = [dict(base, backend="triton", sm_clock_mhz=1712.0, power_w=689.0, power_cap_share=0.97,
                 thermal_share=0.0),
            dict(base, backend="flex", sm_clock_mhz=1905.0, power_w=610.0, power_cap_share=0.1, thermal_share=None),
            dict(base, backend="sdpa", sm_clock_mhz=None)]
    lines = gpu_state_section(recs)
    text = "\n".join(lines)
    assert "GPU clock and power" in text and "1712-1905 MHz" in text
    assert "97 %" in text and "10 %" in text and "689" in text
    assert "sdpa" not in text  # no state recorded for it
    assert gpu_state_section([dict(base, backend="triton")]) == []


# ------------------------------------------------------------------------------------------------
# sustained measurements (--sustain-s)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1.0, True, "1"])
def test_time_fn_rejects_bad_sustain(bad):
    with pytest.raises(ValueError, match="sustain_s"):
        time_fn(lambda: None, device="cpu", reps=1, sustain_s=bad)


def test_sustain_is_cuda_only_and_keyed_apart(tmp_path):
    from attnzoo.bench.speed import case_key, load_records
    from attnzoo.cli import main

    out = tmp_path / "b"
    argv = ["bench", "--out", str(out), "--suite", "cpu", "--pattern", "sw256", "--lengths", "128", "--reps", "1",
            "--direction", "fwd", "--backend", "reference", "--no-baseline", "--quiet", "--no-report"]
    assert main(argv + ["--sustain-s", "0.5"]) == 0
    (rec,) = load_records(out / "results.jsonl")
    # on CPU the option changes nothing: no sustain_s field, the plain key, the GPU state fields empty
    assert rec["status"] == "ok" and "sustain_s" not in rec and "|sustain" not in rec["key"]
    assert all(rec[f] is None for f in FIELDS)
    with pytest.raises(SystemExit):
        main(argv + ["--sustain-s", "0"])

    class _Case:
        def key(self, device_name, signature=""):
            return f"case|{signature}|{device_name}"

        spec = types.SimpleNamespace(build=lambda L: None)
        L = 128

    assert case_key(_Case(), "H100", 1.0).endswith("|sustain1")
    assert case_key(_Case(), "H100", 2.5).endswith("|sustain2.5")
    assert "|sustain" not in case_key(_Case(), "H100", None)


def test_report_groups_sustained_records_apart(tmp_path):
    from attnzoo.bench import report as report_mod

    rec = dict(key="k1", pattern="full", pattern_kind="full", pattern_repr="Full()", pattern_description="dense",
               density=1.0, B=1, Hq=2, Hkv=1, Lq=128, Lk=128, D=16, Dv=16, dtype="bfloat16", direction="fwd",
               backend="sdpa", device="cuda", device_name="test-gpu", status="ok", message="", median_ms=1.0,
               p20_ms=0.9, p80_ms=1.1, compile_ms=2.0, reps=3, peak_mem_bytes=None, sm_clock_mhz=1980.0,
               power_w=500.0, power_cap_share=0.0, thermal_share=0.0)
    held = dict(rec, key="k1|sustain1", median_ms=1.2, p20_ms=1.1, p80_ms=1.3, sustain_s=1.0, sm_clock_mhz=1700.0,
                power_w=699.0, power_cap_share=1.0)
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(held) + "\n")
    text = report_mod.write_report(tmp_path / "results.jsonl", tmp_path, plots=False).read_text()
    assert "after 1 s of load" in text  # its own section heading
    assert "1700" in text and "100 %" in text and "1700-1980 MHz" in text
