"""The CPU kernel pass at world size 2 (worker processes): the same logits and greedy tokens as the plain model,
batch > 1 row by row (the in-process checks, world size 1, are tests/unit/test_kernel_pass.py)."""

from __future__ import annotations

import pytest

from tests.unit.test_kernel_pass import (_generate, _kernels_or_skip, kernels_in_place, plain)
from vicuna_bench.spec import ModelChoices, resolve_engine_spec

pytestmark = pytest.mark.integration


def test_the_kernel_pass_model_gives_the_plain_models_logits_at_world_size_2(tiny_models):
    _kernels_or_skip()
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), 2, "cpu", "fp32", 64, compile="off",
                                            bind_cpu=False),
                               progress=False)
    kernel, reference = _generate(spec, kernels_in_place), _generate(spec, plain)
    assert kernel.output_ids == reference.output_ids
    for ours, ref in zip(kernel.logits, reference.logits):
        # fp32: the kernels sum in another order than BLAS/SDPA; 1e-4 of the logit scale is far below a token flip
        assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
