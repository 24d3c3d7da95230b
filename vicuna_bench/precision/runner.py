"""The precision run: read, prompt, ask (batched), record crash-safely, aggregate, gate.

One function, :func:`run_precision`, serves the CLI (``vicuna-bench
precision``), ``sdk-test`` and the pytest suites.  Bad input is found before
anything is written or an engine starts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from .. import devices
from ..errors import EngineError, GateFailed, UserError
from . import results as R
from ..settings import BY_KEY, flag
from .data import Dataset, load_dataset, select_subjects
from .gates import evaluate_gate, format_verdicts, gate_model_key, identify_model, load_thresholds
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
        self.caches = {s: R.read_cache(out / f, dataset) for s, f in R.cache_files(cfg.scoring).items()}
        self.answers = R.read_answers(out / R.ANSWERS)
        for rec in list(self.answers.values())[:1]:
            old = rec.get("settings", {})
            for key, value in settings.items():
                if old.get(key) != value:
                    raise UserError(
                        f"{out / R.ANSWERS}: written by a run with {key}={old.get(key)!r}, this run has {value!r} "
                        "(use another --output-dir, or the same settings to resume)"
                    )

    def done(self, key) -> bool:
        return all(key in cache for cache in self.caches.values())


def run_precision(cfg: PrecisionConfig, spec, engine=None) -> dict:
    """Run (or resume) a precision test; returns the summary (also written to summary.json).

    ``spec`` is a resolved EngineSpec; ``engine`` an open Engine for it (one
    is started, only when a question is left to ask, if None), or this rank's
    SpmdEngine under torchrun: then every rank asks the same questions and only
    rank 0 writes (the others return None).  Raises
    UserError on bad input before writing anything (with ``cfg.gate``: also
    when no threshold can judge the run), GateFailed (after writing every
    file) when ``cfg.gate`` and the score is below threshold.
    """
    from .. import checkpoint
    from ..chat import load_tokenizer

    started = time.perf_counter()
    writer = getattr(engine, "rank", 0) == 0
    cfg.check()
    dataset = load_dataset(cfg.mode, cfg.work_dir)
    subjects = select_subjects(dataset, cfg.subjects)
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
    selection = dataset.questions(subjects, cfg.limit_per_subject)
    fitted = [fit_prompt(tokenizer, dataset.dev[q.subject], q, cfg.shot, cfg.max_prompt_tokens) for q in selection]
    too_long = [f for f in fitted if f.too_long]
    if cfg.gate and cfg.too_long == "exclude" and len(too_long) == len(fitted):
        raise UserError(
            f"{cfg.mode} gate: all {len(fitted)} questions are too long for {flag('precision.max_prompt_tokens')} "
            f"{cfg.max_prompt_tokens}, so no score could be judged (raise it, or {flag('precision.too_long')} wrong)"
        )
    pending = [f for f in fitted if not f.too_long and not existing.done((f.question.subject, f.question.qid))]
    log.info(
        "precision %s: %d subjects, %d questions, %d already in %s, %d to ask, %d too long for %d tokens",
        cfg.mode, len(subjects), len(selection), len(selection) - len(pending) - len(too_long),
        cfg.out_dir / "cache.csv", len(pending), len(too_long), cfg.max_prompt_tokens,
    )
    _same_on_every_rank(engine, [(f.question.subject, f.question.qid) for f in pending])
    for f in too_long if writer else ():
        log.warning(
            "too long: %s %s needs %d tokens with 1 shot (> %d); %s",
            f.question.subject, f.question.qid, f.tokens, cfg.max_prompt_tokens, TOO_LONG_POLICIES[cfg.too_long],
        )

    # From here on files are written (by rank 0 alone under torchrun; the others ask and return).
    out = cfg.out_dir
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    engine_s = 0.0
    tokens = {"total": 0, "prefilled": 0}
    rank_info: list[dict] = []
    if pending:
        engine_s, tokens, rank_info = _ask(cfg, spec, engine, tokenizer, letter_ids, pending, existing, settings,
                                           writer)
    if not writer:
        return None
    summary = finalize(cfg, dataset, fitted, settings, spec, model_key, thresholds)
    summary["environment"] = (rank_info[0].get("environment") if rank_info
                              else devices.environment_record(spec.device, spec.device_index(0), spec.cpu_dtype_auto))
    # Where this run's ranks were pinned (none when every question came from the cache).
    summary["cpu_binding"] = [i.get("cpu_binding") for i in rank_info]
    summary["timing"] = {
        "asked_this_run": len(pending),
        "wall_s": round(time.perf_counter() - started, 3),
        "engine_s": round(engine_s, 3),
        "questions_per_s": round(len(pending) / engine_s, 4) if engine_s > 0 else None,
        "batch": cfg.batch,
        "prefix_cache": cfg.prefix_cache,
        "prompt_tokens_total": tokens["total"],
        "prompt_tokens_prefilled": tokens["prefilled"],
    }
    R.write_atomic(out / R.SUMMARY, R.json_text(summary))
    table = R.category_table(summary)
    log.info("precision results (%s):\n%s", out, table)
    gate = summary["gate"]
    if cfg.gate:
        if gate["status"] == "failed":
            failed = GateFailed(f"{cfg.mode} gate failed for {model_key}: {format_verdicts(gate, 'failed')}\n{table}")
            failed.summary = summary
            raise failed
        if gate["status"] != "passed":  # refused up front; should a path be missed, still no pass
            raise GateFailed(f"{cfg.mode} gate not judged for {model_key}: {gate.get('reason', '')}\n{table}")
        log.info("%s gate passed for %s: %s", cfg.mode, model_key, format_verdicts(gate, "passed"))
    return summary


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


def _ask(cfg, spec, engine, tokenizer, letter_ids, pending: list[FittedPrompt], existing: _Existing,
         settings, writer: bool = True) -> tuple[float, dict, list[dict]]:
    """Ask every pending question in batches, recording each answer before the next.

    Returns engine seconds, prompt tokens (``total``; ``prefilled``: what
    was computed, each shared prefix once) and the engine's rank info.
    """
    from tqdm import tqdm

    out = cfg.out_dir
    files = R.cache_files(cfg.scoring)
    open_log = R.AppendLog if writer else (lambda path: _NoFile())
    answers = open_log(out / R.ANSWERS)
    caches = {s: open_log(out / f) for s, f in files.items()}
    device_log = open_log(out / R.DEVICE_LOG)
    primary = cfg.scorings[0]
    correct = sum(truth == pred for truth, pred in existing.caches[primary].values())
    counted = len(existing.caches[primary])
    own = None
    engine_s = 0.0
    tokens = {"total": 0, "prefilled": 0}
    # Only the letters' logits cross back from the ranks, in this column order.
    columns = {letter: i for i, letter in enumerate(letter_ids)} if letter_ids is not None else None
    logit_ids = list(letter_ids.values()) if letter_ids is not None else None
    bar = tqdm(total=len(pending), unit="q", desc=f"{cfg.mode} {cfg.scoring}", disable=not (cfg.progress and writer),
               dynamic_ncols=True)
    try:
        if engine is None:
            from ..drivers import open_engine

            own = engine = open_engine(spec)
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
                answers.write(R.json_text_line(rec))
                for scoring in reversed(cfg.scorings):  # the primary cache last: it marks the question done
                    caches[scoring].write(R.cache_line(q.qid, q.subject, q.answer, rec[scoring]["pred"]))
                device_log.write(R.log_entry(rec), sync=False)
                correct += rec[primary]["pred"] == q.answer
                counted += 1
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{100 * correct / counted:.1f}%", qps=f"{bar.n / engine_s:.2f}" if engine_s else "-")
    finally:
        bar.close()
        if own is not None:
            own.close()
        for handle in (answers, device_log, *caches.values()):
            handle.close()
    return engine_s, tokens, list(getattr(engine, "rank_info", None) or [])


def finalize(cfg, dataset: Dataset, fitted: list[FittedPrompt], settings, spec, model_key, thresholds) -> dict:
    """Rewrite every result file from the whole cache, in the canonical order; return the summary."""
    out = cfg.out_dir
    files = R.cache_files(cfg.scoring)
    caches = {s: R.read_cache(out / f, dataset) for s, f in files.items()}
    answers = R.read_answers(out / R.ANSWERS)
    order = [(q.subject, q.qid) for s in dataset.subjects for q in dataset.val[s]]
    too_long = [f for f in fitted if f.too_long]
    primary = cfg.scorings[0]
    for scoring, name in files.items():
        rows = caches[scoring]
        R.write_atomic(out / name, "".join(R.cache_line(k[1], k[0], *rows[k]) for k in order if k in rows))
    # answers.jsonl: one record per question still in the primary cache, canonical order.
    keep = [k for k in order if k in caches[primary] and k in answers]
    R.write_atomic(out / R.ANSWERS, "".join(R.json_text_line(answers[k]) for k in keep))

    results = {}
    for scoring, (subject_file, classes_file) in R.result_files(cfg.scoring).items():
        rows = caches[scoring]
        verdicts = [(k[0], rows[k][0] == rows[k][1]) for k in order if k in rows]
        if cfg.too_long == "wrong":
            verdicts += [(f.question.subject, False) for f in too_long]
        subject_acc, classes, counts = R.accuracy_tables(verdicts, dataset.categories)
        R.write_atomic(out / subject_file, R.json_text(subject_acc))
        R.write_atomic(out / classes_file, R.json_text(classes))
        results[scoring] = counts

    summary = {
        "mode": cfg.mode,
        "work_dir": str(Path(cfg.work_dir).resolve()),
        "model": settings["model"],
        "model_path": str(spec.model_path),
        "dtype": spec.dtype,
        "device": spec.device,
        "chip_family": getattr(spec, "chip_family", None),  # NPU d9 | d3; None off NPU
        "world_size": spec.world_size,
        "scoring": cfg.scoring,
        "primary_scoring": primary,
        "files": {s: {"cache": files[s], "subjects": sf, "classes": cf} for s, (sf, cf) in R.result_files(cfg.scoring).items()},
        "settings": {k: settings[k] for k in ("shot", "seq_len_out", "max_prompt_tokens")},
        "mapping": dataset.mapping_file,
        "questions": {
            "in_data": len(order),
            "selected": len(fitted),
            "answered": len(caches[primary]),
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
    if cfg.scoring == "both":
        gen, lg = caches["generate"], caches["logits"]
        shared = [k for k in order if k in gen and k in lg]
        summary["agreement"] = sum(gen[k][1] == lg[k][1] for k in shared) / len(shared) if shared else None
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
    summary["gate"] = gate

    # device.log: every prompt, raw answer and verdict, then what was not asked, then the table.
    parts = []
    for k in order:
        if k not in caches[primary]:
            continue
        rec = answers.get(k)
        if rec is not None and all(rec.get(s, {}).get("pred") == caches[s].get(k, (None, None))[1] for s in caches):
            parts.append(R.log_entry(rec))
        else:
            parts.append(R.bare_log_entry(k[0], k[1], caches[primary][k][0], {s: caches[s].get(k, ("", "?"))[1] for s in caches}))
    for f in too_long:
        parts.append(
            f"=== too long: {f.question.subject} {f.question.qid} needs {f.tokens} tokens with 1 shot "
            f"(> --max-prompt-tokens {cfg.max_prompt_tokens}); not asked, {TOO_LONG_POLICIES[cfg.too_long]}\n\n"
        )
    parts.append(R.category_table(summary) + "\n")
    R.write_atomic(out / R.DEVICE_LOG, "".join(parts))
    return summary
