"""The KV pool's budget in the fit check, and a prefill that runs out of memory.

References: Vicuna-13B's shapes (hidden 5120, 40 layers, 40 heads and key/value heads, intermediate 13824, vocab
32000) counted by hand; the tiny model's sizes by hand; torch_npu 2.6.0's out-of-memory message read from its
libtorch_npu.so; the logits of an eager run of the same request.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from vicuna_bench import fit, generation
from vicuna_bench.config import ModelArgs
from vicuna_bench.errors import UserError
from vicuna_bench.generation import EagerSteps, GenerationRequest, generate, prefill_logits
from vicuna_bench.model import KVCachePool
from tests.specs import spec_for
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

GIB = 1 << 30
VICUNA_13B = ModelArgs(hidden_size=5120, n_layers=40, n_heads=40, n_kv_heads=40, head_dim=128,
                       intermediate_size=13824, vocab_size=32000)
CONTEXT = 16384
# One rank of 8: 5 key/value heads of 128; keys and values, 40 layers, fp16.
KV_BYTES_PER_TOKEN = 2 * 40 * 5 * 128 * 2
# One rank of 8: 4000 vocabulary rows (embedding and head), 5 heads, 1728 intermediate rows; norms replicated.
LAYER_13B = (5 + 2 * 5) * 128 * 5120 + 5120 * 5 * 128 + 3 * 1728 * 5120 + 2 * 5120
WEIGHTS_13B = 2 * (2 * 4000 * 5120 + 40 * LAYER_13B + 5120)


def test_13b_16k_8_ranks_one_set_and_weights_by_hand():
    assert KV_BYTES_PER_TOKEN == 102_400 and LAYER_13B == 39_659_520
    need = fit.rank_need(VICUNA_13B, 8, "fp16", CONTEXT, batch=6, device="npu")
    assert need.kv_bytes == 6 * CONTEXT * KV_BYTES_PER_TOKEN == 10_066_329_600  # 9.375 GiB
    assert need.weight_bytes == WEIGHTS_13B == 3_254_691_840  # 13,015,864,320 parameters / 8, in fp16


def test_the_check_counts_the_pools_budget_and_caps_it_at_what_is_free():
    """Batch 6 on 64 GiB: one set fits (52.6 GiB); twice the set would reach 62.0 GiB, so the budget is what is left."""
    need = fit.check_fit(fit.FitCase(VICUNA_13B, 8, "fp16", CONTEXT, 6, "npu"), 64 * GIB, "64 GiB free")
    room = 64 * GIB - need.weight_bytes - need.runtime_bytes
    assert need.kv_room_bytes == room
    assert need.kv_pool_bytes == min(2 * need.kv_bytes, room)
    assert need.total == need.weight_bytes + need.kv_pool_bytes + need.runtime_bytes <= 64 * GIB
    # Batch 3 on 32 GiB (the break): one set fits, two would not; the budget is the room, not 2 sets.
    three = fit.check_fit(fit.FitCase(VICUNA_13B, 8, "fp16", CONTEXT, 3, "npu"), 32 * GIB, "32 GiB free")
    assert three.weight_bytes + 2 * three.kv_bytes + three.runtime_bytes > 32 * GIB
    assert three.kv_bytes < three.kv_pool_bytes == three.kv_room_bytes < 2 * three.kv_bytes
    assert three.total == 32 * GIB
    with pytest.raises(UserError, match=r"batch 4: each rank needs 36\.34 GiB .*KV cache 6\.25 GiB"):
        fit.check_fit(fit.FitCase(VICUNA_13B, 8, "fp16", CONTEXT, 4, "npu"), 32 * GIB, "32 GiB free")


def test_a_pool_with_the_checks_room_never_holds_more():
    """Batch 6 with 60 GiB free (52.6 GiB needed): sets of other batch sizes at 16K evict down to the room."""
    free = 60 * GIB
    need = fit.check_fit(fit.FitCase(VICUNA_13B, 8, "fp16", CONTEXT, 6, "npu"), free, "60 GiB free")
    pool = KVCachePool(room_bytes=need.kv_room_bytes)

    def one_set(rows: int):
        return lambda: [SimpleNamespace(nbytes=rows * CONTEXT * KV_BYTES_PER_TOKEN)]

    for rows in (6, 5, 4, 6, 2, 1, 3):
        pool.get(rows, CONTEXT, rows * CONTEXT * KV_BYTES_PER_TOKEN, one_set(rows))
        assert pool.held_bytes <= need.kv_room_bytes
        assert need.weight_bytes + pool.held_bytes + need.runtime_bytes <= free
    # Without the room (the old default: twice the largest) the 6- and 5-row sets sat together: 60.4 GiB.
    old = KVCachePool()
    for rows in (6, 5):
        old.get(rows, CONTEXT, rows * CONTEXT * KV_BYTES_PER_TOKEN, one_set(rows))
    assert old.buckets() == [(6, CONTEXT), (5, CONTEXT)]
    assert need.weight_bytes + old.held_bytes + need.runtime_bytes > free


def test_a_set_budget_is_counted_whole_and_named():
    with pytest.raises(UserError) as err:
        fit.check_fit(fit.FitCase(VICUNA_13B, 8, "fp16", CONTEXT, 6, "npu"), 64 * GIB, "64.00 GiB free on npu:0",
                      kv_budget=30 * GIB)
    msg = str(err.value)
    assert "\n" not in msg
    assert "KV cache pool 30.00 GiB (kv_cache_budget_mb=30720)" in msg
    room = 64 * GIB - WEIGHTS_13B - fit.rank_need(VICUNA_13B, 8, "fp16", CONTEXT, 6, "npu").runtime_bytes
    assert msg.endswith(f"kv_cache_budget_mb={room >> 20} or less")
    kept = fit.check_fit(fit.FitCase(VICUNA_13B, 8, "fp16", CONTEXT, 6, "npu"), 64 * GIB, "free", kv_budget=12 * GIB)
    assert kept.kv_pool_bytes == 12 * GIB and kept.total == kept.weight_bytes + 12 * GIB + kept.runtime_bytes


def test_the_rank_gives_its_pool_the_room_it_has(tiny_models, monkeypatch):
    """CPU: the host's available memory less the tiny GQA model's weights and runtime allowance, counted by hand."""
    available = 3 * GIB
    monkeypatch.setattr(fit, "host_available_bytes", lambda: available)
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    layer = (8 + 2 * 2) * 8 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
    weights = 4 * (777 * 64 + 2 * layer + 64)
    runtime = (256 << 20) + 4 * (64 * (4 * 64 + 12 * 8 + 2 * 128) + 8 * 64 * 64)
    assert model.kv_pool.room_bytes == available - weights - runtime


# ---------------------------------------------------------------- a prefill out of memory

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
NEW_TOKENS = 5
# The message torch_npu 2.6.0 raises (libtorch_npu.so: "NPU out of memory. Tried to allocate "), a RuntimeError.
NPU_OOM = "NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.97 GiB total capacity; 58.10 GiB already allocated)"


@pytest.fixture()
def model(tiny_models):
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


class FailingPrefill(EagerSteps):
    """Eager steps whose prefill raises ``error`` its first ``failures`` calls; ``pool_sizes``: sets held per call."""

    def __init__(self, failures: int, error: Exception):
        self.failures = failures
        self.error = error
        self.pool_sizes: list[int] = []

    def prefill(self, model, tokens, positions, key_valid, start):
        self.pool_sizes.append(len(model.kv_pool))
        if len(self.pool_sizes) <= self.failures:
            raise self.error
        return prefill_logits(model, tokens, positions, key_valid, start)


def _oom():
    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate 2 GiB")


def test_out_of_memory_is_told_apart():
    assert generation.out_of_memory(_oom())
    assert generation.out_of_memory(RuntimeError(NPU_OOM))
    assert not generation.out_of_memory(RuntimeError("shape mismatch"))
    assert not generation.out_of_memory(ValueError("out of memory"))  # not a runtime error: a bug, raised as it is


@pytest.mark.parametrize("error", [_oom(), RuntimeError(NPU_OOM)], ids=["torch", "torch_npu"])
def test_a_prefill_out_of_memory_drops_the_kept_sets_and_tries_once_more(model, error, caplog):
    eager = generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True))
    model.setup_caches(1, 32)
    model.setup_caches(3, 16)  # two kept sets besides the request's (2, 64)
    steps = FailingPrefill(1, error)
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        got = generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True),
                       steps=steps)
    assert steps.pool_sizes == [3, 1]  # tried with the three sets held, then with only the one in use
    assert model.kv_pool.buckets() == [(2, 64)]
    assert got.output_ids == eager.output_ids
    for a, b in zip(got.logits, eager.logits):
        assert torch.equal(a, b)
    assert len(got.step_ms) == NEW_TOKENS - 1
    warned = [r.getMessage() for r in caplog.records if "ran out of" in r.getMessage()]
    assert len(warned) == 1 and "dropped 2 kept KV cache set(s) (0.0 MiB), trying once more" in warned[0]


def test_a_second_failure_says_what_would_fit(model, monkeypatch):
    """Sizes by hand (tiny GQA, fp32, world size 1, cache 64 slots): a set is 256 bytes a slot-row, a prefill of b rows
    of t tokens holds at most 4 b (608 t + 8 t^2) bytes (fit.prefill_activation_bytes).  Room: 17,232 free + the
    32,768-byte set held = 50,000.  Batch 1 at 7 tokens: 16,384 + 18,592 fits; batch 2 at 3 tokens: 32,768 +
    15,168 fits, at 4: 32,768 + 20,480 does not."""
    monkeypatch.setattr(fit, "host_available_bytes", lambda: 17_232)
    steps = FailingPrefill(2, _oom())
    with pytest.raises(UserError) as err:
        generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    msg = str(err.value)
    assert "\n" not in msg and len(steps.pool_sizes) == 2
    assert msg.startswith("batch 2 of 7-token prompts (+5 new): the prefill ran out of cpu memory twice (the kept KV "
                          "cache sets dropped and the device cache emptied in between); by the fit check's bounds "
                          "(0.00 GiB free + 0.00 GiB of KV cache sets held) would fit: batch 1 at these prompts, or "
                          "prompts of up to 3 tokens at batch 2; CUDA out of memory"), msg
    monkeypatch.setattr(fit, "host_available_bytes", lambda: 0)
    with pytest.raises(UserError, match=r"nothing smaller fits in 0\.00 GiB free"):
        generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=FailingPrefill(2, _oom()))


def test_no_retry_at_world_size_above_one(model, monkeypatch):
    """A rank cannot rerun a prefill alone: its peers wait in the prefill's collectives."""
    monkeypatch.setattr(model, "tp", SimpleNamespace(world_size=2))
    monkeypatch.setattr(fit, "host_available_bytes", lambda: None)
    steps = FailingPrefill(1, RuntimeError(NPU_OOM))
    model.setup_caches(1, 32)
    with pytest.raises(UserError, match=re.escape("(not retried: at world size 2 the other ranks wait inside this "
                                                  "prefill's collectives); NPU out of memory. Tried to allocate")):
        generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    assert steps.pool_sizes == [2]  # called once; the kept set is still there
    assert len(model.kv_pool) == 2


def test_other_errors_are_not_retried(model):
    steps = FailingPrefill(1, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True), steps=steps)
    assert steps.pool_sizes == [1]


def test_the_npu_warm_prefill_out_of_memory_is_retried_too(model, monkeypatch):
    """On NPU the untimed prefill of a new shape runs first: its out of memory drops the kept sets the same way, and
    the retry warms that shape again before the timed prefill (this CPU stands in for an NPU)."""
    real = generation.warms_first_prefill
    monkeypatch.setattr(generation, "warms_first_prefill", lambda device_type: real("npu"))
    prompts = [[30, 31, 32, 33], [34, 35]]
    expected = generate(model, GenerationRequest.make(prompts, NEW_TOKENS, ignore_eos=True))
    model.setup_caches(1, 32)
    generation._WARMED_PREFILLS.clear()  # (2, 4) is a new shape again
    steps = FailingPrefill(1, RuntimeError(NPU_OOM))
    got = generate(model, GenerationRequest.make(prompts, NEW_TOKENS, ignore_eos=True), steps=steps)
    assert steps.pool_sizes == [2, 1, 1]  # the warm-up failed with 2 sets held; warm-up and timed run with 1
    assert got.output_ids == expected.output_ids


def test_room_is_made_before_a_prefill_that_would_not_fit_beside_the_kept_sets(model, monkeypatch, caplog):
    """At any world size, before any collective: the kept sets go when the prefill's bound exceeds the free memory.
    By hand (as above): a batch-2 prefill over 64 slots is bounded by 4 * 2 * (608 * 64 + 8 * 64^2) = 573,440 bytes."""
    eager = generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True))
    model.setup_caches(1, 32)
    model.setup_caches(3, 16)
    monkeypatch.setattr(fit, "host_available_bytes", lambda: 573_440)  # just enough: nothing dropped
    assert generation.make_room_for_prefill(model, 2, 64) == 0 and len(model.kv_pool) == 3
    monkeypatch.setattr(fit, "host_available_bytes", lambda: 573_439)
    steps = FailingPrefill(0, _oom())
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        got = generate(model, GenerationRequest.make(PROMPTS, NEW_TOKENS, ignore_eos=True, return_logits=True),
                       steps=steps)
    assert steps.pool_sizes == [1]  # the kept sets were gone before the prefill started
    assert model.kv_pool.buckets() == [(2, 64)]
    assert got.output_ids == eager.output_ids
    warned = [r.getMessage() for r in caplog.records if "kept KV cache set(s)" in r.getMessage()]
    assert len(warned) == 1 and "may need 0.5 MiB, 0.5 MiB free on cpu: dropped 2 kept" in warned[0], warned
