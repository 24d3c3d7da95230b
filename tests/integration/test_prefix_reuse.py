"""Prefix reuse: a shared prompt prefix prefilled once, its keys/values copied into every row.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_prefix_reuse.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_prefix_reuse import PREFIX, PROMPTS
from tests.specs import spec_for

pytestmark = pytest.mark.integration


def _last_position_logits(engine, prompts, prefix_len: int) -> list[torch.Tensor]:
    res = engine.generate(prompts, 1, ignore_eos=True, return_logits=True, prefix_len=prefix_len)
    return [row[0] for row in res.logits]


@pytest.mark.parametrize("world_size", [1, 2])
def test_engine_prefix_len_matches_full_prefill(tiny_models, world_size):
    from vicuna_bench.runtime import Engine

    spec = spec_for(str(tiny_models["gqa"]), world_size, "cpu", "fp32", 64)
    with Engine(spec, workers=world_size > 1) as engine:
        full = _last_position_logits(engine, PROMPTS, 0)
        reused = _last_position_logits(engine, PROMPTS, len(PREFIX))
        again = _last_position_logits(engine, PROMPTS[2:], len(PREFIX))  # the rank keeps the prefix it made
    for a, b in zip(reused + again, full + full[2:]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_smollm2_prefix_ending_mid_word(smollm2_path):
    """Real tokenizer: the texts' common prefix is "...Answer: cat", ending mid-word (" cathedral", " catalog",
    " cat" are each one token); the common token prefix stops before the word, and reuse gives the full prefill's
    logits."""
    from vicuna_bench.chat import load_tokenizer
    from vicuna_bench.precision.runner import common_prefix_len
    from vicuna_bench.runtime import Engine

    tok = load_tokenizer(smollm2_path)
    head = "The following are multiple choice questions (with answers) about  biology.\n\nWhich is a mammal?\nAnswer:"
    texts = [head + " cathedral", head + " catalog of", head + " cat sat"]
    prompts = [tok(t)["input_ids"] for t in texts]
    shared = common_prefix_len(prompts)
    assert shared == len(tok(head)["input_ids"])  # the common text prefix (head + " cat") ends inside a token
    assert len({p[shared] for p in prompts}) == 3
    spec = spec_for(str(smollm2_path), 1, "cpu", "fp32", 256)
    with Engine(spec) as engine:
        full = _last_position_logits(engine, prompts, 0)
        reused = _last_position_logits(engine, prompts, shared)
    for a, b in zip(reused, full):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
