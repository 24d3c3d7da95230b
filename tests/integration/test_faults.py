"""A dead worker makes the engine raise within seconds and leaves no process behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vicuna_bench.errors import EngineError
from tests.specs import spec_for
from vicuna_bench.runtime import Engine

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pids, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return all(_gone(p) for p in pids)


def test_killed_worker_fails_next_call(tiny_models):
    spec = spec_for(tiny_models["vicuna"], 2, "cpu", "fp32", 64)
    engine = Engine(spec)
    try:
        assert engine.generate([[5, 6, 7]], 3).output_ids[0]
        pids = engine.pids
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineError, match="worker rank 1 "):
            engine.generate([[5, 6, 7]], 3)
        assert time.monotonic() - start < 10
        assert _wait_gone(pids, 5), "a worker process was left behind"
        with pytest.raises(EngineError, match="closed"):
            engine.generate([[5, 6, 7]], 3)
    finally:
        engine.close()


def test_worker_killed_during_a_call(tiny_models):
    spec = spec_for(tiny_models["vicuna"], 2, "cpu", "fp32", 256)
    engine = Engine(spec)
    pids = engine.pids
    killer = threading.Timer(1.0, os.kill, args=(pids[0], signal.SIGKILL))
    try:
        killer.start()
        start = time.monotonic()
        with pytest.raises(EngineError, match=r"worker rank 0 \(pid \d+\) was killed by SIGKILL while serving"):
            # long enough to be running when the kill lands; a surviving rank is
            # stuck in a collective and must be ended by the engine, not waited for
            for _ in range(100):
                engine.generate([[5] * 8] * 4, 240, ignore_eos=True)
        assert time.monotonic() - start < 11
        assert _wait_gone(pids, 5), "a worker process was left behind"
    finally:
        killer.cancel()
        engine.close()


def test_close_ends_every_worker(tiny_models):
    spec = spec_for(tiny_models["gqa"], 4, "cpu", "fp32", 64)
    with Engine(spec) as engine:
        pids = engine.pids
        assert len(pids) == 4 and all(not _gone(p) for p in pids)
    assert _wait_gone(pids, 5)


def test_worker_load_error_reaches_the_caller(tiny_models, tmp_path):
    from vicuna_bench.checkpoint import cut_checkpoint
    from vicuna_bench.errors import UserError

    out = tmp_path / "cut"
    cut_checkpoint(tiny_models["vicuna"], out, 2, progress=False)
    (out / "part_model" / "1" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="sha256"):
        Engine(spec_for(out, 2, "cpu", "fp32", 64))
