"""The suites' markers, the hardware skip, and the machine set-up a pytest process needs before any test."""

from __future__ import annotations

import os

import pytest

MARKERS = {
    "unit": "in-process on CPU: tiny models, no subprocess or multiprocessing, no real data (minutes)",
    "integration": "subprocess CLI and nested pytest runs, multi-rank engines, torch.compile, the real model and "
                   "data, kill tests (CPU)",
    "hw": "needs an NPU or GPU (skipped with a reason otherwise)",
    "accuracy": "needs a model and data; release gate",
    "perf": "benchmarks; record, never fail on absolute time",
    "all_cpus": "needs every CPU this process may use (CPU binding, xdist shares): run outside pytest -n workers, "
                "which each get a share (make test-integration runs these after the others, alone)",
}


def register(config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def torch_autoload_off_for_our_runs(args) -> None:
    """With ``--device`` given, torch's autoload of torch_npu is off (unless set) before a conftest imports torch.

    Only then: this plugin loads in every pytest session of the environment, and one without our ``--device`` may
    not be ours (vicuna_bench.torch_autoload)."""
    from .. import torch_autoload

    if torch_autoload.device_in_args(args) is not None:
        torch_autoload.front_end_default()


def share_cpus_among_xdist_workers() -> None:
    """Under ``pytest -n N`` each worker (and the rank processes it spawns) runs on its own share of the CPUs.

    The affinity mask is inherited by spawned ranks, whose torch threads follow it
    (:func:`vicuna_bench.runtime.usable_cpus`), so N workers never oversubscribe the machine.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    import torch

    cpus = sorted(os.sched_getaffinity(0))
    index, count = int(worker.lstrip("gw")), int(count)
    share = max(1, len(cpus) // count)
    start = (index * share) % len(cpus)
    mine = set(cpus[start:start + share])
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


def accelerator_available() -> str | None:
    """'npu' or 'cuda' when one is usable, else None."""
    from .. import devices

    try:
        if devices.npu_available():
            return "npu"
    except Exception:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else None


def skip_hw_without_accelerator(items) -> None:
    """Skip, saying why, every ``hw`` test on a machine with no NPU or CUDA device."""
    hw_items = [item for item in items if "hw" in item.keywords]
    if hw_items and accelerator_available() is None:
        skip = pytest.mark.skip(reason="hw test: no NPU or CUDA device on this machine")
        for item in hw_items:
            item.add_marker(skip)
