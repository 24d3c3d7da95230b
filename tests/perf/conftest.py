"""The perf suite's default model: a tiny random Llama that splits 8 ways (no --model-path)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def perf_default_model(tmp_path_factory):
    from tests import tiny

    return tiny.make_tiny_llama(tmp_path_factory.mktemp("perf") / "tiny-llama", tiny.VICUNA_SHAPED, seed=7)
