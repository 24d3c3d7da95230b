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

pytestmark = pytest.mark.integration


def _generate(spec, steps: int, hook=None):
    with Engine(spec, workers=spec.world_size > 1, model_hook=hook) as engine:
        return engine.generate(PROMPTS, steps, ignore_eos=True, return_logits=True)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fused_projections_give_the_separate_matrices_logits(tiny_models, world_size):
    """Each rank fuses its own q/k/v and gate/up slices: the logits are those of the separate matrices.

    To fp32 rounding, not bit for bit: BLAS may block a wider (fused) GEMM's
    reduction differently from a narrower one (bit-identical on an AMX host,
    6e-7 and 8e-7 of the logit scale apart at world sizes 2 and 4 on an avx512_bf16 host without AMX).
    """
    spec = make_engine_spec(str(tiny_models["gqa"]), world_size, "cpu", "fp32")
    fused = _generate(spec, 6)
    unfused = _generate(spec, 6, hook=tiny.unfused_model)
    assert fused.output_ids == unfused.output_ids
    for a, b in zip(fused.logits, unfused.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


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
