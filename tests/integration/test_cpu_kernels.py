"""Our CPU kernels in the engine: other ISA builds, logits against the F.linear / SDPA model, one weight copy.

* the AVX2 and AVX-512-without-BF16 paths, built with gcc's -march for those CPUs into a scratch cache (skipped
  where this host's CPU flags lack them), and the generic lanes aarch64 runs (built for plain x86-64), against
  torch.matmul and SDPA: bf16 outputs correctly rounded, NaN where SDPA has it;
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

import platform

import pytest
import torch

from tests.unit.test_decode_step import PROMPTS
from vicuna_bench import cpu_kernels
from vicuna_bench.cpu_isa import read_cpu_flags
from tests.specs import spec_for
from vicuna_bench.runtime import Engine

pytestmark = pytest.mark.integration

CHECK = textwrap.dedent("""
    import json, torch
    from vicuna_bench import cpu_kernels
    assert cpu_kernels.load(), cpu_kernels.status()

    def nearest_bf16(ref):  # float64 -> nearest bf16 (ties to even), exactly in float64
        mantissa, exponent = torch.frexp(ref)
        return torch.ldexp(torch.round(mantissa * 256), exponent - 8)

    def excess(got, ref, err):  # fp32: the error beyond err; bf16: 1 if any is outside the roundings of ref -/+ err
        if got.dtype == torch.bfloat16:
            return float(((got.double() < nearest_bf16(ref - err)) | (got.double() > nearest_bf16(ref + err))).any())
        return ((got.double() - ref).abs() - err).max().item()

    def sdpa(q, k, v, valid):
        rep = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1),
            attn_mask=valid[:, None, None, :])

    torch.set_num_threads(2)  # (3 rows, 1 kv head) pairs are then cut into parts and merged
    worst, nan_ok = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in [(1, 576, 960), (2, 96, 40), (1, 77, 33), (2, 45, 17), (3, 77, 9), (5, 50, 7), (6, 64, 13),
                        (7, 33, 11), (8, 1536, 576), (16, 130, 301),
                        (40, 77, 70)]:  # 40 rows: F.linear or the fp32 GEMM
            g = torch.Generator().manual_seed(m * k)
            x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
            got = torch.ops.vicuna_bench.small_m_linear(x, w)
            ref = torch.matmul(x.double(), w.double().T)
            bound = 1e-5 * torch.matmul(x.double().abs(), w.double().abs().T)
            worst[str(dtype)] = max(worst.get(str(dtype), -1e30), excess(got, ref, bound))
        for heads, kv_heads, dim, length in ((9, 3, 64, 37), (4, 4, 24, 37), (4, 1, 64, 300)):
            g = torch.Generator().manual_seed(heads * dim)
            q = torch.randn(3, heads, 1, dim, generator=g).to(dtype)
            k, v = (torch.randn(3, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
            valid = torch.rand(3, length, generator=g) < 0.6
            valid[:, 0] = True
            valid[:, 1] = False  # a hole in every row, NaN further down
            name = "attention " + str(dtype)
            got = cpu_kernels.decode_attention(q, k, v, valid)
            worst[name] = max(worst.get(name, -1e30), excess(got, sdpa(q, k, v, valid), 1e-5))
            # NaN in a valid key (row 0, kv head 0), the query (row 1, head 1), a valid value (row 2, last kv head);
            # NaN in an invalid slot of every row, which is never read
            k[0, 0, 0, 1] = q[1, 1, 0, 2] = v[2, -1, 0, 3] = float("nan")
            ref = sdpa(q, k, v, valid)
            k[:, :, 1] = v[:, :, 1] = float("nan")
            got = cpu_kernels.decode_attention(q, k, v, valid)
            nan_ok[name] = nan_ok.get(name, True) and torch.equal(torch.isnan(got), torch.isnan(ref)) and (
                excess(got.nan_to_num(0.0), ref.nan_to_num(0.0), 1e-5) <= 0)
    print(json.dumps({"isa": cpu_kernels.status()["small_m_gemm_isa"], "worst_excess": worst, "nan_ok": nan_ok,
                      "amx": torch.ops.vicuna_bench.small_m_amx(), "paths": cpu_kernels.paths_record()}))
""")

# gcc -march targets and the /proc/cpuinfo flags of the instructions each lets the compiler use: a host without one
# of them cannot run that build (SIGILL), so its test skips there.
HASWELL_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "popcnt", "abm")
SKYLAKE_AVX512_FLAGS = HASWELL_FLAGS + ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "adx")


def _runs_here(march: str, needs: tuple[str, ...]):
    """pytest.param for a build test of ``march``, skipped where this host's CPU lacks any flag in ``needs``."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return pytest.param(march, needs, marks=pytest.mark.skip(
            reason=f"-march={march} is an x86-64 target; this host is {platform.machine()}"))
    flags = read_cpu_flags()
    missing = [f for f in needs if flags is None or f not in flags]
    if missing:
        why = "CPU flags unknown (no /proc/cpuinfo flags line)" if flags is None else f"CPU lacks {' '.join(missing)}"
        return pytest.param(march, needs, marks=pytest.mark.skip(reason=f"cannot run a -march={march} build: {why}"))
    return pytest.param(march, needs)


ISA_OF = {"haswell": "fp32 avx2, bf16 avx2 (widened)",
          "skylake-avx512": "fp32 avx512f, bf16 avx512f (widened)",
          "x86-64": "fp32 generic, bf16 generic (widened)"}


@pytest.mark.parametrize("march, needs", [
    _runs_here("haswell", HASWELL_FLAGS),
    _runs_here("skylake-avx512", SKYLAKE_AVX512_FLAGS),
    _runs_here("x86-64", ()),  # no AVX2/FMA: the generic lanes and loops that aarch64 builds
])
def test_other_isa_builds_match_matmul(tmp_path, march, needs):
    """Built for an AVX2-only CPU, for AVX-512 without BF16, and for plain x86-64 (the generic path); each run
    here where the CPU has the flags its build needs."""
    isa = ISA_OF[march]
    env = {**os.environ, "VICUNA_BENCH_CACHE": str(tmp_path), cpu_kernels.ENV_MARCH: march}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == isa
    assert all(excess <= 0 for excess in got["worst_excess"].values()), got
    # no bf16 dot product in these builds: a bf16 prefill (the 40-row shape above) takes the fp32 GEMM, or on an AMX
    # host (whose tiles these builds still carry: they are compiled by function target attributes) the AMX GEMM up to
    # 512 rows and the fp32 GEMM above
    prefill = ([{"rows": "17-1024", "path": "AMX GEMM"}, {"rows": "1025+", "path": "fp32 GEMM"}]
               if got["amx"] == "usable" else [{"rows": "17+", "path": "fp32 GEMM"}])
    assert got["paths"]["bf16"][-len(prefill):] == prefill, got["paths"]
    assert got["nan_ok"] == {"attention torch.float32": True, "attention torch.bfloat16": True}, got
    assert list(tmp_path.glob("kernels/*/libvicuna_bench_cpu.so")), "built into the scratch cache"


@pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"}, reason="the AMX path is x86-64 only")
def test_the_amx_less_build_matches_matmul(tmp_path):
    """The same source built for this host without its AMX path (VICUNA_BENCH_CPU_AMX=0, as a compiler without AMX
    would build it): it compiles, says so, takes bf16 rows up to 16 on the vector kernel and matches torch.matmul.
    Above 16 rows a bf16 product goes to ATen where the CPU has a bf16 dot product (avx512_bf16, AMX), else to the
    fp32 GEMM (an AVX2-only host such as the AMD EPYC Zen 3 of docs/PERFORMANCE.md's eighth pass)."""
    env = {**os.environ, "VICUNA_BENCH_CACHE": str(tmp_path), cpu_kernels.ENV_AMX: "0"}
    env.pop(cpu_kernels.ENV_MARCH, None)
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    not_built = "not built (the compiler lacks AMX target attributes, or VICUNA_BENCH_NO_AMX)"
    assert got["amx"] == not_built
    flags = read_cpu_flags() or frozenset()
    prefill = "F.linear" if {"avx512_bf16", "amx_bf16"} & flags else "fp32 GEMM"
    assert got["paths"]["bf16"] == [{"rows": "1-16", "path": "kernel"}, {"rows": "17+", "path": prefill}]
    assert all(excess <= 0 for excess in got["worst_excess"].values()), got
    assert got["nan_ok"] == {"attention torch.float32": True, "attention torch.bfloat16": True}, got
    build_log = next(tmp_path.glob("kernels/*/build.log")).read_text()
    assert "-DVICUNA_BENCH_NO_AMX" in build_log.splitlines()[0]


def test_isa_builds_skip_where_the_cpu_lacks_their_flags(monkeypatch):
    """An AVX2-only host skips the AVX-512 build (not SIGILL), an unknown CPU skips both, a non-x86 host every
    x86 target; each says why."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(sys.modules[__name__], "read_cpu_flags", lambda: frozenset(HASWELL_FLAGS + ("sse2",)))
    assert not _runs_here("haswell", HASWELL_FLAGS).marks
    (skip,) = _runs_here("skylake-avx512", SKYLAKE_AVX512_FLAGS).marks
    assert skip.kwargs["reason"] == ("cannot run a -march=skylake-avx512 build: CPU lacks avx512f avx512cd avx512bw "
                                     "avx512dq avx512vl adx")
    monkeypatch.setattr(sys.modules[__name__], "read_cpu_flags", lambda: None)
    (skip,) = _runs_here("haswell", HASWELL_FLAGS).marks
    assert skip.kwargs["reason"].endswith("CPU flags unknown (no /proc/cpuinfo flags line)")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    (skip,) = _runs_here("x86-64", ()).marks
    assert skip.kwargs["reason"] == "-march=x86-64 is an x86-64 target; this host is aarch64"


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
    spec = spec_for(str(tiny_models["gqa"]), world_size, "cpu", "fp32", 64)
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


def _growth_after_compiling(spec, prompts=PROMPTS) -> tuple[int, int, int]:
    """(weight bytes, KV cache bytes, live tensor bytes after compiling and serving - after loading)."""
    from vicuna_bench.model import weight_bytes

    with Engine(type(spec)(**{**spec.__dict__, "compile": "on"})) as engine:
        model = engine._local.model
        loaded = live_cpu_tensor_bytes()
        engine.generate(prompts, 4, ignore_eos=True)
        served = live_cpu_tensor_bytes()
        return weight_bytes(model), model.kv_pool.held_bytes, served - loaded


@pytest.mark.parametrize("amx_rows", [(0, 0), (1, 16)], ids=["vector", "amx"])
def test_one_weight_copy_on_the_amx_path(tiny_models, amx_rows):
    """bf16 with every decode row on the vector kernel and the prefill on at::linear, then every decode row on the
    AMX tiles (which read the weight as it is stored and pack only x) and a 40-token prefill on the AMX GEMM (which
    packs one panel of weight rows at a time into a small buffer of its thread): compiling and serving adds the KV
    cache and no weight bytes."""
    assert cpu_kernels.load()
    amx = amx_rows != (0, 0)
    if amx and torch.ops.vicuna_bench.small_m_amx() != "usable":
        pytest.skip(f"AMX tiles not usable here: {torch.ops.vicuna_bench.small_m_amx()}")
    chosen = cpu_kernels._state["paths"]
    torch.ops.vicuna_bench.small_m_set_amx_rows(*amx_rows)
    torch.ops.vicuna_bench.small_m_set_amx_gemm(512 if amx else 0)
    try:
        torch._dynamo.reset()
        weights, kv, growth = _growth_after_compiling(spec_for(str(tiny_models["gqa"]), 1, "cpu", "bf16", 64),
                                                      [list(range(5, 45))])
    finally:
        torch.ops.vicuna_bench.small_m_set_amx_rows(*chosen.amx_rows())
        torch.ops.vicuna_bench.small_m_set_amx_gemm(chosen.amx_gemm_rows())
    assert growth - kv <= 0.05 * weights, (weights, kv, growth)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_weight_copy_after_compiling(tiny_models, dtype, monkeypatch):
    """With the kernel: compiling the prefill and decode step adds the KV cache and no weight bytes (within 5% of
    the weights for the graphs' small buffers); the frozen path without it adds at least one more copy."""
    assert cpu_kernels.load()
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", dtype, 64)
    weights, kv, growth = _growth_after_compiling(spec)
    assert growth - kv <= 0.05 * weights, (weights, kv, growth)
    if dtype == "bf16":  # the counter sees copies where they exist: freezing's prepacked constants
        monkeypatch.setitem(cpu_kernels._state, "loaded", False)
        torch._dynamo.reset()
        weights, kv, growth = _growth_after_compiling(spec)
        assert growth - kv >= weights, (weights, kv, growth)
