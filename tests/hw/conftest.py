"""The hardware suite's matrix, device and model: the run's options where given, the tests' own choices otherwise.

``--model-path``, ``--world-size``, ``--dtype`` and ``--device-type`` given to
``pytest -m hw`` (the nightly's hw stage passes its own) replace the tests'
tiny models, world sizes and dtypes (``hw_run``; ``hw_matrix`` marks become
parameters here: tests/hw/matrix.py decides).
"""

from __future__ import annotations

import pytest
import torch

from tests.hw.matrix import hw_run_of
from vicuna_bench.pytest_plugin import accelerator_available
from vicuna_bench.pytest_plugin.options import group_values


def pytest_configure(config):
    config.addinivalue_line("markers", "hw_matrix(model=[...], dtype=[...], world_size=[...]): a hw test's own "
                                       "choices, replaced by the run's --model-path / --dtype / --world-size where given")


def pytest_generate_tests(metafunc):
    matrix = metafunc.definition.get_closest_marker("hw_matrix")
    if matrix is not None:
        run = hw_run_of(group_values(metafunc.config, "model"))
        for name, own in matrix.kwargs.items():
            metafunc.parametrize(name, run.choices(name, own))


@pytest.fixture(scope="session")
def hw_run(pytestconfig):
    """The hardware suite's model, world size, dtype and chip family (the run's where given)."""
    return hw_run_of(group_values(pytestconfig, "model"))


@pytest.fixture(scope="session")
def device(hw_run) -> str:
    """'npu' or 'cuda' (the run's --device when it names one); the test is skipped where it is not usable."""
    kind = accelerator_available()
    if kind is None:
        pytest.skip("no NPU or CUDA device")
    if hw_run.device is not None and hw_run.device != kind:
        pytest.skip(f"--device {hw_run.device}: this machine's accelerator is {kind}")
    return kind


@pytest.fixture(scope="session")
def chip_family(device) -> str | None:
    """The NPU's chip family (d9 | d3) from its name; None on CUDA or an NPU of neither family."""
    from vicuna_bench.devices import resolve_chip_family

    return resolve_chip_family(device)


def skip_unless_chip_runs(device: str, chip_family: str | None, dtype: str) -> None:
    """Skip, saying why, a test of a dtype this chip cannot run (bf16 and fp32 on a 310P)."""
    from vicuna_bench.devices import dtype_skip_reason

    reason = dtype_skip_reason(device, chip_family, dtype)
    if reason is not None:
        pytest.skip(reason)


def device_count(kind: str) -> int:
    return torch.npu.device_count() if kind == "npu" else torch.cuda.device_count()


@pytest.fixture
def model_path(model, hw_run, tiny_models) -> str:
    """The directory of a test's ``model`` parameter: the run's --model-path, the embedded model or a tiny one."""
    return hw_run.model_dir(model, tiny_models)


@pytest.fixture(autouse=True)
def one_run_model_engine_at_a_time(hw_run, engine_factory):
    """The run's model may fill a device: its engines are closed after each test (tiny ones live for the session)."""
    yield
    if hw_run.model_path:
        engine_factory.close()
