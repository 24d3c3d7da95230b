"""Next-token time at batch B against batch 1, in one engine, the two timed in alternation.

Issue 24's batch goal is a ratio of two figures taken on a host whose
memory bandwidth drifts by ~20% from minute to minute: timed in separate
runs, the ratio measures the drift as much as the engine.  Here one
engine (``--compile`` as given) serves both batch sizes (each with its
own KV cache and compiled step, made before any timing), and each round
times ``--repeat`` generations at batch 1 and then at batch B.  Prints
each round's medians, their ratio, and the median ratio over rounds.

``--amx both`` (bf16, where the AMX tiles are usable) times each batch size
twice a round, once with the kernel's AMX tiles and once on its vector
path (the same compiled steps: the kernel reads the switch at each call),
and adds the per-round ratio tiles / vector for each batch size.

    python benchmarks/bench_batch.py                         # embedded SmolLM2-135M, fp32, batch 8 vs 1
    python benchmarks/bench_batch.py --dtype bf16 --rounds 5 --json batch.json
    python benchmarks/bench_batch.py --dtype bf16 --amx both --rounds 5

Never run it beside other busy processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from bench_peers import (cpu_flags, prompts_for, read_bandwidth, round_figures, timed_generations, timed_rounds,
                         whole_rounds)
from vicuna_bench import checkpoint, cpu_kernels
from vicuna_bench.devices import cpu_model_name
from vicuna_bench.runtime import Engine, usable_cpus
from vicuna_bench.spec import ModelChoices, resolve_engine_spec


class BatchTimer:
    """Generations of ``prompts`` on an engine another timer may share; :meth:`run` as bench_peers' timers."""

    def __init__(self, engine, prompts, seq_out: int):
        self.engine, self.prompts, self.seq_out = engine, prompts, seq_out

    def run(self, repeat: int) -> list[tuple[float, float]]:
        return timed_generations(self.engine, self.prompts, self.seq_out, repeat)


class AmxTimer:
    """A timer whose runs put the bf16 products of ``rows`` ((lo, hi); (0, 0): none) on the AMX tiles."""

    def __init__(self, timer, rows: tuple[int, int]):
        self.timer, self.rows = timer, rows

    def run(self, repeat: int) -> list[tuple[float, float]]:
        with cpu_kernels.amx_rows(*self.rows):
            return self.timer.run(repeat)


def batch_ratios(one: dict, many: dict) -> dict:
    """``many`` over ``one`` next-token ms, each round's and their median (``one``/``many``: round_figures)."""
    ratios = [m["next_token_ms"] / o["next_token_ms"] for o, m in zip(one["rounds"], many["rounds"], strict=True)]
    return {"ratio_by_round": ratios, "median_ratio": statistics.median(ratios)}


def ratio_line(what: str, ratios: dict) -> str:
    return (f"{what} next token by round: {' '.join(f'{r:.2f}' for r in ratios['ratio_by_round'])} "
            f"(median {ratios['median_ratio']:.2f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=8, help="the batch compared with batch 1")
    p.add_argument("--seq-in", type=int, default=256)
    p.add_argument("--seq-out", type=int, default=64)
    p.add_argument("--rounds", type=whole_rounds, default=5)
    p.add_argument("--repeat", type=int, default=2, help="timed generations per batch size per round")
    p.add_argument("--compile", default="on", choices=["on", "off"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all this process may use)")
    p.add_argument("--amx", default="host", choices=["host", "both"],
                   help="both: time each batch size with the kernel's AMX tiles and without, alternated (bf16)")
    p.add_argument("--json", default=None, help="write every figure here")
    ns = p.parse_args(argv)
    if ns.batch < 2:
        p.error(f"--batch {ns.batch}: compare a batch of 2 or more with batch 1")
    if ns.amx == "both" and ns.dtype != "bf16":
        p.error(f"--amx both --dtype {ns.dtype}: the AMX tiles take bf16 products only")

    threads = ns.threads or usable_cpus()
    torch.set_num_threads(threads)
    base = resolve_engine_spec(ModelChoices(ns.model_path, 1, "cpu", ns.dtype, ns.seq_in + ns.seq_out), progress=False)
    spec = type(base)(**{**base.__dict__, "compile": ns.compile})
    args = checkpoint.read_model_args(Path(base.model_path))
    if ns.amx == "both":
        why_not = (cpu_kernels.status()["small_m_gemm_why_not"] if not cpu_kernels.load()
                   else cpu_kernels.paths_record()["amx"])
        if why_not != "usable":
            print(f"--amx both: the kernel's AMX tiles are not usable here: {why_not}", file=sys.stderr)
            return 2
    read_gbps = read_bandwidth() / 1e9
    names = ("batch 1", f"batch {ns.batch}")
    with Engine(spec) as engine:
        timers = {name: BatchTimer(engine, prompts_for(args.vocab_size, b, ns.seq_in), ns.seq_out)
                  for name, b in zip(names, (1, ns.batch))}
        for timer in timers.values():
            timer.run(1)  # compiles this batch's step and fills its KV cache outside the timing
        if ns.amx == "both":
            timers = {f"{name}{tag}": AmxTimer(timer, rows) for name, timer in timers.items()
                      for tag, rows in ((" AMX", (1, ns.batch)), (" vector", (0, 0)))}
        columns = {name: round_figures(runs) for name, runs in timed_rounds(timers, ns.rounds, ns.repeat).items()}
    tags = (" AMX", " vector") if ns.amx == "both" else ("",)
    ratios = {tag.strip() or "host": batch_ratios(columns[names[0] + tag], columns[names[1] + tag]) for tag in tags}
    amx_ratios = ({name: batch_ratios(columns[f"{name} vector"], columns[f"{name} AMX"]) for name in names}
                  if ns.amx == "both" else {})
    doc = {"machine": {"cpu": cpu_model_name(), "flags": cpu_flags(), "threads": threads, "torch": torch.__version__},
           "model": base.model_path, "dtype": ns.dtype, "compile": ns.compile, "seq_in": ns.seq_in,
           "seq_out": ns.seq_out, "rounds": ns.rounds, "repeat": ns.repeat, "read_gbps": read_gbps,
           "amx": ns.amx, "linear_paths": cpu_kernels.paths_record(), "columns": columns,
           "next_token_batch_over_batch_1": ratios, "next_token_amx_over_vector": amx_ratios}
    m = doc["machine"]
    print(f"{m['cpu']} ({', '.join(m['flags']) or 'no AVX flags read'}), {threads} threads, torch {m['torch']}; "
          f"read {read_gbps:.1f} GB/s")
    print(f"{Path(base.model_path).name} {ns.dtype}, --compile {ns.compile}, {ns.seq_in} in / {ns.seq_out} out, "
          f"{ns.rounds} rounds of {ns.repeat} run(s) per batch size, in alternation")
    for name, col in columns.items():
        by_round = " ".join(f"{r['next_token_ms']:.2f}" for r in col["rounds"])
        print(f"{name:<10} next ms {col['next_token_ms']:7.2f}  by round: {by_round}")
    for tag, r in ratios.items():
        print(ratio_line(f"batch {ns.batch} / batch 1{'' if tag == 'host' else f' ({tag})'}", r))
    for name, r in amx_ratios.items():
        print(ratio_line(f"{name}: AMX / vector", r))
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
