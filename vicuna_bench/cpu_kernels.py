"""Our CPU kernels: built once per host (``-march=native``) into the cache, loaded without a compiler after that.

Two ops in ``csrc/cpu_kernels.cpp``, registered as ``vicuna_bench::*`` (CPU):

* ``small_m_linear(x, weight)``: ``x @ weight.T`` for at most :data:`MAX_ROWS`
  rows of ``x``, reading each weight row from memory once for all rows (BLAS
  re-reads weight panels as the rows grow: a batch-8 decode step cost ~2x a
  batch-1 one).  It reads the model's own [out, in] weight tensor: no packed
  copy exists beside it, so eager calls and every compiled graph (where it is
  an extern kernel, called from inductor's C++ wrapper through the
  dispatcher) share one copy of the weights.  More rows (a prefill): the op
  hands the product to ``at::linear``.
* ``decode_attention(q, k, v, key_valid)``: a decode step's attention that
  reads only the cache slots holding tokens (SDPA reads the whole cache
  bucket under a mask), so its cost follows the filled length with one
  compiled graph for every length.

Other dtypes, other devices, or the library not loaded: ``F.linear`` and SDPA.

Building: :func:`build` runs the host's C++ compiler once (``make setup`` does
it at install time; ``python -m vicuna_bench.cpu_kernels``), into
``<cache>/kernels/<key>/`` where the key covers the source, the torch build
and the CPU's flags (a shared cache never hands one host another's
instructions).  :func:`load` only loads what was built; where nothing is,
it builds (one log line with the seconds) unless ``build=False``; where
building fails (no compiler, an unsupported ISA), ``F.linear`` is used and
one log line says why.  ``VICUNA_BENCH_CPU_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("vicuna_bench")

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
MAX_ROWS = 16  # the kernel's kMaxRows: above it the op itself calls at::linear
ENV_SWITCH = "VICUNA_BENCH_CPU_KERNELS"
# The target ISA (gcc's -march): the host's own by default; tests build the AVX2 path with ``haswell``.
ENV_MARCH = "VICUNA_BENCH_CPU_MARCH"
LIBRARY = "libvicuna_bench_cpu.so"

_lock = threading.Lock()
_state: dict = {"loaded": None, "why_not": None, "isa": None}


def enabled() -> bool:
    """False where ``VICUNA_BENCH_CPU_KERNELS`` is 0/false/off/no."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "off", "no"}


def _cpu_flags_text() -> str:
    from .cpu_isa import read_cpu_flags

    flags = read_cpu_flags()
    return " ".join(sorted(flags)) if flags else "unknown"


def build_key() -> str:
    """Hash of what decides the binary: the source, torch's version and ABI, the compiler flags, the CPU's flags."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(),
                 " ".join(compile_command(Path("x.so"))).encode(), _cpu_flags_text().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def library_path() -> Path:
    from .embedded import cache_root

    return cache_root() / "kernels" / build_key() / LIBRARY


def compile_command(output: Path) -> list[str]:
    """The one compiler call that builds the library (torch's headers and libraries, the host's ISA)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX", "c++")
    march = os.environ.get(ENV_MARCH, "native")
    command = [compiler, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               "-fno-math-errno",  # lets the softmax's exp vectorize (glibc's libmvec)
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += [f"-I{p}" for p in include_paths()]
    command += [f"-I{sysconfig.get_paths()['include']}"]
    command += [str(SOURCE), "-o", str(output)]
    for path in library_paths():
        command += [f"-L{path}", f"-Wl,-rpath,{path}"]
    command += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return command


def build(force: bool = False) -> Path:
    """Compile the library for this host into the cache (atomically: a half-written library is never loaded)."""
    target = library_path()
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks starting together: one compiles, the others wait and load
        if target.exists() and not force:
            return target
        return _compile_into(target)


def _compile_into(target: Path) -> Path:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / LIBRARY
        done = subprocess.run(compile_command(partial), capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling {SOURCE.name} failed (exit {done.returncode}): {last}")
        os.replace(partial, target)
    log.info("built the small-M CPU GEMM for this host in %.1f s: %s", time.perf_counter() - started, target)
    return target


def _register_fakes() -> None:
    """Output shapes for the compiler (it traces with fake tensors; the ops run only on real ones)."""

    def linear_fake(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def attention_fake(q, k, v, key_valid):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract  # torch >= 2.4 / 2.2
    register("vicuna_bench::small_m_linear")(linear_fake)
    register("vicuna_bench::decode_attention")(attention_fake)


def load(build_if_missing: bool = True) -> bool:
    """Load the library once per process; True when ``small_m_linear`` is usable (else one log line said why)."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        why = None
        if not enabled():
            why = f"{ENV_SWITCH}=0"
        elif not hasattr(torch.library, "register_fake") and not hasattr(torch.library, "impl_abstract"):
            why = f"torch {torch.__version__} cannot describe a custom op's output shape to the compiler"
        else:
            try:
                target = library_path()
                if not target.exists():
                    if not build_if_missing:
                        raise RuntimeError(f"not built for this host ({target}); run python -m vicuna_bench.cpu_kernels")
                    build()
                torch.ops.load_library(str(target))
                _register_fakes()
                _state["isa"] = torch.ops.vicuna_bench.small_m_isa()
            except Exception as err:  # noqa: BLE001 - any failure leaves F.linear, said once
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
        _state["loaded"] = why is None
        _state["why_not"] = why
        if why is None:
            log.info("CPU linear layers: small-M GEMM for <= %d rows (%s), F.linear above", MAX_ROWS, _state["isa"])
        else:
            log.info("CPU linear layers: F.linear only (small-M GEMM unavailable: %s)", why)
        return _state["loaded"]


def status() -> dict:
    """For the environment record: whether the kernel is in use, its ISA paths, or why not."""
    return {"small_m_gemm": bool(_state["loaded"]), "small_m_gemm_isa": _state["isa"],
            "small_m_gemm_why_not": _state["why_not"]}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: the small-M kernel on CPU for fp32/bf16 when loaded, else ``F.linear``.

    The choice depends only on device and dtype (never on the row count, so a
    dynamic-shape prefill graph gets no guard on its length): the op itself
    hands more than :data:`MAX_ROWS` rows to ``at::linear``.
    """
    if handles(x) and x.dtype == weight.dtype:
        return torch.ops.vicuna_bench.small_m_linear(x, weight)
    return F.linear(x, weight)


def handles(x: torch.Tensor) -> bool:
    """True where our CPU kernels take ``x``: the library loaded, a CPU tensor, fp32 or bf16."""
    return bool(_state["loaded"]) and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """One query token per row ``q`` [B, H, 1, D] over the cache ``k``/``v`` [B, Hkv, L, D] where ``key_valid``
    [B, L] is set, reading only those slots (callers check :func:`handles` first).  A row with no valid slot
    gives zeros, where SDPA gives NaN."""
    return torch.ops.vicuna_bench.decode_attention(q, k, v, key_valid)


def main(argv=None) -> int:
    """``python -m vicuna_bench.cpu_kernels [--force]``: build for this host and print where."""
    import argparse

    parser = argparse.ArgumentParser(description="Build vicuna-bench's CPU kernels for this host.")
    parser.add_argument("--force", action="store_true", help="rebuild even where a build exists")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(build(force=ns.force))
    except RuntimeError as err:
        print(f"vicuna-bench: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
