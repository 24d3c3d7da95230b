"""The hardware suite takes the run's --model-path, --world-size, --dtype and --device-type; its tiny models otherwise.

No device is needed: the decision (``HwRun``) is checked directly, and the
real tests/hw are collected (not run) with and without those options.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna_bench import settings
from tests.hw.matrix import CHIP_FAMILY_DEST, RUN_MODEL, HwRun, hw_run_of

pytestmark = pytest.mark.unit

TINY = {"vicuna": Path("/tiny/vicuna"), "gqa": Path("/tiny/gqa")}


def model_options(**given) -> dict:
    """The model group's values as pytest hands them over: the table's defaults, then ``given``."""
    return {**{s.dest: None if s.env else s.default for s in settings.group("model")}, **given}


def test_without_options_the_tests_keep_their_own_models_dtypes_and_world_sizes():
    run = hw_run_of(model_options())
    assert run == HwRun(model_path=None, world_size=None, dtype=None, chip_family="auto", device=None)
    assert run.models(["vicuna", "gqa", "embedded"]) == ["vicuna", "gqa", "embedded"]
    assert run.dtypes(["fp16", "bf16"]) == ["fp16", "bf16"]
    assert run.world_sizes([1, 2]) == [1, 2]
    assert run.spread(visible=16) == 8 and run.spread(visible=3) == 3  # every visible device, up to 8
    assert run.model_dir("gqa", TINY) == "/tiny/gqa"


def test_the_runs_model_path_world_size_dtype_and_chip_replace_them():
    run = hw_run_of(model_options(model_path="/models/vicuna_parallel_8", world_size=8, dtype="fp16",
                                  device="npu", **{CHIP_FAMILY_DEST: "d3"}))
    assert run.models(["vicuna", "gqa", "embedded"]) == [RUN_MODEL]
    assert run.model_dir(RUN_MODEL, TINY) == "/models/vicuna_parallel_8"  # what the model_path fixture returns
    assert run.dtypes(["fp16", "bf16"]) == ["fp16"]
    assert run.world_sizes([1, 2]) == [8] and run.spread(visible=16) == 8
    assert (run.chip_family, run.device) == ("d3", "npu")


def test_world_size_1_and_auto_dtype_and_a_cpu_device_leave_the_choice_to_the_tests():
    run = hw_run_of(model_options(world_size=1, dtype="auto", device="cpu"))
    assert (run.world_size, run.dtype, run.device) == (None, None, None)


def test_an_engine_spec_carries_the_chip_family(tiny_models):
    spec = hw_run_of(model_options(**{CHIP_FAMILY_DEST: "d3"})).engine_spec(tiny_models["gqa"], 1, "cpu", "fp32")
    assert (getattr(spec, CHIP_FAMILY_DEST), spec.world_size, spec.dtype, spec.max_seq_len) == ("d3", 1, "fp32", 64)
    assert spec.compile == "off"  # the hw helper's eager default, said in its signature
