"""Release gate: full val-set MMLU and C-Eval accuracy >= threshold - tolerance (``pytest -m accuracy``).

The model comes from ``--model-path`` (default: the embedded model), the
data from ``--mmlu-dir`` / ``--ceval-dir`` (default ../shared/datasets), the
thresholds from vicuna_bench/thresholds.json; ``--accuracy-model`` names the
thresholds to use, ``--accuracy-tolerance`` overrides the tolerance.  A model
or scoring without a threshold fails the test before any model is loaded (a
gate that cannot judge is no pass); so does missing data.  With
``--accuracy-subjects`` or ``--accuracy-limit-per-subject`` it scores a subset
(no gate).  Results go to ``--accuracy-output-dir`` (default
``accuracy-results/``), named in the terminal summary with the scores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import vicuna_bench
from vicuna_bench.pytest_plugin import ACCURACY_RESULTS
from vicuna_bench.pytest_plugin.options import group_values

pytestmark = pytest.mark.accuracy

# The val split's first row is a header in C-Eval's CSVs, not in MMLU's.
VAL_HEADER_ROWS = {"mmlu": 0, "ceval": 1}


def read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("mode", ["mmlu", "ceval"])
def test_release_gate(mode, release_gate, vicuna_options, pytestconfig):
    """The gate's verdict, recomputed here from the answers in cache.csv, the val CSVs and thresholds.json."""
    summary = release_gate(mode)
    values = group_values(pytestconfig, "precision")
    out = Path(values["output_dir"] or Path(pytestconfig.invocation_params.dir) / ACCURACY_RESULTS) / mode
    thresholds = json.loads((Path(vicuna_bench.__file__).parent / "thresholds.json").read_text(encoding="utf-8"))
    gate = summary["gate"]
    if gate["requested"]:  # the full val set: every question of the data was asked, none dropped unsaid
        val = sorted((Path(vicuna_options[f"{mode}_dir"]) / "data" / "val").glob("*.csv"))
        in_data = sum(len(read_csv_rows(path)) - VAL_HEADER_ROWS[mode] for path in val)
        questions = summary["questions"]
        assert questions["in_data"] == in_data
        assert questions["answered"] + questions["too_long"] == in_data
    judged = [v for v in gate["verdicts"] if v["status"] != "n/a"]
    assert judged or not gate["requested"]
    for verdict in judged:
        rows = read_csv_rows(out / summary["files"][verdict["scoring"]]["cache"])  # id, task, truth, prediction
        right = sum(truth == predicted for _, _, truth, predicted in rows)
        asked = len(rows) + (summary["too_long"]["count"] if values["too_long"] == "wrong" else 0)
        score = 100 * right / asked
        assert verdict["score"] == pytest.approx(score, abs=1e-4)
        threshold = thresholds["models"][verdict["model"]][mode][verdict["scoring"]]
        tolerance = thresholds["tolerance"] if values["tolerance"] is None else values["tolerance"]
        assert (verdict["threshold"], verdict["tolerance"]) == (threshold, tolerance)
        assert verdict["status"] == ("passed" if score >= threshold - tolerance else "failed")
