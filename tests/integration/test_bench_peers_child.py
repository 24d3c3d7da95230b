"""bench_peers' "no kernels" column: our engine in a spawned process with ``VICUNA_BENCH_CPU_KERNELS=0``, opened once
and timed on request, so it alternates with the in-process engine in one run.  The kernels load once a process,
so without a second process the two cannot be alternated at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.specs import spec_for

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned child imports bench_peers from the same path
    import bench_peers

    return bench_peers


def test_the_child_runs_without_our_kernels_and_times_on_request(peers, tiny_models):
    from vicuna_bench import cpu_kernels

    parent_before = cpu_kernels.status()
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    with peers.ChildTimer(spec, [[5, 6, 7]], 3, 1, peers.KERNELS_OFF) as timer:
        assert timer.info["env"] == {"VICUNA_BENCH_CPU_KERNELS": "0"}
        assert timer.info["small_m_gemm"] is False
        assert "VICUNA_BENCH_CPU_KERNELS=0" in timer.info["small_m_gemm_why_not"]
        first = timer.run(2)
        second = timer.run(1)
        assert timer.process.is_alive()  # one engine, opened once, between rounds
    assert not timer.process.is_alive() and timer.process.exitcode == 0
    assert len(first) == 2 and len(second) == 1
    assert all(f > 0 and n > 0 for f, n in first + second)
    assert cpu_kernels.status() == parent_before  # the child's switch did not reach this process


def test_a_child_that_cannot_open_its_engine_says_why_in_one_line(peers, tiny_models, tmp_path):
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    broken = type(spec)(**{**spec.__dict__, "model_path": str(tmp_path / "gone")})
    with pytest.raises(RuntimeError) as err:
        peers.ChildTimer(broken, [[5, 6, 7]], 3, 1, peers.KERNELS_OFF)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the engine in a child process (VICUNA_BENCH_CPU_KERNELS=0) failed: ")


def test_the_bench_alternates_ours_with_and_without_kernels_in_one_run(peers, tiny_models, tmp_path, capsys):
    from vicuna_bench import cpu_kernels

    if not cpu_kernels.load():  # the bench refuses then (tests/unit/test_bench_peers.py): nothing to compare
        pytest.skip(f"our CPU kernels are not loaded here: {cpu_kernels.status()['small_m_gemm_why_not']}")
    out = tmp_path / "peers.json"
    assert peers.main(["--model-path", str(tiny_models["gqa"]), "--compile", "off", "--no-transformers",
                       "--rounds", "2", "--repeat", "1", "--seq-in", "8", "--seq-out", "4", "--threads", "1",
                       "--without-kernels", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    ours, theirs = doc["columns"]["vicuna-bench off"], doc["columns"]["vicuna-bench off, no kernels"]
    assert len(ours["rounds"]) == len(theirs["rounds"]) == 2
    assert theirs["small_m_gemm"] is False and theirs["env"] == {"VICUNA_BENCH_CPU_KERNELS": "0"}
    versus = doc["versus_without_kernels"]["vicuna-bench off"]["next_token"]
    assert versus["ratio_by_round"] == pytest.approx(
        [o["next_token_ms"] / t["next_token_ms"] for o, t in zip(ours["rounds"], theirs["rounds"])])
    printed = capsys.readouterr().out
    assert "vicuna-bench off / vicuna-bench off, no kernels next token by round: " in printed
    assert ("vicuna-bench off, no kernels: a child process with VICUNA_BENCH_CPU_KERNELS=0; our CPU kernels "
            "there: off") in printed
    assert cpu_kernels.status()["small_m_gemm_why_not"] != "VICUNA_BENCH_CPU_KERNELS=0"
