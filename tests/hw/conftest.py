"""The hardware suite's device: the accelerator this machine has, or a skip saying there is none."""

from __future__ import annotations

import pytest
import torch

from vicuna_bench.pytest_plugin import accelerator_available


@pytest.fixture(scope="session")
def device_type() -> str:
    """'npu' or 'cuda'; the test is skipped where neither is usable."""
    kind = accelerator_available()
    if kind is None:
        pytest.skip("no NPU or CUDA device")
    return kind


def device_count(kind: str) -> int:
    return torch.npu.device_count() if kind == "npu" else torch.cuda.device_count()
