"""The CPU kernel pass (vicuna_bench.kernel_pass) on a built model: what it swaps, what it keeps, and the same
logits and greedy tokens as the plain model at world size 1 (through the engine, a model hook undoing the pass for
the plain side, so both sides load and run the same way; world size 2 in tests/integration/test_kernel_pass.py)."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from vicuna_bench import cpu_kernels
from vicuna_bench.kernel_pass import KernelLinear, apply_cpu_kernels, is_kernel
from vicuna_bench.model import Attention, Transformer, attend
from vicuna_bench.sharding import ShardPlan, TensorParallel
from vicuna_bench.spec import ModelChoices, resolve_engine_spec
from vicuna_bench.workers import Engine

pytestmark = pytest.mark.unit

DECODE_STEPS = 12
PROMPTS = [[5, 9, 11, 3, 7, 2, 8], [4, 6, 10, 12]]  # two rows: a left-padded one too (batch > 1, row by row)


def _kernels_or_skip():
    if not cpu_kernels.load(build_if_missing=False):
        if cpu_kernels.build_failure():  # recorded by `make kernels` for this host's key
            pytest.skip(f"the CPU kernels did not build on this host: {cpu_kernels.build_failure()}")
        pytest.fail(f"the CPU kernels are not loaded ({cpu_kernels.status()['small_m_gemm_why_not']}); "
                    "run `make kernels` first")


def _tiny_model(tiny_models, **changes) -> Transformer:
    from vicuna_bench.checkpoint import read_model_args

    args = dataclasses.replace(read_model_args(tiny_models["gqa"]), **changes)
    return Transformer(args, ShardPlan(args, 1, 0), TensorParallel(), 32)


def test_the_model_itself_is_plain_torch(tiny_models):
    model = _tiny_model(tiny_models)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # Per layer qkv, o, gate_up, down; then lm_head: all plain nn.Linear, no kernel in sight.
    assert len(linears) == 4 * model.args.n_layers + 1
    assert {type(m) for m in linears} == {nn.Linear}
    assert {m.attend_decode for m in model.modules() if isinstance(m, Attention)} == {attend}


def test_the_pass_swaps_every_linear_and_the_decode_attention_and_keeps_the_tensors(tiny_models):
    model = _tiny_model(tiny_models, tie_word_embeddings=True)
    model.tie_weights()
    before = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    assert apply_cpu_kernels(model) is model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * model.args.n_layers + 1 and {type(m) for m in linears} == {KernelLinear}
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == model.args.n_layers and all(is_kernel(m.attend_decode) for m in attentions)
    assert len({m.attend_decode for m in attentions}) == len(attentions)  # each its own module's fallback
    assert {m.attend for m in model.modules() if isinstance(m, Attention)} == {attend}  # prefill: SDPA as before
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # the very tensors
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    decode = [m.attend_decode for m in attentions]
    apply_cpu_kernels(model)  # idempotent
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {KernelLinear}
    assert [m.attend_decode for m in attentions] == decode


# Model hooks for the engine's ranks (module level: spawned workers import them by name).

def kernels_in_place(model: Transformer) -> Transformer:
    """Fail the rank unless the loader applied the pass (the test would otherwise compare plain with plain)."""
    types = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    if types != {KernelLinear}:
        raise AssertionError(f"the CPU kernel pass was not applied: linear layers are {types}")
    if not all(is_kernel(m.attend_decode) for m in model.modules() if isinstance(m, Attention)):
        raise AssertionError("the CPU kernel pass was not applied to the decode attention")
    return model


def plain(model: Transformer) -> Transformer:
    """Undo the pass: the model as model.py builds it, same weights."""
    kernels_in_place(model)
    for module in model.modules():
        if type(module) is KernelLinear:
            module.__class__ = nn.Linear
        elif isinstance(module, Attention):
            module.attend_decode = attend
    return model


def _generate(spec, hook):
    with Engine(spec, model_hook=hook) as engine:
        return engine.generate(PROMPTS, DECODE_STEPS, ignore_eos=True, return_logits=True)


def test_the_kernel_pass_model_gives_the_plain_models_logits(tiny_models, world_size=1):
    """World size 1, in this process; world size 2 (worker processes) is tests/integration/test_kernel_pass.py."""
    _kernels_or_skip()
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), world_size, "cpu", "fp32", 64, compile="off",
                                            bind_cpu=False),
                               progress=False)
    kernel, reference = _generate(spec, kernels_in_place), _generate(spec, plain)
    assert kernel.output_ids == reference.output_ids
    for ours, ref in zip(kernel.logits, reference.logits):
        scale = ref.abs().max().item()
        # fp32: the kernels sum in another order than BLAS/SDPA; 1e-4 of the logit scale is far below a token flip
        assert (ours - ref).abs().max().item() <= 1e-4 * scale
