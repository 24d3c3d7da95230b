"""pytest plugin: the options, markers and fixtures of the vicuna-bench suites (entry point ``pytest11``).

Tests ask for fixtures (``engine``, ``engine_factory``, ``engine_spec``,
``perf_case`` + ``perf_measure``, ``release_gate``) and know nothing of
process groups, drivers or output files.  Each concern has its room:

* :mod:`.options`: the settings table's options, layered (default < ``--vb-config`` file < environment < flags);
* :mod:`.markers`: the markers, the hardware skip, the CPU share of an xdist worker;
* :mod:`.engines`: one engine per distinct spec for the session (``engine_factory``, ``engine``);
* :mod:`.perf_fixtures`: the perf job, its cases, one pytest-benchmark record a case, the batch sweep;
* :mod:`.compare_fail`: ``--benchmark-compare-fail`` judged by the package's one comparison (stats.judge_change);
* :mod:`.accuracy_fixtures`: the release gate (one precision job a set).

The hardware suite's own matrix (models, dtypes, world sizes) is tests/hw/conftest.py's.
The terminal summary names every file the perf and accuracy suites wrote.
"""

from __future__ import annotations

import pytest

from .. import settings
from . import accuracy_fixtures, compare_fail, markers, options, perf_fixtures
# pytest finds a plugin's fixtures among the entry-point module's names: each room's are named here.
from .accuracy_fixtures import ACCURACY_RESULTS, release_gate
from .engines import EngineFactory, engine, engine_factory, engine_spec
from .markers import accelerator_available
from .options import vicuna_options
from .perf_fixtures import (
    PERF_RESULTS,
    TINY_PERF_CASES,
    perf_default_model,
    perf_measure,
    perf_output_dir,
    perf_job,
    perf_job_of,
    perf_sweep,
)

__all__ = [
    "ACCURACY_RESULTS", "PERF_RESULTS", "TINY_PERF_CASES", "EngineFactory", "accelerator_available", "engine",
    "engine_factory", "engine_spec", "perf_default_model", "perf_measure", "perf_output_dir", "perf_job",
    "perf_job_of", "perf_sweep", "release_gate", "vicuna_options",
]


def pytest_addoption(parser):
    options.add_options(parser)


def pytest_load_initial_conftests(early_config, parser, args):
    markers.torch_autoload_off_for_our_runs(args)


def pytest_configure(config):
    from ..errors import UserError

    settings.set_front_end("pytest")
    markers.register(config)
    markers.share_cpus_among_xdist_workers()
    compare_fail.judge_with_stats(config)
    try:
        options.layered(config)  # a bad --vb-config file or environment value stops pytest here, in one line
    except UserError as exc:
        refusal = str(exc)
    else:
        return
    raise pytest.UsageError(f"vicuna-bench: {refusal}")


def pytest_collection_modifyitems(config, items):
    perf_fixtures.refuse_bad_perf_options(config, items)  # before any engine starts
    markers.skip_hw_without_accelerator(items)
    perf_fixtures.time_benchmarks_by_the_engine(items)


def pytest_generate_tests(metafunc):
    if "perf_case" in metafunc.fixturenames:
        perf_fixtures.parametrize_cases(metafunc)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, line in perf_fixtures.summary_lines(config) + accuracy_fixtures.summary_lines(config):
        if title:
            terminalreporter.write_sep("=", title)
        if line:
            terminalreporter.write_line(line)
