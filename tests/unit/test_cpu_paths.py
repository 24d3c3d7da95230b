"""Which path each dtype and row range of a CPU linear layer takes (kernel / kernel+AMX / F.linear / fp32 GEMM /
AMX GEMM),
chosen once a process from the host's flags, the kernel's ISA and the library's AMX state: captured /proc/cpuinfo
flag lines of an AMX host, an avx512_bf16 host without AMX, an AVX2-only host and two AArch64 hosts (with and
without BF16); the one log line and the environment record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vicuna_bench import cpu_isa, cpu_kernels

pytestmark = pytest.mark.unit

FLAGS = Path(__file__).parent / "data" / "cpu_flags"
SAPPHIRE_RAPIDS = FLAGS / "sapphire_rapids.cpuinfo"  # amx_bf16 amx_tile
EPYC_ZEN4 = FLAGS / "amd_epyc_zen4.cpuinfo"  # avx512_bf16, no AMX
HASWELL = FLAGS / "haswell_e5_2680_v3.cpuinfo"  # avx2 only
EPYC_ZEN3 = FLAGS / "amd_epyc_zen3_milan.cpuinfo"  # avx2 only (AMD)
GRAVITON3 = FLAGS / "graviton3_neoverse_v1.cpuinfo"  # AArch64 bf16
KUNPENG_920 = FLAGS / "kunpeng_920.cpuinfo"  # AArch64 without bf16 (the Atlas 800I A2's host CPU)

KERNEL_ONLY = [{"rows": "1-16", "path": "kernel"}, {"rows": "17+", "path": "F.linear"}]
KERNEL_FP32_GEMM = [{"rows": "1-16", "path": "kernel"}, {"rows": "17+", "path": "fp32 GEMM"}]
NOT_BUILT = "not built (the compiler lacks AMX target attributes, or VICUNA_BENCH_NO_AMX)"


def flags_of(path: Path) -> frozenset[str]:
    flags = cpu_isa.read_cpu_flags(path)
    assert flags, path
    return flags


def test_amx_host_puts_3_to_16_bf16_rows_on_the_tiles_and_prefills_on_the_amx_gemm():
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")
    assert paths.record() == {
        "fp32": KERNEL_ONLY,
        "bf16": [{"rows": "1-2", "path": "kernel"}, {"rows": "3-16", "path": "kernel+AMX"},
                 {"rows": "17-1024", "path": "AMX GEMM"}, {"rows": "1025+", "path": "F.linear"}],
        "amx": "usable", "bf16_probe": None}
    assert paths.amx_rows() == (3, 16)
    assert paths.amx_gemm_rows() == 1024 and not paths.bf16_fp32_gemm()
    assert paths.describe() == ("fp32 1-16 kernel, 17+ F.linear; "
                                "bf16 1-2 kernel, 3-16 kernel+AMX, 17-1024 AMX GEMM, 1025+ F.linear")


def test_amx_rows_from_1_put_every_small_row_count_on_the_tiles(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "AMX_ROWS", (1, 16))
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")
    assert paths.describe() == "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel+AMX, 17-1024 AMX GEMM, 1025+ F.linear"
    assert paths.amx_rows() == (1, 16)


def test_amx_host_where_linux_refused_the_tiles_keeps_the_vector_kernel():
    refused = "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: Invalid argument)"
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, refused)
    assert paths.record() == {"fp32": KERNEL_ONLY, "bf16": KERNEL_ONLY, "amx": refused, "bf16_probe": None}
    assert paths.amx_rows() == (0, 0) and paths.amx_gemm_rows() == 0


@pytest.mark.parametrize("host, amx, why, bf16", [
    (EPYC_ZEN4, "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", KERNEL_ONLY),
    (HASWELL, "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", "the CPU has no AMX-TILE/AMX-BF16 (cpuid)",
     KERNEL_FP32_GEMM),
    (EPYC_ZEN3, "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", "the CPU has no AMX-TILE/AMX-BF16 (cpuid)",
     KERNEL_FP32_GEMM),
    (GRAVITON3, NOT_BUILT, NOT_BUILT, KERNEL_ONLY),
    (KUNPENG_920, NOT_BUILT, NOT_BUILT, KERNEL_FP32_GEMM),
    # a library that says usable on a host whose flags lack AMX (a faked or odd cpuinfo): the flags win
    (HASWELL, "usable", "the CPU flags have no amx_bf16/amx_tile", KERNEL_FP32_GEMM),
])
def test_hosts_without_amx_take_the_kernel_up_to_16_rows(host, amx, why, bf16):
    """Up to 16 rows the kernel; a bf16 prefill on ATen's GEMM where the host has a bf16 dot product (avx512_bf16,
    AArch64 bf16), else on the fp32 GEMM (AVX2, Kunpeng 920)."""
    paths = cpu_kernels.choose_linear_paths(flags_of(host), None, amx)
    assert paths.record() == {"fp32": KERNEL_ONLY, "bf16": bf16, "amx": why, "bf16_probe": None}
    assert paths.amx_rows() == (0, 0) and paths.amx_gemm_rows() == 0
    assert paths.bf16_fp32_gemm() is (bf16 == KERNEL_FP32_GEMM)


# GEMM probes as cpu_isa.gemm_probe reports them: the emulated avx512_bf16 host of the twenty-first pass (oneDNN
# capped at AVX512_CORE_BF16 on an AMX Xeon: bf16 198 against fp32 263 GFLOP/s), and one where bf16 wins.
FP32_FASTER = cpu_isa.GemmProbe(fp32_gflops=263.0, bf16_gflops=198.0, threads=2)
BF16_FASTER = cpu_isa.GemmProbe(fp32_gflops=263.0, bf16_gflops=410.0, threads=2)
NO_AMX = "the CPU has no AMX-TILE/AMX-BF16 (cpuid)"


@pytest.mark.parametrize("host, probe, bf16", [
    (EPYC_ZEN4, FP32_FASTER, KERNEL_FP32_GEMM),
    (EPYC_ZEN4, BF16_FASTER, KERNEL_ONLY),
    (GRAVITON3, FP32_FASTER, KERNEL_FP32_GEMM),
    # hosts whose flags decide: the probe (had one been passed) is not their verdict
    (HASWELL, BF16_FASTER, KERNEL_FP32_GEMM),
    (KUNPENG_920, BF16_FASTER, KERNEL_FP32_GEMM),
])
def test_a_bf16_dot_without_amx_takes_the_prefill_path_the_probe_measured_faster(host, probe, bf16):
    """avx512_bf16 without AMX and AArch64 bf16: whether oneDNN's bf16 GEMM outruns sgemm is measured, not known
    (on the emulated avx512_bf16 host, bench_paths: the fp32 GEMM 0.85x at::linear's time at 256 rows, 0.81x at
    2048, and 0.91x / 0.85x the frozen path's)."""
    paths = cpu_kernels.choose_linear_paths(flags_of(host), None, NO_AMX, None, probe)
    assert paths.record()["bf16"] == bf16
    dot = cpu_kernels.has_bf16_dot(flags_of(host))
    assert paths.record()["bf16_probe"] == (probe.record() if dot else None)
    assert paths.probe_said() == ("; bf16 above 16 rows by a GEMM probe: bf16 198 vs fp32 263 GFLOP/s"
                                  if dot and probe is FP32_FASTER else
                                  "; bf16 above 16 rows by a GEMM probe: bf16 410 vs fp32 263 GFLOP/s" if dot else "")


def test_an_amx_host_ignores_the_probe():
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable", None, FP32_FASTER)
    assert paths == cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")


@pytest.mark.parametrize("host, torchrun, probed", [
    (EPYC_ZEN4, False, True), (GRAVITON3, False, True), (EPYC_ZEN4, True, False),
    (SAPPHIRE_RAPIDS, False, False), (HASWELL, False, False), (KUNPENG_920, False, False), (None, False, False),
])
def test_the_probe_runs_once_and_only_where_the_flags_cannot_say(monkeypatch, host, torchrun, probed):
    runs = []
    monkeypatch.setattr(cpu_isa, "gemm_probe", lambda: runs.append(1) or FP32_FASTER)
    monkeypatch.setattr(cpu_isa, "launched_by_torchrun", lambda: torchrun)
    cpu_isa.forget_host_decision()
    try:
        for _ in range(2):
            assert cpu_isa.probed_bf16_gemm(host and flags_of(host)) == (FP32_FASTER if probed else None)
        assert len(runs) == (1 if probed else 0)
    finally:
        cpu_isa.forget_host_decision()


@pytest.mark.parametrize("given", [FP32_FASTER, None])
def test_a_rank_handed_the_specs_probe_never_probes(monkeypatch, given):
    """A worker rank takes the spec's probe (workers._worker_main hands it over before anything loads): None, where
    the spec measured nothing, is the unmeasured default, not a reason to measure."""
    monkeypatch.setitem(cpu_kernels._state, "given_probe", None)
    monkeypatch.setattr(cpu_isa, "gemm_probe", lambda: pytest.fail("a rank probed"))
    cpu_isa.forget_host_decision()
    cpu_kernels.adopt_bf16_probe(given)
    assert cpu_kernels._bf16_probe(flags_of(EPYC_ZEN4)) is given
    paths = cpu_kernels.choose_linear_paths(flags_of(EPYC_ZEN4), None, NO_AMX, None, cpu_kernels._bf16_probe(None))
    assert paths.bf16_fp32_gemm() is (given is FP32_FASTER)


@pytest.mark.parametrize("host, kernel_isa, dot", [
    (SAPPHIRE_RAPIDS, None, True),
    (EPYC_ZEN4, None, True),
    (HASWELL, None, False),
    (EPYC_ZEN3, None, False),
    (GRAVITON3, None, True),
    (KUNPENG_920, None, False),
    (None, None, True),  # nothing known: ATen's path is left alone
    (SAPPHIRE_RAPIDS, "fp32 avx512f, bf16 avx512_bf16", True),
    # an AMX host emulating an AVX2 / AVX-512F-only one: the kernel was built without a bf16 dot product
    (SAPPHIRE_RAPIDS, "fp32 avx2, bf16 avx2 (widened)", False),
    (SAPPHIRE_RAPIDS, "fp32 avx512f, bf16 avx512f (widened)", False),
    (None, "fp32 avx2, bf16 avx2 (widened)", False),
    # AArch64's kernel lane is always the generic one; ATen's GEMM uses the CPU's BF16 where it has it
    (GRAVITON3, "fp32 generic, bf16 generic (widened)", True),
    (KUNPENG_920, "fp32 generic, bf16 generic (widened)", False),
])
def test_bf16_dot_product_by_flags_and_kernel_isa(host, kernel_isa, dot):
    assert cpu_kernels.has_bf16_dot(host and flags_of(host), kernel_isa) is dot


def test_amx_host_emulating_avx2_takes_the_fp32_gemm_beside_its_tiles_choice():
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, NOT_BUILT,
                                            "fp32 avx2, bf16 avx2 (widened)")
    assert paths.describe() == "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel, 17+ fp32 GEMM"
    assert paths.bf16_fp32_gemm() and paths.amx_rows() == (0, 0) and paths.amx_gemm_rows() == 0


def test_amx_host_with_a_widened_kernel_build_keeps_the_fp32_gemm_above_the_amx_gemm():
    """An AMX host whose kernel was built without a bf16 dot product (an AVX2 emulation that still carries the tiles:
    they are compiled by function target attributes): the AMX GEMM up to 1024 rows, the fp32 GEMM above."""
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable", "fp32 avx2, bf16 avx2 (widened)")
    assert paths.describe() == ("fp32 1-16 kernel, 17+ F.linear; "
                                "bf16 1-2 kernel, 3-16 kernel+AMX, 17-1024 AMX GEMM, 1025+ fp32 GEMM")
    assert paths.amx_gemm_rows() == 1024 and paths.bf16_fp32_gemm()


@pytest.mark.parametrize("host", [SAPPHIRE_RAPIDS, HASWELL, GRAVITON3, None])
def test_without_the_kernels_every_row_is_f_linear(host):
    paths = cpu_kernels.choose_linear_paths(host and flags_of(host), "VICUNA_BENCH_CPU_KERNELS=0", "usable")
    everything = [{"rows": "1+", "path": "F.linear"}]
    assert paths.record() == {"fp32": everything, "bf16": everything,
                              "amx": "kernels not loaded: VICUNA_BENCH_CPU_KERNELS=0", "bf16_probe": None}
    assert paths.describe() == "fp32 1+ F.linear; bf16 1+ F.linear"


@pytest.mark.parametrize("host, amx, probe, amx_rows, fp32_gemm, amx_gemm, said", [
    (SAPPHIRE_RAPIDS, "usable", None, (3, 16), False, 1024,
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-2 kernel, 3-16 kernel+AMX, 17-1024 AMX GEMM, 1025+ F.linear"),
    (EPYC_ZEN4, NO_AMX, BF16_FASTER, (0, 0), False, 0,
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel, 17+ F.linear"),
    (EPYC_ZEN4, NO_AMX, FP32_FASTER, (0, 0), True, 0,
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel, 17+ fp32 GEMM"),
    (HASWELL, NO_AMX, None, (0, 0), True, 0,
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel, 17+ fp32 GEMM"),
    # the line `make setup` printed on that AMD EPYC (Zen 3) host itself, 2026-12-06
    (EPYC_ZEN3, NO_AMX, None, (0, 0), True, 0,
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel, 17+ fp32 GEMM"),
])
def test_load_chooses_once_says_one_line_and_records_it(monkeypatch, caplog, host, amx, probe, amx_rows, fp32_gemm,
                                                        amx_gemm, said):
    """load() on a faked host: the AMX rows, the fp32 GEMM and the AMX GEMM switches handed to the library, one log
    line, the record's cpu_linear_paths."""
    if not cpu_kernels.load(build_if_missing=False):
        pytest.skip(f"the CPU kernels are not loaded here: {cpu_kernels.status()['small_m_gemm_why_not']}")
    real_paths = cpu_kernels._state["paths"]
    handed = []
    flags = flags_of(host)
    monkeypatch.setattr(cpu_kernels, "_host_flags", lambda: flags)
    monkeypatch.setattr(cpu_kernels, "_amx_status", lambda: amx)
    monkeypatch.setattr(cpu_kernels, "_bf16_probe", lambda f: probe if cpu_isa.isa_of(f) == "avx512_bf16" else None)
    monkeypatch.setattr(cpu_kernels, "_set_amx_rows", lambda lo, hi: handed.append((lo, hi)) or True)
    monkeypatch.setattr(cpu_kernels, "_set_bf16_fp32_gemm", lambda on: handed.append(on) or on)
    monkeypatch.setattr(cpu_kernels, "_set_amx_gemm", lambda hi: handed.append(("amx gemm", hi)) or True)
    # the kernel as this faked host would build it (the real library's word depends on the CI host)
    isa = ("fp32 avx2, bf16 avx2 (widened)" if host in (HASWELL, EPYC_ZEN3) else "fp32 avx512f, bf16 avx512_bf16")
    monkeypatch.setattr(torch.ops.vicuna_bench, "small_m_isa", lambda: isa)
    for key in ("loaded", "why_not", "isa", "amx", "paths"):
        monkeypatch.setitem(cpu_kernels._state, key, None)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert cpu_kernels.load(build_if_missing=False)
        assert cpu_kernels.load(build_if_missing=False)  # decided once: no second line, nothing handed again
    assert cpu_kernels.status()["small_m_gemm_isa"] == isa
    measured = (f"; bf16 above 16 rows by a GEMM probe: bf16 {probe.bf16_gflops:.0f} vs fp32 {probe.fp32_gflops:.0f} "
                "GFLOP/s" if probe is not None else "")
    assert [r.getMessage() for r in caplog.records] == [
        f"CPU linear layers by rows of x: {said} (kernel ISA {isa}; AMX: {amx}{measured})"]
    assert handed == [amx_rows, fp32_gemm, ("amx gemm", amx_gemm)]
    assert cpu_kernels.paths_record()["amx"] == amx
    assert real_paths is not None  # the real choice comes back with the state after the test


def test_amx_rows_switches_for_the_block_and_restores_the_hosts_choice(monkeypatch):
    """cpu_kernels.amx_rows: the range handed to the library inside the block, the host's chosen range after it, even
    when the block raises; an unusable AMX asked for is an error, not a silent vector-kernel run."""
    chosen = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")
    handed = []
    monkeypatch.setitem(cpu_kernels._state, "loaded", True)
    monkeypatch.setitem(cpu_kernels._state, "paths", chosen)
    monkeypatch.setattr(cpu_kernels, "_set_amx_rows", lambda lo, hi: handed.append((lo, hi)) or True)
    with cpu_kernels.amx_rows(0, 0):
        assert handed == [(0, 0)]
    assert handed == [(0, 0), chosen.amx_rows()]
    with pytest.raises(KeyError), cpu_kernels.amx_rows(2, 16):
        raise KeyError("inside")
    assert handed[-2:] == [(2, 16), chosen.amx_rows()]
    monkeypatch.setattr(cpu_kernels, "_set_amx_rows", lambda lo, hi: (lo, hi) == (0, 0))
    monkeypatch.setattr(cpu_kernels, "_amx_status", lambda: "the CPU has no AMX-TILE/AMX-BF16 (cpuid)")
    with pytest.raises(RuntimeError, match="AMX rows 1-16 asked for, but AMX is not usable here: the CPU has no"):
        with cpu_kernels.amx_rows(1, 16):
            pass
    monkeypatch.setitem(cpu_kernels._state, "loaded", False)
    monkeypatch.setitem(cpu_kernels._state, "why_not", "VICUNA_BENCH_CPU_KERNELS=0")
    with pytest.raises(RuntimeError, match="not loaded: VICUNA_BENCH_CPU_KERNELS=0"):
        with cpu_kernels.amx_rows(0, 0):
            pass


def test_bf16_fp32_gemm_switches_for_the_block_and_restores_the_hosts_choice(monkeypatch):
    """cpu_kernels.bf16_fp32_gemm: the switch handed to the library inside the block, the host's choice after it,
    even when the block raises; not loaded: an error."""
    chosen = cpu_kernels.choose_linear_paths(flags_of(HASWELL), None, NOT_BUILT)
    handed = []
    monkeypatch.setitem(cpu_kernels._state, "loaded", True)
    monkeypatch.setitem(cpu_kernels._state, "paths", chosen)
    monkeypatch.setattr(cpu_kernels, "_set_bf16_fp32_gemm", lambda on: handed.append(on) or on)
    with cpu_kernels.bf16_fp32_gemm(False):
        assert handed == [False]
    assert handed == [False, True]
    with pytest.raises(KeyError), cpu_kernels.bf16_fp32_gemm(False):
        raise KeyError("inside")
    assert handed[-2:] == [False, True]
    monkeypatch.setitem(cpu_kernels._state, "loaded", False)
    monkeypatch.setitem(cpu_kernels._state, "why_not", "VICUNA_BENCH_CPU_KERNELS=0")
    with pytest.raises(RuntimeError, match="not loaded: VICUNA_BENCH_CPU_KERNELS=0"):
        with cpu_kernels.bf16_fp32_gemm(True):
            pass


@pytest.mark.parametrize("kernels, dtype, world_size, frozen", [
    (True, "bf16", 1, False),   # every product our op: frozen held ~76 MiB more for a step within 1%
    (True, "fp32", 1, False),   # the same (frozen 0.95-0.98 of the step, the memory goal lost)
    (True, "bf16", 2, False),   # the collectives' graphs stay unfrozen
    (False, "bf16", 1, True),   # oneDNN's bf16 GEMMs want their prepacked weights
    (False, "bf16", 2, True),
    (False, "fp32", 1, False),  # inductor's fp32 micro-GEMMs gain nothing and would keep a second copy
])
def test_which_cpu_graphs_freeze(monkeypatch, kernels, dtype, world_size, frozen):
    from vicuna_bench import compile as vb_compile

    monkeypatch.setattr(cpu_kernels, "load", lambda: kernels)
    assert vb_compile.cpu_inductor_options(world_size, dtype) == {"freezing": frozen, "cpp_wrapper": world_size == 1}


def test_amx_gemm_switches_for_the_block_and_restores_the_hosts_choice(monkeypatch):
    """cpu_kernels.amx_gemm: the switch handed to the library inside the block, the host's choice after it, even
    when the block raises; the AMX GEMM asked for where AMX is unusable, or the kernels not loaded: an error."""
    chosen = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")
    handed = []
    monkeypatch.setitem(cpu_kernels._state, "loaded", True)
    monkeypatch.setitem(cpu_kernels._state, "paths", chosen)
    monkeypatch.setattr(cpu_kernels, "_set_amx_gemm", lambda hi: handed.append(hi) or True)
    with cpu_kernels.amx_gemm(False):
        assert handed == [0]
    assert handed == [0, 1024]
    with cpu_kernels.amx_gemm(True):  # every row count above 16, not only the host's range
        assert handed[-1] >= 2**62
    with pytest.raises(KeyError), cpu_kernels.amx_gemm(False):
        raise KeyError("inside")
    assert handed[-2:] == [0, 1024]
    monkeypatch.setattr(cpu_kernels, "_set_amx_gemm", lambda hi: hi == 0)
    monkeypatch.setattr(cpu_kernels, "_amx_status", lambda: "the CPU has no AMX-TILE/AMX-BF16 (cpuid)")
    with pytest.raises(RuntimeError, match="the AMX GEMM asked for, but AMX is not usable here: the CPU has no"):
        with cpu_kernels.amx_gemm(True):
            pass
    monkeypatch.setitem(cpu_kernels._state, "loaded", False)
    monkeypatch.setitem(cpu_kernels._state, "why_not", "VICUNA_BENCH_CPU_KERNELS=0")
    with pytest.raises(RuntimeError, match="not loaded: VICUNA_BENCH_CPU_KERNELS=0"):
        with cpu_kernels.amx_gemm(False):
            pass
