"""On an NPU or GPU: the device's energy meter reads, and metered generations draw a plausible power."""

from __future__ import annotations

import pytest
import torch

from tests.hw.conftest import skip_unless_chip_runs
from vicuna_bench import energy, perf

pytestmark = pytest.mark.hw


@pytest.mark.hw_matrix(model=["vicuna"])
def test_metered_generations_draw_a_plausible_power(device, chip_family, model_path, hw_run, engine_factory):
    skip_unless_chip_runs(device, chip_family, "fp16")
    probe = energy.EnergyProbe.open(device, [0])
    if probe.meter is None:  # nvidia-ml-py not installed, a pre-Volta GPU, npu-smi absent: said, not measured
        pytest.skip(f"energy n/a on this host: {probe.reason}")
    engine = engine_factory(hw_run.engine_spec(model_path, 1, device, "fp16"))
    settings = perf.PerfSettings(cases=[perf.Case(64, 256)], repeat=4)
    result = perf.measure_case(engine, perf.Case(64, 256), settings, torch.Generator().manual_seed(0), energy=probe)
    assert len(result.prefill_j) == len(result.decode_j) == 4 and None not in result.prefill_j + result.decode_j
    seconds = (sum(result.first_ms) + sum(result.step_ms)) / 1e3
    watts = (sum(result.prefill_j) + sum(result.decode_j)) / seconds
    # A powered accelerator board draws tens of watts idle and at most a few hundred (H100 SXM: 700 W TDP).
    assert 5.0 < watts < 1500.0, f"{watts:.1f} W over {seconds:.2f} s from {probe.source}"
