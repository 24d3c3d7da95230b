"""Our model against transformers' LlamaForCausalLM on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests import tiny
from vicuna_bench.devices import device_for_rank
from tests.specs import spec_for
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

DECODE_STEPS = 32


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def _assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x logit scale {scale:.3g}"


def _check_model(path, prompt, engine_factory, compile_mode="off"):
    # --compile on: the engine's compiled prefill and step (auto resolves to off for these short runs)
    spec = spec_for(path, 1, "cpu", "fp32", max_seq_len=len(prompt) + DECODE_STEPS + 8, compile=compile_mode)
    ref = tiny.hf_model(path)

    # prefill: logits at every prompt position
    model = build_rank_model(spec, 0, TensorParallel(), device_for_rank("cpu", 0))
    model.setup_caches(1)
    tokens = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    key_valid = torch.ones(1, len(prompt), dtype=torch.bool)
    with torch.inference_mode():
        ours = model(tokens, positions, key_valid, start=0, all_logits=True)[0].float()
    _assert_close_to_scale(ours, tiny.hf_prefill_logits(ref, prompt))

    # prefill + 32 decode steps through the engine: logits and greedy tokens
    ref_tokens, ref_logits = tiny.hf_greedy(ref, prompt, DECODE_STEPS)
    result = engine_factory(spec).generate([prompt], DECODE_STEPS, ignore_eos=True, return_logits=True)
    assert result.output_ids[0] == ref_tokens
    assert result.logits[0].shape == ref_logits.shape
    _assert_close_to_scale(result.logits[0], ref_logits)


@pytest.mark.parametrize("name", ["vicuna", "gqa", "dynamic"])
def test_tiny_models_match_transformers(tiny_models, engine_factory, compile_mode, name):
    path = tiny_models[name]
    vocab = tiny.hf_model(path).config.vocab_size
    _check_model(path, _prompt(vocab, 12, seed=7), engine_factory, compile_mode)


def test_dynamic_rope_really_extends_past_max_positions(tiny_models, engine_factory, tmp_path):
    """The NTK branch runs: up to the native length the dynamic model equals the same weights with plain rope;
    past it (max_position_embeddings 16) its logits differ."""
    import json
    import shutil

    dynamic = tiny_models["dynamic"]
    plain = tmp_path / "plain-rope"
    shutil.copytree(dynamic, plain)
    conf = json.loads((plain / "config.json").read_text())
    theta = (conf.get("rope_parameters") or {}).get("rope_theta", conf.get("rope_theta", 10000.0))
    conf.pop("rope_scaling", None)
    conf["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    conf["max_position_embeddings"] = 64  # only the context check reads it for plain rope
    (plain / "config.json").write_text(json.dumps(conf))
    prompt = _prompt(500, 12, seed=5)
    runs = {}
    for name, path in (("dynamic", dynamic), ("plain", plain)):
        spec = spec_for(path, 1, "cpu", "fp32", max_seq_len=12 + DECODE_STEPS)
        runs[name] = engine_factory(spec).generate([prompt], DECODE_STEPS, ignore_eos=True, return_logits=True)
    ours, plain_logits = runs["dynamic"].logits[0], runs["plain"].logits[0]
    # Token i comes from a forward over 12 + i positions: i <= 4 stays within the native 16.
    native = 16 - 12 + 1
    assert runs["dynamic"].output_ids[0][:native] == runs["plain"].output_ids[0][:native]
    torch.testing.assert_close(ours[:native], plain_logits[:native], rtol=1e-5, atol=1e-5)
    assert (ours[native] - plain_logits[native]).abs().max() > 1e-3  # the NTK base took over at 17 positions
