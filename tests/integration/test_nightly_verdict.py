"""The nightly's verdict: gates passed, failed or not applicable, each named; no PASS for a night that measured nothing.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_nightly_verdict.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.test_nightly_verdict import accelerator, night  # noqa: F401  (fixtures)
from vicuna_bench.nightly import runner
from vicuna_bench.nightly.history import list_runs

pytestmark = pytest.mark.integration


ONE_HW_TEST = "import pytest\n\npytestmark = pytest.mark.hw\n\n\ndef test_on_the_device():\n    pass\n"


@pytest.fixture
def hw_suite(tmp_path, monkeypatch):
    """A hw suite of one test (``tests/hw`` in a folder of its own), or of none: what the night's stage runs."""

    def make(tests: int):
        folder = tmp_path / "checkout" / "tests" / "hw"
        folder.mkdir(parents=True)
        if tests:
            (folder / "test_device.py").write_text(ONE_HW_TEST)
        monkeypatch.setattr(runner, "hw_tests_dir", lambda: folder)
        return folder

    return make


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_an_accelerator_night_whose_hw_suite_ran_no_test_fails(tmp_path, tiny_models, hw_suite, accelerator, device):
    # The suite's one test is skipped in its own pytest process, which sees no accelerator (the plugin's skip).
    hw_suite(tests=1)
    accelerator(device)
    code, report = night(tmp_path, "--device", device, "--dtype", "fp16", "--model-path", str(tiny_models["gqa"]))
    assert code == 3
    assert report[0] == (f"# FAIL: gate failed: hw suite (no test ran, though the night's device is {device}: all 1 "
                         "tests skipped (hw test: no NPU or CUDA device on this machine))")
    (stored,) = list_runs(tmp_path / "h.sqlite")
    assert (stored.run.status, stored.run.device) == ("fail", device)


def test_an_accelerator_night_whose_hw_suite_collected_nothing_fails(tmp_path, tiny_models, hw_suite, accelerator):
    hw_suite(tests=0)
    accelerator("npu")
    code, report = night(tmp_path, "--device", "auto", "--dtype", "fp16", "--model-path", str(tiny_models["gqa"]))
    assert code == 3
    assert report[0] == ("# FAIL: gate failed: hw suite (no test ran, though the night's device is npu: no hw test "
                         "collected, see hw-pytest.log)")


def test_a_cpu_night_with_only_the_hw_stage_measured_nothing(tmp_path, tiny_models, hw_suite):
    hw_suite(tests=1)
    code, report = night(tmp_path, "--device", "cpu", "--model-path", str(tiny_models["gqa"]))
    assert code == 3
    assert report[0] == ("# FAIL: nothing was measured: no gate passed (4 not applicable (perf stage, mmlu stage, "
                         "ceval stage, hw suite)) and no metric was recorded")
    gates = report[report.index("## Gates") + 2:]
    assert gates[0] == "4 not applicable (perf stage, mmlu stage, ceval stage, hw suite)."
    assert "| hw suite | n/a | - | - | - | hw test: no NPU or CUDA device on this machine |" in gates


def test_the_hw_stage_runs_on_the_nights_resolved_device(tmp_path, monkeypatch):
    seen = {}

    def record(values, junit, tests):
        seen.update(values)
        return ["false"]  # exits 1 without a JUnit file: the stage then fails, which is not what is checked here

    monkeypatch.setattr(runner, "hw_command", record)
    monkeypatch.setattr(runner, "hw_tests_dir", lambda: tmp_path / "tests" / "hw")
    plan = runner.Plan({"device": "auto", "world_size": 1}, ["hw"], tmp_path, tmp_path / "h.sqlite",
                       spec=dataclasses.make_dataclass("Spec", ["device"])("cuda"))
    with pytest.raises(runner.StageFailed):
        runner.run_hw_suite(plan)
    assert seen["device"] == "cuda"  # 'auto' resolved once, by the night, not again by the suite
