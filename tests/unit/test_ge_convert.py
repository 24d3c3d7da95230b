"""The decode step's aten graph, as torchair's GE converter receives it, against each torch_npu wheel's converters.

The graph is made the way torchair's backend makes it (``npu_fx_compiler.
_compile_graph_with_aot`` in the 2.14.0 wheel): dynamo hands the FX graph to
``aot_module_simplified`` with ``keep_inference_input_mutations=True`` (its
``experimental_config`` default) and torchair's default decompositions, which
cover only ``npu_define.allgather`` and ``_c10d_functional.all_to_all_single``
(``_utils/__init__.get_npu_default_decompositions``), so none here.  The
converter table is ``vicuna_bench/ge_converters.json``, read from the wheels'
``ge_converter/**.py`` by ``scripts/ge_converter_table.py``.  The CPU kernels
are switched off (the NPU runs plain torch ops), torch_npu's
``npu::scatter_update(_)`` are defined on CPU (``tests/fake_npu_ops.py``),
and the model is prepared as ``npu_graph.compile_decode`` prepares it for GE
(``prepare_for_ge``), so no SDPA op reaches the graph, whichever lowering
torch_npu's ``_fused_sdp_choice`` would pick for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition

from tests import fake_npu_ops, tiny
from vicuna_bench import cpu_kernels, npu_graph
from vicuna_bench.generation import DecodeState, decode_step
from vicuna_bench.model import Attention, KVCache
from tests.specs import spec_for
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TABLE = json.loads((ROOT / "vicuna_bench" / "ge_converters.json").read_text())
WHEELS = [w["torch_npu"] for w in TABLE["wheels"]]


def _decode_graph(path, prepare=npu_graph.prepare_for_ge) -> torch.fx.Graph:
    """The functionalized decode step of the tiny model at ``path``, as torchair's GE converter receives it."""
    fake_npu_ops.register()
    spec = spec_for(str(path), 1, "cpu", "fp16", 64)
    model = build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    prepare(model)
    slots = model.setup_caches(2, 64)
    key_valid = torch.zeros((2, slots), dtype=torch.bool)
    key_valid[:, :4] = True
    state = DecodeState.after_prefill(key_valid, 3, torch.tensor([[3], [3]]))
    state.advance(torch.tensor([5, 6]))
    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def torchair_like(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler,
                                     inference_compiler=compiler, partition_fn=default_partition,
                                     keep_inference_input_mutations=True, decompositions={})

    torch._dynamo.reset()
    step = torch.compile(decode_step, backend=torchair_like, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        step(model, *state.step_inputs())
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0].graph


def _aten_ops_of_decode_step(path, prepare=npu_graph.prepare_for_ge) -> set[str]:
    """Every ``call_function`` op overload of the functionalized decode step of the tiny model at ``path``."""
    return {str(n.target) for n in _decode_graph(path, prepare).nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}


def _attention_only(model):
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = npu_graph.graph_attention


def _not_converted(ops: set[str], wheel: str) -> list[str]:
    """``op: stub|no converter`` for each op of ``ops`` GE cannot convert in ``wheel``."""
    column = WHEELS.index(wheel)
    said = {"S": "stub", "-": "no converter"}
    return sorted(f"{op}: {said[TABLE['ops'].get(op, '-' * len(WHEELS))[column]]}" for op in ops
                  if TABLE["ops"].get(op, "-" * len(WHEELS))[column] != "R")


@pytest.fixture(autouse=True)
def _npu_ops(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "handles", lambda x: False)  # no CPU kernel ops: the NPU has none


@pytest.fixture(scope="module")
def decode_ops(tiny_models):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "handles", lambda x: False)
        return _aten_ops_of_decode_step(tiny_models["gqa"])


def test_the_table_covers_every_wheel_the_version_table_names():
    assert set(WHEELS) == set(npu_graph.TORCHAIR_OF_TORCH_NPU)
    assert {w["torch_npu"]: w["torchair"] for w in TABLE["wheels"]} == npu_graph.TORCHAIR_OF_TORCH_NPU


def test_the_product_knows_every_op_of_its_decode_graph(decode_ops):
    assert decode_ops - npu_graph.DECODE_GRAPH_OPS == set()


def test_the_ge_graph_has_no_sdpa_op_and_no_safe_softmax(decode_ops):
    assert not {op for op in decode_ops if "scaled_dot_product" in op or "_safe_softmax" in op}
    assert {"aten._softmax.default", "aten.bmm.default", "aten.masked_fill.Scalar"} <= decode_ops


def test_without_the_pass_sdpa_reaches_the_graph(tiny_models):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "handles", lambda x: False)
        ops = _aten_ops_of_decode_step(tiny_models["gqa"], prepare=lambda model: None)
    sdpa = {op for op in ops if "scaled_dot_product" in op}
    assert sdpa and "aten._softmax.default" not in ops
    for wheel in WHEELS:
        assert {f"{op}: no converter" for op in sdpa} <= set(_not_converted(ops, wheel)), wheel


def test_the_cache_write_converts_in_every_wheel(decode_ops):
    assert {"npu.scatter_update.default", "aten.copy_.default"} <= decode_ops  # scatter_update_, functionalized
    assert not {op for op in decode_ops if "index_copy" in op or "index_put" in op or op.startswith("aten.scatter")}
    for wheel in WHEELS:
        assert _not_converted({"npu.scatter_update.default", "aten.copy_.default"}, wheel) == [], wheel


def test_the_cache_write_is_the_pattern_torchair_makes_in_place(tiny_models):
    """torchair's optimize_reference_op_redundant_copy (_ge_concrete_graph/graph_pass.py, 6.0.rc3 to 26.2.0) drops
    the TensorMove before a Scatter (npu.scatter_update's converter) and the Assign after it (copy_) where the
    Assign writes the Scatter's output back into the very input the TensorMove copied, that input has exactly
    those two users, and the Scatter's output has another user beside the Assign."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "handles", lambda x: False)
        graph = _decode_graph(tiny_models["gqa"])
    updates = [n for n in graph.nodes if n.target is torch.ops.npu.scatter_update.default]
    assert len(updates) == 2 * tiny.GQA["num_hidden_layers"]  # keys and values of every layer
    for update in updates:
        cache = update.args[0]
        assert cache.op == "placeholder" and update.args[3] == -2
        [write_back] = [n for n in update.users if n.target is torch.ops.aten.copy_.default]
        assert write_back.args == (cache, update)
        assert set(cache.users) == {update, write_back}
        assert len(update.users) >= 2


def test_without_torch_npu_the_write_stays_scatter(tiny_models, monkeypatch):
    monkeypatch.setattr(npu_graph, "_has_npu_op", lambda name: False)
    ops = _aten_ops_of_decode_step(tiny_models["gqa"])
    assert "aten.scatter.src" in ops and "npu.scatter_update.default" not in ops


@pytest.mark.parametrize("wheel", WHEELS)
def test_auto_on_910b_picks_ge_only_where_every_op_converts(decode_ops, wheel):
    entry = WHEELS.index(wheel)
    status = npu_graph.TorchairStatus(wheel, TABLE["wheels"][entry]["torchair"])
    mode, why = npu_graph.choose_graph("auto", "d9", status)
    missing = _not_converted(decode_ops, wheel)
    if mode == "ge":
        assert missing == [], f"torch_npu {wheel}: GE cannot convert {missing}"
    else:
        assert missing and mode == ("aclgraph" if status.has("aclgraph") else "eager")
        assert all(m.split(":")[0] in why for m in missing)


def test_ge_converts_the_decode_step_in_every_wheel(decode_ops):
    # torch_npu 2.5.1, 2.5.1.post1 and 2.6.0 (torchair 7.0.0 / 7.1.0) included: their aten/_softmax.py converts,
    # where they have no _safe_softmax converter (ge_converters.json).
    assert {wheel: _not_converted(decode_ops, wheel) for wheel in WHEELS} == {wheel: [] for wheel in WHEELS}


def test_the_models_own_index_copy_write_converts_nowhere(tiny_models):
    # KVCache.write (index_copy_, what inductor writes in place on CPU and CUDA) with only the attention prepared
    ops = _aten_ops_of_decode_step(tiny_models["gqa"], prepare=_attention_only)
    for wheel in WHEELS:
        assert "aten.index_copy.default: stub" in _not_converted(ops, wheel), wheel
        status = npu_graph.TorchairStatus(wheel, npu_graph.TORCHAIR_OF_TORCH_NPU[wheel])
        assert npu_graph.ge_blockers(status, ops) != [], wheel


# ---------------------------------------------------------------- the table's reader

def _script():
    spec = importlib.util.spec_from_file_location("ge_converter_table", ROOT / "scripts" / "ge_converter_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reader_knows_each_spelling_of_a_registration():
    # Spellings copied from the wheels: aten/index_copy.py (2.1.0.post8), aten/rand.py and
    # custom/grouped_matmul.py (2.14.0), aten/_softmax.py (inside an if).
    source = '''
@register_fx_node_ge_converter(torch.ops.aten.index_copy.default)
def conveter_aten_index_copy_default(self, dim, index, source, meta_outputs=None):
    """NB: aten::index_copy(Tensor self, int dim, Tensor index, Tensor source) -> Tensor"""
    raise NotImplementedError("torch.ops.aten.index_copy.default ge_converter is not implemented!")


@declare_supported([])
@register_fx_node_ge_converter(torch.ops.aten.scatter.src)
def conveter_aten_scatter_src(self, dim, index, src, meta_outputs=None):
    if dim < 0:
        raise NotImplementedError("negative dim")
    return ge.ScatterElements(self, index, src, axis=dim)


@register_fx_node_ge_converter(getattr(torch.ops.aten.rand, "names", None))
def conveter_aten_rand_names(size, *, names, meta_outputs=None):
    raise NotImplementedError


def conveter_npu_npu_grouped_matmul(x, weight):
    return ge.GroupedMatmul(x, weight)


gmm_reg = register_fx_node_ge_converter(torch.ops.npu.npu_grouped_matmul.default)(conveter_npu_npu_grouped_matmul)

if torch.__version__ >= "2.5":
    @register_fx_node_ge_converter(torch.ops.aten._safe_softmax.default)
    def conveter_aten_safe_softmax(self, dim, dtype=None, meta_outputs=None):
        return ge.SoftmaxV2(self, axes=[dim])


@register_fx_node_ge_converter(operator.add)
def conveter_operator_add(a, b, meta_outputs=None):
    return ge.Add(a, b)
'''
    assert _script().converters(source) == {
        "aten.index_copy.default": True, "aten.scatter.src": False, "aten.rand.names": True,
        "npu.npu_grouped_matmul.default": False, "aten._safe_softmax.default": False,
    }


def test_the_table_says_what_the_2_14_0_wheel_source_says():
    # aten/index_copy.py and aten/index_put.py only raise; aten/scatter.py and custom/scatter_update.py convert
    # (read in torch_npu-2.14.0, torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/).
    column = WHEELS.index("2.14.0")
    expected = {"aten.index_copy.default": "S", "aten.index_copy_.default": "S", "aten.index_put.default": "S",
                "aten.scatter.src": "R", "npu.scatter_update.default": "R", "npu.scatter_update_.default": "R"}
    assert {op: TABLE["ops"][op][column] for op in expected} == expected
