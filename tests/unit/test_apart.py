"""Compiling apart (vicuna_bench/apart.py) and the CPU prefill's settings and marks (vicuna_bench/compile.py), in
process: nothing here forks (tests/integration/test_apart.py forks real children)."""

from __future__ import annotations

import pytest
import torch

from vicuna_bench import apart, compile as compile_mod
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel
from tests.specs import spec_for

pytestmark = pytest.mark.unit


def test_where_the_os_does_not_fork_the_work_runs_here(monkeypatch):
    monkeypatch.setattr(apart, "available", lambda: False)
    assert apart.run(lambda: {"made": 3}, "compiling nothing") == ({"made": 3}, "this process")
    assert apart.code_threads() == torch.get_num_threads()  # not in a child: torch's own count


def test_the_prefill_is_generated_for_the_forking_process_threads(monkeypatch):
    """In a child (apart._PARENT_THREADS set, as apart.run sets it) code is generated for the parent's count, and
    every parallel region is sized when it runs, so the child's one thread can run it."""
    assert compile_mod.prefill_thread_options() == {"cpp.threads": torch.get_num_threads(),
                                                    "cpp.dynamic_threads": True}
    monkeypatch.setattr(apart, "_PARENT_THREADS", 6)
    assert compile_mod.prefill_thread_options() == {"cpp.threads": 6, "cpp.dynamic_threads": True}


def test_settings_read_at_each_call_reach_inductor_and_are_undone():
    import torch._inductor.config as inductor

    seen = []
    threads = {"n": 3}

    def fn():
        seen.append((inductor.cpp.threads, inductor.cpp.dynamic_threads, inductor.freezing))
        return "ran"

    before = (inductor.cpp.threads, inductor.cpp.dynamic_threads, inductor.freezing)
    call = compile_mod.under_inductor_options(fn, lambda: {"cpp.threads": threads["n"], "cpp.dynamic_threads": True},
                                              freezing=not before[2])
    assert call() == "ran"
    threads["n"] = 5
    assert call() == "ran"
    assert seen == [(3, True, not before[2]), (5, True, not before[2])]
    assert (inductor.cpp.threads, inductor.cpp.dynamic_threads, inductor.freezing) == before


def test_a_prefill_mark_names_what_decides_the_graph(tiny_models, tmp_path, monkeypatch):
    """Equal for the same model, shape, threads and settings; different when any of them differs (a mark shared by
    two graphs would skip the child for the second, and leave its compile garbage here)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    models = {dtype: build_rank_model(spec_for(str(tiny_models["gqa"]), 1, "cpu", dtype, 64), 0, TensorParallel(),
                                      torch.device("cpu")) for dtype in ("fp32", "bf16")}
    settings = {"freezing": False, "cpp_wrapper": True}
    mark = compile_mod.prefill_mark(models["fp32"], 1, 64, settings)
    assert mark == compile_mod.prefill_mark(models["fp32"], 1, 64, dict(settings))
    assert mark.parent == tmp_path / "prefill-marks" and not mark.exists()
    others = [compile_mod.prefill_mark(models["bf16"], 1, 64, settings),
              compile_mod.prefill_mark(models["fp32"], 2, 64, settings),
              compile_mod.prefill_mark(models["fp32"], 1, 128, settings),
              compile_mod.prefill_mark(models["fp32"], 1, 64, {**settings, "cpp_wrapper": False})]
    monkeypatch.setattr(apart, "_PARENT_THREADS", torch.get_num_threads() + 1)
    others.append(compile_mod.prefill_mark(models["fp32"], 1, 64, settings))
    assert len({mark, *others}) == 6
