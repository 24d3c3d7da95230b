"""Which path each dtype and row range of a CPU linear layer takes (kernel / kernel+AMX / F.linear), chosen once a
process from the host's flags and the library's AMX state: captured /proc/cpuinfo flag lines of an AMX host, an
avx512_bf16 host without AMX, an AVX2-only host and an AArch64 host; the one log line and the environment record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vicuna_bench import cpu_isa, cpu_kernels

pytestmark = pytest.mark.unit

FLAGS = Path(__file__).parent / "data" / "cpu_flags"
SAPPHIRE_RAPIDS = FLAGS / "sapphire_rapids.cpuinfo"  # amx_bf16 amx_tile
EPYC_ZEN4 = FLAGS / "amd_epyc_zen4.cpuinfo"  # avx512_bf16, no AMX
HASWELL = FLAGS / "haswell_e5_2680_v3.cpuinfo"  # avx2 only
GRAVITON3 = FLAGS / "graviton3_neoverse_v1.cpuinfo"  # AArch64 bf16

KERNEL_ONLY = [{"rows": "1-16", "path": "kernel"}, {"rows": "17+", "path": "F.linear"}]
NOT_BUILT = "not built (the compiler lacks AMX target attributes, or VICUNA_BENCH_NO_AMX)"


def flags_of(path: Path) -> frozenset[str]:
    flags = cpu_isa.read_cpu_flags(path)
    assert flags, path
    return flags


def test_amx_host_puts_3_to_16_bf16_rows_on_the_tiles():
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")
    assert paths.record() == {
        "fp32": KERNEL_ONLY,
        "bf16": [{"rows": "1-2", "path": "kernel"}, {"rows": "3-16", "path": "kernel+AMX"},
                 {"rows": "17+", "path": "F.linear"}],
        "amx": "usable"}
    assert paths.amx_rows() == (3, 16)
    assert paths.describe() == "fp32 1-16 kernel, 17+ F.linear; bf16 1-2 kernel, 3-16 kernel+AMX, 17+ F.linear"


def test_amx_rows_from_1_put_every_small_row_count_on_the_tiles(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "AMX_ROWS", (1, 16))
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, "usable")
    assert paths.describe() == "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel+AMX, 17+ F.linear"
    assert paths.amx_rows() == (1, 16)


def test_amx_host_where_linux_refused_the_tiles_keeps_the_vector_kernel():
    refused = "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: Invalid argument)"
    paths = cpu_kernels.choose_linear_paths(flags_of(SAPPHIRE_RAPIDS), None, refused)
    assert paths.record() == {"fp32": KERNEL_ONLY, "bf16": KERNEL_ONLY, "amx": refused}
    assert paths.amx_rows() == (0, 0)


@pytest.mark.parametrize("host, amx, why", [
    (EPYC_ZEN4, "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", "the CPU has no AMX-TILE/AMX-BF16 (cpuid)"),
    (HASWELL, "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", "the CPU has no AMX-TILE/AMX-BF16 (cpuid)"),
    (GRAVITON3, NOT_BUILT, NOT_BUILT),
    # a library that says usable on a host whose flags lack AMX (a faked or odd cpuinfo): the flags win
    (HASWELL, "usable", "the CPU flags have no amx_bf16/amx_tile"),
])
def test_hosts_without_amx_take_the_kernel_up_to_16_rows(host, amx, why):
    paths = cpu_kernels.choose_linear_paths(flags_of(host), None, amx)
    assert paths.record() == {"fp32": KERNEL_ONLY, "bf16": KERNEL_ONLY, "amx": why}
    assert paths.amx_rows() == (0, 0)


@pytest.mark.parametrize("host", [SAPPHIRE_RAPIDS, HASWELL, GRAVITON3, None])
def test_without_the_kernels_every_row_is_f_linear(host):
    paths = cpu_kernels.choose_linear_paths(host and flags_of(host), "VICUNA_BENCH_CPU_KERNELS=0", "usable")
    everything = [{"rows": "1+", "path": "F.linear"}]
    assert paths.record() == {"fp32": everything, "bf16": everything,
                              "amx": "kernels not loaded: VICUNA_BENCH_CPU_KERNELS=0"}
    assert paths.describe() == "fp32 1+ F.linear; bf16 1+ F.linear"


@pytest.mark.parametrize("host, amx, amx_rows, said", [
    (SAPPHIRE_RAPIDS, "usable", (3, 16),
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-2 kernel, 3-16 kernel+AMX, 17+ F.linear"),
    (EPYC_ZEN4, "the CPU has no AMX-TILE/AMX-BF16 (cpuid)", (0, 0),
     "fp32 1-16 kernel, 17+ F.linear; bf16 1-16 kernel, 17+ F.linear"),
])
def test_load_chooses_once_says_one_line_and_records_it(monkeypatch, caplog, host, amx, amx_rows, said):
    """load() on a faked host: the AMX rows handed to the library, one log line, the record's cpu_linear_paths."""
    if not cpu_kernels.load(build_if_missing=False):
        pytest.skip(f"the CPU kernels are not loaded here: {cpu_kernels.status()['small_m_gemm_why_not']}")
    real_paths = cpu_kernels._state["paths"]
    handed = []
    flags = flags_of(host)
    monkeypatch.setattr(cpu_kernels, "_host_flags", lambda: flags)
    monkeypatch.setattr(cpu_kernels, "_amx_status", lambda: amx)
    monkeypatch.setattr(cpu_kernels, "_set_amx_rows", lambda lo, hi: handed.append((lo, hi)) or True)
    for key in ("loaded", "why_not", "isa", "amx", "paths"):
        monkeypatch.setitem(cpu_kernels._state, key, None)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert cpu_kernels.load(build_if_missing=False)
        assert cpu_kernels.load(build_if_missing=False)  # decided once: no second line, nothing handed again
    isa = cpu_kernels.status()["small_m_gemm_isa"]
    assert [r.getMessage() for r in caplog.records] == [
        f"CPU linear layers by rows of x: {said} (kernel ISA {isa}; AMX: {amx})"]
    assert handed == [amx_rows]
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


@pytest.mark.parametrize("kernels, dtype, world_size, frozen", [
    (True, "bf16", 1, True),    # every product our op, reading the frozen constants in place
    (True, "fp32", 1, False),   # unmeasured frozen: left as it was
    (True, "bf16", 2, False),   # the collectives' graphs stay unfrozen
    (False, "bf16", 1, True),   # oneDNN's bf16 GEMMs want their prepacked weights
    (False, "bf16", 2, True),
    (False, "fp32", 1, False),  # inductor's fp32 micro-GEMMs gain nothing and would keep a second copy
])
def test_which_cpu_graphs_freeze(monkeypatch, kernels, dtype, world_size, frozen):
    from vicuna_bench import compile as vb_compile

    monkeypatch.setattr(cpu_kernels, "load", lambda: kernels)
    assert vb_compile.cpu_inductor_options(world_size, dtype) == {"freezing": frozen, "cpp_wrapper": world_size == 1}
