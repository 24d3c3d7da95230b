"""The host CPU's matrix ISA (from ``/proc/cpuinfo``: ``flags`` on x86, ``Features`` on AArch64) and the dtype
``--dtype auto`` runs on it.

The rule (docs/PERFORMANCE.md, "CPU dtype by host"):

* ``amx_bf16``: bf16 (AMX bf16 GEMMs far outrun fp32 and a decode step reads half the bytes);
* no ``avx512_bf16`` (AVX2 or plain AVX-512 only): fp32 (bf16 GEMMs are emulated, several times slower);
* ``avx512_bf16`` without AMX, or AArch64 with ``bf16`` (BFMMLA/BFDOT): a measured probe decides
  (:func:`gemm_probe`, a prefill-shaped GEMM in both dtypes); bf16 only when it is faster;
* AArch64 without ``bf16`` (``asimd``/``sve`` only, e.g. Kunpeng 920): fp32 (no bf16 arithmetic instructions);
* flags unknown (not Linux, unreadable): fp32, the dtype that is never the slow one by much.

The choice is made once per process (:func:`cpu_auto_dtype`), in the process that resolves the engine
spec; worker ranks inherit the resolved dtype name and the probe's figures through the spec.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch

from .errors import UserError
from .launch import launched_by_torchrun

log = logging.getLogger("vicuna_bench")

CPUINFO = Path("/proc/cpuinfo")

# The flags that decide the CPU dtype, best first (x86, then AArch64's hwcap names); the record lists those present.
ISA_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "bf16", "sve", "asimd")
X86_ISAS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
AARCH64_ISAS = ("bf16", "sve", "asimd")  # Linux's AArch64 names: asimd (NEON) is present on every ARMv8-A host
# The keys of /proc/cpuinfo's feature line: x86's "flags", AArch64's "Features".
FLAG_KEYS = ("flags", "Features")
UNKNOWN = "unknown"

# The probe's GEMM: [PROBE_M x PROBE_K] @ [PROBE_K x PROBE_N], a 256-token prefill through a 2048-wide
# projection (Llama-2/SmolLM2-class hidden sizes): 2*M*K*N = 2.15 GFLOP a call.
PROBE_M, PROBE_K, PROBE_N = 256, 2048, 2048
PROBE_REPEATS = 3  # best of, after one warm-up call per dtype


def read_cpu_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The first ``flags`` (x86) or ``Features`` (AArch64) line of ``/proc/cpuinfo`` as a set; None where there is
    no such file or line."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in FLAG_KEYS:
            return frozenset(value.split())
    return None


# ---------------------------------------------------------------- host kinds emulated on a bigger host
#
# The peer table has a row per host kind (issue 33), and this project's hosts are mostly AMX ones.  A smaller kind
# is emulated on a bigger host by capping, before the process starts, every library that picks its code by the CPU:
# our kernel build (no AMX path; the AVX2 kind also builds for haswell), oneDNN (ONEDNN_MAX_CPU_ISA), MKL
# (MKL_ENABLE_INSTRUCTIONS), ATen's kernels (ATEN_CPU_CAPABILITY); and inside the process, the flags this package
# decides by (host_flags: the dtype, the linear paths, the environment record) and inductor's vector ISA, which
# reads cpuid itself and takes AMX wherever the host has it, ATEN_CPU_CAPABILITY=avx512 included (the fifteenth
# pass found AMX micro-GEMMs in an "avx512_bf16 only" engine's graphs: compile.cap_inductor_isa removes them).
# What an emulation cannot cap: the memory system and the cores.  llama.cpp is built for the kind instead, and
# benchmarks/bench_peers.py refuses a build whose features the kind lacks.
ENV_EMULATE = "VICUNA_BENCH_EMULATE_HOST"


@dataclasses.dataclass(frozen=True)
class Emulation:
    """A host kind emulated here: ``needs`` (flags the real host must have), ``hides`` (prefixes of the flags this
    kind lacks), ``env`` (the caps, set before the process starts), ``inductor_lacks`` (words of inductor's vector
    ISA names, ``str(VecISA)``, this kind lacks)."""

    kind: str
    needs: tuple[str, ...]
    hides: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    inductor_lacks: tuple[str, ...]

    def flags(self, real: frozenset[str]) -> frozenset[str]:
        """``real`` without the flags this kind lacks."""
        return frozenset(f for f in real if not f.startswith(self.hides))

    def record(self) -> dict:
        return {"kind": self.kind, "env": dict(self.env)}


EMULATIONS = {
    "avx512_bf16": Emulation(
        "avx512_bf16", needs=("avx512_bf16",), hides=("amx_",),
        env=(("VICUNA_BENCH_CPU_AMX", "0"), ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16"),
             ("MKL_ENABLE_INSTRUCTIONS", "AVX512_E3")),
        inductor_lacks=("amx_tile",)),
    "avx2": Emulation(
        "avx2", needs=("avx2", "fma"), hides=("amx_", "avx512", "avx_vnni"),
        env=(("VICUNA_BENCH_CPU_AMX", "0"), ("VICUNA_BENCH_CPU_MARCH", "haswell"), ("ATEN_CPU_CAPABILITY", "avx2"),
             ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")),
        inductor_lacks=("avx512", "amx_tile")),
}


def emulation_of(kind: str, real: frozenset[str] | None) -> Emulation:
    """The emulation named ``kind``, for a host whose real flags are ``real``; a UserError names the value at fault
    (an unknown kind, or a host without the kind's flags: a kind is emulated on a bigger host only)."""
    emu = EMULATIONS.get(kind)
    if emu is None:
        raise UserError(f"{ENV_EMULATE}={kind!r}: not a host kind this package emulates (one of "
                        f"{', '.join(sorted(EMULATIONS))})")
    missing = [f for f in emu.needs if real is None or f not in real]
    if missing:
        raise UserError(f"{ENV_EMULATE}={kind}: this host lacks {', '.join(missing)}, so it cannot stand in for "
                        f"that kind (an emulation only takes away)")
    return emu


def emulation_environ(kind: str, environ: dict, real: frozenset[str] | None) -> dict:
    """``environ`` with the emulation ``kind`` set (its caps and ``VICUNA_BENCH_EMULATE_HOST``), for a process to
    start in (``benchmarks/emulate_host.py``)."""
    emu = emulation_of(kind, real)
    return {**environ, **dict(emu.env), ENV_EMULATE: emu.kind}


def emulation(environ=None, real: frozenset[str] | None = None) -> Emulation | None:
    """The host kind this process emulates (``VICUNA_BENCH_EMULATE_HOST``), or None.  Its caps must already be in
    the environment: the libraries read them once, when first used, so setting them from inside would be too late
    for some and not for others (a UserError names the first one missing)."""
    import os

    environ = os.environ if environ is None else environ
    kind = environ.get(ENV_EMULATE, "")
    if not kind:
        return None
    emu = emulation_of(kind, read_cpu_flags() if real is None else real)
    for key, value in emu.env:
        if environ.get(key) != value:
            raise UserError(f"{ENV_EMULATE}={kind} needs {key}={value} from the process's start (it is "
                            f"{environ.get(key)!r}): run the command under benchmarks/emulate_host.py {kind}")
    return emu


def emulation_record() -> dict | None:
    """For records: the emulated host kind (:func:`emulation`: its name and caps) with the real host's ISA; None
    where this process emulates none."""
    emu = emulation()
    return None if emu is None else {**emu.record(), "real_cpu_isa": isa_of(read_cpu_flags())}


def host_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The flags this package decides by: :func:`read_cpu_flags`, less those of an emulated host kind's lack
    (:func:`emulation`)."""
    real = read_cpu_flags(cpuinfo)
    emu = emulation(real=real) if real is not None else emulation()
    return emu.flags(real) if emu is not None and real is not None else real


def isa_of(flags: frozenset[str] | None) -> str:
    """The best matrix ISA of ``flags``: amx_bf16 | avx512_bf16 | avx512f | avx2 (x86), bf16 | sve | asimd
    (AArch64) | unknown (no flags, or none of them)."""
    if flags is None:
        return UNKNOWN
    for name in X86_ISAS:
        if name in flags:
            return name
    if "asimd" in flags:  # AArch64's names only on AArch64 (x86 has no plain "bf16" flag; this keeps it so)
        for name in AARCH64_ISAS:
            if name in flags:
                return name
    return UNKNOWN


def isa_record(flags: frozenset[str] | None) -> dict:
    """For the environment record: ``cpu_isa`` (see :func:`isa_of`) and ``cpu_isa_flags`` (those of ISA_FLAGS present)."""
    return {"cpu_isa": isa_of(flags), "cpu_isa_flags": [f for f in ISA_FLAGS if flags and f in flags]}


def gflops(flop: float, seconds: float) -> float:
    """GFLOP/s of ``flop`` floating-point operations done in ``seconds``."""
    return flop / seconds / 1e9


def gemm_flop(m: int, k: int, n: int) -> int:
    """Floating-point operations of an [m x k] @ [k x n] product: one multiply and one add per term."""
    return 2 * m * k * n


@dataclasses.dataclass(frozen=True)
class GemmProbe:
    """The probe's best-of rates, GFLOP/s, with torch's thread count when measured."""

    fp32_gflops: float
    bf16_gflops: float
    threads: int

    def record(self) -> dict:
        return {"fp32_gflops": round(self.fp32_gflops, 1), "bf16_gflops": round(self.bf16_gflops, 1),
                "threads": self.threads}


def _best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    torch.matmul(a, b)  # warm-up: oneDNN picks and caches its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_probe(m: int = PROBE_M, k: int = PROBE_K, n: int = PROBE_N, repeats: int = PROBE_REPEATS) -> GemmProbe:
    """fp32 and bf16 GFLOP/s of one prefill-shaped GEMM (best of ``repeats``) at torch's current thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)
    flop = gemm_flop(m, k, n)
    with torch.inference_mode():
        fp32 = gflops(flop, _best_seconds(a, b, repeats))
        bf16 = gflops(flop, _best_seconds(a.bfloat16(), b.bfloat16(), repeats))
    return GemmProbe(fp32, bf16, torch.get_num_threads())


@dataclasses.dataclass(frozen=True)
class CpuDtypeChoice:
    """What ``--dtype auto`` runs on this CPU, and why."""

    dtype: str  # fp32 | bf16
    isa: str  # isa_of(flags)
    isa_flags: tuple[str, ...]
    probe: GemmProbe | None  # measured only on avx512_bf16 without AMX
    reason: str

    def record(self) -> dict:
        """The environment record's ``cpu_dtype_auto``: the dtype, the ISA that decided it, the probe's figures."""
        return {"dtype": self.dtype, "cpu_isa": self.isa, "probe": self.probe.record() if self.probe else None}


# The ISAs whose flags cannot say whether bf16 GEMMs outrun fp32, so a probe measures it, and how the reason names them.
PROBED_ISAS = {"avx512_bf16": "avx512_bf16 without AMX", "bf16": "AArch64 bf16"}


def choose_cpu_dtype(flags: frozenset[str] | None, probe=None, torchrun: bool = False) -> CpuDtypeChoice:
    """The faster of fp32 and bf16 for a CPU with ``flags`` (the rule in the module docstring); ``probe`` runs only
    when the flags cannot decide, and not under ``torchrun`` (ranks there decide apart: fp32, the same on all)."""
    isa = isa_of(flags)
    present = tuple(f for f in ISA_FLAGS if flags and f in flags)
    if isa == "amx_bf16":
        return CpuDtypeChoice("bf16", isa, present, None, "AMX (amx_bf16): bf16 GEMMs outrun fp32 and decode reads "
                                                           "half the bytes")
    probed = PROBED_ISAS.get(isa)
    if probed and torchrun:
        return CpuDtypeChoice("fp32", isa, present, None,
                              f"{probed} under torchrun: each rank resolves its own spec, and a measured "
                              "choice could differ between ranks; pass --dtype bf16 to run bf16")
    if probed:
        measured = (probe or gemm_probe)()
        faster = "bf16" if measured.bf16_gflops > measured.fp32_gflops else "fp32"
        return CpuDtypeChoice(faster, isa, present, measured,
                              f"{probed}: a [{PROBE_M}x{PROBE_K}]@[{PROBE_K}x{PROBE_N}] GEMM ran "
                              f"bf16 {measured.bf16_gflops:.0f} vs fp32 {measured.fp32_gflops:.0f} GFLOP/s "
                              f"({measured.threads} threads)")
    if isa == UNKNOWN:
        why = ("CPU flags unknown (no /proc/cpuinfo flags or Features line)" if flags is None
               else "no AVX2/AVX-512/AMX or AArch64 asimd flags")
        return CpuDtypeChoice("fp32", isa, present, None, why)
    if isa in AARCH64_ISAS:
        return CpuDtypeChoice("fp32", isa, present, None,
                              f"AArch64 {isa} without bf16: the CPU has no bf16 arithmetic instructions")
    return CpuDtypeChoice("fp32", isa, present, None,
                          f"{isa} without avx512_bf16/AMX: bf16 GEMMs are emulated, several times slower than fp32")


@functools.lru_cache(maxsize=1)
def host_gemm_probe() -> GemmProbe:
    """:func:`gemm_probe` once per process: ``--dtype auto`` and the bf16 prefill's path (``cpu_kernels``) share it."""
    return gemm_probe()


def probed_bf16_gemm(flags: frozenset[str] | None) -> GemmProbe | None:
    """On hosts whose flags cannot say whether bf16 GEMMs outrun fp32 (:func:`choose_cpu_dtype`'s probed kinds:
    avx512_bf16 without AMX, AArch64 bf16), :func:`host_gemm_probe`; None elsewhere and under ``torchrun`` (ranks
    there decide apart, so each takes the unmeasured default)."""
    if isa_of(flags) not in PROBED_ISAS or launched_by_torchrun():
        return None
    return host_gemm_probe()


@functools.lru_cache(maxsize=1)
def host_cpu_dtype() -> CpuDtypeChoice:
    """This host's :func:`choose_cpu_dtype`, decided once per process (the probe runs at most once)."""
    return choose_cpu_dtype(host_flags(), probe=host_gemm_probe, torchrun=launched_by_torchrun())


_SAID: set[str] = set()  # log lines already said in this process


def cpu_auto_dtype() -> CpuDtypeChoice:
    """What ``--dtype auto`` runs on this CPU (:func:`host_cpu_dtype`), said on the log once per process."""
    choice = host_cpu_dtype()
    line = f"--dtype auto on cpu: {choice.dtype} ({choice.reason})"
    if line not in _SAID:
        _SAID.add(line)
        log.info("%s", line)
    return choice


def forget_host_decision() -> None:
    """Decide and say again on the next call (for tests that fake another host's flags or probe)."""
    host_cpu_dtype.cache_clear()
    host_gemm_probe.cache_clear()
    _SAID.clear()


def warn_if_bf16_slow() -> None:
    """One warning (once per process) when an explicit bf16 on CPU is the slower dtype on this host."""
    isa = isa_of(host_flags())
    if isa in ("avx2", "avx512f"):
        why = f"this CPU has {isa} but no avx512_bf16/AMX: bf16 matrix multiplies are several times slower than fp32"
    elif isa in PROBED_ISAS:  # the probe's verdict (AArch64 without bf16: not measured, no warning)
        choice = host_cpu_dtype()
        if choice.dtype != "fp32":
            return
        why = f"on this CPU {choice.reason}: bf16 is the slower dtype here"
    else:
        return
    line = f"--dtype bf16 on cpu: {why} (--dtype auto would run fp32)"
    if line not in _SAID:
        _SAID.add(line)
        log.warning("%s", line)
