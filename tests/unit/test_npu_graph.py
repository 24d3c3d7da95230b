"""NPU graph mode by torchair version, against fakes of torchair's option surfaces (no NPU here).

Each fake reproduces what the torch-npu wheels' own sources do (read with
``pip download torch-npu==V --no-deps``; docs/engine.md lists the files):
``torch_npu/dynamo/torchair/configs/_option_base.py`` (``NpuBaseConfig.
__setattr__`` refusing an unknown option with ``ValueError``, its message
made multi-line by ``_utils/error_code.pretty_error_msg``; ``OptionValue``
refusing a value outside its list), ``configs/compiler_config.py`` (which
options exist) and ``torch_npu/dynamo/__init__.py`` (the ``npugraph_ex``
torch.compile backend).  The expected torchair versions come from Huawei's
release notes (torch_npu wheel -> Ascend Extension for PyTorch release).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types

import pytest
import torch
from torch._dynamo.backends import registry

from vicuna_bench import compile as compile_mod
from vicuna_bench.spec import resolve_compile
from vicuna_bench import npu_graph
from vicuna_bench.errors import UserError
from vicuna_bench.generation import EAGER

pytestmark = pytest.mark.unit


class _Option:
    """torchair ``OptionValue``: a value, from ``optional`` when that is a list."""

    def __init__(self, default, optional=None):
        self.optional = optional
        self._value = default

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        if isinstance(self.optional, (list, tuple)) and v not in self.optional:
            raise ValueError(f"{v!r} not in optional list {self.optional!r}")
        self._value = v


class _BaseConfig:
    """torchair ``NpuBaseConfig``: the options are the attributes set before ``__init__`` ends; any other name
    is a ValueError whose message ``pretty_error_msg`` extends with a traceback and an error code."""

    def __init__(self):
        self._fixed_attrs = [k for k, v in self.__dict__.items() if isinstance(v, (_Option, _BaseConfig))]

    def __setattr__(self, key, value):
        if hasattr(self, "_fixed_attrs"):
            if key not in self._fixed_attrs:
                raise ValueError(f"{type(self).__name__} has no option {key}, all options {self._fixed_attrs}\n"
                                 "Traceback (most recent call last):\n  ...\n[ERROR] ERR03005 GRAPH param error")
            if isinstance(getattr(self, key), _Option):
                getattr(self, key).value = value
                return
        super().__setattr__(key, value)


class _SubConfig(_BaseConfig):
    def __init__(self):
        self.frozen_parameter = _Option(False, [True, False])
        super().__init__()


def _config_class(mode_options):
    """``CompilerConfig`` of one surface: ``mode_options`` None where the ``mode`` option does not exist."""

    class CompilerConfig(_BaseConfig):
        def __init__(self):
            self.debug = _SubConfig()
            self.experimental_config = _SubConfig()
            self.ge_config = _SubConfig()
            if mode_options is not None:
                self.mode = _Option("max-autotune", list(mode_options))
            super().__init__()

    return CompilerConfig


# torch_npu 2.1.0.post8 / post10 (torchair 6.0.rc3 / 6.0.0): no mode option at all.
SURFACE_6_0 = dict(torch_npu="2.1.0.post10", mode=None, npugraph_ex=False)
# torch_npu 2.1.0.post12 .. 2.8.0 (torchair 7.0.0 - 7.2.0): mode max-autotune | reduce-overhead.
SURFACE_7_0 = dict(torch_npu="2.1.0.post12", mode=("max-autotune", "reduce-overhead"), npugraph_ex=False)
# torch_npu 2.8.0.post2 (torchair 7.3.0): the same mode options, and the npugraph_ex dynamo backend.
SURFACE_7_3 = dict(torch_npu="2.8.0.post2", mode=("max-autotune", "reduce-overhead"), npugraph_ex=True)
# torch_npu 2.7.1.post10 (26.1.1): mode gains npugraph_ex; the backend is registered too.
SURFACE_26 = dict(torch_npu="2.7.1.post10", mode=("max-autotune", "reduce-overhead", "npugraph_ex"), npugraph_ex=True)


def fake_torchair(monkeypatch, surface: dict, backend_error: Exception | None = None):
    """Install a torchair of ``surface`` (and the torch_npu version it ships in); returns the module.

    ``module.backends`` lists the CompilerConfig each ``get_npu_backend`` got;
    ``backend_error`` is raised by the backend when it compiles (first call).
    """
    module = types.ModuleType("torchair")
    module.CompilerConfig = _config_class(surface["mode"])
    module.backends = []
    module.patched_hcom = 0

    def get_npu_backend(*, compiler_config=None, custom_decompositions={}):  # noqa: B006  (torchair's signature)
        config = compiler_config or module.CompilerConfig()
        module.backends.append(config)

        def backend(gm, example_inputs, **kwargs):
            if backend_error is not None:
                raise backend_error
            return gm.forward

        return backend

    def patch_for_hcom():
        module.patched_hcom += 1

    module.get_npu_backend = get_npu_backend
    module.patch_for_hcom = patch_for_hcom
    monkeypatch.setitem(sys.modules, "torchair", module)
    if surface["npugraph_ex"]:
        def npugraph_ex(gm, example_inputs, **kwargs):
            return gm.forward

        # As register_backend does: torch >= 2.2 keeps the function in _COMPILER_FNS, torch 2.1 in _BACKENDS.
        compiler_fns = getattr(registry, "_COMPILER_FNS", None)
        monkeypatch.setitem(registry._BACKENDS, npu_graph.NPUGRAPH_EX, None if compiler_fns is not None else npugraph_ex)
        if compiler_fns is not None:
            monkeypatch.setitem(compiler_fns, npu_graph.NPUGRAPH_EX, npugraph_ex)
    fake_torch_npu_version(monkeypatch, surface["torch_npu"])
    return module


def fake_torch_npu_version(monkeypatch, version: str | None):
    real = importlib.metadata.version

    def version_of(name):
        if name in ("torch_npu", "torch-npu"):
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version_of)


@pytest.fixture
def compiles(monkeypatch):
    """torch.compile recorded, not run: a backend name is looked up as torch does (unknown: InvalidBackend)."""
    calls = []

    def fake_compile(fn, *, backend="inductor", dynamic=None, **kwargs):
        if isinstance(backend, str):
            registry.lookup_backend(backend)
        calls.append({"backend": backend, "dynamic": dynamic})
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def step(x, y):
    return x * 2 + y


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- the fakes are the surfaces

def test_the_6_0_surface_refuses_the_mode_option_as_the_old_code_set_it(monkeypatch):
    """What killed the rank: ``config.mode = "reduce-overhead"`` on torchair 6.0.x."""
    torchair = fake_torchair(monkeypatch, SURFACE_6_0)
    with pytest.raises(ValueError, match="^CompilerConfig has no option mode"):
        torchair.CompilerConfig().mode = "reduce-overhead"
    config = fake_torchair(monkeypatch, SURFACE_7_0).CompilerConfig()
    config.mode = "reduce-overhead"
    with pytest.raises(ValueError, match="'npugraph_ex' not in optional list"):
        config.mode = "npugraph_ex"


# ---------------------------------------------------------------- versions

@pytest.mark.parametrize("wheel, torchair", [
    ("2.1.0.post8", "6.0.rc3"), ("2.1.0.post10", "6.0.0"), ("2.1.0.post12", "7.0.0"), ("2.5.1", "7.0.0"),
    ("2.1.0.post13", "7.1.0"), ("2.1.0.post17", "7.2.0"), ("2.8.0.post2", "7.3.0"), ("2.7.1.post10", "26.1.1"),
    ("2.12.0.post2", "26.1.1"), ("2.13.0", "26.2.0"), ("2.14.0", "26.2.0"),
    ("2.1.0.post12+gitabc123", "7.0.0"), ("2.1.0.post6", None), ("2.15.0", None),
])
def test_torchair_version_of_each_torch_npu_wheel(wheel, torchair):
    assert npu_graph.torchair_of(wheel) == torchair


def test_torchair_versions_sort_release_candidates_first():
    ordered = ["6.0.rc3", "6.0.0", "7.0.0", "7.2.0", "7.3.0", "26.0.0", "26.1.1"]
    assert sorted(ordered[::-1], key=npu_graph.version_key) == ordered


def test_status_reads_the_installed_torch_npu(monkeypatch):
    fake_torch_npu_version(monkeypatch, "2.1.0.post8")
    assert npu_graph.torchair_status() == npu_graph.TorchairStatus("2.1.0.post8", "6.0.rc3")
    fake_torch_npu_version(monkeypatch, "2.1.0.post6")  # older than 6.0.rc3's wheels
    status = npu_graph.torchair_status()
    assert (status.known, status.record()) == (False, "unknown")
    fake_torch_npu_version(monkeypatch, None)
    assert npu_graph.torchair_status().record() is None


def test_a_torch_npu_newer_than_the_table_takes_the_newest_torchair_in_one_line(monkeypatch, caplog):
    npu_graph._said_newer.clear()
    fake_torch_npu_version(monkeypatch, "2.15.0.post1")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        status = npu_graph.torchair_status()
        assert npu_graph.torchair_status() == status  # asked again: no second line
    assert (status.version, status.newer_than_known, status.record()) == ("26.2.0", True, "26.2.0")
    [line] = [r.getMessage() for r in caplog.records]
    assert line == ("torch_npu 2.15.0.post1 is newer than any in npu_graph.TORCHAIR_OF_TORCH_NPU: taking its "
                    "torchair for the newest known, 26.2.0")
    assert status.describe() == "torchair 26.2.0 assumed (torch_npu 2.15.0.post1, newer than the table)"


# ---------------------------------------------------------------- the choice of graph mode

@pytest.mark.parametrize("wheel, torchair, blocked, expected", [
    ("2.14.0", "26.2.0", "RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR", "ge"),
    ("2.14.0", "26.2.0", "SSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSS", "aclgraph"),  # 26.2.0 has the ACL graph
    ("2.1.0.post8", "6.0.rc3", "-------------------------------------", "eager"),  # 6.0.rc3 has none
    ("2.15.0", "26.2.0", "RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRS", "aclgraph"),  # reads 2.14.0: newest 26.2.0
])
def test_auto_on_910b_takes_ge_only_where_its_converters_take_the_decode_step(monkeypatch, wheel, torchair,
                                                                            blocked, expected):
    table = npu_graph.ge_converter_table()
    monkeypatch.setitem(table["ops"], "npu.scatter_update.default", blocked)
    mode, why = npu_graph.choose_graph("auto", "d9", npu_graph.TorchairStatus(wheel, torchair))
    assert mode == expected
    assert ("npu.scatter_update.default" in why) == (expected != "ge")


def test_auto_takes_ge_on_910b_and_eager_on_310p_and_unknown_chips():
    assert npu_graph.choose_graph("auto", "d9")[0] == "ge"
    assert npu_graph.choose_graph("auto", "d3")[0] == "eager"
    assert npu_graph.choose_graph("auto", None)[0] == "eager"
    assert npu_graph.choose_graph("aclgraph", "d3") == ("aclgraph", "--npu-graph aclgraph")
    with pytest.raises(UserError, match=r"^--npu-graph 'cuda-graphs' is not supported \(valid: auto, ge, aclgraph\)$"):
        npu_graph.choose_graph("cuda-graphs", "d9")


@pytest.mark.parametrize("wheel, graph, chip, expected", [
    ("2.1.0.post12", "auto", "d9", "on"),  # torchair 7.0.0, GE on a 910B
    ("2.1.0.post8", "ge", "d9", "on"),  # 6.0.rc3 has the GE graph
    ("2.1.0.post10", "aclgraph", "d9", "off"),  # 6.0.0 has no ACL graph
    ("2.1.0.post6", "auto", "d9", "off"),  # a torch_npu whose torchair is unknown
    ("2.14.0", "auto", "d9", "on"),  # 26.2.0
    ("2.15.0", "auto", "d9", "on"),  # newer than the table: its newest torchair
    (None, "auto", "d9", "off"),  # no torch_npu
    ("2.1.0.post12", "auto", "d3", "off"),  # a 310P runs eager
    ("2.1.0.post12", "auto", None, "off"),  # neither family
])
def test_compile_auto_on_npu_only_where_torchair_is_known_and_has_the_mode(monkeypatch, caplog, wheel, graph, chip,
                                                                          expected):
    fake_torch_npu_version(monkeypatch, wheel)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert resolve_compile("auto", "npu", 10**7, npu_graph=graph, chip_family=chip) == expected
    if expected == "off":
        [line] = [r.getMessage() for r in caplog.records]
        assert line.startswith("--compile auto: off (")
    assert resolve_compile("on", "npu", 0, npu_graph=graph, chip_family=chip) == "on"  # asked: tried


def test_unknown_torchair_says_how_to_try_it(monkeypatch):
    fake_torch_npu_version(monkeypatch, "2.1.0.post6")
    assert npu_graph.auto_compile_blocker("auto", "d9") == (
        "torch_npu 2.1.0.post6: torchair version unknown (not in npu_graph.TORCHAIR_OF_TORCH_NPU); "
        "pass --compile on to try it")


# ---------------------------------------------------------------- compiling, version by version

def test_ge_on_6_0_uses_the_default_config(monkeypatch, compiles, caplog):
    torchair = fake_torchair(monkeypatch, SURFACE_6_0)
    graph = npu_graph.compile_decode(step, "ge", "d9")
    assert (graph.mode, graph.description, graph.warm_calls) == ("ge", "torchair max-autotune (GE graph)", 1)
    assert len(torchair.backends) == 1 and compiles[0]["dynamic"] is False
    assert not warnings_of(caplog)


def test_aclgraph_on_6_0_falls_back_to_ge_with_one_line(monkeypatch, compiles, caplog):
    fake_torchair(monkeypatch, SURFACE_6_0)
    graph = npu_graph.compile_decode(step, "aclgraph", "d9")
    assert graph.mode == "ge"
    [line] = warnings_of(caplog)
    assert "has no ACL graph" in line and "CompilerConfig has no option mode" in line and "\n" not in line


def test_aclgraph_on_7_0_sets_reduce_overhead(monkeypatch, compiles, caplog):
    torchair = fake_torchair(monkeypatch, SURFACE_7_0)
    graph = npu_graph.compile_decode(step, "aclgraph", "d9")
    assert (graph.mode, graph.description) == ("aclgraph", "torchair reduce-overhead (ACL graph)")
    assert [c.mode.value for c in torchair.backends] == ["reduce-overhead"]
    assert not warnings_of(caplog)


@pytest.mark.parametrize("surface", [SURFACE_7_3, SURFACE_26])
def test_aclgraph_from_7_3_uses_the_npugraph_ex_backend(monkeypatch, compiles, caplog, surface):
    torchair = fake_torchair(monkeypatch, surface)
    graph = npu_graph.compile_decode(step, "aclgraph", "d9")
    assert (graph.mode, graph.description) == ("aclgraph", "torchair npugraph_ex (ACL graph)")
    assert compiles == [{"backend": "npugraph_ex", "dynamic": False}]
    assert torchair.backends == []  # config.mode = "reduce-overhead" (deprecated there) is not used
    assert not warnings_of(caplog)


def test_auto_on_910b_compiles_ge_on_every_surface(monkeypatch, compiles):
    for surface in (SURFACE_6_0, SURFACE_7_0, SURFACE_7_3, SURFACE_26):
        fake_torchair(monkeypatch, surface)
        assert npu_graph.compile_decode(step, "auto", "d9").description == "torchair max-autotune (GE graph)"


def test_auto_on_310p_stays_eager_without_importing_torchair(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torchair", None)  # an import would raise
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert npu_graph.compile_decode(step, "auto", "d3") is None
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("--compile on: --npu-graph auto on d3 (310P): eager")


class _TorchairImportError(Exception):
    """torch_npu's replay of a failed torchair import (not an ImportError: torch_npu/dynamo/__init__.py)."""


class _LazyTorchair(types.ModuleType):
    def __getattr__(self, name):
        raise _TorchairImportError("An error occured when import `torchair`\nPlease check the error message above.")


def test_torchair_that_fails_to_import_leaves_the_npu_eager(monkeypatch, caplog):
    fake_torch_npu_version(monkeypatch, "2.1.0.post8")
    monkeypatch.setitem(sys.modules, "torchair", _LazyTorchair("torchair"))
    assert npu_graph.compile_decode(step, "ge", "d9") is None
    [line] = warnings_of(caplog)
    assert line == ("--compile on: torchair cannot be imported (_TorchairImportError: An error occured when import "
                    "`torchair`; torchair 6.0.rc3 (torch_npu 2.1.0.post8)); the NPU runs eager")


def test_a_backend_refused_at_configuration_leaves_the_npu_eager(monkeypatch, compiles, caplog):
    torchair = fake_torchair(monkeypatch, SURFACE_7_0)

    def refuse(*, compiler_config=None, custom_decompositions={}):  # noqa: B006
        raise ValueError("_GEConfig has no option oo_level, all options [...]\nTraceback ...")

    torchair.get_npu_backend = refuse
    assert npu_graph.compile_decode(step, "ge", "d9") is None
    [line] = warnings_of(caplog)
    assert line == ("--compile on: torchair 7.0.0 (torch_npu 2.1.0.post12) refused the ge graph mode "
                    "(ValueError: _GEConfig has no option oo_level, all options [...]); the NPU runs eager")


def test_collectives_are_patched_for_graphs_only_on_torch_2_1_with_several_ranks(monkeypatch, compiles):
    torchair = fake_torchair(monkeypatch, SURFACE_7_0)
    monkeypatch.setattr(torch, "__version__", "2.1.0")
    npu_graph.compile_decode(step, "ge", "d9", world_size=1)
    assert torchair.patched_hcom == 0
    npu_graph.compile_decode(step, "ge", "d9", world_size=2)
    assert torchair.patched_hcom == 1
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    npu_graph.compile_decode(step, "ge", "d9", world_size=2)
    assert torchair.patched_hcom == 1


def test_a_failure_on_the_first_compiled_call_falls_back_to_eager_once(monkeypatch, caplog):
    """Real torch.compile: the backend raises when dynamo hands it the graph (torchair reads most options then)."""
    torch._dynamo.reset()
    fake_torchair(monkeypatch, SURFACE_7_0, backend_error=ValueError("'O3' not in optional list ['O1', 'O2']"))
    graph = npu_graph.compile_decode(step, "ge", "d9")
    told = []
    graph.step.on_fallback = told.append
    x, y = torch.arange(4.0), torch.ones(4)
    assert torch.equal(graph.step(x, y), step(x, y))
    assert torch.equal(graph.step(x, y), step(x, y))
    [line] = warnings_of(caplog)
    assert "failed on its first call for shapes ((4,), (4,))" in line and "'O3' not in optional list" in line
    assert len(told) == 1 and "ValueError" in told[0]
    torch._dynamo.reset()


def test_a_shape_that_ran_compiled_is_not_guarded(monkeypatch):
    """After a shape's first call worked, a later failure is a real error: it propagates."""
    calls = []

    def compiled(x):
        calls.append(x.shape)
        if len(calls) > 1:
            raise RuntimeError("device lost")
        return x

    guarded = npu_graph.EagerOnFirstFailure(compiled, lambda x: x + 1, "torchair max-autotune (GE graph)")
    guarded(torch.zeros(2))
    with pytest.raises(RuntimeError, match="device lost"):
        guarded(torch.zeros(2))


# ---------------------------------------------------------------- the engine side: compile.compiled_steps

def test_compiled_steps_on_npu_carry_the_warm_calls(monkeypatch, compiles):
    fake_torchair(monkeypatch, SURFACE_26)
    steps = compile_mod.compiled_steps("npu", 1, "fp16", "aclgraph", "d9")
    assert isinstance(steps, compile_mod.CompiledSteps)
    assert steps.warm_calls == 1  # AclGraph captures in the first call, then replays within it
    assert steps.description == "torchair npugraph_ex (ACL graph) (decode step)"


def test_compiled_steps_on_npu_never_raise(monkeypatch, compiles, caplog):
    fake_torch_npu_version(monkeypatch, "2.1.0.post8")
    monkeypatch.setitem(sys.modules, "torchair", _LazyTorchair("torchair"))
    assert compile_mod.compiled_steps("npu", 1, "fp16", "ge", "d9") is EAGER
    assert compile_mod.compiled_steps("npu", 1, "fp16", "auto", "d3") is EAGER
    assert len(warnings_of(caplog)) == 1


def test_every_device_compiles_the_one_decode_step(monkeypatch):
    """CPU inductor, CUDA graph trees and torchair's GE and ACL graphs are handed the same function,
    generation.decode_step, and each engine step calls what that compile returned with the state's inputs."""
    from vicuna_bench import generation

    handed, called = [], []

    def fake_compile(fn, **kwargs):
        handed.append(fn)

        def compiled(*args):
            called.append((fn, args))
            return torch.zeros(1)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    fake_torchair(monkeypatch, SURFACE_26)
    state = generation.DecodeState.after_prefill(torch.zeros((1, 8), dtype=torch.bool), 2, torch.tensor([[2]]))
    model = object()
    warm_calls = {}
    for device, graph in (("cpu", "auto"), ("cuda", "auto"), ("npu", "ge"), ("npu", "aclgraph")):
        handed.clear()
        called.clear()
        steps = compile_mod.compiled_steps(device, 1, "fp32", graph, "d9")
        assert [fn for fn in handed if fn is not generation.prefill_logits] == [generation.decode_step], device
        steps.decode(model, state)
        [(fn, args)] = called
        assert fn is generation.decode_step and args[0] is model
        assert all(a is b for a, b in zip(args[1:], state.step_inputs())) and len(args) == 5
        warm_calls[device, graph] = steps.warm_calls
    # CUDA graph trees: an eager warm-up call, then the recording; torchair and CPU inductor: one call.
    assert warm_calls == {("cpu", "auto"): 1, ("cuda", "auto"): 2, ("npu", "ge"): 1, ("npu", "aclgraph"): 1}


def test_decode_falls_back_to_eager_logits_when_torchair_refuses_at_first_call(monkeypatch, tiny_models, caplog):
    """The engine's own decode step on a tiny model: the first compiled call raises, the logits are eager's."""
    from tests.specs import spec_for
    from vicuna_bench.generation import DecodeState
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    torch._dynamo.reset()
    fake_torchair(monkeypatch, SURFACE_6_0, backend_error=ValueError("CompilerConfig has no option mode"))
    steps = compile_mod.compiled_steps("npu", 1, "fp32", "ge", "d9")
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))

    def one_step(run):
        model.setup_caches(1, 64)
        key_valid = torch.zeros((1, 64), dtype=torch.bool)
        key_valid[:, :3] = True
        state = DecodeState.after_prefill(key_valid, 2, torch.tensor([[2]]))
        state.advance(torch.tensor([5]))
        with torch.inference_mode():
            return run(model, state)

    expected = one_step(EAGER.decode)
    assert torch.equal(one_step(steps.decode), expected)
    [line] = warnings_of(caplog)
    assert "torchair max-autotune (GE graph) failed on its first call" in line
    assert steps.description == "eager after torchair max-autotune (GE graph) failed"
    torch._dynamo.reset()


@pytest.mark.parametrize("graph", ["ge", "aclgraph"])
def test_only_the_ge_graph_gives_the_model_its_graph_attention(monkeypatch, compiles, tiny_models, graph):
    """GE converts no SDPA op (tests/unit/test_ge_convert.py): its decode step's model attends through
    npu_graph.graph_attention; the ACL graph runs torch_npu's kernels and keeps the model's SDPA attend."""
    from vicuna_bench.generation import DecodeState
    from vicuna_bench.model import Attention, attend
    from tests.specs import spec_for
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    fake_torchair(monkeypatch, SURFACE_26)
    steps = compile_mod.compiled_steps("npu", 1, "fp32", graph, "d9")
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    model.setup_caches(1, 64)
    key_valid = torch.zeros((1, 64), dtype=torch.bool)
    key_valid[:, :3] = True
    state = DecodeState.after_prefill(key_valid, 2, torch.tensor([[2]]))
    state.advance(torch.tensor([5]))
    attends = lambda: {m.attend for m in model.modules() if isinstance(m, Attention)}  # noqa: E731
    assert attends() == {attend}
    with torch.inference_mode():
        steps.decode(model, state)
    assert attends() == ({npu_graph.graph_attention} if graph == "ge" else {attend})
