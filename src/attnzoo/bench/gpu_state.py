"""The GPU's SM clock, board power and throttling while a benchmark's timed calls run.

An H100 under a long attention load holds its 700 W power cap by lowering its SM clock: in the twenty-eighth session
window 4096's forward at 16K tokens took 2.94 ms over its first five calls and 3.15 ms (median) over a second of them,
while the clock fell from 1980 MHz to 1400-1800 with NVML's "software power cap" reason active. The same kernel therefore times differently in a short burst and in a
long stream, and a faster kernel (more power) is slowed more than a slower peer. `time_fn` records what the clock and
power were while it timed, so that a reader can tell (fields ``sm_clock_mhz``, ``power_w``, ``power_cap_share``,
``thermal_share`` of the record; None where NVML is not available).

NVML comes from the optional ``pynvml`` module (``nvidia-ml-py``); without it, or on CPU, the monitor records nothing
and costs nothing.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Optional

import torch

# NVML clock-event reason bits (nvml.h: nvmlClocksEventReason*)
SW_POWER_CAP = 0x4
HW_SLOWDOWN = 0x8
SW_THERMAL = 0x20
HW_THERMAL = 0x40
HW_POWER_BRAKE = 0x80
POWER_BITS = SW_POWER_CAP | HW_POWER_BRAKE
THERMAL_BITS = SW_THERMAL | HW_THERMAL

FIELDS = ("sm_clock_mhz", "power_w", "power_cap_share", "thermal_share")
POWER_INSTANT_FIELD = 186  # nvml.h NVML_FI_DEV_POWER_INSTANT (mW), drivers from 2023 on
# the board's power readings lag (H100, twenty-eighth session: the energy counter gave 0 W over some 10 ms windows and
# nearly 1 kW over others; the instantaneous field 120-260 W over 40 ms windows of a kernel at 510 TF/s, still the
# idle level before them), so power is kept only over timed windows at least this long
MIN_POWER_WINDOW_S = 0.25

_NVML: dict = {}  # {"mod": pynvml or None, device index: handle or None}


def _pynvml():
    if "mod" not in _NVML:
        try:
            import pynvml
            pynvml.nvmlInit()
            _NVML["mod"] = pynvml
        except Exception:  # noqa: BLE001 - not installed, no driver: no GPU state
            _NVML["mod"] = None
    return _NVML["mod"]


def nvml_handle(device) -> Optional[object]:
    """The NVML handle of a torch CUDA device (matched by UUID, else by index), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _NVML:
        return _NVML[idx]
    nv = _pynvml()
    handle = None
    if nv is not None:
        try:
            uuid = str(torch.cuda.get_device_properties(idx).uuid)
            handle = nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:  # noqa: BLE001 - older torch (no uuid) or another UUID form: by index
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(idx)
            except Exception:  # noqa: BLE001
                handle = None
    _NVML[idx] = handle
    return handle


def _reasons(nv, handle) -> int:
    get = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nv.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(get(handle))


def _instant_power_w(nv, handle):
    """The board's instantaneous power in W (NVML field NVML_FI_DEV_POWER_INSTANT), or None where not supported."""
    vals = nv.nvmlDeviceGetFieldValues(handle, [getattr(nv, "NVML_FI_DEV_POWER_INSTANT", POWER_INSTANT_FIELD)])
    v = vals[0]
    if getattr(v, "nvmlReturn", 1) != 0:
        return None
    return float(v.value.uiVal) / 1e3


class GpuMonitor:
    """Samples the SM clock, the instantaneous board power and the clock-event reasons every ``period_s`` in a
    thread between `start` and `stop`. Mean power: of the instantaneous samples where the driver gives them, else
    from the board's energy counter at both ends (NVML's plain power reading is a one-second average, too slow for a
    timed window of a few hundred milliseconds); power only over windows of at least `MIN_POWER_WINDOW_S`.

    ``stop()`` -> ``{sm_clock_mhz, power_w, power_cap_share, thermal_share}`` (the shares: fractions of the samples
    whose reasons include the power cap / a thermal slowdown), each None where it could not be read; an empty dict
    without NVML."""

    def __init__(self, device, period_s: float = 0.01):
        if isinstance(period_s, bool) or not (isinstance(period_s, (int, float)) and period_s > 0):
            raise ValueError(f"period_s must be a positive number, got {period_s!r}")
        self.period_s = float(period_s)
        self.handle = nvml_handle(device)
        self._samples: list = []
        self._stop = threading.Event()
        self._thread = None
        self._t0 = self._e0 = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _energy_mj(self):
        try:
            return float(_NVML["mod"].nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception:  # noqa: BLE001 - counter not supported on this GPU
            return None

    def _sample(self):
        nv = _NVML["mod"]
        instant = True
        while True:
            try:
                clock = float(nv.nvmlDeviceGetClockInfo(self.handle, nv.NVML_CLOCK_SM))
            except Exception:  # noqa: BLE001
                clock = None
            try:
                reasons = _reasons(nv, self.handle)
            except Exception:  # noqa: BLE001
                reasons = None
            watts = None
            if instant:
                try:
                    watts = _instant_power_w(nv, self.handle)
                except Exception:  # noqa: BLE001 - an older driver or binding: the energy counter alone
                    watts = None
                instant = watts is not None
            self._samples.append((clock, reasons, watts))
            if self._stop.wait(self.period_s):
                return

    def start(self) -> "GpuMonitor":
        if not self.available:
            return self
        self._samples, self._stop = [], threading.Event()
        self._t0, self._e0 = time.perf_counter(), self._energy_mj()
        self._thread = threading.Thread(target=self._sample, name="attnzoo-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        if not self.available or self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        wall = time.perf_counter() - self._t0
        e1 = self._energy_mj()
        power = None
        if e1 is not None and self._e0 is not None and e1 > self._e0:
            power = (e1 - self._e0) / 1e3 / wall
        out = summarize(self._samples, power)
        if wall < MIN_POWER_WINDOW_S:
            out["power_w"] = None
        return out


def summarize(samples, power_w: Optional[float] = None) -> dict:
    """The record fields from ``(clock MHz, reasons bit mask, instantaneous W)`` samples (each None where not read):
    the mean of the power samples where there are any, else ``power_w`` (from the energy counter)."""
    clocks = [c for c, _, _ in samples if c is not None]
    reasons = [r for _, r, _ in samples if r is not None]
    watts = [w for _, _, w in samples if w is not None]
    if watts:
        power_w = statistics.mean(watts)
    share = (lambda bits: sum(1 for r in reasons if r & bits) / len(reasons)) if reasons else (lambda bits: None)
    return dict(sm_clock_mhz=round(statistics.mean(clocks), 1) if clocks else None,
                power_w=round(power_w, 1) if power_w is not None else None,
                power_cap_share=share(POWER_BITS), thermal_share=share(THERMAL_BITS))


def describe(rec: dict) -> str:
    """``"1712 MHz, 688 W, power-capped 97 %"`` for a record with these fields, or ``""``."""
    bits = []
    if rec.get("sm_clock_mhz") is not None:
        bits.append(f"{rec['sm_clock_mhz']:.0f} MHz")
    if rec.get("power_w") is not None:
        bits.append(f"{rec['power_w']:.0f} W")
    if rec.get("power_cap_share"):
        bits.append(f"power-capped {100 * rec['power_cap_share']:.0f} %")
    if rec.get("thermal_share"):
        bits.append(f"thermal slowdown {100 * rec['thermal_share']:.0f} %")
    return ", ".join(bits)
