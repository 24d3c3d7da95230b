"""Energy per token: joules over the first-token and decode regions, from the hardware's own meter.

Three sources, the first the device offers:

* CUDA: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  mJ since the driver loaded), through the optional ``nvidia-ml-py``.
* NPU: ``npu-smi info -t power -i <npu> -c <chip>`` (W), sampled in a thread
  and integrated over time.
* CPU: RAPL's package counters (``/sys/class/powercap/intel-rapl:N/energy_uj``),
  unwrapped with ``max_energy_range_uj`` and summed over packages.

A :class:`Sampler` reads the meter in a background thread over a whole
generation; :meth:`Sampler.joules` gives the energy between two host times
(``time.perf_counter``), interpolated between samples.  Where nothing is
readable the reason is kept and every figure is "n/a".
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("vicuna_bench")

RAPL_ROOT = Path("/sys/class/powercap")
# Counters are cheap to read; npu-smi is a process per read, so it is asked less often.
COUNTER_INTERVAL_S = 0.01
NPU_SMI_INTERVAL_S = 0.1
# npu-smi's labels (its source, show_ascend_chip_power_info: "NPU Real-time Power(W)" for an NPU chip,
# "Power Dissipation(W)" for another unit, "Rated Power Dissipation(W)" on 310): the first one present is read.
NPU_POWER_LABELS = ("NPU Real-time Power(W)", "Power Dissipation(W)", "Rated Power Dissipation(W)")
_RAPL_PACKAGE = re.compile(r"^intel-rapl:(\d+)$")  # intel-rapl:0 is a package; intel-rapl:0:0 a subdomain of it


class Unreadable(Exception):
    """No energy source can be read here; the message says why."""


# ---------------------------------------------------------------- meters

class Meter:
    """One energy source over this run's devices; :meth:`read` returns joules (``cumulative``) or watts."""

    source = ""
    cumulative = True  # True: read() is a running energy total (J); False: an instantaneous power (W)
    interval_s = COUNTER_INTERVAL_S

    def read(self) -> float:
        raise NotImplementedError

    @property
    def resolution(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NvmlMeter(Meter):
    """NVML's total-energy counter (mJ) of each given GPU, summed, in J."""

    source = "nvml"

    def __init__(self, pci_buses: Sequence[str], nvml=None):
        if nvml is None:
            try:
                import pynvml as nvml  # nvidia-ml-py: optional (the "energy" extra)
            except ImportError:
                raise Unreadable("nvidia-ml-py not installed") from None
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError: no driver, no library
            raise Unreadable(f"NVML init failed: {exc}") from None
        try:
            self._handles = [nvml.nvmlDeviceGetHandleByPciBusId(bus) for bus in pci_buses]
            for handle in self._handles:
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # Volta and later; NOT_SUPPORTED before
        except Exception as exc:
            self.close()
            raise Unreadable(f"NVML total energy not readable: {exc}") from None
        self.devices = list(pci_buses)

    def read(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3

    @property
    def resolution(self) -> str:
        return (f"1 mJ counter of {len(self._handles)} GPU(s) ({', '.join(self.devices)}), read every "
                f"{self.interval_s * 1e3:g} ms; the driver updates it at its own rate")

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down a library that failed to start: nothing to do
            pass


@dataclasses.dataclass
class _RaplDomain:
    path: Path
    max_uj: int
    last_uj: int
    total_uj: int = 0


class RaplMeter(Meter):
    """RAPL package energy (µJ counters, unwrapped), summed over packages, in J."""

    source = "rapl"

    def __init__(self, root: Path = RAPL_ROOT):
        root = Path(root)
        if not root.is_dir():
            raise Unreadable(f"no {root} (no RAPL powercap interface)")
        packages = sorted((p for p in root.iterdir() if _RAPL_PACKAGE.match(p.name)),
                          key=lambda p: int(_RAPL_PACKAGE.match(p.name).group(1)))
        if not packages:
            raise Unreadable(f"{root} has no intel-rapl:N package domain")
        self._domains = []
        for pkg in packages:
            try:
                max_uj = int((pkg / "max_energy_range_uj").read_text().strip())
                now = int((pkg / "energy_uj").read_text().strip())
            except (OSError, ValueError) as exc:  # energy_uj is root-only on kernels since 5.10 (CVE-2020-8694)
                why = getattr(exc, "strerror", None) or exc
                raise Unreadable(f"{pkg / 'energy_uj'} not readable ({why})") from None
            self._domains.append(_RaplDomain(pkg, max_uj, now))
        self.root = root

    def read(self) -> float:
        for d in self._domains:
            now = int((d.path / "energy_uj").read_text().strip())
            # The counter wraps at max_energy_range_uj (minutes at full load): a drop is one wrap.
            d.total_uj += now - d.last_uj if now >= d.last_uj else now + d.max_uj - d.last_uj
            d.last_uj = now
        return sum(d.total_uj for d in self._domains) / 1e6

    @property
    def resolution(self) -> str:
        names = ", ".join(d.path.name for d in self._domains)
        return f"1 µJ package counters ({names}), read every {self.interval_s * 1e3:g} ms"


def parse_npu_power(text: str) -> float:
    """``npu-smi info -t power -i N [-c C]`` -> watts; ValueError when no power line holds a number."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), value.strip())
    for label in NPU_POWER_LABELS:
        if label in values:
            try:
                return float(values[label])
            except ValueError:
                raise ValueError(f"npu-smi's {label} is {values[label]!r}, not a number") from None
    raise ValueError(f"npu-smi shows no power line ({' / '.join(NPU_POWER_LABELS)})")


class NpuSmiMeter(Meter):
    """Power of each given NPU chip from ``npu-smi info -t power``, summed, in W."""

    source = "npu-smi"
    cumulative = False
    interval_s = NPU_SMI_INTERVAL_S

    def __init__(self, chips: Sequence[tuple[int, int]], run: Callable[[Sequence[str]], str] | None = None):
        from .binding import run_tool

        self._run = run or run_tool
        self.chips = list(chips)
        try:
            self.read()
        except (OSError, ValueError) as exc:
            raise Unreadable(f"npu-smi power not readable: {exc}") from None
        except Exception as exc:  # CalledProcessError, TimeoutExpired
            raise Unreadable(f"npu-smi power not readable: {type(exc).__name__}: {exc}") from None

    def argv(self, npu: int, chip: int) -> list[str]:
        return ["npu-smi", "info", "-t", "power", "-i", str(npu), "-c", str(chip)]

    def read(self) -> float:
        return sum(parse_npu_power(self._run(self.argv(npu, chip))) for npu, chip in self.chips)

    @property
    def resolution(self) -> str:
        chips = ", ".join(f"NPU {n} chip {c}" for n, c in self.chips)
        return (f"0.1 W power of {chips}, sampled every {self.interval_s * 1e3:g} ms or slower "
                "(one npu-smi call per chip), integrated over time")


# ---------------------------------------------------------------- choosing a meter

def open_meter(device: str, device_indices: Sequence[int]) -> Meter:
    """The energy meter of ``device`` (cuda | npu | cpu) over this run's devices; :class:`Unreadable` if none."""
    if device == "cuda":
        from .binding import BindingFailed, cuda_pci_bus

        try:
            buses = [cuda_pci_bus(i) for i in device_indices]
        except BindingFailed as exc:
            raise Unreadable(str(exc)) from None
        return NvmlMeter(buses)
    if device == "npu":
        return NpuSmiMeter(npu_chips(device_indices))
    if device == "cpu":
        return RaplMeter()
    raise Unreadable(f"no energy source for device {device!r}")


def npu_chips(device_indices: Sequence[int], run=None, env=None) -> list[tuple[int, int]]:
    """(npu id, chip id) of each torch NPU device index, through npu-smi's chip table (as the binding finds it)."""
    from .binding import BindingFailed, _npu_chip_map, _npu_logic_ids, run_tool

    try:
        chip_map, _ = _npu_chip_map(run or run_tool)
        logic = _npu_logic_ids(device_indices, os.environ if env is None else env, chip_map)
    except BindingFailed as exc:
        raise Unreadable(f"npu-smi chip table: {exc}") from None
    missing = [i for i in logic if i not in chip_map]
    if missing:
        raise Unreadable(f"npu-smi lists no chip with logic id {missing[0]}")
    return [chip_map[i] for i in logic]


def describe(device: str, device_indices: Sequence[int]) -> dict:
    """The environment record's energy entry: ``{"source", "resolution"}`` or ``{"source": "n/a", "reason"}``.

    NPU: whether npu-smi is installed (asking it is a process per query; the
    perf run asks, and records the answer in its samples JSON).
    """
    if device == "npu":
        if shutil.which("npu-smi") is None:
            return {"source": "n/a", "reason": "npu-smi not found"}
        return {"source": "npu-smi", "resolution": f"0.1 W power, sampled every {NPU_SMI_INTERVAL_S * 1e3:g} ms "
                                                   "or slower, integrated over time"}
    try:
        meter = open_meter(device, device_indices)
    except Unreadable as exc:
        return {"source": "n/a", "reason": str(exc)}
    try:
        return {"source": meter.source, "resolution": meter.resolution}
    finally:
        meter.close()


# ---------------------------------------------------------------- sampling

class Sampler:
    """Reads ``meter`` every ``meter.interval_s`` in a thread between :meth:`start` and :meth:`stop`.

    Samples are (host time, cumulative joules); a power meter's watts are
    integrated by the trapezoid rule as they come.  Host time is
    ``time.perf_counter`` (CLOCK_MONOTONIC on Linux: one clock for every
    process on the host, so a worker rank's region stamps and these samples agree).
    """

    def __init__(self, meter: Meter, clock: Callable[[], float] = time.perf_counter):
        self.meter = meter
        self.clock = clock
        self.times: list[float] = []
        self.joules: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_watts: float | None = None

    def sample(self) -> None:
        """Take one sample now (the thread's step; tests call it directly)."""
        before = self.clock()
        value = self.meter.read()
        t = (before + self.clock()) / 2  # a slow read (npu-smi) is dated at its middle
        if self.meter.cumulative:
            energy = value
        else:
            energy = 0.0 if not self.times else (
                self.joules[-1] + (value + self._last_watts) / 2 * (t - self.times[-1]))
            self._last_watts = value
        self.times.append(t)
        self.joules.append(energy)

    def _loop(self) -> None:
        try:
            while True:
                self.sample()
                if self._stop.wait(self.meter.interval_s):
                    break
            self.sample()  # one after the end, so the last region is bracketed
        except Exception as exc:  # a meter that stops answering: the figures of this run become n/a
            self.error = f"{self.meter.source} read failed: {type(exc).__name__}: {exc}"

    def start(self) -> "Sampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vicuna-bench-energy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def energy_at(self, t: float) -> float | None:
        """Cumulative joules at host time ``t``, linear between samples; None outside the sampled span."""
        ts = self.times
        if not ts or t < ts[0] or t > ts[-1]:
            return None
        i = bisect.bisect_left(ts, t)
        if ts[i] == t:
            return self.joules[i]
        t0, t1, e0, e1 = ts[i - 1], ts[i], self.joules[i - 1], self.joules[i]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0)

    def joules_between(self, start: float, end: float) -> float | None:
        """Energy (J) from host time ``start`` to ``end``; None when the samples do not cover it."""
        if self.error is not None or end < start:
            return None
        a, b = self.energy_at(start), self.energy_at(end)
        return None if a is None or b is None else b - a


@dataclasses.dataclass
class EnergyProbe:
    """A run's meter (or why there is none): what perf's measure_case wraps around each generation."""

    meter: Meter | None
    reason: str | None = None  # why meter is None

    @classmethod
    def open(cls, device: str, device_indices: Sequence[int]) -> "EnergyProbe":
        try:
            meter = open_meter(device, device_indices)
        except Unreadable as exc:
            log.info("energy per token: n/a (%s)", exc)
            return cls(None, str(exc))
        log.info("energy per token: %s, %s", meter.source, meter.resolution)
        return cls(meter)

    @property
    def source(self) -> str:
        return self.meter.source if self.meter is not None else "n/a"

    def record(self) -> dict:
        """The run's energy entry for the samples JSON."""
        if self.meter is None:
            return {"source": "n/a", "reason": self.reason}
        return {"source": self.meter.source, "resolution": self.meter.resolution}

    def sampler(self) -> Sampler | None:
        return Sampler(self.meter) if self.meter is not None else None

    def check(self, sampler: Sampler) -> None:
        """After a sampled generation: a meter that failed is dropped for the rest of the run, said once."""
        if sampler.error is not None and self.meter is not None:
            log.warning("energy per token: n/a from here on (%s)", sampler.error)
            self.meter.close()
            self.meter, self.reason = None, sampler.error

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()


def per_token(joules: Sequence[float | None], tokens: int) -> float | None:
    """Joules per token over the repeats: their total over ``tokens`` per repeat; None if any repeat lacks one."""
    if not joules or tokens <= 0 or any(j is None for j in joules):
        return None
    return sum(joules) / (tokens * len(joules))
