"""Device choice, distributed backend, synchronisation: cpu, cuda, npu.

``torch_npu`` is imported only when the NPU is asked for (or probed for by
``--device auto`` where it is installed): it cannot be installed everywhere,
and the front ends turn torch's own autoload of it off
(:mod:`vicuna_bench.torch_autoload`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import sys

import torch

from . import cpu_isa, torch_autoload
from .errors import UserError
from .torch_autoload import AUTOLOAD_ENV

log = logging.getLogger("vicuna_bench")

DEVICES = ("cpu", "cuda", "npu")  # --device (auto resolves to one of them)
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# NPU chip families (the vendor's DEVICE_TYPE): the dtypes each runs.  The
# 310P has no bf16 (Huawei's own model code sets support_bf16 = False there)
# and its cube unit no fp32 (CANN's aclnn matmul docs: "Atlas inference
# products: the Cube unit does not support FLOAT32", only a cast to fp16).
CHIP_FAMILIES = {
    "d9": ("Atlas 800I A2 (Ascend 910B)", ("fp16", "bf16", "fp32")),
    "d3": ("Atlas 300I DUO (Ascend 310P)", ("fp16",)),
}
CHIP_CHOICES = ("auto", *CHIP_FAMILIES)  # --device-type: auto = detected from the NPU's name

# Environment that changes NPU behaviour or timings (shared/spec/NPU.md):
# recorded with every result so two runs can be compared honestly.
NPU_TIMING_ENV = (
    "TASK_QUEUE_ENABLE",
    "CPU_AFFINITY_CONF",
    "PYTORCH_NPU_ALLOC_CONF",
    "HCCL_CONNECT_TIMEOUT",
    "HCCL_EXEC_TIMEOUT",
    "HCCL_BUFFSIZE",
    "ASCEND_RT_VISIBLE_DEVICES",
)
CUDA_TIMING_ENV = ("CUDA_VISIBLE_DEVICES",)

# torch_npu's own import sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 and only its autoload entry point puts the old value
# back (torch_npu/__init__.py, 2.5.1 on): the value torch saw is the one read before this module imports torch_npu.
_AUTOLOAD_SEEN = os.environ.get(AUTOLOAD_ENV)
_imported_here = None  # the torch_npu module this module imported itself (None: not imported by us)


def _import_torch_npu(option: str = "--device npu"):
    global _imported_here
    loaded_before = sys.modules.get("torch_npu") is not None
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except Exception as exc:  # noqa: BLE001  (a broken install raises ImportError, OSError, RuntimeError...)
        failure = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{option}: torch_npu is installed but cannot be imported ({type(exc).__name__}: {failure}); "
                        f"install torch + torch_npu as a pair, or pass --device cpu|cuda") from None
    if not loaded_before:
        _imported_here = torch_npu


def torch_npu_loaded_by() -> str | None:
    """How torch_npu came into this process: ``import`` (by this module, on purpose), ``autoload`` (already there:
    torch's backend autoload, or the caller), None (not loaded)."""
    module = sys.modules.get("torch_npu")
    if module is None:
        return None
    return "import" if module is _imported_here else "autoload"


def torch_npu_installed() -> bool:
    """Whether torch_npu is installed: importable by name, or known to the package metadata."""
    if importlib.util.find_spec("torch_npu") is not None:
        return True
    for name in ("torch_npu", "torch-npu"):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def npu_available(option: str = "--device npu") -> bool:
    """Whether an NPU is usable; torch_npu installed but failing to import is a UserError naming the failure."""
    if not torch_npu_installed():
        return False
    _import_torch_npu(option)
    return bool(torch.npu.is_available())


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """The device type a run uses and why (one line for stderr)."""

    device: str  # cpu | cuda | npu
    reason: str


def select_device(name: str) -> DeviceChoice:
    """``auto`` -> npu if available, else cuda, else cpu, with the reason; other names are checked.

    A torch_npu that is installed but fails to import is a UserError naming
    the failure: falling back to another device would hide a broken NPU host.
    """
    if name != "auto":
        return DeviceChoice(resolve_device(name), f"--device {name}")
    if not torch_npu_installed():
        npu_note = "torch_npu is not installed"
    else:
        if npu_available("--device auto"):
            return DeviceChoice("npu", f"--device auto: npu ({_count('npu')} visible through torch_npu)")
        npu_note = "torch_npu reports no NPU"
    if torch.cuda.is_available():
        return DeviceChoice("cuda", f"--device auto: cuda ({_count('cuda')} visible; {npu_note})")
    return DeviceChoice("cpu", f"--device auto: cpu (no CUDA device; {npu_note})")


def _count(device: str) -> str:
    try:
        n = (torch.npu if device == "npu" else torch.cuda).device_count()
    except Exception:  # a count is only decoration in a message
        return "devices"
    return f"{n} device{'s' if n != 1 else ''}"


def resolve_device(name: str) -> str:
    """``auto`` -> npu if available, else cuda, else cpu (announced on the log); others are checked.

    In a process our front end started, a run resolved to cpu or cuda keeps torch_npu out from then on
    (:func:`vicuna_bench.torch_autoload.keep_torch_npu_out`).
    """
    if name in ("auto", "npu"):
        torch_autoload.let_torch_npu_in()
    device = _resolve_device(name)
    if device != "npu" and torch_autoload.is_front_end():
        torch_autoload.keep_torch_npu_out()
    return device


def _resolve_device(name: str) -> str:
    if name == "auto":
        choice = select_device(name)
        log.info("%s", choice.reason)
        return choice.device
    if name not in DEVICES:
        raise UserError(f"--device {name!r} is not supported (valid: auto, {', '.join(DEVICES)})")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch on this machine")
    if name == "npu" and not npu_available():
        raise UserError("--device npu: torch_npu reports no NPU available")
    return name


def check_chip(chip: str) -> str:
    """A valid NPU chip family name (``d9`` | ``d3``), else a UserError."""
    if chip not in CHIP_FAMILIES:
        valid = ", ".join(f"{k} = {v[0]}" for k, v in CHIP_FAMILIES.items())
        raise UserError(f"--device-type {chip!r} is not supported (valid: {valid})")
    return chip


def check_dtype_for_chip(device: str, chip: str | None, dtype_name: str, requested: str | None = None) -> None:
    """Refuse a dtype the NPU chip family cannot run (bf16 on d3); other devices ignore the chip family.

    ``dtype_name`` is the resolved dtype; ``requested`` what the user asked
    for (``auto``), named in the message when it differs.
    """
    if chip is None:
        return
    check_chip(chip)
    if device != "npu":
        return
    product, dtypes = CHIP_FAMILIES[chip]
    if dtype_name not in dtypes:
        how = f"--dtype {requested} resolved to {dtype_name}" if requested and requested != dtype_name else f"--dtype {dtype_name}"
        raise UserError(
            f"{how} is not supported on --device-type {chip} ({product} runs {', '.join(dtypes)} only): pass --dtype {dtypes[0]}"
        )


def resolve_chip_family(device: str, requested: str = "auto", device_index: int = 0) -> str | None:
    """The NPU chip family a run uses (d9 | d3), from the name of NPU ``device_index`` (:func:`npu_chip_name`).

    ``requested`` is ``--device-type``: ``auto`` takes the detected family
    (None for a chip that is neither a 910B nor a 310P); d9/d3 that
    contradicts the chip is a UserError.  Off NPU nothing is detected:
    ``auto`` gives None, d9/d3 are carried as given.  ``device_index`` is
    the device this process runs on (or, for a process that starts the
    ranks, rank 0's): where torch_npu cannot read a name without a runtime
    context, that context is made there and nowhere else.
    """
    if requested not in CHIP_CHOICES:
        valid = ", ".join(["auto (detected)"] + [f"{k} = {v[0]}" for k, v in CHIP_FAMILIES.items()])
        raise UserError(f"--device-type {requested!r} is not supported (valid: {valid})")
    if device != "npu":
        return None if requested == "auto" else requested
    try:
        name = npu_chip_name(device_index)
    except Exception as exc:  # noqa: BLE001  (a name is what detection needs, not what the run needs)
        log.info("--device-type %s: the NPU's name cannot be read (%s); no chip family detected", requested, exc)
        return None if requested == "auto" else requested
    detected = chip_family_of(name)
    if requested == "auto":
        if detected is None:
            log.info("--device-type auto: %s is neither a 910B (d9) nor a 310P (d3); no chip rule applies", name)
        return detected
    if detected is not None and detected != requested:
        raise UserError(f"--device-type {requested} contradicts NPU {device_index}: {name} is {detected} "
                        f"({CHIP_FAMILIES[detected][0]}); pass --device-type {detected} or auto")
    return requested


# torch_npu 2.1.x: get_device_name (and get_device_properties, get_soc_version) calls _lazy_init, which brings the
# runtime up on the *current* device: NPU 0 in every process that has not called set_device.  From 2.5.1
# get_device_name returns the SoC name without initialising (torch_npu/npu/__init__.py); get_device_properties
# still initialises.
NAME_WITHOUT_CONTEXT_FROM = (2, 5, 1)


def torch_npu_release() -> tuple[int, int, int] | None:
    """The installed torch_npu's release as (major, minor, patch) (``2.1.0.post10`` -> (2, 1, 0)); None if unknown."""
    version = _package_version("torch_npu") or _package_version("torch-npu") or ""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def npu_chip_name(index: int) -> str:
    """The name of NPU ``index`` (``Ascend910B3``); a runtime context, where reading it needs one, is made on ``index``.

    ``set_device(index)`` comes first where torch_npu would otherwise initialise the current device (NPU 0) to
    read a name: under torchrun that is the rank's own device, which it is about to use anyway.
    """
    npu = torch.npu
    release = torch_npu_release()
    initialised = bool(getattr(npu, "is_initialized", lambda: False)())
    if not initialised and (release is None or release < NAME_WITHOUT_CONTEXT_FROM):
        npu.set_device(index)
    return npu.get_device_name(index)


def npu_auto_dtype(chip: str | None, checkpoint_dtype: str) -> str:
    """``--dtype auto`` on an NPU: the checkpoint's fp16/bf16 where the chip runs it, else fp16; never fp32.

    d3 (310P) runs fp16 only; fp16 is also what the vendor runs Llama-2 in on both chips, and an fp32 checkpoint
    (or one of no stated dtype) would halve the speed of a decode bound by memory.  A change says so in one line.
    """
    runs = CHIP_FAMILIES[chip][1] if chip in CHIP_FAMILIES else ("fp16", "bf16")
    if checkpoint_dtype in ("fp16", "bf16") and checkpoint_dtype in runs:
        return checkpoint_dtype
    where = f"{chip} ({CHIP_FAMILIES[chip][0]})" if chip in CHIP_FAMILIES else "this NPU"
    log.info("--dtype auto: the checkpoint is %s; running fp16 on %s", checkpoint_dtype, where)
    return "fp16"


# Operator compile mode (torch.npu.set_compile_mode): jit_compile=True compiles each operator for its shapes at
# first use, False runs the prebuilt binary kernels (compiling only where none exists).  Huawei's torch_npu API
# reference (Ascend Extension for PyTorch 7.0.0, set_compile_mode) gives the defaults: False on Atlas A2/A3 (d9),
# True on Atlas training and inference series (d3).  Its tuning guide (CANN 7.0.0 PyTorch migration guide,
# "operator binary tuning") recommends False where shapes change and True only for fixed shapes.  The engine's
# shapes change with every prompt length and batch, and a first token must not time a compile: off on both.
JIT_COMPILE_CHOICES = ("auto", "on", "off")
AUTO_JIT_COMPILE = {"d9": "off", "d3": "off"}


def resolve_jit_compile(device: str, chip: str | None, requested: str = "auto") -> str | None:
    """The NPU operator compile mode a run uses: ``on`` | ``off`` (:data:`AUTO_JIT_COMPILE` for auto); None off NPU."""
    if requested not in JIT_COMPILE_CHOICES:
        raise UserError(f"--npu-jit-compile {requested!r} is not supported (valid: {', '.join(JIT_COMPILE_CHOICES)})")
    if device != "npu":
        return None
    return AUTO_JIT_COMPILE.get(chip or "", "off") if requested == "auto" else requested


_made_current: int | None = None  # the NPU device_for_rank made this process's current one


def npu_jit_compile_now(index: int | None = None) -> str | None:
    """This process's NPU operator compile mode read back from torch_npu (``on`` | ``off``).

    Read where the runtime is up, or where ``index`` is the device this process made current (reading brings the
    runtime up on the current device: ``is_jit_compile_false`` calls ``_lazy_init``); None otherwise.
    """
    npu = getattr(torch, "npu", None)
    if npu is None or not hasattr(npu, "is_jit_compile_false"):
        return None
    if not npu.is_initialized() and (index is None or index != _made_current):
        return None
    return "off" if npu.is_jit_compile_false() else "on"


def check_rank_chip(device: str, chip: str | None, index: int) -> None:
    """Inside a rank, after ``set_device(index)``: NPU ``index`` must be of the run's chip family ``chip``."""
    if device == "npu" and chip is not None:
        resolve_chip_family(device, chip, index)


def dtype_skip_reason(device: str, chip: str | None, dtype_name: str) -> str | None:
    """Why ``dtype_name`` cannot run on this device's chip family (None: it can, or no chip rule applies)."""
    if device != "npu" or chip not in CHIP_FAMILIES:
        return None
    product, dtypes = CHIP_FAMILIES[chip]
    if dtype_name in dtypes:
        return None
    return f"{chip} ({product}) runs {', '.join(dtypes)} only, not {dtype_name}"


def chip_family_of(name: str) -> str | None:
    """The chip family of an NPU name (``Ascend910B3`` -> d9, ``Ascend310P3`` -> d3), None if unknown."""
    compact = re.sub(r"[\s_-]", "", name).lower()
    if "910b" in compact:
        return "d9"
    if "310p" in compact:
        return "d3"
    return None


def device_for_rank(device: str, local_rank: int, jit_compile: str | None = None) -> torch.device:
    """Make device ``local_rank`` this process's current one; on NPU set the operator compile mode ``jit_compile``
    (``on`` | ``off``; None leaves it) right after, before any operator runs."""
    global _made_current
    if device == "cpu":
        return torch.device("cpu")
    if device == "npu":
        _import_torch_npu()
        torch.npu.set_device(local_rank)
        _made_current = local_rank
        if jit_compile is not None:
            torch.npu.set_compile_mode(jit_compile=jit_compile == "on")
    else:
        torch.cuda.set_device(local_rank)
    return torch.device(device, local_rank)


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


def device_name_of(device: str, index: int = 0) -> str:
    """Human name of device ``index`` of a type: ``torch.npu``/``torch.cuda.get_device_name``, the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name(index)
    if device == "npu":
        return npu_chip_name(index)
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


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_record(device: str, device_index: int = 0, cpu_dtype_auto=None) -> dict:
    """The device's part of the environment record (:func:`vicuna_bench.environment.environment_record` adds the
    energy meter, torchair and our CPU kernels): device name and NPU chip family, the host CPU's matrix ISA,
    torch / torch_npu / CUDA versions, timing env vars.

    ``cpu_dtype_auto``: the spec's :class:`vicuna_bench.cpu_isa.CpuDtypeChoice` where ``--dtype auto`` chose the
    CPU dtype (recorded with the probe's GFLOP/s); None: the dtype was given, or the device is an accelerator.

    ``device_index`` names the device (this rank's).  Environment variables
    that are unset are recorded as None (their default applies).
    ``torch_npu_loaded_by`` (:func:`torch_npu_loaded_by`) and
    ``torch_device_backend_autoload`` (the variable as torch saw it) say
    whether torch_npu came in on purpose; ``npu_jit_compile`` is the operator
    compile mode read back (NPU, once the device is up; None otherwise).
    ``torchair`` and ``energy`` are None here, filled in by the caller.
    """
    if device == "npu":
        _import_torch_npu()
    name = device_name_of(device, device_index)
    names = NPU_TIMING_ENV if device == "npu" else CUDA_TIMING_ENV if device == "cuda" else ()
    return {
        "device_type": device,
        "device_name": name,
        "chip_family": chip_family_of(name) if device == "npu" else None,
        "torch": torch.__version__,
        "torch_npu": _package_version("torch_npu") if device == "npu" else None,
        "torchair": None,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "torch_npu_loaded_by": torch_npu_loaded_by(),
        "torch_device_backend_autoload": _AUTOLOAD_SEEN,
        "npu_jit_compile": npu_jit_compile_now(device_index) if device == "npu" else None,
        "python": platform.python_version(),
        **cpu_isa.isa_record(cpu_isa.host_flags()),
        "cpu_emulated": cpu_isa.emulation_record(),
        "cpu_dtype_auto": cpu_dtype_auto.record() if cpu_dtype_auto is not None else None,
        "energy": None,
        "env": {k: os.environ.get(k) for k in names},
    }


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


def proc_status_bytes(field: str) -> int | None:
    """A size from ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak) in bytes; None off Linux."""
    return proc_file_bytes("/proc/self/status", field)


def proc_file_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` size from a /proc file (``/proc/meminfo``, ``/proc/self/status``) in bytes; None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device`` since :func:`reset_peak_memory`.

    Accelerators: bytes allocated by torch.  CPU: peak resident set of the
    whole process (weights, KV cache, activations, and the Python runtime).
    """
    if device.type in ("cuda", "npu"):
        return int(_device_module(device).max_memory_allocated(device))
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
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
