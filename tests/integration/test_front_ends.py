"""The front ends are thin and agree: one settings table, one perf driver, one rank merge, no tokenizer for ids.

References: transformers' ``generate`` for tokens; the settings table's own
text and hand-made values for the options; the files a run leaves, read
back with the csv module.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny
from tests.unit.precision_fixtures import make_synthetic_mmlu
from tests.integration.test_cli import assert_one_line_error, vb
from vicuna_bench import perf, settings
from vicuna_bench.cli import build_parser, main, parse_args
from vicuna_bench.errors import UserError
from vicuna_bench.generation import GenerationResult
from vicuna_bench.runtime import merge_rank_results

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_pytest(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pytest ARGS`` started from ``cwd`` (a folder outside the checkout, as a user's)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the settings table

def test_every_setting_in_both_front_ends_with_the_same_default(pytestconfig):
    perf_ns = parse_args(["perf"], env={})
    prec_ns = parse_args(["precision", "--mode", "mmlu", "--work-dir", "."], env={})
    for s in (s for s in settings.SETTINGS if s.group in settings.PYTEST_PREFIX):
        ns = prec_ns if s.group == "precision" else perf_ns
        assert hasattr(ns, s.dest), s.cli_flag
        pytestconfig.getoption(s.pytest_dest)  # raises when pytest lacks it
        # The same default in both (the env-backed ones are None in both, resolved later).
        expected = None if s.env else s.default
        if s.key not in ("perf.output_dir", "precision.output_dir"):  # spec/CLI.md: each front end its own place
            assert getattr(ns, s.dest) == expected, s.cli_flag
    # spec/CLI.md's CLI names (hand-copied), on the parser of each command that takes them, nightly included.
    nightly = build_parser().parse_args(["nightly", "--no-bind-cpu", "--no-quick", "--no-progress", "--world-size", "2",
                                         "--device-type", "d3", "--case-pair", "[[1,1]]", "--repeat", "3",
                                         "--batch", "4", "--scoring", "both", "--prefix-cache", "off"])
    assert (nightly.bind_cpu, nightly.quick, nightly.progress, nightly.world_size, nightly.chip_family) == (
        False, False, False, 2, "d3")
    assert (nightly.case_pair, nightly.repeat, nightly.batch, nightly.scoring, nightly.prefix_cache) == (
        "[[1,1]]", 3, 4, "both", "off")
    for flag in ("--model-path", "--world-size", "--device", "--device-type", "--dtype", "--max-seq-len", "--compile",
                 "--batch-size", "--case-pair", "--min-len-exp", "--max-len-exp", "--perf-mode", "--repeat",
                 "--model-name", "--output-dir", "--baseline", "--tolerance"):
        assert flag in build_parser()._subparsers._group_actions[0].choices["perf"]._option_string_actions, flag
    for flag in ("--batch", "--shot", "--seq-len-out", "--max-prompt-tokens", "--scoring", "--subjects",
                 "--limit-per-subject", "--prefix-cache", "--output-dir", "--gate", "--mode", "--work-dir"):
        assert flag in build_parser()._subparsers._group_actions[0].choices["precision"]._option_string_actions, flag
    names = {s.pytest_flag for s in settings.SETTINGS if s.group in settings.PYTEST_PREFIX}
    for required in ("--perf-repeat", "--perf-seed", "--perf-mem-bandwidth", "--perf-model-name", "--device-type",
                     "--perf-case-pair", "--perf-baseline", "--perf-tolerance", "--perf-output-dir",
                     "--accuracy-batch", "--accuracy-scoring", "--accuracy-model", "--accuracy-output-dir"):
        assert required in names  # spec/CLI.md's pytest names


def test_errors_name_the_option_of_the_front_end_in_use():
    bad = perf.PerfSettings(cases=[perf.Case(8, 2)], batch_size=0)
    with settings.front_end("pytest"), pytest.raises(UserError, match=r"^--perf-batch-size 0 must be >= 1$"):
        bad.validate(64)
    with settings.front_end("cli"), pytest.raises(UserError, match=r"^--batch-size 0 must be >= 1$"):
        bad.validate(64)
    with settings.front_end("pytest"), pytest.raises(UserError, match=r"^--perf-case-pair '\[\[1\]\]'"):
        perf.select_cases("[[1]]", None, None)


def test_device_type_is_validated_and_reaches_the_engine_spec(tiny_models):
    from tests.specs import spec_for

    assert spec_for(tiny_models["gqa"], 1, "cpu", "fp32", 64, chip_family="d3").chip_family == "d3"
    proc = vb("run", "--model-path", str(tiny_models["gqa"]), "--device-type", "d7", "--prompt-ids", "5")
    assert_one_line_error(proc, "--device-type", "'d7'", "d9, d3")


# ---------------------------------------------------------------- one merge, one request type

def test_rank_merge_takes_maxima_and_keeps_peaks_in_rank_order():
    rank0 = GenerationResult([[7, 8]], 10.0, [1.0, 5.0], None, 30.0, [100])
    rank1 = GenerationResult([], 12.0, [3.0, 2.0], None, 25.0, [200])
    merged = merge_rank_results([rank0, rank1])
    assert (merged.output_ids, merged.first_token_ms, merged.step_ms, merged.total_ms, merged.peak_memory_bytes) == (
        [[7, 8]], 12.0, [3.0, 5.0], 30.0, [100, 200])
    assert merge_rank_results([rank1, rank0], tokens_from=1).output_ids == [[7, 8]]


def test_a_misspelt_generation_option_is_an_error(tiny_models):
    from tests.specs import spec_for
    from vicuna_bench.runtime import Engine

    with Engine(spec_for(tiny_models["gqa"], 1, "cpu", "fp32", 64)) as engine:
        with pytest.raises(TypeError, match="ignore_eso"):
            engine.generate([[5, 6]], 2, ignore_eso=True)


def test_ranks_split_the_cpus_this_process_may_use():
    code = ("import os; from vicuna_bench.rank_setup import usable_cpus, _threads_per_rank; "
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "print(usable_cpus(), _threads_per_rank(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["1", "1"]


# ---------------------------------------------------------------- no tokenizer needed for token ids

@pytest.fixture(scope="module")
def no_tokenizer_model(tmp_path_factory):
    path = tiny.make_tiny_llama(tmp_path_factory.mktemp("notok") / "random-gqa", tiny.GQA, seed=11, tokenizer=False)
    assert not list(path.glob("tokenizer*"))
    return path


@pytest.mark.parametrize("world_size", [1, 2])
def test_prompt_ids_need_no_tokenizer_and_match_transformers(no_tokenizer_model, world_size):
    prompts = [[5, 17, 99, 3], [8, 9, 250]]
    proc = vb("run", "--model-path", str(no_tokenizer_model), "--world-size", str(world_size), "--json",
              "--dtype", "fp32", "--max-new-tokens", "5", "--ignore-eos", *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))])
    assert proc.returncode == 0, proc.stderr
    assert sum("no tokenizer found" in line for line in proc.stderr.splitlines()) == 1
    doc = json.loads(proc.stdout)
    model = tiny.hf_model(no_tokenizer_model)
    for prompt, out in zip(prompts, doc["outputs"]):
        assert out["text"] is None
        assert out["output_ids"] == tiny.hf_greedy(model, prompt, 5)[0]


def test_perf_needs_no_tokenizer(no_tokenizer_model, tmp_path):
    assert main(["perf", "--model-path", str(no_tokenizer_model), "--device", "cpu", "--max-seq-len", "32",
                 "--case-pair", "[[8,2]]", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    [ref] = tmp_path.glob("performance_test_random-gqa_*_bs1.csv")
    assert [r[:3] for r in csv.reader(ref.open())][1:] == [["1", "8", "2"]]


def test_text_prompt_without_tokenizer_exits_2_naming_the_directory(no_tokenizer_model):
    proc = vb("run", "--model-path", str(no_tokenizer_model), "--prompt", "hello")
    assert_one_line_error(proc, str(no_tokenizer_model), "no tokenizer")


# ---------------------------------------------------------------- one perf driver, two front ends

def test_cli_and_pytest_give_the_same_cases_rows_and_columns(tiny_models, tmp_path):
    model = str(tiny_models["vicuna"])
    common = {"case-pair": "[[8,3],[16,1]]", "repeat": "2", "seed": "3", "model-name": "same", "mem-bandwidth": "10"}
    cli_out, py_out = tmp_path / "cli", tmp_path / "pytest"
    cli_args = [a for k, v in common.items() for a in (f"--{k}", v)]
    assert main(["perf", "--model-path", model, "--device", "cpu", "--max-seq-len", "64", "--no-progress",
                 "--output-dir", str(cli_out), *cli_args]) == 0
    py_args = [a for k, v in common.items() for a in (f"--perf-{k}", v)]
    proc = run_pytest(tmp_path, "-q", "-m", "perf", str(ROOT / "tests/perf/test_latency.py"), "--model-path", model,
                      "--device", "cpu", "--max-seq-len", "64", "--perf-output-dir", str(py_out), *py_args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [cli_ref], [py_ref] = cli_out.glob("performance_test_same_*_bs1.csv"), py_out.glob("performance_test_same_*_bs1.csv")
    assert cli_ref.name == py_ref.name
    with open(cli_ref) as a, open(py_ref) as b:
        cli_rows, py_rows = list(csv.reader(a)), list(csv.reader(b))
    untimed = (0, 1, 2, 6, 7)  # batch, seq_in, seq_out and the reference's two zero columns
    assert [[r[i] for i in untimed] for r in cli_rows] == [[r[i] for i in untimed] for r in py_rows]
    assert [r[:3] for r in cli_rows[1:]] == [["1", "8", "3"], ["1", "16", "1"]]
    [cli_ext], [py_ext] = cli_out.glob("*_extended.csv"), py_out.glob("*_extended.csv")
    assert cli_ext.read_text().splitlines()[0] == py_ext.read_text().splitlines()[0]
    same = ("model_name", "device_name", "device", "dtype", "world_size", "perf_mode", "batch_size", "seq_in",
            "seq_out", "repeats", "weight_mib_per_rank", "decode_bytes_per_step", "mem_bandwidth_gbps",
            "decode_floor_ms")
    assert [{k: r[k] for k in same} for r in read_csv(cli_ext)] == [{k: r[k] for k in same} for r in read_csv(py_ext)]


def test_pytest_perf_baseline_sharing_no_case_fails_before_measuring(tmp_path):
    baseline = tmp_path / "old.csv"
    baseline.write_text(perf.REFERENCE_HEADER + "\n1,256,64,1.00,100.0,10.0,0.0,0.0\n")
    proc = run_pytest(tmp_path, "-q", "-m", "perf", str(ROOT / "tests/perf/test_latency.py"),
                      "--perf-case-pair", "[[8,3]]", "--perf-baseline", str(baseline), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"--perf-baseline {baseline}: it holds none of this run's cases" in out
    assert "engine:" not in out and "warm-up" not in out  # nothing was started, nothing measured
    assert not (tmp_path / "perf-results").exists()


def test_pytest_accuracy_subset_writes_accuracy_results_and_prints_scores(tiny_models, tmp_path):
    work = make_synthetic_mmlu(tmp_path / "work")
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    proc = run_pytest(cwd, "-q", "-m", "accuracy", str(ROOT / "tests/accuracy/test_release_gate.py"), "-k", "mmlu",
                      "--mmlu-dir", str(work), "--model-path", str(tiny_models["gqa"]), "--max-seq-len", "256",
                      "--accuracy-max-prompt-tokens", "250", "--accuracy-subjects", "alpha_studies,college_physics",
                      "--accuracy-limit-per-subject", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out_dir = cwd / "accuracy-results" / "mmlu"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["results"]["generate"]["total"] == 2  # one question from each of the two subjects
    assert (out_dir / "cache.csv").is_file()
    assert "Avg(Hard)" in proc.stdout and f"results in {out_dir}" in proc.stdout
    assert "gate: not judged" in proc.stdout


# ---------------------------------------------------------------- pytest -n N

@pytest.mark.all_cpus  # its ranks (or workers) share out the CPUs: under pytest -n a worker has one
def test_xdist_workers_get_disjoint_cpu_shares(tmp_path):
    """Under ``pytest -n 2`` each worker (and the ranks it spawns) runs on its own half of the CPUs."""
    cpus = len(os.sched_getaffinity(0))
    out = tmp_path / "shares"
    out.mkdir()
    (tmp_path / "test_share.py").write_text(
        "import json, os, torch\n"
        "import pytest\n"
        "@pytest.mark.parametrize('n', range(4))\n"
        "def test_share(worker_id, n):\n"
        f"    out = {str(out)!r} + f'/{{worker_id}}.json'\n"
        "    mine = sorted(os.sched_getaffinity(0))\n"
        "    open(out, 'w').write(json.dumps({'cpus': mine, 'threads': torch.get_num_threads()}))\n"
    )
    proc = run_pytest(tmp_path, "-q", "-n", "2", "test_share.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shares = [json.loads(p.read_text()) for p in sorted(out.glob("gw*.json"))]
    assert shares, proc.stdout
    for share in shares:
        assert len(share["cpus"]) == max(1, cpus // 2) and share["threads"] == len(share["cpus"])
    if cpus >= 2 and len(shares) == 2:
        assert not set(shares[0]["cpus"]) & set(shares[1]["cpus"])
