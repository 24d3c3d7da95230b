"""A rank's process before its model loads: CPU binding and threads, the process group, the collective warm-up,
and the rank's log file.  Every way a rank starts (in-process workers, torchrun) comes through here.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from . import devices
from .binding import CpuBinding, bind_rank, format_cpu_list
from .errors import EngineError
from .sharding import TensorParallel
from .spec import EngineSpec

log = logging.getLogger("vicuna_bench")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset/cgroups/xdist shares narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads_per_rank(world_size: int) -> int:
    return max(1, usable_cpus() // world_size)


def affinity() -> set[int] | None:
    """This process's allowed CPUs; None where the OS has no affinity mask (not Linux)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return None


def affinity_text() -> str | None:
    """This process's allowed CPUs as a list text (``0-3,8``), read back from the process; None off Linux."""
    try:
        return format_cpu_list(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return None


def device_label(spec: EngineSpec, local_rank: int) -> str:
    """The device local rank ``local_rank`` runs on, as the binding names it (``cpu``, ``npu:3``)."""
    return "cpu" if spec.device == "cpu" else f"{spec.device}:{spec.device_index(local_rank)}"


def bind_this_rank(spec: EngineSpec, local_rank: int, local_world: int, *, set_threads: bool = True) -> CpuBinding:
    """Before the model loads: pin this process as local rank ``local_rank`` (``spec.bind_cpu``), size torch's threads.

    A failure to bind is one warning line and the rank runs unbound
    (vicuna_bench.binding); on CPU a bound rank runs one thread per CPU it holds.
    """
    ids = [spec.device_index(i) for i in range(local_world)]
    binding = bind_rank(spec.device, local_rank, local_world, ids, enabled=spec.bind_cpu)
    if set_threads and spec.device == "cpu":
        torch.set_num_threads(len(binding.cpus) if binding.cpus else _threads_per_rank(local_world))
    return binding


class RankLog:
    """``<log_dir>/rank<r>.log``: what a rank runs and where it is bound (appended; nothing when no log_dir)."""

    def __init__(self, spec: EngineSpec, rank: int):
        self.path = None if spec.log_dir is None else Path(spec.log_dir) / f"rank{rank}.log"
        self.rank = rank

    def write(self, line: str) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} rank {self.rank}: {line}\n")
        except OSError as exc:
            log.warning("rank %d: cannot write %s (%s); logging to it stops", self.rank, self.path, exc.strerror or exc)
            self.path = None


def init_process_group(spec: EngineSpec, rank: int, local_rank: int, init_method: str | None,
                       timeout_s: float) -> TensorParallel:
    """Join the ranks' process group as ``rank`` (device ``spec.device_index(local_rank)``), its collectives warmed.

    Every path that starts a rank comes through here (the in-process
    workers, torchrun, and so sdk-test), in this order: the device is made
    current (NPU: its operator compile mode set, its chip family checked),
    the group is joined, one small collective runs eagerly.  NCCL
    and HCCL make a rank's communicator on the device current at its first
    collective, and making one while a stream is capturing a graph is not
    allowed: without the warm-up that first collective is inside the first
    compiled (captured) decode step.
    """
    index = spec.device_index(local_rank)
    device = devices.device_for_rank(spec.device, index, spec.npu_jit_compile)  # set_device before the group
    # This rank's own chip, read now that its device is current (no context on another NPU): the spec's family was
    # read on one device only.
    devices.check_rank_chip(spec.device, spec.chip_family, index)
    if spec.world_size == 1:
        return TensorParallel()
    import torch.distributed as dist

    backend = devices.BACKENDS[spec.device]
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=spec.world_size)
    dist.init_process_group(**kwargs)
    tp = TensorParallel(spec.world_size, dist.get_rank(), None)
    spent_ms = warm_collectives(tp, device)
    RankLog(spec, rank).write(f"process group: {backend}, {spec.world_size} ranks, on {device}; "
                              f"first collective (warm-up all-reduce) {spent_ms:.1f} ms")
    return tp


def warm_collectives(tp: TensorParallel, device: torch.device) -> float:
    """Run one all-reduce of a 1-element tensor on ``device`` now, eagerly, and wait for it; ms spent.

    Creates the communicator outside any graph capture (see
    :func:`init_process_group`); a sum that is not the world size means the
    group is broken, and says so before a model is loaded.
    """
    started = time.perf_counter()
    probe = torch.ones(1, dtype=torch.float32, device=device)
    tp.all_reduce(probe)
    total = float(probe.item())  # waits for the device
    if total != tp.world_size:
        raise EngineError(f"rank {tp.rank}: the warm-up all-reduce over {tp.world_size} ranks summed to {total:g} "
                          f"on {device} (expected {tp.world_size})")
    return (time.perf_counter() - started) * 1e3

