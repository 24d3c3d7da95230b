"""Generation semantics: per-row EOS, token choice, chat formatting."""

from __future__ import annotations

import pytest
import torch

from vicuna_bench.chat import VICUNA_SYSTEM, encode_prompt, load_tokenizer
from vicuna_bench.generation import SamplingConfig, select_tokens
from vicuna_bench.errors import UserError
from tests.specs import spec_for

pytestmark = pytest.mark.unit

PROMPTS = [[5, 17, 99, 3], [8, 9], [250, 42, 7, 7, 7, 100]]


def test_each_row_stops_after_its_own_eos(tiny_models, engine_factory):
    engine = engine_factory(spec_for(tiny_models["vicuna"], 1, "cpu", "fp32", 64))
    free = engine.generate(PROMPTS, 10, ignore_eos=True).output_ids
    stop = free[0][2]  # make row 0's third token the end-of-sequence id
    stopped = engine.generate(PROMPTS, 10, eos_ids=[stop]).output_ids
    for row, tokens in enumerate(free):
        expected = tokens[: tokens.index(stop) + 1] if stop in tokens else tokens
        assert stopped[row] == expected, f"row {row}"
    assert len(stopped[0]) == free[0].index(stop) + 1 <= 3


def test_ignore_eos_makes_exactly_n_tokens(tiny_models, engine_factory):
    engine = engine_factory(spec_for(tiny_models["vicuna"], 1, "cpu", "fp32", 64))
    free = engine.generate(PROMPTS, 10, ignore_eos=True).output_ids
    assert [len(t) for t in free] == [10, 10, 10]
    again = engine.generate(PROMPTS, 10, ignore_eos=True, eos_ids=[free[0][0]]).output_ids
    assert again == free


def test_greedy_limits_of_sampling():
    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9], [3.0, 0.0, -1.0, 2.5]])
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(select_tokens(logits, SamplingConfig(temperature=1.0, top_k=1), g), greedy)
    assert torch.equal(select_tokens(logits, SamplingConfig(temperature=1.0, top_p=1e-6), g), greedy)


def test_greedy_picks_the_first_largest_logit():
    # Ties and NaN, by hand: the first of equal maxima; a NaN wins (as argmax, and as transformers' greedy).
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [nan, 1.0, nan, 5.0], [-inf] * 4, [0.5, 0.5, 0.5, 0.5],
                           [0.0, -1.0, 2.0, nan]])
    assert select_tokens(logits, SamplingConfig(), None).tolist() == [1, 0, 0, 0, 3]


def test_sampling_follows_the_softmax():
    # p(token 1) = 3 / (1 + 3) at temperature 1; 4000 draws: 0.75 +- 0.03 (4 sigma)
    logits = torch.log(torch.tensor([[1.0, 3.0]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(1)
    picks = select_tokens(logits, SamplingConfig(temperature=1.0), g)
    assert abs(picks.float().mean().item() - 0.75) < 0.03
    # temperature 0.5 squares the odds: 9 / (1 + 9)
    picks = select_tokens(logits, SamplingConfig(temperature=0.5), g)
    assert abs(picks.float().mean().item() - 0.9) < 0.02


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(2)
    picks = select_tokens(probs.log().repeat(3000, 1), SamplingConfig(temperature=1.0, top_p=0.7), g)
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    assert abs((picks == 0).float().mean().item() - 0.5 / 0.8) < 0.04


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}])
def test_bad_sampling_values(kwargs):
    with pytest.raises(UserError):
        SamplingConfig(**kwargs)


def test_vicuna_v11_format_without_a_chat_template(tiny_models):
    tok = load_tokenizer(tiny_models["vicuna"])
    assert not getattr(tok, "chat_template", None)
    expected = tok(
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: w5 w6 ASSISTANT:"
    )["input_ids"]
    assert encode_prompt(tok, "w5 w6") == expected
    assert expected[0] == 1  # BOS from the Llama-style tokenizer
    assert VICUNA_SYSTEM.endswith("answers to the user's questions.")
    assert encode_prompt(tok, "w5 w6", chat=False) == [1, 5, 6]


def test_prompt_token_outside_vocabulary(tiny_models, engine_factory):
    engine = engine_factory(spec_for(tiny_models["vicuna"], 1, "cpu", "fp32", 64))
    with pytest.raises(UserError, match="token id 1001 is outside the vocabulary"):
        engine.generate([[5, 1001]], 2)
