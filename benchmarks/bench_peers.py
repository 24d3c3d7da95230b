"""The peer benchmark: our engine (eager and compiled) against the machine's limits and transformers, in one run.

Measures, on one device with the same weights, prompts and threads:

* read bandwidth (sum over a 256 MB tensor) and copy bandwidth;
* the matmul rate (n^3 in the run's dtype: 2048, or less where a call would take over a second);
* our engine, ``--compile off`` and ``on``: first-token and next-token ms;
* transformers ``generate``: the same, from per-step timestamps;
* llama.cpp (``llama-cpp-python``) when installed and ``--gguf`` names the
  same weights as a GGUF file: at ``--batch B``, B parallel sequences in one
  context (llama.cpp's own batching, as its ``batched-bench`` does; KV cache
  f16, its default, no flash attention, n_batch 512); at B > 1 it also
  checks that sequence 0's greedy tokens equal a batch-1 context's.

This host's speed drifts between minutes (memory bandwidth shared with
other tenants), so engines timed one after another are compared at
different moments.  With ``--rounds R`` (R > 1) our modes, transformers
and llama.cpp are opened and warmed once, then timed in alternation: each
round runs each of ours ``--repeat`` times, then transformers, then
llama.cpp.  Each column's figures are medians over every run of every round
(its per-round medians kept as ``rounds``); for each of our modes,
``versus_llama_cpp`` and ``versus_transformers`` hold the ratio ours / peer
in each round, their median and in how many rounds ours was faster.

With ``--without-kernels`` (and ``--rounds``), each of our compile modes also runs without our CPU kernels
(``VICUNA_BENCH_CPU_KERNELS=0``: bf16 on inductor's frozen, prepacked oneDNN GEMMs, fp32 on its micro-GEMMs) in
a spawned process that opens its engine once and times on request, alternated in the same rounds; its
column is ``<mode>, no kernels`` and ``versus_without_kernels`` holds ours / it by round (refused, exit 2,
where our kernels are not loaded here either: nothing to compare).  The kernels are
loaded once a process, so this is the only way to alternate the two: comparing each with llama.cpp in runs
minutes apart misleads, as llama.cpp's speed on a drifting host does not follow ours (docs/PERFORMANCE.md,
fifteenth pass).

With ``--memory``, each of our compile modes also runs in a fresh process
that reports its resident-set growth over the process before the model was
loaded, against weights + KV cache (the CPU counterpart of the allocator
peak a GPU run reports).

Prints next-token ms / the decode floor (weight + KV bytes per step over
the read bandwidth), ours / transformers, and prefill GFLOP/s against the
matmul rate.  Never run it beside other busy processes: two torch
processes on a small machine slow each other several times.

    python benchmarks/bench_peers.py                       # embedded SmolLM2-135M, fp32, 256 in / 64 out
    python benchmarks/bench_peers.py --dtype bf16 --batch 8 --seq-in 1024 --json out.json
    python benchmarks/bench_peers.py --dtype bf16 --compile on --gguf /work/gguf/smollm2-bf16.gguf --rounds 5

llama.cpp and the GGUF files (llama-cpp-python 0.3.36 built from its sdist,
~5 min on 2 cores; the converter and its ``gguf-py`` come in that sdist)::

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/llsdist
    tar xzf /tmp/llsdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/llsdist
    cd /tmp/llsdist/llama_cpp_python-0.3.36/vendor/llama.cpp
    M=$(python -c "from vicuna_bench.spec import ModelChoices as C, resolve_engine_spec as r; print(r(C(None, 1, 'cpu', 'fp32', 64)).model_path)")
    PYTHONPATH=gguf-py python convert_hf_to_gguf.py $M --outtype f32 --outfile /work/gguf/smollm2-f32.gguf
    PYTHONPATH=gguf-py python convert_hf_to_gguf.py $M --outtype bf16 --outfile /work/gguf/smollm2-bf16.gguf
    python benchmarks/bench_peers.py --dtype bf16 --batch 8 --gguf /work/gguf/smollm2-bf16.gguf

Under ``benchmarks/emulate_host.py KIND`` the llama.cpp column needs a build of
that kind (a native build on a bigger host uses what the kind lacks, and the
run stops with exit 2 naming the features); for ``avx2``, into a folder of
its own::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      .venv/bin/pip install --no-deps --target /work/llama-avx2 /tmp/llsdist/llama_cpp_python-0.3.36.tar.gz
    PYTHONPATH=/work/llama-avx2 python benchmarks/emulate_host.py avx2 -- \
      python benchmarks/bench_peers.py --gguf /work/gguf/smollm2-f32.gguf --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vicuna_bench import checkpoint, cpu_isa, cpu_kernels
from vicuna_bench.runtime import Engine, usable_cpus
from vicuna_bench.spec import ModelChoices, resolve_engine_spec


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s read by a sum over an ``nbytes`` float32 tensor (best of ``repeats``)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def matmul_size(seconds_at_256: float, largest: int = 2048, budget_s: float = 1.0) -> int:
    """The largest power-of-two n <= ``largest`` (256 at least) whose n x n x n matmul should take at most
    ``budget_s`` a call, from one call's time at n = 256 (the time grows as n cubed).

    ATen's bf16 GEMM on a CPU without a bf16 dot product can be hundreds of times slower than fp32 (an AVX2 AMD
    EPYC: 0.31 GFLOP/s, a minute for each 2048 call), and the figure is only a reference for the prefill's rate."""
    n = 256
    while n * 2 <= largest and seconds_at_256 * (n * 2 / 256) ** 3 <= budget_s:
        n *= 2
    return n


def matmul_rate(dtype: torch.dtype, largest: int = 2048, repeats: int = 3) -> tuple[float, int]:
    """FLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``) and n: ``largest``, or smaller where a call
    of that size would take more than a second (:func:`matmul_size`)."""
    def timed(a, b) -> float:
        t = time.perf_counter()
        a @ b
        return time.perf_counter() - t

    small = torch.randn(256, 256).to(dtype)
    small @ small
    n = matmul_size(timed(small, small), largest)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / min(timed(a, b) for _ in range(repeats)), n


def cpu_flags() -> list[str]:
    """The host's matrix flags as the package decides by them (an emulated host kind's, under
    ``benchmarks/emulate_host.py``), in /proc/cpuinfo's order."""
    flags = cpu_isa.host_flags()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
                return [f for f in line.split(":", 1)[1].split() if f in wanted and flags and f in flags]
    except OSError:
        pass
    return []


def prompts_for(vocab: int, batch: int, seq_in: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq_in), generator=g).tolist()


def median_figures(runs) -> dict:
    """First/next-token ms: the median of each over ``runs``, a list of (first_ms, next_ms)."""
    return {"first_token_ms": statistics.median(r[0] for r in runs),
            "next_token_ms": statistics.median(r[1] for r in runs)}


def timed_generations(engine, prompts, seq_out: int, repeat: int) -> list[tuple[float, float]]:
    """(first_ms, next_ms) of ``repeat`` generations of ``prompts`` on an open engine, in order."""
    runs = [engine.generate(prompts, seq_out, ignore_eos=True) for _ in range(repeat)]
    return [(r.first_token_ms, r.next_token_ms) for r in runs]


class OursTimer:
    """Our engine opened and warmed once (compiling happens in the warm-up); :meth:`run` times generations."""

    def __init__(self, spec, prompts, seq_out: int):
        self.prompts, self.seq_out = prompts, seq_out
        self.engine = Engine(spec)
        try:
            warm = self.engine.generate(prompts, seq_out, ignore_eos=True)
        except BaseException:
            self.engine.close()
            raise
        self.compile_s = warm.compile_ms / 1e3

    def run(self, repeat: int) -> list[tuple[float, float]]:
        """(first_ms, next_ms) of ``repeat`` generations, in order."""
        return timed_generations(self.engine, self.prompts, self.seq_out, repeat)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The environment of the "no kernels" column's process: our CPU kernels off (read when the process first loads them).
KERNELS_OFF = {cpu_kernels.ENV_SWITCH: "0"}


def _child_timer(conn, spec, prompts, seq_out: int, threads: int) -> None:
    """A spawned process's loop for :class:`ChildTimer`: open and warm the engine, say ("ready", figures), then
    answer each ``repeat`` sent with ("runs", [(first_ms, next_ms), ...]) until None; a failure is ("error", line).
    Its environment is the one :class:`ChildTimer` started it with."""
    from vicuna_bench.errors import first_line

    try:
        torch.set_num_threads(threads)
        timer = OursTimer(spec, prompts, seq_out)
    except BaseException as err:  # noqa: BLE001 - said to the parent in one line
        conn.send(("error", f"{type(err).__name__}: {first_line(err)}"))
        return
    with timer:
        conn.send(("ready", {"compile_s": timer.compile_s, "kernels": cpu_kernels.status()}))
        while (repeat := conn.recv()) is not None:
            try:
                conn.send(("runs", timer.run(repeat)))
            except BaseException as err:  # noqa: BLE001
                conn.send(("error", f"{type(err).__name__}: {first_line(err)}"))
                return


class ChildTimer:
    """:class:`OursTimer` in a spawned process whose environment adds ``env``: opened and warmed once, then
    :meth:`run` times generations there while this process waits, so it alternates with in-process timers without
    two busy processes at once.  ``info`` holds the environment and the child's word on our CPU kernels."""

    def __init__(self, spec, prompts, seq_out: int, threads: int, env: dict):
        import multiprocessing
        from unittest import mock

        self.env = dict(env)
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        # spawn hands the child this process's environment as it is at start: the switches hold from its imports on
        with mock.patch.dict(os.environ, self.env):
            self.process = ctx.Process(target=_child_timer, args=(theirs, spec, prompts, seq_out, threads),
                                       daemon=True)
            self.process.start()
        theirs.close()
        try:
            ready = self._answer("ready")
        except BaseException:
            self.close()
            raise
        self.compile_s = ready["compile_s"]
        self.info = {"env": self.env, **ready["kernels"]}

    def _answer(self, kind: str):
        what = "the engine in a child process (" + " ".join(f"{k}={v}" for k, v in self.env.items()) + ")"
        try:
            got, value = self.conn.recv()
        except EOFError:
            self.process.join(10)
            raise RuntimeError(f"{what} exited with code {self.process.exitcode}") from None
        if got == "error":
            raise RuntimeError(f"{what} failed: {value}")
        assert got == kind, (got, kind)
        return value

    def run(self, repeat: int) -> list[tuple[float, float]]:
        """(first_ms, next_ms) of ``repeat`` generations in the child, in order."""
        self.conn.send(repeat)
        return [tuple(r) for r in self._answer("runs")]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(60)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ours(spec, prompts, seq_out: int, repeat: int) -> dict:
    """First/next-token ms of our engine (median over ``repeat`` runs after one warm-up)."""
    with OursTimer(spec, prompts, seq_out) as timer:
        runs = timer.run(repeat)
    return {**median_figures(runs), "compile_s": timer.compile_s}


def _memory_probe(spec, prompts, seq_out: int, threads: int) -> dict:
    """Run in a fresh process: RSS growth over the pre-load process while loading (+ compiling) and while serving.

    Serving = one timed generation after the warm-up, peak reset in between
    (``/proc/self/clear_refs``), as the figures of a perf run are taken.
    """
    from vicuna_bench import devices
    from vicuna_bench.compile import compiled_steps
    from vicuna_bench.generation import EAGER, GenerationRequest, generate
    from vicuna_bench.model import weight_bytes
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    steps = compiled_steps("cpu", 1, spec.dtype) if spec.compile == "on" else EAGER
    compiler = 0
    if steps is not EAGER:
        from torch._inductor import config as _inductor  # noqa: F401  (loaded before the baseline: not model memory)
        compiler = compiler_rss_bytes(spec.dtype)
    base = devices.proc_status_bytes("VmRSS")
    if base is None:
        raise RuntimeError("--memory reads /proc/self/status (Linux only)")
    devices.reset_peak_memory(cpu)
    model = build_rank_model(spec, 0, TensorParallel(), cpu)
    # Eager: dynamo is not imported, and is not loaded after the baseline to count nothing.
    cache = inductor_cache_counts() if steps is not EAGER else {"hit": 0, "miss": 0}
    generate(model, GenerationRequest.make(prompts, seq_out, ignore_eos=True), steps=steps)  # warm-up: compiles here
    if steps is not EAGER:
        cache = {key: count - cache[key] for key, count in inductor_cache_counts().items()}
    load_peak = devices.peak_memory_bytes(cpu)
    devices.reset_peak_memory(cpu)
    generate(model, GenerationRequest.make(prompts, seq_out, ignore_eos=True), steps=steps)
    serve_peak = devices.peak_memory_bytes(cpu)
    weights = weight_bytes(model)
    kv = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("cache.k", "cache.v")))
    return {
        "baseline_rss_bytes": base, "weight_bytes": weights, "kv_cache_bytes": kv,
        "load_peak_growth_bytes": load_peak - base, "serve_peak_growth_bytes": serve_peak - base,
        "serve_over_weights_kv": (serve_peak - base) / (weights + kv),
        "load_over_weights_kv": (load_peak - base) / (weights + kv),
        # The compiler's own code and state, loaded before the baseline: counted here, apart from the model's.
        "compiler_rss_bytes": compiler,
        # How the graphs were made: compiled anew (a cold inductor cache: more stays resident, PERFORMANCE.md
        # "Seventh pass") or loaded from the cache.
        "graphs_compiled": cache["miss"], "graphs_from_cache": cache["hit"],
        "serve_over_weights_kv_with_compiler": (serve_peak - base + compiler) / (weights + kv),
    }


def inductor_cache_counts() -> dict:
    """Inductor's FX graph cache and our decode step's AOTInductor packages so far in this process: {"hit": graphs
    loaded, "miss": graphs compiled}.  A prefill graph compiled in a forked child (vicuna_bench.apart) is a miss
    there and a hit here: counted once, as compiled."""
    from torch._dynamo.utils import counters

    from vicuna_bench import aoti
    from vicuna_bench.compile import CHILD_GRAPHS

    return {"hit": counters["inductor"]["fxgraph_cache_hit"] - CHILD_GRAPHS["miss"] + aoti.COUNTS["loaded"],
            "miss": counters["inductor"]["fxgraph_cache_miss"] + CHILD_GRAPHS["miss"] + aoti.COUNTS["compiled"]}


def compiler_rss_bytes(dtype: str) -> int:
    """RSS that compiling a one-op function adds to this process: dynamo, inductor's code generation and what they
    import, a fixed cost of ``--compile on`` whatever the model, measured so that the model's own growth is
    reported apart from it.  Compiled as the engine compiles (its CPU options and decode mode, static and dynamic
    shapes), so the same code paths are loaded."""
    from vicuna_bench import devices
    from vicuna_bench.compile import CPU_DECODE_MODE, cpu_inductor_options, release_freed_heap, under_inductor_options

    before = devices.proc_status_bytes("VmRSS")
    options = cpu_inductor_options(1, dtype)
    for mode, dynamic in ((CPU_DECODE_MODE, False), (None, True)):
        one_op = under_inductor_options(torch.compile(lambda x: x * 2, mode=mode, dynamic=dynamic), **options)
        one_op(torch.ones(8))
    release_freed_heap()
    return max(0, devices.proc_status_bytes("VmRSS") - before)


def memory(spec, prompts, seq_out: int, threads: int) -> dict:
    """:func:`_memory_probe` in a fresh (spawned) process, so no other engine's memory is counted."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_memory_probe, spec, prompts, seq_out, threads).result()


class TransformersTimer:
    """transformers' ``generate`` on the same weights, loaded and warmed once; :meth:`run` times generations from a
    timestamp per step (a logits processor)."""

    def __init__(self, path: str, dtype: torch.dtype, prompts, seq_out: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.eval()
        self.model.generation_config.eos_token_id = None
        self.ids, self.seq_out = torch.tensor(prompts), seq_out
        self.once()

    def once(self) -> tuple[float, float]:
        from transformers import LogitsProcessor, LogitsProcessorList

        class Stamp(LogitsProcessor):
            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        stamp = Stamp()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=self.seq_out,
                                min_new_tokens=self.seq_out, do_sample=False, pad_token_id=0,
                                logits_processor=LogitsProcessorList([stamp]))
        t = [start] + stamp.times
        steps = [(b - a) * 1e3 for a, b in zip(t[1:], t[2:])]
        return (t[1] - t[0]) * 1e3, statistics.mean(steps) if steps else 0.0

    def run(self, repeat: int) -> list[tuple[float, float]]:
        return [self.once() for _ in range(repeat)]

    def close(self) -> None:
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def transformers_generate(path: str, dtype: torch.dtype, prompts, seq_out: int, repeat: int) -> dict:
    """First/next-token ms of transformers ``generate`` (median over ``repeat`` runs after one warm-up)."""
    with TransformersTimer(path, dtype, prompts, seq_out) as timer:
        return median_figures(timer.run(repeat))


class GGUFUnusable(Exception):
    """The --gguf file passed the magic check but llama.cpp would not load it."""


# llama.cpp's CPU features as llama_print_system_info() names them ("AVX2 = 1 | ..."), and the /proc/cpuinfo flag
# each needs; the rest of what it prints (LLAMAFILE, OPENMP, REPACK) are not instruction sets.
GGML_FEATURE_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2",
                      "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                      "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}
# GGUF general.file_type values whose weights are not quantized (llama.h: ALL_F32 0, MOSTLY_F16 1, MOSTLY_BF16 32),
# and the features ggml uses on quantized weights only, so that a build with them runs such a file without them:
# int8 dot products (AVX_VNNI and AVX512_VNNI's dpbusd, in ggml-cpu/arch/x86/quants.c and repack.cpp) and the AMX
# kernels (ggml-cpu/amx/common.h, qtype_has_amx_kernels: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS).
UNQUANTIZED_FILE_TYPES = {0, 1, 32}
QUANTIZED_ONLY_FEATURES = {"AVX_VNNI", "AVX512_VNNI", "AMX_INT8"}


def ggml_features(system_info: str) -> list[str]:
    """The features llama_print_system_info() says are on (``NAME = 1``), in its order."""
    out = []
    for part in system_info.replace("CPU :", "|").split("|"):
        name, eq, value = part.partition("=")
        if eq and value.strip() == "1":
            out.append(name.strip())
    return out


def llama_cpp_beyond(system_info: str, flags: frozenset[str], file_type: int | None) -> list[str]:
    """The instruction-set features of a llama.cpp build (its system info) that a host with ``flags`` lacks, leaving
    out those ggml runs on quantized weights only where the file (``file_type``) is not quantized."""
    out = []
    for name in ggml_features(system_info):
        flag = GGML_FEATURE_FLAGS.get(name)
        if flag is None or flag in flags or (name in QUANTIZED_ONLY_FEATURES and file_type in UNQUANTIZED_FILE_TYPES):
            continue
        out.append(name)
    return out


def gguf_file_type(lib, model) -> int | None:
    """A loaded model's GGUF ``general.file_type`` (llama_ftype), or None where the file has none."""
    buf = ctypes.create_string_buffer(32)
    n = lib.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
    try:
        return int(buf.value) if n > 0 else None
    except ValueError:
        return None


LLAMA_N_BATCH = 512  # tokens per llama_decode call, as the batch-1 column has always used (Llama(n_batch=512))


def llama_prefill_rows(prompts) -> list[tuple[int, int, int, bool]]:
    """Every prompt as llama.cpp batch rows (token, position, sequence id, wants logits), logits at each prompt's end."""
    return [(tok, pos, seq, pos == len(prompt) - 1)
            for seq, prompt in enumerate(prompts) for pos, tok in enumerate(prompt)]


def llama_step_rows(tokens, positions) -> list[tuple[int, int, int, bool]]:
    """One decode step as batch rows: token ``tokens[s]`` at ``positions[s]`` of sequence ``s``, every row's logits."""
    return [(tok, pos, seq, True) for seq, (tok, pos) in enumerate(zip(tokens, positions, strict=True))]


def chunks(rows: list, size: int) -> list[list]:
    """``rows`` in order, cut into runs of at most ``size`` (how llama.cpp's batched-bench feeds n_batch)."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class LlamaCppContext:
    """One llama.cpp context holding ``n_seq`` parallel sequences, driven through llama-cpp-python's low-level API.

    Settings as ``Llama(n_batch=512, flash_attn=False)`` makes them for batch 1
    (the column's history), plus ``n_seq_max`` sequences with a KV stream
    each (llama.cpp's default, ``kv_unified=False``).
    """

    def __init__(self, lib, model, n_seq: int, n_ctx: int, threads: int):
        self.lib = lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = LLAMA_N_BATCH
        params.n_ubatch = LLAMA_N_BATCH
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} tokens, {n_seq} sequences")
        self.params = params
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        self.batch = lib.llama_batch_init(LLAMA_N_BATCH, 0, 1)

    def clear(self) -> None:
        """Forget every sequence (the KV cache's metadata, as batched-bench does between runs)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), False)

    def decode(self, rows, keep_logits: bool = False) -> dict:
        """Run ``rows`` in n_batch chunks; with ``keep_logits``, a copy of each logits row asked for, by sequence id."""
        import numpy as np

        kept: dict = {}
        b = self.batch
        for part in chunks(rows, LLAMA_N_BATCH):
            for i, (tok, pos, seq, logits) in enumerate(part):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits
            b.n_tokens = len(part)
            ret = self.lib.llama_decode(self.ctx, b)
            if ret != 0:
                raise RuntimeError(f"llama_decode returned {ret} on {len(part)} rows")
            self.lib.llama_synchronize(self.ctx)
            if keep_logits:  # read before the next chunk's decode overwrites them
                for i, (_, _, seq, logits) in enumerate(part):
                    if logits:
                        row = self.lib.llama_get_logits_ith(self.ctx, i)
                        kept[seq] = np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()
        return kept

    def greedy(self, prompts, steps: int) -> tuple[list[list[int]], list]:
        """Each sequence's ``steps`` greedy tokens after its prompt, and sequence 0's logits row at each of them."""
        self.clear()
        logits = self.decode(llama_prefill_rows(prompts), keep_logits=True)
        out = [[int(logits[s].argmax())] for s in range(len(prompts))]
        seq0 = [logits[0]]
        for step in range(steps - 1):
            rows = llama_step_rows([o[-1] for o in out], [len(p) + step for p in prompts])
            logits = self.decode(rows, keep_logits=True)
            for s, o in enumerate(out):
                o.append(int(logits[s].argmax()))
            seq0.append(logits[0])
        return out, seq0

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)


def load_llama_cpp():
    """llama-cpp-python's low-level module with its logging off, or None when it is not installed."""
    try:
        import llama_cpp as lib
        from llama_cpp import _logger
    except ImportError:
        return None
    _logger.set_verbose(False)  # llama.cpp logs every load to stderr otherwise
    return lib


class LlamaCppTimer:
    """llama.cpp with ``len(prompts)`` parallel sequences in one context, loaded and warmed once; :meth:`run` times it.

    first = the prefill of every prompt (batch x seq_in tokens, n_batch
    chunks); next = the mean of one llama_decode carrying one token per
    sequence, over seq_out - 1 steps; the KV cache cleared before each run.
    Closed after clean use at batch > 1, it checks that sequence 0's greedy
    tokens over ``check_steps`` steps, with every sequence given the same
    prompt, equal a batch-1 context's (``greedy_check``).
    """

    def __init__(self, lib, gguf: str, prompts, seq_out: int, threads: int, check_steps: int = 8):
        self.lib, self.prompts, self.seq_out, self.threads, self.check_steps = lib, prompts, seq_out, threads, check_steps
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if not self.model:
            raise GGUFUnusable(f"--gguf {gguf}: llama.cpp could not load it as a model")
        self.batch, self.seq_in = len(prompts), len(prompts[0])
        # llama.cpp rounds each sequence's KV stream up to 256 cells (and warns when n_ctx / n_seq_max is not so)
        self.per_seq = -(-(self.seq_in + max(seq_out, check_steps) + 8) // 256) * 256
        self.info = {"batch": self.batch, "llama_cpp_python": lib.__version__, "gguf": str(gguf),
                     "n_batch": LLAMA_N_BATCH, "n_ctx": self.batch * self.per_seq, "flash_attn": False,
                     "kv_unified": False, "system_info": lib.llama_print_system_info().decode(errors="replace").strip(),
                     "file_type": gguf_file_type(lib, self.model)}
        self.greedy_check: dict | None = None
        self.ctx = None
        try:
            self._refuse_a_build_beyond_the_emulated_kind()
            self.ctx = LlamaCppContext(lib, self.model, self.batch, self.batch * self.per_seq, threads)
            self._prefill = llama_prefill_rows(prompts)
            self._once()
        except BaseException:
            self.close(check=False)
            raise

    def _refuse_a_build_beyond_the_emulated_kind(self) -> None:
        """Under ``emulate_host.py``: a llama.cpp that uses what the emulated kind lacks would not be that kind's
        peer (GGUFUnusable, naming the features)."""
        emu = cpu_isa.emulation()
        if emu is None:
            return
        beyond = llama_cpp_beyond(self.info["system_info"], cpu_isa.host_flags() or frozenset(), self.info["file_type"])
        if beyond:
            raise GGUFUnusable(
                f"llama.cpp ({self.lib.__file__}) is built with {', '.join(beyond)}, which the emulated {emu.kind} "
                f"host lacks: build llama-cpp-python for that kind into a folder of its own and put it first on "
                f"PYTHONPATH (bench_peers' docstring), or leave out --gguf")

    def _once(self) -> tuple[float, float]:
        fixed = [3] * self.batch  # a fixed token: greedy choice is not what is timed
        self.ctx.clear()
        t = time.perf_counter()
        self.ctx.decode(self._prefill)
        first = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        for step in range(self.seq_out - 1):
            self.ctx.decode(llama_step_rows(fixed, [self.seq_in + step] * self.batch))
        return first, (time.perf_counter() - t) * 1e3 / max(1, self.seq_out - 1)

    def run(self, repeat: int) -> list[tuple[float, float]]:
        """(first_ms, next_ms) of ``repeat`` runs, in order."""
        return [self._once() for _ in range(repeat)]

    def close(self, check: bool = True) -> None:
        """Free the context and the model; first, with ``check`` at batch > 1, the greedy check."""
        if self.model is None:
            return
        check = check and self.batch > 1 and self.ctx is not None
        try:
            if self.ctx is not None:
                try:
                    if check:
                        same = [self.prompts[0][:64]] * self.batch
                        batched, batched_logits = self.ctx.greedy(same, self.check_steps)
                finally:
                    self.ctx.close()
                    self.ctx = None
            if check:
                single = LlamaCppContext(self.lib, self.model, 1, self.per_seq, self.threads)
                try:
                    alone, alone_logits = single.greedy(same[:1], self.check_steps)
                finally:
                    single.close()
                self.greedy_check = {
                    "steps": self.check_steps, "prompt_tokens": len(same[0]), "batch_1": alone[0],
                    "batch_seq_0": batched[0], "seq_0_agrees": batched[0] == alone[0],
                    "every_seq_agrees": all(b == alone[0] for b in batched),
                    "seq_0_max_abs_logit_diff": max(float(abs(a - b).max())
                                                    for a, b in zip(alone_logits, batched_logits)),
                }
        finally:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(check=exc_type is None)  # after a failure, free only


def llama_cpp(gguf: str, prompts, seq_out: int, threads: int, repeat: int = 3, check_steps: int = 8) -> dict | None:
    """First/next-token ms of llama.cpp (:class:`LlamaCppTimer`, median over ``repeat`` runs), when installed."""
    lib = load_llama_cpp()
    if lib is None:
        return None
    with LlamaCppTimer(lib, gguf, prompts, seq_out, threads, check_steps) as timer:
        out = {**timer.info, **median_figures(timer.run(repeat))}
    if timer.greedy_check is not None:
        out["greedy_check"] = timer.greedy_check
    return out


# Seconds of idle before each timer's turn in a round.  An OpenMP runtime's threads spin after each parallel region
# before they sleep (libgomp: GOMP_SPINCOUNT pause loops), and llama.cpp's libgomp, torch's own copy and a child
# process's are separate runtimes on the same cores: without a pause, the timer after another engine's turn starts
# beside its spinning threads, and its first token pays for them.  Measured on the 2-core AMX host (CPU time the
# process used while it slept right after): 4-6 ms after a torch matmul, 5-8 ms after a llama.cpp eval, ~0 after
# nothing (docs/PERFORMANCE.md, twenty-second pass).
SETTLE_S = 0.3


def timed_rounds(timers: dict, rounds: int, repeat: int,
                 settle_s: float = SETTLE_S) -> dict[str, list[list[tuple[float, float]]]]:
    """Each timer's (first_ms, next_ms) runs by round: a round runs every timer ``repeat`` times, in ``timers``' order,
    each turn after ``settle_s`` seconds idle."""
    by_round: dict = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            if settle_s > 0:
                time.sleep(settle_s)
            by_round[name].append(timer.run(repeat))
    return by_round


def round_figures(by_round: list[list[tuple[float, float]]]) -> dict:
    """A column's first/next-token ms: the median over every run of every round, and each round's medians (``rounds``)."""
    return {**median_figures([r for runs in by_round for r in runs]),
            "rounds": [median_figures(runs) for runs in by_round]}


def versus_by_round(ours_rounds: list[dict], peer_rounds: list[dict]) -> dict:
    """Ours / peer ms per round for first and next token, the median ratio, and in how many rounds ours took less time."""
    out = {}
    for key in ("first_token_ms", "next_token_ms"):
        ratios = [o[key] / q[key] for o, q in zip(ours_rounds, peer_rounds, strict=True)]
        out[key.removesuffix("_ms")] = {"ratio_by_round": ratios, "median_ratio": statistics.median(ratios),
                                        "faster_rounds": sum(r < 1 for r in ratios), "rounds": len(ratios)}
    return out


def versus_line(what: str, ratios: dict) -> str:
    """One of :func:`versus_by_round`'s figures as a line: each round's ratio, the median, the rounds ours was faster."""
    return (f"{what} by round: {' '.join(f'{r:.2f}' for r in ratios['ratio_by_round'])} "
            f"(median {ratios['median_ratio']:.2f}; faster in {ratios['faster_rounds']} of {ratios['rounds']})")


def interleaved(specs: dict, lib, gguf: str | None, prompts, seq_out: int, threads: int, rounds: int,
                repeat: int, hf: tuple | None = None, children: dict | None = None, settle_s: float = SETTLE_S) -> dict:
    """Columns of our modes (``specs``: column name -> spec), our modes in child processes (``children``: column
    name -> (spec, environment)), transformers (when ``hf`` = (path, dtype)) and llama.cpp (when ``lib``), timed
    in alternation.

    Every engine is opened and warmed first; then each round times each of
    ours ``repeat`` times, then the children's, then transformers, then
    llama.cpp, so a slow minute of a host whose speed drifts touches every
    column alike.  llama.cpp's greedy check runs once, after the last round.
    """
    children = children or {}
    with contextlib.ExitStack() as stack:  # closes in reverse: each in-process engine restores the affinity it saw
        # llama.cpp first: an unloadable GGUF stops the run before anything compiles
        peer = stack.enter_context(LlamaCppTimer(lib, gguf, prompts, seq_out, threads)) if lib is not None else None
        timers = {name: stack.enter_context(OursTimer(spec, prompts, seq_out)) for name, spec in specs.items()}
        for name, (spec, env) in children.items():
            timers[name] = stack.enter_context(ChildTimer(spec, prompts, seq_out, threads, env))
        if hf is not None:
            timers["transformers"] = stack.enter_context(TransformersTimer(*hf, prompts, seq_out))
        if peer is not None:
            timers["llama.cpp"] = peer
        by_round = timed_rounds(timers, rounds, repeat, settle_s)
    columns = {name: {**round_figures(by_round[name]), "compile_s": timers[name].compile_s} for name in specs}
    for name in children:
        columns[name] = {**round_figures(by_round[name]), "compile_s": timers[name].compile_s, **timers[name].info}
    if hf is not None:
        columns["transformers"] = round_figures(by_round["transformers"])
    if peer is not None:
        columns["llama.cpp"] = {**peer.info, **round_figures(by_round["llama.cpp"])}
        if peer.greedy_check is not None:
            columns["llama.cpp"]["greedy_check"] = peer.greedy_check
    return columns


def gguf_problem(path: str) -> str | None:
    """Why ``path`` cannot be a GGUF file (missing, unreadable, no ``GGUF`` magic), or None; checked before timing."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return e.strerror or str(e)
    return None if magic == b"GGUF" else f"not a GGUF file (starts {magic!r}, not b'GGUF')"


def without_kernels_name(name: str) -> str:
    """The column of our mode ``name`` run without our CPU kernels."""
    return f"{name}, no kernels"


def settle_seconds(text: str) -> float:
    """--settle's parser: seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: need seconds >= 0")
    return value


def whole_rounds(text: str) -> int:
    """--rounds' parser: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rounds (a whole number >= 1)")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-in", type=int, default=256)
    p.add_argument("--seq-out", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all this process may use)")
    p.add_argument("--compile", default="off,on", help="our engine's modes to run (default off,on)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--gguf", default=None, help="the same weights as GGUF, for the llama.cpp column")
    p.add_argument("--memory", action="store_true",
                   help="also measure each compile mode's resident memory in a fresh process (Linux)")
    p.add_argument("--rounds", type=whole_rounds, default=1,
                   help="R > 1: open our modes and llama.cpp once, then time them in alternation, R rounds of "
                        "--repeat runs each (default 1: each engine timed to completion in turn)")
    p.add_argument("--settle", type=settle_seconds, default=SETTLE_S,
                   help=f"with --rounds: seconds idle before each engine's turn, so that the last one's OpenMP threads "
                        f"stop spinning (default {SETTLE_S}; 0: none)")
    p.add_argument("--without-kernels", action="store_true",
                   help="also time each of our modes without our CPU kernels, in a child process, alternated in "
                        "the same rounds (needs --rounds 2 or more)")
    p.add_argument("--json", default=None, help="write every figure here")
    ns = p.parse_args(argv)
    if ns.without_kernels and ns.rounds < 2:
        p.error(f"--without-kernels --rounds {ns.rounds}: the two are compared in alternation; give --rounds 2 or more")
    if ns.gguf:
        problem = gguf_problem(ns.gguf)
        if problem:
            p.error(f"--gguf {ns.gguf}: {problem}")
    if ns.without_kernels and not cpu_kernels.load():
        p.error(f"--without-kernels: our CPU kernels are not loaded here either "
                f"({cpu_kernels.status()['small_m_gemm_why_not']}), so there is nothing to compare")

    threads = ns.threads or usable_cpus()
    torch.set_num_threads(threads)
    dtype = checkpoint.DTYPES[ns.dtype]
    max_seq_len = ns.seq_in + ns.seq_out
    base = resolve_engine_spec(ModelChoices(ns.model_path, 1, "cpu", ns.dtype, max_seq_len), progress=False)
    args = checkpoint.read_model_args(Path(base.model_path))
    prompts = prompts_for(args.vocab_size, ns.batch, ns.seq_in)

    cpu_kernels.load()  # the paths our engine takes, for the record (once a process)
    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(), "threads": threads,
                    "torch": torch.__version__, "python": sys.version.split()[0],
                    "emulated": cpu_isa.emulation_record(),
                    "cpu_linear_paths": cpu_kernels.paths_record()},
        "model": base.model_path, "dtype": ns.dtype, "batch": ns.batch, "seq_in": ns.seq_in, "seq_out": ns.seq_out,
    }
    from vicuna_bench.devices import cpu_model_name, copy_bandwidth

    doc["machine"]["cpu"] = cpu_model_name()
    doc["read_gbps"] = read_bandwidth() / 1e9
    doc["copy_gbps"] = copy_bandwidth(torch.device("cpu")) / 1e9
    rate, doc["matmul_n"] = matmul_rate(dtype)
    doc["matmul_gflops"] = rate / 1e9

    # The decode floor: what one step must read (weights, and the KV cache at its mean length) / read bandwidth.
    from vicuna_bench.model import decode_read_bytes
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    rank_model = build_rank_model(base, 0, TensorParallel(), torch.device("cpu"))
    weights, kv_per_token = decode_read_bytes(rank_model)
    params = sum(p.numel() for n, p in rank_model.named_parameters() if "embed_tokens" not in n or args.tie_word_embeddings)
    del rank_model
    step_bytes = weights + ns.batch * (ns.seq_in + ns.seq_out / 2) * kv_per_token
    doc["decode_floor_ms"] = step_bytes / (doc["read_gbps"] * 1e9) * 1e3
    prefill_flops = 2 * params * ns.batch * ns.seq_in + 2 * args.n_layers * ns.batch * ns.seq_in**2 * args.hidden_size

    specs = {f"vicuna-bench {mode}": type(base)(**{**base.__dict__, "compile": mode})
             for mode in [m.strip() for m in ns.compile.split(",") if m.strip()]}
    try:
        if ns.rounds == 1:
            columns = {name: ours(spec, prompts, ns.seq_out, ns.repeat) for name, spec in specs.items()}
        else:
            lib = load_llama_cpp() if ns.gguf else None
            hf = None if ns.no_transformers else (base.model_path, dtype)
            children = {without_kernels_name(name): (spec, KERNELS_OFF) for name, spec in specs.items()
                        if ns.without_kernels}
            columns = interleaved(specs, lib, ns.gguf, prompts, ns.seq_out, threads, ns.rounds, ns.repeat, hf,
                                  children, ns.settle)
            doc["settle_s"] = ns.settle
            if ns.without_kernels:
                doc["versus_without_kernels"] = {
                    name: versus_by_round(columns[name]["rounds"], columns[without_kernels_name(name)]["rounds"])
                    for name in specs}
            got = columns.pop("llama.cpp", None)  # its column stays last
            doc["rounds"] = ns.rounds
        if ns.memory:
            for name, spec in specs.items():
                columns[name]["memory"] = memory(spec, prompts, ns.seq_out, threads)
        if not ns.no_transformers and "transformers" not in columns:
            columns["transformers"] = transformers_generate(base.model_path, dtype, prompts, ns.seq_out, ns.repeat)
        if ns.rounds == 1:  # timed after transformers, as always
            got = llama_cpp(ns.gguf, prompts, ns.seq_out, threads, ns.repeat) if ns.gguf else None
    except GGUFUnusable as e:
        p.error(str(e))
    if ns.gguf and got is None:
        print("llama.cpp: llama-cpp-python is not installed; column left out", file=sys.stderr)
    elif got is not None:
        columns["llama.cpp"] = got
        if "rounds" in got:
            doc["versus_llama_cpp"] = {name: versus_by_round(columns[name]["rounds"], got["rounds"])
                                       for name in columns if name not in ("llama.cpp", "transformers")}
    ref = columns.get("transformers")
    if ref is not None and "rounds" in ref:
        doc["versus_transformers"] = {name: versus_by_round(columns[name]["rounds"], ref["rounds"]) for name in specs}
    for name, col in columns.items():
        col["next_over_floor"] = col["next_token_ms"] / doc["decode_floor_ms"]
        col["prefill_gflops"] = prefill_flops / (col["first_token_ms"] / 1e3) / 1e9
        col["prefill_of_matmul_rate"] = col["prefill_gflops"] / doc["matmul_gflops"]
        if ref is not None:
            col["first_over_transformers"] = col["first_token_ms"] / ref["first_token_ms"]
            col["next_over_transformers"] = col["next_token_ms"] / ref["next_token_ms"]
    doc["columns"] = columns

    m = doc["machine"]
    print(f"{m['cpu']} ({', '.join(m['flags']) or 'no AVX flags read'}), {threads} threads, torch {m['torch']}")
    if m["emulated"]:
        print(f"emulating a host with {m['emulated']['kind']} (this one: {m['emulated']['real_cpu_isa']}): "
              + " ".join(f"{k}={v}" for k, v in m["emulated"]["env"].items()))
    print(f"ours: {cpu_kernels.paths_line()}")
    print(f"{Path(base.model_path).name} {ns.dtype}, batch {ns.batch}, {ns.seq_in} in / {ns.seq_out} out")
    print(f"read {doc['read_gbps']:.1f} GB/s, copy {doc['copy_gbps']:.1f} GB/s, matmul {doc['matmul_gflops']:.1f} "
          f"GFLOP/s ({doc['matmul_n']}^3), decode floor {doc['decode_floor_ms']:.2f} ms "
          f"({step_bytes / 1e6:.0f} MB per step)")
    print(f"{'engine':<30}{'first ms':>10}{'next ms':>10}{'next/floor':>12}{'first/HF':>10}{'next/HF':>10}"
          f"{'prefill GFLOP/s':>17}")
    for name, col in columns.items():
        print(f"{name:<30}{col['first_token_ms']:>10.1f}{col['next_token_ms']:>10.2f}{col['next_over_floor']:>12.2f}"
              f"{col.get('first_over_transformers', float('nan')):>10.2f}"
              f"{col.get('next_over_transformers', float('nan')):>10.2f}{col['prefill_gflops']:>17.1f}")
    lc = columns.get("llama.cpp")
    if lc is not None:
        print(f"llama.cpp: llama-cpp-python {lc['llama_cpp_python']}, {lc['batch']} parallel sequence(s), "
              f"{Path(lc['gguf']).name}; built with {' '.join(ggml_features(lc['system_info'])) or 'nothing named'}")
        if "greedy_check" in lc:
            g = lc["greedy_check"]
            print(f"llama.cpp batch {lc['batch']}: sequence 0's greedy tokens over {g['steps']} steps equal batch 1's: "
                  f"{'yes' if g['seq_0_agrees'] else 'NO'}; "
                  f"every sequence's: {'yes' if g['every_seq_agrees'] else 'NO'}; "
                  f"largest logit difference {g['seq_0_max_abs_logit_diff']:.2g}")
    if "rounds" in doc:
        print(f"{doc['rounds']} rounds of {ns.repeat} run(s), in alternation, {doc['settle_s']:g} s idle before each "
              f"turn: {', '.join(n for n, c in columns.items() if 'rounds' in c)}; figures are medians over every run")
    for peer in ("llama.cpp", "transformers"):
        for name, vs in doc.get(f"versus_{peer.replace('.', '_')}", {}).items():
            for token in ("next", "first"):
                print(versus_line(f"{name} / {peer} {token} token", vs[f"{token}_token"]))
    for name, col in columns.items():
        if "env" in col:
            print(f"{name}: a child process with {' '.join(f'{k}={v}' for k, v in col['env'].items())}; our CPU "
                  f"kernels there: {'loaded' if col.get('small_m_gemm') else 'off'}"
                  + (f" ({col['small_m_gemm_why_not']})" if col.get("small_m_gemm_why_not") else ""))
    for name, vs in doc.get("versus_without_kernels", {}).items():
        for token in ("next", "first"):
            print(versus_line(f"{name} / {without_kernels_name(name)} {token} token", vs[f"{token}_token"]))
    for name, col in columns.items():
        if "memory" in col:
            mem = col["memory"]
            print(f"{name} memory: weights {mem['weight_bytes'] / 2**20:.0f} MiB + KV {mem['kv_cache_bytes'] / 2**20:.0f}"
                  f" MiB; RSS growth serving {mem['serve_peak_growth_bytes'] / 2**20:.0f} MiB "
                  f"({mem['serve_over_weights_kv']:.2f}x), loading/compiling {mem['load_peak_growth_bytes'] / 2**20:.0f}"
                  f" MiB ({mem['load_over_weights_kv']:.2f}x)")
            if mem.get("graphs_compiled") or mem.get("graphs_from_cache"):
                print(f"{name} memory: {mem['graphs_compiled']} graph(s) compiled anew, {mem['graphs_from_cache']} "
                      f"from inductor's cache" + (" (a cold cache: more stays resident than on a warm one)"
                                                  if mem["graphs_compiled"] else ""))
            if mem.get("compiler_rss_bytes"):
                print(f"{name} memory: the compiler itself (compiling a one-op function first, before the baseline) "
                      f"{mem['compiler_rss_bytes'] / 2**20:.0f} MiB; serving with it counted "
                      f"{mem['serve_over_weights_kv_with_compiler']:.2f}x weights + KV")
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
