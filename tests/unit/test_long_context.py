"""The guide's long case: ``[[16384,128]]`` at ``MAX_SEQ_LENGTH=16512``, one past Vicuna-16k's 16384 context.

The vendor sizes its rope tables and KV cache to MAX_SEQ_LENGTH and runs; so
do we, with one warning that positions past the trained context were never
trained.  The model is Vicuna-16k's config at a tiny size (legacy config,
rope linear x4 over 4096 positions); one head of 8 dims and one layer, so a
16384-token prefill costs seconds on CPU.
"""

from __future__ import annotations

import csv
import logging

import pytest

from tests import tiny
from vicuna_bench.config import ModelArgs
from vicuna_bench.runtime import EngineSpec

pytestmark = pytest.mark.unit

BEYOND = "beyond the model's context"
# Vicuna-16k's rope and context, at the smallest size that still has every tensor.
TINY_16K = dict(tiny.VICUNA_16K_SHAPED, hidden_size=8, num_attention_heads=1, num_key_value_heads=1,
                num_hidden_layers=1, intermediate_size=16)


@pytest.fixture(scope="module")
def vicuna_16k(tmp_path_factory):
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("v16k") / "vicuna-16k-tiny", TINY_16K, seed=11,
                                legacy_config=True)


def test_the_fixture_has_vicuna_16ks_context(vicuna_16k):
    args = ModelArgs.from_file(vicuna_16k / "config.json")
    # REFERENCE.md: max_position_embeddings 4096, rope_scaling linear x4 -> 16k context, base 10000.
    assert (args.max_position_embeddings, args.rope_type, args.rope_factor, args.rope_theta) == (
        4096, "linear", 4.0, 10000.0)
    assert args.context_len == 16384


def test_beyond_the_context_is_allowed_with_one_warning_per_request(vicuna_16k, caplog):
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        EngineSpec(str(vicuna_16k), max_seq_len=16384).validate()  # the context itself: nothing to say
        assert not caplog.records
        spec = EngineSpec(str(vicuna_16k), max_seq_len=16400)
        spec.validate()
        spec.validate()  # again at engine start: not said twice
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert message.startswith("--max-seq-len 16400 is beyond the model's context of 16384 tokens (")
    assert "max_position_embeddings=4096, rope linear x4)" in message
    assert "rope tables and KV cache are sized to 16400" in message


def test_the_guides_16k_case_runs_at_max_seq_length_16512(vicuna_16k, tmp_path, monkeypatch, caplog):
    from vicuna_bench.cli import main

    monkeypatch.delenv("TIMEIT", raising=False)
    monkeypatch.setenv("MAX_SEQ_LENGTH", "16512")  # as the guide edits run_sdk_test.sh for this case
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sdk_config.ini").write_text(
        f"[model]\nmodel_path = {vicuna_16k}\n[performance]\nmodel_name = v16k\ncase_pair = [[16384,128]]\n")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert main(["sdk-test", "1", "d9", "performance", "--compile", "off", "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if BEYOND in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("--max-seq-len 16512 is beyond the model's context of "
                                                         "16384 tokens"), warnings
    (reference,) = tmp_path.glob("performance_test_v16k_*_bs1.csv")
    with reference.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["input_seq_len(Encoding)"], row["output_seq_len(Decoding)"]) == ("16384", "128")
    assert float(row["forward_first_token_time(ms)"]) > 0 and float(row["forward_next_token_time(ms)"]) > 0
