"""Every rank's first collective runs eagerly right after joining the group, before any model call.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_collective_warmup.py.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
import pytest
from tests.unit.test_collective_warmup import _check_warm_before_model_calls, _events_by_process, PROMPTS
from vicuna_bench import runtime
from tests.specs import spec_for
from vicuna_bench.runtime import Engine, EngineSpec
import dataclasses
import torch
from vicuna_bench import rank_model, rank_setup, spmd
from vicuna_bench.errors import EngineError
from vicuna_bench.spec import EngineSpec
from vicuna_bench.workers import Engine
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.integration


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


def test_in_process_workers_warm_their_collectives_first(tiny_models, tmp_path):
    events = tmp_path / "events.txt"
    spec = spec_for(str(tiny_models["gqa"]), 2, "cpu", "fp32", 64, bind_cpu=False)
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
    load = rank_model.load_rank_model

    def logged_load(*a, **k):
        model, stats = load(*a, **k)
        return _record_model_calls(model, events), stats

    rank_model.load_rank_model = logged_load
    with spmd.SpmdEngine(spec) as engine:
        engine.generate(PROMPTS, 3, ignore_eos=True)


def test_torchrun_ranks_warm_their_collectives_first(tiny_models, tmp_path):
    import torch.multiprocessing as mp

    events = tmp_path / "events.txt"
    spec = spec_for(str(tiny_models["gqa"]), 2, "cpu", "fp32", 64, bind_cpu=False)
    mp.start_processes(_torchrun_rank, args=(spec, _free_port(), str(events)), nprocs=2, start_method="spawn")
    by_pid = _events_by_process(events)
    assert len(by_pid) == 2
    for seq in by_pid.values():
        _check_warm_before_model_calls(seq)
