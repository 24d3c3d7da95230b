"""Our CPU kernels applied to a built model, the way ``sharding`` applies tensor parallelism: one pass.

:func:`apply_cpu_kernels` turns every ``nn.Linear`` of a :class:`vicuna_bench.model.Transformer` into a
:class:`KernelLinear` (the same weight tensor, the small-M GEMM of :mod:`vicuna_bench.cpu_kernels`) and gives
every attention the kernel's decode attention for the static decode step.  Each falls back to ``F.linear`` / the
module's own ``attend`` where the kernels do not take a tensor (another device or dtype, the library not loaded).
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .model import Attention


class KernelLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose product is :func:`vicuna_bench.cpu_kernels.linear`.

    A decode step's few rows go through the small-M GEMM that streams the weight once for all rows; eager calls
    and compiled graphs read this same ``weight`` tensor (no packed copy).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight)


def kernel_decode_attention(attention: Attention):
    """``attention``'s decode-step attention (q [B, H, 1, D], ``mask`` [B, 1, 1, L]): the kernel, reading only the
    cache slots that hold tokens, where it takes ``q``; else the module's own ``attend``, looked up per call (a
    later pass, such as npu_graph's, may swap that one)."""

    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.handles(q):
            return cpu_kernels.decode_attention(q, k, v, mask.reshape(q.shape[0], mask.shape[-1]))
        return attention.attend(q, k, v, mask)

    decode_attention.kernel_pass = True
    return decode_attention


def is_kernel(fn) -> bool:
    """Whether ``fn`` (an attention's ``attend_decode``) is the pass's."""
    return getattr(fn, "kernel_pass", False)


def apply_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap our CPU kernels into ``model`` in place (idempotent); returns it.

    The linear layers change class, not tensors: tied weights stay one tensor and the loader's views into the
    fused projections stay valid, before or after the weights are loaded.
    """
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = KernelLinear
        elif isinstance(module, Attention) and not is_kernel(module.attend_decode):
            module.attend_decode = kernel_decode_attention(module)
    return model
