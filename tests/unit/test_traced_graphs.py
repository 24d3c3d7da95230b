"""Dynamo's traced graphs are freed once compiled (``compile.drop_traced_graphs``).

torch's ``aot_module_simplified`` (torch/_functorch/aot_autograd.py, 2.13)
sets ``forward.zero_grad = mod.zero_grad`` (and ``named_parameters``,
``named_buffers``) on the forward it returns, and dynamo installs that forward,
under wrappers that copy its ``__dict__``, in the compiled function's globals.
The backend here is AOTAutograd with a plain forward compiler, so dynamo's own
graph is only what that function holds; the recording backend keeps a weak
reference to it, an observation independent of the code under test.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vicuna_bench.compile import drop_traced_graphs

pytestmark = pytest.mark.unit


def twice_plus_one(x):
    return x * 2 + 1


def _recording_backend(traced: list):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backend(gm, example_inputs):
        traced.append(weakref.ref(gm))
        return aot_autograd(fw_compiler=lambda graph, _: make_boxed_func(graph.forward))(gm, example_inputs)

    return backend


def test_the_graph_dynamo_traced_is_freed_and_the_compiled_code_still_runs():
    traced: list = []
    compiled = torch.compile(twice_plus_one, backend=_recording_backend(traced), fullgraph=True, dynamic=False)
    x = torch.arange(5.0)
    with torch.inference_mode():
        assert torch.equal(compiled(x), torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]))
    gc.collect()
    assert len(traced) == 1 and traced[0]() is not None  # torch holds it: what the function is for

    assert drop_traced_graphs(globals()) > 0
    assert traced[0]() is None
    with torch.inference_mode():
        assert torch.equal(compiled(x), torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]))
    assert len(traced) == 1  # no recompile: the installed code runs as before
    assert drop_traced_graphs(globals()) == 0  # nothing left to drop


def test_a_namespace_without_compiled_code_is_left_alone():
    namespace = {"__compiled_fn_like": None, "f": twice_plus_one, "x": 1}
    assert drop_traced_graphs(namespace) == 0
    assert namespace == {"__compiled_fn_like": None, "f": twice_plus_one, "x": 1}
