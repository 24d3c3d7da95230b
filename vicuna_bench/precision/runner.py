"""The precision run: read, prompt, ask (batched), record crash-safely, aggregate, gate.

One job, :class:`PrecisionJob`, serves the CLI (``vicuna-bench
precision``), ``sdk-test``, the nightly and the pytest suites, through
:func:`vicuna_bench.drivers.run_jobs`.  Bad input is found before anything is
written or an engine starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from .. import environment
from ..errors import EngineError, GateFailed, UserError
from . import results as outputs
from ..jobs import Work
from ..settings import BY_KEY, flag
from .data import Dataset, load_dataset, select_subjects
from .gates import evaluate_gate, format_verdicts, gate_lines, gate_model_key, identify_model, load_thresholds
from .prompt import (
    FittedPrompt,
    fit_prompt,
    letter_from_logits,
    letter_from_text,
    letter_token_ids,
)

log = logging.getLogger("vicuna_bench")

SCORINGS = BY_KEY["precision.scoring"].choices  # declared once, in the settings table
TOO_LONG_POLICIES = {
    "exclude": "excluded from the denominator (as the reference does, but counted and listed)",
    "wrong": "counted as wrong answers",
}
assert tuple(TOO_LONG_POLICIES) == BY_KEY["precision.too_long"].choices


@dataclasses.dataclass
class PrecisionConfig:
    """The knobs of one run (``vicuna-bench precision`` flags; defaults: the settings table's)."""

    mode: str
    work_dir: str | Path
    output_dir: str | Path | None = None  # default <work_dir>/test_result
    batch: int = BY_KEY["precision.batch"].default
    shot: int = BY_KEY["precision.shot"].default
    seq_len_out: int = BY_KEY["precision.seq_len_out"].default
    max_prompt_tokens: int = BY_KEY["precision.max_prompt_tokens"].default
    scoring: str = BY_KEY["precision.scoring"].default  # generate | logits | both
    subjects: list[str] | None = None
    limit_per_subject: int | None = None
    prefix_cache: str = BY_KEY["precision.prefix_cache"].default  # on: shared prefix prefilled once | off
    too_long: str = BY_KEY["precision.too_long"].default  # exclude | wrong
    gate: bool = False
    gate_model: str | None = None
    tolerance: float | None = None  # percentage points; None: thresholds.json's
    progress: bool = True

    @classmethod
    def from_values(cls, v: dict, **fields) -> "PrecisionConfig":
        """A config from the settings table's precision group (:func:`vicuna_bench.settings.values`)."""
        subjects = [s for s in v["subjects"].split(",") if s] if v["subjects"] else None
        return cls(**{**v, "subjects": subjects}, **fields)

    def check(self) -> None:
        for name in ("batch", "shot", "seq_len_out", "max_prompt_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag('precision.' + name)} {value} must be an integer >= 1")
        if self.scoring not in SCORINGS:
            raise UserError(f"{flag('precision.scoring')} {self.scoring!r} is not supported "
                            f"(valid: {', '.join(SCORINGS)})")
        if self.too_long not in TOO_LONG_POLICIES:
            raise UserError(f"{flag('precision.too_long')} {self.too_long!r} is not supported "
                            f"(valid: {', '.join(TOO_LONG_POLICIES)})")
        if self.limit_per_subject is not None and self.limit_per_subject < 1:
            raise UserError(f"{flag('precision.limit_per_subject')} {self.limit_per_subject} must be >= 1")
        if self.tolerance is not None and self.tolerance < 0:
            raise UserError(f"{flag('precision.tolerance')} {self.tolerance} must be >= 0")
        if self.gate and (self.subjects or self.limit_per_subject):
            raise UserError(f"--gate judges the full val set: drop {flag('precision.subjects')} / "
                            f"{flag('precision.limit_per_subject')}")

    @property
    def scorings(self) -> list[str]:
        return ["generate", "logits"] if self.scoring == "both" else [self.scoring]

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.work_dir) / "test_result"


def run_settings(cfg: PrecisionConfig, model: str, dtype: str) -> dict:
    """What a resumed run must share with the run that wrote the cache."""
    return {
        "mode": cfg.mode, "scoring": cfg.scoring, "shot": cfg.shot, "seq_len_out": cfg.seq_len_out,
        "max_prompt_tokens": cfg.max_prompt_tokens, "model": model, "dtype": dtype,
    }


def model_label(model_path: str, key: str | None) -> str:
    return key or Path(model_path).resolve().name


class _Existing:
    """What an earlier run left in the output dir, checked against the data and settings."""

    def __init__(self, cfg: PrecisionConfig, dataset: Dataset, settings: dict):
        out = cfg.out_dir
        self.caches = {s: outputs.read_cache(out / f, dataset) for s, f in outputs.cache_files(cfg.scoring).items()}
        self.answers = outputs.read_answers(out / outputs.ANSWERS)
        for rec in list(self.answers.values())[:1]:
            old = rec.get("settings", {})
            for key, value in settings.items():
                if old.get(key) != value:
                    raise UserError(
                        f"{out / outputs.ANSWERS}: written by a run with {key}={old.get(key)!r}, this run has {value!r} "
                        "(use another --output-dir, or the same settings to resume)"
                    )

    def done(self, key) -> bool:
        return all(key in cache for cache in self.caches.values())


@dataclasses.dataclass
class PrecisionRun:
    """A finished precision set: its summary (what summary.json holds), where its files are, the gate's lines.

    ``summary`` is None on the ranks that do not write (torchrun ranks other than 0).
    """

    mode: str
    out_dir: Path
    summary: dict | None
    gate_failure: str | None = None  # the GateFailed message when ``--gate`` failed (files all written)

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.out_dir / name for name in (outputs.SUMMARY, outputs.DEVICE_LOG, "cache.csv")}

    @property
    def gate_lines(self) -> list[str]:
        return gate_lines(self.summary["gate"]) if self.summary is not None else []


@dataclasses.dataclass
class _Prepared:
    """What :meth:`PrecisionJob.check` found with the spec: who judges, what is cached, every prompt fitted."""

    thresholds: dict
    model_key: str | None
    settings: dict
    existing: _Existing
    tokenizer: object
    letter_ids: dict | None
    fitted: list[FittedPrompt]
    too_long: list[FittedPrompt]
    pending: list[FittedPrompt]
    prepare_s: float  # seconds spent here (part of the summary's wall_s)


class PrecisionJob:
    """Run (or resume) one precision set (a :class:`jobs.Job`); works in-process and under torchrun.

    The data is read, its subjects and questions selected when the job is built (bad input refused
    then, ``source`` naming where the mode came from, ``subjects_flag`` what names the subjects, if not
    ``--subjects``); :meth:`check` refuses what the spec rules out
    (prompt + answer over ``max_seq_len``, a ``--gate`` nothing can judge, every question too long),
    fits every prompt and finds the questions the cache lacks, before the engine opens.  Under torchrun
    every rank asks the same questions and rank 0 alone writes.  ``raise_gate`` False returns a failed
    gate in :attr:`PrecisionRun.gate_failure` instead of raising :class:`GateFailed`.
    """

    def __init__(self, cfg: PrecisionConfig, source: str = "--mode", *, subjects_flag: str | None = None,
                 raise_gate: bool = True):
        cfg.check()
        self.cfg = cfg
        self.name = cfg.mode
        self.raise_gate = raise_gate
        self.dataset = load_dataset(cfg.mode, cfg.work_dir, source)
        for subject in (cfg.subjects or []) if subjects_flag else []:  # named as the front end's flag names it
            if subject not in self.dataset.val:
                raise UserError(f"{subjects_flag}: {subject!r} has no {subject}_val.csv in "
                                f"{Path(cfg.work_dir) / 'data' / 'val'}")
        self.subjects = select_subjects(self.dataset, cfg.subjects)
        self.selection = self.dataset.questions(self.subjects, cfg.limit_per_subject)
        self.prepared: _Prepared | None = None
        self._checked = None  # the spec the prepared state is for

    def work(self) -> Work:
        """The questions to ask in batches (all before :meth:`check`, then those the cache lacks)."""
        cfg = self.cfg
        asked = len(self.selection) if self.prepared is None else len(self.prepared.pending)
        new_tokens = cfg.seq_len_out if "generate" in cfg.scorings else 1
        return Work(decode_steps=math.ceil(asked / max(cfg.batch, 1)) * new_tokens,
                    longest_prompt=cfg.max_prompt_tokens, new_tokens=new_tokens, batch=cfg.batch,
                    needs_engine=asked > 0)

    def check(self, spec) -> None:
        """Refuse what ``spec`` rules out and fit every prompt (reads the tokenizer and the cache, no model).

        Checking again with the same spec object before the run does nothing.
        """
        if self.prepared is None or self._checked is not spec:
            self.prepared = _prepare(self.cfg, self.dataset, self.selection, spec)
            self._checked = spec

    def run(self, engine, spec) -> PrecisionRun:
        """Ask what the cache lacks on ``engine`` (None: nothing left to ask), rewrite every file, judge the gate."""
        cfg = self.cfg
        started = time.perf_counter()
        p = self.prepared or _prepare(cfg, self.dataset, self.selection, spec)
        self.prepared = None  # a second run finds what this one cached
        writer = getattr(engine, "rank", 0) == 0
        log.info(
            "precision %s: %d subjects, %d questions, %d already in %s, %d to ask, %d too long for %d tokens",
            cfg.mode, len(self.subjects), len(self.selection), len(self.selection) - len(p.pending) - len(p.too_long),
            cfg.out_dir / "cache.csv", len(p.pending), len(p.too_long), cfg.max_prompt_tokens,
        )
        _same_on_every_rank(engine, [(f.question.subject, f.question.qid) for f in p.pending])
        for f in p.too_long if writer else ():
            log.warning(
                "too long: %s %s needs %d tokens with 1 shot (> %d); %s",
                f.question.subject, f.question.qid, f.tokens, cfg.max_prompt_tokens, TOO_LONG_POLICIES[cfg.too_long],
            )
        # From here on files are written (by rank 0 alone under torchrun; the others ask and return).
        if writer:
            cfg.out_dir.mkdir(parents=True, exist_ok=True)
        asked = (_ask(cfg, engine, p.tokenizer, p.letter_ids, p.pending, p.existing, p.settings, writer) if p.pending
                 else (0.0, {"total": 0, "prefilled": 0}, []))
        if not writer:
            return PrecisionRun(cfg.mode, cfg.out_dir, None)
        summary = finalize(cfg, self.dataset, p.fitted, p.settings, spec, p.model_key, p.thresholds)
        _add_run_facts(summary, cfg, spec, len(p.pending), asked, p.prepare_s + time.perf_counter() - started)
        outputs.write_atomic(cfg.out_dir / outputs.SUMMARY, outputs.json_text(summary))
        table = outputs.category_table(summary)
        log.info("precision results (%s):\n%s", cfg.out_dir, table)
        try:
            _judge(cfg, summary, p.model_key, table)
        except GateFailed as exc:
            if self.raise_gate:
                raise
            return PrecisionRun(cfg.mode, cfg.out_dir, getattr(exc, "summary", None), str(exc))
        return PrecisionRun(cfg.mode, cfg.out_dir, summary)


def _prepare(cfg: PrecisionConfig, dataset: Dataset, selection: list, spec) -> _Prepared:
    """The checks that need the spec, the cache read, every prompt fitted (UserError on bad input, nothing written)."""
    from .. import checkpoint
    from ..chat import load_tokenizer

    started = time.perf_counter()
    if cfg.max_prompt_tokens + cfg.seq_len_out > spec.max_seq_len:
        raise UserError(
            f"{flag('precision.max_prompt_tokens')} {cfg.max_prompt_tokens} + {flag('precision.seq_len_out')} "
            f"{cfg.seq_len_out} exceeds {flag('model.max_seq_len')} {spec.max_seq_len}"
        )
    thresholds = load_thresholds()
    # Whose thresholds judge the run; a gate that nothing could judge is refused here, before anything runs.
    model_key = (gate_model_key(cfg.mode, cfg.scorings, spec.model_path, cfg.gate_model, thresholds) if cfg.gate
                 else identify_model(spec.model_path, cfg.gate_model, thresholds))
    model = model_label(spec.model_path, identify_model(spec.model_path, None, thresholds))  # what ran
    settings = run_settings(cfg, model, spec.dtype)
    existing = _Existing(cfg, dataset, settings)
    tokenizer = load_tokenizer(checkpoint.tokenizer_dir(Path(spec.model_path)))
    letter_ids = letter_token_ids(tokenizer) if cfg.scoring != "generate" else None
    fitted = [fit_prompt(tokenizer, dataset.dev[q.subject], q, cfg.shot, cfg.max_prompt_tokens) for q in selection]
    too_long = [f for f in fitted if f.too_long]
    if cfg.gate and cfg.too_long == "exclude" and len(too_long) == len(fitted):
        raise UserError(
            f"{cfg.mode} gate: all {len(fitted)} questions are too long for {flag('precision.max_prompt_tokens')} "
            f"{cfg.max_prompt_tokens}, so no score could be judged (raise it, or {flag('precision.too_long')} wrong)"
        )
    pending = [f for f in fitted if not f.too_long and not existing.done((f.question.subject, f.question.qid))]
    return _Prepared(thresholds, model_key, settings, existing, tokenizer, letter_ids, fitted, too_long, pending,
                     time.perf_counter() - started)


def _add_run_facts(summary: dict, cfg: PrecisionConfig, spec, asked: int, ask_result, wall_s: float) -> None:
    """The summary's environment, CPU binding and timing (engine seconds, prompt tokens) of this run."""
    engine_s, tokens, rank_info = ask_result
    summary["environment"] = (rank_info[0].get("environment") if rank_info
                              else environment.environment_record(spec.device, spec.device_index(0), spec.cpu_dtype_auto))
    # Where this run's ranks were pinned (none when every question came from the cache).
    summary["cpu_binding"] = [i.get("cpu_binding") for i in rank_info]
    summary["timing"] = {
        "asked_this_run": asked,
        "wall_s": round(wall_s, 3),
        "engine_s": round(engine_s, 3),
        "questions_per_s": round(asked / engine_s, 4) if engine_s > 0 else None,
        "batch": cfg.batch,
        "prefix_cache": cfg.prefix_cache,
        "prompt_tokens_total": tokens["total"],
        "prompt_tokens_prefilled": tokens["prefilled"],
    }


def _judge(cfg: PrecisionConfig, summary: dict, model_key, table: str) -> None:
    """With ``--gate``: GateFailed (``summary`` attached when judged) unless the gate passed."""
    if not cfg.gate:
        return
    gate = summary["gate"]
    if gate["status"] == "failed":
        failed = GateFailed(f"{cfg.mode} gate failed for {model_key}: {format_verdicts(gate, 'failed')}\n{table}")
        failed.summary = summary
        raise failed
    if gate["status"] != "passed":  # refused up front; should a path be missed, still no pass
        raise GateFailed(f"{cfg.mode} gate not judged for {model_key}: {gate.get('reason', '')}\n{table}")
    log.info("%s gate passed for %s: %s", cfg.mode, model_key, format_verdicts(gate, "passed"))


def _same_on_every_rank(engine, keys: list) -> None:
    """Under torchrun, check every rank is about to ask the same questions (a collective: all ranks call it).

    Every rank reads the cache before any rank writes, and a rank that saw another cache would
    otherwise deadlock the collectives of the first generate.
    """
    gather = getattr(engine, "_gather", None)  # SpmdEngine's all_gather_object; in-process engines have one view
    if gather is None:
        return
    import hashlib
    import json

    seen = gather(hashlib.sha1(json.dumps(keys).encode()).hexdigest())  # hash() of str differs per process
    if len(set(seen)) != 1:
        raise EngineError("torchrun ranks disagree on the questions left to ask: each rank must see the same "
                          "output dir (a shared filesystem)")


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (0 for a single prompt)."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def ask_order(pending: list[FittedPrompt], batch: int, prefix_cache: bool) -> list[tuple[list[FittedPrompt], int]]:
    """The batches to ask, each with its shared prefix length (tokens).

    Questions are grouped by subject and shot count (a question that fell
    back to fewer shots has another prefix), each group sorted by prompt
    length so a batch pads little, and its prefix found on token ids (the
    tokenizer may merge across the text boundary, so it is never assumed).
    """
    groups: dict[tuple[str, int], list[FittedPrompt]] = {}
    for f in pending:
        groups.setdefault((f.question.subject, f.shots), []).append(f)
    out = []
    for group in groups.values():
        shared = common_prefix_len([f.ids for f in group]) if prefix_cache else 0
        group = sorted(group, key=lambda f: f.tokens)
        for start in range(0, len(group), batch):
            out.append((group[start : start + batch], shared))
    return out


class _NoFile:
    """Where a torchrun rank other than 0 writes its answers: nowhere (rank 0 writes the same answers)."""

    def write(self, text: str, sync: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _ask(cfg, engine, tokenizer, letter_ids, pending: list[FittedPrompt], existing: _Existing,
         settings, writer: bool = True) -> tuple[float, dict, list[dict]]:
    """Ask every pending question in batches, recording each answer before the next.

    Returns engine seconds, prompt tokens (``total``; ``prefilled``: what
    was computed, each shared prefix once) and the engine's rank info.
    """
    from tqdm import tqdm

    out = cfg.out_dir
    files = outputs.cache_files(cfg.scoring)
    open_log = outputs.AppendLog if writer else (lambda path: _NoFile())
    answers = open_log(out / outputs.ANSWERS)
    caches = {s: open_log(out / f) for s, f in files.items()}
    device_log = open_log(out / outputs.DEVICE_LOG)
    primary = cfg.scorings[0]
    correct = sum(truth == pred for truth, pred in existing.caches[primary].values())
    counted = len(existing.caches[primary])
    engine_s = 0.0
    tokens = {"total": 0, "prefilled": 0}
    # Only the letters' logits cross back from the ranks, in this column order.
    columns = {letter: i for i, letter in enumerate(letter_ids)} if letter_ids is not None else None
    logit_ids = list(letter_ids.values()) if letter_ids is not None else None
    bar = tqdm(total=len(pending), unit="q", desc=f"{cfg.mode} {cfg.scoring}", disable=not (cfg.progress and writer),
               dynamic_ncols=True)
    try:
        max_new = cfg.seq_len_out if "generate" in cfg.scorings else 1
        last_prefix = None
        for chunk, shared in ask_order(pending, cfg.batch, cfg.prefix_cache == "on"):
            t0 = time.perf_counter()
            res = engine.generate([f.ids for f in chunk], max_new, return_logits=letter_ids is not None,
                                  logit_ids=logit_ids, prefix_len=shared)
            engine_s += time.perf_counter() - t0
            prefix = tuple(chunk[0].ids[:shared])
            tokens["total"] += sum(f.tokens for f in chunk)
            tokens["prefilled"] += sum(f.tokens - shared for f in chunk) + (shared if prefix != last_prefix else 0)
            last_prefix = prefix
            for row, f in enumerate(chunk):
                q = f.question
                rec = {
                    "task": q.subject, "id": q.qid, "truth": q.answer, "shots": f.shots,
                    "prompt_tokens": f.tokens, "prefix_cache": cfg.prefix_cache, "prompt": f.text,
                }
                if "generate" in cfg.scorings:
                    text = tokenizer.decode(res.output_ids[row], skip_special_tokens=True)
                    rec["generate"] = {"text": text, "pred": letter_from_text(text)}
                if letter_ids is not None:
                    pred, values = letter_from_logits(res.logits[row][0], columns)
                    rec["logits"] = {"values": {k: round(v, 2) for k, v in values.items()}, "pred": pred}
                rec["settings"] = settings
                # Details first, then the cache rows: a question in cache.csv always has its details.
                answers.write(outputs.json_text_line(rec))
                for scoring in reversed(cfg.scorings):  # the primary cache last: it marks the question done
                    caches[scoring].write(outputs.cache_line(q.qid, q.subject, q.answer, rec[scoring]["pred"]))
                device_log.write(outputs.log_entry(rec), sync=False)
                correct += rec[primary]["pred"] == q.answer
                counted += 1
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{100 * correct / counted:.1f}%", qps=f"{bar.n / engine_s:.2f}" if engine_s else "-")
    finally:
        bar.close()
        for handle in (answers, device_log, *caches.values()):
            handle.close()
    return engine_s, tokens, list(getattr(engine, "rank_info", None) or [])


def finalize(cfg, dataset: Dataset, fitted: list[FittedPrompt], settings, spec, model_key, thresholds) -> dict:
    """Rewrite every result file from the whole cache, in the canonical order; return the summary."""
    out = cfg.out_dir
    order = [(q.subject, q.qid) for s in dataset.subjects for q in dataset.val[s]]
    too_long = [f for f in fitted if f.too_long]
    caches, answers = _rewrite_caches(cfg, dataset, order)
    primary = cfg.scorings[0]
    results = {}
    for scoring, (subject_file, classes_file) in outputs.result_files(cfg.scoring).items():
        rows = caches[scoring]
        verdicts = [(k[0], rows[k][0] == rows[k][1]) for k in order if k in rows]
        if cfg.too_long == "wrong":
            verdicts += [(f.question.subject, False) for f in too_long]
        subject_acc, classes, counts = outputs.accuracy_tables(verdicts, dataset.categories)
        outputs.write_atomic(out / subject_file, outputs.json_text(subject_acc))
        outputs.write_atomic(out / classes_file, outputs.json_text(classes))
        results[scoring] = counts
    summary = _summary(cfg, dataset, fitted, settings, spec, caches[primary], len(order), results)
    if cfg.scoring == "both":
        gen, lg = caches["generate"], caches["logits"]
        shared = [k for k in order if k in gen and k in lg]
        summary["agreement"] = sum(gen[k][1] == lg[k][1] for k in shared) / len(shared) if shared else None
    summary["gate"] = _gate_record(cfg, results, model_key, thresholds)
    outputs.write_atomic(out / outputs.DEVICE_LOG, _device_log(cfg, order, caches, answers, too_long, summary))
    return summary


def _rewrite_caches(cfg, dataset: Dataset, order: list) -> tuple[dict, dict]:
    """Every cache file and answers.jsonl rewritten in the canonical order; the caches and answers read."""
    out = cfg.out_dir
    files = outputs.cache_files(cfg.scoring)
    caches = {s: outputs.read_cache(out / f, dataset) for s, f in files.items()}
    answers = outputs.read_answers(out / outputs.ANSWERS)
    for scoring, name in files.items():
        rows = caches[scoring]
        outputs.write_atomic(out / name, "".join(outputs.cache_line(k[1], k[0], *rows[k]) for k in order if k in rows))
    # answers.jsonl: one record per question still in the primary cache, canonical order.
    primary = caches[cfg.scorings[0]]
    keep = [k for k in order if k in primary and k in answers]
    outputs.write_atomic(out / outputs.ANSWERS, "".join(outputs.json_text_line(answers[k]) for k in keep))
    return caches, answers


def _summary(cfg, dataset: Dataset, fitted: list[FittedPrompt], settings, spec, primary_cache: dict, in_data: int,
             results: dict) -> dict:
    """summary.json's description of the run, its question counts and per-scoring results (no gate yet)."""
    too_long = [f for f in fitted if f.too_long]
    files = outputs.cache_files(cfg.scoring)
    return {
        "mode": cfg.mode,
        "work_dir": str(Path(cfg.work_dir).resolve()),
        "model": settings["model"],
        "model_path": str(spec.model_path),
        "dtype": spec.dtype,
        "device": spec.device,
        "chip_family": spec.chip_family if spec.device == "npu" else None,  # NPU d9 | d3; None off NPU
        "world_size": spec.world_size,
        "scoring": cfg.scoring,
        "primary_scoring": cfg.scorings[0],
        "files": {s: {"cache": files[s], "subjects": sf, "classes": cf}
                  for s, (sf, cf) in outputs.result_files(cfg.scoring).items()},
        "settings": {k: settings[k] for k in ("shot", "seq_len_out", "max_prompt_tokens")},
        "mapping": dataset.mapping_file,
        "questions": {
            "in_data": in_data,
            "selected": len(fitted),
            "answered": len(primary_cache),
            "too_long": len(too_long),
        },
        "too_long": {
            "count": len(too_long),
            "policy": TOO_LONG_POLICIES[cfg.too_long],
            "questions": [
                {"task": f.question.subject, "id": f.question.qid, "tokens_with_1_shot": f.tokens} for f in too_long
            ],
        },
        "results": results,
    }


def _gate_record(cfg, results: dict, model_key, thresholds) -> dict:
    """summary.json's gate: each scoring's verdict and the overall status (n/a with the reasons)."""
    verdicts = [
        evaluate_gate(
            cfg.mode, s, None if results[s]["micro"] is None else 100 * results[s]["micro"],
            model_key, cfg.tolerance, thresholds,
        )
        for s in cfg.scorings
    ]
    statuses = [v["status"] for v in verdicts]
    status = "failed" if "failed" in statuses else "passed" if "passed" in statuses else "n/a"
    gate = {"status": status, "verdicts": verdicts, "requested": cfg.gate}
    if status == "n/a":
        gate["reason"] = "; ".join(v["reason"] for v in verdicts)
    return gate


def _device_log(cfg, order: list, caches: dict, answers: dict, too_long: list[FittedPrompt], summary: dict) -> str:
    """device.log: every prompt, raw answer and verdict, then what was not asked, then the table."""
    primary = caches[cfg.scorings[0]]
    parts = []
    for k in order:
        if k not in primary:
            continue
        rec = answers.get(k)
        if rec is not None and all(rec.get(s, {}).get("pred") == caches[s].get(k, (None, None))[1] for s in caches):
            parts.append(outputs.log_entry(rec))
        else:
            parts.append(outputs.bare_log_entry(k[0], k[1], primary[k][0],
                                                {s: caches[s].get(k, ("", "?"))[1] for s in caches}))
    for f in too_long:
        parts.append(
            f"=== too long: {f.question.subject} {f.question.qid} needs {f.tokens} tokens with 1 shot "
            f"(> --max-prompt-tokens {cfg.max_prompt_tokens}); not asked, {TOO_LONG_POLICIES[cfg.too_long]}\n\n"
        )
    parts.append(outputs.category_table(summary) + "\n")
    return "".join(parts)
