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


@pytest.fixture(scope="session")
def chip_family(device_type) -> str | None:
    """The NPU's chip family (d9 | d3) from its name; None on CUDA or an NPU of neither family."""
    from vicuna_bench.devices import resolve_chip_family

    return resolve_chip_family(device_type)


def skip_unless_chip_runs(device_type: str, chip_family: str | None, dtype: str) -> None:
    """Skip, saying why, a test of a dtype this chip cannot run (bf16 and fp32 on a 310P)."""
    from vicuna_bench.devices import dtype_skip_reason

    reason = dtype_skip_reason(device_type, chip_family, dtype)
    if reason is not None:
        pytest.skip(reason)


def device_count(kind: str) -> int:
    return torch.npu.device_count() if kind == "npu" else torch.cuda.device_count()
