"""Where the CPU decode step is an AOTInductor package, and what the engine does around one (vicuna_bench/aoti.py).

Nothing here compiles: the package's runner is a fake with the two calls the engine makes of torch 2.13's
``AOTICompiledModel`` (torch/export/pt2_archive/_package.py): ``load_constants(constants_map, *,
check_full_update, user_managed)``, which keeps the tensors' pointers when ``user_managed``, and
``loader.boxed_run(inputs)``, which returns the list of outputs.  tests/integration/test_aoti.py compiles real ones.
"""

from __future__ import annotations

import logging

import pytest
import torch

from vicuna_bench import aoti, cpu_kernels
from vicuna_bench.compile import CompiledSteps, compiled_steps
from vicuna_bench.generation import EAGER, GenerationRequest, decode_step, generate
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel
from tests.specs import spec_for

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8], [9, 10]]


@pytest.fixture(scope="module")
def rank_model(tiny_models):
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


class FakeRunner:
    """torch 2.13's AOTICompiledModel as the engine uses it; the step it runs is the eager decode_step on the
    tensors last bound (so a stale binding gives another model's, or another cache's, result)."""

    def __init__(self):
        self.bound: dict[str, torch.Tensor] = {}
        self.binds = 0
        self.loader = self

    def get_constant_fqns(self):
        return list(self.fqns)

    def load_constants(self, constants_map, *, check_full_update, user_managed=False):
        assert check_full_update and user_managed
        self.bound = dict(constants_map)
        self.binds += 1

    def boxed_run(self, inputs):
        return [("ran", len(inputs), self.bound[aoti.PREFIX + "model.layers.0.self_attn.cache.k"])]


def test_the_package_is_used_only_where_it_can_run(monkeypatch):
    """CPU at world size 1 with our kernels; never elsewhere, each with its reason in one line."""
    monkeypatch.delenv(aoti.ENV_SWITCH, raising=False)
    assert "cuda" in aoti.why_not("cuda", 1, True)
    assert "world size 2" in aoti.why_not("cpu", 2, True)
    assert "kernels are not loaded" in aoti.why_not("cpu", 1, False)
    monkeypatch.setenv(aoti.ENV_SWITCH, "off")
    assert aoti.why_not("cpu", 1, True) == "VICUNA_BENCH_AOTI=0"
    monkeypatch.setenv(aoti.ENV_SWITCH, "1")
    assert aoti.why_not("cpu", 1, True) == aoti.why_unsupported()


def test_a_torch_that_cannot_bind_the_models_own_weights_is_refused(monkeypatch):
    """Without ``user_managed`` the package would copy every weight: refused, said why."""
    _package = pytest.importorskip("torch.export.pt2_archive._package", reason="this torch has no AOTInductor "
                                   "package loader at all (why_unsupported says so; the test below checks it)")

    def load_constants(self, constants_map, *, check_full_update):  # the parameter list before user_managed
        raise AssertionError("not called")

    monkeypatch.setattr(_package.AOTICompiledModel, "load_constants", load_constants)
    assert "user_managed" in aoti.why_unsupported()
    assert aoti.why_not("cpu", 1, True) == aoti.why_unsupported()


def test_this_torch_packages_the_cpu_decode_step():
    """torch 2.13 (the pinned build; its sources read) has everything, and an older torch (the compat tier's 2.1)
    is refused by name; the compile description says which path runs, and why not the package."""
    reason = aoti.why_unsupported()
    if torch.__version__.startswith("2.13."):
        assert reason is None
    else:
        assert reason is None or torch.__version__ in reason
    steps = compiled_steps("cpu", 1)
    if cpu_kernels.load() and reason is None:
        assert steps.packaged is not None and "AOTInductor package" in steps.description
    else:
        assert steps.packaged is None and (reason or "kernels are not loaded") in steps.description
    assert compiled_steps("cpu", 2).packaged is None


def test_a_step_binds_the_models_tensors_and_binds_again_for_a_new_cache_set(rank_model):
    """Every constant the package names is the model's own tensor (by identity: nothing copied); a call after the
    pool made the bucket's caches anew binds those first."""
    model = rank_model
    with torch.inference_mode():
        model.setup_caches(2, 16)
        runner = FakeRunner()
        runner.fqns = list(aoti.model_tensors(model))
        step = aoti.PackagedStep(runner, runner.fqns, "fake.pt2")
        step.bind(model)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        assert {name: t for name, t in runner.bound.items()} == {aoti.PREFIX + n: t for n, t in tensors.items()}
        assert all(runner.bound[aoti.PREFIX + n] is t for n, t in tensors.items())
        # tied weights: one tensor under both names
        assert runner.bound[aoti.PREFIX + "lm_head.weight"] is runner.bound[aoti.PREFIX + "model.embed_tokens.weight"]
        inputs = aoti.scratch_inputs(2, 16, "cpu")
        first = step(model, *inputs)
        assert runner.binds == 1 and first[2] is model.model.layers[0].self_attn.cache.k
        model.kv_pool.clear()
        model.setup_caches(2, 16)  # the same bucket, made anew
        second = step(model, *inputs)
        assert runner.binds == 2 and second[2] is model.model.layers[0].self_attn.cache.k
        assert second[2] is not first[2]
        step(model, *inputs)
        assert runner.binds == 2  # the same set: no rebinding per step


def test_a_package_that_wants_a_tensor_the_model_lacks_names_it(rank_model):
    runner = FakeRunner()
    runner.fqns = ["step.model.layers.9.mlp.down_proj.weight"]
    with pytest.raises(RuntimeError, match=r"bad\.pt2 wants tensors the model lacks: \['step\.model\.layers\.9"):
        aoti.PackagedStep(runner, runner.fqns, "bad.pt2").bind(rank_model)


class FailingPackages:
    def __init__(self):
        self.tries = 0

    def prepare(self, model, batch, length):
        self.tries += 1
        raise RuntimeError("C++ compile failed: g++ not found\nsecond line")

    def step_for(self, model, shape):
        raise AssertionError("no package was made")


def test_a_package_that_fails_leaves_the_step_to_dynamo_said_once(rank_model, caplog):
    """The first shape's failure is logged in one line, the description says it, and this and every later shape
    decode through the dynamo function (here the eager decode_step, counted) with eager's tokens."""
    calls = []

    def decode_fn(model, *inputs):
        calls.append(inputs[2].shape)
        return decode_step(model, *inputs)

    packages = FailingPackages()
    steps = CompiledSteps(None, decode_fn, f"inductor: {compile_description()}", packaged=packages)
    eager = generate(rank_model, GenerationRequest(PROMPTS, 4, ignore_eos=True), steps=EAGER)
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        got = generate(rank_model, GenerationRequest(PROMPTS, 4, ignore_eos=True), steps=steps)
        again = generate(rank_model, GenerationRequest(PROMPTS[:1], 4, ignore_eos=True), steps=steps)
    assert got.output_ids == eager.output_ids and again.output_ids == eager.output_ids[:1]
    assert packages.tries == 1 and steps.packaged is None
    warnings = [r.getMessage() for r in caplog.records if "AOTInductor package failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "g++ not found" in warnings[0]
    assert "through dynamo (the AOTInductor package failed: C++ compile failed: g++ not found)" in steps.description
    assert len(calls) >= 2 * 3  # every decode step of both generations, warm-up calls included


def compile_description() -> str:
    from vicuna_bench.compile import PACKAGED_DECODE

    return f"{PACKAGED_DECODE}, prefill dynamic"


def test_the_last_exports_trace_map_is_emptied(monkeypatch):
    """torch 2.13 keeps its last export trace's nodes in proxy_tensor's module-level map (through them AOTInductor's
    buffer clones outlived the compile: tests/integration/test_cpu_kernels.py counts the bytes); emptied after a
    build, and a torch without the map is left alone."""
    from torch.fx.experimental import proxy_tensor

    traced = {1: "node", 2: "node"}
    monkeypatch.setattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", traced, raising=False)
    assert aoti.drop_export_trace_map() == 2 and traced == {}
    monkeypatch.delattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT")
    assert aoti.drop_export_trace_map() == 0


def test_compiling_a_package_leaves_the_key_settings_as_they_were(tmp_path, monkeypatch):
    """torch 2.13's ``aoti_compile_and_package`` sets ``inductor_configs["aot_inductor.package"] = True`` in the dict
    it is handed (torch/_inductor/__init__.py).  Handed ours, every later package key in the process changed: a
    shape already packaged compiled again, and keys differed from process to process."""
    from pathlib import Path
    from types import SimpleNamespace

    import torch._inductor as inductor

    handed = []

    def compile_as_torch_2_13_does(program, package_path, inductor_configs):
        handed.append(dict(inductor_configs))
        inductor_configs["aot_inductor.package"] = True
        Path(package_path).write_bytes(b"package")

    monkeypatch.setattr(inductor, "aoti_compile_and_package", compile_as_torch_2_13_does)
    program = SimpleNamespace(graph_module=SimpleNamespace(code="def forward(self, x): return x",
                                                           graph=SimpleNamespace(nodes=[])))
    before = aoti.package_key(program, 2)
    aoti._compile_into(program, tmp_path / "step.pt2", 2)
    assert aoti.package_key(program, 2) == before
    # the thread count the key names is the one written into the code, whatever the compiling process runs at
    assert handed == [{"aot_inductor.package_constants_in_so": False, "cpp.threads": 2}]
    assert dict(aoti.INDUCTOR_CONFIGS) == {"aot_inductor.package_constants_in_so": False}
    assert [p.name for p in tmp_path.iterdir()] == ["step.pt2"] and (tmp_path / "step.pt2").read_bytes() == b"package"
