"""Stable KV buffers: one cache set per (batch, length) bucket, kept, reused, and evicted least recently used.

A compiled decode step holds the cache tensors' addresses, so a request that
returns to a bucket must get the very same tensors.  References: the tensors'
``data_ptr`` and identity, set sizes computed by hand from the tiny model's
shape, and the logits of a fresh model for each request.
"""

from __future__ import annotations

import pytest
import torch

from vicuna_bench.errors import UserError
from vicuna_bench.generation import PrefixKV, GenerationRequest, generate
from tests.specs import spec_for
from vicuna_bench.runtime import Engine, build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

# tests/tiny.py GQA: 2 layers, 2 key/value heads, head_dim 64 / 8 = 8, fp32: a set holds k and v per layer.
SET_BYTES_PER_SLOT_ROW = 2 * 2 * 2 * 8 * 4  # (k, v) x layers x kv heads x head_dim x 4 bytes = 256

TWO_ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
ONE_ROW = [[20, 21, 22, 23]]
PREFIX = [11, 12, 13, 14, 15]


def _model(tiny_models, max_seq_len: int = 64):
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", max_seq_len)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


def _caches(model) -> list:
    return [layer.self_attn.cache for layer in model.model.layers]


def _pointers(model) -> list[int]:
    return [t.data_ptr() for c in _caches(model) for t in (c.k, c.v)]


def test_a_bucket_keeps_its_tensors_across_requests_and_bucket_switches(tiny_models):
    model = _model(tiny_models)
    generate(model, GenerationRequest.make(TWO_ROWS, 4, ignore_eos=True))
    two_rows = _pointers(model)
    generate(model, GenerationRequest.make(TWO_ROWS, 4, ignore_eos=True))
    assert _pointers(model) == two_rows
    # Another bucket: its own tensors, the first set kept.
    generate(model, GenerationRequest.make(ONE_ROW, 4, ignore_eos=True))
    one_row = _pointers(model)
    assert model.cache_shape == (1, 64) and not set(one_row) & set(two_rows)
    generate(model, GenerationRequest.make(TWO_ROWS, 4, ignore_eos=True))
    assert _pointers(model) == two_rows
    generate(model, GenerationRequest.make(ONE_ROW, 4, ignore_eos=True))
    assert _pointers(model) == one_row
    # A prefix is computed in caches of its own and leaves the request's set in place.
    PrefixKV.compute(model, PREFIX)
    assert _pointers(model) == one_row and model.cache_shape == (1, 64)


def test_logits_across_bucket_switches_equal_a_fresh_model_per_request(tiny_models):
    """Reused caches hold the previous request's keys: masked, they must change nothing, bit for bit."""
    prefix_prompts = [PREFIX + [30, 31], PREFIX + [40, 41, 42]]
    requests = [(TWO_ROWS, None), (ONE_ROW, None), (prefix_prompts, PREFIX), (TWO_ROWS, None), (ONE_ROW, None),
                (prefix_prompts, PREFIX)]
    model = _model(tiny_models)
    for prompts, prefix in requests:
        fresh = _model(tiny_models)
        expected = generate(fresh, GenerationRequest.make(prompts, 6, ignore_eos=True, return_logits=True),
                            prefix=None if prefix is None else PrefixKV.compute(fresh, prefix))
        got = generate(model, GenerationRequest.make(prompts, 6, ignore_eos=True, return_logits=True),
                       prefix=None if prefix is None else PrefixKV.compute(model, prefix))
        assert got.output_ids == expected.output_ids
        for a, b in zip(got.logits, expected.logits):
            assert torch.equal(a, b)
    assert len(model.kv_pool) == 2  # (2, 64) and (1, 64); the prefix's caches are not pooled


def test_set_size_and_the_default_budget_of_twice_the_largest(tiny_models):
    """Sizes in slot-rows (batch x length) of SET_BYTES_PER_SLOT_ROW bytes each, evictions worked out by hand."""
    model = _model(tiny_models, 256)
    pool = model.kv_pool
    model.setup_caches(1, 64)
    allocated = sum(t.untyped_storage().nbytes() for c in _caches(model) for t in (c.k, c.v))
    assert allocated == 64 * SET_BYTES_PER_SLOT_ROW == pool.held_bytes
    assert pool.budget() == 2 * allocated
    for length in (32, 16, 8):  # the shorter power-of-two buckets of one batch fit beside the largest: 56 <= 64
        model.setup_caches(1, length)
    model.setup_caches(2, 64)  # 128: budget 256; held 120 + 128 = 248 fits
    assert pool.buckets() == [(1, 64), (1, 32), (1, 16), (1, 8), (2, 64)]
    model.setup_caches(3, 64)  # 192: budget 384; 248 + 192 = 440 too much: (1, 64) goes, 376 fits
    assert pool.buckets() == [(1, 32), (1, 16), (1, 8), (2, 64), (3, 64)]
    model.setup_caches(4, 64)  # 256: budget 512; 376 + 256 = 632: evict 32, 16, 8 (576 still) and 128: 448
    assert pool.buckets() == [(3, 64), (4, 64)]
    assert pool.held_bytes == (192 + 256) * SET_BYTES_PER_SLOT_ROW


def test_the_budget_evicts_the_least_recently_used_set(tiny_models):
    model = _model(tiny_models)
    pool = model.kv_pool
    pool.budget_bytes = 3 * 64 * SET_BYTES_PER_SLOT_ROW  # three sets of 64 slot-rows each
    kept = {}
    for shape in [(1, 64), (2, 32), (4, 16)]:
        model.setup_caches(*shape)
        kept[shape] = _caches(model)
    model.setup_caches(1, 64)  # used again: now the most recent
    assert pool.buckets() == [(2, 32), (4, 16), (1, 64)]
    model.setup_caches(8, 8)  # a fourth set: (2, 32), the least recently used, goes
    assert pool.buckets() == [(4, 16), (1, 64), (8, 8)]
    model.setup_caches(1, 64)
    assert all(a is b for a, b in zip(_caches(model), kept[(1, 64)]))
    model.setup_caches(2, 32)  # made anew; (4, 16) goes
    assert not any(a is b for a, b in zip(_caches(model), kept[(2, 32)]))
    assert pool.buckets() == [(8, 8), (1, 64), (2, 32)]


def test_a_zero_budget_keeps_only_the_set_in_use(tiny_models):
    model = _model(tiny_models)
    model.kv_pool.budget_bytes = 0
    model.setup_caches(2, 64)
    model.setup_caches(1, 64)
    assert model.kv_pool.buckets() == [(1, 64)]
    assert generate(model, GenerationRequest.make(ONE_ROW, 3, ignore_eos=True)).output_ids  # the set in use works


def test_the_engine_sets_the_budget(tiny_models):
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64, bind_cpu=False)
    with Engine(type(spec)(**{**spec.__dict__, "kv_cache_budget_mb": 3})) as engine:
        assert engine._local.model.kv_pool.budget_bytes == 3 * 2**20
    with Engine(spec) as engine:
        assert engine._local.model.kv_pool.budget_bytes is None  # the default: twice the largest set
    with pytest.raises(UserError, match="kv_cache_budget_mb=-1 must be >= 0"):
        type(spec)(**{**spec.__dict__, "kv_cache_budget_mb": -1}).validate()


def test_out_of_device_memory_drops_the_kept_sets_and_tries_once_more():
    from vicuna_bench.model import KVCache, KVCachePool

    pool = KVCachePool(budget_bytes=10**9)
    pool.get(1, 8, 1, lambda: [KVCache(1, 1, 8, 4, torch.float32, "cpu")])
    attempts = []

    def make_after_one_oom():
        attempts.append(len(pool))
        if len(attempts) == 1:
            raise getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)(  # torch 2.1: only torch.cuda's
                "CUDA out of memory. Tried to allocate 2.00 GiB")
        return [KVCache(2, 1, 8, 4, torch.float32, "cpu")]

    pool.get(2, 8, 1, make_after_one_oom)
    assert attempts == [1, 0] and pool.buckets() == [(2, 8)]  # the retry ran with the kept set dropped

    def broken():
        raise RuntimeError("shape mismatch")  # not a memory error: raised as it is, nothing dropped

    with pytest.raises(RuntimeError, match="shape mismatch"):
        pool.get(4, 8, 1, broken)
    assert pool.buckets() == [(2, 8)]
