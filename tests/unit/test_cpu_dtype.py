"""``--dtype auto`` on CPU by the host's ISA (captured /proc/cpuinfo flag lines), the probe's arithmetic, the record."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from vicuna_bench import checkpoint, cpu_isa, environment, spec
from vicuna_bench.cpu_isa import GemmProbe

pytestmark = pytest.mark.unit

FLAGS = Path(__file__).parent / "data" / "cpu_flags"
SAPPHIRE_RAPIDS = FLAGS / "sapphire_rapids.cpuinfo"  # amx_bf16
EPYC_ZEN4 = FLAGS / "amd_epyc_zen4.cpuinfo"  # avx512_bf16, no AMX
HASWELL = FLAGS / "haswell_e5_2680_v3.cpuinfo"  # avx2 only
EPYC_ZEN3 = FLAGS / "amd_epyc_zen3_milan.cpuinfo"  # avx2 only (AMD)
KUNPENG_920 = FLAGS / "kunpeng_920.cpuinfo"  # AArch64 "Features": asimd, no sve, no bf16
GRAVITON3 = FLAGS / "graviton3_neoverse_v1.cpuinfo"  # AArch64: sve and bf16

def ModelArgs(torch_dtype=None):  # resolve_dtype reads only the checkpoint's torch_dtype
    return SimpleNamespace(torch_dtype=torch_dtype)


def resolve(requested: str, args, device: str) -> torch.dtype:
    """The torch dtype of the name spec.resolve_dtype resolves ``requested`` to."""
    return checkpoint.DTYPES[spec.resolve_dtype(requested, args, device)[0]]


BF16_FASTER = GemmProbe(fp32_gflops=58.0, bf16_gflops=135.0, threads=2)  # this host's shape of result
FP32_FASTER = GemmProbe(fp32_gflops=65.8, bf16_gflops=42.9, threads=2)  # the Intel non-AMX host's (261 vs 400 ms)


def never_probe():
    raise AssertionError("the flags decide here: no probe may run")


@pytest.fixture
def host(monkeypatch):
    """Make this process's CPU the one a captured flags file describes, with a faked probe; the per-process
    choice is cleared before and after."""
    cpu_isa.forget_host_decision()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def use(cpuinfo: Path, probe=never_probe):
        monkeypatch.setattr(cpu_isa, "CPUINFO", cpuinfo)
        monkeypatch.setattr(cpu_isa, "gemm_probe", probe)

    yield use
    cpu_isa.forget_host_decision()


def auto_cpu_dtype() -> torch.dtype:
    return resolve("auto", ModelArgs(), "cpu")


@pytest.mark.parametrize("cpuinfo, isa, flags", [
    (SAPPHIRE_RAPIDS, "amx_bf16", ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"]),
    (EPYC_ZEN4, "avx512_bf16", ["avx512_bf16", "avx512f", "avx2"]),
    (HASWELL, "avx2", ["avx2"]),
    (EPYC_ZEN3, "avx2", ["avx2"]),
    (KUNPENG_920, "asimd", ["asimd"]),
    (GRAVITON3, "bf16", ["bf16", "sve", "asimd"]),
])
def test_the_isa_is_read_from_the_flags_line(cpuinfo, isa, flags):
    read = cpu_isa.read_cpu_flags(cpuinfo)
    assert cpu_isa.isa_record(read) == {"cpu_isa": isa, "cpu_isa_flags": flags}


def test_aarch64_features_line_is_read_whole():
    # The Kunpeng 920's Features line, as captured (tests/unit/data/cpu_flags/kunpeng_920.cpuinfo says where).
    assert cpu_isa.read_cpu_flags(KUNPENG_920) == frozenset(
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma dcpop asimddp "
        "asimdfhm ssbs".split())


def test_no_cpuinfo_or_no_flags_line_is_unknown(tmp_path):
    no_flags = tmp_path / "cpuinfo"
    no_flags.write_text("processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n")  # a ppc64le host: neither key
    for path in (tmp_path / "missing", no_flags):
        assert cpu_isa.read_cpu_flags(path) is None
        assert cpu_isa.isa_record(None) == {"cpu_isa": "unknown", "cpu_isa_flags": []}


@pytest.mark.parametrize("flags, dtype, why", [
    (SAPPHIRE_RAPIDS, torch.bfloat16, ("bf16", "AMX")),
    (HASWELL, torch.float32, ("fp32", "avx2 without avx512_bf16")),
    (EPYC_ZEN3, torch.float32, ("fp32", "avx2 without avx512_bf16")),
])
def test_amx_and_avx2_only_hosts_decide_without_probing(host, caplog, flags, dtype, why):
    host(flags)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert auto_cpu_dtype() == dtype
    said = [r.getMessage() for r in caplog.records if "--dtype auto" in r.getMessage()]
    assert len(said) == 1 and all(w in said[0] for w in why), said


@pytest.mark.parametrize("probe, dtype", [(BF16_FASTER, torch.bfloat16), (FP32_FASTER, torch.float32)])
def test_avx512_bf16_without_amx_runs_what_the_probe_found_faster(host, caplog, probe, dtype):
    calls = []
    host(EPYC_ZEN4, lambda: calls.append(1) or probe)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert auto_cpu_dtype() == dtype
        assert auto_cpu_dtype() == dtype  # a second spec in the same process
    assert len(calls) == 1  # probed once per process
    said = [r.getMessage() for r in caplog.records if "--dtype auto" in r.getMessage()]
    assert len(said) == 1, said
    assert f"bf16 {probe.bf16_gflops:.0f} vs fp32 {probe.fp32_gflops:.0f} GFLOP/s" in said[0]


def test_kunpeng_920_runs_fp32_without_probing(host, caplog):
    host(KUNPENG_920)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert auto_cpu_dtype() == torch.float32
    said = [r.getMessage() for r in caplog.records if "--dtype auto" in r.getMessage()]
    assert said == ["--dtype auto on cpu: fp32 (AArch64 asimd without bf16: the CPU has no bf16 arithmetic "
                    "instructions)"]


def test_explicit_bf16_on_kunpeng_920_is_not_warned_about_unmeasured(host, caplog):
    host(KUNPENG_920)
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        assert resolve("bf16", ModelArgs(), "cpu") == torch.bfloat16
    assert not caplog.records


@pytest.mark.parametrize("probe, dtype", [(BF16_FASTER, torch.bfloat16), (FP32_FASTER, torch.float32)])
def test_aarch64_bf16_runs_what_the_probe_found_faster(host, caplog, probe, dtype):
    calls = []
    host(GRAVITON3, lambda: calls.append(1) or probe)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert auto_cpu_dtype() == dtype
    assert len(calls) == 1
    said = [r.getMessage() for r in caplog.records if "--dtype auto" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"--dtype auto on cpu: {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
                                                 " (AArch64 bf16: a [256x2048]@[2048x2048] GEMM ran"), said


def test_under_torchrun_the_ranks_do_not_probe_apart(host, monkeypatch):
    host(EPYC_ZEN4)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert auto_cpu_dtype() == torch.float32


def test_unknown_flags_run_fp32(host, tmp_path):
    host(tmp_path / "missing")
    assert auto_cpu_dtype() == torch.float32


def test_accelerators_keep_the_checkpoints_dtype(host):
    host(SAPPHIRE_RAPIDS)
    args = ModelArgs(torch_dtype="bfloat16")
    assert resolve("auto", args, "cuda") == torch.bfloat16
    assert resolve("auto", ModelArgs(torch_dtype="float16"), "npu") == torch.float16


def test_explicit_bf16_on_avx2_warns_once(host, caplog):
    host(HASWELL)
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        assert resolve("bf16", ModelArgs(), "cpu") == torch.bfloat16
        resolve("bf16", ModelArgs(), "cpu")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "slower than fp32" in warned[0] and "avx2" in warned[0], warned


def test_explicit_bf16_where_the_probe_found_it_slower_says_so(host, caplog):
    host(EPYC_ZEN4, lambda: FP32_FASTER)
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        resolve("bf16", ModelArgs(), "cpu")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "bf16 is the slower dtype here" in warned[0], warned


@pytest.mark.parametrize("cpuinfo, probe", [(SAPPHIRE_RAPIDS, never_probe), (EPYC_ZEN4, lambda: BF16_FASTER)])
def test_explicit_bf16_where_it_is_fast_is_quiet(host, caplog, cpuinfo, probe):
    host(cpuinfo, probe)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        resolve("bf16", ModelArgs(), "cpu")
    assert not caplog.records  # no warning, and no "--dtype auto" line: the user chose the dtype


def test_the_environment_record_carries_the_isa_and_the_probe(host):
    host(EPYC_ZEN4, lambda: BF16_FASTER)
    record = environment.environment_record("cpu", 0, cpu_isa.cpu_auto_dtype())
    assert record["cpu_isa"] == "avx512_bf16"
    assert record["cpu_isa_flags"] == ["avx512_bf16", "avx512f", "avx2"]
    assert record["cpu_dtype_auto"] == {"dtype": "bf16", "cpu_isa": "avx512_bf16",
                                        "probe": {"fp32_gflops": 58.0, "bf16_gflops": 135.0, "threads": 2}}
    assert environment.environment_record("cpu")["cpu_dtype_auto"] is None  # an explicit dtype: nothing chose it


def test_the_spec_carries_the_choice_its_workers_record(host, tiny_models):
    from vicuna_bench.spec import ModelChoices, resolve_engine_spec

    host(EPYC_ZEN4, lambda: BF16_FASTER)
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="cpu", dtype="auto", max_seq_len=64,
                                            compile="off"),
                               progress=False)
    assert spec.dtype == "bf16" and spec.cpu_dtype_auto.probe == BF16_FASTER
    explicit = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="cpu", dtype="fp32", max_seq_len=64,
                                                compile="off"),
                                   progress=False)
    assert explicit.cpu_dtype_auto is None
    assert spec.cpu_gemm_probe == BF16_FASTER and explicit.cpu_gemm_probe is None  # fp32: no bf16 prefill to choose


@pytest.mark.parametrize("cpuinfo, dtype, carried", [
    (EPYC_ZEN4, "bf16", FP32_FASTER),  # an explicit bf16 where the flags cannot say: measured once, here
    (GRAVITON3, "bf16", FP32_FASTER),
    (SAPPHIRE_RAPIDS, "bf16", None),  # the flags say: nothing measured
    (HASWELL, "bf16", None),
    (EPYC_ZEN4, "fp32", None),
])
def test_the_spec_carries_the_gemm_probe_every_rank_takes_the_bf16_prefill_path_from(host, tiny_models, cpuinfo,
                                                                                       dtype, carried):
    from vicuna_bench.spec import ModelChoices, resolve_engine_spec

    host(cpuinfo, (lambda: FP32_FASTER) if carried else never_probe)
    resolved = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="cpu", dtype=dtype, max_seq_len=64,
                                                compile="off"), progress=False)
    assert resolved.cpu_gemm_probe == carried


def test_gemm_flop_and_rate_by_hand():
    # [256 x 2048] @ [2048 x 2048]: 256*2048 outputs, each 2048 multiplies and 2048 adds.
    assert cpu_isa.gemm_flop(256, 2048, 2048) == 2_147_483_648
    # 2,147,483,648 FLOP in 20 ms is 107.37 GFLOP/s.
    assert cpu_isa.gflops(2_147_483_648, 0.020) == pytest.approx(107.374182, rel=1e-6)


def test_the_probe_times_each_dtype_best_of(monkeypatch):
    """With a fake clock each matmul takes a known time: the rates are the hand-computed FLOP over the best."""
    durations = iter([0.050, 0.030, 0.020, 0.025,  # fp32: warm-up untimed, then 30, 20, 25 ms
                      0.090, 0.060, 0.080, 0.070])  # bf16: 60, 80, 70 ms
    now = [0.0]
    timed = {"on": False}

    def fake_matmul(a, b):
        step = next(durations)
        if timed["on"]:
            now[0] += step
        return a

    def clock():
        timed["on"] = not timed["on"]  # start/stop pairs bracket each timed call
        return now[0]

    monkeypatch.setattr(cpu_isa.torch, "matmul", fake_matmul)
    monkeypatch.setattr(cpu_isa.time, "perf_counter", clock)
    probe = cpu_isa.gemm_probe(m=4, k=8, n=16, repeats=3)
    assert probe.fp32_gflops == pytest.approx(2 * 4 * 8 * 16 / 0.020 / 1e9)
    assert probe.bf16_gflops == pytest.approx(2 * 4 * 8 * 16 / 0.060 / 1e9)
