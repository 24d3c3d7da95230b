"""The performance suite: one pytest-benchmark record per case, the reference CSVs at the end.

``pytest -m perf --world-size 8`` runs small cases on a tiny random Llama
(built here, splittable 8 ways); ``--model-path DIR`` (or ``embedded``)
benchmarks a real model, with ``--perf-case-pair`` or the
``--perf-min-len-exp``/``--perf-max-len-exp`` sweep.  One engine serves the
whole session.  Outputs go to ``--perf-output-dir`` (default: a directory
in pytest's tmp path, printed at the end).  Tests never fail on absolute
time: only against ``--perf-baseline`` (slower than ``--perf-tolerance``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna_bench import perf
from vicuna_bench.pytest_plugin import make_engine_spec

TINY_CASES = "[[32,8],[64,8]]"
MODEL_CASES = "[[256,64]]"


def _settings(config) -> perf.PerfSettings:
    opt = config.getoption
    tiny = opt("--model-path") is None
    cases = perf.select_cases(opt("--perf-case-pair"), opt("--perf-min-len-exp"), opt("--perf-max-len-exp"),
                              default_case_pair=TINY_CASES if tiny else MODEL_CASES, source="--perf-case-pair")
    return perf.PerfSettings(cases=cases, batch_size=opt("--perf-batch-size"), mode=opt("--perf-mode"),
                             repeat=opt("--perf-repeat"), model_name="tiny-llama" if tiny else "model")


def pytest_generate_tests(metafunc):
    if "perf_case" in metafunc.fixturenames:
        cases = _settings(metafunc.config).cases
        metafunc.parametrize("perf_case", cases, ids=[f"in{c.seq_in}-out{c.seq_out}" for c in cases])


@pytest.fixture(scope="session")
def perf_session(vicuna_options, engine_factory, tmp_path_factory, pytestconfig):
    """The engine, the settings, the run being filled, and where it is written."""
    o = vicuna_options
    settings = _settings(pytestconfig)
    if o["model_path"] is None:
        from tests import tiny

        model_path = tiny.make_tiny_llama(tmp_path_factory.mktemp("perf") / "tiny-llama", tiny.VICUNA_SHAPED, seed=7)
        max_seq_len = max(c.seq_in + c.seq_out for c in settings.cases)
    else:
        model_path, max_seq_len = o["model_path"], o["max_seq_len"]
    spec = make_engine_spec(model_path, o["world_size"], o["device"], o["dtype"], max_seq_len)
    if o["model_path"] is not None:
        settings.model_name = perf.default_model_name(spec.model_path)
    settings.validate(spec.max_seq_len)
    baseline = perf.load_baseline(Path(o["perf_baseline"])) if o["perf_baseline"] else None
    engine = engine_factory(spec)
    out_dir = Path(o["perf_output_dir"]) if o["perf_output_dir"] else tmp_path_factory.mktemp("perf-results")
    run = perf.start_run(engine, settings)
    yield {"engine": engine, "settings": settings, "run": run, "baseline": baseline, "out_dir": out_dir,
           "tolerance": o["perf_tolerance"]}
    if run.results:
        paths = perf.write_tables(run, out_dir)
        perf.write_plot(run, out_dir / f"{run.stem}.png")
        print(f"\nperf results: {paths['reference_csv']} (+ _extended.csv, _samples.json, .png)")


def test_latency(perf_case, perf_session, benchmark):
    """One case: R timed generations, recorded by pytest-benchmark and in the CSVs."""
    engine, settings, run = perf_session["engine"], perf_session["settings"], perf_session["run"]
    one_round = perf.PerfSettings(**{**settings.__dict__, "repeat": 1})
    rounds: list[perf.CaseResult] = []
    benchmark.pedantic(lambda: rounds.append(perf.measure_case(engine, perf_case, one_round, run.generator)),
                       rounds=settings.repeat, iterations=1, warmup_rounds=0)
    result = perf.merge_results(rounds)
    run.results.append(result)
    row = perf.extended_row(run, result)
    benchmark.extra_info.update({k: row[k] for k in (
        "model_name", "device", "dtype", "world_size", "perf_mode", "batch_size", "seq_in", "seq_out",
        "first_token_ms_p50", "next_token_ms_p50", "prefill_tokens_per_s", "decode_tokens_per_s",
        "decode_floor_ms", "decode_roofline_fraction", "peak_memory_mib_max")})
    assert len(result.first_ms) == settings.repeat
    assert len(result.step_ms) == (settings.repeat * (perf_case.seq_out - 1) if settings.mode == "detail"
                                   else settings.repeat * (perf_case.seq_out > 1))
    baseline = perf_session["baseline"]
    if baseline is not None:
        single = perf.PerfRun(**{**run.__dict__, "results": [result]})
        comparison = perf.compare_to_baseline(single, baseline, perf_session["tolerance"])
        if comparison.regressions:
            pytest.fail(f"slower than {baseline.path}:\n{comparison.table()}", pytrace=False)
