"""Our model against transformers' LlamaForCausalLM on the same weights (fp32).

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_conformance.py.
"""

from __future__ import annotations

import pytest

from tests.unit.test_conformance import _check_model

pytestmark = pytest.mark.integration


def test_smollm2_matches_transformers(smollm2_path, engine_factory, compile_mode):
    from vicuna_bench.chat import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    prompt = tok("The three primary colours are red, yellow and")["input_ids"]
    _check_model(smollm2_path, list(prompt), engine_factory, compile_mode)
