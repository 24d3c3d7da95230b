"""Device selection, the d9/d3 dtype rule and the environment record, with
availability faked (no NPU or GPU here): a fake ``torch_npu`` module, a fake
``torch.npu``, a patched ``torch.cuda.is_available``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import types

import pytest
import torch

from vicuna_bench import devices
from vicuna_bench.errors import UserError

_real_find_spec = importlib.util.find_spec


def fake_npu(monkeypatch, *, installed=True, importable=True, available=True, count=8, name="Ascend910B3"):
    """Make torch_npu look installed/importable and torch.npu report ``count`` devices."""
    spec = object() if installed else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == "torch_npu" else _real_find_spec(n, *a))
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu") if importable else None)
    npu = types.SimpleNamespace(
        is_available=lambda: available,
        device_count=lambda: count if available else 0,
        get_device_name=lambda index=0: name,
    )
    monkeypatch.setattr(torch, "npu", npu, raising=False)


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
        assert devices.resolve_device_type("auto") == "npu"
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


def test_auto_with_broken_torch_npu_falls_back_to_cpu(monkeypatch):
    fake_npu(monkeypatch, importable=False)
    fake_cuda(monkeypatch, False)
    choice = devices.select_device("auto")
    assert choice.device == "cpu"
    assert "no CUDA device" in choice.reason and "torch_npu cannot be imported" in choice.reason


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
        devices.resolve_device_type("npu")
    with pytest.raises(UserError, match=r"--device 'tpu' is not supported \(valid: auto, cpu, cuda, npu\)"):
        devices.resolve_device_type("tpu")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_d9_runs_fp16_and_bf16(dtype):
    devices.check_dtype_for_chip("npu", "d9", dtype)


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


def test_npu_environment_record(monkeypatch):
    fake_npu(monkeypatch, name="Ascend910B2C")
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda n: "2.1.0.post8" if n == "torch_npu" else real_version(n)
    )
    for k in devices.NPU_TIMING_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")
    monkeypatch.setenv("HCCL_BUFFSIZE", "110")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1,2,3")
    rec = devices.environment_record("npu", 1)
    assert rec["device_name"] == "Ascend910B2C"
    assert rec["torch_npu"] == "2.1.0.post8"
    assert rec["torch"] == torch.__version__
    assert rec["cuda"] is None
    assert rec["env"] == {
        "TASK_QUEUE_ENABLE": "1",
        "CPU_AFFINITY_CONF": None,
        "PYTORCH_NPU_ALLOC_CONF": None,
        "HCCL_CONNECT_TIMEOUT": None,
        "HCCL_EXEC_TIMEOUT": None,
        "HCCL_BUFFSIZE": "110",
        "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3",
    }


def test_npu_device_name_comes_from_torch_npu(monkeypatch):
    fake_npu(monkeypatch, name="Ascend310P3")
    assert devices.device_name_of("npu", 0) == "Ascend310P3"


def test_cpu_environment_record(monkeypatch):
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")  # an NPU setting: not recorded off NPU
    rec = devices.environment_record("cpu")
    assert rec["device_name"] == devices.cpu_model_name()
    assert (rec["torch_npu"], rec["cuda"], rec["env"]) == (None, None, {})
    assert rec["torch"] == torch.__version__
