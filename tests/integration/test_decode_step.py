"""The static-shape decode step: fused projections, compiled vs eager, no host reads, no per-position shapes.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_decode_step.py.
"""
from __future__ import annotations

import pytest
import torch
from tests import tiny
from tests.unit.test_decode_step import PROMPTS
from tests.specs import spec_for
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
    eager = _generate(spec_for(path, world_size, "cpu", "fp32", 64), 10)
    spec = spec_for(path, world_size, "cpu", "fp32", 64)
    compiled = _generate(type(spec)(**{**spec.__dict__, "compile": "on"}), 10)
    assert compiled.output_ids == eager.output_ids
    for a, b in zip(compiled.logits, eager.logits):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert compiled.compile_ms > 0 and eager.compile_ms == 0


def test_compiled_steps_follow_batch_changes(tiny_models):
    """A new batch size gets KV caches of its own and compiles anew; back to the first, its caches and graphs serve."""
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    with Engine(spec) as engine:
        eager = [engine.generate(p, 6, ignore_eos=True).output_ids for p in (PROMPTS, PROMPTS[1:])]
    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        two = engine.generate(PROMPTS, 6, ignore_eos=True)
        one = engine.generate(PROMPTS[1:], 6, ignore_eos=True)
        two_again = engine.generate(PROMPTS, 6, ignore_eos=True)
    assert [two.output_ids, one.output_ids] == eager
    assert two_again.output_ids == eager[0] and two_again.compile_ms == 0.0 and one.compile_ms > 0


@pytest.fixture()
def compile_log(monkeypatch):
    """A log of ("compile", weak reference to the graph dynamo hands inductor) and "mark" (every clock mark of a
    generation), with dynamo's caches emptied so that every graph compiles here."""
    import weakref

    import torch._inductor.compile_fx as inductor_compile
    from vicuna_bench import generation

    log: list = []
    compile_fx, mark = inductor_compile.compile_fx, generation.StepClock.mark

    def recording(gm, *args, **kwargs):  # what dynamo's inductor backend calls (torch/__init__.py, 2.13)
        log.append(("compile", weakref.ref(gm)))
        return compile_fx(gm, *args, **kwargs)

    def logged_mark(self):
        log.append("mark")
        mark(self)

    monkeypatch.setattr(inductor_compile, "compile_fx", recording)
    monkeypatch.setattr(generation.StepClock, "mark", logged_mark)
    torch._dynamo.reset()
    return log


def test_nothing_compiles_inside_the_timed_steps_with_real_dynamo(tiny_models, compile_log):
    """inductor and dynamo as --compile on runs them, batch 2 and batch 3: every graph is made before the first
    clock mark.  Regression: the prefill was warmed on a 2-token prompt and dynamo tied its length to the batch
    of 2 (duck shapes), so the real prompt recompiled inside the timed prefill."""
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        for prompts in (PROMPTS, PROMPTS + [[3, 4, 5]]):
            compile_log.clear()
            engine.generate(prompts, 6, ignore_eos=True)
            first = compile_log.index("mark")
            last = len(compile_log) - 1 - compile_log[::-1].index("mark")
            assert any(e != "mark" for e in compile_log[:first]), "nothing compiled: dynamo's cache was not empty"
            assert [e for e in compile_log[first:last] if e != "mark"] == [], f"compiled while timed, batch {len(prompts)}"


def two_models_of_one_architecture(tiny_models, tmp_path) -> tuple[list, list, dict]:
    """Specs of two tiny models of one architecture with different weights, two requests (batch 2 and 1), and the
    eager generation of each (model, request) by index."""
    other = tiny.make_tiny_llama(tmp_path / "other", tiny.GQA, seed=11)
    specs = [spec_for(str(p), 1, "cpu", "fp32", 64) for p in (tiny_models["gqa"], other)]
    requests = [PROMPTS, PROMPTS[1:]]
    eager = {}
    for i, spec in enumerate(specs):
        with Engine(spec) as engine:
            for j, prompts in enumerate(requests):
                eager[i, j] = engine.generate(prompts, 6, ignore_eos=True, return_logits=True)
    assert eager[0, 0].output_ids != eager[1, 0].output_ids  # the two models are told apart by their tokens
    return specs, requests, eager


def alternate_and_compare(engines, requests, eager) -> None:
    """Twice, every request on every engine in turn: each generation equals its own model's eager one."""
    for _ in range(2):
        for j, prompts in enumerate(requests):
            for i, engine in enumerate(engines):
                got = engine.generate(prompts, 6, ignore_eos=True, return_logits=True)
                assert got.output_ids == eager[i, j].output_ids, (i, j)
                for a, b in zip(got.logits, eager[i, j].logits):
                    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("packaged", ["0", "1"])
def test_warm_frees_the_graphs_dynamo_traced(tiny_models, compile_log, monkeypatch, packaged):
    """Once the prefill and decode step are compiled, the FX graphs dynamo traced for them (every node with its
    fake tensors and stack traces) are garbage: each graph inductor was handed is held weakly here and must be
    gone after the generation, whose tokens still equal the eager ones (``compile.drop_traced_graphs``).  With
    the decode step an AOTInductor package (``packaged`` 1) dynamo traces the prefill alone, and the exported
    graph the package was compiled from (where it was not in the cache already) must be gone too."""
    import gc

    monkeypatch.setenv("VICUNA_BENCH_AOTI", packaged)

    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    with Engine(spec) as engine:
        eager = engine.generate(PROMPTS, 6, ignore_eos=True).output_ids
    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        compiled = engine.generate(PROMPTS, 6, ignore_eos=True).output_ids
        gc.collect()
        traced = [entry[1] for entry in compile_log if entry != "mark"]
        assert len(traced) >= (2 if packaged == "0" else 1), "the prefill and the decode step were not compiled"
        assert [ref() for ref in traced] == [None] * len(traced)
    assert compiled == eager


def test_warmed_decode_skips_guards_without_mixing_models_or_shapes(tiny_models, tmp_path, monkeypatch):
    """Two engines of one architecture with different weights, open at once: dynamo keeps both models' decode
    graphs in one cache (one decode_step code object).  A warmed (model, batch, cache length) decodes under
    skip_guard_eval_unsafe; alternating models and batch sizes, every generation still equals its own eager one
    (a step run on the other model's graph, or another shape's, would give the other tokens and logits).  The
    dynamo step, as at world size > 1 or with ``VICUNA_BENCH_AOTI=0`` (the package: tests/integration/test_aoti.py)."""
    from vicuna_bench import compile as vb_compile

    monkeypatch.setenv("VICUNA_BENCH_AOTI", "0")

    if not vb_compile.SKIP_GUARD_EVAL_SUPPORTED:
        pytest.fail(f"torch {torch.__version__} has no skip_guard_eval_unsafe: this stack cannot run this check")
    specs, requests, eager = two_models_of_one_architecture(tiny_models, tmp_path)
    skipped = []
    real_stance = torch.compiler.set_stance

    def spy(*args, **kwargs):
        skipped.append(kwargs.get("skip_guard_eval_unsafe", False))
        return real_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", spy)
    on = [Engine(type(s)(**{**s.__dict__, "compile": "on"})) for s in specs]
    try:
        alternate_and_compare(on, requests, eager)
    finally:
        for engine in on:
            engine.close()
    assert skipped and all(skipped)  # 2 models x 2 batches x 2 rounds x 5 decode steps, each on a warmed shape
    assert len(skipped) == 2 * 2 * 2 * 5


def test_compiled_decode_matches_eager_on_smollm2(smollm2_path):
    spec = spec_for(str(smollm2_path), 1, "cpu", "fp32", 256)
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
    spec = spec_for(str(path), world_size, "cpu", "fp32")
    ours = _generate(spec, 6)
    ref = tiny.hf_model(path)
    for row, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = tiny.hf_greedy(ref, prompt, 6)
        assert ours.output_ids[row] == ref_tokens, f"row {row}"
        scale = ref_logits.abs().max().item()
        assert (ours.logits[row] - ref_logits).abs().max().item() <= 1e-4 * scale, f"row {row}"


@pytest.mark.parametrize("packaged", ["0", "1"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_compiled_decode_step_writes_the_kv_cache_in_place(tiny_models, dtype, packaged, monkeypatch):
    """Inductor's decode graph (the engine's CPU options: our kernels, C++ wrapper, bf16 frozen) allocates no buffer
    of a KV cache's shape: the write goes into the cache itself.  ``scatter_`` there made a whole new cache per
    layer and step and copied it back (SmolLM2 batch 8 over batch 1: 1.41 against 1.53 bf16).  Read from the code
    inductor emits for dynamo (``packaged`` 0) and from the C++ wrapper inside the AOTInductor package (1)."""
    import re
    import zipfile

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("VICUNA_BENCH_AOTI", packaged)
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", dtype, 64)
    models = []
    keep = lambda model: models.append(model) or model  # noqa: E731
    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"}), model_hook=keep) as engine:
        with inductor_config.patch(force_disable_caches=True):  # a cache hit emits no code to read
            got, codes = run_and_get_code(lambda: engine.generate(PROMPTS, 3, ignore_eos=True))
        dims = tuple(models[0].model.layers[0].self_attn.cache.k.shape)
        if packaged == "1":  # the package may come from the cache: its wrapper is read from the file
            if engine._local.steps.packaged is None:
                from vicuna_bench import aoti

                why = aoti.why_unsupported()
                assert why is not None, f"the package was not used: {engine._local.steps.description}"
                pytest.skip(f"no AOTInductor package on torch {torch.__version__}: {why}")
            steps = list(engine._local.steps.packaged._steps[models[0]].values())
            assert len(steps) == 1
            with zipfile.ZipFile(steps[0].path) as package:
                codes = [package.read(n).decode() for n in package.namelist() if n.endswith("wrapper.cpp")]
    shape = re.compile(r"\{%sL, %sL, %sL, %sL\}|\(%s, %s, %s, %s\)" % (dims + dims))
    decode = [c for c in codes if "decode_attention" in c]
    assert len(decode) == 1 and len(got.output_ids[0]) == 3
    # Buffers: empty_strided_cpu((...)) in a Python wrapper, an int_array_N[] of sizes in the C++ one.
    allocation = re.compile(r"empty_strided|int_array_\d+\[\] =")
    allocations = [line for line in decode[0].splitlines() if shape.search(line) and allocation.search(line)]
    assert allocations == []
    assert any("index_copy" in line for line in decode[0].splitlines())  # the write is in this code
