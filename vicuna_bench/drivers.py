"""The drivers under every front end: open an engine for the work ahead, run perf, run precision.

The CLI (``vicuna_bench.cli``), ``sdk-test`` (``vicuna_bench.sdk``), the
nightly (``vicuna_bench.nightly.runner``) and the pytest plugin parse their
settings (``vicuna_bench.settings``) and call these; they print what comes
back.  So the same settings and the same work give the same engine spec
(device, dtype, ``--compile auto``, CPU binding) in every front end:
:func:`resolve_spec` is the one place that turns model settings into a spec,
:func:`open_engine` the one place that picks the in-process engine or this
rank under torchrun.  Results come back typed (:class:`perf.PerfRun`,
:class:`PrecisionRun`); the files they write are outputs, never read back
within the process.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class PrecisionWork:
    """One precision set ahead: questions to ask, questions a batch, tokens generated per answer."""

    questions: int
    batch: int = 1
    tokens_per_answer: int = 1

    @classmethod
    def of(cls, cfg, questions: int) -> "PrecisionWork":
        """``questions`` asked as a :class:`precision.PrecisionConfig` asks them."""
        return cls(questions, cfg.batch, cfg.seq_len_out if "generate" in cfg.scorings else 1)

    @property
    def decode_steps(self) -> int:
        return math.ceil(self.questions / max(self.batch, 1)) * self.tokens_per_answer


@dataclasses.dataclass(frozen=True)
class Work:
    """What an engine is opened for: what ``--compile auto`` weighs, and the largest batch the fit check sizes.

    ``perf``: a :class:`perf.PerfSettings`; ``precision``: one :class:`PrecisionWork` a set;
    ``generate``: (prompts, max new tokens) of one batched generation (``run``).
    """

    perf: Any = None
    precision: tuple[PrecisionWork, ...] = ()
    generate: tuple[int, int] | None = None

    def decode_steps(self) -> int:
        """Decode steps the work makes (batched steps, warm-up included)."""
        steps = self.perf.decode_steps if self.perf is not None else 0
        steps += sum(p.decode_steps for p in self.precision)
        if self.generate is not None:
            steps += self.generate[1]
        return steps

    def largest_batch(self) -> int:
        """Rows in the largest request: the KV cache the fit check sizes."""
        batches = [1]
        if self.perf is not None:
            batches.append(self.perf.batch_size)
        batches += [p.batch for p in self.precision]
        if self.generate is not None:
            batches.append(self.generate[0])
        return max(batches)


def precision_work(cfg, source: str = "--mode") -> PrecisionWork:
    """The questions a :class:`precision.PrecisionConfig` will ask (its data read and checked: bad data is refused)."""
    from .precision import load_dataset
    from .precision.data import select_subjects

    dataset = load_dataset(cfg.mode, cfg.work_dir, source)
    questions = dataset.questions(select_subjects(dataset, cfg.subjects), cfg.limit_per_subject)
    return PrecisionWork.of(cfg, len(questions))


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


def resolve_spec(model: Mapping[str, Any], work: Work = Work(), *, device_ids: Sequence[int] | None = None,
                 log_dir: str | os.PathLike | None = None, progress: bool = True):
    """The EngineSpec for the model settings (the settings table's model group, by dest) and the work ahead.

    Reads the checkpoint's config.json, no weights: device, dtype, chip family and
    ``--compile auto`` resolved, the fit check sized for the work's largest batch.
    """
    from .runtime import resolve_engine_spec

    spec = resolve_engine_spec(**model, decode_steps=work.decode_steps(), device_ids=device_ids, log_dir=log_dir,
                               progress=progress)
    return dataclasses.replace(spec, fit_batch=work.largest_batch())


def under_torchrun() -> bool:
    """Whether this process is one rank that torchrun started (then every rank runs the front end)."""
    from .runtime import launched_by_torchrun

    return launched_by_torchrun()


def is_writer() -> bool:
    """Whether this process writes results and prints them: always in-process, rank 0 under torchrun."""
    return not under_torchrun() or os.environ.get("RANK", "0") == "0"


def open_engine(settings, work: Work = Work(), *, workers: bool | None = None, **resolve_options):
    """An engine for ``settings`` (an EngineSpec, or the model group's values for :func:`resolve_spec`).

    The only place that chooses: this rank of a torchrun job (:class:`runtime.SpmdEngine`, every rank
    calls alike) or an in-process engine that starts the ranks itself (:class:`runtime.Engine`).
    """
    from .runtime import Engine, EngineSpec, SpmdEngine

    spec = settings if isinstance(settings, EngineSpec) else resolve_spec(settings, work, **resolve_options)
    if under_torchrun():
        return SpmdEngine(spec)
    return Engine(spec) if workers is None else Engine(spec, workers=workers)


# ---------------------------------------------------------------- perf

def run_perf(engine, session, *, progress: bool = True):
    """Every case of a :class:`perf.PerfSession` on ``engine``; the :class:`perf.PerfRun` (files written by rank 0)."""
    run = session.run_all(engine, progress=progress and session.write)
    run.paths = dict(session.paths)
    return run


# ---------------------------------------------------------------- precision

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
        from .precision import results as R

        return {name: self.out_dir / name for name in (R.SUMMARY, R.DEVICE_LOG, "cache.csv")}

    @property
    def gate_lines(self) -> list[str]:
        from .precision.gates import gate_lines

        return gate_lines(self.summary["gate"]) if self.summary is not None else []


def run_precision(cfg, spec, engine=None, *, raise_gate: bool = True) -> PrecisionRun:
    """Run (or resume) one precision set; works in-process and under torchrun (rank 0 writes).

    ``engine``: an open engine for ``spec``; None opens one only when a question is left to ask
    (under torchrun: always, since every rank must take part).  ``raise_gate`` False returns a failed
    gate in :attr:`PrecisionRun.gate_failure` instead of raising :class:`GateFailed`.
    """
    from .errors import GateFailed
    from .precision.runner import run_precision as run_set

    own = None
    if engine is None and under_torchrun():
        own = engine = open_engine(spec)
    try:
        summary = run_set(cfg, spec, engine=engine)
        failure = None
    except GateFailed as exc:
        if raise_gate:
            raise
        failure, summary = str(exc), getattr(exc, "summary", None)
    finally:
        if own is not None:
            own.close()
    return PrecisionRun(cfg.mode, cfg.out_dir, summary, failure)
