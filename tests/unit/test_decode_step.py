"""The static-shape decode step: fused projections, compiled vs eager, no host reads, no per-position shapes.

References: the unfused model (the checkpoint's own matrices), the eager
step, and transformers' ``generate`` through the conformance tests.
Compiled runs use the product's own compile settings (inductor
``max-autotune`` with freezing on CPU); inductor's cache keeps repeat runs
short.
"""

from __future__ import annotations


import pytest
import torch

from vicuna_bench.generation import DecodeState, decode_step
from vicuna_bench.pytest_plugin import make_engine_spec
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # two rows, left padding in the batch


def _tiny_rank_model(path, max_seq_len: int = 64):
    spec = make_engine_spec(str(path), 1, "cpu", "fp32", max_seq_len)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


def _prefilled(model, prompt: list[int]):
    """The model after a prefill of ``prompt`` (batch 1), and the decode state that follows it."""
    length = len(prompt)
    slots = model.setup_caches(1, 64)
    key_valid = torch.zeros((1, slots), dtype=torch.bool)
    key_valid[:, :length] = True
    positions = torch.arange(length)[None]
    logits = model(torch.tensor([prompt]), positions, key_valid, start=0)[:, -1]
    return logits.argmax(-1), DecodeState(key_valid, torch.tensor([length]), positions[:, -1:].clone())


def _run_steps(step, model, token, state, n: int) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for _ in range(n):
            state.positions += 1
            logits = step(model, token[:, None], state.positions, state)
            token = logits.argmax(-1)
            state.slot += 1
            out.append(logits)
    return out


def test_decode_step_has_no_host_reads_and_one_graph_for_every_position(tiny_models):
    """fullgraph=True fails on .item()/.tolist()/bool() of a tensor; one graph serves every position and slot."""
    import torch._dynamo

    model = _tiny_rank_model(tiny_models["dynamic"])  # dynamic NTK rope: its length test is a tensor op too
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        token, state = _prefilled(model, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])
        eager = _run_steps(decode_step, model, token, state, 6)  # crosses max_position_embeddings (16)
        token, state = _prefilled(model, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])
        frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        graphed = _run_steps(compiled, model, token, state, 6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
    for a, b in zip(eager, graphed):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_captured_step_writes_no_input_inside_the_graph(tiny_models):
    """CUDA graphs / torchair capture decode_logits: it must leave its inputs as they were, and the step around it
    must equal decode_step (key_valid written outside the graph)."""
    import torch._dynamo

    from vicuna_bench.compile import captured_step
    from vicuna_bench.generation import decode_logits

    model = _tiny_rank_model(tiny_models["gqa"])
    with torch.inference_mode():
        token, state = _prefilled(model, [5, 6, 7, 8])
        inputs = (token[:, None] + 0, state.positions + 1, state.key_valid, state.slot)
        before = [t.clone() for t in inputs]
        decode_logits(model, *inputs)
        for a, b in zip(before, inputs):
            assert torch.equal(a, b)
        torch._dynamo.reset()
        step = captured_step(torch.compile(decode_logits, fullgraph=True, backend="eager", dynamic=False))
        token, state = _prefilled(model, [5, 6, 7, 8])
        eager = _run_steps(decode_step, model, token, state, 5)
        eager_valid = state.key_valid.clone()
        token, state = _prefilled(model, [5, 6, 7, 8])
        graphed = _run_steps(step, model, token, state, 5)
    assert torch.equal(state.key_valid, eager_valid)
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


def test_the_no_host_read_check_can_fail(tiny_models):
    """The check above has teeth: the same compile refuses a step that reads the device."""
    import torch._dynamo

    model = _tiny_rank_model(tiny_models["gqa"])

    def reading_step(model, tokens, positions, state):
        if bool(state.key_valid.all()):  # a host read
            return decode_step(model, tokens, positions, state) * 2
        return decode_step(model, tokens, positions, state)

    torch._dynamo.reset()
    compiled = torch.compile(reading_step, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        token, state = _prefilled(model, [5, 6, 7])
        # torch 2.1 words it "call_function BuiltinVariable(bool) [TensorVariable()]".
        with pytest.raises(Exception, match=r"(?i)data-dependent|graph break|Unsupported|BuiltinVariable\(bool\)"):
            _run_steps(compiled, model, token, state, 1)


def test_compile_auto_decides_by_the_steps_ahead(caplog):
    from vicuna_bench.compile import resolve_mode
    from vicuna_bench.errors import UserError

    with caplog.at_level("INFO", logger="vicuna_bench"):
        assert resolve_mode("auto", "cpu", 10) == "off"
        assert resolve_mode("auto", "cpu", 100_000) == "on"
    assert sum("--compile auto" in r.message for r in caplog.records) == 2
    assert resolve_mode("on", "cpu", 0) == "on"
    with pytest.raises(UserError, match="--compile 'fast'"):
        resolve_mode("fast", "cpu", 0)


def test_one_process_may_hold_many_compiled_shapes():
    """More compiled entries than dynamo's default limit (8) in one process, under fullgraph=True: several engines
    and a precision run's batch shapes.  Regression: a test session under --compile on failed at its 9th model."""
    from vicuna_bench.compile import compiled_steps

    compiled_steps("cpu", 1)  # configures dynamo and inductor as --compile on does
    double_plus_one = torch.compile(lambda x: x * 2 + 1, backend="eager", fullgraph=True, dynamic=False)
    for n in range(1, 13):  # one static-shape entry each
        assert torch.equal(double_plus_one(torch.ones(n)), torch.full((n,), 3.0))
