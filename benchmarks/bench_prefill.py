"""First-token time of our eager and compiled prefill at prompt lengths up to 2048, in one run.

Both engines (``--compile off`` and ``on``) load the same weights in one
process and time the same prompts, alternating, the median of ``--repeat``
after a warm-up (the compiled prefill is one dynamic-shape graph for every
length: its compile time is reported apart, never inside a first token).
Prints compiled / eager per length: the evidence for issue 24's "prefill
compiled <= eager at every length up to 2048".  Never run it beside other
busy processes.

    python benchmarks/bench_prefill.py --dtype bf16 --lengths 128,256,512,1024,2048 --json prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from vicuna_bench.runtime import Engine, usable_cpus
from vicuna_bench.spec import ModelChoices, resolve_engine_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir (default: the embedded model)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--lengths", default="128,256,512,1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)

    from bench_peers import cpu_flags, prompts_for  # this folder's helpers (the script's folder is on sys.path)

    threads = usable_cpus()
    torch.set_num_threads(threads)
    lengths = [int(v) for v in ns.lengths.split(",")]
    base = resolve_engine_spec(ModelChoices(ns.model_path, 1, "cpu", ns.dtype, max(lengths) + 1), progress=False)
    engines = {mode: Engine(type(base)(**{**base.__dict__, "compile": mode})) for mode in ("off", "on")}
    from vicuna_bench import checkpoint

    vocab = checkpoint.read_model_args(Path(base.model_path)).vocab_size
    doc = {"model": base.model_path, "dtype": ns.dtype, "batch": ns.batch, "threads": threads, "flags": cpu_flags(),
           "torch": torch.__version__, "rows": []}
    print(f"{Path(base.model_path).name} {ns.dtype}, batch {ns.batch}, {threads} threads, flags {' '.join(cpu_flags())}")
    print(f"{'length':>7}{'eager ms':>10}{'compiled ms':>13}{'compiled/eager':>16}")
    try:
        for length in lengths:
            prompts = prompts_for(vocab, ns.batch, length)
            times = {mode: [] for mode in engines}
            compile_ms = 0.0
            for mode, engine in engines.items():  # warm-up: the compiled engine compiles here (once: dynamic)
                compile_ms += engine.generate(prompts, 1, ignore_eos=True).compile_ms
            for _ in range(ns.repeat):
                for mode, engine in engines.items():
                    times[mode].append(engine.generate(prompts, 1, ignore_eos=True).first_token_ms)
            eager, compiled = (statistics.median(times[m]) for m in ("off", "on"))
            row = {"length": length, "eager_ms": eager, "compiled_ms": compiled, "ratio": compiled / eager,
                   "compile_ms_in_warmup": compile_ms}
            doc["rows"].append(row)
            print(f"{length:>7}{eager:>10.1f}{compiled:>13.1f}{compiled / eager:>16.2f}", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
