"""The nightly's verdict: gates passed, failed or not applicable, each named; no PASS for a night that measured nothing.

The nights here run ``vicuna-bench nightly`` in-process with only the hw
stage, on a hw suite of one test written into the test's own folder: the
pytest subprocess is real, the suite is tiny.  An accelerator is faked by
making device resolution say it is there (nothing here runs on it).
"""

from __future__ import annotations


import pytest

from tests.unit.nightly_fixtures import latency
from vicuna_bench.cli import main
from vicuna_bench.nightly import runner

from vicuna_bench.nightly.rules import Gate, gate_tally, judge, overall

pytestmark = pytest.mark.unit

HW = Gate("hw suite", "passed", 12, 12, "tests", "0 skipped")
MMLU = Gate("mmlu/generate accuracy", "passed", 24.9, 23.9, "%", "threshold 24.9 - tolerance 1.0", "mmlu/generate")
PERF_LEFT_OUT = Gate("perf stage", "n/a", detail="not in --stages")


# ---------------------------------------------------------------- the verdict line

def test_a_pass_counts_the_gates_and_names_them():
    out = overall([judge(latency(100.0), [])], [HW, MMLU, PERF_LEFT_OUT])
    assert out.passed and out.exit_code == 0
    assert out.reason == ("gates: 2 passed (hw suite, mmlu/generate accuracy), 1 not applicable (perf stage); "
                          "no regression in 1 metric(s)")


def test_a_night_that_measured_nothing_fails():
    # every stage left out or not applicable, no metric: nothing to call a pass
    hw_on_cpu = Gate("hw suite", "n/a", unit="tests", detail="hw test: no NPU or CUDA device on this machine")
    out = overall([], [hw_on_cpu, PERF_LEFT_OUT])
    assert not out.passed and out.exit_code == 3
    assert out.reason == ("nothing was measured: no gate passed (2 not applicable (hw suite, perf stage)) and no "
                          "metric was recorded")
    assert not overall([], []).passed
    # a metric, even one without history to judge it against, is a measurement
    assert overall([judge(latency(100.0), [])], [hw_on_cpu]).passed


def test_a_failed_gate_leads_the_reason():
    failed = Gate("hw suite", "failed", 0, None, "tests", "no test ran, though the night's device is npu: no hw "
                                                          "test collected, see hw-pytest.log")
    out = overall([], [failed, MMLU])
    assert out.reason == ("gate failed: hw suite (no test ran, though the night's device is npu: no hw test "
                          "collected, see hw-pytest.log)")


def test_gate_statuses_are_passed_failed_or_not_applicable():
    assert gate_tally([HW, Gate("x", "failed"), PERF_LEFT_OUT]) == (
        "1 passed (hw suite), 1 failed (x), 1 not applicable (perf stage)")
    assert Gate("hw suite", "skipped").status == "n/a"  # as nightly.json files written before said it
    with pytest.raises(ValueError, match="status 'maybe' is not one of passed, failed, n/a"):
        Gate("hw suite", "maybe")


# ---------------------------------------------------------------- nights with no hw test


@pytest.fixture
def accelerator(monkeypatch):
    """Make the night believe a cuda or npu device is there: device resolution says so, its name is made up,
    and its ranks' CPU binding (which would ask the device for its PCI address) is left unbound."""
    from vicuna_bench import binding, devices, environment

    names = {"cuda": "NVIDIA H200", "npu": "Ascend910B3"}
    resolve, name_of, record_of = devices.resolve_device, devices.device_name_of, environment.environment_record
    plan_binding = binding.plan_binding

    def fake(kind: str):
        monkeypatch.setattr(devices, "resolve_device", lambda name: kind if name in (kind, "auto") else resolve(name))
        monkeypatch.setattr(devices, "device_name_of", lambda t, i=0: names[t] if t in names else name_of(t, i))
        monkeypatch.setattr(environment, "environment_record",
                            lambda t, i=0, *choice: {**record_of("cpu"), "device_type": t, "device_name": names[t]}
                            if t in names else record_of(t, i, *choice))
        monkeypatch.setattr(binding, "plan_binding", lambda t, rank, n, *a, **k: binding.unbound(rank, f"{t}:{rank}")
                            if t in names else plan_binding(t, rank, n, *a, **k))

    return fake


def night(tmp_path, *args: str) -> tuple[int, list[str]]:
    code = main(["nightly", "--stages", "hw", "--compile", "off", "--output-dir", str(tmp_path / "run"),
                 "--history", str(tmp_path / "h.sqlite"), "--no-progress", *args])
    return code, (tmp_path / "run" / "REPORT.md").read_text().splitlines()


# ---------------------------------------------------------------- a full set's gate is checked before the night

def test_a_full_set_gate_without_a_threshold_stops_the_night_before_it_starts(tmp_path, tiny_models, capsys):
    from tests.unit.precision_fixtures import make_synthetic_mmlu

    work = make_synthetic_mmlu(tmp_path / "mmlu")
    db = tmp_path / "h.sqlite"
    code = main(["nightly", "--stages", "mmlu", "--mmlu-dir", str(work), "--device", "cpu", "--model-path",
                 str(tiny_models["gqa"]), "--max-seq-len", "256", "--max-prompt-tokens", "250",
                 "--output-dir", str(tmp_path / "run"), "--history", str(db)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vicuna-bench nightly: error: mmlu gate: model {tiny_models['gqa']} has no release threshold in "
                   "thresholds.json (known: vicuna-13b-v1.5-16k, SmolLM2-135M-Instruct); name the model whose "
                   "thresholds judge it with --gate-model")
    assert not (tmp_path / "run").exists() and not db.exists()


# ---------------------------------------------------------------- the hw stage tests the night's model

def test_the_hw_stage_command_carries_the_nights_model_world_size_dtype_and_chip(tmp_path):
    from vicuna_bench import settings as S

    values = {s.dest: s.default for s in S.group("model")}
    values.update(model_path="/models/vicuna_parallel_8", world_size=8, dtype="fp16", chip_family="d3",
                  device="npu")
    cmd = runner.hw_command(values, tmp_path / "junit.xml", tmp_path / "tests" / "hw")
    pairs = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1)}
    assert pairs["--model-path"] == "/models/vicuna_parallel_8" and pairs["--world-size"] == "8"
    assert pairs["--dtype"] == "fp16" and pairs["--device-type"] == "d3" and pairs["--device"] == "npu"
    assert cmd[:5] == [cmd[0], "-m", "pytest", "-m", "hw"]
