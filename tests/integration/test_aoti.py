"""The CPU decode step as a real AOTInductor package (vicuna_bench/aoti.py): compiled by torch's AOTInductor, bound
to the model's own tensors, checked against the eager step.

Each check would fail if the package held copies: of the weights (a weight changed in place after binding would not
reach it), of the KV cache (its writes would not land in the model's cache), or of another model's tensors (two
models of one architecture share one package file).
"""

from __future__ import annotations

import pytest
import torch

from vicuna_bench import aoti, cpu_kernels
from vicuna_bench.generation import DecodeState, decode_step
from vicuna_bench.runtime import Engine, build_rank_model
from vicuna_bench.sharding import TensorParallel
from tests.integration.test_decode_step import alternate_and_compare, two_models_of_one_architecture
from tests.specs import spec_for

pytestmark = pytest.mark.integration

BATCH, LENGTH = 2, 32


@pytest.fixture(autouse=True)
def packaged_on(monkeypatch):
    monkeypatch.setenv(aoti.ENV_SWITCH, "1")
    if not cpu_kernels.load():
        pytest.fail(f"our CPU kernels did not load ({cpu_kernels.status()['small_m_gemm_why_not']}): the package "
                    "is only used with them, so this host cannot check it")


def _state(batch: int, length: int, filled: int) -> DecodeState:
    valid = torch.zeros((batch, length), dtype=torch.bool)
    valid[:, :filled] = True
    state = DecodeState.after_prefill(valid, filled - 1, torch.arange(batch)[:, None] + 3)
    state.advance(torch.arange(batch) + 7)
    return state


def _fill_caches(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for t in (layer.self_attn.cache.k, layer.self_attn.cache.v):
            t.copy_(torch.randn(t.shape, generator=generator))


def test_package_reads_the_models_weights_and_writes_its_cache(tiny_models, tmp_path):
    """Logits equal the eager step's; after a weight is changed in place they still do (and differ from before);
    the step's keys land in the model's cache; a cache set made anew is the one written next."""
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    with torch.inference_mode():
        model.setup_caches(BATCH, LENGTH)
        step = aoti.PackagedDecode(tmp_path).prepare(model, BATCH, LENGTH)
        state = _state(BATCH, LENGTH, 9)
        slot = int(state.slot)
        _fill_caches(model, 0)
        want = decode_step(model, *state.step_inputs()).clone()
        keys = [layer.self_attn.cache.k[:, :, slot].clone() for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.cache.k[:, :, slot] = 0
        got = step(model, *state.step_inputs())
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        for layer, k in zip(model.model.layers, keys):  # written by the package, into the model's own cache
            assert torch.allclose(layer.self_attn.cache.k[:, :, slot], k, atol=1e-5)
            assert k.abs().max() > 0

        model.model.layers[0].mlp.down_proj.weight.mul_(-2.0)  # in place: the package must see it
        changed = decode_step(model, *state.step_inputs()).clone()
        assert (changed - want).abs().max() > 1e-2 * want.abs().max()
        got = step(model, *state.step_inputs())
        assert (got - changed).abs().max() <= 1e-5 * changed.abs().max()

        old_k = model.model.layers[1].self_attn.cache.k
        model.kv_pool.clear()
        model.setup_caches(BATCH, LENGTH)  # the bucket's caches made anew, at other addresses
        assert model.model.layers[1].self_attn.cache.k is not old_k
        _fill_caches(model, 1)
        want = decode_step(model, *state.step_inputs()).clone()
        got = step(model, *state.step_inputs())
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert len(list(tmp_path.glob("*.pt2"))) == 1


def test_a_bf16_package_computes_the_eager_step(tiny_models, tmp_path):
    """bf16, the dtype our kernels decode fastest on a host without a bf16 dot product: the package's logits and
    the keys it writes into the model's bf16 cache match the eager step's within bf16's rounding (inductor keeps
    elementwise chains in fp32 where eager rounds after each op), with the same greedy token."""
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "bf16", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        model.setup_caches(BATCH, LENGTH)
        assert model.model.layers[0].self_attn.cache.k.dtype == torch.bfloat16
        step = aoti.PackagedDecode(tmp_path).prepare(model, BATCH, LENGTH)
        state = _state(BATCH, LENGTH, 9)
        slot = int(state.slot)
        _fill_caches(model, 2)
        eager = decode_step(model, *state.step_inputs())
        want = eager.float()
        keys = [layer.self_attn.cache.k[:, :, slot].float() for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.cache.k[:, :, slot] = 0
        got = step(model, *state.step_inputs())
        assert got.dtype == eager.dtype and got.shape == eager.shape
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= 2e-2 * scale
        assert torch.equal(got.float().argmax(-1), want.argmax(-1))
        for layer, k in zip(model.model.layers, keys):
            written = layer.self_attn.cache.k[:, :, slot].float()
            assert written.abs().max() > 0  # the package wrote the model's own cache
            assert (written - k).abs().max() <= 2e-2 * k.abs().max()


def test_a_kept_package_is_loaded_not_compiled(tiny_models, tmp_path, monkeypatch):
    """A second process (here: a fresh PackagedDecode) finds the package under its key and compiles nothing;
    another thread count is another key (inductor writes the count into its parallel regions)."""
    import torch._inductor as inductor

    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    with torch.inference_mode():
        model.setup_caches(1, LENGTH)
        first = aoti.PackagedDecode(tmp_path).prepare(model, 1, LENGTH)

        def refuse(*args, **kwargs):
            raise AssertionError("compiled again")

        monkeypatch.setattr(inductor, "aoti_compile_and_package", refuse)
        second = aoti.PackagedDecode(tmp_path).prepare(model, 1, LENGTH)
        assert second.path == first.path and second.runner is not first.runner
        state = _state(1, LENGTH, 5)
        want = decode_step(model, *state.step_inputs()).clone()
        assert (second(model, *state.step_inputs()) - want).abs().max() <= 1e-5 * want.abs().max()
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            # (the compile runs in a forked child, whose error comes back in one line)
            with pytest.raises(RuntimeError, match=r"in a child process failed \(AssertionError: compiled again\)"):
                aoti.PackagedDecode(tmp_path).prepare(model, 1, LENGTH)
        finally:
            torch.set_num_threads(threads)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # nothing half-written left beside it


def test_a_kept_package_that_cannot_be_loaded_is_compiled_anew(tiny_models, tmp_path, caplog):
    """A package under its key that does not load (here truncated, as a full disk leaves one) is compiled again,
    said in one line, and replaces the bad file; the step then equals the eager one."""
    import logging
    import os

    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    with torch.inference_mode():
        model.setup_caches(1, LENGTH)
        first = aoti.PackagedDecode(tmp_path).prepare(model, 1, LENGTH)
        whole = first.path.read_bytes()
        cut = tmp_path / "cut"
        cut.write_bytes(whole[: len(whole) // 3])
        os.replace(cut, first.path)  # a new file under the key (the loaded one stays as it was)
        compiled = aoti.COUNTS["compiled"]
        with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
            second = aoti.PackagedDecode(tmp_path).prepare(model, 1, LENGTH)
        assert aoti.COUNTS["compiled"] == compiled + 1 and second.path == first.path
        warned = [r.getMessage() for r in caplog.records if r.name == "vicuna_bench" and r.levelno == logging.WARNING]
        assert len(warned) == 1 and str(first.path) in warned[0] and "compiling it anew" in warned[0]
        assert first.path.stat().st_size > len(whole) // 3
        state = _state(1, LENGTH, 5)
        want = decode_step(model, *state.step_inputs()).clone()
        assert (second(model, *state.step_inputs()) - want).abs().max() <= 1e-5 * want.abs().max()
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_a_package_is_compiled_in_a_forked_child_for_the_parents_threads(tiny_models, tmp_path, monkeypatch):
    """What compiling leaves resident stays in a child: the package is compiled in another process, which runs at
    one thread (libgomp's team does not survive a fork) while inductor's C++ code generation works for the
    parent's thread count; the parent loads the package, and its step equals the eager one."""
    import os

    import torch._inductor as inductor
    from torch._inductor.codegen import cpp

    calls, counts = tmp_path / "calls", tmp_path / "thread_counts"

    def recording(compile_and_package):
        def call(*args, **kwargs):
            with open(calls, "a") as out:
                out.write(f"{os.getpid()} {torch.get_num_threads()}\n")
            return compile_and_package(*args, **kwargs)
        return call

    def codegen_threads(threads_for_code):
        def call():
            threads = threads_for_code()
            with open(counts, "a") as out:
                out.write(f"{threads}\n")
            return threads
        return call

    monkeypatch.setattr(inductor, "aoti_compile_and_package", recording(inductor.aoti_compile_and_package))
    monkeypatch.setattr(cpp, "parallel_num_threads", codegen_threads(cpp.parallel_num_threads))
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            model.setup_caches(BATCH, LENGTH)
            step = aoti.PackagedDecode(tmp_path / "packages").prepare(model, BATCH, LENGTH)
            state = _state(BATCH, LENGTH, 9)
            want = decode_step(model, *state.step_inputs()).clone()
            assert (step(model, *state.step_inputs()) - want).abs().max() <= 1e-5 * want.abs().max()
    finally:
        torch.set_num_threads(threads)
    (pid, child_threads), = (line.split() for line in calls.read_text().splitlines())
    assert int(pid) != os.getpid() and int(child_threads) == 1
    used = counts.read_text().split()
    assert used and set(used) == {"2"}, used  # every kernel the C++ code generation wrote
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [step.path.name]


def test_a_child_that_fails_to_compile_says_why_and_leaves_no_package(tiny_models, tmp_path, monkeypatch):
    """The child's error reaches the parent in one line, and nothing is written under the key."""
    import torch._inductor as inductor

    def failing(*args, **kwargs):
        raise ValueError("no C++ compiler on PATH\n(and a second line)")

    monkeypatch.setattr(inductor, "aoti_compile_and_package", failing)
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    with torch.inference_mode():
        model.setup_caches(1, LENGTH)
        with pytest.raises(RuntimeError, match=r"in a child process failed \(ValueError: no C\+\+ compiler on PATH\)$"):
            aoti.PackagedDecode(tmp_path).prepare(model, 1, LENGTH)
    assert list(tmp_path.iterdir()) == []


def test_two_models_sharing_one_package_file_keep_their_own_weights(tiny_models, tmp_path):
    """Two engines of one architecture with different weights, open at once: their decode steps are one package
    file (one key), loaded twice; alternating models and batch sizes, each generation equals its own eager one."""
    specs, requests, eager = two_models_of_one_architecture(tiny_models, tmp_path)
    on = [Engine(type(s)(**{**s.__dict__, "compile": "on"})) for s in specs]
    try:
        for engine in on:
            assert "AOTInductor package" in engine.rank_info[0]["compile_path"]
        alternate_and_compare(on, requests, eager)
        # the engines run in this process (world size 1): their packages by (batch, length)
        paths = [{shape: s.path for shape, s in e._local.steps.packaged._steps[e._local.model].items()} for e in on]
        assert len(paths[0]) == 2 and paths[0] == paths[1]  # the same files, each loaded by both engines
    finally:
        for engine in on:
            engine.close()
