"""The performance harness against the reference's procedure and file formats.

References: shared/spec/REFERENCE.md ("Performance test") for the header,
file name and case order; a model that sleeps known times for the timing;
hand-made baselines for the regression gate.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vicuna_bench import perf
from vicuna_bench.cli import main
from vicuna_bench.errors import GateFailed


pytestmark = pytest.mark.unit

# Copied by hand from shared/spec/REFERENCE.md (and the vendor's source).
HEADER = (
    "batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),forward_first_token_time(ms),"
    "forward_next_token_time(ms),pre_next_token_time(ms),post_next_token_time_post(ms)"
)
SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "REFERENCE.md"


def test_header_is_the_reference_header():
    assert perf.REFERENCE_HEADER == HEADER
    # The spec beside the checkout is the reference: without it this test cannot say anything, so it fails.
    assert SPEC.is_file(), f"{SPEC} is missing: the header cannot be checked against the reference"
    assert f"`{HEADER}`" in SPEC.read_text()


def test_sweep_is_input_major_powers_of_two():
    expected = [(32, 32), (32, 64), (32, 128), (64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)]
    assert [(c.seq_in, c.seq_out) for c in perf.sweep_cases(5, 7)] == expected
    assert len(perf.sweep_cases(5, 10)) == 36  # the reference's example
    assert [(c.seq_in, c.seq_out) for c in perf.parse_case_pair(" [[256, 64], [16,1]] ")] == [(256, 64), (16, 1)]


def test_warmup_is_largest_input_and_output():
    cases = perf.parse_case_pair("[[64,8],[16,32]]")
    assert perf.warmup_case(cases, 2048) == perf.Case(64, 32)
    # Together they would not fit the cache: the largest case instead.
    assert perf.warmup_case(cases, 90) == perf.Case(64, 8)


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _perf_cli(model: Path, out: Path, *extra: str) -> int:
    return main(["perf", "--model-path", str(model), "--device", "cpu", "--max-seq-len", "256",
                 "--output-dir", str(out), "--no-progress", *extra])


def test_cli_sweep_writes_reference_csv_in_case_order(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert _perf_cli(tiny_models["vicuna"], out, "--min-len-exp", "5", "--max-len-exp", "7", "--model-name", "tiny") == 0
    from vicuna_bench.devices import cpu_model_name

    stem = f"performance_test_tiny_{cpu_model_name().replace(' ', '_')}_bs1"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}.csv", f"{stem}_extended.csv", f"{stem}_samples.json", f"{stem}.png"]
    )
    text = (out / f"{stem}.csv").read_text()
    assert text.splitlines()[0] == HEADER
    rows = _read_csv(out / f"{stem}.csv")[1:]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(1, c.seq_in, c.seq_out) for c in perf.sweep_cases(5, 7)]
    for r in rows:
        assert len(r[3].split(".")[1]) == 2  # ResponseTime with 2 decimals
        assert float(r[4]) > 0 and float(r[5]) > 0
        assert r[6:] == ["0.0", "0.0"]
    ext = _read_csv(out / f"{stem}_extended.csv")
    assert ext[0] == perf.EXTENDED_COLUMNS and len(ext) == 10
    cols = {name: i for i, name in enumerate(ext[0])}
    for r in ext[1:]:
        assert float(r[cols["first_token_ms_p50"]]) <= float(r[cols["first_token_ms_p99"]])
        assert 0 < float(r[cols["decode_roofline_fraction"]])
        assert float(r[cols["decode_bytes_per_step"]]) > 0 and float(r[cols["peak_memory_mib_max"]]) > 0
    samples = json.loads((out / f"{stem}_samples.json").read_text())
    assert [len(c["step_ms"]) for c in samples["cases"]] == [c.seq_out - 1 for c in perf.sweep_cases(5, 7)]
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_case_pair_overrides_sweep_and_seq_out_one(tiny_models, tmp_path):
    out = tmp_path / "out"
    # [8,24]: normal mode's next-token time is a difference of two generations; 23 steps keep it above the noise.
    code = _perf_cli(tiny_models["vicuna"], out, "--case-pair", "[[40,1],[8,24]]", "--min-len-exp", "5",
                     "--max-len-exp", "6", "--batch-size", "2", "--perf-mode", "normal", "--model-name", "m")
    assert code == 0
    [ref] = list(out.glob("performance_test_m_*_bs2.csv"))
    rows = _read_csv(ref)[1:]
    assert [r[:3] for r in rows] == [["2", "40", "1"], ["2", "8", "24"]]
    assert rows[0][5] == "0.0"  # next-token time undefined for one output token (no division by zero)
    [ext] = list(out.glob("*_extended.csv"))
    with open(ext, newline="") as f:
        ext_rows = list(csv.DictReader(f))
    # Defined (a number) for 24 tokens; its sign is the noise of a difference of two generations on a loaded host.
    assert ext_rows[0]["next_token_ms_p50"] == "" and ext_rows[1]["next_token_ms_p50"] != ""
    float(ext_rows[1]["next_token_ms_p50"])


# ---------------------------------------------------------------- timing honesty


# ---------------------------------------------------------------- baseline gate

def _synthetic_run(first_ms: float, next_ms: float) -> perf.PerfRun:
    settings = perf.PerfSettings(cases=[perf.Case(256, 64)], model_name="m", mem_bandwidth_gbps=1.0)
    run = perf.PerfRun("m", "/m", "cpu", "cpu", "fp32", 1, settings,
                       [{"weight_bytes": 1, "decode_weight_bytes": 1, "kv_bytes_per_token": 1}], [1e9], "given",
                       perf.Case(256, 64))
    result = perf.CaseResult(perf.Case(256, 64), 1, "detail", first_ms=[first_ms], next_ms=[next_ms],
                             step_ms=[next_ms] * 63, e2e_ms=[first_ms + 63 * next_ms], response_s=[1.0],
                             peak_memory_bytes=[1])
    run.results.append(result)
    return run


def _reference_baseline(path: Path, first_ms: float, next_ms: float) -> Path:
    path.write_text(HEADER + f"\n1,256,64,8.55,{first_ms},{next_ms},0.0,0.0\n")
    return path


@pytest.mark.parametrize("slowdown, fails", [(1.20, True), (1.05, False), (0.80, False)])
def test_baseline_gate_on_synthetic_slowdown(slowdown, fails, tmp_path):
    baseline = perf.load_baseline(_reference_baseline(tmp_path / "old.csv", 1000.0, 100.0))
    run = _synthetic_run(1000.0 * slowdown, 100.0 * slowdown)
    printed = []
    if fails:
        with pytest.raises(GateFailed, match="slower than the baseline by more than 10%"):
            perf.gate(run, baseline, 0.10, echo=printed.append)
        assert "1000.000" in printed[0] and "1200.000" in printed[0] and "1.200" in printed[0]
    else:
        comparison = perf.gate(run, baseline, 0.10, echo=printed.append)
        assert not comparison.regressions and len(comparison.lines) == 2


def test_baseline_from_extended_csv_compares_p50(tmp_path):
    run = _synthetic_run(1000.0, 100.0)
    perf.write_tables(run, tmp_path)
    baseline = perf.load_baseline(tmp_path / f"{run.stem}_extended.csv")
    assert baseline.kind == "extended"
    assert perf.gate(_synthetic_run(1040.0, 104.0), baseline, 0.05, echo=lambda _: None).lines
    with pytest.raises(GateFailed):
        perf.gate(_synthetic_run(1000.0, 120.0), baseline, 0.10, echo=lambda _: None)


def test_cli_baseline_without_shared_cases_is_bad_input(tiny_models, tmp_path, capsys):
    _reference_baseline(tmp_path / "old.csv", 100.0, 10.0)  # holds [256,64] only
    assert _perf_cli(tiny_models["vicuna"], tmp_path / "out", "--case-pair", "[[16,4]]", "--baseline",
                     str(tmp_path / "old.csv")) == 2
    assert "holds none of this run's cases" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_baseline_gate_exit_codes(tiny_models, tmp_path, capsys):
    """Real runs against impossible baselines: far faster fails (3), far slower passes (0)."""
    case = "[[16,4]]"
    fast = _reference_baseline(tmp_path / "fast.csv", 1e-6, 1e-6).read_text().replace("1,256,64", "1,16,4")
    (tmp_path / "fast.csv").write_text(fast)
    slow = fast.replace("1e-06", "1e9")
    (tmp_path / "slow.csv").write_text(slow)
    assert _perf_cli(tiny_models["vicuna"], tmp_path / "a", "--case-pair", case, "--baseline",
                     str(tmp_path / "fast.csv")) == 3
    captured = capsys.readouterr()
    assert "SLOWER" in captured.out and "error:" in captured.err
    assert list((tmp_path / "a").glob("*.csv"))  # the run's own results are kept
    assert _perf_cli(tiny_models["vicuna"], tmp_path / "b", "--case-pair", case, "--baseline",
                     str(tmp_path / "slow.csv"), "--tolerance", "0.1") == 0


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "args, named",
    [
        (["--case-pair", "[[256,abc]]"], "[[256,abc]]"),
        (["--case-pair", "[[256]]"], "[256]"),
        (["--case-pair", "[[256,64.5]]"], "64.5"),
        (["--case-pair", "256,64"], "256"),
        (["--min-len-exp", "8", "--max-len-exp", "6"], "--min-len-exp 8"),
        (["--case-pair", "[[200,64]]"], "[200,64]"),
        (["--case-pair", "[[16,4]]", "--batch-size", "0"], "--batch-size 0"),
        (["--case-pair", "[[16,4]]", "--baseline", "missing.csv"], "missing.csv"),
        (["--case-pair", "[[16,4]]", "--baseline", "SPEC"], "REFERENCE.md"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(args, named, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(SPEC) if a == "SPEC" else a for a in args]  # a file that is no CSV of ours
    assert _perf_cli(tiny_models["vicuna"], out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not out.exists() or not any(out.iterdir())
