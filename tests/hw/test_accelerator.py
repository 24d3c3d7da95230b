"""On an NPU or GPU: the engine matches the CPU fp32 reference, alone and over the device backend."""

from __future__ import annotations

import pytest

from tests.hw.conftest import device_count, skip_unless_chip_runs

pytestmark = pytest.mark.hw


@pytest.mark.hw_matrix(model=["vicuna"], dtype=["fp16", "bf16"])
def test_half_precision_on_device_tracks_cpu_fp32(device, chip_family, dtype, model_path, hw_run, engine_factory):
    skip_unless_chip_runs(device, chip_family, dtype)
    prompt = [[5, 17, 99, 3, 250, 42]]
    ref = engine_factory(hw_run.engine_spec(model_path, 1, "cpu", "fp32"))
    dev = engine_factory(hw_run.engine_spec(model_path, 1, device, dtype))
    a = ref.generate(prompt, 1, return_logits=True).logits[0][0]
    b = dev.generate(prompt, 1, return_logits=True).logits[0][0]
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()


@pytest.mark.hw_matrix(model=["gqa"])
def test_device_backend_world_size_2(device, chip_family, model_path, hw_run, engine_factory):
    """World size 1 and 2 (the run's world size when given) agree token for token in fp32 over the device backend."""
    skip_unless_chip_runs(device, chip_family, "fp32")
    n = hw_run.world_size or 2
    if device_count(device) < n:
        pytest.skip(f"needs {n} {device} devices")
    prompt = [[5, 17, 99, 3, 250, 42], [8, 9]]
    one = engine_factory(hw_run.engine_spec(model_path, 1, device, "fp32"))
    many = engine_factory(hw_run.engine_spec(model_path, n, device, "fp32"))
    a = one.generate(prompt, 8, ignore_eos=True)
    b = many.generate(prompt, 8, ignore_eos=True)
    assert a.output_ids == b.output_ids
