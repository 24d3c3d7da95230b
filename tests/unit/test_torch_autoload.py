"""torch's backend autoload turned off by our front ends, torch_npu kept out of cpu/cuda runs, and how torch_npu came
in recorded.  The subprocess side (a broken torch_npu with a real ``torch.backends`` entry point):
tests/integration/test_torch_autoload.py.

Reference for the variable: torch/__init__.py (torch 2.13), ``_is_device_backend_autoload_enabled`` is
``os.getenv("TORCH_DEVICE_BACKEND_AUTOLOAD", "1") == "1"``.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from vicuna_bench import devices, torch_autoload

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _process_state(monkeypatch):
    """Each test's changes to this process's torch_npu state are undone: the front-end flag, the module devices.py
    imported, and ``sys.modules["torch_npu"]`` (absent before: absent after, whatever a test imported)."""
    monkeypatch.setattr(torch_autoload, "_front_end", torch_autoload._front_end)
    monkeypatch.setattr(devices, "_imported_here", devices._imported_here)
    monkeypatch.setitem(sys.modules, "torch_npu", sys.modules.get("torch_npu"))
    if sys.modules["torch_npu"] is None:
        monkeypatch.delitem(sys.modules, "torch_npu")


def test_a_front_end_turns_autoload_off_before_torch_loads():
    environ = {}
    assert torch_autoload.front_end_default(environ, modules={}) is True
    assert environ == {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}  # anything but "1" is off for torch


@pytest.mark.parametrize("users", ["1", "0", ""])
def test_the_users_setting_stays(users):
    environ = {"TORCH_DEVICE_BACKEND_AUTOLOAD": users}
    assert torch_autoload.front_end_default(environ, modules={}) is False
    assert environ == {"TORCH_DEVICE_BACKEND_AUTOLOAD": users}


def test_after_torch_is_imported_nothing_changes():
    # An in-process caller (a test importing cli.py) keeps its own environment: torch already read the variable.
    environ = {}
    assert torch_autoload.front_end_default(environ, modules={"torch": object()}) is False
    assert environ == {}


@pytest.mark.parametrize("args, device", [
    (["--device", "cpu", "-q"], "cpu"), (["-q", "--device=npu"], "npu"), (["--device", "npu", "--device", "cuda"], "cuda"),
    (["-q", "tests/unit"], None), (["--device"], None), (["--device-type", "d9"], None),
])
def test_the_device_is_found_in_pytest_args(args, device):
    assert torch_autoload.device_in_args(args) == device


def test_keeping_torch_npu_out_hides_it_from_find_spec_and_import():
    modules = {}
    assert torch_autoload.keep_torch_npu_out(modules) is True
    assert modules == {"torch_npu": None}
    torch_autoload.let_torch_npu_in(modules)
    assert modules == {}
    loaded = object()
    assert torch_autoload.keep_torch_npu_out({"torch_npu": loaded}) is False  # imported already: it stays


def test_none_in_sys_modules_is_what_transformers_probe_reads_as_absent(monkeypatch):
    # transformers' is_torch_npu_available: importlib.util.find_spec("torch_npu") is None -> False, no import.
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert importlib.util.find_spec("torch_npu") is None
    with pytest.raises(ImportError):
        import torch_npu  # noqa: F401


def test_a_front_ends_cpu_run_keeps_torch_npu_out_and_an_npu_request_lets_it_back(monkeypatch):
    monkeypatch.setattr(torch_autoload, "_front_end", True)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)  # restored after the test
    assert devices.resolve_device("cpu") == "cpu"
    assert sys.modules["torch_npu"] is None
    with pytest.raises(devices.UserError, match="torch_npu reports no NPU|torch_npu is installed but"):
        devices.resolve_device("npu")  # no torch_npu on this machine: the request is checked as before
    assert "torch_npu" not in sys.modules or sys.modules["torch_npu"] is not None


def test_outside_a_front_end_a_cpu_run_leaves_the_process_alone(monkeypatch):
    monkeypatch.setattr(torch_autoload, "_front_end", False)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert devices.resolve_device("cpu") == "cpu"
    assert "torch_npu" not in sys.modules


def test_torch_npu_imported_on_purpose_is_recorded_so(monkeypatch, tmp_path):
    """A working torch_npu package imported by devices.py reads ``import``; one already loaded reads ``autoload``."""
    import types

    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert devices.torch_npu_loaded_by() is None
    devices._import_torch_npu()
    assert devices.torch_npu_loaded_by() == "import"
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))  # as torch's autoload leaves it
    devices._import_torch_npu()
    assert devices.torch_npu_loaded_by() == "autoload"
