"""Each CPU linear path on one decode step's products, alternated in one run: the per-host verdict as same-run ratios.

For the model's projection shapes (fused qkv, o, fused gate/up, down per layer, then the head; the chain of
``bench_gemm.LinearChain``, the same weights for every path of a dtype) at M rows, one round times every path once
(the median of ``--repeat`` calls each, in an order rotated every round, so no path always follows another), and
each round gives every path's time over the kernels' time in that same round.  The paths:

* ``kernel``: our small-M GEMM (``vicuna_bench/cpu_kernels.py``) with AMX off, compiled as ``--compile on`` does;
* ``kernel+amx`` (bf16, where AMX is usable): the same compiled graph with the AMX tiles on for these rows;
* ``F.linear``: the chain on ``F.linear`` compiled as the engine does without our kernels: bf16 frozen (weights
  prepacked for oneDNN, a second copy), fp32 unfrozen (inductor's micro-GEMMs autotuned against MKL).

Above 16 rows (a prefill's products) the op itself takes the product: ``op (at::linear)`` hands it to ATen, ``op
(fp32 GEMM)`` (bf16) widens x and each block of weight rows to fp32 for sgemm, as hosts without a bf16 dot product
do, and ``op (AMX GEMM)`` (bf16, where AMX is usable) runs its own AMX GEMM on the model's weight, as AMX hosts do;
the ratios are then to the first of these.

Prints, per dtype and M, each path's median ms, GB/s of weights, and its per-round ratios to ``kernel`` (median,
range, rounds faster).  Run it only on an idle host; ``--json`` keeps every round.

    python benchmarks/bench_paths.py --rows 1,8 --dtypes bf16,fp32 --rounds 7 --json paths.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

from vicuna_bench import checkpoint, cpu_kernels
from vicuna_bench.runtime import usable_cpus
from vicuna_bench.spec import ModelChoices, resolve_engine_spec


def compiled_paths(chain, small_m, dtype: str, amx: bool, m: int) -> dict:
    """name -> (amx rows on, the op's path above 16 rows, compiled callable) for ``m`` rows, the first the ratios'
    base; the F.linear graph frozen in bf16 as the engine freezes it."""
    import torch._inductor.config as inductor

    from vicuna_bench.compile import CPU_DECODE_MODE

    kernel = torch.compile(small_m, mode=CPU_DECODE_MODE, dynamic=False)
    baseline = torch.compile(chain, mode=CPU_DECODE_MODE, dynamic=False)
    freeze = dtype != "fp32"

    def f_linear(x):
        with inductor.patch({"freezing": freeze}):
            return baseline(x)

    plain = cpu_kernels.F_LINEAR
    if m > cpu_kernels.MAX_ROWS:
        paths = {"op (at::linear)": (False, plain, kernel)}
        if dtype == "bf16":
            paths["op (fp32 GEMM)"] = (False, cpu_kernels.FP32_GEMM, kernel)
            if amx:
                paths["op (AMX GEMM)"] = (False, cpu_kernels.AMX_GEMM, kernel)
    else:
        paths = {"kernel": (False, plain, kernel)}
        if amx:
            paths["kernel+amx"] = (True, plain, kernel)
    paths["F.linear (frozen)" if freeze else "F.linear"] = (False, plain, f_linear)
    return paths


def switched(amx: bool, above: str, m: int):
    """The op's switches for one path's calls: ``m`` rows on the AMX tiles or not, and products above 16 rows on
    ``above`` (F.linear, fp32 GEMM or AMX GEMM); the host's choice again after them."""
    stack = contextlib.ExitStack()
    stack.enter_context(cpu_kernels.amx_rows(m, m) if amx else cpu_kernels.amx_rows(0, 0))
    stack.enter_context(cpu_kernels.bf16_fp32_gemm(above == cpu_kernels.FP32_GEMM))
    stack.enter_context(cpu_kernels.amx_gemm(above == cpu_kernels.AMX_GEMM))
    return stack


def measure(paths: dict, x, rounds: int, repeat: int) -> dict:
    """Per path: its ms in every round (the order rotated each round after one warm-up call of each)."""
    from bench_gemm import median_ms  # this folder's (the script's folder is on sys.path)

    names = list(paths)
    for name in names:  # compile (and freeze) before any timing
        amx, above, fn = paths[name]
        with switched(amx, above, x.shape[0]):
            for _ in range(3):
                fn(x)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            amx, above, fn = paths[name]
            with switched(amx, above, x.shape[0]):
                # median_ms makes one untimed call first: after the switch, the other paths' data left the caches
                times[name].append(median_ms(fn, x, repeat))
    return times


def summary(times: dict, nbytes: int) -> list[dict]:
    """Per path: median ms, GB/s of weights, and its per-round ratios to the first path's time."""
    base = next(iter(times.values()))
    rows = []
    for name, ms in times.items():
        ratios = [a / b for a, b in zip(ms, base)]
        rows.append({"path": name, "ms": statistics.median(ms), "gbps": nbytes / statistics.median(ms) / 1e6,
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "faster_rounds": sum(r < 1 for r in ratios), "rounds": len(ratios), "round_ms": ms})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir for the shapes (default: the embedded model)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rows", default="1,8", help="comma list of M (batch rows)")
    p.add_argument("--layers", type=int, default=None, help="copies of a layer's matrices (default: the model's)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=5, help="calls per path per round (their median is the round's)")
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)

    from bench_gemm import LinearChain, SmallMChain  # this folder's (the script's folder is on sys.path)
    from bench_peers import cpu_flags, read_bandwidth

    from vicuna_bench.compile import configure_cpu_inductor

    threads = usable_cpus()
    torch.set_num_threads(threads)
    spec = resolve_engine_spec(ModelChoices(ns.model_path, 1, "cpu", "fp32", 64), progress=False)
    args = checkpoint.read_model_args(Path(spec.model_path))
    if not cpu_kernels.load():
        print(f"our kernel is unavailable: {cpu_kernels.status()['small_m_gemm_why_not']}", file=sys.stderr)
        return 1
    amx = torch.ops.vicuna_bench.small_m_amx()
    read = read_bandwidth()
    doc = {"model": spec.model_path, "threads": threads, "flags": cpu_flags(), "torch": torch.__version__,
           "kernel_isa": cpu_kernels.status()["small_m_gemm_isa"], "amx": amx, "read_gbps": read / 1e9,
           "rounds": ns.rounds, "repeat": ns.repeat, "results": []}
    print(f"{Path(spec.model_path).name} shapes, {threads} threads, flags {' '.join(doc['flags'])}; AMX: {amx}; "
          f"read {read / 1e9:.1f} GB/s; {ns.rounds} rounds x {ns.repeat} calls, order rotated", flush=True)
    print(f"{'dtype':<6}{'M':>4} {'path':<19}{'ms':>8}{'GB/s':>7}{'/first':>9}{'range':>14}{'faster':>8}")
    with torch.inference_mode():
        for dtype_name in ns.dtypes.split(","):
            dtype = checkpoint.DTYPES[dtype_name]
            configure_cpu_inductor(1, dtype_name)
            chain = LinearChain(args, ns.layers or args.n_layers, dtype).eval()
            nbytes = sum(q.numel() * q.element_size() for q in chain.parameters())
            for m in [int(v) for v in ns.rows.split(",")]:
                x = torch.randn(m, args.hidden_size, dtype=dtype)
                paths = compiled_paths(chain, SmallMChain(chain), dtype_name, dtype_name == "bf16" and amx == "usable",
                                       m)
                for row in summary(measure(paths, x, ns.rounds, ns.repeat), nbytes):
                    doc["results"].append({"dtype": dtype_name, "m": m, "weight_bytes": nbytes, **row})
                    span = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
                    print(f"{dtype_name:<6}{m:>4} {row['path']:<19}{row['ms']:>8.2f}{row['gbps']:>7.1f}"
                          f"{row['ratio_median']:>9.2f}{span:>14}{row['faster_rounds']:>5}/{row['rounds']}",
                          flush=True)
                torch._dynamo.reset()
            del chain
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
