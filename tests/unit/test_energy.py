"""Energy per token: each meter against a fake of its source, the sampler's integration, and the perf outputs.

References: nvidia-ml-py 13.615.71's pynvml.py (``nvmlDeviceGetTotalEnergyConsumption`` returns the
counter in mJ as an int; errors are ``NVMLError`` with ``value``, NOT_SUPPORTED = 3); the kernel's
powercap sysfs layout (``intel-rapl:N/energy_uj``, ``max_energy_range_uj``); npu-smi's own output
(captured lines below, with their sources); hand-computed joules.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from vicuna_bench import energy, perf
from vicuna_bench.cli import main
from vicuna_bench.nightly import history as H
from vicuna_bench.nightly import report as report_mod
from tests.unit.nightly_fixtures import run_record

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- NVML (CUDA)

class FakeNVMLError(Exception):
    """pynvml.NVMLError: an exception carrying the NVML return code in ``value``."""

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return {3: "Not Supported"}.get(self.value, f"NVML error {self.value}")


class FakeNvml:
    """The pynvml calls the meter makes, over per-bus mJ counters (ints, as c_uint64.value)."""

    def __init__(self, counters_mj: dict[str, int], supported: bool = True):
        self.counters = dict(counters_mj)
        self.supported = supported
        self.inited = self.shut = 0

    def nvmlInit(self):
        self.inited += 1

    def nvmlShutdown(self):
        self.shut += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        if bus not in self.counters:
            raise FakeNVMLError(6)  # NVML_ERROR_NOT_FOUND
        return ("handle", bus)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise FakeNVMLError(3)
        return self.counters[handle[1]]


def test_nvml_meter_sums_the_gpus_counters_in_joules():
    nvml = FakeNvml({"0000:1b:00.0": 1_000_500, "0000:1c:00.0": 2_000_250})
    meter = energy.NvmlMeter(["0000:1b:00.0", "0000:1c:00.0"], nvml=nvml)
    assert meter.read() == pytest.approx(3000.75)  # (1000500 + 2000250) mJ
    nvml.counters["0000:1b:00.0"] += 1500
    nvml.counters["0000:1c:00.0"] += 500
    assert meter.read() == pytest.approx(3002.75)
    assert meter.source == "nvml" and "1 mJ counter of 2 GPU(s)" in meter.resolution
    meter.close()
    assert (nvml.inited, nvml.shut) == (1, 1)


def test_nvml_without_the_energy_counter_is_unreadable_with_nvmls_reason():
    nvml = FakeNvml({"0000:1b:00.0": 5}, supported=False)  # a pre-Volta GPU
    with pytest.raises(energy.Unreadable, match="NVML total energy not readable: Not Supported"):
        energy.NvmlMeter(["0000:1b:00.0"], nvml=nvml)
    assert nvml.shut == 1  # NVML is shut down again


def test_nvml_without_nvidia_ml_py_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(energy.Unreadable) as err:
        energy.NvmlMeter(["0000:1b:00.0"])
    assert str(err.value) == "nvidia-ml-py not installed"


# ---------------------------------------------------------------- RAPL (CPU)

def _rapl_tree(root: Path, packages: dict[int, tuple[int, int]]) -> None:
    """intel-rapl:N packages (energy_uj, max_energy_range_uj), with a core subdomain and an MMIO domain to skip."""
    for n, (now, max_uj) in packages.items():
        pkg = root / f"intel-rapl:{n}"
        pkg.mkdir(parents=True)
        (pkg / "name").write_text(f"package-{n}\n")
        (pkg / "energy_uj").write_text(f"{now}\n")
        (pkg / "max_energy_range_uj").write_text(f"{max_uj}\n")
        core = root / f"intel-rapl:{n}:0"  # the kernel links subdomains beside the packages too
        core.mkdir()
        (core / "energy_uj").write_text("999999999\n")
        (core / "max_energy_range_uj").write_text(f"{max_uj}\n")
    mmio = root / "intel-rapl-mmio:0"
    mmio.mkdir()
    (mmio / "energy_uj").write_text("123\n")


def test_rapl_sums_packages_and_unwraps_a_counter_that_wrapped(tmp_path):
    wrap = 262143328850  # max_energy_range_uj as a Xeon reports it
    _rapl_tree(tmp_path, {0: (262143000000, wrap), 1: (1000, wrap)})
    meter = energy.RaplMeter(tmp_path)
    assert meter.read() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("500000\n")  # wrapped past max_energy_range_uj
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("3001000\n")
    # package 0: 262143328850 - 262143000000 + 500000 = 828850 µJ; package 1: 3000000 µJ; subdomains not added
    assert meter.read() == pytest.approx(3.82885)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1500000\n")
    assert meter.read() == pytest.approx(4.82885)
    assert meter.resolution.startswith("1 µJ package counters (intel-rapl:0, intel-rapl:1)")


def test_rapl_unreadable_cases_name_the_path(tmp_path):
    with pytest.raises(energy.Unreadable, match=f"no {tmp_path / 'absent'}"):
        energy.RaplMeter(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(energy.Unreadable, match="has no intel-rapl:N package domain"):
        energy.RaplMeter(tmp_path / "empty")
    pkg = tmp_path / "locked" / "intel-rapl:0"
    pkg.mkdir(parents=True)
    (pkg / "max_energy_range_uj").write_text("100\n")
    (pkg / "energy_uj").mkdir()  # unreadable as a file, like a root-only energy_uj is for a user
    with pytest.raises(energy.Unreadable, match="intel-rapl:0/energy_uj not readable"):
        energy.RaplMeter(tmp_path / "locked")


def test_this_machine_without_rapl_is_na_with_the_reason():
    if energy.RAPL_ROOT.exists():
        pytest.skip(f"{energy.RAPL_ROOT} exists here: the n/a path is covered by the fake trees above")
    probe = energy.EnergyProbe.open("cpu", [0])
    assert probe.meter is None and probe.sampler() is None
    assert probe.record() == {"source": "n/a", "reason": "no /sys/class/powercap (no RAPL powercap interface)"}
    assert energy.describe("cpu", [0]) == probe.record()


# ---------------------------------------------------------------- npu-smi (NPU)

# npu-smi prints each field as printf("\t%-30s : %.1f\n", label, watts) (its source, show_ascend_chip_power_info):
# "NPU Real-time Power(W)" for an NPU chip, "Power Dissipation(W)" for another unit.  Captured outputs:
# `npu-smi info -t power` on an Ascend 950 host (a public collector's test fixture, value 203.3);
NPU_SMI_POWER_950 = "NPU Real-time Power(W)         : 203.3\n"
# `npu-smi info -t common -i 0` in Huawei's npu-smi reference (English), the same field among others.
NPU_SMI_COMMON_910 = """NPU ID                         : 0
Memory Usage Rate(%)           : 0
HBM Usage Rate(%)              : 3
Aicore Usage Rate(%)           : 0
Aicore Freq(MHZ)               : 1650
Aicore curFreq(MHZ)            : 100
Aicore Count                   : 32
Temperature(C)                 : 65
NPU Real-time Power(W)         : 298.6
"""
# The non-NPU label, as the printf above writes it.
NPU_SMI_POWER_DISSIPATION = "\tPower Dissipation(W)           : 67.5\n"
# `npu-smi info -m` on an Atlas 300I Pro (310P3) host, from the ait benchmark's energy example (mjlovesz/sync-ait).
NPU_SMI_CHIP_MAP_310P = """NPU ID                         Chip ID                        Chip Logic ID                  Chip Name
4                              0                              0                              Ascend 310P3
4                              1                              -                              Mcu
"""


@pytest.mark.parametrize("text, watts", [
    (NPU_SMI_POWER_950, 203.3), (NPU_SMI_COMMON_910, 298.6), (NPU_SMI_POWER_DISSIPATION, 67.5),
])
def test_npu_smi_power_is_parsed_from_captured_output(text, watts):
    assert energy.parse_npu_power(text) == watts


def test_npu_smi_without_a_power_number_is_an_error():
    with pytest.raises(ValueError, match=r"npu-smi's NPU Real-time Power\(W\) is 'NA', not a number"):
        energy.parse_npu_power("\tNPU Real-time Power(W)         : NA\n")
    with pytest.raises(ValueError, match="npu-smi shows no power line"):
        energy.parse_npu_power("Temperature(C)                 : 65\n")


def test_npu_smi_meter_sums_its_chips_and_asks_each_by_npu_and_chip_id():
    asked = []
    outputs = {("4", "0"): NPU_SMI_POWER_950, ("5", "0"): NPU_SMI_COMMON_910}

    def run(argv):
        asked.append(list(argv))
        return outputs[(argv[5], argv[7])]

    meter = energy.NpuSmiMeter([(4, 0), (5, 0)], run=run)
    assert meter.read() == pytest.approx(203.3 + 298.6)
    assert asked[0] == ["npu-smi", "info", "-t", "power", "-i", "4", "-c", "0"]
    assert not meter.cumulative and meter.source == "npu-smi"


def test_npu_devices_map_to_npu_and_chip_ids_through_the_chip_table():
    def run(argv):
        assert list(argv) in (["npu-smi", "info", "-t", "board", "-m"], ["npu-smi", "info", "-m"])
        return NPU_SMI_CHIP_MAP_310P
    assert energy.npu_chips([0], run=run, env={}) == [(4, 0)]  # device 0 is NPU 4 chip 0 (the Mcu has no logic id)
    with pytest.raises(energy.Unreadable, match="logic id 3"):
        energy.npu_chips([3], run=run, env={})


# ---------------------------------------------------------------- the sampler

class ScriptedMeter(energy.Meter):
    """Returns the given readings in order."""

    def __init__(self, values, cumulative=True):
        self.values = list(values)
        self.cumulative = cumulative
        self.source = "scripted"

    def read(self):
        value = self.values.pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    @property
    def resolution(self):
        return "scripted"


class StepClock:
    """A clock that returns t, t for each sample (read instantly), then moves on by one second."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        t = self.calls // 2
        self.calls += 1
        return float(t)


def test_power_samples_are_integrated_by_the_trapezoid_rule_and_interpolated():
    sampler = energy.Sampler(ScriptedMeter([100.0, 100.0, 200.0], cumulative=False), clock=StepClock())
    for _ in range(3):
        sampler.sample()
    assert sampler.times == [0.0, 1.0, 2.0]
    assert sampler.joules == [0.0, 100.0, 250.0]  # 100 W for 1 s, then 100 -> 200 W over 1 s: 150 J
    assert sampler.joules_between(0.5, 1.5) == pytest.approx(125.0)  # 175 - 50
    assert sampler.joules_between(0.0, 2.0) == pytest.approx(250.0)
    assert sampler.joules_between(-0.1, 1.0) is None  # before the first sample: not covered
    assert sampler.joules_between(1.0, 2.5) is None


def test_counter_samples_are_differenced():
    sampler = energy.Sampler(ScriptedMeter([10.0, 14.0, 30.0]), clock=StepClock())
    for _ in range(3):
        sampler.sample()
    assert sampler.joules_between(0.25, 2.0) == pytest.approx(30.0 - 11.0)


def test_a_meter_that_fails_mid_run_makes_the_figures_na(caplog):
    sampler = energy.Sampler(ScriptedMeter([1.0, OSError("gone")]))
    sampler.meter.interval_s = 0.001
    sampler.start()
    deadline = time.monotonic() + 5
    while sampler.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler.error == "scripted read failed: OSError: gone"
    assert sampler.joules_between(sampler.times[0], sampler.times[0]) is None
    probe = energy.EnergyProbe(sampler.meter)
    with caplog.at_level("WARNING", logger="vicuna_bench"):
        probe.check(sampler)
        probe.check(sampler)  # said once
    assert probe.sampler() is None
    assert probe.record() == {"source": "n/a", "reason": "scripted read failed: OSError: gone"}
    assert [r.getMessage() for r in caplog.records] == [
        "energy per token: n/a from here on (scripted read failed: OSError: gone)"]


def test_joules_per_token_is_the_total_over_every_repeats_tokens():
    assert energy.per_token([2.0, 4.0], 3) == pytest.approx(1.0)  # 6 J over 2 repeats x 3 tokens
    assert energy.per_token([2.0, None], 3) is None
    assert energy.per_token([], 3) is None


# ---------------------------------------------------------------- the perf outputs

class Watts(energy.Meter):
    """A counter that grows at exactly ``watts``: any region's joules are watts x its length."""

    source = "fake-50W"

    def __init__(self, watts=50.0):
        self.watts = watts

    def read(self):
        return self.watts * time.perf_counter()

    @property
    def resolution(self):
        return "exact"


def _perf(model: Path, out: Path, *extra: str) -> dict:
    code = main(["perf", "--model-path", str(model), "--device", "cpu", "--max-seq-len", "128", "--output-dir",
                 str(out), "--no-progress", "--model-name", "m", *extra])
    assert code == 0
    [ext] = list(out.glob("*_extended.csv"))
    with open(ext, newline="") as f:
        rows = list(csv.DictReader(f))
    [samples] = list(out.glob("*_samples.json"))
    return {"rows": rows, "doc": json.loads(samples.read_text())}


def test_detail_mode_meters_exactly_the_timed_regions(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "open_meter", lambda device, indices: Watts(50.0))
    got = _perf(tiny_models["vicuna"], tmp_path / "out", "--case-pair", "[[16,6]]", "--batch-size", "2",
                "--repeat", "2", "--perf-mode", "detail")
    [row], [case] = got["rows"], got["doc"]["cases"]
    assert row["energy_source"] == "fake-50W"
    assert got["doc"]["energy"] == {"source": "fake-50W", "resolution": "exact"}
    assert len(case["prefill_j"]) == len(case["decode_j"]) == 2
    # At a constant 50 W the joules are 50 x the region's time: the regions are the timed ones.  Within 1%: the
    # sampler dates each read at the middle of the clock readings around it, so a thread preempted there (CI runs
    # two workers on two cores) shifts a ~1 ms region's ends by microseconds (0.24% seen); a wrong region (the
    # warm-up, the next step, the whole case) is off by far more.
    first_s = sum(case["first_ms"]) / 1e3
    steps_s = sum(case["step_ms"]) / 1e3
    assert float(row["prefill_j_per_token"]) == pytest.approx(50 * first_s / (2 * 2 * 16), rel=1e-2)
    assert float(row["decode_j_per_token"]) == pytest.approx(50 * steps_s / (2 * 2 * 5), rel=1e-2)
    # ...and go into the history as energy metrics, lower is better.
    metrics = H.metrics_from_perf_rows(got["rows"], "x.csv")
    energy_metrics = {m.name: m for m in metrics if m.kind == "energy"}
    assert set(energy_metrics) == {"prefill_j_per_token", "decode_j_per_token"}
    assert {(m.unit, m.better, m.n, m.case) for m in energy_metrics.values()} == {("J/token", "lower", 2, "16x6")}


def test_normal_mode_meters_its_two_generations(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "open_meter", lambda device, indices: Watts(50.0))
    got = _perf(tiny_models["vicuna"], tmp_path / "out", "--case-pair", "[[16,6]]", "--perf-mode", "normal")
    [case] = got["doc"]["cases"]
    # The 1-token call holds its first_ms (a whole call, measured inside it): at least 50 W x that long.
    assert case["prefill_j"][0] >= 50 * case["first_ms"][0] / 1e3 * (1 - 1e-3)
    assert case["decode_j"][0] is not None


def test_without_a_meter_the_run_says_na_and_records_no_energy(tiny_models, tmp_path, monkeypatch):
    def unreadable(device, indices):
        raise energy.Unreadable("no /sys/class/powercap (no RAPL powercap interface)")
    monkeypatch.setattr(energy, "open_meter", unreadable)
    got = _perf(tiny_models["vicuna"], tmp_path / "out", "--case-pair", "[[16,6]]")
    [row], [case] = got["rows"], got["doc"]["cases"]
    assert row["energy_source"] == "n/a: no /sys/class/powercap (no RAPL powercap interface)"
    assert row["prefill_j_per_token"] == row["decode_j_per_token"] == ""
    assert case["prefill_j"] == [] and case["decode_j"] == []
    assert not [m for m in H.metrics_from_perf_rows(got["rows"], "x.csv") if m.kind == "energy"]


def test_an_extended_csv_from_before_the_energy_columns_is_still_a_baseline(tmp_path):
    old = ",".join(perf.EXTENDED_COLUMNS[:-3])
    path = tmp_path / "old_extended.csv"
    row = {c: "1" for c in perf.EXTENDED_COLUMNS[:-3]}
    row.update(batch_size="1", seq_in="32", seq_out="8", first_token_ms_p50="10.0", next_token_ms_p50="2.0")
    path.write_text(old + "\n" + ",".join(row[c] for c in perf.EXTENDED_COLUMNS[:-3]) + "\n")
    assert perf.load_baseline(path).rows == {(1, 32, 8): {"first": 10.0, "next": 2.0}}


# ---------------------------------------------------------------- history and report

def test_a_version_2_history_is_migrated_and_takes_energy_metrics(tmp_path):
    path = tmp_path / "history.sqlite"
    H.record_run(path, run_record(), [H.Metric("latency", "next_token_ms_p50", "256x64", 12.0, "ms", "lower", 3)])
    with sqlite3.connect(path) as conn:  # make it a version-2 file: the old CHECK on kind
        conn.executescript("""
            ALTER TABLE metrics RENAME TO m3;
            CREATE TABLE metrics (run_id INTEGER NOT NULL REFERENCES runs (id),
                kind TEXT NOT NULL CHECK (kind IN ('latency', 'throughput', 'memory', 'accuracy', 'rate')),
                name TEXT NOT NULL, case_key TEXT NOT NULL, value REAL NOT NULL, unit TEXT NOT NULL, n INTEGER,
                better TEXT NOT NULL CHECK (better IN ('lower', 'higher')), samples_json TEXT, verdict TEXT,
                PRIMARY KEY (run_id, name, case_key));
            INSERT INTO metrics SELECT * FROM m3; DROP TABLE m3;
            UPDATE meta SET value = '2' WHERE key = 'schema_version';
        """)
    j = H.Metric("energy", "decode_j_per_token", "256x64", 0.25, "J/token", "lower", 3)
    H.record_run(path, run_record(1), [j])  # opening migrates: the old CHECK would refuse 'energy'
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert H.load_run(path, 1)[1] == [H.Metric("latency", "next_token_ms_p50", "256x64", 12.0, "ms", "lower", 3)]
    assert H.load_run(path, 2)[1] == [j]


def test_the_report_names_the_meter_and_shows_the_energy_figures(tmp_path):
    from vicuna_bench.nightly import rules as R

    history = tmp_path / "history.sqlite"
    run = run_record(0, environment={"energy": {"source": "nvml", "resolution": "1 mJ counter of 1 GPU(s)"}})
    metrics = [H.Metric("energy", "prefill_j_per_token", "256x64", 0.0125, "J/token", "lower", 3)]
    _, _, path = report_mod.record_and_report(tmp_path / "run", history, run, metrics)
    text = path.read_text()
    section = text[text.index("## Energy per token"):text.index("## Trends")]
    assert "Meter: nvml (1 mJ counter of 1 GPU(s))." in section
    assert "| prefill_j_per_token | 256x64 | 0.0125 J/token |" in section
    na = run_record(0, environment={"energy": {"source": "n/a", "reason": "nvidia-ml-py not installed"}})
    lines = report_mod.energy_lines(na, [])
    assert lines == ["Meter: n/a: nvidia-ml-py not installed.", "", "No energy figure was recorded: n/a."]
    assert R.show_value(0.0125, "J/token") == "0.0125 J/token"


def test_a_cpu_run_on_this_machine_without_rapl_writes_na(tiny_models, tmp_path):
    if energy.RAPL_ROOT.exists():
        pytest.skip(f"{energy.RAPL_ROOT} exists here: this host may meter its CPU")
    got = _perf(tiny_models["vicuna"], tmp_path / "out", "--case-pair", "[[16,2]]")
    [row] = got["rows"]
    assert row["energy_source"] == "n/a: no /sys/class/powercap (no RAPL powercap interface)"
    assert (row["prefill_j_per_token"], row["decode_j_per_token"]) == ("", "")
    assert got["doc"]["environment"]["energy"] == {"source": "n/a",
                                                   "reason": "no /sys/class/powercap (no RAPL powercap interface)"}


def test_every_ranks_device_is_metered_from_rank_0(monkeypatch):
    import types

    asked = []
    monkeypatch.setattr(energy, "open_meter", lambda device, indices: asked.append((device, indices)) or Watts())
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    spec = types.SimpleNamespace(device="cuda", world_size=2, device_index=lambda r: [3, 5][r])
    assert perf.open_energy(spec).source == "fake-50W"
    assert asked == [("cuda", [3, 5])]  # --device-ids 3,5: both GPUs, summed by the meter
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun with one rank on this host, one elsewhere
    probe = perf.open_energy(spec)
    assert probe.record() == {"source": "n/a", "reason": "1 of 2 ranks on this host: the other hosts' devices "
                                                         "cannot be metered from here"}
    assert len(asked) == 1
