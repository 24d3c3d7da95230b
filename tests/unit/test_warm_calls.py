"""No graph is made inside a timed step: ``CompiledSteps.warm`` calls each new shape as often as its backend needs.

The fake backend behaves as CUDA graph trees do (torch/_inductor/cudagraph_trees.py,
``CUDAGraphTreeManager._run``): a function's first call runs eagerly as a
warm-up, its second records, later ones replay.  Each call is logged with its
phase next to the generation clock's marks, so what ran between the first
and the last mark (the timed prefill and decode steps) is known.
"""

from __future__ import annotations

import collections

import pytest
import torch

from vicuna_bench import generation
from vicuna_bench.compile import CompiledSteps, compiled_steps
from vicuna_bench.generation import decode_step, generate, prefill_logits
from vicuna_bench.pytest_plugin import make_engine_spec
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
NEW_TOKENS = 5


class GraphTreeFake:
    """Counts calls per graph: 1st ``warm-up``, 2nd ``record``, then ``replay`` (CUDA graph trees' order)."""

    def __init__(self, log: list):
        self.log = log
        self.calls: collections.Counter = collections.Counter()

    def _phase(self, key) -> str:
        self.calls[key] += 1
        return {1: "warm-up", 2: "record"}.get(self.calls[key], "replay")

    def prefill(self, model, tokens, positions, key_valid, start):
        key = ("prefill", tokens.shape[0] > 1)  # one dynamic-shape graph for batch 1, one for larger batches
        self.log.append((key, self._phase(key)))
        return prefill_logits(model, tokens, positions, key_valid, start)

    def decode(self, model, tokens, positions, key_valid, slot):
        key = ("decode", tokens.shape[0], key_valid.shape[1])
        self.log.append((key, self._phase(key)))
        return decode_step(model, tokens, positions, key_valid, slot)


@pytest.fixture(scope="module")
def rank_model(tiny_models):
    spec = make_engine_spec(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


@pytest.fixture()
def marked_log(monkeypatch):
    """A log that also receives ``"mark"`` at every clock mark of a generation."""
    log: list = []
    mark = generation.StepClock.mark

    def logged_mark(self):
        log.append("mark")
        mark(self)

    monkeypatch.setattr(generation.StepClock, "mark", logged_mark)
    return log


def _split(log: list) -> tuple[list, list]:
    """(calls before the first mark: warm, calls between the first and last mark: timed) of the last generation."""
    first = log.index("mark")
    last = len(log) - 1 - log[::-1].index("mark")
    return log[:first], log[first + 1:last]


def test_warm_records_every_new_shape_and_the_timed_steps_only_replay(rank_model, marked_log):
    fake = GraphTreeFake(marked_log)
    steps = CompiledSteps(fake.prefill, fake.decode, "fake graph trees", warm_calls=2)
    result = generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True, steps=steps)
    warm, timed = _split(marked_log)
    decode_key = ("decode", 2, generation.cache_length(7 + NEW_TOKENS, 64))
    assert warm == [(("prefill", True), "warm-up"), (("prefill", True), "record"),
                    (decode_key, "warm-up"), (decode_key, "record")]
    assert timed + ["mark"] == [(("prefill", True), "replay"), "mark"] + [(decode_key, "replay"), "mark"] * (NEW_TOKENS - 1)
    assert len(result.step_ms) == NEW_TOKENS - 1

    # The same shape again: warm calls nothing, the timed steps replay.
    marked_log.clear()
    again = generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True, steps=steps)
    warm, timed = _split(marked_log)
    assert warm == [] and again.compile_ms == 0.0
    assert {phase for _, phase in (e for e in timed if e != "mark")} == {"replay"}
    assert again.output_ids == result.output_ids

    # A new batch size is a new shape: recorded before its clock starts too.
    marked_log.clear()
    generate(rank_model, PROMPTS[1:], NEW_TOKENS, ignore_eos=True, steps=steps)
    warm, timed = _split(marked_log)
    assert [phase for _, phase in warm] == ["warm-up", "record"] * 2
    assert {phase for _, phase in (e for e in timed if e != "mark")} == {"replay"}


def test_one_warm_call_leaves_a_recording_in_the_first_timed_step(rank_model, marked_log):
    """The check above has teeth: warming once (the old behaviour) records inside the first timed decode step."""
    fake = GraphTreeFake(marked_log)
    generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True,
             steps=CompiledSteps(fake.prefill, fake.decode, "fake graph trees", warm_calls=1))
    _, timed = _split(marked_log)
    assert [phase for _, phase in (e for e in timed if e != "mark")][:2] == ["record", "record"]


def test_repeated_warm_calls_leave_the_results_unchanged(rank_model):
    """Each warm call writes its scratch slot; the tokens and logits equal the eager run's bit for bit."""
    eager = generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True)
    steps = CompiledSteps(prefill_logits, decode_step, "eager functions, warmed three times", warm_calls=3)
    warmed = generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True, steps=steps)
    assert warmed.output_ids == eager.output_ids
    for a, b in zip(warmed.logits, eager.logits):
        assert torch.equal(a, b)


def test_backends_ask_for_the_calls_they_need():
    """CUDA graph trees: an eager warm-up call and a recording call; CPU inductor (no graphs) compiles on the first."""
    assert compiled_steps("cuda", 1).warm_calls == 2
    assert compiled_steps("cpu", 1).warm_calls == 1


def test_kept_logits_survive_a_backend_that_reuses_its_output(rank_model):
    """CUDA graph trees hand every replay of a graph the same output memory (a replay writes over the previous
    call's logits): the logits generate returns are still each step's own, equal to eager's bit for bit."""
    outputs: dict = {}

    def reusing_decode(model, tokens, positions, key_valid, slot):
        logits = decode_step(model, tokens, positions, key_valid, slot)
        static = outputs.setdefault((tokens.shape[0], key_valid.shape[1]), torch.empty_like(logits))
        return static.copy_(logits)

    eager = generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True)
    reused = generate(rank_model, PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True,
                      steps=CompiledSteps(prefill_logits, reusing_decode, "one output buffer per shape"))
    assert reused.output_ids == eager.output_ids
    for a, b in zip(reused.logits, eager.logits):
        assert torch.equal(a, b)
