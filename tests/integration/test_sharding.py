"""Tensor parallelism changes nothing: world sizes agree, and so do batch rows and lone rows."""

from __future__ import annotations

import pytest
import torch

from tests.specs import spec_for

pytestmark = pytest.mark.integration

STEPS = 12


def _prompts(vocab: int) -> list[list[int]]:
    """Batch of 4 with different lengths (so left padding is exercised)."""
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 3, 14, 6)]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.fixture(scope="module")
def runs(tiny_models, engine_factory, compile_mode):
    """Greedy batch generations of both tiny models at world sizes 1, 2, 4, 8 (``--compile`` as given)."""
    out = {}
    for name in ("vicuna", "gqa"):
        vocab = {"vicuna": 1001, "gqa": 777}[name]
        for ws in (1, 2, 4, 8):
            spec = spec_for(tiny_models[name], ws, "cpu", "fp32", max_seq_len=64, compile=compile_mode)
            engine = engine_factory(spec)
            out[name, ws] = engine.generate(_prompts(vocab), STEPS, ignore_eos=True, return_logits=True)
    return out


@pytest.mark.parametrize("ws", [2, 4, 8])
@pytest.mark.parametrize("name", ["vicuna", "gqa"])
def test_world_sizes_agree(runs, compile_mode, name, ws):
    base, other = runs[name, 1], runs[name, ws]
    assert (other.compile_ms > 0) == (compile_mode == "on"), "the engines did not run the --compile mode asked for"
    assert other.output_ids == base.output_ids
    for row, (a, b) in enumerate(zip(other.logits, base.logits)):
        assert a.shape == b.shape
        assert _rel_diff(a, b) <= 1e-5, f"row {row}"


@pytest.mark.parametrize("ws", [1, 2])
def test_batch_rows_equal_lone_rows(tiny_models, engine_factory, runs, ws, compile_mode):
    spec = spec_for(tiny_models["vicuna"], ws, "cpu", "fp32", max_seq_len=64, compile=compile_mode)
    engine = engine_factory(spec)
    batch = runs["vicuna", ws]
    for row, prompt in enumerate(_prompts(1001)):
        alone = engine.generate([prompt], STEPS, ignore_eos=True, return_logits=True)
        assert alone.output_ids[0] == batch.output_ids[row], f"row {row}"
        assert _rel_diff(alone.logits[0], batch.logits[row]) <= 1e-5, f"row {row}"


def test_padded_vocab_never_visible(runs):
    # 1001 and 777 do not divide by 8: the padded rows must not reach outputs.
    assert runs["vicuna", 8].logits[0].shape[-1] == 1001
    assert runs["gqa", 8].logits[0].shape[-1] == 777
    assert max(max(r) for r in runs["vicuna", 8].output_ids) < 1001


@pytest.mark.parametrize("ws", [4, 8])
def test_kv_heads_replicated_beyond_their_count(tiny_models, ws):
    """GQA has 8 query heads over 2 key/value heads: at 4 and 8 ranks each rank holds the one whole key/value head
    its query heads use (head r * 8/ws // 4), value for value as transformers holds it."""
    from tests import tiny
    from vicuna_bench.devices import device_for_rank
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    ref = tiny.hf_model(tiny_models["gqa"])
    head_dim, q_per_kv = 8, 4
    spec = spec_for(tiny_models["gqa"], ws, "cpu", "fp32", max_seq_len=64)
    q_rows = (8 // ws) * head_dim  # the rank's query heads come first in its fused q/k/v rows
    for rank in range(ws):
        model = build_rank_model(spec, rank, TensorParallel(), device_for_rank("cpu", 0))
        kv = rank * (8 // ws) // q_per_kv
        rows = slice(kv * head_dim, (kv + 1) * head_dim)
        for layer, ref_layer in zip(model.model.layers, ref.model.layers):
            qkv = layer.self_attn.qkv_proj.weight
            for ours, proj in ((qkv[q_rows:q_rows + head_dim], "k_proj"),
                               (qkv[q_rows + head_dim:q_rows + 2 * head_dim], "v_proj")):
                torch.testing.assert_close(ours, getattr(ref_layer.self_attn, proj).weight[rows], rtol=0, atol=0)


def test_smollm2_world_sizes_1_and_3(smollm2_path, engine_factory, compile_mode):
    from vicuna_bench.chat import encode_prompt, load_tokenizer

    tok = load_tokenizer(smollm2_path)
    prompts = [encode_prompt(tok, "Name a colour."), encode_prompt(tok, "What is 12 times 12? Explain briefly.")]
    results = {}
    for ws in (1, 3):
        spec = spec_for(smollm2_path, ws, "cpu", "fp32", max_seq_len=256, compile=compile_mode)
        results[ws] = engine_factory(spec).generate(prompts, 8, ignore_eos=True, return_logits=True)
    assert results[3].output_ids == results[1].output_ids
    for a, b in zip(results[3].logits, results[1].logits):
        assert _rel_diff(a, b) <= 1e-5
