"""Device selection, the d9/d3 dtype rule and the environment record, with
availability faked (no NPU or GPU here): a fake ``torch_npu`` module, a fake
``torch.npu``, a patched ``torch.cuda.is_available``."""

from __future__ import annotations

import importlib.metadata
import io
import importlib.util
import logging
import platform
import sys
import types

import pytest
import torch

from tests.npu_fake import FakeNpu, accept_npu_devices
from vicuna_bench import devices, energy, environment, heap
from vicuna_bench.errors import UserError

pytestmark = pytest.mark.unit

_real_find_spec = importlib.util.find_spec
# shared/spec/NPU.md, "Environment that changes behaviour or timings (record it with results)".
NPU_ENV_IN_SPEC = ("ASCEND_RT_VISIBLE_DEVICES", "TASK_QUEUE_ENABLE", "CPU_AFFINITY_CONF", "PYTORCH_NPU_ALLOC_CONF",
                   "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_BUFFSIZE")


def fake_npu(monkeypatch, *, installed=True, importable=True, available=True, count=8, name="Ascend910B3",
             release=None) -> FakeNpu:
    """Make torch_npu look installed/importable and torch.npu report ``count`` devices (tests/npu_fake.py).

    ``release``: the torch_npu version the package metadata reports (None: left as this machine's, none)."""
    spec = object() if installed else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == "torch_npu" else _real_find_spec(n, *a))
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu") if importable else None)
    npu = FakeNpu(release or "2.1.0.post10", names=[name] * count, available=available)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(devices, "_made_current", None)  # a fresh process: no device made current
    if release is not None:
        real_version = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda n: release if n in ("torch_npu", "torch-npu") else real_version(n))
    return npu


def fake_cuda(monkeypatch, available: bool, count: int = 2):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


def test_auto_prefers_npu(monkeypatch, caplog):
    fake_npu(monkeypatch)
    fake_cuda(monkeypatch, True)
    choice = devices.select_device("auto")
    assert choice.device == "npu"
    assert choice.reason == "--device auto: npu (8 devices visible through torch_npu)"
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert devices.resolve_device("auto") == "npu"
    assert [r.getMessage() for r in caplog.records] == [choice.reason]


def test_auto_falls_back_to_cuda_saying_why(monkeypatch):
    fake_npu(monkeypatch, installed=False)
    fake_cuda(monkeypatch, True, count=1)
    choice = devices.select_device("auto")
    assert choice == devices.DeviceChoice("cuda", "--device auto: cuda (1 device visible; torch_npu is not installed)")


def test_auto_with_npu_installed_but_none_present_picks_cuda(monkeypatch):
    fake_npu(monkeypatch, available=False)
    fake_cuda(monkeypatch, True)
    choice = devices.select_device("auto")
    assert choice.device == "cuda" and "torch_npu reports no NPU" in choice.reason


def broken_torch_npu(monkeypatch, tmp_path, failure: str):
    """A torch_npu package on sys.path whose import raises ImportError(``failure``), as a bad CANN install does."""
    package = tmp_path / "site" / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({failure!r})\n")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


def test_auto_with_torch_npu_installed_but_failing_to_import_is_an_error_showing_why(monkeypatch, tmp_path):
    broken_torch_npu(monkeypatch, tmp_path, "libhccl.so: cannot open shared object file: No such file or directory")
    fake_cuda(monkeypatch, True)  # a usable GPU does not hide the broken NPU install
    with pytest.raises(UserError) as err:
        devices.select_device("auto")
    assert str(err.value) == (
        "--device auto: torch_npu is installed but cannot be imported (ImportError: libhccl.so: cannot open shared "
        "object file: No such file or directory); install torch + torch_npu as a pair, or pass --device cpu|cuda")


def test_torch_npu_known_to_pip_but_missing_its_files_is_installed(monkeypatch):
    """``pip`` lists torch-npu yet the module is gone: still installed, so the failed import is an error."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_npu" else _real_find_spec(n, *a))
    real_distribution = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda n: object() if n in ("torch_npu", "torch-npu") else real_distribution(n))
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    fake_cuda(monkeypatch, False)
    with pytest.raises(UserError, match=r"^--device auto: torch_npu is installed but cannot be imported \("
                                        r"ModuleNotFoundError: "):
        devices.select_device("auto")


def test_auto_on_a_plain_machine_is_cpu(monkeypatch):
    fake_npu(monkeypatch, installed=False)
    fake_cuda(monkeypatch, False)
    assert devices.select_device("auto") == devices.DeviceChoice(
        "cpu", "--device auto: cpu (no CUDA device; torch_npu is not installed)"
    )


def test_explicit_devices_are_checked(monkeypatch):
    fake_npu(monkeypatch, installed=False)
    fake_cuda(monkeypatch, False)
    assert devices.select_device("cpu") == devices.DeviceChoice("cpu", "--device cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        devices.select_device("cuda")
    with pytest.raises(UserError, match="torch_npu reports no NPU"):
        devices.resolve_device("npu")
    with pytest.raises(UserError, match=r"--device 'tpu' is not supported \(valid: auto, cpu, cuda, npu\)"):
        devices.resolve_device("tpu")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_d9_runs_fp16_bf16_and_fp32_where_d3_runs_fp16_only(dtype):
    """The 910B (d9) runs all three; the 310P (d3) has no bf16 and its cube unit no fp32 (devices.CHIP_FAMILIES)."""
    assert devices.dtype_skip_reason("npu", "d9", dtype) is None
    devices.check_dtype_for_chip("npu", "d9", dtype)
    if dtype == "fp16":
        assert devices.dtype_skip_reason("npu", "d3", dtype) is None
        devices.check_dtype_for_chip("npu", "d3", dtype)
    else:
        reason = f"d3 (Atlas 300I DUO (Ascend 310P)) runs fp16 only, not {dtype}"
        assert devices.dtype_skip_reason("npu", "d3", dtype) == reason
        with pytest.raises(UserError, match=rf"^--dtype {dtype} is not supported on --device-type d3 "):
            devices.check_dtype_for_chip("npu", "d3", dtype)


def test_d3_runs_fp16_only():
    devices.check_dtype_for_chip("npu", "d3", "fp16")
    with pytest.raises(UserError) as err:
        devices.check_dtype_for_chip("npu", "d3", "bf16")
    assert str(err.value) == (
        "--dtype bf16 is not supported on --device-type d3 (Atlas 300I DUO (Ascend 310P) runs fp16 only): pass --dtype fp16"
    )


def test_d3_auto_resolving_to_bf16_says_so():
    with pytest.raises(UserError, match=r"^--dtype auto resolved to bf16 is not supported on --device-type d3"):
        devices.check_dtype_for_chip("npu", "d3", "bf16", requested="auto")


def test_chip_family_is_ignored_off_npu_but_must_be_valid():
    devices.check_dtype_for_chip("cuda", "d3", "bf16")  # the chip family only applies to NPUs
    devices.check_dtype_for_chip("cpu", None, "bf16")
    with pytest.raises(UserError, match=r"--device-type 'd5' is not supported \(valid: d9 = .*, d3 = .*\)"):
        devices.check_dtype_for_chip("cpu", "d5", "fp32")


@pytest.mark.parametrize(
    "name, family",
    [("Ascend910B3", "d9"), ("Ascend910B2C", "d9"), ("Ascend 910B4", "d9"), ("Ascend310P3", "d3"), ("Ascend910_9392", None)],
)
def test_chip_family_of_device_names(name, family):
    assert devices.chip_family_of(name) == family


def test_npu_environment_record(monkeypatch, tmp_path):
    fake_npu(monkeypatch, name="Ascend910B2C")
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda n: "2.1.0.post8" if n == "torch_npu" else real_version(n)
    )
    for k in NPU_ENV_IN_SPEC:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")
    monkeypatch.setenv("HCCL_BUFFSIZE", "110")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(devices.cpu_isa, "CPUINFO", tmp_path / "no-cpuinfo")  # the host CPU's ISA: unknown
    monkeypatch.setattr(devices, "_AUTOLOAD_SEEN", "0")  # as a front end leaves it (vicuna_bench.torch_autoload)
    accept_npu_devices(monkeypatch, torch)
    devices.device_for_rank("npu", 1, "off")  # a rank records after its device is up
    monkeypatch.setattr(energy, "describe", lambda device, indices: {"source": "npu-smi", "asked": (device, indices)})
    assert environment.environment_record("npu", 1) == {
        "device_type": "npu",
        "device_name": "Ascend910B2C",
        "chip_family": "d9",  # a 910B: Atlas 800I A2 (shared/spec/NPU.md)
        "torch": torch.__version__,
        "torch_npu": "2.1.0.post8",
        "torchair": "6.0.rc3",  # Huawei's release notes: torch_npu 2.1.0.post8 ships torchair 6.0.rc3
        "cuda": None,
        "torch_npu_loaded_by": "autoload",  # the fake was in sys.modules before devices.py asked for it
        "torch_device_backend_autoload": "0",
        "npu_jit_compile": "off",  # read back through is_jit_compile_false
        "python": platform.python_version(),
        "cpu_isa": "unknown", "cpu_isa_flags": [], "cpu_emulated": None, "cpu_dtype_auto": None,
        "energy": {"source": "npu-smi", "asked": ("npu", [1])},  # the rank's own device's meter
        # Every variable shared/spec/NPU.md says to record with results; unset ones as None.
        "env": {k: None for k in NPU_ENV_IN_SPEC} | {
            "TASK_QUEUE_ENABLE": "1", "HCCL_BUFFSIZE": "110", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"},
    }


def test_the_record_names_the_ranks_own_device(monkeypatch):
    """Rank 1's record describes device 1, with the chip family of that device's name."""
    fake_npu(monkeypatch)
    names = {0: "Ascend910B3", 1: "Ascend310P3"}
    monkeypatch.setattr(torch.npu, "get_device_name", lambda index=0: names[index])
    record = environment.environment_record("npu", 1)
    assert (record["device_name"], record["chip_family"]) == ("Ascend310P3", "d3")


# Captured from a Xeon E5620 host: the kernel pads the name as the CPU reports it.
CPUINFO_E5620 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 44
model name\t: Intel(R) Xeon(R) CPU           E5620  @ 2.40GHz
stepping\t: 2

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU           E5620  @ 2.40GHz
"""


def test_cpu_environment_record(monkeypatch, tmp_path):
    from vicuna_bench import cpu_kernels

    # Loaded once per process, for this host's real flags (make kernels built it), before cpuinfo is faked below;
    # where the build failed (recorded: no compiler, a source the compiler rejects) F.linear runs, and says why.
    loaded = cpu_kernels.load(build_if_missing=False)
    assert loaded or cpu_kernels.build_failure(), cpu_kernels.status()
    (tmp_path / "cpuinfo").write_text(CPUINFO_E5620)
    monkeypatch.setattr(devices.cpu_isa, "CPUINFO", tmp_path / "cpuinfo")  # no flags line: ISA unknown
    real_open = open
    monkeypatch.setattr(devices, "open", lambda path, *a, **k: io.StringIO(CPUINFO_E5620)
                        if path == "/proc/cpuinfo" else real_open(path, *a, **k), raising=False)
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")  # an NPU setting: not recorded off NPU
    monkeypatch.setattr(devices, "_AUTOLOAD_SEEN", None)  # unset: torch's default (autoload on)
    monkeypatch.setattr(energy, "describe", lambda device, indices: {"source": "n/a", "asked": (device, indices)})
    monkeypatch.setitem(heap._state, "said", None)  # no rank in this process has set the C heap yet
    monkeypatch.setenv(heap.SWITCH, "0")
    assert environment.environment_record("cpu") == {
        "device_type": "cpu", "device_name": "Intel(R) Xeon(R) CPU E5620 @ 2.40GHz", "chip_family": None,
        "torch": torch.__version__, "torch_npu": None, "torchair": None, "cuda": None,
        "torch_npu_loaded_by": None, "torch_device_backend_autoload": None, "npu_jit_compile": None,
        "python": platform.python_version(), "cpu_isa": "unknown", "cpu_isa_flags": [], "cpu_emulated": None,
        "cpu_dtype_auto": None, "small_m_gemm": loaded, "small_m_gemm_isa": cpu_kernels.status()["small_m_gemm_isa"],
        "small_m_gemm_why_not": None if loaded else cpu_kernels.build_failure(),
        "cpu_linear_paths": cpu_kernels.paths_record(), "c_heap": "VICUNA_BENCH_HEAP=0: glibc's defaults",
        "energy": {"source": "n/a", "asked": ("cpu", [0])}, "env": {},
    }


# ---------------------------------------------------------------- chip detection (--device-type auto)

@pytest.mark.parametrize("name, family", [("Ascend910B3", "d9"), ("Ascend910B2C", "d9"), ("Ascend310P3", "d3")])
def test_device_type_auto_detects_the_family(monkeypatch, name, family):
    fake_npu(monkeypatch, name=name)
    assert devices.resolve_chip_family("npu", "auto") == family
    assert devices.resolve_chip_family("npu", family) == family  # the matching explicit value is kept


def test_a_device_type_that_contradicts_the_chip_is_a_one_line_error(monkeypatch):
    fake_npu(monkeypatch, name="Ascend310P3")
    with pytest.raises(UserError) as err:
        devices.resolve_chip_family("npu", "d9", 1)
    assert str(err.value) == ("--device-type d9 contradicts NPU 1: Ascend310P3 is d3 (Atlas 300I DUO (Ascend 310P)); "
                              "pass --device-type d3 or auto")


def test_a_chip_of_neither_family_has_no_rule(monkeypatch, caplog):
    fake_npu(monkeypatch, name="Ascend910_9392")
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert devices.resolve_chip_family("npu", "auto") is None
    assert "Ascend910_9392 is neither a 910B (d9) nor a 310P (d3)" in caplog.text
    assert devices.resolve_chip_family("npu", "d9") == "d9"  # nothing to contradict


def test_off_npu_nothing_is_detected(monkeypatch):
    monkeypatch.setattr(torch, "npu", None, raising=False)  # any use would raise
    assert devices.resolve_chip_family("cpu", "auto") is None
    assert devices.resolve_chip_family("cuda", "d3") == "d3"  # carried as given, ignored
    with pytest.raises(UserError, match=r"^--device-type 'd5' is not supported \(valid: auto \(detected\), d9 = "):
        devices.resolve_chip_family("cpu", "d5")


@pytest.mark.parametrize("device, chip, dtype, reason", [
    ("npu", "d3", "bf16", "d3 (Atlas 300I DUO (Ascend 310P)) runs fp16 only, not bf16"),
    ("npu", "d3", "fp32", "d3 (Atlas 300I DUO (Ascend 310P)) runs fp16 only, not fp32"),
    ("npu", "d3", "fp16", None),
    ("npu", "d9", "bf16", None),
    ("npu", "d9", "fp32", None),
    ("npu", None, "bf16", None),  # a chip of neither family: no rule to skip by
    ("cuda", "d3", "bf16", None),
])
def test_hw_dtype_skip_reason(device, chip, dtype, reason):
    assert devices.dtype_skip_reason(device, chip, dtype) == reason


def test_device_type_reaches_the_spec_and_contradiction_stops_the_cli(monkeypatch, tiny_models, capsys):
    from vicuna_bench.cli import main
    from vicuna_bench.spec import ModelChoices, resolve_engine_spec

    fake_npu(monkeypatch, name="Ascend310P3")
    fake_torch_npu = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda n: "2.1.0.post12" if n in ("torch_npu", "torch-npu") else fake_torch_npu(n))
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), 1, "npu", "fp16", 64, compile="auto"),
                               progress=False, decode_steps=10**7)
    assert (spec.chip_family, spec.compile) == ("d3", "off")  # d3 runs eager
    assert main(["run", "--model-path", str(tiny_models["gqa"]), "--device", "npu", "--device-type", "d9",
                 "--dtype", "fp16", "--prompt-ids", "5"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert err == ["vicuna-bench run: error: --device-type d9 contradicts NPU 0: Ascend310P3 is d3 "
                   "(Atlas 300I DUO (Ascend 310P)); pass --device-type d3 or auto"]


def test_npu_environment_record_has_the_family_and_torchair(monkeypatch):
    fake_npu(monkeypatch, name="Ascend910B3")
    real_version = importlib.metadata.version
    # An older torch_npu than the table knows is unknown (a newer one is taken for the newest: npu_graph).
    for wheel, torchair in (("2.1.0.post10", "6.0.0"), ("2.1.0.post3", "unknown")):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda n, w=wheel: w if n in ("torch_npu", "torch-npu") else real_version(n))
        rec = environment.environment_record("npu")
        assert (rec["chip_family"], rec["torch_npu"], rec["torchair"]) == ("d9", wheel, torchair)
    cpu = environment.environment_record("cpu")
    assert (cpu["chip_family"], cpu["torchair"]) == (None, None)


# ---------------------------------------------------------------- NPU operator compile mode (torch.npu.set_compile_mode)

@pytest.mark.parametrize("mode, jit_compile", [("off", False), ("on", True)])
def test_a_rank_sets_the_compile_mode_right_after_its_device(monkeypatch, mode, jit_compile):
    npu = fake_npu(monkeypatch, release="2.6.0")
    accept_npu_devices(monkeypatch, torch)
    devices.device_for_rank("npu", 3, mode)
    assert (npu.current, npu.compile_mode_calls) == (3, [jit_compile])
    assert devices.npu_jit_compile_now(3) == mode  # read back through is_jit_compile_false, on this rank's device
    assert npu.contexts == [3]
    assert environment.environment_record("npu", 3)["npu_jit_compile"] == mode


def test_no_mode_given_leaves_torch_npus_and_reading_it_needs_the_runtime_up(monkeypatch):
    npu = fake_npu(monkeypatch, release="2.6.0")
    # is_jit_compile_false would bring the runtime up on the current device (npu_config.py calls _lazy_init): not read.
    assert devices.npu_jit_compile_now(0) is None and npu.contexts == []
    accept_npu_devices(monkeypatch, torch)
    devices.device_for_rank("npu", 2)
    assert npu.compile_mode_calls == []


def test_the_compile_mode_choices():
    assert [devices.resolve_jit_compile("npu", chip) for chip in ("d9", "d3", None)] == ["off", "off", "off"]
    assert devices.resolve_jit_compile("npu", "d9", "on") == "on"
    assert devices.resolve_jit_compile("cpu", None, "on") is None  # nothing to set off NPU
    with pytest.raises(UserError, match=r"^--npu-jit-compile 'yes' is not supported \(valid: auto, on, off\)$"):
        devices.resolve_jit_compile("npu", "d9", "yes")
