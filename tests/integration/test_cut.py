"""Cutting: shards reassemble bit-exactly; cut and uncut directories compute the same.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_cut.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from vicuna_bench.checkpoint import cut_checkpoint
from tests.specs import spec_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["vicuna", "gqa"])
def test_cut_and_uncut_give_identical_logits(tiny_models, engine_factory, tmp_path_factory, name):
    ws = 4
    out = tmp_path_factory.mktemp("cut") / name
    cut_checkpoint(tiny_models[name], out, ws, progress=False)
    prompt = [[5, 17, 99, 3, 250, 42]]
    uncut = engine_factory(spec_for(tiny_models[name], ws, "cpu", "fp32", 64))
    cut = engine_factory(spec_for(out, ws, "cpu", "fp32", 64))
    a = uncut.generate(prompt, 6, ignore_eos=True, return_logits=True)
    b = cut.generate(prompt, 6, ignore_eos=True, return_logits=True)
    assert a.output_ids == b.output_ids
    assert torch.equal(a.logits[0], b.logits[0])
    cut.close()
    shutil.rmtree(out)
