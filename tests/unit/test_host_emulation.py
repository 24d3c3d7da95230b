"""A smaller host kind emulated on a bigger host (``VICUNA_BENCH_EMULATE_HOST``, ``benchmarks/emulate_host.py``):
the package's own choices made as on a captured /proc/cpuinfo of that kind, the caps every library needs from the
process's start (names from oneDNN's and oneMKL's documentation), inductor's vector ISA capped as torch 2.13's
``cpu_vec_isa`` lists them, and one line for a kind the host cannot stand in for."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vicuna_bench import compile as compile_mod
from vicuna_bench import cpu_isa, cpu_kernels, devices
from vicuna_bench.errors import UserError

pytestmark = pytest.mark.unit

FLAGS = Path(__file__).parent / "data" / "cpu_flags"
SAPPHIRE_RAPIDS = FLAGS / "sapphire_rapids.cpuinfo"  # amx_bf16 amx_tile
EPYC_ZEN4 = FLAGS / "amd_epyc_zen4.cpuinfo"  # avx512_bf16, no AMX
HASWELL = FLAGS / "haswell_e5_2680_v3.cpuinfo"  # avx2 only
NOT_BUILT = "not built (the compiler lacks AMX target attributes, or VICUNA_BENCH_NO_AMX)"

# The caps each kind needs before the process starts: oneDNN's ONEDNN_MAX_CPU_ISA names (AVX512_CORE_BF16: Cooper
# Lake's avx512_bf16 without AMX), oneMKL's MKL_ENABLE_INSTRUCTIONS (AVX512_E3: "AVX-512 with DL Boost and bfloat16"),
# ATen's ATEN_CPU_CAPABILITY, and our build's switches.
CAPS = {
    "avx512_bf16": {"VICUNA_BENCH_CPU_AMX": "0", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512_E3"},
    "avx2": {"VICUNA_BENCH_CPU_AMX": "0", "VICUNA_BENCH_CPU_MARCH": "haswell", "ATEN_CPU_CAPABILITY": "avx2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def emulate(monkeypatch, kind: str, host: Path = SAPPHIRE_RAPIDS) -> None:
    monkeypatch.setattr(cpu_isa, "CPUINFO", host)
    for key, value in CAPS[kind].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(cpu_isa.ENV_EMULATE, kind)


@pytest.mark.parametrize("kind", sorted(CAPS))
def test_the_launchers_environment_holds_each_kinds_caps(kind):
    environ = cpu_isa.emulation_environ(kind, {"PATH": "/bin"}, cpu_isa.read_cpu_flags(SAPPHIRE_RAPIDS))
    assert environ == {"PATH": "/bin", cpu_isa.ENV_EMULATE: kind, **CAPS[kind]}


@pytest.mark.parametrize("kind, real", [("avx512_bf16", EPYC_ZEN4), ("avx2", HASWELL)])
def test_an_emulated_amx_host_decides_as_a_real_host_of_that_kind(monkeypatch, kind, real):
    emulate(monkeypatch, kind)
    emulated = cpu_isa.host_flags()
    genuine = cpu_isa.read_cpu_flags(real)
    assert cpu_isa.isa_record(emulated) == cpu_isa.isa_record(genuine)
    assert not {f for f in emulated if f.startswith("amx")}
    # the linear paths, as on the captured host of that kind (the emulated build has no AMX path)
    assert (cpu_kernels.choose_linear_paths(emulated, None, NOT_BUILT).record()
            == cpu_kernels.choose_linear_paths(genuine, None, NOT_BUILT).record())
    assert cpu_isa.read_cpu_flags() == cpu_isa.read_cpu_flags(SAPPHIRE_RAPIDS)  # the real flags stay readable


def test_without_an_emulation_the_host_flags_are_the_real_ones(monkeypatch):
    monkeypatch.setattr(cpu_isa, "CPUINFO", SAPPHIRE_RAPIDS)
    monkeypatch.delenv(cpu_isa.ENV_EMULATE, raising=False)
    assert cpu_isa.emulation() is None
    assert cpu_isa.host_flags() == cpu_isa.read_cpu_flags(SAPPHIRE_RAPIDS)


def test_the_environment_record_names_the_emulated_kind_and_the_real_isa(monkeypatch):
    emulate(monkeypatch, "avx512_bf16")
    record = devices.device_record("cpu")
    assert record["cpu_isa"] == "avx512_bf16" and "amx_bf16" not in record["cpu_isa_flags"]
    assert record["cpu_emulated"] == {"kind": "avx512_bf16", "env": CAPS["avx512_bf16"], "real_cpu_isa": "amx_bf16"}


def test_an_unknown_kind_is_one_line_naming_the_variable_and_the_kinds(monkeypatch):
    monkeypatch.setattr(cpu_isa, "CPUINFO", SAPPHIRE_RAPIDS)
    monkeypatch.setenv(cpu_isa.ENV_EMULATE, "avx9")
    with pytest.raises(UserError) as err:
        cpu_isa.host_flags()
    assert str(err.value) == ("VICUNA_BENCH_EMULATE_HOST='avx9': not a host kind this package emulates "
                              "(one of avx2, avx512_bf16)")


def test_a_host_without_the_kinds_flags_cannot_stand_in_for_it(monkeypatch):
    emulate(monkeypatch, "avx512_bf16", host=HASWELL)
    with pytest.raises(UserError, match=r"^VICUNA_BENCH_EMULATE_HOST=avx512_bf16: this host lacks avx512_bf16, "):
        cpu_isa.host_flags()
    with pytest.raises(UserError, match="lacks avx512_bf16"):
        cpu_isa.emulation_environ("avx512_bf16", {}, cpu_isa.read_cpu_flags(HASWELL))


def test_a_cap_set_too_late_is_one_line_naming_it_and_the_launcher(monkeypatch):
    emulate(monkeypatch, "avx2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    with pytest.raises(UserError) as err:
        cpu_isa.host_flags()
    assert str(err.value) == ("VICUNA_BENCH_EMULATE_HOST=avx2 needs ONEDNN_MAX_CPU_ISA=AVX2 from the process's start "
                              "(it is None): run the command under benchmarks/emulate_host.py avx2")


@pytest.mark.parametrize("kind, left", [("avx512_bf16", ["avx512 avx512_vnni", "avx512", "avx2"]),
                                        ("avx2", ["avx2"])])
def test_inductors_vector_isa_is_capped_and_compiles_into_a_cache_of_its_own(monkeypatch, tmp_path, kind, left):
    from torch._inductor import cpu_vec_isa

    # torch 2.13's list on an AMX host (its order: AMX first), without asking this host's cpuid
    listed = [cpu_vec_isa.VecAMX(), cpu_vec_isa.VecAVX512VNNI(), cpu_vec_isa.VecAVX512(), cpu_vec_isa.VecAVX2()]
    assert [str(isa) for isa in listed] == ["avx512 avx512_vnni amx_tile", "avx512 avx512_vnni", "avx512", "avx2"]
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: listed)
    emulate(monkeypatch, kind)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_mod, "cache_dir", lambda: tmp_path)
    compile_mod._configure_inductor()
    assert [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] == left
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / f"inductor-{kind}")
    assert compile_mod.cap_inductor_isa() == kind and [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] == left


def test_the_launcher_refuses_a_kind_this_host_cannot_be(monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        import emulate_host
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(cpu_isa, "CPUINFO", HASWELL)
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("started the command"))
    assert emulate_host.main(["avx512_bf16", "--", "true"]) == 2
    assert capsys.readouterr().err == ("emulate_host.py: VICUNA_BENCH_EMULATE_HOST=avx512_bf16: this host lacks "
                                       "avx512_bf16, so it cannot stand in for that kind (an emulation only takes "
                                       "away)\n")
    assert emulate_host.main(["avx2", "true"]) == 2  # no "--": the usage line


def test_the_emulated_avx2_kind_has_no_vector_flag_haswell_lacks(monkeypatch):
    emulate(monkeypatch, "avx2")
    vector = {f for f in cpu_isa.host_flags() if f.startswith(("avx", "amx"))}
    assert vector == {f for f in cpu_isa.read_cpu_flags(HASWELL) if f.startswith(("avx", "amx"))} == {"avx", "avx2"}
