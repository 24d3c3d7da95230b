"""How fast a decode step's matrix products stream their weights at M = 1, 2, 4, 8... rows.

A decode step with ``M`` rows (the batch) multiplies [M, K] activations by
every weight matrix once; at small M that is bound by reading the weights
from memory, so its time should barely grow with M.  This measures, for
the model's own projection shapes (fused qkv, o, fused gate/up, down, and
the head), cycling through enough copies that no weight stays in cache:

* ``F.linear`` eager (BLAS: what the engine called before its own kernel);
* ``small-M``: our kernel (``vicuna_bench/cpu_kernels.py``, built for this
  host), eager: what every CPU linear layer calls now, eager or compiled;
* the compiled chain on our kernel, with the engine's own CPU compile settings
  (``compile.cpu_inductor_options``): what ``--compile on`` gets;
* the read bandwidth (sum over 256 MB), the ceiling of all of them;
* with ``--resident``, our kernel on a chain of the same shapes whose layers
  are all one layer (its weights stay in cache): the rate our kernel computes
  at when nothing is read from memory;
* the cores' FMA peak (our library's ``small_m_fma_rate``: fp32 FMAs at the
  build's vector width on every thread, nothing read from memory), the
  ceiling of the GFLOP/s column.

Every kernel is timed in alternation within each M (one call of each in
turn, ``--repeat`` times; medians), so the ratios between them are same-run
ones on a host whose speed drifts.  It prints GB/s of weights streamed,
GFLOP/s and its share of the FMA peak, and the time at M against the first
M given (M = 1 by default).  It is the evidence behind the batch-8 rows of
docs/PERFORMANCE.md: a product bound by the read streams at the probe's
rate, one bound by the FMAs runs near the peak; one that does neither while
its resident twin computes fast is bound by the two not overlapping.  Never
run it beside other busy processes.

    python benchmarks/bench_gemm.py                      # embedded model's shapes, fp32, M = 1,2,4,8
    python benchmarks/bench_gemm.py --dtype bf16 --rows 1,8 --json gemm.json
    python benchmarks/bench_gemm.py --dtype bf16 --rows 1,4,8,16 --no-compile --resident --repeat 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicuna_bench import checkpoint, cpu_kernels
from vicuna_bench.runtime import usable_cpus
from vicuna_bench.spec import ModelChoices, resolve_engine_spec


class LinearChain(nn.Module):
    """``copies`` x (qkv, o, gate/up, down) at the model's shapes, then the head: one decode step's GEMMs (more than
    ``cpu_kernels.MAX_ROWS`` rows, a prefill's: the head on the last row only, as the engine takes it)."""

    def __init__(self, args, copies: int, dtype: torch.dtype, resident: bool = False):
        """``resident``: every one of the ``copies`` layers is the first one (the same weights, staying in cache)."""
        super().__init__()
        h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
        qkv = (args.n_heads + 2 * args.n_kv_heads) * d
        shapes = [(qkv, h), (h, args.n_heads * d), (2 * i, h), (h, i)]
        def layer():
            return nn.ModuleList(nn.Linear(k, n, bias=False, dtype=dtype) for n, k in shapes)

        self.blocks = nn.ModuleList([layer()] * copies if resident else [layer() for _ in range(copies)])
        self.head = nn.Linear(h, args.vocab_size, bias=False, dtype=dtype)
        self.q_width, self.inter = args.n_heads * d, i
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, F.linear)

    def run(self, x: torch.Tensor, mm) -> torch.Tensor:
        """The chain with ``mm(x, weight)`` as every product."""
        for qkv, o, gate_up, down in self.blocks:
            x = x + mm(mm(x, qkv.weight)[..., : self.q_width], o.weight)
            gate, up = mm(x, gate_up.weight).split(self.inter, dim=-1)
            x = x + mm(F.silu(gate) * up, down.weight)
        if x.shape[0] > cpu_kernels.MAX_ROWS:
            x = x[-1:]  # a prefill's rows: the engine takes the head on the last slot only (model._blocks_and_head)
        return mm(x, self.head.weight)


class SmallMChain(nn.Module):
    """``chain``'s own weights through our small-M kernel (the op itself, whatever path the host's table gives
    these rows)."""

    def __init__(self, chain: LinearChain):
        super().__init__()
        self.chain = chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain.run(x, torch.ops.vicuna_bench.small_m_linear)


def median_ms(fn, x, repeat: int) -> float:
    """The median ms of ``fn`` on ``x`` over ``repeat`` calls after one untimed call."""
    return alternated_ms({"fn": fn}, x, repeat)["fn"]


def alternated_ms(fns: dict, x, repeat: int) -> dict[str, float]:
    """The median ms of each of ``fns`` on ``x``, called in turn ``repeat`` times after one call each."""
    for fn in fns.values():
        fn(x)
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def fma_peak_gflops(rounds: int = 3, iterations: int = 20_000_000) -> float:
    """The median of ``rounds`` runs of our library's FMA peak on this process's threads, GFLOP/s."""
    return statistics.median(torch.ops.vicuna_bench.small_m_fma_rate(iterations) for _ in range(rounds))


def gflops(m: int, weight_elements: int, ms: float) -> float:
    """GFLOP/s of ``m`` rows times ``weight_elements`` weights (a multiply and an add each) done in ``ms``."""
    return 2 * m * weight_elements / ms / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir for the shapes (default: the embedded model)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rows", default="1,2,4,8", help="comma list of M (batch rows)")
    p.add_argument("--layers", type=int, default=None, help="copies of a layer's matrices (default: the model's)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--resident", action="store_true",
                   help="also time our kernel on one layer's weights repeated (in cache): its compute rate")
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)

    from bench_peers import cpu_flags, read_bandwidth  # this folder's probes (the script's folder is on sys.path)

    threads = usable_cpus()
    torch.set_num_threads(threads)
    dtype = checkpoint.DTYPES[ns.dtype]
    spec = resolve_engine_spec(ModelChoices(ns.model_path, 1, "cpu", ns.dtype, 64), progress=False)
    args = checkpoint.read_model_args(Path(spec.model_path))
    if not cpu_kernels.load():
        print(f"our kernel is unavailable: {cpu_kernels.status()['small_m_gemm_why_not']}", file=sys.stderr)
        return 1
    layers = ns.layers or args.n_layers
    net = LinearChain(args, layers, dtype).eval()
    small_m = SmallMChain(net)
    elements = sum(p.numel() for p in net.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in net.parameters())
    read = read_bandwidth()
    peak = fma_peak_gflops()
    doc = {"model": spec.model_path, "dtype": ns.dtype, "threads": threads, "flags": cpu_flags(),
           "torch": torch.__version__, "weight_bytes": nbytes, "weight_elements": elements, "read_gbps": read / 1e9,
           "fma_peak_gflops": peak, "rows": []}
    print(f"{Path(spec.model_path).name} shapes, {ns.dtype}, {threads} threads, {nbytes / 1e6:.0f} MB of weights; "
          f"read bandwidth {read / 1e9:.1f} GB/s (floor {nbytes / read * 1e3:.2f} ms); "
          f"FMA peak {peak:.0f} GFLOP/s", flush=True)
    if not ns.no_compile:
        from vicuna_bench.compile import CPU_DECODE_MODE, configure_cpu_inductor

        configure_cpu_inductor(1, ns.dtype)
    base = {}
    resident = SmallMChain(LinearChain(args, layers, dtype, resident=True).eval()) if ns.resident else None
    print(f"{'M':>3} {'kernel':<18}{'ms':>9}{'GB/s':>8}{'GFLOP/s':>9}{'% peak':>8}{'x first':>8}")
    doc["kernel_isa"] = cpu_kernels.status()["small_m_gemm_isa"]
    with torch.inference_mode():
        for m in [int(v) for v in ns.rows.split(",")]:
            x = torch.randn(m, args.hidden_size, dtype=dtype)
            kernels = {"F.linear": net, "small-M": small_m}
            if resident is not None:
                kernels["small-M resident"] = resident
            if not ns.no_compile:
                # One graph per M (static shapes), as the engine compiles a decode step per batch size.
                kernels["compiled"] = torch.compile(small_m, mode=CPU_DECODE_MODE, dynamic=False)
            for name, ms in alternated_ms(kernels, x, ns.repeat).items():
                base.setdefault(name, ms)
                rate = gflops(m, elements, ms)
                row = {"m": m, "kernel": name, "ms": ms, "gbps": nbytes / ms / 1e6, "gflops": rate,
                       "of_fma_peak": rate / peak, "over_m1": ms / base[name]}
                doc["rows"].append(row)
                print(f"{m:>3} {name:<18}{ms:>9.2f}{row['gbps']:>8.1f}{rate:>9.1f}{100 * rate / peak:>7.0f}%"
                      f"{row['over_m1']:>8.2f}", flush=True)
            torch._dynamo.reset()
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
