"""Cutting: shards reassemble bit-exactly; cut and uncut directories compute the same."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vicuna_bench.checkpoint import cut_checkpoint, sha256_file
from vicuna_bench.config import ModelArgs
from tests.specs import spec_for
from vicuna_bench.sharding import valid_world_sizes

pytestmark = pytest.mark.unit

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


@st.composite
def model_and_world(draw):
    n_kv = draw(st.integers(1, 4))
    heads = n_kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4]))
    cfg = {
        "model_type": "llama",
        "hidden_size": draw(st.sampled_from([4, 6, 8])),
        "head_dim": head_dim,
        "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads,
        "num_key_value_heads": n_kv,
        "intermediate_size": draw(st.sampled_from([6, 8, 12, 24])),
        "vocab_size": draw(st.integers(5, 40)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    sizes = valid_world_sizes(ModelArgs.from_dict(cfg), limit=12)
    return cfg, draw(st.sampled_from(sizes))


def _random_checkpoint(directory: Path, cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, inter = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    directory.mkdir(parents=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    return state


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_and_world(), st.integers(0, 2**16))
def test_shards_concatenate_back_bit_exactly(case, seed):
    cfg, ws = case
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "cut"
        original = _random_checkpoint(src, cfg, seed)
        manifest = cut_checkpoint(src, out, ws, progress=False)
        parts = [load_file(str(out / "part_model" / str(r) / "model.safetensors")) for r in range(ws)]
        replicas = max(1, ws // cfg["num_key_value_heads"])
        for name, full in original.items():
            module = name.split(".")[-2]
            if module in COLUMN or module in ROW:
                dim = 0 if module in COLUMN else 1
                ranks = range(ws)
                if module in ("k_proj", "v_proj") and replicas > 1:
                    # ranks sharing a key/value head hold identical copies of it
                    for r in range(ws):
                        assert torch.equal(parts[r][name], parts[r - r % replicas][name])
                    ranks = range(0, ws, replicas)
                rebuilt = torch.cat([parts[r][name] for r in ranks], dim=dim)
            else:  # embedding, lm_head, norms: whole on every rank (vendor layout)
                assert all(torch.equal(p[name], full) for p in parts)
                rebuilt = parts[0][name]
            assert torch.equal(rebuilt, full), name
        for r in range(ws):
            conf = json.loads((out / "part_model" / str(r) / "config.json").read_text())
            assert conf["world_size"] == ws
            assert conf["num_attention_heads"] == cfg["num_attention_heads"]  # full-model values kept
        assert manifest["world_size"] == ws
        for rel, digest in manifest["files"].items():
            assert sha256_file(out / rel) == digest


def test_cut_layout_and_tokenizer(tiny_models, tmp_path):
    out = tmp_path / "cut"
    cut_checkpoint(tiny_models["vicuna"], out, 2, progress=False)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "part_model").iterdir()) == ["0", "1"]
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_other_checkpoint_formats_load_the_same(tiny_models, tmp_path, engine_factory, fmt):
    from tests import tiny

    other = tiny.make_tiny_llama(tmp_path / fmt, tiny.GQA, seed=2, fmt=fmt)
    prompt = [[5, 17, 99, 3]]
    a = engine_factory(spec_for(tiny_models["gqa"], 1, "cpu", "fp32", 64)).generate(prompt, 4, return_logits=True)
    spec = spec_for(other, 1, "cpu", "fp32", 64)
    b = engine_factory(spec).generate(prompt, 4, return_logits=True)
    assert a.output_ids == b.output_ids
    assert torch.equal(a.logits[0], b.logits[0])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_checkpoints_and_compute(tmp_path, engine_factory, dtype):
    from tests import tiny

    from vicuna_bench.runtime import cpu_fp16_matmul

    if dtype == "fp16" and not cpu_fp16_matmul():
        pytest.skip(f"torch {torch.__version__} has no fp16 matrix multiply on CPU (the engine refuses it)")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    path = tiny.make_tiny_llama(tmp_path / dtype, tiny.VICUNA_SHAPED, seed=1, dtype=torch_dtype)
    ref = tiny.hf_model(path, dtype=torch.float32)  # same (rounded) weights, computed in fp32
    prompt = [5, 17, 99, 3, 250, 42]
    ref_logits = tiny.hf_prefill_logits(ref, prompt)[-1]
    for compute in ("fp32", dtype):
        spec = spec_for(path, 1, "cpu", compute, 64)
        result = engine_factory(spec).generate([prompt], 1, return_logits=True)
        tol = 1e-4 if compute == "fp32" else 0.05
        diff = (result.logits[0][0] - ref_logits).abs().max().item()
        assert diff <= tol * ref_logits.abs().max().item(), (compute, diff)
