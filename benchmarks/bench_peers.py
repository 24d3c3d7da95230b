"""The peer benchmark: our engine (eager and compiled) against the machine's limits and transformers, in one run.

Measures, on one device with the same weights, prompts and threads:

* read bandwidth (sum over a 256 MB tensor) and copy bandwidth;
* the matmul rate (2048^3 in the run's dtype);
* our engine, ``--compile off`` and ``on``: first-token and next-token ms;
* transformers ``generate``: the same, from per-step timestamps;
* llama.cpp (``llama-cpp-python``) when installed and ``--gguf`` names the
  same weights as a GGUF file.

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
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vicuna_bench import checkpoint
from vicuna_bench.runtime import Engine, resolve_engine_spec, usable_cpus


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


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
                return [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    return []


def prompts_for(vocab: int, batch: int, seq_in: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq_in), generator=g).tolist()


def ours(spec, prompts, seq_out: int, repeat: int) -> dict:
    """First/next-token ms of our engine (median over ``repeat`` runs after one warm-up)."""
    with Engine(spec) as engine:
        warm = engine.generate(prompts, seq_out, ignore_eos=True)
        runs = [engine.generate(prompts, seq_out, ignore_eos=True) for _ in range(repeat)]
    return {
        "first_token_ms": statistics.median(r.first_token_ms for r in runs),
        "next_token_ms": statistics.median(r.next_token_ms for r in runs),
        "compile_s": warm.compile_ms / 1e3,
    }


def _memory_probe(spec, prompts, seq_out: int, threads: int) -> dict:
    """Run in a fresh process: RSS growth over the pre-load process while loading (+ compiling) and while serving.

    Serving = one timed generation after the warm-up, peak reset in between
    (``/proc/self/clear_refs``), as the figures of a perf run are taken.
    """
    from vicuna_bench import devices
    from vicuna_bench.compile import compiled_steps
    from vicuna_bench.generation import EAGER, generate
    from vicuna_bench.model import weight_bytes
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    steps = compiled_steps("cpu", 1, spec.dtype) if spec.compile == "on" else EAGER
    if steps is not EAGER:
        from torch._inductor import config as _inductor  # noqa: F401  (loaded before the baseline: not model memory)
    base = devices.proc_status_bytes("VmRSS")
    if base is None:
        raise RuntimeError("--memory reads /proc/self/status (Linux only)")
    devices.reset_peak_memory(cpu)
    model = build_rank_model(spec, 0, TensorParallel(), cpu)
    generate(model, prompts, seq_out, ignore_eos=True, steps=steps)  # warm-up: compiles here
    load_peak = devices.peak_memory_bytes(cpu)
    devices.reset_peak_memory(cpu)
    generate(model, prompts, seq_out, ignore_eos=True, steps=steps)
    serve_peak = devices.peak_memory_bytes(cpu)
    weights = weight_bytes(model)
    kv = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("cache.k", "cache.v")))
    return {
        "baseline_rss_bytes": base, "weight_bytes": weights, "kv_cache_bytes": kv,
        "load_peak_growth_bytes": load_peak - base, "serve_peak_growth_bytes": serve_peak - base,
        "serve_over_weights_kv": (serve_peak - base) / (weights + kv),
        "load_over_weights_kv": (load_peak - base) / (weights + kv),
    }


def memory(spec, prompts, seq_out: int, threads: int) -> dict:
    """:func:`_memory_probe` in a fresh (spawned) process, so no other engine's memory is counted."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_memory_probe, spec, prompts, seq_out, threads).result()


def transformers_generate(path: str, dtype: torch.dtype, prompts, seq_out: int, repeat: int) -> dict:
    """First/next-token ms of transformers ``generate`` from a timestamp per step (a logits processor)."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)

    def once():
        stamp = Stamp()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=seq_out, min_new_tokens=seq_out,
                           do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        t = [start] + stamp.times
        steps = [(b - a) * 1e3 for a, b in zip(t[1:], t[2:])]
        return (t[1] - t[0]) * 1e3, statistics.mean(steps) if steps else 0.0

    once()
    runs = [once() for _ in range(repeat)]
    return {"first_token_ms": statistics.median(r[0] for r in runs), "next_token_ms": statistics.median(r[1] for r in runs)}


def llama_cpp(gguf: str, prompts, seq_out: int, threads: int, repeat: int = 3) -> dict | None:
    """First/next-token ms of llama.cpp (batch 1 only; median over ``repeat`` runs after a warm-up), when installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_ctx=len(prompts[0]) + seq_out + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)

    def once():
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompts[0])
        first = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        for _ in range(seq_out - 1):
            llm.eval([3])  # a fixed token: greedy choice is not what is timed
        return first, (time.perf_counter() - t) * 1e3 / max(1, seq_out - 1)

    once()
    runs = [once() for _ in range(repeat)]
    return {"first_token_ms": statistics.median(r[0] for r in runs), "next_token_ms": statistics.median(r[1] for r in runs)}


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
    p.add_argument("--json", default=None, help="write every figure here")
    ns = p.parse_args(argv)

    threads = ns.threads or usable_cpus()
    torch.set_num_threads(threads)
    dtype = checkpoint.DTYPES[ns.dtype]
    max_seq_len = ns.seq_in + ns.seq_out
    base = resolve_engine_spec(ns.model_path, 1, "cpu", ns.dtype, max_seq_len, progress=False)
    args = checkpoint.read_model_args(Path(base.model_path))
    prompts = prompts_for(args.vocab_size, ns.batch, ns.seq_in)

    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(), "threads": threads,
                    "torch": torch.__version__, "python": sys.version.split()[0]},
        "model": base.model_path, "dtype": ns.dtype, "batch": ns.batch, "seq_in": ns.seq_in, "seq_out": ns.seq_out,
    }
    from vicuna_bench.devices import cpu_model_name, copy_bandwidth

    doc["machine"]["cpu"] = cpu_model_name()
    doc["read_gbps"] = read_bandwidth() / 1e9
    doc["copy_gbps"] = copy_bandwidth(torch.device("cpu")) / 1e9
    doc["matmul_gflops"] = matmul_rate(dtype) / 1e9

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

    columns = {}
    for mode in [m.strip() for m in ns.compile.split(",") if m.strip()]:
        spec = type(base)(**{**base.__dict__, "compile": mode})
        columns[f"vicuna-bench {mode}"] = ours(spec, prompts, ns.seq_out, ns.repeat)
        if ns.memory:
            columns[f"vicuna-bench {mode}"]["memory"] = memory(spec, prompts, ns.seq_out, threads)
    if not ns.no_transformers:
        columns["transformers"] = transformers_generate(base.model_path, dtype, prompts, ns.seq_out, ns.repeat)
    if ns.gguf and ns.batch == 1:
        got = llama_cpp(ns.gguf, prompts, ns.seq_out, threads, ns.repeat)
        if got is None:
            print("llama.cpp: llama-cpp-python is not installed; column left out", file=sys.stderr)
        else:
            columns["llama.cpp"] = got
    ref = columns.get("transformers")
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
    print(f"{Path(base.model_path).name} {ns.dtype}, batch {ns.batch}, {ns.seq_in} in / {ns.seq_out} out")
    print(f"read {doc['read_gbps']:.1f} GB/s, copy {doc['copy_gbps']:.1f} GB/s, matmul {doc['matmul_gflops']:.0f} "
          f"GFLOP/s, decode floor {doc['decode_floor_ms']:.2f} ms ({step_bytes / 1e6:.0f} MB per step)")
    print(f"{'engine':<22}{'first ms':>10}{'next ms':>10}{'next/floor':>12}{'first/HF':>10}{'next/HF':>10}"
          f"{'prefill GFLOP/s':>17}")
    for name, col in columns.items():
        print(f"{name:<22}{col['first_token_ms']:>10.1f}{col['next_token_ms']:>10.2f}{col['next_over_floor']:>12.2f}"
              f"{col.get('first_over_transformers', float('nan')):>10.2f}"
              f"{col.get('next_over_transformers', float('nan')):>10.2f}{col['prefill_gflops']:>17.1f}")
    for name, col in columns.items():
        if "memory" in col:
            mem = col["memory"]
            print(f"{name} memory: weights {mem['weight_bytes'] / 2**20:.0f} MiB + KV {mem['kv_cache_bytes'] / 2**20:.0f}"
                  f" MiB; RSS growth serving {mem['serve_peak_growth_bytes'] / 2**20:.0f} MiB "
                  f"({mem['serve_over_weights_kv']:.2f}x), loading/compiling {mem['load_peak_growth_bytes'] / 2**20:.0f}"
                  f" MiB ({mem['load_over_weights_kv']:.2f}x)")
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
