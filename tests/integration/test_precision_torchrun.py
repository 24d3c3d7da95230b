"""``vicuna-bench precision`` under torchrun (2 processes, gloo) writes what the in-process engine writes.

Reference: the same command run without torchrun (its own 2-rank engine), on the same tiny model and data;
every rank asks the same questions, rank 0 alone writes.
"""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

from tests import tiny
from tests.unit.precision_fixtures import make_synthetic_mmlu

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("cache.csv", "result_subject_acc.json", "result_classes_acc.json")


def precision(launcher: list[str], model: Path, work: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = ["precision", "--mode", "mmlu", "--work-dir", str(work), "--model-path", str(model), "--world-size", "2",
            "--device", "cpu", "--max-seq-len", "256", "--max-prompt-tokens", "200", "--shot", "1",
            "--output-dir", str(out), "--no-progress", "--no-bind-cpu",
            "--dtype", "fp32"]  # under torchrun --dtype auto never probes (fp32); in-process it may pick bf16
    return subprocess.run([*launcher, "-m", "vicuna_bench", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_precision_under_torchrun_writes_the_in_process_files(tmp_path):
    model = tiny.make_tiny_llama(tmp_path / "gqa", tiny.GQA, seed=2)
    work = make_synthetic_mmlu(tmp_path / "mmlu")
    alone = precision([sys.executable], model, work, tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"]
    spmd = precision(torchrun, model, work, tmp_path / "spmd")
    assert spmd.returncode == 0, spmd.stderr[-3000:]
    for name in COMPARED:
        expected = (tmp_path / "alone" / name).read_text()
        assert expected, name
        assert (tmp_path / "spmd" / name).read_text() == expected, name
