"""Building and loading our CPU kernels: the cache key, the first compiler error, a recorded failure obeyed without
a compiler, a library that cannot be loaded rebuilt once.  In-process: the compiler and the loader are faked here;
tests/integration/test_kernel_build.py runs real and fake compilers."""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import pytest
import torch

from vicuna_bench import cpu_kernels

pytestmark = pytest.mark.unit

# Captured from this machine's compilers (gcc 12.2, Debian 12) on three small sources: an x86 header under the
# aarch64 cross compiler, two undeclared names, a missing library.
IMMINTRIN_ON_AARCH64 = """\
/tmp/x.cpp:1:10: fatal error: immintrin.h: No such file or directory
    1 | #include <immintrin.h>
      |          ^~~~~~~~~~~~~
compilation terminated.
"""
UNDECLARED = """\
/tmp/y.cpp: In function \u2018int f()\u2019:
/tmp/y.cpp:1:17: error: \u2018undeclared_lane\u2019 was not declared in this scope
    1 | int f(){ return undeclared_lane; }
      |                 ^~~~~~~~~~~~~~~
/tmp/y.cpp: In function \u2018int g()\u2019:
/tmp/y.cpp:2:17: error: \u2018also_missing\u2019 was not declared in this scope
    2 | int g(){ return also_missing; }
      |                 ^~~~~~~~~~~~
"""
# The aarch64 cross compiler linking against this (x86) torch: `VICUNA_BENCH_CPU_MARCH=armv8.2-a
# CXX=aarch64-linux-gnu-g++ python -m vicuna_bench.cpu_kernels`, build.log lines 18-19 and 27, paths shortened.
CROSS_LINK = """\
/usr/lib/gcc-cross/aarch64-linux-gnu/12/../../../../aarch64-linux-gnu/bin/ld: skipping incompatible \
/venv/torch/lib/libc10.so when searching for -lc10
/usr/lib/gcc-cross/aarch64-linux-gnu/12/../../../../aarch64-linux-gnu/bin/ld: cannot find -lc10: No such file or \
directory
collect2: error: ld returned 1 exit status
"""
MISSING_LIBRARY = """\
/usr/bin/ld: cannot find -lnosuchlib: No such file or directory
collect2: error: ld returned 1 exit status
"""


@pytest.mark.parametrize("output, first", [
    (IMMINTRIN_ON_AARCH64, "/tmp/x.cpp:1:10: fatal error: immintrin.h: No such file or directory"),
    (UNDECLARED, "/tmp/y.cpp:1:17: error: \u2018undeclared_lane\u2019 was not declared in this scope"),
    (MISSING_LIBRARY, "/usr/bin/ld: cannot find -lnosuchlib: No such file or directory"),
    (CROSS_LINK, "/usr/lib/gcc-cross/aarch64-linux-gnu/12/../../../../aarch64-linux-gnu/bin/ld: cannot find -lc10: "
                 "No such file or directory"),
    ("", "(no output)"),
    ("c++: warning: something odd\n", "c++: warning: something odd"),
])
def test_the_first_error_line_not_the_last(output, first):
    assert cpu_kernels.first_error(output) == first


def test_libc_version_is_the_running_glibc():
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    assert cpu_kernels.libc_version() == "glibc " + libc.gnu_get_libc_version().decode()


def test_compiler_identity_follows_the_binary(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "g++-fake"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    first = cpu_kernels.compiler_identity("g++-fake")
    assert first.startswith(f"{fake} 17 ")  # resolved path, then the size: 10 + 7 bytes written above
    fake.write_text("#!/bin/sh\n# 13.1\nexit 1\n")  # an upgraded compiler: another binary
    assert cpu_kernels.compiler_identity("g++-fake") != first
    assert cpu_kernels.compiler_identity("no-such-compiler") == "no-such-compiler: not found"


@pytest.mark.parametrize("change", ["glibc", "compiler", "machine", "march"])
def test_the_key_covers_glibc_the_compiler_and_the_machine(monkeypatch, change):
    before = cpu_kernels.build_key()
    before_machine = cpu_kernels.platform.machine()  # another machine than this one (an aarch64 host runs this too)
    assert cpu_kernels.build_key() == before  # nothing changed: the same key
    if change == "glibc":
        monkeypatch.setattr(cpu_kernels, "libc_version", lambda: "glibc 2.28")  # openEuler 20.03, RHEL 8
    elif change == "compiler":
        monkeypatch.setattr(cpu_kernels, "compiler_identity", lambda name: "/usr/bin/g++-7 100 1")
    elif change == "machine":
        monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "ppc64le" if before_machine == "aarch64" else "aarch64")
    else:
        monkeypatch.setenv(cpu_kernels.ENV_MARCH, "haswell")
    assert cpu_kernels.build_key() != before


@pytest.mark.parametrize("machine, march, flag", [
    ("x86_64", None, "-march=native"),
    ("aarch64", None, "-mcpu=native"),  # gcc's AArch64 native detection: arch and extensions, tuned for the core
    ("aarch64", "armv8.2-a", "-march=armv8.2-a"),
])
def test_the_target_flag_per_machine(monkeypatch, machine, march, flag):
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: machine)
    if march:
        monkeypatch.setenv(cpu_kernels.ENV_MARCH, march)
    else:
        monkeypatch.delenv(cpu_kernels.ENV_MARCH, raising=False)
    command = cpu_kernels.compile_command(Path("out.so"))
    assert [a for a in command if a.startswith(("-march=", "-mcpu="))] == [flag]


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch):
    """A fresh cache, and this process's load state forgotten for the test (restored after)."""
    monkeypatch.setenv("VICUNA_BENCH_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    for key in ("loaded", "why_not", "isa"):
        monkeypatch.setitem(cpu_kernels._state, key, None)
    return tmp_path


def record(reason: str) -> Path:
    directory = cpu_kernels.library_path().parent
    directory.mkdir(parents=True)
    (directory / cpu_kernels.FAILED).write_text(reason + "\n")
    return directory


def test_a_recorded_failure_is_obeyed_without_a_compiler(scratch_cache, caplog):
    """The unit tier refuses any process: a load that tried to compile would fail this test."""
    reason = ("building cpu_kernels.cpp failed (exit 1): x.cpp:1:10: fatal error: immintrin.h: No such file or "
              "directory (compiler output: /cache/kernels/k/build.log)")
    record(reason)
    assert cpu_kernels.build_failure() == reason
    with pytest.raises(cpu_kernels.KernelBuildError, match="immintrin.h"):
        cpu_kernels.build()
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        assert cpu_kernels.load() is False
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"CPU linear layers: F.linear only (small-M GEMM unavailable: {reason})"]
    assert cpu_kernels.status()["small_m_gemm_why_not"] == reason
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(cpu_kernels.linear(x, w), x @ w.T)  # F.linear: the same float products and sums


def test_no_record_where_nothing_failed(scratch_cache):
    assert cpu_kernels.build_failure() is None


# What dlopen says for a library linked against a newer glibc (the loader's format: version `X' not found).
GLIBC_MISMATCH = "/lib64/libc.so.6: version `GLIBC_2.32' not found (required by {})"


def fake_builds_and_loads(monkeypatch, loads_fail: int):
    """A compiler that writes a new library file each call, and a loader that fails the first ``loads_fail``."""
    calls = {"compile": 0, "load": 0}

    def compile_into(target):
        calls["compile"] += 1
        target.write_bytes(b"\x7fELF rebuilt %d" % calls["compile"])
        return target

    def load_library(path):
        calls["load"] += 1
        if calls["load"] <= loads_fail:
            raise OSError(GLIBC_MISMATCH.format(path))

    monkeypatch.setattr(cpu_kernels, "_compile_into", compile_into)
    monkeypatch.setattr(torch.ops, "load_library", load_library)
    return calls


def test_a_library_that_cannot_load_is_rebuilt_once(scratch_cache, monkeypatch):
    target = cpu_kernels.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF built on a host with a newer glibc")
    calls = fake_builds_and_loads(monkeypatch, loads_fail=1)
    cpu_kernels._load_library(build_if_missing=True)
    assert calls == {"compile": 1, "load": 2}
    assert cpu_kernels.build_failure() is None


def test_a_rebuild_that_still_cannot_load_is_recorded(scratch_cache, monkeypatch):
    target = cpu_kernels.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF truncated")
    calls = fake_builds_and_loads(monkeypatch, loads_fail=99)
    with pytest.raises(cpu_kernels.KernelBuildError, match="rebuilt and still cannot be loaded.*GLIBC_2.32"):
        cpu_kernels._load_library(build_if_missing=True)
    assert calls == {"compile": 1, "load": 2}
    assert "GLIBC_2.32" in cpu_kernels.build_failure()
    with pytest.raises(cpu_kernels.KernelBuildError, match="GLIBC_2.32"):  # the next process: no third try
        cpu_kernels._load_library(build_if_missing=True)
    assert calls == {"compile": 1, "load": 2}


def test_without_building_an_unloadable_library_is_only_reported(scratch_cache, monkeypatch):
    target = cpu_kernels.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    calls = fake_builds_and_loads(monkeypatch, loads_fail=99)
    with pytest.raises(cpu_kernels.KernelBuildError, match="cannot be loaded"):
        cpu_kernels._load_library(build_if_missing=False)
    assert calls == {"compile": 0, "load": 1}
    assert cpu_kernels.build_failure() is None  # the unit tier's view is not a verdict on the build
