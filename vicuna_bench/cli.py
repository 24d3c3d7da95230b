"""The ``vicuna-bench`` command line (contract: shared/spec/CLI.md).

Handlers parse and print; the work lives in the engine, checkpoint, perf
and precision modules that the pytest layer calls too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError, VicunaBenchError

log = logging.getLogger("vicuna_bench")

DEFAULT_PROMPT = "What is the capital of France?"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-path", help="HF model dir or a cut dir; default (or 'embedded'): the embedded SmolLM2-135M-Instruct")
    g.add_argument("--world-size", type=int, default=1, help="tensor-parallel ranks (default 1)")
    g.add_argument("--device", default="auto", help="cpu | cuda | npu (default: npu, else cuda, else cpu)")
    g.add_argument("--device-type", default="d9", help="NPU chip family d9 | d3 (ignored elsewhere)")
    g.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16 (auto: checkpoint dtype, fp32 on CPU)")
    g.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default $MAX_SEQ_LENGTH, else 2048)")
    g.add_argument("--debug", action="store_true", help="full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vicuna-bench", description="Tensor-parallel Llama-2 inference: run, cut, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="generate text for prompts")
    _add_model_options(run)
    run.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    run.add_argument("--prompt-ids", action="append", default=[], help="raw token ids '1,2,3' (repeatable; no template, no BOS)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--ignore-eos", action="store_true", help="always make --max-new-tokens tokens")
    run.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    run.add_argument("--temperature", type=float, default=None)
    run.add_argument("--top-p", type=float, default=None)
    run.add_argument("--top-k", type=int, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--no-chat", action="store_true", help="send text prompts without the chat format")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    perf = sub.add_parser("perf", help="first-token and per-token latency into CSV (the reference's performance test)")
    _add_model_options(perf)
    perf.add_argument("--batch-size", type=int, default=1)
    perf.add_argument("--case-pair", default=None, help='cases as [[seq_in, seq_out], ...]; overrides the sweep')
    perf.add_argument("--min-len-exp", type=int, default=None, help="sweep: smallest power of two (default 5)")
    perf.add_argument("--max-len-exp", type=int, default=None, help="sweep: largest power of two (default 10)")
    perf.add_argument("--perf-mode", default="detail", help="detail (every forward timed) | normal (the reference's two generations)")
    perf.add_argument("--repeat", type=int, default=1, help="runs of each case (percentiles over them)")
    perf.add_argument("--model-name", default=None, help="name in the CSV file name (default: the model directory's)")
    perf.add_argument("--output-dir", default=".", help="where the CSVs, samples JSON and plot go (default .)")
    perf.add_argument("--baseline", default=None, help="a reference or extended CSV of an earlier run: exit 3 on a slowdown")
    perf.add_argument("--tolerance", type=float, default=0.10, help="allowed slowdown against --baseline (default 0.10)")
    perf.add_argument("--seed", type=int, default=0, help="seed of the random input ids")
    perf.add_argument("--mem-bandwidth", type=float, default=None,
                      help="device memory bandwidth in GB/s for the decode roofline (default: measured by a copy probe)")
    perf.add_argument("--no-progress", action="store_true", help="no progress bar")

    cut = sub.add_parser("cut", help="cut a HF checkpoint N ways (vendor layout)")
    cut.add_argument("--input-dir", required=True)
    cut.add_argument("--output-dir", required=True)
    cut.add_argument("--world-size", type=int, required=True)
    cut.add_argument("--debug", action="store_true")

    prec = sub.add_parser("precision", help="MMLU / C-Eval 5-shot accuracy (the reference's precision test)")
    _add_model_options(prec)
    prec.add_argument("--mode", required=True, help="mmlu | ceval")
    prec.add_argument("--work-dir", required=True, help="dir holding data/dev and data/val")
    prec.add_argument("--batch", type=int, default=1, help="questions per batch (left padded; same answers as 1)")
    prec.add_argument("--shot", type=int, default=5, help="dev rows shown before each question (default 5)")
    prec.add_argument("--seq-len-out", type=int, default=2, help="tokens generated per answer (default 2)")
    prec.add_argument("--max-prompt-tokens", type=int, default=2000, help="drop shots until the prompt fits (default 2000)")
    prec.add_argument("--scoring", default="generate", help="generate (reference) | logits | both (one pass)")
    prec.add_argument("--subjects", default=None, help="comma list of subjects (default: all)")
    prec.add_argument("--limit-per-subject", type=int, default=None, help="first K val questions of each subject")
    prec.add_argument("--too-long", default="exclude", help="a question no prompt fits: exclude (listed) | wrong")
    prec.add_argument("--output-dir", default=None, help="result dir (default WORK_DIR/test_result)")
    prec.add_argument("--gate", action="store_true", help="exit 3 when below the model's release threshold")
    prec.add_argument("--gate-model", default=None, help="thresholds.json model to gate against (default: recognised)")
    prec.add_argument("--tolerance", type=float, default=None, help="gate tolerance in points (default thresholds.json)")
    prec.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="vicuna-bench: %(message)s", stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return {"run": cmd_run, "cut": cmd_cut, "precision": cmd_precision, "perf": cmd_perf}[ns.command](ns)
    except VicunaBenchError as exc:
        if ns.debug:
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"vicuna-bench {ns.command}: error: {first_line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vicuna-bench: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ helpers

def resolve_engine_spec(ns: argparse.Namespace):
    """EngineSpec from the common model options (embedded model when no path)."""
    from .runtime import resolve_engine_spec as resolve

    if ns.device_type not in ("d9", "d3"):
        raise UserError(f"--device-type {ns.device_type!r} is not supported (valid: d9, d3)")
    return resolve(ns.model_path, ns.world_size, ns.device, ns.dtype, ns.max_seq_len)


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
    from . import checkpoint
    from .chat import encode_prompt, load_tokenizer
    from .runtime import Engine, init_from_env, launched_by_torchrun, reduce_max

    spec = resolve_engine_spec(ns)
    sampling = _sampling(ns)
    tokenizer = load_tokenizer(checkpoint.tokenizer_dir(Path(spec.model_path)))
    prompts = [encode_prompt(tokenizer, text, chat=not ns.no_chat) for text in ns.prompt]
    prompts += [_parse_ids(text) for text in ns.prompt_ids]
    if not prompts:
        prompts = [encode_prompt(tokenizer, DEFAULT_PROMPT, chat=not ns.no_chat)]
    torchrun = launched_by_torchrun()
    if torchrun:  # the in-process Engine logs the same line itself
        log.info(
            "torchrun rank %s: model=%s world_size=%d device=%s dtype=%s max_seq_len=%d",
            os.environ.get("RANK", "?"), spec.model_path, spec.world_size, spec.device, spec.dtype, spec.max_seq_len,
        )
    stream = _TextStream(tokenizer) if (not ns.json and len(prompts) == 1) else None
    kwargs = dict(ignore_eos=ns.ignore_eos, sampling=sampling)
    if torchrun:
        import torch.distributed as dist

        runner = init_from_env(spec)
        is_main = runner.rank == 0
        request = {"prompts": prompts, "max_new_tokens": ns.max_new_tokens, **kwargs}
        result = runner.generate(request, on_tokens=stream if is_main else None)
        times = reduce_max([result.first_token_ms] + result.step_ms)
        result.first_token_ms, result.step_ms = times[0], times[1:]
        if dist.is_initialized():
            dist.destroy_process_group()
    else:
        is_main = True
        with Engine(spec) as engine:
            result = engine.generate(prompts, ns.max_new_tokens, on_tokens=stream, **kwargs)
    if not is_main:
        return 0
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result.output_ids]
    if ns.json:
        doc = {
            "outputs": [
                {"prompt_ids": p, "output_ids": o, "text": t} for p, o, t in zip(prompts, result.output_ids, texts)
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
        if stream is not None:
            stream.finish()
        else:
            for i, text in enumerate(texts):
                print(f"[{i}] {text}")
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


def perf_settings(ns: argparse.Namespace):
    """PerfSettings from the perf options (model-independent checks only)."""
    from . import perf

    cases = perf.select_cases(ns.case_pair, ns.min_len_exp, ns.max_len_exp)
    return perf.PerfSettings(
        cases=cases, batch_size=ns.batch_size, mode=ns.perf_mode, repeat=ns.repeat,
        model_name=ns.model_name or "model", seed=ns.seed, mem_bandwidth_gbps=ns.mem_bandwidth,
    )


def cmd_perf(ns: argparse.Namespace) -> int:
    from . import perf
    from .runtime import Engine, SpmdEngine, launched_by_torchrun

    settings = perf_settings(ns)
    settings.validate(max_seq_len=1 << 62)  # all but the lengths: those need the model's settings
    baseline = perf.load_baseline(Path(ns.baseline)) if ns.baseline else None
    if baseline is not None and not ns.tolerance >= 0:
        raise UserError(f"--tolerance {ns.tolerance} must be >= 0")
    spec = resolve_engine_spec(ns)
    if ns.model_name is None:
        settings.model_name = perf.default_model_name(spec.model_path)
    settings.validate(spec.max_seq_len)
    if baseline is not None and not any((settings.batch_size, c.seq_in, c.seq_out) in baseline.rows for c in settings.cases):
        raise UserError(f"--baseline {ns.baseline}: it holds none of this run's cases (batch size {settings.batch_size})")
    output_dir = Path(ns.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is not a directory")
    engine = SpmdEngine(spec) if launched_by_torchrun() else Engine(spec)
    with engine:
        is_main = getattr(engine, "rank", 0) == 0
        run = perf.run_perf(engine, settings, output_dir=output_dir, progress=is_main and not ns.no_progress,
                            write=is_main)
    if not is_main:
        return 0
    log.info("perf: wrote %s{.csv,_extended.csv,_samples.json,.png} in %s", run.stem, output_dir)
    if baseline is not None:
        perf.gate(run, baseline, ns.tolerance)
    return 0


def cmd_precision(ns: argparse.Namespace) -> int:
    from .precision import PrecisionConfig, load_dataset, run_precision

    cfg = PrecisionConfig(
        mode=ns.mode, work_dir=ns.work_dir, output_dir=ns.output_dir, batch=ns.batch, shot=ns.shot,
        seq_len_out=ns.seq_len_out, max_prompt_tokens=ns.max_prompt_tokens, scoring=ns.scoring,
        subjects=[s for s in ns.subjects.split(",") if s] if ns.subjects else None,
        limit_per_subject=ns.limit_per_subject, too_long=ns.too_long, gate=ns.gate,
        gate_model=ns.gate_model, tolerance=ns.tolerance, progress=not ns.no_progress,
    )
    cfg.check()
    load_dataset(cfg.mode, cfg.work_dir)  # bad data is reported before the model is touched
    summary = run_precision(cfg, resolve_engine_spec(ns))
    log.info("precision: wrote %s", cfg.out_dir / "summary.json")
    if ns.gate and summary["gate"]["status"] == "skipped":
        log.warning("gate skipped: %s", summary["gate"]["reason"])
    return 0


def cmd_cut(ns: argparse.Namespace) -> int:
    from .checkpoint import cut_checkpoint

    if ns.world_size < 1:
        raise UserError(f"--world-size {ns.world_size} must be >= 1")
    manifest = cut_checkpoint(Path(ns.input_dir), Path(ns.output_dir), ns.world_size)
    log.info("cut %s into %d parts at %s (%d files)", ns.input_dir, ns.world_size, ns.output_dir, len(manifest["files"]))
    return 0
