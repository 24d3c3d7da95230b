"""bench_peers' memory probe says how its graphs were made: a cold inductor cache leaves more resident than a warm
one (docs/PERFORMANCE.md, "Seventh pass": SmolLM2 bf16 1.70x against 1.28x), so a figure without it is ambiguous."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.specs import spec_for

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_memory_probe_counts_graphs_compiled_and_loaded_from_the_cache(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: every graph compiles
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_peers

    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    spec = type(spec)(**{**spec.__dict__, "compile": "on"})
    figures = []
    for _ in range(2):
        torch._dynamo.reset()  # the second probe finds nothing in memory: what it does not compile, it loads
        got = bench_peers._memory_probe(spec, [[5, 6, 7], [8, 9]], 4, threads=1)
        figures.append((got["graphs_compiled"], got["graphs_from_cache"]))
    (cold_made, cold_loaded), (warm_made, warm_loaded) = figures
    assert cold_made >= 2 and cold_loaded == 0, figures  # the prefill and the decode step, at least
    assert warm_made == 0 and warm_loaded == cold_made, figures
