"""Decode speed of a full-size model shape on one device, weights drawn at random on the device.

For a hardware check without the real weights: builds our rank model for a
named shape (Vicuna-13B-v1.5-16k's config.json by default) with random
weights allocated directly on the device (no checkpoint files: 26 GB of
disk I/O would cost more than the measurement), then measures in one run:

* the device's copy bandwidth (bytes read + written, as STREAM counts);
* our engine's first-token and next-token ms, eager and ``--compile on``
  (CUDA: inductor ``reduce-overhead``, CUDA graphs), batch 1 by default;
* the decode floor: weight bytes read per step / copy bandwidth, as the
  speed issue defines it (and with the KV cache at its mean length);
* peak device memory against weights + KV cache.

    python benchmarks/bench_shape.py --device cuda --dtype fp16 --json out.json
    python benchmarks/bench_shape.py --device cuda --shape llama2-7b --batch 1,8

The prefill stays eager here (only the decode step is compiled): compiling a
40-layer prefill for dynamic shapes costs minutes of device time and this
benchmark is about the decode step.  Never run it beside other busy work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from vicuna_bench import checkpoint, devices
from vicuna_bench.compile import CompiledSteps, compiled_steps
from vicuna_bench.config import ModelArgs
from vicuna_bench.generation import EAGER, GenerationRequest, generate
from vicuna_bench.model import Transformer, decode_read_bytes, weight_bytes
from vicuna_bench.runtime import finish_rank_model
from vicuna_bench.sharding import ShardPlan, TensorParallel

_LLAMA2 = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "model_type": "llama", "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "vocab_size": 32000,
}
# config.json of lmsys/vicuna-13b-v1.5-16k and meta-llama/Llama-2-7b-hf (the shape keys).
SHAPES = {
    "vicuna-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                   "num_hidden_layers": 40, "num_key_value_heads": 40, "max_position_embeddings": 4096,
                   "rope_scaling": {"factor": 4.0, "type": "linear"}, "torch_dtype": "float16"},
    "llama2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                  "torch_dtype": "float16"},
}


def random_rank_model(args: ModelArgs, max_seq_len: int, device: torch.device, dtype: torch.dtype,
                      seed: int = 0) -> Transformer:
    """World size 1's rank model with N(0, 0.02) weights (norms 1) made on ``device``, fused as when loaded."""
    with torch.device("meta"):
        model = Transformer(args, ShardPlan(args, 1, 0), TensorParallel(), max_seq_len).to(dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return finish_rank_model(model, device)


def timed(model, prompts, seq_out: int, steps, device, repeat: int) -> dict:
    """Median first/next-token ms over ``repeat`` runs after one warm-up (which pays any compiling)."""
    sync = lambda: devices.synchronize(device)  # noqa: E731
    devices.reset_peak_memory(device)
    warm = generate(model, GenerationRequest.make(prompts, seq_out, ignore_eos=True), sync=sync, steps=steps)
    runs = [generate(model, GenerationRequest.make(prompts, seq_out, ignore_eos=True), sync=sync,
                     steps=steps) for _ in range(repeat)]
    return {
        "first_ms": statistics.median(r.first_token_ms for r in runs),
        "next_ms": statistics.median(r.next_token_ms for r in runs),
        "next_ms_runs": [round(r.next_token_ms, 3) for r in runs],
        "compile_s": warm.compile_ms / 1e3,
        "peak_bytes": devices.peak_memory_bytes(device),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="vicuna-13b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", help="cuda | npu | cpu (index 0)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--seq-in", type=int, default=256)
    p.add_argument("--seq-out", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", default="off,on", help="modes to run (default off,on)")
    p.add_argument("--inductor-mode", default=None,
                   help="compile the decode step with this torch.compile mode instead of the engine's (experiments)")
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)

    device = devices.device_for_rank(devices.resolve_device(ns.device), 0)
    dtype = checkpoint.DTYPES[ns.dtype]
    args = ModelArgs.from_dict(SHAPES[ns.shape], source=ns.shape)
    max_seq_len = ns.seq_in + ns.seq_out
    started = time.perf_counter()
    model = random_rank_model(args, max_seq_len, device, dtype)
    devices.synchronize(device)
    build_s = time.perf_counter() - started
    weights, kv_per_token = decode_read_bytes(model)
    copy_bps = devices.copy_bandwidth(device, nbytes=4 << 30)
    doc = {
        "shape": ns.shape, "dtype": ns.dtype, "seq_in": ns.seq_in, "seq_out": ns.seq_out,
        "device": devices.device_name(device), "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None), "build_s": round(build_s, 1),
        "weight_bytes": weight_bytes(model), "decode_weight_bytes": weights, "kv_bytes_per_token": kv_per_token,
        "copy_gbps": copy_bps / 1e9, "rows": [],
    }
    print(f"{ns.shape} {ns.dtype} on {doc['device']} (torch {torch.__version__}, CUDA {doc['cuda']}): "
          f"{weights / 1e9:.2f} GB read per step; copy bandwidth {copy_bps / 1e9:.0f} GB/s; built in {build_s:.0f} s",
          flush=True)
    gen = torch.Generator().manual_seed(0)
    for batch in [int(b) for b in ns.batch.split(",")]:
        prompts = torch.randint(3, args.vocab_size, (batch, ns.seq_in), generator=gen).tolist()
        floor_ms = weights / copy_bps * 1e3
        kv_ms = batch * (ns.seq_in + ns.seq_out / 2) * kv_per_token / copy_bps * 1e3
        for mode in [m.strip() for m in ns.compile.split(",") if m.strip()]:
            steps = EAGER
            if mode == "on":
                if ns.inductor_mode:
                    from vicuna_bench.generation import decode_step

                    fn = torch.compile(decode_step, mode=ns.inductor_mode, fullgraph=True, dynamic=False)
                    steps = CompiledSteps(None, fn, f"torch.compile mode={ns.inductor_mode}")
                else:
                    full = compiled_steps(device.type, 1, ns.dtype)
                    steps = CompiledSteps(None, full.decode_fn, full.description + " (decode step only)")
            row = timed(model, prompts, ns.seq_out, steps, device, ns.repeat)
            cache_bytes = 2 * args.n_layers * batch * max_seq_len * args.n_kv_heads * args.head_dim * dtype.itemsize
            row.update(batch=batch, compile=mode, floor_ms=floor_ms, floor_with_kv_ms=floor_ms + kv_ms,
                       next_over_floor=row["next_ms"] / floor_ms,
                       peak_over_weights_kv=row["peak_bytes"] / (doc["weight_bytes"] + cache_bytes))
            doc["rows"].append(row)
            print(f"batch {batch} compile {mode:3}: first {row['first_ms']:8.1f} ms  next {row['next_ms']:7.2f} ms  "
                  f"floor {floor_ms:.2f} ms (+KV {kv_ms:.2f})  next/floor {row['next_over_floor']:.3f}  "
                  f"compile {row['compile_s']:.0f} s  peak/(weights+KV) {row['peak_over_weights_kv']:.3f}",
                  flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
