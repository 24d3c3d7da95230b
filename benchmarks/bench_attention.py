"""A decode step's attention alone: SDPA over the whole cache bucket against ours over the filled slots.

For the model's heads (SmolLM2-135M: 9 query, 3 key/value heads of 64),
``--layers`` layers of one query token per row against a cache of
``--cache`` slots of which ``--filled`` hold tokens, each layer its own
cache (so nothing stays in cache between layers, as in a real step):

* ``sdpa``: ``F.scaled_dot_product_attention`` under the ``key_valid``
  mask, what the engine called before (reads every slot);
* ``ours``: ``vicuna_bench::decode_attention`` (reads the filled slots);
* the floor: the filled keys and values' bytes over the read bandwidth.

Median of ``--repeat``; prints ms per step and the ratio to the floor.
Never run it beside other busy processes.

    python benchmarks/bench_attention.py                          # batch 1 and 8, fp32 and bf16
    python benchmarks/bench_attention.py --batch 8 --dtype bf16 --json attn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_peers import cpu_flags, read_bandwidth
from vicuna_bench import checkpoint, cpu_kernels
from vicuna_bench.devices import cpu_model_name
from vicuna_bench.runtime import usable_cpus

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sdpa(q, k, v, key_valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :], enable_gqa=True)


def time_step(fn, layers, repeat: int) -> float:
    """Median ms of one step: ``fn`` on every layer's (q, k, v, key_valid) in turn."""
    for args in layers:
        fn(*args)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for args in layers:
            fn(*args)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def case(batch: int, dtype: str, heads: int, kv_heads: int, head_dim: int, n_layers: int, cache: int, filled: int,
         repeat: int, read_gbps: float) -> dict:
    """One (batch, dtype): ms a step of SDPA and of ours, the floor, and the largest difference of their outputs."""
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    valid = torch.zeros(batch, cache, dtype=torch.bool)
    valid[:, :filled] = True
    layers = [(torch.randn(batch, heads, 1, head_dim, generator=g).to(dt),
               torch.randn(batch, kv_heads, cache, head_dim, generator=g).to(dt),
               torch.randn(batch, kv_heads, cache, head_dim, generator=g).to(dt), valid) for _ in range(n_layers)]
    q, k, v, _ = layers[0]
    diff = (cpu_kernels.decode_attention(q, k, v, valid).float() - sdpa(q, k, v, valid).float()).abs().max().item()
    read = n_layers * 2 * batch * kv_heads * filled * head_dim * torch.finfo(dt).bits // 8
    out = {"batch": batch, "dtype": dtype, "sdpa_ms": time_step(sdpa, layers, repeat),
           "ours_ms": time_step(cpu_kernels.decode_attention, layers, repeat), "read_bytes": read,
           "floor_ms": read / (read_gbps * 1e9) * 1e3, "max_abs_diff": diff}
    out["ours_over_floor"] = out["ours_ms"] / out["floor_ms"]
    out["ours_over_sdpa"] = out["ours_ms"] / out["sdpa_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir for the heads (default: the embedded model)")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--cache", type=int, default=512, help="cache slots (the bucket SDPA reads)")
    p.add_argument("--filled", type=int, default=320, help="slots holding tokens (what ours reads)")
    p.add_argument("--layers", type=int, default=None, help="layers a step (default: the model's)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    dtypes = [d.strip() for d in ns.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtype {bad[0]}: not one of {', '.join(DTYPES)}")
    if not 0 < ns.filled <= ns.cache:
        p.error(f"--filled {ns.filled}: must be 1..--cache ({ns.cache})")
    if not cpu_kernels.load():
        p.error(f"our CPU kernels are not available here: {cpu_kernels.status()['small_m_gemm_why_not']}")
    threads = ns.threads or usable_cpus()
    torch.set_num_threads(threads)
    if ns.model_path is None:
        from vicuna_bench.spec import ModelChoices, resolve_engine_spec

        ns.model_path = resolve_engine_spec(ModelChoices(None, 1, "cpu", "fp32", 64), progress=False).model_path
    args = checkpoint.read_model_args(Path(ns.model_path))
    head_dim = args.head_dim
    n_layers = ns.layers or args.n_layers
    read_gbps = read_bandwidth() / 1e9
    rows = [case(b, d, args.n_heads, args.n_kv_heads, head_dim, n_layers, ns.cache, ns.filled, ns.repeat, read_gbps)
            for d in dtypes for b in (int(x) for x in ns.batch.split(","))]
    print(f"{cpu_model_name()} ({', '.join(cpu_flags())}), {threads} threads, torch {torch.__version__}; "
          f"read {read_gbps:.1f} GB/s")
    print(f"{Path(ns.model_path).name}: {n_layers} layers of {args.n_heads} query / {args.n_kv_heads} kv heads of "
          f"{head_dim}; cache {ns.cache} slots, {ns.filled} filled")
    print(f"{'dtype':<6}{'batch':>6}{'sdpa ms':>10}{'ours ms':>10}{'floor ms':>10}{'ours/floor':>12}{'ours/sdpa':>11}")
    for r in rows:
        print(f"{r['dtype']:<6}{r['batch']:>6}{r['sdpa_ms']:>10.2f}{r['ours_ms']:>10.2f}{r['floor_ms']:>10.2f}"
              f"{r['ours_over_floor']:>12.2f}{r['ours_over_sdpa']:>11.2f}")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"machine": {"cpu": cpu_model_name(), "flags": cpu_flags(),
                                                         "threads": threads, "torch": torch.__version__},
                                             "model": ns.model_path, "read_gbps": read_gbps, "cache": ns.cache,
                                             "filled": ns.filled, "layers": n_layers, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
