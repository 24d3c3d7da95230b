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
from pathlib import Path

import pytest
import torch

from vicuna_bench import runtime
from vicuna_bench.errors import EngineError
from vicuna_bench.pytest_plugin import make_engine_spec
from vicuna_bench.runtime import Engine, EngineSpec
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8], [9, 10]]


def _record(path: str, event: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {event}\n")


def _record_collectives(path: str) -> None:
    """In this process, log every group join and collective to ``path`` (before the real call)."""
    import torch.distributed as dist

    def wrap(name, fn):
        def call(*args, **kwargs):
            _record(path, name)
            return fn(*args, **kwargs)
        return call

    for name in ("init_process_group", "all_reduce", "all_gather", "all_gather_object", "broadcast"):
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _record_model_calls(model, path: str):
    """``model`` with its prefill (forward) and decode step logged to ``path``."""
    _record(path, "loaded")
    forward, decode = model.forward, model.decode

    def logged_forward(*args, **kwargs):
        _record(path, "prefill")
        return forward(*args, **kwargs)

    def logged_decode(*args, **kwargs):
        _record(path, "decode")
        return decode(*args, **kwargs)

    model.forward, model.decode = logged_forward, logged_decode
    return model


class EventRecorder:
    """A model hook that, once unpickled in a worker (before the worker starts), logs its collectives too."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __setstate__(self, state):
        self.__dict__.update(state)
        _record_collectives(self.path)  # the worker's target arrives this way: before it joins the group

    def __call__(self, model):
        return _record_model_calls(model, self.path)


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


def test_in_process_workers_warm_their_collectives_first(tiny_models, tmp_path):
    events = tmp_path / "events.txt"
    spec = make_engine_spec(str(tiny_models["gqa"]), 2, "cpu", "fp32", 64, bind_cpu=False)
    with Engine(spec, model_hook=EventRecorder(events)) as engine:
        engine.generate(PROMPTS, 3, ignore_eos=True)
    by_pid = _events_by_process(events)
    assert len(by_pid) == 2  # both workers recorded
    for seq in by_pid.values():
        _check_warm_before_model_calls(seq)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_rank(rank: int, spec: EngineSpec, port: int, events: str) -> None:
    """One rank as torchrun starts it: the environment, then the CLI's engine (SpmdEngine -> init_from_env)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")
    _record_collectives(events)
    load = runtime.load_rank_model

    def logged_load(*a, **k):
        model, stats = load(*a, **k)
        return _record_model_calls(model, events), stats

    runtime.load_rank_model = logged_load
    with runtime.SpmdEngine(spec) as engine:
        engine.generate(PROMPTS, 3, ignore_eos=True)


def test_torchrun_ranks_warm_their_collectives_first(tiny_models, tmp_path):
    import torch.multiprocessing as mp

    events = tmp_path / "events.txt"
    spec = make_engine_spec(str(tiny_models["gqa"]), 2, "cpu", "fp32", 64, bind_cpu=False)
    mp.start_processes(_torchrun_rank, args=(spec, _free_port(), str(events)), nprocs=2, start_method="spawn")
    by_pid = _events_by_process(events)
    assert len(by_pid) == 2
    for seq in by_pid.values():
        _check_warm_before_model_calls(seq)


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
    monkeypatch.setattr(runtime, "warm_collectives", lambda tp, dev: calls.append(("warm", str(dev))) or 1.0)
    spec = EngineSpec("unused", world_size=2, device=device, device_ids=(3, 5))
    tp = runtime.init_process_group(spec, 1, 1, "tcp://127.0.0.1:1", 10.0)
    assert calls == [("set_device", 5), ("init_process_group", "nccl"), ("warm", "cuda:5")]
    assert (tp.world_size, tp.rank) == (2, 1)


def test_torchrun_path_sets_its_local_rank_device(monkeypatch):
    """init_from_env passes LOCAL_RANK (not RANK) as the device: rank 3 of a second node is local rank 1."""
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(runtime, "bind_this_rank", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "init_process_group",
                        lambda spec, rank, local_rank, init_method, timeout_s: seen.append((rank, local_rank)))
    monkeypatch.setattr(runtime, "RankRunner", lambda *a, **k: "runner")
    spec = dataclasses.replace(EngineSpec("unused"), world_size=4)
    assert runtime.init_from_env(spec) == "runner"
    assert seen == [(3, 1)]


class _BrokenSum(TensorParallel):
    def all_reduce(self, x):
        return x  # a group that does not add


def test_a_warm_up_sum_that_is_wrong_is_an_error():
    with pytest.raises(EngineError, match="warm-up all-reduce over 2 ranks summed to 1 .*expected 2"):
        runtime.warm_collectives(_BrokenSum(2, 0), torch.device("cpu"))
    assert runtime.warm_collectives(TensorParallel(), torch.device("cpu")) >= 0.0  # one rank: 1 == world size
