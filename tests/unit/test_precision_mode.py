"""Which data set a work dir holds, read off the data: the mode a run left out, and a mode the data contradicts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.unit.precision_fixtures import make_synthetic_ceval, make_synthetic_mmlu, mmlu_row, write_csv
from vicuna_bench.errors import UserError
from vicuna_bench.precision.data import check_mode, detect_mode, load_dataset, resolve_mode

pytestmark = pytest.mark.unit

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def test_synthetic_sets_are_told_apart(tmp_path):
    ceval = make_synthetic_ceval(tmp_path / "ceval")
    mmlu = make_synthetic_mmlu(tmp_path / "mmlu")
    mode, evidence = detect_mode(ceval)
    assert mode == "ceval"
    assert "delta_law_val.csv row 1 is the C-Eval header id,question,A,B,C,D,answer" in evidence
    mode, evidence = detect_mode(mmlu)
    assert mode == "mmlu" and "alpha_studies_val.csv has no header row" in evidence


@pytest.mark.skipif(not (SHARED / "ceval" / "data").is_dir(), reason="no ../shared/datasets beside the checkout")
@pytest.mark.parametrize("name", ["mmlu", "ceval"])
def test_the_official_archives_are_told_apart(name):
    assert detect_mode(SHARED / name)[0] == name


def test_a_mode_left_out_is_chosen_and_announced(tmp_path, caplog):
    ceval = make_synthetic_ceval(tmp_path / "ceval")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert resolve_mode(None, ceval, "sdk_config.ini: [precision] mode") == "ceval"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("sdk_config.ini: [precision] mode not set: ceval (") and "C-Eval header" in line
    assert resolve_mode("ceval", ceval) == "ceval"


@pytest.mark.parametrize("given, data", [("mmlu", "ceval"), ("ceval", "mmlu")])
def test_a_mode_the_data_contradicts_names_both(tmp_path, given, data):
    work = (make_synthetic_ceval if data == "ceval" else make_synthetic_mmlu)(tmp_path / data)
    with pytest.raises(UserError) as err:
        load_dataset(given, work, "sdk_config.ini: [precision] mode")
    message = str(err.value)
    assert message.startswith(f"sdk_config.ini: [precision] mode={given} contradicts the data: ")
    assert f"so it is {data} data" in message and f"set it to {data}" in message
    assert "\n" not in message
    with pytest.raises(UserError, match=f"--mode={given} contradicts"):
        check_mode(given, work)


def test_a_work_dir_mixing_both_is_an_error_naming_one_of_each(tmp_path):
    work = make_synthetic_ceval(tmp_path / "mixed")
    write_csv(work / "data" / "val" / "alpha_studies_val.csv", [mmlu_row("alpha q0", "A")])
    with pytest.raises(UserError) as err:
        detect_mode(work)
    assert "delta_law_val.csv has the C-Eval header row but" in str(err.value)
    assert "alpha_studies_val.csv has none" in str(err.value)


def test_missing_data_is_reported_before_any_detection(tmp_path):
    with pytest.raises(UserError, match="data/dev: missing"):
        resolve_mode(None, tmp_path)
