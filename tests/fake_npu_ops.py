"""torch_npu's ``npu::scatter_update`` and ``npu::scatter_update_`` on CPU, for tracing the NPU's GE decode graph.

Schemas as in torch_npu's ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` (2.1.0.post8 to
2.14.0).  Semantics of the CANN Scatter op both run (torchair's ``ge_converter/custom/scatter_update.py``),
from hicann/ops-nn ``index/scatter/README.md``, 1-D ``indices``: ``data[i, ..., indices[i] + k, ...] =
updates[i, ..., k, ...]`` along ``axis``.  The in-place op is functionalized the way torchgen's kernels (and
libtorch_npu's ``at_npu::functionalization::scatter_update_``) do it: the functional op, then the result
replaces the input.
"""

from __future__ import annotations

import torch

_LIBRARY: list = []


def scatter_update_reference(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor,
                             axis: int) -> torch.Tensor:
    """Scatter's 1-D-indices case, in place on ``data``."""
    length = updates.shape[axis]
    for row in range(indices.shape[0]):
        data[row].narrow(axis if axis < 0 else axis - 1, int(indices[row]), length).copy_(updates[row])
    return data


def _functionalize(data, indices, updates, axis):
    for t in (data, indices, updates):
        torch._sync(t)
    plain = [torch._from_functional_tensor(t) for t in (data, indices, updates)]
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize)):
        out = torch.ops.npu.scatter_update(*plain, axis)
    torch._functionalize_replace(data, out)
    torch._functionalize_commit_update(data)
    torch._sync(data)
    return data


def register() -> None:
    """Define the two ops in this process, once (torch_npu absent: its ``npu`` namespace is free)."""
    if _LIBRARY:
        return
    lib = torch.library.Library("npu", "DEF")
    lib.define("scatter_update(Tensor self, Tensor indices, Tensor updates, int axis) -> Tensor")
    lib.define("scatter_update_(Tensor(a!) self, Tensor indices, Tensor updates, int axis) -> Tensor(a!)")
    lib.impl("scatter_update", lambda d, i, u, a: scatter_update_reference(d.clone(), i, u, a),
             "CompositeExplicitAutograd")
    lib.impl("scatter_update_", scatter_update_reference, "CompositeExplicitAutograd")
    lib.impl("scatter_update", lambda d, i, u, a: torch.empty_like(d), "Meta")  # op_plugin/meta/_meta_registrations.py
    lib.impl("scatter_update_", lambda d, i, u, a: d, "Meta")
    lib.impl("scatter_update_", _functionalize, "Functionalize")
    _LIBRARY.append(lib)
