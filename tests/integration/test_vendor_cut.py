"""Weights the vendor's cut_weight.sh already cut load as they are: same tokens as the uncut model, no re-cut.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_vendor_cut.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests import tiny
from tests.integration.test_cli import vb
from tests.unit.precision_fixtures import make_synthetic_mmlu
from tests.unit.test_vendor_cut import PROMPT, STEPS, vendor_cuts  # noqa: F401  (fixtures)
from tests.specs import spec_for

pytestmark = pytest.mark.integration


NO_CHECKSUMS = "no checksums to verify"


@pytest.fixture(scope="module")
def reference_tokens(tiny_models):
    """Greedy tokens of the uncut model by transformers: the independent reference."""
    return tiny.hf_greedy(tiny.hf_model(tiny_models["vicuna"]), PROMPT, STEPS)[0]


def test_greedy_tokens_equal_the_uncut_models(tiny_models, vendor_cuts, reference_tokens, engine_factory):
    """At world size 4 in the engine (world size 2: through ``run`` below)."""
    ws = 4
    cut = engine_factory(spec_for(vendor_cuts[ws], ws, "cpu", "fp32", 64))
    got = cut.generate([PROMPT], STEPS, ignore_eos=True, return_logits=True)
    assert got.output_ids[0] == reference_tokens
    # The same shares as the uncut directory sliced at load: the same numbers, bit for bit.
    uncut = engine_factory(spec_for(tiny_models["vicuna"], ws, "cpu", "fp32", 64))
    want = uncut.generate([PROMPT], STEPS, ignore_eos=True, return_logits=True)
    assert torch.equal(got.logits[0], want.logits[0])
    cut.close()


def test_run_command_loads_it_and_says_once_there_are_no_checksums(vendor_cuts, reference_tokens):
    proc = vb("run", "--model-path", str(vendor_cuts[2]), "--world-size", "2", "--prompt-ids",
              ",".join(map(str, PROMPT)), "--max-new-tokens", str(STEPS), "--ignore-eos", "--json",
              "--compile", "off", "--dtype", "fp32", env={"MAX_SEQ_LENGTH": "64"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"][0]["output_ids"] == reference_tokens
    said = [ln for ln in proc.stderr.splitlines() if NO_CHECKSUMS in ln]
    assert len(said) == 1, proc.stderr
    assert "vicuna-bench cut --input-dir ORIGINAL --output-dir OUT --world-size 2" in said[0]


def test_perf_and_precision_run_on_it_through_sdk_test(vendor_cuts, tmp_path, monkeypatch, caplog):
    from vicuna_bench.cli import main

    monkeypatch.delenv("TIMEIT", raising=False)
    monkeypatch.setenv("MAX_SEQ_LENGTH", "2048")  # run_sdk_test.sh's; room for a 2000-token prompt (context: 256)
    monkeypatch.chdir(tmp_path)
    work = make_synthetic_mmlu(tmp_path / "mmlu")
    (tmp_path / "sdk_config.ini").write_text(
        f"[model]\nmodel_path = \"{vendor_cuts[2]}\n[performance]\nmodel_name = vtiny\ncase_pair = [[8,3]]\n"
        f"[precision]\nwork_dir = {work}\nshot = 1\nseq_len_out = 1\n")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert main(["sdk-test", "2", "d9", "performance", "--compile", "off", "--no-progress"]) == 0
        assert main(["sdk-test", "2", "d9", "precision", "--compile", "off", "--no-progress"]) == 0
    (extended,) = tmp_path.glob("performance_test_vtiny_*_bs1_extended.csv")
    assert ",8,3," in extended.read_text().splitlines()[1]
    summary = json.loads((work / "test_result" / "summary.json").read_text())
    assert (summary["world_size"], summary["model_path"]) == (2, str(vendor_cuts[2]))
    assert summary["questions"]["answered"] == 7  # SYNTHETIC_MMLU: 8 questions, one too long for any prompt
    assert sum(NO_CHECKSUMS in r.getMessage() for r in caplog.records) <= 1  # once per process
