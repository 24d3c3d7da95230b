"""`vicuna-bench sdk-test` and the vendor's shell entry points, as a vendor user meets them."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny
from tests.unit.precision_fixtures import make_synthetic_ceval, make_synthetic_mmlu
from tests.integration.test_cli import assert_one_line_error, vb
from tests.unit.test_precision import assert_same_files
from tests.records import drop_measured_rates

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"

# Splits 3 ways (6 heads, 3 key/value heads, intermediate 96), with room for the precision test's
# 2000-token prompt limit. The precision comparison runs on it at world size 3: the embedded model
# would cost about a minute of CI for the same check (two runs, three ranks on two cores).
THREE_WAY = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
    intermediate_size=96, vocab_size=600, max_position_embeddings=4096, tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def three_way(tmp_path_factory):
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("three-way") / "tiny-3way", THREE_WAY, seed=5)


def write_ini(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sdk_config.ini"
    path.write_text(text)
    return path


def env_without(*names: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def sdk(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`vicuna-bench sdk-test ...` run from ``cwd`` (where its sdk_config.ini is)."""
    return subprocess.run(
        [sys.executable, "-m", "vicuna_bench", "sdk-test", *args, "--no-progress"], cwd=cwd,
        capture_output=True, text=True, timeout=timeout,
        env=env or env_without("TIMEIT", "MAX_SEQ_LENGTH", "CPU_BINDING_NUM", PYTHONPATH=str(ROOT)),
    )


def cpu_set(text: str) -> set[int]:
    """CPU ids of a list such as ``0-3,8``."""
    cpus: set[int] = set()
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ the same files as the dedicated commands

# Columns of the extended CSV that do not depend on timing or memory.
FIXED_COLUMNS = ("model_name", "device_name", "device", "dtype", "world_size", "perf_mode", "batch_size", "seq_in",
                 "seq_out", "repeats", "weight_mib_per_rank", "decode_bytes_per_step", "compile", "cpu_binding")


def test_performance_writes_what_vicuna_bench_perf_writes(smollm2_path, tmp_path):
    """`sdk-test 1 d9 performance` on the embedded model (its default) against `vicuna-bench perf`."""
    a, b = tmp_path / "sdk", tmp_path / "perf"
    write_ini(a, "[performance]\nmodel_name = smol\nbatch_size = 2\ncase_pair = [[12, 3], [6, 2]]\n"
                 "perf_mode = normal\nsave_file_name = ignored.csv\n")
    proc = sdk(a, "1", "d9", "performance", "--compile", "off")
    assert proc.returncode == 0, proc.stderr
    ref = vb("perf", "--model-name", "smol", "--batch-size", "2", "--case-pair", "[[12,3],[6,2]]", "--perf-mode",
             "normal", "--compile", "off", "--output-dir", str(b), "--no-progress",
             env={"TIMEIT": "", "MAX_SEQ_LENGTH": ""})
    assert ref.returncode == 0, ref.stderr
    names = sorted(p.name for p in a.iterdir() if p.name != "sdk_config.ini")
    assert names == sorted(p.name for p in b.iterdir())
    stem = next(n for n in names if n.endswith("_extended.csv"))[: -len("_extended.csv")]
    assert stem.startswith("performance_test_smol_") and stem.endswith("_bs2")
    ref_a, ref_b = (d / f"{stem}.csv" for d in (a, b))
    lines_a, lines_b = ref_a.read_text().splitlines(), ref_b.read_text().splitlines()
    assert lines_a[0] == lines_b[0] == (
        "batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),forward_first_token_time(ms),"
        "forward_next_token_time(ms),pre_next_token_time(ms),post_next_token_time_post(ms)")
    assert [ln.split(",")[:3] for ln in lines_a[1:]] == [ln.split(",")[:3] for ln in lines_b[1:]] == [
        ["2", "12", "3"], ["2", "6", "2"]]
    ext_a, ext_b = read_csv(a / f"{stem}_extended.csv"), read_csv(b / f"{stem}_extended.csv")
    assert list(ext_a[0]) == list(ext_b[0])
    assert [[r[c] for c in FIXED_COLUMNS] for r in ext_a] == [[r[c] for c in FIXED_COLUMNS] for r in ext_b]
    assert [(r["perf_mode"], r["world_size"]) for r in ext_a] == [("normal", "1")] * 2
    # One rank, bound to every CPU this process may use (as the subprocess inherits them).
    assert [cpu_set(r["cpu_binding"]) for r in ext_a] == [os.sched_getaffinity(0)] * 2
    doc_a, doc_b = (json.loads((d / f"{stem}_samples.json").read_text()) for d in (a, b))
    assert sorted(doc_a) == sorted(doc_b)
    for doc in (doc_a, doc_b):  # the probes' rates (GFLOP/s) are measured: the dtype and paths they chose are compared
        drop_measured_rates(doc["environment"])
    for key in ("model_name", "device", "dtype", "world_size", "batch_size", "perf_mode", "environment",
                "cpu_binding"):
        assert doc_a[key] == doc_b[key], key
    assert doc_a["environment"]["device_type"] == "cpu" and doc_a["environment"]["torch"]
    assert doc_a["cpu_binding"][0]["rank"] == 0


def test_precision_at_world_size_3_writes_what_vicuna_bench_precision_writes(three_way, tmp_path):
    work = make_synthetic_mmlu(tmp_path / "mmlu")
    run_dir = tmp_path / "run"
    write_ini(run_dir, f"[model]\nmodel_path = {three_way}\ndevice_ids = 4,5,6,7\nlog_dir = logs\n"
                       f"parallel_backend = hccl\n"
                       f"[precision]\nmode = mmlu\nwork_dir = \"{work}\"\nbatch = 2\nshot = 2\nseq_len_out = 3\n")
    proc = sdk(run_dir, "3", "d9", "precision", "--compile", "off")
    assert proc.returncode == 0, proc.stderr
    sdk_result = work / "sdk_result"
    (work / "test_result").rename(sdk_result)
    ref = vb("precision", "--mode", "mmlu", "--work-dir", str(work), "--batch", "2", "--shot", "2",
             "--seq-len-out", "3", "--world-size", "3", "--model-path", str(three_way), "--compile", "off",
             "--no-progress", env={"MAX_SEQ_LENGTH": ""})
    assert ref.returncode == 0, ref.stderr
    assert_same_files(sdk_result, work / "test_result")
    summary = json.loads((sdk_result / "summary.json").read_text())
    assert (summary["world_size"], summary["settings"]["shot"], summary["settings"]["seq_len_out"]) == (3, 2, 3)
    # The synthetic set's long question (700 words, and its choices as long) fits no 2000-token prompt.
    assert summary["questions"] == {"in_data": 8, "selected": 8, "answered": 7, "too_long": 1}
    assert summary["environment"]["device_type"] == "cpu"
    assert [b["rank"] for b in summary["cpu_binding"]] == [0, 1, 2]
    # Each rank's log: what ran (the dtype --dtype auto chose once for all ranks), and where it was pinned.
    assert summary["dtype"] in ("fp32", "bf16")
    for rank in range(3):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: start: model={three_way} world_size=3 device=cpu" in text
        assert f"dtype={summary['dtype']} compile=off" in text
        assert f"cpu binding: rank {rank} (cpu):" in text


# ------------------------------------------------------------------ the guide's INI as written, both data sets

def test_precision_with_an_ini_setting_only_work_dir_runs_ceval(three_way, tmp_path, caplog):
    """The guide's C-Eval steps set only work_dir: the data says C-Eval, and the run says so."""
    from vicuna_bench.cli import main

    work = make_synthetic_ceval(tmp_path / "ceval")
    ini = write_ini(tmp_path / "run", f"[precision]\nwork_dir = {work}\n")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        # The model by flag: the INI's default (the embedded model) costs seconds more for the same check.
        assert main(["sdk-test", "1", "d9", "precision", "--config", str(ini), "--model-path", str(three_way),
                     "--compile", "off", "--no-progress"]) == 0
    said = [r.getMessage() for r in caplog.records if "mode not set" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{ini}: [precision] mode not set: ceval (") and (
        "row 1 is the C-Eval header" in said[0])
    summary = json.loads((work / "test_result" / "summary.json").read_text())
    assert summary["mode"] == "ceval"
    assert summary["questions"]["answered"] == 3  # SYNTHETIC_CEVAL's three val rows, ids from the id column
    cache = (work / "test_result" / "cache.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in cache] == [["3", "delta_law", "A"], ["10", "gamma_medicine", "B"],
                                                    ["11", "gamma_medicine", "D"]]


def test_precision_mode_mmlu_on_ceval_data_exits_2_naming_both(tmp_path, capsys):
    from vicuna_bench.cli import main

    work = make_synthetic_ceval(tmp_path / "ceval")
    ini = write_ini(tmp_path / "run", f"[model]\nlog_dir = logs\n[precision]\nmode = mmlu\nwork_dir = {work}\n")
    assert main(["sdk-test", "1", "d9", "precision", "--config", str(ini)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1, err
    assert f"{ini}: [precision] mode=mmlu contradicts the data" in err[0]
    assert "C-Eval header" in err[0] and "so it is ceval data" in err[0]
    assert not (work / "test_result").exists() and not (tmp_path / "run" / "logs").exists()


def test_precision_section_model_path_is_the_precision_model(three_way, tmp_path, caplog):
    """The guide lists model_path under [precision]: it wins there, and a different [model] one is said."""
    from vicuna_bench.cli import main

    work = make_synthetic_ceval(tmp_path / "ceval")
    ini = write_ini(tmp_path / "run", f"[model]\nmodel_path = {tmp_path / 'not-this-one'}\n"
                                      f"[precision]\nmode = ceval\nmodel_path = \"{three_way}\"\nwork_dir = {work}\n"
                                      "device = 0\nseq_len_out = 1\n")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert main(["sdk-test", "1", "d9", "precision", "--config", str(ini), "--compile", "off",
                     "--no-progress"]) == 0
    summary = json.loads((work / "test_result" / "summary.json").read_text())
    assert summary["model_path"] == str(three_way) and summary["settings"]["seq_len_out"] == 1
    conflicts = [r for r in caplog.records if "differs from [model] model_path" in r.getMessage()]
    assert len(conflicts) == 1 and conflicts[0].levelno == logging.WARNING
    assert f"[precision] model_path={three_way} differs" in conflicts[0].getMessage()


# ------------------------------------------------------------------ the shell entry points

def test_run_sdk_test_sh_from_a_directory_holding_only_the_ini(three_way, tmp_path):
    here = tmp_path / "vendor"
    write_ini(here, f"[model]\nmodel_path = {three_way}\ndevice_ids = 0,1,2\nlog_dir = ./logs\n")
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "run_sdk_test.sh"), "3", "d9", "run", "--no-progress", "--compile", "off"], cwd=here,
        capture_output=True, text=True, timeout=600,
        env=env_without("TIMEIT", "MAX_SEQ_LENGTH", "PYTHONPATH", VICUNA_BENCH_PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- ") == 3  # one answer per sample prompt
    doc = json.loads((here / "logs" / "run_outputs.json").read_text())
    assert (doc["world_size"], doc["device_ids"]) == (3, [0, 1, 2])
    assert doc["dtype"] in ("fp32", "bf16")  # --dtype auto on CPU: by the host (docs/PERFORMANCE.md)
    for rank in range(3):  # decided once, in the parent: every rank runs it
        assert f"dtype={doc['dtype']} " in (here / "logs" / f"rank{rank}.log").read_text()
    assert len(doc["outputs"]) == 3 and all(1 <= len(o["output_ids"]) <= 32 for o in doc["outputs"])
    assert sorted(p.name for p in (here / "logs").iterdir()) == ["rank0.log", "rank1.log", "rank2.log",
                                                                 "run_outputs.json"]


def test_cut_weight_sh_takes_its_directories_from_the_top_or_flags(three_way, tmp_path):
    shutil.copytree(three_way, tmp_path / "vicuna-13b-v1.5-16k")
    env = env_without("PYTHONPATH", "INPUT_DIR", "OUTPUT_DIR", VICUNA_BENCH_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPTS / "cut_weight.sh"), "--float", "3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "vicuna-13b-v1.5-16k_parallel_3"  # the vendor guide's model_path for --float 3
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "part_model").iterdir()) == ["0", "1", "2"]
    for rank in range(3):
        assert json.loads((out / "part_model" / str(rank) / "config.json").read_text())["world_size"] == 3
    flags = subprocess.run(["bash", str(SCRIPTS / "cut_weight.sh"), "--float=3", "--input-dir", str(three_way),
                            "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                           env=env)
    assert flags.returncode == 0, flags.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "part_model").iterdir()) == ["0", "1", "2"]
    bare = subprocess.run(["bash", str(SCRIPTS / "cut_weight.sh")], capture_output=True, text=True, env=env)
    assert bare.returncode == 2 and "--float N" in bare.stderr


@pytest.mark.parametrize("script,words", [
    ("cut_weight.sh", ("--float N", "--input-dir", "--output-dir", "part_model")),
    ("run_sdk_test.sh", ("WORLD_SIZE", "DEVICE_TYPE", "TASK", "MAX_SEQ_LENGTH", "sdk_config.ini")),
])
@pytest.mark.parametrize("option", ["--help", "-h"])
def test_scripts_print_usage_on_help_and_exit_0(script, words, option, tmp_path):
    # No python is looked for: an unusable VICUNA_BENCH_PYTHON would make any later step exit 2.
    proc = subprocess.run(["bash", str(SCRIPTS / script), option], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, env=env_without("PYTHONPATH", VICUNA_BENCH_PYTHON="/nonexistent/python"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script} ") and proc.stderr == ""
    for word in words:
        assert word in proc.stdout, word
    assert list(tmp_path.iterdir()) == []  # nothing ran


def _scripts_with_a_python_that_reports(tmp_path: Path) -> Path:
    """A copy of scripts/ whose python prints MAX_SEQ_LENGTH and its arguments instead of running anything."""
    copy = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, copy)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\necho "MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH-unset} $*"\n')
    fake.chmod(0o755)
    return copy


def test_run_sdk_test_sh_sets_max_seq_length_at_its_top_and_the_environment_wins(tmp_path):
    copy = _scripts_with_a_python_that_reports(tmp_path)
    script = copy / "run_sdk_test.sh"

    def run(**extra) -> str:
        env = env_without("MAX_SEQ_LENGTH", "PYTHONPATH", VICUNA_BENCH_PYTHON=str(tmp_path / "python"), **extra)
        proc = subprocess.run(["bash", str(script), "1", "d9", "performance"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run() == "MAX_SEQ_LENGTH=2048 -m vicuna_bench sdk-test 1 d9 performance"  # the vendor's value
    assert run(MAX_SEQ_LENGTH="4096").startswith("MAX_SEQ_LENGTH=4096 ")
    # The line a user edits, as the guide says to for the long case.
    lines = script.read_text().splitlines()
    (edit,) = [i for i, ln in enumerate(lines) if ln.startswith("export MAX_SEQ_LENGTH=")]
    lines[edit] = lines[edit].replace("2048", "16512")
    script.write_text("\n".join(lines) + "\n")
    assert run().startswith("MAX_SEQ_LENGTH=16512 ")
    assert run(MAX_SEQ_LENGTH="300").startswith("MAX_SEQ_LENGTH=300 ")


# ------------------------------------------------------------------ CPU binding at rank start-up

@pytest.mark.all_cpus  # its ranks (or workers) share out the CPUs: under pytest -n a worker has one
def test_two_ranks_are_pinned_to_disjoint_cpus_covering_the_allowed_set(tiny_models):
    from tests.specs import spec_for
    from vicuna_bench.runtime import Engine

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs")

    def affinities(bind: bool) -> list[set[int]]:
        spec = spec_for(tiny_models["gqa"], 2, "cpu", "fp32", 64, bind_cpu=bind)
        with Engine(spec) as engine:
            return [cpu_set(info["affinity"]) for info in engine.rank_info]  # read in each rank's own process

    bound = affinities(True)
    assert not bound[0] & bound[1]
    assert sorted(bound[0] | bound[1]) == allowed
    assert affinities(False) == [set(allowed), set(allowed)]  # --no-bind-cpu leaves them alone


def test_bind_cpu_is_a_flag_of_both_front_ends_and_an_ini_key(tmp_path):
    from vicuna_bench import sdk, settings
    from vicuna_bench.cli import parse_args
    from vicuna_bench.vendor import read_sdk_config

    assert parse_args(["perf"], env={}).bind_cpu is True
    assert parse_args(["perf", "--no-bind-cpu"], env={}).bind_cpu is False
    assert settings.BY_KEY["model.bind_cpu"].pytest_flag == "--bind-cpu"
    off = read_sdk_config(write_ini(tmp_path / "off", "[model]\nbind_cpu = 0\n"), env={})
    assert sdk.layered_values(off, "model")["bind_cpu"] is False
    assert sdk.layered_values(off, "model", {"bind_cpu": True})["bind_cpu"] is True  # a flag wins over the INI
    unset = read_sdk_config(write_ini(tmp_path / "unset", "[model]\n"), env={})
    assert sdk.layered_values(unset, "model")["bind_cpu"] is True


# ------------------------------------------------------------------ INI values are the flags' settings

def test_ini_values_land_on_the_settings_of_the_same_name(tmp_path):
    from vicuna_bench import sdk
    from vicuna_bench.vendor import read_sdk_config

    config = read_sdk_config(write_ini(tmp_path, (
        "[model]\nmodel_path = /m\n"
        "[performance]\nbatch_size = 4\ncase_pair = [[256,64],[512,64]]\nperf_mode = normal\nmodel_name = v13\n"
        "[precision]\nbatch = 3\nshot = 4\nseq_len_out = 32\n")), env={})
    perf = sdk.layered_values(config, "perf")
    assert (perf["batch_size"], perf["case_pair"], perf["perf_mode"], perf["model_name"]) == (
        4, ((256, 64), (512, 64)), "normal", "v13")  # the pairs as read, no text round trip
    assert (perf["min_len_exp"], perf["max_len_exp"], perf["repeat"]) == (None, None, 1)  # unset: the table's
    prec = sdk.layered_values(config, "precision")
    assert (prec["batch"], prec["shot"], prec["seq_len_out"], prec["max_prompt_tokens"]) == (3, 4, 32, 2000)
    assert sdk.layered_values(config, "model")["model_path"] == "/m"
    timeit = read_sdk_config(write_ini(tmp_path / "t", "[performance]\nperf_mode = normal\n"), env={"TIMEIT": "1"})
    assert sdk.layered_values(timeit, "perf")["perf_mode"] == "detail"


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written

def test_device_ids_shorter_than_world_size_exits_2_naming_file_key_and_value(tiny_models, tmp_path):
    ini = write_ini(tmp_path, f"[model]\nmodel_path = {tiny_models['gqa']}\ndevice_ids = 0,1\nlog_dir = logs\n")
    proc = sdk(tmp_path, "4", "d9", "performance")
    assert_one_line_error(proc, str(ini.name), "[model] device_ids='0,1'", "WORLD_SIZE 4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdk_config.ini"]


def test_precision_without_work_dir_and_bad_positionals_exit_2(tiny_models, tmp_path):
    write_ini(tmp_path, f"[model]\nmodel_path = {tiny_models['gqa']}\nlog_dir = logs\n[precision]\nmode = ceval\n")
    assert_one_line_error(sdk(tmp_path, "1", "d9", "precision"), "[precision] work_dir is not set")
    assert_one_line_error(sdk(tmp_path, "1", "d7", "run"), "DEVICE_TYPE", "'d7'")
    assert_one_line_error(sdk(tmp_path, "1", "d9", "benchmark"), "TASK", "'benchmark'")
    assert_one_line_error(sdk(tmp_path, "0", "d9", "run"), "WORLD_SIZE 0")
    assert_one_line_error(sdk(tmp_path, "1", "d9", "run", "--config", "nope.ini"), "nope.ini", "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdk_config.ini"]


@pytest.fixture
def npu_here(monkeypatch):
    """Device resolution answers npu (no model is loaded in these tests: they stop before)."""
    from vicuna_bench import devices

    monkeypatch.setattr(devices, "resolve_device", lambda name: "npu")


def test_d3_with_bf16_exits_2_before_the_model_loads(npu_here, tiny_models, tmp_path, capsys):
    from vicuna_bench.cli import main

    ini = write_ini(tmp_path, f"[model]\nmodel_path = {tiny_models['gqa']}\nlog_dir = {tmp_path / 'logs'}\n")
    assert main(["sdk-test", "1", "d3", "run", "--config", str(ini), "--dtype", "bf16"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1 and "--dtype bf16" in err[0] and "d3" in err[0] and "--dtype fp16" in err[0], err
    assert not (tmp_path / "logs").exists()


def test_auto_on_d3_runs_a_bf16_checkpoint_as_fp16_and_d9_keeps_bf16(monkeypatch, tmp_path, caplog):
    """--dtype auto is resolved after the chip: a 310P has no bf16, so a bf16 checkpoint runs fp16 there,
    said in one line; a 910B runs the checkpoint's bf16.  An explicit bf16 on d3 is still refused (above)."""
    import logging

    import torch

    from tests.npu_fake import install_npu_host
    from vicuna_bench import sdk

    model = tiny.make_tiny_llama(tmp_path / "bf16-model", tiny.GQA, seed=4, dtype=torch.bfloat16)
    ini = write_ini(tmp_path / "run", f"[model]\nmodel_path = {model}\n")
    install_npu_host(monkeypatch, "Ascend310P3")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert sdk.prepare(1, "d3", "run", ini, env={}).spec.dtype == "fp16"
    said = [r.getMessage() for r in caplog.records if "--dtype auto" in r.getMessage() and "d3" in r.getMessage()]
    assert len(said) == 1 and "bf16" in said[0] and "fp16" in said[0], said
    install_npu_host(monkeypatch, "Ascend910B3")
    assert sdk.prepare(1, "d9", "run", ini, env={}).spec.dtype == "bf16"
