"""Loading one rank: its memory (peak growth <= 1.3x its share), where each tensor lands, the fit check before
loading, and a rank killed while loading named by its signal.

References: the checkpoint files read with safetensors and sliced by hand; shares and KV-cache sizes computed
by hand from the shapes (Llama-2-7B's 6,738,415,616 parameters are its published count); the loader this
project had before (a state dict, then fused by concatenation), reproduced here, for a peak the test must catch.
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

from vicuna_bench import fit
from vicuna_bench.config import ModelArgs
from vicuna_bench.errors import EngineError, UserError
from tests.specs import spec_for
from vicuna_bench.runtime import Engine, build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# A mid-size checkpoint: 67.8 M parameters, 271 MB in fp32, few layers so that one layer is a large part of it.
MID = dict(hidden=1024, layers=4, heads=8, intermediate=2816, vocab=8000)


# Run in a fresh process: its anonymous memory is the loader's alone.  MALLOC_MMAP_THRESHOLD_ fixes glibc's
# threshold, so a freed tensor goes back to the kernel at once: the peak is what was live together, not what
# glibc kept cached from an earlier load.


def test_each_tensor_lands_in_its_rows(tiny_models):
    """Rank 3 of 4 (GQA, tied, vocabulary padded) in bf16: fused q/k/v and gate/up rows, the replicated key/value
    head, the embedding's last rows and zero padding, each equal to the file's slice converted to bf16."""
    from safetensors import safe_open

    path = tiny_models["gqa"]  # hidden 64, 8 heads of 8, 2 key/value heads, intermediate 128, vocab 777, tied
    spec = spec_for(str(path), 4, "cpu", "bf16", 64)
    model = build_rank_model(spec, 3, TensorParallel(), torch.device("cpu"))
    f = safe_open(str(path / "model.safetensors"), framework="pt")

    def ref(name, rows=slice(None), cols=slice(None)):
        return f.get_tensor(name)[rows, cols].to(torch.bfloat16)

    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv = attn.qkv_proj.weight
    assert qkv.dtype == torch.bfloat16 and qkv.shape == (16 + 8 + 8, 64)
    assert torch.equal(qkv[:16], ref("model.layers.1.self_attn.q_proj.weight", slice(48, 64)))  # heads 6, 7
    # 4 ranks over 2 key/value heads: ranks 2 and 3 share head 1 (rows 8..16)
    assert torch.equal(qkv[16:24], ref("model.layers.1.self_attn.k_proj.weight", slice(8, 16)))
    assert torch.equal(qkv[24:32], ref("model.layers.1.self_attn.v_proj.weight", slice(8, 16)))
    assert torch.equal(attn.o_proj.weight, ref("model.layers.1.self_attn.o_proj.weight", cols=slice(48, 64)))
    assert torch.equal(mlp.gate_up_proj.weight[:32], ref("model.layers.1.mlp.gate_proj.weight", slice(96, 128)))
    assert torch.equal(mlp.gate_up_proj.weight[32:], ref("model.layers.1.mlp.up_proj.weight", slice(96, 128)))
    assert torch.equal(mlp.down_proj.weight, ref("model.layers.1.mlp.down_proj.weight", cols=slice(96, 128)))
    embed = model.model.embed_tokens.weight  # 780 padded rows / 4 = 195 a rank; rank 3: 585..777 + 3 zero rows
    assert embed.shape == (195, 64)
    assert torch.equal(embed[:192], ref("model.embed_tokens.weight", slice(585, 777)))
    assert not embed[192:].any()
    assert model.lm_head.weight is embed
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, f.get_tensor("model.layers.0.input_layernorm.weight").to(torch.bfloat16))


def test_a_shape_that_disagrees_with_the_config_is_a_user_error(tmp_path):
    from tests import tiny

    path = tiny.make_tiny_llama(tmp_path / "m", tiny.GQA, seed=2)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 192  # the weights have 128
    (path / "config.json").write_text(json.dumps(cfg))
    spec = spec_for(str(path), 1, "cpu", "fp32", 64)
    with pytest.raises(UserError, match=r"mlp\.gate_proj\.weight' has shape \(128, 64\), expected \(192, 64\)"):
        build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


# ---------------------------------------------------------------- the fit check's arithmetic

LLAMA2_7B = ModelArgs(hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                      intermediate_size=11008, vocab_size=32000)
TINY_GQA = ModelArgs(hidden_size=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, intermediate_size=128,
                     vocab_size=777, tie_word_embeddings=True)


def test_llama2_7b_shares_and_kv_caches():
    need = fit.rank_need(LLAMA2_7B, 1, "bf16", 2048)
    assert need.weight_bytes == 6_738_415_616 * 2  # its published parameter count, in bf16
    assert need.kv_bytes == 2 * 32 * 32 * 128 * 2 * 2048 == 1 << 30  # 512 KiB a token
    # 8 ranks: vocabulary 4000 rows each (embedding and head), 4 heads, 1376 intermediate; norms replicated
    layer = 3 * 512 * 4096 + 4096 * 512 + 3 * 1376 * 4096 + 2 * 4096
    assert layer == 25_305_088
    eight = fit.rank_need(LLAMA2_7B, 8, "fp16", 2048)
    assert eight.weight_bytes == 2 * (2 * 4000 * 4096 + 32 * layer + 4096) == 1_685_069_824
    assert eight.kv_bytes == (1 << 30) // 8
    big = fit.rank_need(LLAMA2_7B, 2, "fp32", 4096, batch=4)
    assert big.kv_bytes == 2 * 32 * 16 * 128 * 4096 * 4 * 4 == 8 * (1 << 30)
    # runtime: the fixed allowance + one layer's prefill activations in fp32 (hidden x4, q/k/v, gate/up, scores)
    per_token = 4 * 4096 + 96 * 128 + 2 * 11008
    assert need.runtime_bytes == fit.RUNTIME_BYTES["cpu"] + 4 * (2048 * per_token + 32 * 2048 * 2048)
    assert need.total == need.weight_bytes + need.kv_bytes + need.runtime_bytes


def test_tied_gqa_share_with_padding_and_replicated_kv_heads(tiny_models):
    # 4 ranks: 195 vocabulary rows (777 padded to 780), tied so counted once; 2 query heads of 8; one whole
    # key/value head (2 heads over 4 ranks: replicated); 32 intermediate
    layer = 16 * 64 + 2 * 8 * 64 + 64 * 16 + 3 * 32 * 64 + 2 * 64
    assert layer == 9344
    need = fit.rank_need(TINY_GQA, 4, "fp32", 64, batch=3)
    assert need.weight_bytes == 4 * (195 * 64 + 2 * layer + 64) == 124_928
    assert need.kv_bytes == 2 * 2 * 1 * 8 * 64 * 3 * 4 == 24_576
    # the loaded rank holds exactly what was counted
    spec = spec_for(str(tiny_models["gqa"]), 4, "cpu", "fp32", 64)
    model = build_rank_model(spec, 3, TensorParallel(), torch.device("cpu"))
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == need.weight_bytes


def test_too_big_names_the_numbers_and_what_fits():
    gib = 1 << 30
    # fp32 7B on a 20 GiB host: weights 25.1 GiB; bf16 would fit
    with pytest.raises(UserError) as err:
        fit.check_fit(fit.FitCase(LLAMA2_7B, 1, "fp32", 2048, 1, "cpu"), 20 * gib, "20.00 GiB available on the host")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("world size 1, --dtype fp32, --max-seq-len 2048, batch 1: each rank needs ")
    assert "weights 25.10 GiB + KV cache 2.00 GiB" in msg and "but has 20.00 GiB (20.00 GiB available" in msg
    assert "would fit: --dtype bf16" in msg
    # bf16 on a 14 GiB host: the weights (12.55) fit, the KV cache at 4096 (2 GiB) does not; 1024 would
    with pytest.raises(UserError, match=r"would fit: --max-seq-len 1024$"):
        fit.check_fit(fit.FitCase(LLAMA2_7B, 1, "bf16", 4096, 1, "cpu"), 14 * gib, "host")
    # on devices a larger world size splits the weights over more memory
    with pytest.raises(UserError, match=r"would fit: --world-size 4/8"):
        fit.check_fit(fit.FitCase(LLAMA2_7B, 2, "fp16", 2048, 1, "cuda"), 5 * gib, "free on cuda:0",
                      device_count=8)
    with pytest.raises(UserError, match=r"nothing fits here: the weights alone are 12\.55 GiB in bf16"):
        fit.check_fit(fit.FitCase(LLAMA2_7B, 1, "bf16", 2048, 1, "cpu"), 4 * gib, "host")
    fits = fit.check_fit(fit.FitCase(LLAMA2_7B, 1, "bf16", 2048, 1, "cpu"), 16 * gib, "host")
    assert fits.weight_bytes == 13_476_831_232


def _no_process(*args, **kwargs):
    raise AssertionError("a rank process was started")


def test_refused_before_any_rank_starts(tiny_models, monkeypatch):
    """2 ranks on a host with 400 MiB available: each needs the runtime allowance (256 MiB) and gets 200."""
    import torch.multiprocessing

    spec = spec_for(str(tiny_models["vicuna"]), 2, "cpu", "fp32", 64)
    monkeypatch.setattr(fit, "host_available_bytes", lambda: 400 << 20)
    monkeypatch.setattr(torch.multiprocessing, "get_context", _no_process)
    with pytest.raises(UserError, match=r"each rank needs 0\.2\d GiB .* but has 0\.20 GiB \(0\.39 GiB available on "
                                        r"the host / 2 ranks\); would fit: --world-size 1$"):
        Engine(spec)


def test_cli_refuses_with_one_line_and_exit_2(tiny_models, monkeypatch, capsys):
    import torch.multiprocessing

    from vicuna_bench.cli import main

    monkeypatch.setattr(fit, "host_available_bytes", lambda: 100 << 20)
    monkeypatch.setattr(torch.multiprocessing, "get_context", _no_process)
    code = main(["run", "--model-path", str(tiny_models["vicuna"]), "--world-size", "2", "--device", "cpu",
                 "--dtype", "fp32", "--max-seq-len", "64", "--prompt-ids", "5,6,7", "--compile", "off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.fullmatch(r"vicuna-bench run: error: world size 2, --dtype fp32, --max-seq-len 64, batch 1: each rank "
                        r"needs .* GiB\)? but has 0\.05 GiB .*", err[-1]), err


# ---------------------------------------------------------------- a rank killed while loading


# ---------------------------------------------------------------- the real-size benchmark's checkpoint

def test_bench_load_writes_the_lmsys_layout(tmp_path):
    """benchmarks/bench_load.py make: two zip .bin shards, their index, the legacy config; what each tensor holds
    is what was written (norms ones, matrices N(0, 0.02)), read back through the engine's reader."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from vicuna_bench.checkpoint import TensorReader, read_model_args

    if not hasattr(torch.serialization, "skip_data"):
        pytest.skip(f"bench_load make writes with torch.serialization.skip_data, which torch {torch.__version__} lacks")
    path = tmp_path / "ckpt"
    index = bench_load.make_checkpoint(path, "test")
    h, i, v, layers = 256, 688, 32000, 2
    params = 2 * v * h + layers * (4 * h * h + 3 * i * h + 2 * h) + h
    assert index["metadata"]["total_size"] == 2 * params
    assert sorted(set(index["weight_map"].values())) == ["pytorch_model-00001-of-00002.bin",
                                                          "pytorch_model-00002-of-00002.bin"]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    args = read_model_args(path)
    assert (args.hidden_size, args.n_layers, args.intermediate_size, args.vocab_size) == (h, layers, i, v)
    reader = TensorReader(path)
    assert torch.equal(reader.read("model.layers.1.post_attention_layernorm.weight"), torch.ones(h, dtype=torch.float16))
    q = reader.read("model.layers.1.self_attn.q_proj.weight").float()
    assert q.shape == (h, h) and abs(float(q.std()) - 0.02) < 0.001 and abs(float(q.mean())) < 0.001
    assert bench_load.weight_bytes(path, "bf16") == 2 * params


def test_device_fit_reads_the_devices_free_memory(monkeypatch):
    """CUDA and NPU (torch_npu's mem_get_info(device) -> (free, total), faked): 7B fp16 over 2 ranks on 5 GiB
    devices is refused with the device named; on 16 GiB it fits."""
    from types import SimpleNamespace

    gib = 1 << 30
    free = {"value": 5 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["value"], 141 * gib))
    monkeypatch.setattr(torch, "npu", SimpleNamespace(mem_get_info=lambda device=None: (free["value"], 64 * gib)),
                        raising=False)
    for device in (torch.device("cuda", 1), SimpleNamespace(type="npu", index=0)):
        with pytest.raises(UserError, match=r"has 5\.00 GiB \(5\.00 GiB free on .*\); would fit: --world-size 4/8"):
            fit.check_device_fit(LLAMA2_7B, 2, "fp16", 2048, 1, device, device_count=8)
    free["value"] = 16 * gib
    need = fit.check_device_fit(LLAMA2_7B, 2, "fp16", 2048, 1, torch.device("cuda", 1))
    assert need.runtime_bytes > fit.RUNTIME_BYTES["cuda"]


def test_load_is_recorded_in_rank_info_the_log_and_the_perf_columns(tiny_models, tmp_path):
    """rank_info and the rank log carry the bytes read (the tiny model's parameters in fp32, counted by hand), the
    rate and the peak; perf's columns take the slowest rank's seconds and all ranks' bytes over them."""
    import dataclasses

    from vicuna_bench import perf

    spec = dataclasses.replace(spec_for(str(tiny_models["vicuna"]), 1, "cpu", "bf16", 64),
                               log_dir=str(tmp_path))
    with Engine(spec) as engine:
        info = engine.rank_info[0]
    h, i, v, layers = 64, 128, 1001, 2  # VICUNA_SHAPED: untied, so embedding and head both read
    assert info["load_bytes_read"] == 4 * (2 * v * h + layers * (4 * h * h + 3 * i * h + 2 * h) + h)
    assert info["load_gb_per_s"] == pytest.approx(info["load_bytes_read"] / 1e9 / info["load_s"])
    assert info["load_peak_device_bytes"] is None  # CPU: no device allocator
    log = (tmp_path / "rank0.log").read_text()
    found = re.search(r"loaded rank 0's share in [\d.]+ s: [\d.]+ MiB of weights, 0\.8 MiB read \([\d.]+ GB/s\), "
                      r"peak host memory growth ([\d.]+) MiB", log)
    assert found, log
    # The log and rank_info report the same peak (bytes there, MiB to one decimal here).
    assert isinstance(info["load_peak_host_bytes"], int)
    assert found[1] == f"{info['load_peak_host_bytes'] / 2**20:.1f}", (found[1], info["load_peak_host_bytes"])
    ranks = [dict(load_s=2.0, load_bytes_read=3_000_000_000, load_peak_host_bytes=1 << 30, load_peak_device_bytes=None),
             dict(load_s=4.0, load_bytes_read=5_000_000_000, load_peak_host_bytes=3 << 29, load_peak_device_bytes=None)]
    assert perf.load_columns(ranks) == {"load_s": 4.0, "load_gb_per_s": 2.0, "load_peak_host_mib_per_rank": "1024.0;1536.0",
                                        "load_peak_device_mib_per_rank": ""}
