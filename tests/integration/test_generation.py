"""Generation semantics: per-row EOS, token choice, chat formatting.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_generation.py.
"""

from __future__ import annotations

import pytest

from vicuna_bench.chat import encode_prompt, load_tokenizer

pytestmark = pytest.mark.integration


def test_checkpoint_chat_template_is_used(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    ids = encode_prompt(tok, "Hi")
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
