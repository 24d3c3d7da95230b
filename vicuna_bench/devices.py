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
    return cpu_model_name()


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = " ".join(line.split(":", 1)[1].split())
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ---------------------------------------------------------------- memory

def _device_module(device: torch.device):
    return torch.cuda if device.type == "cuda" else getattr(torch, "npu", None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window for this process on ``device``.

    Accelerators: the allocator's peak.  CPU: the kernel's resident-set high
    water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` on Linux.
    """
    if device.type in ("cuda", "npu"):
        _device_module(device).reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process life


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device`` since :func:`reset_peak_memory`.

    Accelerators: bytes allocated by torch.  CPU: peak resident set of the
    whole process (weights, KV cache, activations, and the Python runtime).
    """
    if device.type in ("cuda", "npu"):
        return int(_device_module(device).max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory bandwidth of ``device`` in bytes/s by a copy probe (best of ``repeats``).

    Copies an ``nbytes`` buffer (far larger than any cache) into another and
    counts the bytes read plus the bytes written, as STREAM's copy does.
    """
    import time

    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best
