"""Compiling in a forked child (vicuna_bench/apart.py): real forks, and the CPU prefill compiled in one.

The reason it exists, memory left resident by compiling, is measured by bench_peers' memory probe
(docs/PERFORMANCE.md, "Fourteenth pass"); here: what crosses back, errors, thread counts, and that the prefill a
child compiled is the one this process then loads (inductor's cache counters) and computes the eager logits."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch

from vicuna_bench import apart
from vicuna_bench.compile import CHILD_GRAPHS, compiled_steps, prefill_mark
from vicuna_bench.generation import prefill_logits
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel
from tests.specs import spec_for

pytestmark = pytest.mark.integration


def test_the_child_runs_at_one_thread_for_the_parents_count_and_changes_nothing_here():
    here = torch.get_num_threads()
    seen = []

    def work():
        seen.append("child")  # the child's copy of the list
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "code_threads": apart.code_threads(),
                "sum": float(torch.arange(10.0).sum())}

    value, where = apart.run(work, "a test")
    assert where == "a child process"
    assert value == {"pid": value["pid"], "threads": 1, "code_threads": here, "sum": 45.0}
    assert value["pid"] != os.getpid()
    assert seen == [] and torch.get_num_threads() == here and apart.code_threads() == here


def test_a_child_that_raises_or_dies_is_an_error_here_in_one_line():
    def fails():
        raise ValueError("no C++ compiler\nsecond line")

    with pytest.raises(RuntimeError, match=r"^a test in a child process failed \(ValueError: no C\+\+ compiler\)$"):
        apart.run(fails, "a test")
    with pytest.raises(RuntimeError, match=r"^a test in a child process failed \(killed by signal 9\)$"):
        apart.run(lambda: os.kill(os.getpid(), signal.SIGKILL), "a test")
    with pytest.raises(RuntimeError, match=r"in a child process failed \(TypeError: .*JSON"):
        apart.run(lambda: object(), "a test")  # what returns must cross as JSON


def test_a_new_prefill_is_compiled_in_a_child_and_loaded_here(tiny_models, tmp_path, monkeypatch, caplog):
    """Empty caches: the child compiles the prefill (its misses), this process only loads it (hits, no miss), and a
    mark is left; a later warm of the same shape (dynamo reset: a new process as far as graphs go) finds the mark
    and forks no child.  The compiled prefill's logits equal the eager ones."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    with torch.inference_mode():  # as the engine makes its inputs (warm's scratch inputs are inference tensors)
        tokens = torch.tensor([[5, 6, 7, 8, 9]])
        positions = torch.arange(5)[None]
        valid = torch.zeros((1, 32), dtype=torch.bool)
        valid[:, :5] = True
    for attempt in ("cold", "marked"):
        torch._dynamo.reset()
        steps = compiled_steps("cpu", 1, "fp32")
        assert steps.prefill_apart is not None
        children = dict(CHILD_GRAPHS)
        here = {key: counters["inductor"][f"fxgraph_cache_{key}"] for key in ("hit", "miss")}
        caplog.clear()
        with torch.inference_mode(), caplog.at_level(logging.INFO, logger="vicuna_bench"):
            model.setup_caches(1, 32)
            steps.warm(model, 1, 32)
            got = steps.prefill(model, tokens, positions, valid, 0)
            want = prefill_logits(model, tokens, positions, valid, 0)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        made_here = counters["inductor"]["fxgraph_cache_miss"] - here["miss"]
        loaded_here = counters["inductor"]["fxgraph_cache_hit"] - here["hit"]
        made_in_child = CHILD_GRAPHS["miss"] - children["miss"]
        assert made_here == 0 and loaded_here >= 1, (attempt, made_here, loaded_here)
        said = [r.getMessage() for r in caplog.records if "prefill for batch 1, cache 32" in r.getMessage()]
        if attempt == "cold":
            assert made_in_child == loaded_here, (made_in_child, loaded_here)
            assert said == [f"prefill for batch 1, cache 32: compiled in a child process ({made_in_child} graph(s) "
                            "compiled, 0 from the cache), loaded here"]
        else:
            assert said == []
            assert CHILD_GRAPHS == children  # no child: the mark said the caches hold it
    assert prefill_mark(model, 1, 32, steps.prefill_apart).exists()
