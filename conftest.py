"""Suite-wide test setup: the tiers (tests/tiers.py), and tiny random Llama checkpoints."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.tiers"]


def pytest_sessionstart(session):
    # A test's subprocesses (nested pytest runs, the nightly's pytest stages, CLI runs) are fresh runs, not
    # xdist workers: pytest-benchmark disables itself where PYTEST_XDIST_WORKER is set, and PYTEST_ADDOPTS
    # would hand them the outer run's options.  Both were read by this run's
    # configure hooks already (the plugin's CPU share, pytest-benchmark).
    for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")] + ["PYTEST_ADDOPTS"]:
        os.environ.pop(name, None)
    # matplotlib builds its font cache on first import by running fc-list, a process the unit tier refuses inside
    # a test (the perf plot): on a fresh machine the first plotting unit test failed.  Build it here, outside any
    # test, once per machine (a no-op once ~/.cache/matplotlib holds it).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random checkpoints by name: vicuna (legacy config), gqa, dynamic."""
    from tests import tiny

    root = tmp_path_factory.mktemp("tiny")
    return {
        "vicuna": tiny.make_tiny_llama(root / "vicuna", tiny.VICUNA_SHAPED, seed=1, legacy_config=True),
        "gqa": tiny.make_tiny_llama(root / "gqa", tiny.GQA, seed=2),
        "dynamic": tiny.make_tiny_llama(root / "dynamic", tiny.DYNAMIC, seed=3),
    }


@pytest.fixture(scope="session")
def compile_mode(pytestconfig) -> str:
    """``--compile`` as the options layer it (default ``auto``, which a test's short runs resolve to ``off``).

    The conformance and sharding-equivalence suites build their engines with
    it: ``pytest tests/unit/test_conformance.py tests/unit/test_sharding.py
    --compile on`` runs them on the compiled prefill and decode step.
    """
    from vicuna_bench.pytest_plugin.options import group_values

    return group_values(pytestconfig, "model")["compile"]


@pytest.fixture(scope="session")
def smollm2_path():
    """The embedded default model's converted directory (converted once per cache)."""
    from vicuna_bench.embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


@pytest.fixture(scope="session")
def vicuna_layout(tmp_path_factory):
    """A tiny random checkpoint laid out file for file as lmsys/vicuna-13b-v1.5-16k (real Llama-2 tokenizer)."""
    from tests import tiny

    if not (tiny.LLAMA2_TOKENIZER / "tokenizer.model").is_file():
        pytest.fail(f"{tiny.LLAMA2_TOKENIZER}/tokenizer.model is missing (shared/ must sit beside the checkout)")
    return tiny.make_vicuna_layout(tmp_path_factory.mktemp("vicuna-layout") / "vicuna-13b-v1.5-16k")
