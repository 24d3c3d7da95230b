"""The perf suite's fixtures: the session's perf job, its cases as test parameters, one benchmark record a case.

``pytest -m perf`` builds one :class:`vicuna_bench.perf.PerfJob` from the
perf options (bad input stops pytest before any engine starts), opens the
engine its work asks for and measures each case as a pytest-benchmark record
whose clock is the engine's own per-token time (:data:`ENGINE_CLOCK`, set as
the test's ``benchmark(timer=...)`` mark).  ``--perf-batch-sizes`` adds a
batch sweep (:class:`vicuna_bench.sweep.SweepJob`) on one engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .. import settings
from .options import group_values

# `pytest -m perf` without --model-path benchmarks the suite's tiny random Llama (tests/perf/conftest.py) on these.
TINY_PERF_CASES = "[[32,8],[64,8]]"
PERF_RESULTS = "perf-results"  # under the invocation dir, unless --perf-output-dir
RECORDED = ("model_name", "device", "dtype", "world_size", "perf_mode", "batch_size", "seq_in", "seq_out",
            "first_token_ms_p50", "first_token_ms_p90", "next_token_ms_p50", "next_token_ms_p90",
            "prefill_tokens_per_s", "decode_tokens_per_s", "decode_floor_ms", "decode_roofline_fraction",
            "peak_memory_mib_max")  # the extended CSV's columns each benchmark record carries in extra_info

_PERF = pytest.StashKey[object]()  # the PerfJob, or the UserError that refused the options
_SWEEP_JOB = pytest.StashKey[object]()  # the SweepJob --perf-batch-sizes asks for, or None
_SWEEP = pytest.StashKey[object]()  # the finished Sweep


def perf_output_path(config) -> Path:
    """--perf-output-dir, else perf-results/ under the directory pytest was started from."""
    given = group_values(config, "perf")["output_dir"]
    return Path(given or Path(config.invocation_params.dir) / PERF_RESULTS)


@pytest.fixture(scope="session")
def perf_output_dir(pytestconfig) -> Path:
    """Where perf tests write (not created until something is written)."""
    return perf_output_path(pytestconfig)


def perf_job_of(config):
    """The session's :class:`perf.PerfJob` (settings and baseline checked), or the UserError that refused them."""
    from .. import perf, sweep
    from ..errors import UserError

    if _PERF not in config.stash:
        values = group_values(config, "perf")
        tiny = group_values(config, "model")["model_path"] is None
        config.stash[_SWEEP_JOB] = None
        try:
            job = perf.PerfJob.from_values(values, perf_output_path(config),
                                           default_case_pair=TINY_PERF_CASES if tiny else None, progress=False)
            config.stash[_PERF] = job
            batch_sizes = sweep.parse_batch_sizes(values["batch_sizes"])
            if batch_sizes is not None:  # a bad --perf-batch-sizes stops pytest before any test, too
                config.stash[_SWEEP_JOB] = sweep.SweepJob(job, batch_sizes)
        except UserError as exc:
            config.stash[_PERF] = exc  # reported once, as a usage error, when collection ends
    return config.stash[_PERF]


def refuse_bad_perf_options(config, items) -> None:
    """Stop pytest with the one-line message when the perf options were refused (checked when a perf test runs)."""
    if any("perf" in item.keywords for item in items):
        perf_job_of(config)
    refused = config.stash.get(_PERF, None)
    if isinstance(refused, Exception):
        raise pytest.UsageError(f"vicuna-bench perf: {refused}")


def parametrize_cases(metafunc) -> None:
    """``perf_case``: each case of the session's perf job (none when its options were refused)."""
    job = perf_job_of(metafunc.config)
    cases = [] if isinstance(job, Exception) else job.settings.cases
    metafunc.parametrize("perf_case", cases, ids=[f"in{c.seq_in}-out{c.seq_out}" for c in cases])


@pytest.fixture(scope="session")
def perf_default_model():
    """The model ``pytest -m perf`` benchmarks without --model-path (tests/perf overrides it with a tiny one)."""
    from ..embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


def _perf_model(request, config, job) -> dict:
    """The model settings perf runs on: the options', else the default model sized to the cases."""
    model = group_values(config, "model")
    if model["model_path"] is None:
        model["model_path"] = request.getfixturevalue("perf_default_model")
        if model["max_seq_len"] is None:  # the tiny model's context holds just the cases
            model["max_seq_len"] = max(c.seq_in + c.seq_out for c in job.settings.cases)
    return model


@pytest.fixture(scope="session")
def perf_job(request, pytestconfig, engine_factory):
    """The session's perf job, started (bandwidth probed, warmed up) on the engine its work asks for."""
    from ..drivers import resolve_spec

    job = perf_job_of(pytestconfig)
    spec = resolve_spec(_perf_model(request, pytestconfig, job), [job], progress=False)
    job.start(engine_factory(spec))  # checks the job against the spec first
    return job


@pytest.fixture(scope="session")
def perf_sweep(request, pytestconfig, engine_factory):
    """The batch sweep ``--perf-batch-sizes`` asks for, run on one engine (:class:`sweep.Sweep`); skipped without it."""
    from ..drivers import resolve_spec, run_jobs

    job = perf_job_of(pytestconfig)
    sweep_job = pytestconfig.stash.get(_SWEEP_JOB, None)
    if sweep_job is None:
        pytest.skip(f"no {settings.BY_KEY['perf.batch_sizes'].pytest_flag}: no batch sweep")
    spec = resolve_spec(_perf_model(request, pytestconfig, job), [sweep_job], progress=False)
    [result] = run_jobs(spec, [sweep_job], engine=engine_factory(spec))
    pytestconfig.stash[_SWEEP] = result
    return result


class EngineClock:
    """A pytest-benchmark timer that reads the engine's own per-token time, not the wall clock.

    :func:`perf_measure` advances it by each round's next-token mean (the first-token time when the case
    makes one token), so a record's statistics, and ``--benchmark-compare-fail``, are per-token latency (s).
    """

    __name__ = "engine next-token time"

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


ENGINE_CLOCK = EngineClock()


def time_benchmarks_by_the_engine(items) -> None:
    """Give every test that measures with ``perf_measure`` pytest-benchmark's ``benchmark(timer=ENGINE_CLOCK)`` mark."""
    for item in items:
        if "perf_measure" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=ENGINE_CLOCK))


@pytest.fixture
def perf_measure(perf_job, benchmark):
    """Measure a case: ``--perf-repeat`` rounds as one pytest-benchmark record, written to the CSVs, gated."""

    def measure(case):
        from .. import perf

        rounds: list[perf.CaseResult] = []
        ENGINE_CLOCK.now = 0.0

        def one_round():
            result = perf_job.measure_round(case)
            rounds.append(result)
            ENGINE_CLOCK.now += (result.next_ms[0] if result.next_ms else result.first_ms[0]) / 1e3

        benchmark.pedantic(one_round, rounds=perf_job.settings.repeat, iterations=1, warmup_rounds=0)
        result = perf_job.record(rounds)
        row = perf.extended_row(perf_job.perf_run, result)
        benchmark.extra_info.update({k: row[k] for k in RECORDED})
        benchmark.extra_info["measured"] = "next_token_ms" if case.seq_out > 1 else "first_token_ms"
        comparison = perf_job.compare([result])
        if comparison is not None and comparison.regressions:
            pytest.fail(f"slower than {perf_job.baseline.path}:\n{comparison.table()}", pytrace=False)
        return result

    return measure


def summary_lines(config) -> list[tuple[str, str]]:
    """The perf and sweep part of the terminal summary: (section title or "", line) pairs."""
    from .. import perf, sweep

    lines = []
    job = config.stash.get(_PERF, None)
    if isinstance(job, perf.PerfJob) and job.perf_run is not None and job.perf_run.results:
        lines.append(("vicuna-bench perf", perf.summary_table(job.perf_run)))
        if job.baseline is not None:
            lines.append(("", f"baseline {job.baseline.path}, tolerance {job.tolerance:.0%}:"))
            lines.append(("", job.compare().table()))
        lines += [("", f"{name:>14}: {path}") for name, path in job.paths.items()]
    swept = config.stash.get(_SWEEP, None)
    if swept is not None and swept.runs:
        lines.append(("vicuna-bench perf sweep", sweep.summary(swept)))
        lines += [("", f"{name:>14}: {path}") for name, path in swept.paths.items()]
    return lines
