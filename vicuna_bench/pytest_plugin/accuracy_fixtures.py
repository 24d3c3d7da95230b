"""The accuracy suite's fixture: one precision job a set (MMLU, C-Eval) on the session's engine, gated."""

from __future__ import annotations

from pathlib import Path

import pytest

from .. import settings
from .options import group_values

ACCURACY_RESULTS = "accuracy-results"  # under the invocation dir, unless --accuracy-output-dir

_ACCURACY = pytest.StashKey[list]()  # the finished PrecisionRuns, for the terminal summary


def accuracy_output_root(config) -> Path:
    """--accuracy-output-dir, else accuracy-results/ under the invocation dir (each set in its own folder)."""
    given = group_values(config, "precision")["output_dir"]
    return Path(given or Path(config.invocation_params.dir) / ACCURACY_RESULTS)


def _precision_job(config, mode: str, work_dir):
    """The job for set ``mode``: the gate on the full val set, the scores alone for a subset (UserError: refused)."""
    from ..precision import PrecisionConfig, PrecisionJob

    values = group_values(config, "precision")
    subset = bool(values["subjects"] or values["limit_per_subject"])
    cfg = PrecisionConfig.from_values({**values, "output_dir": accuracy_output_root(config) / mode}, mode=mode,
                                      work_dir=work_dir, gate=not subset, progress=False)
    return PrecisionJob(cfg, f"--{mode}-dir", subjects_flag=settings.flag("precision.subjects"), raise_gate=False)


@pytest.fixture
def release_gate(vicuna_options, engine_factory, pytestconfig):
    """Run a precision test (``mmlu``/``ceval``) on the session's engine: the gate on the full val set, or the
    scores alone for a subset (--accuracy-subjects / --accuracy-limit-per-subject).  Fails when there is no
    data; fails, before any model is loaded, when no threshold can judge the model and scoring
    (a gate that cannot judge is no pass); fails with the table when the gate fails."""

    def run(mode: str) -> dict:
        from ..drivers import resolve_spec, run_jobs
        from ..errors import UserError

        work_dir = vicuna_options[f"{mode}_dir"]
        if work_dir is None:
            # The user asked for a judgement (-m accuracy): no data is no verdict, so a failure, not a skip.
            pytest.fail(f"no --{mode}-dir given and no ../shared/datasets/{mode} beside the checkout", pytrace=False)
        try:
            job = _precision_job(pytestconfig, mode, work_dir)
            # The spec for this set's work, as the CLI resolves it for the same settings (--compile auto included).
            spec = resolve_spec(group_values(pytestconfig, "model"), [job], progress=False)
            job.check(spec)
        except UserError as exc:
            refusal = str(exc)
        else:
            refusal = None
        if refusal is not None:  # outside the except block: one line, unchained
            pytest.fail(refusal, pytrace=False)
        engine = engine_factory(spec) if job.work().needs_engine else None
        [result] = run_jobs(spec, [job], engine=engine)
        pytestconfig.stash.setdefault(_ACCURACY, []).append(result)
        if result.gate_failure is not None:  # the table is reported once, unchained
            pytest.fail(result.gate_failure, pytrace=False)
        return result.summary

    return run


def summary_lines(config) -> list[tuple[str, str]]:
    """The accuracy part of the terminal summary: (section title or "", line) pairs."""
    from ..precision import results

    lines = []
    for run in config.stash.get(_ACCURACY, []):
        if not lines:
            lines.append(("vicuna-bench accuracy", ""))
        if run.summary is not None:
            lines.append(("", results.category_table(run.summary)))
            lines += [("", line) for line in run.gate_lines]
        out_dir = run.out_dir
        files = sorted(p.name for p in out_dir.iterdir() if p.is_file()) if out_dir.is_dir() else []
        lines.append(("", f"results in {out_dir}: {', '.join(files)}"))
    return lines
