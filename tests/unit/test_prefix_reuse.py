"""Prefix reuse: a shared prompt prefix prefilled once, its keys/values copied into every row.

Reference: the same prompts generated whole, without the prefix (the
reference path, itself checked against transformers by the conformance
tests).
"""

from __future__ import annotations

import pytest
import torch

from vicuna_bench.generation import PrefixKV, GenerationRequest, generate
from tests.specs import spec_for
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

PREFIX = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
PROMPTS = [PREFIX + [30, 31, 32], PREFIX + [40], PREFIX + [50, 51, 52, 53, 54, 55], PREFIX + [60, 61]]


@pytest.fixture(scope="module", params=["gqa", "dynamic"])
def rank_model(request, tiny_models):
    spec = spec_for(str(tiny_models[request.param]), 1, "cpu", "fp32", 64)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


def test_prefix_reuse_gives_the_whole_prompt_answers(rank_model):
    whole = generate(rank_model, GenerationRequest.make(PROMPTS, 6, ignore_eos=True, return_logits=True))
    prefix = PrefixKV.compute(rank_model, PREFIX)
    reused = generate(rank_model, GenerationRequest.make(PROMPTS, 6, ignore_eos=True, return_logits=True),
                      prefix=prefix)
    assert reused.output_ids == whole.output_ids
    for a, b in zip(reused.logits, whole.logits):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    # The same prefix serves another batch (other rows, another batch size) unchanged.
    again = generate(rank_model, GenerationRequest.make(PROMPTS[1:3], 6, ignore_eos=True), prefix=prefix)
    assert again.output_ids == whole.output_ids[1:3]


def test_dynamic_ntk_beyond_the_native_length_is_prefilled_whole(tiny_models):
    """Dynamic NTK keys depend on the whole prompt's length (max_position_embeddings 16 here): no reuse there."""
    spec = spec_for(str(tiny_models["dynamic"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    long_prompts = [PREFIX + list(range(30, 37)), PREFIX + [40]]  # 18 and 12 tokens
    whole = generate(model, GenerationRequest.make(long_prompts, 4, ignore_eos=True))
    reused = generate(model, GenerationRequest.make(long_prompts, 4, ignore_eos=True),
                      prefix=PrefixKV.compute(model, PREFIX))
    assert reused.output_ids == whole.output_ids


def test_only_the_asked_logit_columns_come_back(rank_model):
    full = generate(rank_model, GenerationRequest.make(PROMPTS[:2], 3, ignore_eos=True, return_logits=True))
    picked = generate(rank_model, GenerationRequest.make(PROMPTS[:2], 3, ignore_eos=True, return_logits=True,
                                                         logit_ids=[7, 3, 99]))
    for a, b in zip(picked.logits, full.logits):
        assert a.shape == (3, 3)
        assert torch.equal(a, b[:, [7, 3, 99]])


def test_a_prompt_that_does_not_extend_the_prefix_is_refused(rank_model):
    prefix = PrefixKV.compute(rank_model, PREFIX)
    with pytest.raises(ValueError, match="prompt 1 does not extend"):
        generate(rank_model, GenerationRequest.make([PROMPTS[0], PREFIX], 2), prefix=prefix)
    with pytest.raises(ValueError, match="prompt 0 does not extend"):
        generate(rank_model, GenerationRequest.make([[99] + PREFIX], 2), prefix=prefix)


# ------------------------------------------------------------------ through the engine, on every rank
