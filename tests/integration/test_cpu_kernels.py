"""Our CPU kernels in the engine: other ISA builds, logits against the F.linear / SDPA model, one weight copy.

* the AVX2 and AVX-512-without-BF16 paths, built with gcc's -march for those CPUs into a scratch cache (this
  host runs both), against torch.matmul and SDPA;
* eager and compiled logits of the engine with the kernel equal those of the same engine on F.linear (the
  kernel switched off) within 1e-4 of their scale, fp32, world sizes 1 and 2;
* one copy of the weights: the bytes of every live CPU tensor after loading and after compiling and serving
  differ by the KV cache alone; with freezing (the path without the kernel, bf16) the same count sees the
  graphs' own copies.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.unit.test_decode_step import PROMPTS
from vicuna_bench import cpu_kernels
from vicuna_bench.pytest_plugin import make_engine_spec
from vicuna_bench.runtime import Engine

pytestmark = pytest.mark.integration

CHECK = textwrap.dedent("""
    import json, torch
    from vicuna_bench import cpu_kernels
    assert cpu_kernels.load(), cpu_kernels.status()
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in [(1, 576, 960), (3, 77, 9), (8, 1536, 576), (16, 130, 301)]:
            g = torch.Generator().manual_seed(m * k)
            x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
            got = torch.ops.vicuna_bench.small_m_linear(x, w).double()
            ref = torch.matmul(x.double(), w.double().T)
            bound = 1e-5 * torch.matmul(x.double().abs(), w.double().abs().T)
            if dtype == torch.bfloat16:
                bound = bound + 2.0 ** -8 * ref.abs()
            worst[str(dtype)] = max(worst.get(str(dtype), -1e30), ((got - ref).abs() - bound).max().item())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -6)):
        for heads, kv_heads, dim in ((9, 3, 64), (4, 4, 24)):  # the generic path's head sizes too
            g = torch.Generator().manual_seed(heads * dim)
            q = torch.randn(3, heads, 1, dim, generator=g).to(dtype)
            k, v = (torch.randn(3, kv_heads, 37, dim, generator=g).to(dtype) for _ in range(2))
            valid = torch.rand(3, 37, generator=g) < 0.6
            valid[:, 0] = True
            rep = heads // kv_heads
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1),
                attn_mask=valid[:, None, None, :])
            err = (cpu_kernels.decode_attention(q, k, v, valid).double() - ref).abs().max().item()
            worst["attention " + str(dtype)] = max(worst.get("attention " + str(dtype), -1e30), err - tol)
    print(json.dumps({"isa": cpu_kernels.status()["small_m_gemm_isa"], "worst_excess": worst}))
""")


@pytest.mark.parametrize("march, isa", [
    ("haswell", "fp32 avx2, bf16 avx2 (widened)"),
    ("skylake-avx512", "fp32 avx512f, bf16 avx512f (widened)"),
])
def test_other_isa_builds_match_matmul(tmp_path, march, isa):
    """Built for an AVX2-only CPU and for AVX-512 without BF16 (run here: this host has both and more)."""
    env = {**os.environ, "VICUNA_BENCH_CACHE": str(tmp_path), cpu_kernels.ENV_MARCH: march}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == isa
    assert all(excess <= 0 for excess in got["worst_excess"].values()), got
    assert list(tmp_path.glob("kernels/*/libvicuna_bench_cpu.so")), "built into the scratch cache"


def _run(spec, compile_mode: str, kernel: bool, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1" if kernel else "0")
    spec = type(spec)(**{**spec.__dict__, "compile": compile_mode})
    # Worker processes at every world size: each loads (or not) the kernel under the environment set here.
    with Engine(spec, workers=True) as engine:
        used = [info["environment"]["small_m_gemm"] for info in engine.rank_info]
        return engine.generate(PROMPTS, 8, ignore_eos=True, return_logits=True), used


@pytest.mark.parametrize("world_size", [1, 2])
def test_kernel_logits_equal_the_f_linear_model(tiny_models, world_size, monkeypatch):
    """Eager and compiled, with the kernels (GEMM and decode attention): the greedy tokens of the model on F.linear and
    SDPA, logits within 1e-4 of their scale."""
    spec = make_engine_spec(str(tiny_models["gqa"]), world_size, "cpu", "fp32", 64)
    reference, used = _run(spec, "off", False, monkeypatch)
    assert used == [False] * world_size
    for mode in ("off", "on"):
        ours, used = _run(spec, mode, True, monkeypatch)
        assert used == [True] * world_size, mode
        assert ours.output_ids == reference.output_ids, mode
        for a, b in zip(ours.logits, reference.logits):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), mode


def live_cpu_tensor_bytes() -> int:
    """Bytes of the distinct storages of every live real CPU tensor the garbage collector can see.

    Plain tensors and parameters only: the compiler's fake tensors report the sizes of tensors that do not
    exist.  Opaque (mkldnn) tensors, where freezing makes them, count by their element bytes.
    """
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.device.type != "cpu":
            continue
        if obj.is_mkldnn:
            seen[id(obj)] = obj.numel() * obj.element_size()
            continue
        storage = obj.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _growth_after_compiling(spec) -> tuple[int, int, int]:
    """(weight bytes, KV cache bytes, live tensor bytes after compiling and serving - after loading)."""
    from vicuna_bench.model import weight_bytes

    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        model = engine._local.model
        loaded = live_cpu_tensor_bytes()
        engine.generate(PROMPTS, 4, ignore_eos=True)
        served = live_cpu_tensor_bytes()
        return weight_bytes(model), model.kv_pool.held_bytes, served - loaded


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_weight_copy_after_compiling(tiny_models, dtype, monkeypatch):
    """With the kernel: compiling the prefill and decode step adds the KV cache and no weight bytes (within 5% of
    the weights for the graphs' small buffers); the frozen path without it adds at least one more copy."""
    assert cpu_kernels.load()
    spec = make_engine_spec(str(tiny_models["gqa"]), 1, "cpu", dtype, 64)
    weights, kv, growth = _growth_after_compiling(spec)
    assert growth - kv <= 0.05 * weights, (weights, kv, growth)
    if dtype == "bf16":  # the counter sees copies where they exist: freezing's prepacked constants
        monkeypatch.setitem(cpu_kernels._state, "loaded", False)
        torch._dynamo.reset()
        weights, kv, growth = _growth_after_compiling(spec)
        assert growth - kv >= weights, (weights, kv, growth)
