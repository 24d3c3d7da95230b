"""pytest plugin: the options, markers and fixtures of the vicuna-bench suites.

Options come from the settings table (vicuna_bench/settings.py), as the
CLI's do.  Tests ask for fixtures (``engine``, ``engine_factory``,
``engine_spec``, ``perf_case`` + ``perf_measure``, ``release_gate``) and know
nothing of process groups, drivers or output files.  Engines are started
once per session (per xdist worker) for a given model / world size / device
/ dtype and closed at the end.  The terminal summary names every file the
perf and accuracy layers wrote.  The hardware suite (tests/hw) tests the
run's ``--model-path`` / ``--world-size`` / ``--dtype`` / ``--device-type``
where given (:class:`HwRun`), its tiny models otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from . import settings

MARKERS = {
    "unit": "in-process on CPU: tiny models, no subprocess or multiprocessing, no real data (minutes)",
    "integration": "subprocess CLI and nested pytest runs, multi-rank engines, torch.compile, the real model and "
                   "data, kill tests (CPU)",
    "hw": "needs an NPU or GPU (skipped with a reason otherwise)",
    "accuracy": "needs a model and data; release gate",
    "perf": "benchmarks; record, never fail on absolute time",
    "hw_matrix": "hw_matrix(model=[...], dtype=[...], world_size=[...]): a hw test's own choices, replaced by the "
                 "run's --model-path / --dtype / --world-size where given",
}
# `pytest -m perf` without --model-path benchmarks the suite's tiny random Llama (tests/perf/conftest.py) on these.
TINY_PERF_CASES = "[[32,8],[64,8]]"
PERF_RESULTS = "perf-results"  # under the invocation dir, unless --perf-output-dir
ACCURACY_RESULTS = "accuracy-results"  # under the invocation dir, unless --accuracy-output-dir

_PERF = pytest.StashKey[object]()
_SWEEP = pytest.StashKey[object]()
_ACCURACY = pytest.StashKey[list]()


def pytest_addoption(parser):
    settings.add_to_pytest(parser)
    g = parser.getgroup("vicuna-bench")
    g.addoption("--mmlu-dir", default=None, help="MMLU work dir holding data/ (default ../shared/datasets/mmlu)")
    g.addoption("--ceval-dir", default=None, help="C-Eval work dir holding data/ (default ../shared/datasets/ceval)")


def pytest_load_initial_conftests(early_config, parser, args):
    """With ``--device`` given, torch's autoload of torch_npu is off (unless set) before a conftest imports torch.

    Only then: this plugin loads in every pytest session of the environment, and one without our ``--device`` may
    not be ours (vicuna_bench.torch_autoload)."""
    from . import torch_autoload

    if torch_autoload.device_in_args(args) is not None:
        torch_autoload.front_end_default()


def pytest_configure(config):
    settings.set_front_end("pytest")
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[_ACCURACY] = []
    share_cpus_among_xdist_workers()


def share_cpus_among_xdist_workers() -> None:
    """Under ``pytest -n N`` each worker (and the rank processes it spawns) runs on its own share of the CPUs.

    The affinity mask is inherited by spawned ranks, whose torch threads follow it
    (:func:`vicuna_bench.runtime.usable_cpus`), so N workers never oversubscribe the machine.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    import torch

    cpus = sorted(os.sched_getaffinity(0))
    index, count = int(worker.lstrip("gw")), int(count)
    share = max(1, len(cpus) // count)
    start = (index * share) % len(cpus)
    mine = set(cpus[start:start + share])
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


def accelerator_available() -> str | None:
    """'npu' or 'cuda' when one is usable, else None."""
    from . import devices

    try:
        if devices.npu_available():
            return "npu"
    except Exception:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else None


def pytest_collection_modifyitems(config, items):
    perf_error = config.stash.get(_PERF, None)
    if isinstance(perf_error, Exception):  # bad perf settings: stop before any engine starts
        raise pytest.UsageError(f"vicuna-bench perf: {perf_error}")
    hw_items = [item for item in items if "hw" in item.keywords]
    if hw_items and accelerator_available() is None:
        skip = pytest.mark.skip(reason="hw test: no NPU or CUDA device on this machine")
        for item in hw_items:
            item.add_marker(skip)


def shared_dataset_dir(starts: list[Path], name: str) -> Path | None:
    """``shared/datasets/<name>`` beside a checkout (:func:`vicuna_bench.drivers.shared_dataset_dir`).

    The starts are pytest's rootdir and the invocation dir: the rootdir alone is not enough, since pytest
    picks it before plugins register their options, so in ``pytest -m accuracy --accuracy-output-dir /tmp/x``
    the option's value counts as a path argument and the rootdir becomes /tmp/x.
    """
    from .drivers import shared_dataset_dir as find

    return find(starts, name)


@pytest.fixture(scope="session")
def vicuna_options(pytestconfig) -> dict:
    """Every setting by its pytest dest (``world_size``, ``perf_repeat``, ``accuracy_batch``...), data dirs resolved."""
    opt = pytestconfig.getoption
    starts = [Path(str(pytestconfig.rootpath)).resolve(), Path(pytestconfig.invocation_params.dir).resolve()]
    options = {s.pytest_dest: opt(s.pytest_dest) for s in settings.SETTINGS if s.group in settings.PYTEST_PREFIX}
    options["mmlu_dir"] = opt("--mmlu-dir") or shared_dataset_dir(starts, "mmlu")
    options["ceval_dir"] = opt("--ceval-dir") or shared_dataset_dir(starts, "ceval")
    return options


def make_engine_spec(model_path=None, world_size=1, device="auto", dtype="auto", max_seq_len=None,
                     device_type="auto", compile="off", bind_cpu=True, npu_graph="auto", npu_jit_compile="auto",
                     work=None):
    """An EngineSpec with the CLI's defaults (embedded model, auto device/dtype, CPU binding on), validated.

    ``work``: a :class:`vicuna_bench.drivers.Work`, what ``--compile auto`` weighs (none: auto is off).
    """
    from . import drivers

    model = dict(model_path=model_path, world_size=world_size, device=device, dtype=dtype, max_seq_len=max_seq_len,
                 device_type=device_type, compile=compile, bind_cpu=bind_cpu, npu_graph=npu_graph,
                 npu_jit_compile=npu_jit_compile)
    return drivers.resolve_spec(model, work or drivers.Work(), progress=False)


class EngineFactory:
    """One engine per distinct spec for the whole session."""

    def __init__(self):
        self._engines: dict = {}

    def __call__(self, spec, workers: bool | None = None):
        from .drivers import open_engine

        key = (spec, workers)
        engine = self._engines.get(key)
        if engine is None or engine.closed:
            engine = open_engine(spec, workers=workers)
            self._engines[key] = engine
        return engine

    def close(self):
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


@pytest.fixture(scope="session")
def engine_factory():
    factory = EngineFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def engine_spec(pytestconfig):
    """The EngineSpec the command line describes (--model-path, --world-size, ...)."""
    return make_engine_spec(**settings.from_pytest(pytestconfig, "model"))


@pytest.fixture(scope="session")
def engine(engine_factory, engine_spec):
    """The engine the command line describes (--model-path, --world-size, ...)."""
    return engine_factory(engine_spec)


# ---------------------------------------------------------------- perf

def perf_output_path(config) -> Path:
    """--perf-output-dir, else perf-results/ under the directory pytest was started from."""
    given = config.getoption(settings.BY_KEY["perf.output_dir"].pytest_dest)
    return Path(given or Path(config.invocation_params.dir) / PERF_RESULTS)


@pytest.fixture(scope="session")
def perf_output_dir(pytestconfig) -> Path:
    """Where perf tests write (not created until something is written)."""
    return perf_output_path(pytestconfig)


def perf_session_of(config):
    """The session's PerfSession (settings and baseline checked: bad input stops pytest before any test)."""
    from . import perf
    from .errors import UserError

    if _PERF not in config.stash:
        values = settings.from_pytest(config, "perf")
        out = perf_output_path(config)
        tiny = config.getoption("model_path") is None
        try:
            config.stash[_PERF] = perf.PerfSession.from_values(
                values, out, default_case_pair=TINY_PERF_CASES if tiny else None)
            if values["batch_sizes"] is not None:  # a bad --perf-batch-sizes stops pytest before any test, too
                from . import sweep

                sweep.parse_batch_sizes(values["batch_sizes"])
                sweep.check_sweep(config.stash[_PERF])
        except UserError as exc:
            config.stash[_PERF] = exc  # reported once, as a usage error, when collection ends
    return config.stash[_PERF]


def pytest_generate_tests(metafunc):
    matrix = metafunc.definition.get_closest_marker("hw_matrix")
    if matrix is not None:
        run = hw_run_of(settings.from_pytest(metafunc.config, "model"))
        choose = {"model": run.models, "dtype": run.dtypes, "world_size": run.world_sizes}
        for name, own in matrix.kwargs.items():
            metafunc.parametrize(name, choose[name](own))
    if "perf_case" in metafunc.fixturenames:
        session = perf_session_of(metafunc.config)
        cases = [] if isinstance(session, Exception) else session.settings.cases
        metafunc.parametrize("perf_case", cases, ids=[f"in{c.seq_in}-out{c.seq_out}" for c in cases])


@pytest.fixture(scope="session")
def perf_default_model():
    """The model ``pytest -m perf`` benchmarks without --model-path (tests/perf overrides it with a tiny one)."""
    from .embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


def _perf_model(request, pytestconfig, session) -> dict:
    """The model settings perf runs on: the options', else the default model sized to the cases."""
    model = settings.from_pytest(pytestconfig, "model")
    if model["model_path"] is None:
        model["model_path"] = request.getfixturevalue("perf_default_model")
        if model["max_seq_len"] is None:  # the tiny model's context holds just the cases
            model["max_seq_len"] = max(c.seq_in + c.seq_out for c in session.settings.cases)
    return model


@pytest.fixture(scope="session")
def perf_session(request, pytestconfig, engine_factory):
    """The perf driver, started (bandwidth probed, warmed up) on the engine the options describe."""
    session = perf_session_of(pytestconfig)
    model = _perf_model(request, pytestconfig, session)
    from .drivers import Work

    spec = make_engine_spec(**model, work=Work(perf=session.settings))
    session.check_model(spec)
    session.start(engine_factory(spec))
    return session


@pytest.fixture(scope="session")
def perf_sweep(request, pytestconfig, engine_factory):
    """The batch sweep ``--perf-batch-sizes`` asks for, run on one engine (:class:`sweep.Sweep`); skipped without it."""
    from . import sweep
    from .drivers import Work

    session = perf_session_of(pytestconfig)
    batch_sizes = sweep.parse_batch_sizes(pytestconfig.getoption(settings.BY_KEY["perf.batch_sizes"].pytest_dest))
    if batch_sizes is None:
        pytest.skip(f"no {settings.BY_KEY['perf.batch_sizes'].pytest_flag}: no batch sweep")
    model = _perf_model(request, pytestconfig, session)
    spec = make_engine_spec(**model, work=Work(perf=sweep.sweep_work_settings(session.settings, batch_sizes)))
    session.check_model(spec)
    result = sweep.run_sweep(engine_factory(spec), session, batch_sizes, progress=False)
    pytestconfig.stash[_SWEEP] = result
    return result


class _EngineClock:
    """A pytest-benchmark timer that reads the engine's own per-token time, not the wall clock.

    Each round advances it by the round's next-token mean (the first-token time when the case makes
    one token), so a record's statistics, and ``--benchmark-compare-fail``, are per-token latency.
    """

    __name__ = "engine next-token time"

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def perf_measure(perf_session, benchmark):
    """Measure a case: ``--perf-repeat`` rounds as one pytest-benchmark record, written to the CSVs, gated."""

    def measure(case):
        from . import perf

        clock = _EngineClock()
        benchmark._timer = clock  # pytest-benchmark has no public hook for a custom clock per test
        rounds: list[perf.CaseResult] = []

        def one_round():
            result = perf_session.measure_round(case)
            rounds.append(result)
            clock.now += (result.next_ms[0] if result.next_ms else result.first_ms[0]) / 1e3

        benchmark.pedantic(one_round, rounds=perf_session.settings.repeat, iterations=1, warmup_rounds=0)
        result = perf_session.record(rounds)
        row = perf.extended_row(perf_session.run, result)
        benchmark.extra_info.update({k: row[k] for k in (
            "model_name", "device", "dtype", "world_size", "perf_mode", "batch_size", "seq_in", "seq_out",
            "first_token_ms_p50", "first_token_ms_p90", "next_token_ms_p50", "next_token_ms_p90",
            "prefill_tokens_per_s", "decode_tokens_per_s", "decode_floor_ms", "decode_roofline_fraction",
            "peak_memory_mib_max")})
        benchmark.extra_info["measured"] = "next_token_ms" if case.seq_out > 1 else "first_token_ms"
        comparison = perf_session.compare([result])
        if comparison is not None and comparison.regressions:
            pytest.fail(f"slower than {perf_session.baseline.path}:\n{comparison.table()}", pytrace=False)
        return result

    return measure


# ---------------------------------------------------------------- hw

RUN_MODEL = "run"  # the hw suite's name (and test id) for the model given with --model-path


@dataclasses.dataclass(frozen=True)
class HwRun:
    """What the hardware suite tests: the run's model settings where given, its own tiny models and choices otherwise.

    So ``pytest -m hw --model-path M --world-size 8 --dtype fp16`` (the
    nightly's hw stage) tests M at 8 ranks in fp16, and plain ``pytest -m hw``
    the tiny random models at every visible device.
    """

    model_path: str | None  # --model-path; None: the tests' tiny models
    world_size: int | None  # --world-size when above 1; None: each test's own (every visible device, up to 8)
    dtype: str | None  # --dtype unless auto; None: each test's own dtypes
    chip_family: str  # --device-type: auto (detected on an NPU) | d9 | d3
    device: str | None  # --device when cuda or npu; None: whichever accelerator is there

    def models(self, own: Sequence[str]) -> list[str]:
        """Model names a test runs: the run's model alone (:data:`RUN_MODEL`) when given, else its own."""
        return [RUN_MODEL] if self.model_path else list(own)

    def dtypes(self, own: Sequence[str]) -> list[str]:
        return [self.dtype] if self.dtype else list(own)

    def world_sizes(self, own: Sequence[int]) -> list[int]:
        return [self.world_size] if self.world_size else list(own)

    def model_dir(self, model: str, tiny: Mapping[str, object]) -> str:
        """The directory of a hw test's ``model`` parameter: the run's --model-path, the embedded model (skipped
        where it cannot be had), or the tiny model of that name."""
        if model == RUN_MODEL:
            return str(self.model_path)
        if model == "embedded":
            from .embedded import embedded_model_dir

            try:
                return str(embedded_model_dir(progress=False))
            except Exception as exc:  # not installed on this machine (a 93 MB wheel), or cannot convert
                pytest.skip(f"embedded model unavailable here: {str(exc).splitlines()[0]}")
        return str(tiny[model])

    def spread(self, visible: int) -> int:
        """Ranks of a test over many devices: the run's world size, else every visible device up to 8."""
        return self.world_size or min(visible, 8)

    def engine_spec(self, model_path, world_size: int, device: str, dtype: str, compile: str = "off",
                    max_seq_len: int = 64):
        """An EngineSpec of this run's chip family (max_seq_len in tokens: the hw tests' prompts are short)."""
        return make_engine_spec(model_path, world_size, device, dtype, max_seq_len, device_type=self.chip_family,
                                compile=compile)


def hw_run_of(model_options: Mapping[str, object]) -> HwRun:
    """The hw suite's choices from the model options by dest (``settings.from_pytest(config, "model")``)."""
    world_size = model_options.get("world_size")
    dtype = model_options.get("dtype")
    device = model_options.get("device")
    return HwRun(
        model_path=model_options.get("model_path") or None,
        world_size=int(world_size) if world_size and int(world_size) > 1 else None,
        dtype=None if dtype in (None, "auto") else str(dtype),
        chip_family=str(model_options.get("device_type") or "auto"),
        device=device if device in ("cuda", "npu") else None,
    )


@pytest.fixture(scope="session")
def hw_run(pytestconfig) -> HwRun:
    """The hardware suite's model, world size, dtype and chip family (the run's where given)."""
    return hw_run_of(settings.from_pytest(pytestconfig, "model"))


# ---------------------------------------------------------------- accuracy

@pytest.fixture
def release_gate(vicuna_options, engine_factory, pytestconfig):
    """Run a precision test (``mmlu``/``ceval``) on the session's engine: the gate on the full val set, or the
    scores alone for a subset (--accuracy-subjects / --accuracy-limit-per-subject).  Fails when there is no
    data; fails, before any model is loaded, when no threshold can judge the model and scoring
    (a gate that cannot judge is no pass); fails with the table when the gate fails."""

    def run(mode: str) -> dict:
        from . import drivers
        from .errors import UserError
        from .precision.gates import gate_model_key
        from .precision.runner import PrecisionConfig

        work = vicuna_options[f"{mode}_dir"]
        if work is None:
            # The user asked for a judgement (-m accuracy): no data is no verdict, so a failure, not a skip.
            pytest.fail(f"no --{mode}-dir given and no ../shared/datasets/{mode} beside the checkout", pytrace=False)
        values = settings.from_pytest(pytestconfig, "precision")
        subset = bool(values["subjects"] or values["limit_per_subject"])
        root = Path(values["output_dir"] or Path(pytestconfig.invocation_params.dir) / ACCURACY_RESULTS)
        cfg = PrecisionConfig.from_values({**values, "output_dir": root / mode}, mode=mode, work_dir=work,
                                          gate=not subset, progress=False)
        # The spec for this set's work, as the CLI resolves it for the same settings (--compile auto included).
        spec = make_engine_spec(**settings.from_pytest(pytestconfig, "model"),
                                work=drivers.Work(precision=(drivers.precision_work(cfg),)))
        if not subset:
            try:
                cfg.gate_model = gate_model_key(mode, cfg.scorings, spec.model_path, cfg.gate_model)
            except UserError as exc:
                refusal = str(exc)
            else:
                refusal = None
            if refusal is not None:  # outside the except block: one line, unchained
                pytest.fail(refusal, pytrace=False)
        result = drivers.run_precision(cfg, spec, engine=engine_factory(spec), raise_gate=False)
        pytestconfig.stash[_ACCURACY].append(result)
        if result.gate_failure is not None:  # the table is reported once, unchained
            pytest.fail(result.gate_failure, pytrace=False)
        return result.summary

    return run


# ---------------------------------------------------------------- terminal summary

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from . import perf

    session = config.stash.get(_PERF, None)
    if isinstance(session, perf.PerfSession) and session.run is not None and session.run.results:
        tr = terminalreporter
        tr.write_sep("=", "vicuna-bench perf")
        tr.write_line(perf.summary_table(session.run))
        if session.baseline is not None:
            tr.write_line(f"baseline {session.baseline.path}, tolerance {session.tolerance:.0%}:")
            tr.write_line(session.compare().table())
        for name, path in session.paths.items():
            tr.write_line(f"{name:>14}: {path}")
    swept = config.stash.get(_SWEEP, None)
    if swept is not None and swept.runs:
        from . import sweep

        terminalreporter.write_sep("=", "vicuna-bench perf sweep")
        terminalreporter.write_line(sweep.summary(swept))
        for name, path in swept.paths.items():
            terminalreporter.write_line(f"{name:>14}: {path}")
    runs = config.stash.get(_ACCURACY, [])
    if runs:
        from .precision import results

        terminalreporter.write_sep("=", "vicuna-bench accuracy")
        for run in runs:
            if run.summary is not None:
                terminalreporter.write_line(results.category_table(run.summary))
                for line in run.gate_lines:
                    terminalreporter.write_line(line)
            out_dir = run.out_dir
            files = sorted(p.name for p in out_dir.iterdir() if p.is_file()) if out_dir.is_dir() else []
            terminalreporter.write_line(f"results in {out_dir}: {', '.join(files)}")
