"""Loading one rank: its memory (peak growth <= 1.3x its share), where each tensor lands, the fit check before.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_loading.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
import pytest
import torch
from tests.unit.test_loading import MID, ROOT
from vicuna_bench.errors import EngineError
from tests.specs import spec_for
from vicuna_bench.runtime import Engine
from vicuna_bench import fit
from vicuna_bench.config import ModelArgs
from vicuna_bench.errors import EngineError, UserError
from vicuna_bench.runtime import Engine, build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.integration


def _write_mid_checkpoint(path: Path, fmt: str) -> Path:
    """A random fp32 Llama checkpoint of shape MID: ``model.safetensors`` or a zip ``pytorch_model.bin``."""
    from safetensors.torch import save_file

    h, i, v = MID["hidden"], MID["intermediate"], MID["vocab"]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=i,
        num_attention_heads=MID["heads"], num_key_value_heads=MID["heads"], num_hidden_layers=MID["layers"],
        vocab_size=v, rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False,
        torch_dtype="float32", bos_token_id=1, eos_token_id=2)))
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "lm_head.weight": torch.randn(v, h, generator=g),
             "model.norm.weight": torch.ones(h)}
    for n in range(MID["layers"]):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def mid_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    return {fmt: _write_mid_checkpoint(root / fmt, fmt) for fmt in ("safetensors", "bin")}


_MEASURE = r"""
import gc, json, sys
import torch
from torch import nn
from vicuna_bench import checkpoint, fit
from vicuna_bench.model import Transformer, weight_bytes
from vicuna_bench.runtime import EngineSpec, load_rank_model
from vicuna_bench.sharding import ShardPlan, TensorParallel

def concat_loader(spec):
    # The loader before this change: a state dict of converted copies, assigned, then fused into new
    # matrices filled from concatenated temporaries, while the state dict still held the parts.
    path = checkpoint.Path(spec.model_path)
    args = checkpoint.read_model_args(path)
    plan = ShardPlan(args, spec.world_size, 0)
    with torch.device("meta"):
        model = Transformer(args, plan, TensorParallel(), spec.max_seq_len)
    dtype = checkpoint.DTYPES[spec.dtype]
    state = {name: t.to(dtype=dtype, copy=True) for name, t in checkpoint.iter_rank_tensors(path, plan)}
    for n, layer in enumerate(model.model.layers):
        p = f"model.layers.{n}."
        for owner, names, fused_name in ((layer.self_attn, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                          "qkv_proj"), (layer.mlp, ("mlp.gate_proj", "mlp.up_proj"), "gate_up_proj")):
            parts = [state[p + name + ".weight"] for name in names]
            fused = nn.Linear(parts[0].shape[1], sum(t.shape[0] for t in parts), bias=False, dtype=dtype)
            with torch.no_grad():
                fused.weight.copy_(torch.cat(parts, dim=0))
            setattr(owner, fused_name, fused)
    model.load_state_dict(state, assign=True, strict=False)  # the rest; the parts stay held by ``state``
    return model

out = []
for i, (path, dtype, world_size, loader) in enumerate(json.loads(sys.argv[1])):
    spec = EngineSpec(path, world_size, "cpu", dtype, 256)
    with fit.LoadPeak(interval_s=0.001) as peak:
        if loader == "concat":
            model = concat_loader(spec)
        else:
            model = load_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))[0]
    share = weight_bytes(model)
    del model
    gc.collect()
    if i > 0:  # the first is a warm-up: one-time costs of the first load are not the loader's
        out.append({"peak": peak.peak_growth, "share": share})
print(json.dumps(out))
"""


def _measure(configs: list) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps([configs[0]] + configs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_peaks_at_the_share_and_the_concatenating_loader_does_not(mid_checkpoints):
    """Peak growth of anonymous memory while one rank loads: <= 1.3x its share, converting fp32 to
    bf16 or not, from safetensors and from a .bin; the loader that concatenates after loading goes past it."""
    st, bin_ = str(mid_checkpoints["safetensors"]), str(mid_checkpoints["bin"])
    configs = [
        [st, "bf16", 1, "new"],   # fp32 file -> bf16
        [st, "fp32", 1, "new"],   # no conversion
        [st, "bf16", 2, "new"],   # rank 0 of 2: slices
        [bin_, "bf16", 1, "new"],  # a pickle (zip) .bin, memory-mapped
        [st, "bf16", 1, "concat"],
        [st, "fp32", 1, "concat"],
    ]
    results = _measure(configs)
    factors = [r["peak"] / r["share"] for r in results]
    print("peak / share:", [f"{x:.3f}" for x in factors])
    h, i, v, layers = MID["hidden"], MID["intermediate"], MID["vocab"], MID["layers"]
    full = 2 * v * h + layers * (4 * h * h + 3 * i * h + 2 * h) + h  # parameters, counted by hand
    assert [r["share"] for r in results] == [2 * full, 4 * full, results[2]["share"], 2 * full, 2 * full, 4 * full]
    for config, factor in zip(configs[:4], factors[:4]):
        assert 0.95 <= factor <= 1.3, (config, factor)  # >= 0.95: the probe does see the weights arrive
    # The old loader held the unfused parts and the fused copies together: about 1 + 0.6 of the share here.
    for config, factor in zip(configs[4:], factors[4:]):
        assert factor > 1.3, (config, factor)


def kill_rank_1(model):
    """Model hook: rank 1 ends itself with SIGKILL, as the kernel's OOM killer would, before it reports ready."""
    if model.plan.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return model


def test_a_rank_killed_while_loading_is_named(tiny_models):
    spec = spec_for(str(tiny_models["vicuna"]), 2, "cpu", "fp32", 64)
    with pytest.raises(EngineError) as err:
        Engine(spec, model_hook=kill_rank_1)
    assert re.fullmatch(
        r"engine failed: worker rank 1 \(pid \d+\) was killed by SIGKILL while loading: likely the kernel's "
        r"out-of-memory killer \(each rank holds 0\.00 GiB of weights in fp32 \+ 0\.00 GiB of KV cache; see dmesg\); "
        r"all workers stopped", str(err.value)), str(err.value)
