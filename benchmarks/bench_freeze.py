"""Frozen against unfrozen CPU graphs (inductor ``freezing``), or the decode step as an AOTInductor package against
the step through dynamo (``--option aoti``): four engines in one process, built A B B A.

Two engines built one after the other in one process with the same options do not time alike: in an A/A run the
second was 3-5% faster in every round (docs/PERFORMANCE.md, sixth pass).  So this builds four engines in the order
unfrozen, frozen, frozen, unfrozen (every other option as the engine chooses it for the dtype), makes each one's
graphs for every batch size before any timing, then each round times every engine's generations at each batch size
in alternation, and gives per round the mean of the frozen pair over the mean of the unfrozen pair, for the next
token and the first.  The engine's own choice (``compile.cpu_inductor_options``) rests on these ratios.  With
``--option aoti`` the pairs are the packaged step (``vicuna_bench/aoti.py``) and the step through dynamo
(``VICUNA_BENCH_AOTI=0`` while an engine is built), every other option as the engine chooses it.

    python benchmarks/bench_freeze.py --dtype bf16 --batches 1,8 --rounds 3 --json freeze.json
    python benchmarks/bench_freeze.py --option aoti --dtype fp32 --batches 1,8 --rounds 6 --json aoti.json

Four copies of the weights are held at once.  Never run it beside other busy processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

from bench_batch import BatchTimer
from bench_peers import (cpu_flags, prompts_for, read_bandwidth, round_figures, timed_rounds, versus_by_round,
                         versus_line, whole_rounds)
from vicuna_bench import aoti, checkpoint
from vicuna_bench import compile as vb_compile
from vicuna_bench.devices import cpu_model_name
from vicuna_bench.runtime import Engine, usable_cpus
from vicuna_bench.spec import ModelChoices, resolve_engine_spec

ORDER = (False, True, True, False)  # the option on or off, by build order


@contextlib.contextmanager
def freezing(on: bool):
    """The engine's CPU inductor options with ``freezing`` set to ``on``, for the engines built inside."""
    chosen = vb_compile.cpu_inductor_options

    def options(world_size: int = 1, dtype: str = "fp32") -> dict:
        return {**chosen(world_size, dtype), "freezing": on}

    vb_compile.cpu_inductor_options = options
    try:
        yield
    finally:
        vb_compile.cpu_inductor_options = chosen


def packaged(on: bool):
    """``VICUNA_BENCH_AOTI`` set to 1 or 0 while the engines inside are built (their compile path is chosen then)."""
    return mock.patch.dict(os.environ, {aoti.ENV_SWITCH: "1" if on else "0"})


# --option: how an engine is built with the option on or off, and the names of the two kinds.
OPTIONS = {"freezing": (freezing, {False: "unfrozen", True: "frozen"}),
           "aoti": (packaged, {False: "dynamo", True: "packaged"})}


def pair_means(columns: dict, batch: int, on: bool, names: dict) -> list[dict]:
    """Per round: the first/next-token ms of the pair of engines with the option ``on`` (or off) at ``batch``,
    averaged."""
    names = [f"b{batch} {names[f]} #{i}" for i, f in enumerate(ORDER) if f == on]
    return [{key: statistics.mean(columns[n]["rounds"][r][key] for n in names)
             for key in ("first_token_ms", "next_token_ms")} for r in range(len(columns[names[0]]["rounds"]))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--option", default="freezing", choices=sorted(OPTIONS),
                   help="freezing: frozen / unfrozen graphs; aoti: the decode step packaged / through dynamo")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--seq-in", type=int, default=256)
    p.add_argument("--seq-out", type=int, default=64)
    p.add_argument("--rounds", type=whole_rounds, default=3)
    p.add_argument("--repeat", type=int, default=2, help="timed generations per engine per batch size per round")
    p.add_argument("--compile", default="on", choices=["on", "off"], help="off: the arithmetic only (no graphs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all this process may use)")
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    batches = [int(b) for b in ns.batches.split(",")]
    build_with, names = OPTIONS[ns.option]
    ratio_key = f"{names[True]}_over_{names[False]}"

    threads = ns.threads or usable_cpus()
    torch.set_num_threads(threads)
    base = resolve_engine_spec(ModelChoices(ns.model_path, 1, "cpu", ns.dtype, ns.seq_in + ns.seq_out),
                               progress=False)
    spec = type(base)(**{**base.__dict__, "compile": ns.compile})
    args = checkpoint.read_model_args(Path(spec.model_path))
    doc = {"machine": {"cpu": cpu_model_name(), "flags": cpu_flags(), "threads": threads, "torch": torch.__version__},
           "model": spec.model_path, "option": ns.option, "dtype": ns.dtype, "compile": ns.compile, "seq_in": ns.seq_in,
           "seq_out": ns.seq_out, "rounds": ns.rounds, "repeat": ns.repeat, "engines": []}
    timers = {}
    with contextlib.ExitStack() as stack:
        for i, on in enumerate(ORDER):
            with build_with(on):
                built = {"freezing": vb_compile.cpu_inductor_options(1, ns.dtype)["freezing"], "aoti": aoti.enabled()}
                engine = stack.enter_context(Engine(spec))
                for b in batches:
                    timer = BatchTimer(engine, prompts_for(args.vocab_size, b, ns.seq_in), ns.seq_out)
                    timer.run(1)  # its graphs and KV cache, before any timing
                    timers[f"b{b} {names[on]} #{i}"] = timer
                doc["engines"].append({"name": names[on], **built, "compile_path": engine.rank_info[0]["compile_path"]})
        by_round = timed_rounds(timers, ns.rounds, ns.repeat)
    doc["read_gbps"] = read_bandwidth() / 1e9
    doc["columns"] = {name: round_figures(runs) for name, runs in by_round.items()}
    doc[ratio_key] = {  # per batch: "next" and "first", each the per-round ratios of the option on / off
        str(b): {what.removesuffix("_token"): ratios for what, ratios in versus_by_round(
            pair_means(doc["columns"], b, True, names), pair_means(doc["columns"], b, False, names)).items()}
        for b in batches}
    print(f"{doc['machine']['cpu']} ({', '.join(doc['machine']['flags'])}), {threads} threads, torch "
          f"{torch.__version__}; read {doc['read_gbps']:.1f} GB/s")
    print(f"{Path(spec.model_path).name} {ns.dtype}, --compile {ns.compile}, {ns.seq_in} in / {ns.seq_out} out; "
          f"engines built {', '.join(e['name'] for e in doc['engines'])}; {ns.rounds} rounds of {ns.repeat} run(s)")
    for b in batches:
        for i, on in enumerate(ORDER):
            column = doc["columns"][f"b{b} {names[on]} #{i}"]
            print(f"batch {b} engine {i} ({names[on]:<8}) next ms {column['next_token_ms']:8.2f}  "
                  f"first ms {column['first_token_ms']:8.1f}")
        for what, got in doc[ratio_key][str(b)].items():
            print(versus_line(f"batch {b} {names[True]} / {names[False]} {what} token", got))
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
