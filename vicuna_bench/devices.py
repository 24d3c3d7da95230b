"""Device choice, distributed backend, synchronisation: cpu, cuda, npu.

``torch_npu`` is imported only when the NPU is asked for (or probed for by
``--device auto`` where it is installed): it cannot be installed everywhere.
"""

from __future__ import annotations

import importlib.util
import platform

import torch

from .errors import UserError

DEVICE_TYPES = ("cpu", "cuda", "npu")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def _import_torch_npu():
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError as exc:
        raise UserError(f"--device npu: torch_npu cannot be imported ({exc}); install torch + torch_npu as a pair") from None


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    _import_torch_npu()
    return bool(torch.npu.is_available())


def resolve_device_type(name: str) -> str:
    """``auto`` -> npu if available, else cuda, else cpu; others are checked."""
    if name == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in DEVICE_TYPES:
        raise UserError(f"--device {name!r} is not supported (valid: auto, {', '.join(DEVICE_TYPES)})")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch on this machine")
    if name == "npu" and not npu_available():
        raise UserError("--device npu: torch_npu reports no NPU available")
    return name


def device_for_rank(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "npu":
        _import_torch_npu()
        torch.npu.set_device(local_rank)
    else:
        torch.cuda.set_device(local_rank)
    return torch.device(device_type, local_rank)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def device_name(device: torch.device) -> str:
    """Human name of the device, spaces kept (the perf CSV replaces them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"
