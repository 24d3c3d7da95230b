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
from vicuna_bench.generation import decode_step, GenerationRequest, generate, prefill_logits
from tests.specs import spec_for
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
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
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
    result = generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    warm, timed = _split(marked_log)
    decode_key = ("decode", 2, generation.cache_length(7 + NEW_TOKENS, 64))
    assert warm == [(("prefill", True), "warm-up"), (("prefill", True), "record"),
                    (decode_key, "warm-up"), (decode_key, "record")]
    assert timed + ["mark"] == [(("prefill", True), "replay"), "mark"] + [(decode_key, "replay"), "mark"] * (NEW_TOKENS - 1)
    assert len(result.step_ms) == NEW_TOKENS - 1

    # The same shape again: warm calls nothing, the timed steps replay.
    marked_log.clear()
    again = generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    warm, timed = _split(marked_log)
    assert warm == [] and again.compile_ms == 0.0
    assert {phase for _, phase in (e for e in timed if e != "mark")} == {"replay"}
    assert again.output_ids == result.output_ids

    # A new batch size is a new shape: recorded before its clock starts too.
    marked_log.clear()
    generate(rank_model, GenerationRequest.make(PROMPTS[1:], NEW_TOKENS, ignore_eos=True), steps=steps)
    warm, timed = _split(marked_log)
    assert [phase for _, phase in warm] == ["warm-up", "record"] * 2
    assert {phase for _, phase in (e for e in timed if e != "mark")} == {"replay"}


def test_one_warm_call_leaves_a_recording_in_the_first_timed_step(rank_model, marked_log):
    """The check above has teeth: warming once (the old behaviour) records inside the first timed decode step."""
    fake = GraphTreeFake(marked_log)
    generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True),
             steps=CompiledSteps(fake.prefill, fake.decode, "fake graph trees", warm_calls=1))
    _, timed = _split(marked_log)
    assert [phase for _, phase in (e for e in timed if e != "mark")][:2] == ["record", "record"]


def test_repeated_warm_calls_leave_the_results_unchanged(rank_model):
    """Each warm call writes its scratch slot; the tokens and logits equal the eager run's bit for bit."""
    eager = generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True))
    steps = CompiledSteps(prefill_logits, decode_step, "eager functions, warmed three times", warm_calls=3)
    warmed = generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True),
                      steps=steps)
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

    eager = generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True))
    reused = generate(rank_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True),
                      steps=CompiledSteps(prefill_logits, reusing_decode, "one output buffer per shape"))
    assert reused.output_ids == eager.output_ids
    for a, b in zip(reused.logits, eager.logits):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- warm state follows the cache set's addresses

def _cache_pointers(model) -> tuple[int, ...]:
    return tuple(t.data_ptr() for layer in model.model.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v))


class AddressedGraphTreeFake(GraphTreeFake):
    """Graph trees with the KV cache as a static input: a graph is made for the cache's addresses, and a cache at
    other addresses is a new graph (a warm-up call, then a recording; shared/spec/NPU.md)."""

    def prefill(self, model, tokens, positions, key_valid, start):
        key = ("prefill", tokens.shape[0] > 1, _cache_pointers(model))
        self.log.append((key[:2], self._phase(key)))
        return prefill_logits(model, tokens, positions, key_valid, start)

    def decode(self, model, tokens, positions, key_valid, slot):
        key = ("decode", tokens.shape[0], key_valid.shape[1], _cache_pointers(model))
        self.log.append((key[:3], self._phase(key)))
        return decode_step(model, tokens, positions, key_valid, slot)


@pytest.fixture()
def fresh_model(tiny_models):
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


def _evict_and_return(model, steps, log: list) -> tuple[list, list, tuple, tuple]:
    """Bucket (2, 64), then (1, 64) under a zero budget (evicting the first), then (2, 64) again, its set made anew
    (the old tensors held here, so the new ones sit elsewhere): (warm, timed) of the last generation, old and new
    cache pointers."""
    model.kv_pool.budget_bytes = 0
    generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    old_caches = [layer.self_attn.cache for layer in model.model.layers]
    old = _cache_pointers(model)
    generate(model, GenerationRequest.make(PROMPTS[1:], NEW_TOKENS, ignore_eos=True), steps=steps)
    assert model.kv_pool.buckets() == [(1, 64)]
    log.clear()
    generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    assert old_caches  # alive until here
    warm, timed = _split(log)
    return warm, timed, old, _cache_pointers(model)


def test_a_set_made_anew_after_an_eviction_is_warmed_before_the_clock(fresh_model, marked_log):
    fake = AddressedGraphTreeFake(marked_log)
    steps = CompiledSteps(fake.prefill, fake.decode, "fake graph trees, cache addresses", warm_calls=2)
    warm, timed, old, new = _evict_and_return(fresh_model, steps, marked_log)
    assert not set(old) & set(new)
    assert [phase for _, phase in warm] == ["warm-up", "record"] * 2
    assert {phase for _, phase in (e for e in timed if e != "mark")} == {"replay"}


def test_warm_state_by_shape_alone_records_inside_the_timed_steps(fresh_model, marked_log, monkeypatch):
    """The check above has teeth: warm state that ignores the cache's addresses (the old behaviour) leaves the
    re-made set's warm-up and recording to the first timed prefill and decode step."""
    from vicuna_bench import compile as compile_module

    monkeypatch.setattr(compile_module, "cache_addresses", lambda model: ())
    fake = AddressedGraphTreeFake(marked_log)
    steps = CompiledSteps(fake.prefill, fake.decode, "fake graph trees, cache addresses", warm_calls=2)
    warm, timed, _, _ = _evict_and_return(fresh_model, steps, marked_log)
    assert warm == []
    assert [phase for _, phase in (e for e in timed if e != "mark")][:3] == ["warm-up", "warm-up", "record"]


class PeerVotes:
    """A tensor-parallel group of 2 whose other rank votes ``votes`` (all_reduce sums, as torch.distributed's)."""

    world_size = 2

    def __init__(self, votes):
        self.votes = votes

    def all_reduce(self, x):
        return x.add_(torch.tensor(self.votes, dtype=x.dtype))

    @staticmethod
    def all_gather_last_dim(x):  # the model's head: this stand-in's rank holds the whole vocabulary
        return x


def test_a_shape_one_rank_must_warm_is_warmed_on_every_rank(fresh_model, monkeypatch):
    """Warm calls run the model's collectives: where a peer's set was made anew (its pool evicted it, this rank's
    did not), this rank makes the same calls."""
    log: list = []
    fake = GraphTreeFake(log)
    steps = CompiledSteps(fake.prefill, fake.decode, "fake graph trees", warm_calls=1)
    fresh_model.setup_caches(2, 64)
    steps.warm(fresh_model, 2, 64)
    assert [key[0] for key, _ in log] == ["prefill", "decode"]
    log.clear()
    steps.warm(fresh_model, 2, 64)
    assert log == []
    monkeypatch.setattr(fresh_model, "tp", PeerVotes([0.0, 1.0]))  # the peer must warm its decode step
    steps.warm(fresh_model, 2, 64)
    assert [key[0] for key, _ in log] == ["decode"]
    log.clear()
    monkeypatch.setattr(fresh_model, "tp", PeerVotes([0.0, 0.0]))
    steps.warm(fresh_model, 2, 64)
    assert log == []


# ---------------------------------------------------------------- NPU: a new prefill shape runs once untimed

class LoggedEager(generation.EagerSteps):
    def __init__(self, log: list):
        self.log = log

    def prefill(self, model, tokens, positions, key_valid, start):
        self.log.append(("prefill", tuple(tokens.shape)))
        return prefill_logits(model, tokens, positions, key_valid, start)


def test_only_the_npu_warms_its_first_prefill_per_shape():
    assert generation.warms_first_prefill("npu")
    assert not generation.warms_first_prefill("cuda") and not generation.warms_first_prefill("cpu")


def test_on_npu_a_new_prefill_shape_runs_once_before_the_clock(fresh_model, marked_log, monkeypatch):
    """This CPU stands in for an NPU (the decision itself is the real one); tokens and logits equal a run without
    the warm-up, bit for bit (the warm prefill writes the very keys the timed one writes again)."""
    eager = generate(fresh_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True))
    real = generation.warms_first_prefill
    monkeypatch.setattr(generation, "warms_first_prefill", lambda device_type: real("npu"))
    steps = LoggedEager(marked_log)
    marked_log.clear()
    got = generate(fresh_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True),
                   steps=steps)
    warm, timed = _split(marked_log)
    assert warm == [("prefill", (2, 7))] and timed[0] == ("prefill", (2, 7))
    assert got.output_ids == eager.output_ids
    for a, b in zip(got.logits, eager.logits):
        assert torch.equal(a, b)
    marked_log.clear()
    # The same shape: nothing before the clock.
    generate(fresh_model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    warm, timed = _split(marked_log)
    assert warm == [] and timed[0] == ("prefill", (2, 7))
    marked_log.clear()
    # 4 tokens: a new shape.
    generate(fresh_model, GenerationRequest.make([[5, 6, 7, 8], [9, 10]], NEW_TOKENS, ignore_eos=True), steps=steps)
    warm, _ = _split(marked_log)
    assert warm == [("prefill", (2, 4))]
