"""results.compare_answers: per-question agreement of two precision runs, disagreements listed, none dropped."""

from __future__ import annotations

import json

import pytest

from vicuna_bench.precision import results as R

pytestmark = pytest.mark.unit


def _write(dir_, records):
    dir_.mkdir()
    with open(dir_ / "answers.jsonl", "w") as f:
        for task, qid, gen, logits in records:
            rec = {"task": task, "id": qid, "truth": "A", "shots": 5, "prompt": "..."}
            if gen is not None:
                rec["generate"] = {"text": f" {gen}", "pred": gen}
            if logits is not None:
                rec["logits"] = {"values": logits, "pred": max(logits, key=logits.get)}
            f.write(json.dumps(rec) + "\n")


def test_agreement_counts_and_lists_each_disagreement(tmp_path):
    near_tie = {"A": 1.00, "B": 1.01, "C": 0.2, "D": 0.1}
    flipped = {"A": 1.02, "B": 1.01, "C": 0.2, "D": 0.1}
    clear = {"A": 3.0, "B": 1.0, "C": 0.0, "D": 0.0}
    _write(tmp_path / "ref", [("s1", "0", "B", near_tie), ("s1", "1", "A", clear), ("s2", "0", "C", clear),
                              ("s2", "9", "A", clear)])
    _write(tmp_path / "other", [("s1", "0", "A", flipped), ("s1", "1", "A", clear), ("s2", "0", "C", clear),
                                ("s3", "4", "D", clear)])
    cmp = R.compare_answers(tmp_path / "ref", tmp_path / "other")
    assert cmp["only_ref"] == [("s2", "9")] and cmp["only_other"] == [("s3", "4")]
    gen, logit = cmp["scorings"]["generate"], cmp["scorings"]["logits"]
    assert (gen["questions"], gen["agree"]) == (3, 2) and abs(gen["rate"] - 2 / 3) < 1e-12
    assert (logit["questions"], logit["agree"]) == (3, 2)
    [d] = logit["disagreements"]
    assert (d.subject, d.qid, d.ref_pred, d.other_pred) == ("s1", "0", "B", "A")
    assert abs(R.top_two_margin(d.ref_logits) - 0.01) < 1e-9


def test_a_scoring_only_one_run_recorded_is_not_compared(tmp_path):
    clear = {"A": 3.0, "B": 1.0, "C": 0.0, "D": 0.0}
    _write(tmp_path / "ref", [("s1", "0", "A", clear)])
    _write(tmp_path / "other", [("s1", "0", "A", None)])
    cmp = R.compare_answers(tmp_path / "ref", tmp_path / "other")
    assert list(cmp["scorings"]) == ["generate"] and cmp["scorings"]["generate"]["rate"] == 1.0
