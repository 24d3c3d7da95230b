"""Binding off from a config file is really off: each rank's CPU affinity is the whole allowed set.

Through the nightly's TOML (the source that could not turn it off) and sdk-test's INI, the resolved spec
opens a real 2-rank engine (drivers.open_engine); each rank reads its own affinity in its own process.
Reference: os.sched_getaffinity of this process (what the ranks inherit when nothing pins them).
"""

from __future__ import annotations

import os

import pytest

from tests import tiny
from tests.integration.test_sdk_test import cpu_set
from vicuna_bench import drivers

pytestmark = pytest.mark.integration


def nightly_spec(model, tmp_path, bind: bool):
    from vicuna_bench.nightly import runner

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "n.toml"
    config.write_text(f'bind-cpu = {str(bind).lower()}\nmodel-path = "{model}"\ndevice = "cpu"\nworld-size = 2\n'
                      'stages = "perf"\ncase-pair = [[8, 4]]\nmax-seq-len = 64\n')
    values = runner.resolve_settings({"config": str(config), "output_dir": str(tmp_path / "night"),
                                      "history": str(tmp_path / "h.sqlite")})
    return runner.plan_run(values).spec


def sdk_spec(model, tmp_path, bind: bool, monkeypatch):
    from vicuna_bench import sdk

    ini = tmp_path / "sdk_config.ini"
    ini.write_text(f"[model]\nmodel_path = {model}\nbind_cpu = {'TRUE' if bind else 'false'}\n"
                   "[performance]\ncase_pair = [[8,4]]\n")
    monkeypatch.setenv("MAX_SEQ_LENGTH", "64")
    return sdk.prepare(2, "d9", "performance", ini, flags={"device": "cpu"}, progress=False).spec


@pytest.mark.all_cpus  # its ranks (or workers) share out the CPUs: under pytest -n a worker has one
@pytest.mark.parametrize("source", ["nightly-toml", "sdk-ini"])
def test_binding_off_leaves_every_rank_the_allowed_set(tmp_path, source, monkeypatch):
    allowed = set(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs")
    model = tiny.make_tiny_llama(tmp_path / "gqa", tiny.GQA, seed=2, tokenizer=False)

    def affinities(bind: bool) -> list[set[int]]:
        spec = (nightly_spec(model, tmp_path / str(bind), bind) if source == "nightly-toml"
                else sdk_spec(model, tmp_path, bind, monkeypatch))
        assert spec.bind_cpu is bind
        with drivers.open_engine(spec) as engine:
            return [cpu_set(info["affinity"]) for info in engine.rank_info]

    assert affinities(False) == [allowed, allowed]
    bound = affinities(True)
    assert not bound[0] & bound[1] and bound[0] | bound[1] == allowed  # on: disjoint shares, so off was not on
