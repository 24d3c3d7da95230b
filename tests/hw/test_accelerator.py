"""On an NPU or GPU: the engine matches the CPU fp32 reference, alone and over the device backend."""

from __future__ import annotations

import pytest

from tests.hw.conftest import device_count, skip_unless_chip_runs
from vicuna_bench.pytest_plugin import make_engine_spec




@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_device_tracks_cpu_fp32(device_type, chip_family, dtype, tiny_models, engine_factory):
    skip_unless_chip_runs(device_type, chip_family, dtype)
    prompt = [[5, 17, 99, 3, 250, 42]]
    ref = engine_factory(make_engine_spec(tiny_models["vicuna"], 1, "cpu", "fp32", 64))
    dev = engine_factory(make_engine_spec(tiny_models["vicuna"], 1, device_type, dtype, 64))
    a = ref.generate(prompt, 1, return_logits=True).logits[0][0]
    b = dev.generate(prompt, 1, return_logits=True).logits[0][0]
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()


def test_device_backend_world_size_2(device_type, chip_family, tiny_models, engine_factory):
    skip_unless_chip_runs(device_type, chip_family, "fp32")
    if device_count(device_type) < 2:
        pytest.skip(f"needs 2 {device_type} devices")
    prompt = [[5, 17, 99, 3, 250, 42], [8, 9]]
    one = engine_factory(make_engine_spec(tiny_models["gqa"], 1, device_type, "fp32", 64))
    two = engine_factory(make_engine_spec(tiny_models["gqa"], 2, device_type, "fp32", 64))
    a = one.generate(prompt, 8, ignore_eos=True)
    b = two.generate(prompt, 8, ignore_eos=True)
    assert a.output_ids == b.output_ids
