"""Every rank's first collective runs eagerly right after joining the group, before any model call.

NCCL/HCCL make a rank's communicator at its first collective; inside a graph
capture that is not allowed, so the first one must come before anything is
compiled or captured.  Checked on gloo (CPU), where the order of calls is the
same: each worker records its collectives and model calls to a file, on the
in-process workers path and on the torchrun path.  The device order
(``set_device`` before ``init_process_group``) is checked with fake device
modules recording their calls.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import types
from pathlib import Path

import pytest
import torch

from vicuna_bench import rank_model, rank_setup, spmd
from vicuna_bench.errors import EngineError
from vicuna_bench.spec import EngineSpec
from vicuna_bench.workers import Engine
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8], [9, 10]]


def _events_by_process(path: Path) -> dict[str, list[str]]:
    by_pid: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        pid, event = line.split()
        by_pid.setdefault(pid, []).append(event)
    return by_pid


def _check_warm_before_model_calls(events: list[str]) -> None:
    first_model_call = min(events.index(e) for e in ("prefill", "decode") if e in events)
    first_collective = events.index("all_reduce")
    assert events.index("init_process_group") < first_collective < events.index("loaded") < first_model_call, events
    assert "decode" in events  # the run got to its decode steps


class _FakeDeviceModule:
    def __init__(self, calls: list):
        self.calls = calls

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))


def test_device_is_set_before_the_group_and_warmed_on_it(monkeypatch):
    """Rank 1 of device ids 3,5: set_device(5), then init_process_group (nccl), then the warm-up on device 5.

    (The NPU takes the same path, ``devices.device_for_rank``; without torch_npu
    this torch has no ``npu`` device type to build a device of.)
    """
    import torch.distributed as dist

    device = "cuda"
    calls: list = []
    monkeypatch.setattr(torch, device, _FakeDeviceModule(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init_process_group", kw["backend"])))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(rank_setup, "warm_collectives", lambda tp, dev: calls.append(("warm", str(dev))) or 1.0)
    spec = EngineSpec("unused", world_size=2, device=device, device_ids=(3, 5))
    tp = rank_setup.init_process_group(spec, 1, 1, "tcp://127.0.0.1:1", 10.0)
    assert calls == [("set_device", 5), ("init_process_group", "nccl"), ("warm", "cuda:5")]
    assert (tp.world_size, tp.rank) == (2, 1)


def test_torchrun_path_sets_its_local_rank_device(monkeypatch):
    """init_from_env passes LOCAL_RANK (not RANK) as the device: rank 3 of a second node is local rank 1."""
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(spmd, "bind_this_rank", lambda *a, **k: None)
    monkeypatch.setattr(spmd, "init_process_group",
                        lambda spec, rank, local_rank, init_method, timeout_s: seen.append((rank, local_rank)))
    monkeypatch.setattr(spmd, "RankRunner", lambda *a, **k: "runner")
    spec = dataclasses.replace(EngineSpec("unused"), world_size=4)
    assert spmd.init_from_env(spec) == "runner"
    assert seen == [(3, 1)]


class _BrokenSum(TensorParallel):
    def all_reduce(self, x):
        return x  # a group that does not add


def test_a_warm_up_sum_that_is_wrong_is_an_error():
    with pytest.raises(EngineError, match="warm-up all-reduce over 2 ranks summed to 1 .*expected 2"):
        rank_setup.warm_collectives(_BrokenSum(2, 0), torch.device("cpu"))


def test_the_warm_up_returns_the_milliseconds_it_took(monkeypatch):
    """One rank (the sum 1 is the world size): the ms between the clock's two reads, 12.5 -> 12.5035 s = 3.5 ms."""
    reads = iter([12.5, 12.5035])
    monkeypatch.setattr(rank_setup, "time", types.SimpleNamespace(perf_counter=lambda: next(reads)))
    assert rank_setup.warm_collectives(TensorParallel(), torch.device("cpu")) == pytest.approx(3.5)
