"""Our CPU kernels: built once per host (``-march``/``-mcpu=native``) into the cache, loaded without a compiler after.

Two ops in ``csrc/cpu_kernels.cpp``, registered as ``vicuna_bench::*`` (CPU):

* ``small_m_linear(x, weight)``: ``x @ weight.T`` for at most :data:`MAX_ROWS`
  rows of ``x``, reading each weight row from memory once for all rows (BLAS
  re-reads weight panels as the rows grow: a batch-8 decode step cost ~2x a
  batch-1 one).  It reads the model's own [out, in] weight tensor: no packed
  copy exists beside it, so eager calls and every compiled graph (where it is
  an extern kernel, called from inductor's C++ wrapper through the
  dispatcher) share one copy of the weights.  More rows (a prefill): the op
  hands the product to ``at::linear``, or in bf16 on a host without a bf16
  dot product to sgemm over fp32 blocks (:data:`FP32_GEMM`).  bf16 on AMX
  hosts: the rows in :data:`AMX_ROWS` run on AMX tiles, which read the same weight tensor (the
  weight is the tiles' A operand; only x is packed), and prefills of :data:`AMX_GEMM_ROWS` rows on the op's own
  AMX GEMM (:data:`AMX_GEMM`: one panel of weight rows at a time packed in cache, never a copy of the model).
* ``decode_attention(q, k, v, key_valid)``: a decode step's attention that
  reads only the cache slots holding tokens (SDPA reads the whole cache
  bucket under a mask), so its cost follows the filled length with one
  compiled graph for every length.

Beside them, ``small_m_fma_rate(iterations)``: the cores' fp32 FMA peak at the build's vector width, GFLOP/s, the
ceiling ``benchmarks/bench_gemm.py`` holds the products' rates against (the engine never calls it).

Other dtypes, other devices, or the library not loaded: ``F.linear`` and SDPA.  Which path each dtype and row
range takes (kernel / kernel+AMX / F.linear / fp32 GEMM / AMX GEMM) is chosen once a process in :func:`load` from
the host's flags, the kernel's ISA and the library's AMX state (:func:`choose_linear_paths`), said in one log line
and recorded (:func:`paths_record`).

Building: :func:`build` runs the host's C++ compiler once (``make setup`` does
it at install time; ``python -m vicuna_bench.cpu_kernels``), into
``<cache>/kernels/<key>/`` where the key covers the source, the torch build,
the compiler (its binary), glibc, the machine type and the CPU's flags (a
shared cache never hands one host another's instructions or libc).
:func:`load` only loads what was built; where nothing is, it builds (one log
line with the seconds) unless ``build_if_missing=False``.  A failed build is
recorded under its key (``FAILED``: the first compiler error and the path of
``build.log``, the compiler's whole output): every later process and rank
reads the record instead of compiling again, runs ``F.linear`` and SDPA, and
says so in one log line; ``python -m vicuna_bench.cpu_kernels --force`` (or
any change of the key) tries again.  A library that exists but cannot be
loaded is rebuilt once, then recorded as failed.
``VICUNA_BENCH_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import first_line
from .settings import switch_on

log = logging.getLogger("vicuna_bench")

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
MAX_ROWS = 16  # the kernel's kMaxRows: above it the op itself calls at::linear
ENV_SWITCH = "VICUNA_BENCH_CPU_KERNELS"
# The target ISA (gcc's -march): the host's own by default; tests build the AVX2 path with ``haswell``.
ENV_MARCH = "VICUNA_BENCH_CPU_MARCH"
# 0/false/off/no: build without the AMX tile path (-DVICUNA_BENCH_NO_AMX), as a compiler without AMX would; tests
# build this on every x86 host.
ENV_AMX = "VICUNA_BENCH_CPU_AMX"
LIBRARY = "libvicuna_bench_cpu.so"
FAILED = "FAILED"  # beside the library: the one-line reason this key's build failed
BUILD_LOG = "build.log"  # the compiler's command line, version and whole output, of the last build

# bf16 rows that take the AMX tiles on a host where they are usable: 3-16.  1-2 rows stay on the vector kernel, whose
# in-order weight stream (prefetched 8 KB ahead) matched or beat the tiles there (benchmarks/bench_paths.py, 5 rounds
# alternated, SmolLM2's matrices, ratio to the vector kernel: tiles 1.00 / 1.04 at M = 1 / 2, 0.93 / 0.89 / 0.70 /
# 0.45 at M = 3 / 4 / 8 / 16; docs/PERFORMANCE.md "AMX tiles for the small-M GEMM").
AMX_ROWS = (3, MAX_ROWS)
KERNEL, KERNEL_AMX, F_LINEAR = "kernel", "kernel+AMX", "F.linear"
# bf16 products of more than MAX_ROWS rows (a prefill) on a host without a bf16 dot product: x and one block (2 MiB) of
# weight rows at a time widened to fp32, BLAS sgemm, rounded to bf16 (the op's bf16_linear_in_fp32).  ATen's own bf16
# GEMM there is a dot product of widened scalars: SmolLM2's 30 layers at 256 rows, 2 threads, emulated AVX2 2136 ms
# against 274, AVX-512 without BF16 913 against 344.  With avx512_bf16 and no AMX it depends on the core: ATen's
# (oneDNN) 325 against 343 in the fifth pass, but 0.85x at::linear's time at 256 rows and 0.81x at 2048 (and 0.91x /
# 0.85x the frozen path's) in the twenty-first, under an emulation that also capped MKL and inductor; so there the
# GEMM probe --dtype auto runs decides (cpu_isa.probed_bf16_gemm: the fp32 GEMM where sgemm ran faster).
FP32_GEMM = "fp32 GEMM"
# bf16 products of AMX_GEMM_ROWS rows on AMX hosts: the op's own AMX GEMM (run_amx_gemm) on the model's weight, each
# panel of 32 weight rows packed once in cache, where at::linear has oneDNN reorder the whole weight every call.
# SmolLM2's 30 layers' products (2-core AMX host, 5 rounds alternated in one process, time / at::linear's), with the
# tile loop in blocks of k (seventeenth pass): 0.70 at 256 rows, 0.91 at 512, 0.85 at 768, 0.87-0.89 at 1024, 0.91
# at 1280, 1.21 at 1536 and 1.24 at 2048 (where the reorder is spread over more rows and oneDNN's GEMM outruns our
# tile loop: ~2.5 against ~1.9 TFLOP/s), so more rows keep F.linear.  The engine's whole first token at 256 prompt
# tokens: 0.86x the frozen path's (bench_peers, 5 rounds alternated, faster in 5 of 5; 0.94x before the k blocks,
# 1.08x with at::linear); at batch 4 (1024 rows) 0.99x (3 of 3).
AMX_GEMM = "AMX GEMM"
AMX_GEMM_ROWS = (MAX_ROWS + 1, 1024)

_lock = threading.Lock()
_state: dict = {"loaded": None, "why_not": None, "isa": None, "amx": None, "paths": None, "given_probe": None}


def enabled() -> bool:
    """False where ``VICUNA_BENCH_CPU_KERNELS`` is 0/false/off/no."""
    return switch_on(ENV_SWITCH)


class KernelBuildError(RuntimeError):
    """The library could not be built or loaded for this host; the message is one line (and recorded)."""


def _cpu_flags_text() -> str:
    from .cpu_isa import host_flags

    # The real file, not cpu_isa.CPUINFO: tests that fake another host's flags for the dtype choice keep this key
    # (an emulated host kind's flags are a key of their own).
    flags = host_flags(Path("/proc/cpuinfo"))
    return " ".join(sorted(flags)) if flags else "unknown"


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def compiler_identity(name: str) -> str:
    """The compiler binary's resolved path, size and mtime (ns): a new compiler version is a new binary, found
    without running it (the unit tier, which may not start a process, computes the key too)."""
    found = shutil.which(name)
    if found is None:
        return f"{name}: not found"
    real = os.path.realpath(found)
    try:
        st = os.stat(real)
    except OSError as err:
        return f"{real}: {err.strerror}"
    return f"{real} {st.st_size} {st.st_mtime_ns}"


def libc_version() -> str:
    """The C library the process runs on, e.g. ``glibc 2.36`` (a library linked against a newer glibc's symbol
    versions does not load on an older one)."""
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
        found = None
    return found or " ".join(platform.libc_ver()).strip() or "unknown"


def build_key() -> str:
    """Hash of what decides the binary: the source, torch's version and ABI, the compiler command and binary, glibc,
    the machine type and the CPU's flags."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(),
                 " ".join(compile_command(Path("x.so"))).encode(), compiler_identity(compiler()).encode(),
                 libc_version().encode(), platform.machine().encode(), _cpu_flags_text().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def library_path() -> Path:
    from .embedded import cache_root

    return cache_root() / "kernels" / build_key() / LIBRARY


def _target_flag() -> str:
    march = os.environ.get(ENV_MARCH)
    if march:
        return f"-march={march}"
    # gcc's -march=native exists on x86; on AArch64 and POWER -mcpu=native is the spelling that picks the host's
    # architecture and extensions and tunes for its core (gcc < 13 on AArch64 tunes -march=native for "generic").
    if platform.machine().lower() in {"aarch64", "arm64", "ppc64le", "ppc64"}:
        return "-mcpu=native"
    return "-march=native"


def compile_command(output: Path) -> list[str]:
    """The one compiler call that builds the library (torch's headers and libraries, the host's ISA)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    command = [compiler(), "-O3", _target_flag(), "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               "-fno-math-errno",  # lets the softmax's exp vectorize (glibc's libmvec)
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if not switch_on(ENV_AMX):
        command.append("-DVICUNA_BENCH_NO_AMX")
    command += [f"-I{p}" for p in include_paths()]
    command += [f"-I{sysconfig.get_paths()['include']}"]
    command += [str(SOURCE), "-o", str(output)]
    for path in library_paths():
        command += [f"-L{path}", f"-Wl,-rpath,{path}"]
    command += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return command


# gcc/clang diagnostics ("file:line:col: error: ...", "fatal error:") and the linker's own lines
# ("/usr/bin/ld: cannot find -lc10"), which come before collect2's summary "error: ld returned 1"; not the linker's
# warnings or its notes that it skipped a library of another machine type before failing to find one.
_ERROR_LINE = re.compile(r"\berror:|(^|/)ld(\.\w+)?: (?!warning|skipping incompatible)")


def first_error(output: str) -> str:
    """The first error line of a compiler's output (its last line is "compilation terminated." or a caret line);
    without one, the first line; without output, "(no output)"."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if _ERROR_LINE.search(line):
            return line
    return lines[0] if lines else "(no output)"


def build_failure() -> str | None:
    """The recorded reason this host's build (for the current key) failed, one line; None where none is recorded."""
    try:
        return (library_path().parent / FAILED).read_text(errors="replace").strip() or "(empty record)"
    except OSError:
        return None


def _record_failure(directory: Path, reason: str) -> None:
    try:
        partial = directory / f"{FAILED}.{os.getpid()}"
        partial.write_text(reason + "\n")
        os.replace(partial, directory / FAILED)
    except OSError:  # a read-only cache: this process still falls back, later ones try again
        pass


def _clear_failure(directory: Path) -> None:
    try:
        (directory / FAILED).unlink()
    except FileNotFoundError:
        pass


def _build_lock(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / "build.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # ranks starting together: one compiles, the others wait and read its outcome
    return lock


def build(force: bool = False) -> Path:
    """Compile the library for this host into the cache (atomically: a half-written library is never loaded).

    A recorded failure for this key raises :class:`KernelBuildError` without compiling, unless ``force``."""
    target = library_path()
    if not force:
        if target.exists():
            return target
        if (failed := build_failure()) is not None:
            raise KernelBuildError(failed)
    with _build_lock(target.parent):
        if not force:
            if target.exists():
                return target
            if (failed := build_failure()) is not None:
                raise KernelBuildError(failed)
        _clear_failure(target.parent)
        return _compile_into(target)


def _compiler_version(name: str) -> str:
    try:
        done = subprocess.run([name, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"({name} --version: {err})"
    return (done.stdout.strip().splitlines() or [f"({name} --version: exit {done.returncode}, no output)"])[0]


def _compile_into(target: Path) -> Path:
    started = time.perf_counter()
    directory = target.parent
    log_path = directory / BUILD_LOG
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / LIBRARY
        command = compile_command(partial)
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace")
            code, output, version = done.returncode, done.stdout + done.stderr, _compiler_version(command[0])
            status = f"exit {code}"
        except OSError as err:  # no compiler at all, or not executable: the same kind of failure, recorded
            code, version = None, "(not run)"
            output = f"cannot run the C++ compiler {command[0]!r} (set CXX): {err.strerror or err}"
            status = "not run"
        log_path.write_text(f"# {' '.join(command)}\n# compiler: {version}\n# {status}\n{output}")
        if code != 0:
            reason = (f"building {SOURCE.name} failed ({status}): {first_error(output)} "
                      f"(compiler output: {log_path})")
            _record_failure(directory, reason)
            raise KernelBuildError(reason)
        os.replace(partial, target)
    log.info("built the small-M CPU GEMM for this host in %.1f s: %s", time.perf_counter() - started, target)
    return target


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load_library(build_if_missing: bool) -> None:
    """Load the built library into this process: build it where missing, rebuild once where it cannot be loaded."""
    target = library_path()
    if (failed := build_failure()) is not None:
        raise KernelBuildError(failed)
    if not target.exists():
        if not build_if_missing:
            raise KernelBuildError(f"not built for this host ({target}); run python -m vicuna_bench.cpu_kernels")
        build()
    stamp = _stamp(target)
    try:
        torch.ops.load_library(str(target))
        return
    except OSError as err:  # e.g. built against a newer glibc, or a truncated file
        if not build_if_missing:
            raise KernelBuildError(f"{target} cannot be loaded: {first_line(err)}") from None
        first = first_line(err)
    with _build_lock(target.parent):
        if (failed := build_failure()) is not None:
            raise KernelBuildError(failed)
        if _stamp(target) == stamp:  # nobody rebuilt it meanwhile
            log.info("rebuilding the CPU kernels: %s cannot be loaded (%s)", target, first)
            _compile_into(target)
        try:
            torch.ops.load_library(str(target))
        except OSError as err:
            reason = f"{target} was rebuilt and still cannot be loaded: {first_line(err)}"
            _record_failure(target.parent, reason)
            raise KernelBuildError(reason) from None


def _register_fakes() -> None:
    """Output shapes for the compiler (it traces with fake tensors; the ops run only on real ones)."""

    def linear_fake(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def attention_fake(q, k, v, key_valid):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract  # torch >= 2.4 / 2.2
    register("vicuna_bench::small_m_linear")(linear_fake)
    register("vicuna_bench::decode_attention")(attention_fake)


@dataclasses.dataclass(frozen=True)
class LinearPaths:
    """Which path a CPU linear layer's product takes, per dtype: ``(first row, last row or None, path)`` ranges of
    the rows of x (the batch of a decode step), path one of kernel | kernel+AMX | F.linear | fp32 GEMM | AMX GEMM."""

    fp32: tuple[tuple[int, int | None, str], ...]
    bf16: tuple[tuple[int, int | None, str], ...]
    amx: str  # "usable", or why the AMX tiles are not used
    # the GEMM probe (cpu_isa.probed_bf16_gemm) that chose the bf16 prefill's path, on the hosts it runs on
    bf16_probe: object | None = None

    def amx_rows(self) -> tuple[int, int]:
        """The bf16 rows [lo, hi] on the AMX tiles; (0, 0) where none."""
        for lo, hi, path in self.bf16:
            if path == KERNEL_AMX:
                return lo, hi
        return 0, 0

    def amx_gemm_rows(self) -> int:
        """The most rows of a bf16 product on :data:`AMX_GEMM` (from :data:`MAX_ROWS` + 1); 0 where none."""
        return next((hi for _, hi, path in self.bf16 if path == AMX_GEMM), 0)

    def bf16_fp32_gemm(self) -> bool:
        """Whether bf16 products above :data:`MAX_ROWS` rows take :data:`FP32_GEMM`."""
        return any(path == FP32_GEMM for _, _, path in self.bf16)

    def describe(self) -> str:
        """e.g. ``fp32 1-16 kernel, 17+ F.linear; bf16 1-2 kernel, 3-16 kernel+AMX, 17-1024 AMX GEMM, 1025+
        F.linear``."""
        def ranges(table):
            return ", ".join(f"{lo}-{hi} {path}" if hi is not None and hi != lo else
                             f"{lo} {path}" if hi == lo else f"{lo}+ {path}" for lo, hi, path in table)

        return f"fp32 {ranges(self.fp32)}; bf16 {ranges(self.bf16)}"

    def record(self) -> dict:
        """For the environment record: each dtype's ranges as ``{"rows": "3-16", "path": ...}`` and the AMX state."""
        def rows(table):
            return [{"rows": f"{lo}-{hi}" if hi is not None else f"{lo}+", "path": path} for lo, hi, path in table]

        return {"fp32": rows(self.fp32), "bf16": rows(self.bf16), "amx": self.amx,
                "bf16_probe": self.bf16_probe.record() if self.bf16_probe is not None else None}

    def probe_said(self) -> str:
        """What the probe measured, for the log line (empty where none ran)."""
        if self.bf16_probe is None:
            return ""
        p = self.bf16_probe
        return (f"; bf16 above {MAX_ROWS} rows by a GEMM probe: bf16 {p.bf16_gflops:.0f} vs fp32 {p.fp32_gflops:.0f} "
                f"GFLOP/s")


def has_bf16_dot(flags: frozenset[str] | None, kernel_isa: str | None = None) -> bool:
    """Whether this host's bf16 GEMMs have a bf16 dot product (ATen's, through oneDNN): an AArch64 CPU listing
    ``bf16``; else not where our kernel's bf16 lane was built without one (``kernel_isa`` says ``(widened)``: the
    host's -march, or the ISA an emulation builds for); else the flags' ``amx_bf16``/``avx512_bf16``.  Flags unknown
    and no kernel word: assumed so (ATen's path is left as it is)."""
    from . import cpu_isa

    isa = cpu_isa.isa_of(flags)
    if isa == "bf16":
        return True
    if kernel_isa is not None and "(widened)" in kernel_isa.partition("bf16 ")[2]:
        return False
    return isa == cpu_isa.UNKNOWN or isa in ("amx_bf16", "avx512_bf16")


def choose_linear_paths(flags: frozenset[str] | None, kernels_why_not: str | None, amx: str,
                        kernel_isa: str | None = None, bf16_probe=None) -> LinearPaths:
    """The paths on a host with CPU ``flags`` where the kernels loaded (``kernels_why_not`` None, else why not, built
    for ``kernel_isa``) and the library said ``amx`` (``usable`` or why not): fp32 and bf16 up to :data:`MAX_ROWS`
    rows on the kernel, bf16 rows :data:`AMX_ROWS` on its AMX tiles where the flags have ``amx_bf16``/``amx_tile``
    and AMX is usable, more rows (a prefill) on ``F.linear`` (oneDNN), bf16 there on :data:`AMX_GEMM` where AMX is
    usable and on :data:`FP32_GEMM` where the host has no bf16 dot product (:func:`has_bf16_dot`) or where
    ``bf16_probe`` (:func:`vicuna_bench.cpu_isa.probed_bf16_gemm`, on hosts with a bf16 dot product but no AMX) ran
    fp32 faster."""
    if kernels_why_not is not None:
        return LinearPaths(((1, None, F_LINEAR),), ((1, None, F_LINEAR),), f"kernels not loaded: {kernels_why_not}")
    above = (MAX_ROWS + 1, None, F_LINEAR)
    fp32 = ((1, MAX_ROWS, KERNEL), above)
    dot = has_bf16_dot(flags, kernel_isa)
    has_amx = bool(flags) and {"amx_bf16", "amx_tile"} <= flags
    probe = bf16_probe if dot and not has_amx else None  # on AMX hosts oneDNN's bf16 GEMM is AMX's, no probe
    slower = probe is not None and probe.fp32_gflops > probe.bf16_gflops
    bf16_above = above if dot and not slower else (MAX_ROWS + 1, None, FP32_GEMM)
    small = ((1, MAX_ROWS, KERNEL), bf16_above)
    if not has_amx:
        why = "the CPU flags have no amx_bf16/amx_tile" if amx == "usable" else amx
        return LinearPaths(fp32, small, why, probe)
    if amx != "usable":
        return LinearPaths(fp32, small, amx)
    lo, hi = AMX_ROWS
    gemm_lo, gemm_hi = AMX_GEMM_ROWS
    bf16 = ((((1, lo - 1, KERNEL),) if lo > 1 else ()) + ((lo, hi, KERNEL_AMX), (gemm_lo, gemm_hi, AMX_GEMM))
            + ((gemm_hi + 1, None, bf16_above[2]),))
    return LinearPaths(fp32, bf16, amx)


def _amx_status() -> str:
    """The loaded library's word on AMX: ``usable``, or why not (not built, no cpuid flag, Linux refused)."""
    return torch.ops.vicuna_bench.small_m_amx()


def _set_amx_rows(lo: int, hi: int) -> bool:
    return torch.ops.vicuna_bench.small_m_set_amx_rows(lo, hi)


def _set_bf16_fp32_gemm(on: bool) -> bool:
    return torch.ops.vicuna_bench.small_m_set_bf16_fp32_gemm(on)


def _set_amx_gemm(hi: int) -> bool:
    return torch.ops.vicuna_bench.small_m_set_amx_gemm(hi)


def _host_flags() -> frozenset[str] | None:
    from .cpu_isa import host_flags

    # The real file, as for the build key: the CPU the library was built for and runs on (less what an emulated
    # host kind lacks: cpu_isa.emulation).
    return host_flags(Path("/proc/cpuinfo"))


def adopt_bf16_probe(probe) -> None:
    """Take the bf16 prefill's path from ``probe`` (the spec's ``cpu_gemm_probe``, measured where the spec was
    resolved; None: nothing measured, the unmeasured default) instead of probing in this process: a worker rank
    calls this before it loads the kernels."""
    _state["given_probe"] = (probe,)


def _bf16_probe(flags: frozenset[str] | None):
    if _state["given_probe"] is not None:
        return _state["given_probe"][0]
    from .cpu_isa import probed_bf16_gemm

    return probed_bf16_gemm(flags)


def _choose_for_this_host() -> LinearPaths:
    flags = _host_flags()
    paths = choose_linear_paths(flags, None, _amx_status(), _state["isa"], _bf16_probe(flags))
    _set_amx_rows(*paths.amx_rows())
    _set_bf16_fp32_gemm(paths.bf16_fp32_gemm())
    _set_amx_gemm(paths.amx_gemm_rows())
    return paths


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
                _load_library(build_if_missing)
                _register_fakes()
                _state["isa"] = torch.ops.vicuna_bench.small_m_isa()
            except Exception as err:  # noqa: BLE001 - any failure leaves F.linear, said once
                why = first_line(err)
        if why is None:
            try:
                _state["paths"] = _choose_for_this_host()
            except Exception as err:  # noqa: BLE001 - a library without the AMX ops (cannot happen once built)
                why = first_line(err)
        if why is not None:
            _state["paths"] = choose_linear_paths(None, why, "kernels not loaded")
        _state["amx"] = _state["paths"].amx
        _state["loaded"] = why is None
        _state["why_not"] = why
        log.info("%s", paths_line())
        return _state["loaded"]


def paths_line() -> str:
    """The one line :func:`load` says: which path each dtype and row range takes, and why (before load: that
    nothing is chosen yet)."""
    if _state["loaded"] is None:
        return "CPU linear layers: not chosen yet (the kernels are loaded on first use)"
    if not _state["loaded"]:
        return f"CPU linear layers: F.linear only (small-M GEMM unavailable: {_state['why_not']})"
    from .cpu_isa import ENV_EMULATE, emulation

    emu = emulation()
    paths = _state["paths"]
    return (f"CPU linear layers by rows of x: {paths.describe()} (kernel ISA {_state['isa']}; AMX: {paths.amx}"
            f"{paths.probe_said()})" + (f"; emulating a host with {emu.kind} ({ENV_EMULATE})" if emu else ""))


def status() -> dict:
    """For the environment record: whether the kernel is in use, its ISA paths, or why not."""
    return {"small_m_gemm": bool(_state["loaded"]), "small_m_gemm_isa": _state["isa"],
            "small_m_gemm_why_not": _state["why_not"]}


def paths_record() -> dict | None:
    """For the environment record: :meth:`LinearPaths.record` of this process's choice (None before :func:`load`)."""
    return _state["paths"].record() if _state["paths"] is not None else None


@contextlib.contextmanager
def amx_rows(lo: int, hi: int):
    """Within the block, bf16 products of ``lo``..``hi`` rows take the AMX tiles ((0, 0): none), in compiled graphs
    too (the op reads the range at each call); after it, this host's choice again.  For benchmarks that alternate
    the paths in one process.  Raises where the kernels are not loaded, or where AMX is asked for but unusable."""
    if not _state["loaded"]:
        raise RuntimeError(f"the CPU kernels are not loaded: {_state['why_not']}")
    if not _set_amx_rows(lo, hi):
        raise RuntimeError(f"AMX rows {lo}-{hi} asked for, but AMX is not usable here: {_amx_status()}")
    try:
        yield
    finally:
        _set_amx_rows(*_state["paths"].amx_rows())


@contextlib.contextmanager
def bf16_fp32_gemm(on: bool):
    """Within the block, bf16 products of more than :data:`MAX_ROWS` rows take :data:`FP32_GEMM` (or, ``on``
    False, ``F.linear``), in compiled graphs too (the op reads it at each call); after it, this host's choice again.
    For benchmarks that alternate the paths in one process.  Raises where the kernels are not loaded."""
    if not _state["loaded"]:
        raise RuntimeError(f"the CPU kernels are not loaded: {_state['why_not']}")
    _set_bf16_fp32_gemm(on)
    try:
        yield
    finally:
        _set_bf16_fp32_gemm(_state["paths"].bf16_fp32_gemm())


_EVERY_ROW = 2**62  # the AMX GEMM's row limit that no product reaches


@contextlib.contextmanager
def amx_gemm(on: bool):
    """Within the block, bf16 products of more than :data:`MAX_ROWS` rows, however many, take :data:`AMX_GEMM` (or,
    ``on`` False, ``F.linear``), in compiled graphs too (the op reads it at each call); after it, this host's choice
    again.  For benchmarks that alternate the paths in one process.  Raises where the kernels are not loaded, or
    where it is asked for and AMX is unusable."""
    if not _state["loaded"]:
        raise RuntimeError(f"the CPU kernels are not loaded: {_state['why_not']}")
    if not _set_amx_gemm(_EVERY_ROW if on else 0):
        raise RuntimeError(f"the AMX GEMM asked for, but AMX is not usable here: {_amx_status()}")
    try:
        yield
    finally:
        _set_amx_gemm(_state["paths"].amx_gemm_rows())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: the small-M kernel on CPU for fp32/bf16 when loaded, else ``F.linear``.

    The choice depends only on device and dtype (never on the row count, so a
    dynamic-shape prefill graph gets no guard on its length): the op itself
    takes more than :data:`MAX_ROWS` rows to the host's prefill path (``at::linear``,
    :data:`FP32_GEMM` or :data:`AMX_GEMM`).
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
    """``python -m vicuna_bench.cpu_kernels [--force] [--strict]``: build for this host and load it once.

    Exit 0 where the build fails (the kernels are an optimisation: one line says why and F.linear/SDPA run),
    1 then with ``--strict``."""
    import argparse

    parser = argparse.ArgumentParser(description="Build vicuna-bench's CPU kernels for this host.")
    parser.add_argument("--force", action="store_true", help="rebuild even where a build or a failed one is recorded")
    parser.add_argument("--strict", action="store_true", help="exit 1 where the kernels cannot be built or loaded")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 1 if ns.strict else 0
    try:
        target = build(force=ns.force)
    except (KernelBuildError, OSError) as err:
        retry = "; recorded for this host, --force tries again" if isinstance(err, KernelBuildError) else ""
        print(f"vicuna-bench: CPU kernels not built, F.linear and SDPA run instead: {first_line(err)}{retry}",
              file=sys.stderr)
        return failed
    if not load():  # said why in one line; a library that cannot be loaded was rebuilt once there
        return failed
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
