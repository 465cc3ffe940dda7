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
    samples = [(1980.0, 0), (1700.0, gpu_state.SW_POWER_CAP), (1600.0, gpu_state.SW_POWER_CAP | 0x1),
               (None, gpu_state.SW_THERMAL)]
    out = summarize(samples, 650.04)
    assert out == dict(sm_clock_mhz=1760.0, power_w=650.0, power_cap_share=0.5, thermal_share=0.25)
    assert summarize([], None) == dict.fromkeys(FIELDS)
    # the hardware power brake counts as power-capped; other reasons (idle, applications clocks) do not
    assert summarize([(1000.0, gpu_state.HW_POWER_BRAKE), (1000.0, 0x1 | 0x2)], None)["power_cap_share"] == 0.5


def test_describe():
    assert describe(dict(sm_clock_mhz=1712.4, power_w=688.2, power_cap_share=0.97, thermal_share=0.0)) == \
        "1712 MHz, 688 W, power-capped 97 %"
    assert describe(dict(sm_clock_mhz=None, power_w=None)) == ""
    assert describe({}) == ""


def test_monitor_without_nvml_records_nothing():
    m = GpuMonitor("cpu")
    assert not m.available
    assert m.start().stop() == {}
    with pytest.raises(ValueError, match="period_s"):
        GpuMonitor("cpu", period_s=0)


def test_time_fn_cpu_has_empty_gpu_fields():
    x = torch.randn(16, 16)
    r = time_fn(lambda: x @ x, device="cpu", warmup=0, reps=3)
    assert r["status"] == "ok"
    assert all(f in r and r[f] is None for f in FIELDS)
    bad = time_fn(lambda: (_ for _ in ()).throw(RuntimeError("boom")), device="cpu", reps=2)
    assert bad["status"] == "error" and all(bad[f] is None for f in FIELDS)


class _FakeNvml(types.SimpleNamespace):
    """The pynvml calls the monitor makes: a clock that falls, the power-cap reason from the third sample on, and
    an energy counter at 500 W."""

    NVML_CLOCK_SM = 1

    def __init__(self):
        super().__init__(calls=0, t0=time.perf_counter())

    def nvmlDeviceGetClockInfo(self, handle, which):
        assert handle == "h0" and which == self.NVML_CLOCK_SM
        self.calls += 1
        return 1980 if self.calls <= 2 else 1500

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return gpu_state.SW_POWER_CAP if self.calls > 2 else 0

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(500.0 * (time.perf_counter() - self.t0) * 1e3)  # mJ


def test_monitor_with_fake_nvml(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setattr(gpu_state, "_NVML", {"mod": fake})
    monkeypatch.setattr(gpu_state, "nvml_handle", lambda device: "h0")
    m = GpuMonitor("cuda", period_s=0.005)
    assert m.available
    m.start()
    time.sleep(0.2)
    out = m.stop()
    assert set(out) == set(FIELDS)
    assert fake.calls > 5
    assert 1500 < out["sm_clock_mhz"] < 1980  # the mean of the samples, the first two at 1980
    assert 0.5 < out["power_cap_share"] < 1 and out["thermal_share"] == 0
    assert out["power_w"] == pytest.approx(500, rel=0.1)
    json.dumps(out)  # (goes into the JSON-lines records)


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
