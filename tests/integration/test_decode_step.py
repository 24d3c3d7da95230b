"""The static-shape decode step: fused projections, compiled vs eager, no host reads, no per-position shapes.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_decode_step.py.
"""
from __future__ import annotations

import pytest
import torch
from tests import tiny
from tests.unit.test_decode_step import PROMPTS
from vicuna_bench.pytest_plugin import make_engine_spec
from vicuna_bench.runtime import Engine
from vicuna_bench.generation import DecodeState, EagerSteps, decode_step, generate
from vicuna_bench.runtime import Engine, build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.integration


def _generate(spec, steps: int, hook=None):
    with Engine(spec, workers=spec.world_size > 1, model_hook=hook) as engine:
        return engine.generate(PROMPTS, steps, ignore_eos=True, return_logits=True)


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_decode_matches_eager(tiny_models, world_size):
    """--compile on (prefill and decode step compiled): identical greedy tokens, logits within 1e-4 of their scale."""
    path = str(tiny_models["gqa"])
    eager = _generate(make_engine_spec(path, world_size, "cpu", "fp32", 64), 10)
    spec = make_engine_spec(path, world_size, "cpu", "fp32", 64)
    compiled = _generate(type(spec)(**{**spec.__dict__, "compile": "on"}), 10)
    assert compiled.output_ids == eager.output_ids
    for a, b in zip(compiled.logits, eager.logits):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert compiled.compile_ms > 0 and eager.compile_ms == 0


def test_compiled_steps_follow_batch_changes(tiny_models):
    """A new batch size gets KV caches of its own and compiles anew; back to the first, its caches and graphs serve."""
    spec = make_engine_spec(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    with Engine(spec) as engine:
        eager = [engine.generate(p, 6, ignore_eos=True).output_ids for p in (PROMPTS, PROMPTS[1:])]
    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        two = engine.generate(PROMPTS, 6, ignore_eos=True)
        one = engine.generate(PROMPTS[1:], 6, ignore_eos=True)
        two_again = engine.generate(PROMPTS, 6, ignore_eos=True)
    assert [two.output_ids, one.output_ids] == eager
    assert two_again.output_ids == eager[0] and two_again.compile_ms == 0.0 and one.compile_ms > 0


def test_compiled_decode_matches_eager_on_smollm2(smollm2_path):
    spec = make_engine_spec(str(smollm2_path), 1, "cpu", "fp32", 256)
    prompts = [[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47], [1, 4093, 28]]
    with Engine(spec) as engine:
        eager = engine.generate(prompts, 8, ignore_eos=True, return_logits=True)
    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        compiled = engine.generate(prompts, 8, ignore_eos=True, return_logits=True)
        again = engine.generate(prompts, 8, ignore_eos=True)  # same shapes: nothing compiled
    assert compiled.output_ids == eager.output_ids == again.output_ids
    for a, b in zip(compiled.logits, eager.logits):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert again.compile_ms == 0.0


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_ranks_fused_projections_give_transformers_logits(tiny_models, world_size):
    """Each rank's qkv_proj / gate_up_proj hold its own slices of q, k, v, gate, up: batched, left-padded, sharded
    generation gives transformers' greedy tokens and logits (within 1e-4 of their scale) on every row."""
    path = tiny_models["gqa"]
    spec = make_engine_spec(str(path), world_size, "cpu", "fp32")
    ours = _generate(spec, 6)
    ref = tiny.hf_model(path)
    for row, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = tiny.hf_greedy(ref, prompt, 6)
        assert ours.output_ids[row] == ref_tokens, f"row {row}"
        scale = ref_logits.abs().max().item()
        assert (ours.logits[row] - ref_logits).abs().max().item() <= 1e-4 * scale, f"row {row}"
