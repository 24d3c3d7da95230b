"""bench_peers.py's llama.cpp batch layout and --gguf check, against rows written out by hand (no llama_cpp needed)."""

from __future__ import annotations

import pytest

from tests.unit.test_benchmarks import bench  # noqa: F401  (the fixture that imports a benchmark script)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def peers(bench):  # noqa: F811
    return bench("bench_peers")


def test_prefill_rows_put_each_prompt_in_its_own_sequence_with_logits_at_its_end(peers):
    # batched-bench's prefill: batch.add(token, i, j, i == pp - 1) for sequence j, position i
    assert peers.llama_prefill_rows([[11, 12, 13], [21, 22, 23]]) == [
        (11, 0, 0, False), (12, 1, 0, False), (13, 2, 0, True),
        (21, 0, 1, False), (22, 1, 1, False), (23, 2, 1, True),
    ]


def test_prefill_rows_at_batch_1_are_one_sequence(peers):
    assert peers.llama_prefill_rows([[7, 8]]) == [(7, 0, 0, False), (8, 1, 0, True)]


def test_step_rows_carry_one_token_per_sequence_every_row_with_logits(peers):
    assert peers.llama_step_rows([5, 6, 7], [64, 64, 64]) == [(5, 64, 0, True), (6, 64, 1, True), (7, 64, 2, True)]


def test_step_rows_refuse_tokens_and_positions_that_do_not_pair(peers):
    with pytest.raises(ValueError):
        peers.llama_step_rows([5, 6], [64])


def test_chunks_cut_8_prompts_of_256_into_4_calls_of_512(peers):
    rows = peers.llama_prefill_rows([[1] * 256] * 8)
    parts = peers.chunks(rows, 512)
    assert [len(c) for c in parts] == [512, 512, 512, 512]
    assert [r[2] for r in parts[1][:1] + parts[1][-1:]] == [2, 3]  # the second call holds sequences 2 and 3
    assert sum(parts, []) == rows


def test_chunks_keep_a_short_tail(peers):
    assert peers.chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_gguf_problem_accepts_the_magic_and_names_what_is_wrong_otherwise(peers, tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00{}")
    assert peers.gguf_problem(str(good)) is None
    assert "not a GGUF file" in peers.gguf_problem(str(bad))
    assert peers.gguf_problem(str(tmp_path / "absent.gguf")) == "No such file or directory"


def test_a_bad_gguf_stops_the_bench_before_any_timing(peers, tmp_path, capsys):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(SystemExit) as stop:
        peers.main(["--gguf", str(bad)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"--gguf {bad}: not a GGUF file (starts b'PK\\x03\\x04', not b'GGUF')")
