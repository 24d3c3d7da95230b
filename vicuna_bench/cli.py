"""The ``vicuna-bench`` command line (contract: shared/spec/CLI.md).

Handlers parse and print; the work lives in the drivers
(:mod:`vicuna_bench.drivers`) that sdk-test, the nightly and the pytest
plugin call too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import torch_autoload

# Before torch is first imported (drivers imports it): torch_npu loads only where devices.py asks for it.
torch_autoload.front_end_default()

from . import drivers, settings  # noqa: E402
from .errors import UserError, VicunaBenchError, first_line

log = logging.getLogger("vicuna_bench")

DEFAULT_PROMPT = "What is the capital of France?"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


CONFIG_HELP = ("an INI ([{0}] section) or TOML file of this command's settings, keys the flags without -- "
               "(order: table default < this file < environment < flags)")


def _add_model_options(p: argparse.ArgumentParser, command: str) -> None:
    """The model settings as flags that stay absent unless given (a --config file may set them), and --config."""
    settings.add_to_argparse(p, "model", only_given=True)
    p.add_argument("--config", help=CONFIG_HELP.format(command))
    p.add_argument("--debug", action="store_true", help="full tracebacks")


# The settings-table groups each command offers (flags, --config keys, environment).
COMMAND_GROUPS = {"run": ("model",), "perf": ("model", "perf"), "precision": ("model", "precision")}


def layer_settings(ns: argparse.Namespace, env=None) -> argparse.Namespace:
    """Fill ``ns`` with every offered setting, layered: table default < --config file < environment < flags."""
    offered = settings.select(COMMAND_GROUPS[ns.command])
    flags = {s.dest: getattr(ns, s.dest) for s in offered if hasattr(ns, s.dest)}
    file = settings.read_config_file(ns.config, ns.command, offered) if ns.config else {}
    for dest, value in settings.resolve(offered, file, settings.from_environment(offered, env), flags).items():
        setattr(ns, dest, value)
    return ns


def build_parser() -> argparse.ArgumentParser:
    """The CLI; model, perf and precision options come from the settings table (vicuna_bench/settings.py)."""
    parser = _Parser(prog="vicuna-bench", description="Tensor-parallel Llama-2 inference: run, cut, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="generate text for prompts")
    _add_model_options(run, "run")
    run.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    run.add_argument("--prompt-ids", action="append", default=[],
                     help="raw token ids '1,2,3' (repeatable; no template, no BOS; no tokenizer needed)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--ignore-eos", action="store_true", help="always make --max-new-tokens tokens")
    run.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    run.add_argument("--temperature", type=float, default=None)
    run.add_argument("--top-p", type=float, default=None)
    run.add_argument("--top-k", type=int, default=None)
    run.add_argument("--seed", type=int, default=None, help="sampling seed")
    run.add_argument("--no-chat", action="store_true", help="send text prompts without the chat format")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    perf = sub.add_parser("perf", help="first-token and per-token latency into CSV (the reference's performance test)")
    _add_model_options(perf, "perf")
    settings.add_to_argparse(perf, "perf", only_given=True)
    settings.add_to_argparse(perf, "nightly", only=("progress",), title="progress")  # --no-progress

    cut = sub.add_parser("cut", help="cut a HF checkpoint N ways (vendor layout)")
    cut.add_argument("--input-dir", required=True)
    cut.add_argument("--output-dir", required=True)
    cut.add_argument("--world-size", type=int, required=True)
    cut.add_argument("--debug", action="store_true")

    prec = sub.add_parser("precision", help="MMLU / C-Eval 5-shot accuracy (the reference's precision test)")
    _add_model_options(prec, "precision")
    prec.add_argument("--mode", help="mmlu | ceval (default: chosen from the work dir's data, and said)")
    prec.add_argument("--work-dir", required=True, help="dir holding data/dev and data/val")
    settings.add_to_argparse(prec, "precision", only_given=True)
    prec.add_argument("--gate", action="store_true", help="exit 3 when below the model's release threshold "
                      "(exit 2, before any question, when the model or scoring has none)")
    settings.add_to_argparse(prec, "nightly", only=("progress",), title="progress")  # --no-progress

    nightly = sub.add_parser("nightly", help="hw suite, perf and precision with their gates; REPORT.md, SQLite history")
    from .nightly.runner import add_arguments as add_nightly_arguments

    add_nightly_arguments(nightly)  # the settings table's model/perf/precision options, and its own

    from .sdk import DEFAULT_CHIP_FAMILY, DEFAULT_TASK, DEFAULT_WORLD_SIZE, TASKS
    from .vendor import CONFIG_FILE_NAME

    sdk = sub.add_parser("sdk-test", help="the vendor's run_sdk_test.sh: settings from sdk_config.ini",
                         description="Run the vendor SDK's test with its sdk_config.ini (docs/vendor-dropin.md). "
                                     "Model flags given here win over the INI.")
    sdk.add_argument("world_size", nargs="?", type=int, default=DEFAULT_WORLD_SIZE, metavar="WORLD_SIZE",
                     help=f"ranks (default {DEFAULT_WORLD_SIZE})")
    sdk.add_argument("chip_family", nargs="?", default=DEFAULT_CHIP_FAMILY, choices=settings.CHIP_FAMILY_NAMES,
                     metavar="DEVICE_TYPE", help=f"NPU chip family d9 | d3 (default {DEFAULT_CHIP_FAMILY})")
    sdk.add_argument("task", nargs="?", default=DEFAULT_TASK, choices=TASKS, metavar="TASK",
                     help=f"{' | '.join(TASKS)} (default {DEFAULT_TASK})")
    sdk.add_argument("--config", default=CONFIG_FILE_NAME, help=f"the INI file (default ./{CONFIG_FILE_NAME})")
    settings.add_to_argparse(sdk, "model", exclude=("world-size", "device-type"), only_given=True)
    sdk.add_argument("--debug", action="store_true", help="full tracebacks")
    settings.add_to_argparse(sdk, "nightly", only=("progress",), title="progress")  # --no-progress

    from . import compare

    cmp = sub.add_parser("compare", help="A/B: per case, both medians, B/A with its 95%% CI and a verdict",
                         description="Compare two perf runs case by case (docs/perf.md, 'Comparing two runs').")
    for name in ("A", "B"):
        cmp.add_argument(name.lower(), metavar=name,
                         help="a perf output directory, a *_samples.json, or a run id of the nightly history")
    cmp.add_argument("--history", default=settings.BY_KEY["nightly.history"].default,
                     help="the nightly history that run ids refer to (default %(default)s)")
    cmp.add_argument("--output", default=compare.DEFAULT_OUTPUT, help="the markdown file (default ./%(default)s)")
    cmp.add_argument("--min-effect", type=float, default=compare.DEFAULT_MIN_EFFECT,
                     help="B/A must move by more than this fraction besides being significant (default %(default)s)")
    cmp.add_argument("--fail-on", choices=("slower",), help="exit 3 when any figure is slower in B")
    cmp.add_argument("--debug", action="store_true", help="full tracebacks")
    return parser


def parse_args(argv: list[str] | None = None, env=None) -> argparse.Namespace:
    """The command line parsed, a command's settings layered over its --config file and the environment."""
    ns = build_parser().parse_args(argv)
    return layer_settings(ns, env) if ns.command in COMMAND_GROUPS else ns


def main(argv: list[str] | None = None) -> int:
    with settings.front_end("cli"):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ns = build_parser().parse_args(argv)  # layered below, where a bad --config is a one-line error
    logging.basicConfig(level=logging.INFO, format="vicuna-bench: %(message)s", stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        handlers = {"run": cmd_run, "cut": cmd_cut, "precision": cmd_precision, "perf": cmd_perf,
                    "sdk-test": cmd_sdk_test, "nightly": cmd_nightly,
                    "compare": cmd_compare}
        if ns.command in COMMAND_GROUPS:
            layer_settings(ns)
        return handlers[ns.command](ns)
    except VicunaBenchError as exc:
        if ns.debug:
            raise
        print(f"vicuna-bench {ns.command}: error: {first_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vicuna-bench: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ helpers

def model_settings(ns: argparse.Namespace) -> dict:
    """The model options of a command (the settings table's model group, by dest)."""
    return settings.from_namespace(ns, "model")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise UserError(f"--prompt-ids {text!r}: no token ids")
    return ids


def _sampling(ns):
    from .generation import SamplingConfig

    sampling_flags = (ns.temperature, ns.top_p, ns.top_k, ns.seed)
    if ns.greedy and any(v is not None for v in sampling_flags):
        raise UserError("--greedy cannot be combined with --temperature/--top-p/--top-k/--seed")
    if all(v is None for v in sampling_flags):
        return SamplingConfig()
    return SamplingConfig(
        temperature=1.0 if ns.temperature is None else ns.temperature,
        top_k=ns.top_k or 0,
        top_p=1.0 if ns.top_p is None else ns.top_p,
        seed=ns.seed or 0,
    )


# ------------------------------------------------------------------ commands

def cmd_run(ns: argparse.Namespace) -> int:
    from .jobs import GenerateJob

    sampling = _sampling(ns)
    texts = list(ns.prompt) if (ns.prompt or ns.prompt_ids) else [DEFAULT_PROMPT]

    def stream(tokenizer, prompts):
        return _TextStream(tokenizer) if (tokenizer and not ns.json and len(prompts) == 1) else None

    job = GenerateJob(texts, [_parse_ids(text) for text in ns.prompt_ids], ns.max_new_tokens, chat=not ns.no_chat,
                      ignore_eos=ns.ignore_eos, sampling=sampling, stream=stream)
    spec = drivers.resolve_spec(model_settings(ns), [job])
    (result,) = drivers.run_jobs(spec, [job])
    if not result.writer:
        return 0
    if ns.json:
        doc = {
            "outputs": [
                {"prompt_ids": p, "output_ids": o, "text": t}
                for p, o, t in zip(result.prompts, result.output_ids, result.texts)
            ],
            "first_token_ms": round(result.first_token_ms, 3),
            "next_token_ms": round(result.next_token_ms, 3),
            "world_size": spec.world_size,
            "device": spec.device,
            "dtype": spec.dtype,
            "model": spec.model_path,
        }
        print(json.dumps(doc, ensure_ascii=False))
    else:
        if job.on_tokens is not None:
            job.on_tokens.finish()
        else:
            for i, (text, ids) in enumerate(zip(result.texts, result.output_ids)):
                print(f"[{i}] {text if text is not None else ' '.join(map(str, ids))}")
        log.info("first token %.1f ms, next token %.1f ms", result.first_token_ms, result.next_token_ms)
    return 0


class _TextStream:
    """Prints a single row's text as its tokens arrive."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, step_ids: list[int]) -> None:
        if step_ids[0] < 0:
            return
        self.ids.append(step_ids[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_perf(ns: argparse.Namespace) -> int:
    from . import launch, perf, sweep

    values = settings.from_namespace(ns, "perf")
    job = perf.PerfJob.from_values(values, Path(ns.output_dir or "."), progress=ns.progress)
    batch_sizes = sweep.parse_batch_sizes(values["batch_sizes"])
    if batch_sizes is not None:
        return _cmd_perf_sweep(ns, sweep.SweepJob(job, batch_sizes))
    (run,) = drivers.run_jobs(model_settings(ns), [job])
    if not launch.is_writer():
        return 0
    log.info("perf results:\n%s", perf.summary_table(run))
    log.info("perf: wrote %s", ", ".join(str(p) for p in run.paths.values()))
    job.gate()
    return 0


def _cmd_perf_sweep(ns: argparse.Namespace, job) -> int:
    """``perf --batch-sizes``: the cases at each batch size on one engine, the curve and its verdicts."""
    from . import launch, perf, sweep

    (result,) = drivers.run_jobs(model_settings(ns), [job])
    if not launch.is_writer():
        return 0
    for run in result.runs:
        log.info("perf results, batch %d:\n%s", run.settings.batch_size, perf.summary_table(run))
    log.info("perf sweep:\n%s", sweep.summary(result))
    log.info("perf: wrote %s", ", ".join(str(p) for run in result.runs for p in run.paths.values()))
    log.info("perf sweep: wrote %s", ", ".join(str(p) for p in result.paths.values()))
    return 0


def cmd_precision(ns: argparse.Namespace) -> int:
    from .precision import PrecisionConfig, PrecisionJob
    from .precision.data import resolve_mode

    mode = resolve_mode(ns.mode, ns.work_dir)
    cfg = PrecisionConfig.from_values(settings.from_namespace(ns, "precision"), mode=mode, work_dir=ns.work_dir,
                                      gate=ns.gate, progress=ns.progress)
    job = PrecisionJob(cfg)  # bad data is reported before the model loads
    # --gate: refused before any question when nothing can judge it; under torchrun every rank asks, rank 0 writes.
    (result,) = drivers.run_jobs(model_settings(ns), [job])
    if result.summary is None:
        return 0
    log.info("precision: wrote %s", cfg.out_dir / "summary.json")
    return 0


def cmd_sdk_test(ns: argparse.Namespace) -> int:
    from . import sdk

    flags = {s.dest: getattr(ns, s.dest) for s in settings.group("model")
             if hasattr(ns, s.dest) and s.dest not in ("world_size", "chip_family")}  # those are positional
    test = sdk.prepare(ns.world_size, ns.chip_family, ns.task, ns.config, flags=flags, progress=ns.progress)
    paths = sdk.run(test)
    if paths:
        log.info("sdk-test %s: wrote %s", ns.task, ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_cut(ns: argparse.Namespace) -> int:
    from .checkpoint import cut_checkpoint

    if ns.world_size < 1:
        raise UserError(f"--world-size {ns.world_size} must be >= 1")
    manifest = cut_checkpoint(Path(ns.input_dir), Path(ns.output_dir), ns.world_size)
    log.info("cut %s into %d parts at %s (%d files)", ns.input_dir, ns.world_size, ns.output_dir, len(manifest["files"]))
    return 0


def cmd_nightly(ns: argparse.Namespace) -> int:
    from .nightly.runner import main as nightly_main

    return nightly_main(vars(ns))  # absent flags stay absent: a --config file may set them


def cmd_compare(ns: argparse.Namespace) -> int:
    from . import compare

    compare.run(ns.a, ns.b, history=ns.history, output=ns.output, min_effect=ns.min_effect, fail_on=ns.fail_on)
    return 0
