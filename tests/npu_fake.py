"""A fake ``torch.npu`` that records on which device each runtime context is made, as torch_npu's wheels behave.

Read from the wheels (``pip download --no-deps --only-binary=:all: --platform manylinux2014_aarch64
--python-version 3.10 torch-npu==2.1.0.post10`` and ``torch-npu==2.6.0``):

* ``set_device(i)`` (``_npu_setDevice``) makes device ``i`` current; its default context is made there (CANN's
  AscendCL reference, ``aclrtCreateContext``: the default Context is created implicitly by ``aclrtSetDevice``).
* ``_lazy_init`` (``torch_npu/npu/__init__.py``) runs ``_npu_init`` once per process: the runtime comes up on the
  *current* device, 0 unless ``set_device`` ran.  ``is_initialized`` is that flag.
* 2.1.0.post10 ``get_device_name`` (``torch_npu/npu/utils.py``) calls ``_lazy_init`` before reading the properties;
  2.6.0's (``torch_npu/npu/__init__.py``) returns ``_npu_getDeviceName()``, the SoC name, without it.
  ``get_device_properties`` calls ``_lazy_init`` in both.
* ``set_compile_mode(jit_compile)`` (``npu_config.py``) synchronises if initialised, then sets the option;
  ``is_jit_compile_false`` calls ``_lazy_init`` first.
"""

from __future__ import annotations

NEW_NAME_API = (2, 5, 1)  # from here get_device_name needs no runtime (shared/spec/NPU.md)


class FakeNpu:
    """One process's ``torch.npu``: ``contexts`` lists the devices a runtime context was made on, in order."""

    def __init__(self, release: str = "2.1.0.post10", names=("Ascend910B3",) * 8, available: bool = True,
                 jit_compile: bool = True):
        self.release = tuple(int(p) for p in release.split(".")[:3] if p.isdigit())
        self.names = list(names)
        self.available = available
        self.current = 0
        self.initialized = False
        self.contexts: list[int] = []
        self.jit_compile = jit_compile  # the chip's default until set_compile_mode
        self.compile_mode_calls: list[bool] = []

    def _context(self, index: int) -> None:
        if index not in self.contexts:
            self.contexts.append(index)

    def _lazy_init(self) -> None:
        if not self.initialized:
            self.initialized = True
            self._context(self.current)

    def _check(self, index) -> int:
        index = 0 if index is None else int(getattr(index, "index", index) or 0)
        if not 0 <= index < self.device_count():
            raise AssertionError("Invalid device id")
        return index

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return len(self.names) if self.available else 0

    def is_initialized(self) -> bool:
        return self.initialized

    def set_device(self, index) -> None:
        index = self._check(index)
        self.current = index
        self._context(index)

    def current_device(self) -> int:
        self._lazy_init()
        return self.current

    def get_device_name(self, index=None) -> str:
        index = self._check(index)
        if self.release < NEW_NAME_API:
            self._lazy_init()
            return self.names[index]
        return self.names[0]  # the SoC name, whatever the index

    def set_compile_mode(self, jit_compile: bool = False) -> None:
        self.jit_compile = bool(jit_compile)
        self.compile_mode_calls.append(bool(jit_compile))

    def is_jit_compile_false(self) -> bool:
        self._lazy_init()
        return not self.jit_compile

    def synchronize(self, device=None) -> None:
        pass


class NpuDevice:
    """``torch.device("npu", i)`` where torch_npu has not named torch's privateuse1 backend ``npu``."""

    def __init__(self, type: str, index: int | None = None):
        self.type, self.index = type, index

    def __eq__(self, other) -> bool:
        return (getattr(other, "type", None), getattr(other, "index", None)) == (self.type, self.index)

    def __repr__(self) -> str:
        return f"device(type={self.type!r}, index={self.index})"


def accept_npu_devices(monkeypatch, torch) -> None:
    """Let ``torch.device`` build ``npu`` devices for the test (as it does once torch_npu is imported)."""
    real = torch.device

    def device(type, index=None):
        if type == "npu":
            return NpuDevice(type, index)
        return real(type) if index is None else real(type, index)

    monkeypatch.setattr(torch, "device", device)


def install_npu_host(monkeypatch, name: str, release: str = "2.6.0") -> FakeNpu:
    """Make this process a host whose torch_npu ``release`` reports 8 NPUs named ``name``; the fake ``torch.npu``."""
    import importlib.metadata
    import importlib.util
    import sys
    import types

    import torch

    from vicuna_bench import devices

    real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "torch_npu" else real_find_spec(n, *a))
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda n: release if n in ("torch_npu", "torch-npu") else real_version(n))
    fake = FakeNpu(release, names=[name] * 8)
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    monkeypatch.setattr(devices, "_made_current", None)  # a fresh process: no device made current
    return fake
