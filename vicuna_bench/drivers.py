"""The driver under every front end: resolve one engine spec for the jobs ahead, open the engine once, run them.

The CLI (``vicuna_bench.cli``), ``sdk-test`` (``vicuna_bench.sdk``), the
nightly (``vicuna_bench.nightly.runner``) and the pytest plugin parse their
settings (``vicuna_bench.settings``), build jobs (:mod:`vicuna_bench.jobs`)
and call :func:`run_jobs`; they print what comes back.  So the same settings
and the same jobs give the same engine spec (device, dtype, ``--compile
auto``, CPU binding) in every front end: :func:`resolve_spec` is the one place
that turns model settings into a spec, :func:`open_engine` the one place that
picks the in-process engine or this rank under torchrun.  Results come back
typed (:class:`perf.PerfRun`, :class:`sweep.Sweep`,
:class:`precision.PrecisionRun`, :class:`jobs.Generated`); the files they
write are outputs, never read back within the process.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .jobs import Job, Work
from .launch import launched_by_torchrun


def shared_dataset_dir(starts: Sequence[Path], name: str) -> Path | None:
    """``shared/datasets/<name>`` beside a checkout: ``<parent>/shared/datasets/<name>`` for the checkout of each start.

    Each start is a folder inside a checkout (pytest's rootdir, the invocation dir, the package's checkout);
    only its checkout's parent is tried (walking further up would find unrelated folders such as /tmp/shared).
    """
    for start in starts:
        candidate = _checkout_of(Path(start)).parent / "shared" / "datasets" / name
        if (candidate / "data").is_dir():
            return candidate
    return None


def _checkout_of(folder: Path) -> Path:
    """The nearest folder at or above ``folder`` holding pyproject.toml or .git (else ``folder``)."""
    for candidate in (folder, *folder.parents):
        if (candidate / "pyproject.toml").is_file() or (candidate / ".git").exists():
            return candidate
    return folder


def resolve_spec(model: Mapping[str, Any], jobs: Sequence[Job] = (), *, device_ids: Sequence[int] | None = None,
                 log_dir: str | os.PathLike | None = None, progress: bool = True):
    """The EngineSpec for the model settings (the settings table's model group, by dest) and the jobs ahead.

    Reads the checkpoint's config.json, no weights: device, dtype, chip family and ``--compile auto``
    (weighing the jobs' decode steps) resolved, the fit check sized for their largest batch.
    """
    from .spec import ModelChoices, resolve_engine_spec

    work = Work.combined(job.work() for job in jobs)
    spec = resolve_engine_spec(ModelChoices(**model), decode_steps=work.decode_steps, device_ids=device_ids,
                               log_dir=log_dir, progress=progress)
    return dataclasses.replace(spec, fit_batch=max(work.batch, 1))


def open_engine(spec, *, workers: bool | None = None):
    """An engine for a resolved EngineSpec: the only place that chooses.

    This rank of a torchrun job (:class:`runtime.SpmdEngine`, every rank calls alike) or an in-process
    engine that starts the ranks itself (:class:`runtime.Engine`).
    """
    from .runtime import Engine, SpmdEngine

    if launched_by_torchrun():
        return SpmdEngine(spec)
    return Engine(spec) if workers is None else Engine(spec, workers=workers)


def run_jobs(model_or_spec, jobs: Sequence[Job], *, engine=None,
             guard: Callable[[str, Callable[[], Any]], Any] | None = None,
             on_engine: Callable[[Any, Any], None] | None = None, **resolve_options) -> list:
    """Run ``jobs`` in order on one engine; their results, in order.

    ``model_or_spec``: the model group's values (resolved by :func:`resolve_spec` from the jobs' combined
    work, with ``resolve_options``) or an EngineSpec.  Every job's :meth:`~jobs.Job.check` runs before the
    engine opens.  The engine: ``engine`` when given (left open), else one opened here and closed after,
    unless no job needs one and this is no torchrun rank (then the jobs get None).  ``on_engine(engine,
    spec)`` runs once the engine is open (before the first job); ``guard(name, fn)`` wraps each job's run
    (the nightly turns a stage's crash into a failed gate and goes on).
    """
    from .runtime import EngineSpec

    jobs = list(jobs)
    spec = model_or_spec if isinstance(model_or_spec, EngineSpec) else resolve_spec(model_or_spec, jobs,
                                                                                    **resolve_options)
    for job in jobs:
        job.check(spec)
    needed = launched_by_torchrun() or Work.combined(job.work() for job in jobs).needs_engine
    own = open_engine(spec) if engine is None and needed else None
    engine = engine if engine is not None else own
    try:
        if on_engine is not None:
            on_engine(engine, spec)
        results = []
        for job in jobs:
            def step(job=job):
                return job.run(engine, spec)

            results.append(step() if guard is None else guard(job.name, step))
        return results
    finally:
        if own is not None:
            own.close()
