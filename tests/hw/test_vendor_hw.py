"""On an NPU or GPU: the vendor drop-in (`vicuna-bench sdk-test`) in each task; the files checked.

``run`` and ``performance`` take the run's ``--model-path``, ``--world-size``,
``--dtype`` and ``--device-type`` where given; otherwise, and always for
``precision`` (its expected counts are the tiny tokenizer's), a tiny model
made here, with MMLU-shaped data made here (no network).
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
from tests.hw.conftest import device_count

pytestmark = pytest.mark.hw

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_HEADER = (
    "batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),forward_first_token_time(ms),"
    "forward_next_token_time(ms),pre_next_token_time(ms),post_next_token_time_post(ms)"
)
# GQA, splits 1 and 2 ways, with room for the precision test's 2000-token prompt limit.
LONG_GQA = {**tiny.GQA, "max_position_embeddings": 4096}


@pytest.fixture(scope="module")
def kind(device):
    return device


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("vendor-hw") / "tiny-gqa", LONG_GQA, seed=21)


@pytest.fixture(scope="module")
def family(hw_run, chip_family) -> tuple[str, str | None]:
    """sdk-test's DEVICE_TYPE and --dtype: the run's --device-type, else the NPU's detected family (d9 elsewhere);
    the run's --dtype, else fp16 on a 310P (it runs nothing else) and the engine's choice otherwise."""
    chosen = hw_run.chip_family if hw_run.chip_family in ("d9", "d3") else (chip_family or "d9")
    return chosen, hw_run.dtype or ("fp16" if chosen == "d3" else None)


@pytest.fixture(scope="module")
def model(hw_run, tiny_model):
    """The run's --model-path, else the tiny model."""
    return hw_run.model_path or tiny_model


def sdk_test(cwd: Path, kind: str, *args: str, dtype: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TIMEIT", "MAX_SEQ_LENGTH")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "vicuna_bench", "sdk-test", *args, "--device", kind,
                           *(["--dtype", dtype] if dtype else []), "--compile", "off", "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def write_ini(directory: Path, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sdk_config.ini").write_text(text)


def check_rank_logs(log_dir: Path, kind: str, devices_by_rank: list[int]) -> None:
    for rank, device in enumerate(devices_by_rank):
        text = (log_dir / f"rank{rank}.log").read_text()
        assert f"world_size={len(devices_by_rank)} device={kind}:{device} " in text, text
        assert f"cpu binding: rank {rank} ({kind}:{device}):" in text, text


def test_run(kind, family, model, tmp_path):
    write_ini(tmp_path, f"[model]\nmodel_path = {model}\ndevice_ids = 0\nlog_dir = logs\n")
    sdk_test(tmp_path, kind, "1", family[0], "run", dtype=family[1])
    doc = json.loads((tmp_path / "logs" / "run_outputs.json").read_text())
    assert (doc["device"], doc["world_size"], doc["environment"]["device"]) == (kind, 1, kind)
    assert len(doc["outputs"]) == 3 and all(o["output_ids"] for o in doc["outputs"])
    check_rank_logs(tmp_path / "logs", kind, [0])


@pytest.mark.hw_matrix(world_size=[1, 2])
def test_performance(kind, family, model, tmp_path, world_size):
    if device_count(kind) < world_size:
        pytest.skip(f"needs {world_size} {kind} devices")
    ids = [*range(1, world_size), 0]  # rank 0 on device 1 (of 2 or more): device_ids decide, not the rank
    write_ini(tmp_path, f"[model]\nmodel_path = {model}\ndevice_ids = {','.join(map(str, ids))}\nlog_dir = logs\n"
                        "[performance]\nmodel_name = tiny\nbatch_size = 2\ncase_pair = [[64,8],[32,4]]\n")
    sdk_test(tmp_path, kind, str(world_size), family[0], "performance", dtype=family[1])
    [reference] = [p for p in tmp_path.glob("performance_test_tiny_*_bs2.csv")]
    lines = reference.read_text().splitlines()
    assert lines[0] == REFERENCE_HEADER
    assert [ln.split(",")[:3] for ln in lines[1:]] == [["2", "64", "8"], ["2", "32", "4"]]
    stem = reference.name[: -len(".csv")]
    with (tmp_path / f"{stem}_extended.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["device"], r["world_size"], r["perf_mode"]) for r in rows] == [(kind, str(world_size), "detail")] * 2
    assert all(float(r["next_token_ms_p50"]) > 0 for r in rows)
    doc = json.loads((tmp_path / f"{stem}_samples.json").read_text())
    assert doc["environment"]["device"] == kind and doc["environment"]["device_name"]
    assert [b["rank"] for b in doc["cpu_binding"]] == list(range(world_size))
    assert all(b["cpus"] or b["warning"] for b in doc["cpu_binding"])
    check_rank_logs(tmp_path / "logs", kind, ids)


def test_precision(kind, family, tiny_model, tmp_path):
    work = make_synthetic_mmlu(tmp_path / "mmlu")
    write_ini(tmp_path / "run", f"[model]\nmodel_path = {tiny_model}\nlog_dir = logs\n"
                                f"[precision]\nmode = mmlu\nwork_dir = {work}\nbatch = 2\nshot = 5\nseq_len_out = 2\n")
    sdk_test(tmp_path / "run", kind, "1", family[0], "precision", dtype="fp16" if family[0] == "d3" else None)
    out = work / "test_result"
    for name in ("cache.csv", "result_subject_acc.json", "result_classes_acc.json", "device.log", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["device"], summary["world_size"], summary["environment"]["device"]) == (kind, 1, kind)
    assert summary["questions"] == {"in_data": 8, "selected": 8, "answered": 7, "too_long": 1}
    assert len((out / "cache.csv").read_text().splitlines()) == 7
    check_rank_logs(tmp_path / "run" / "logs", kind, [0])
