"""The CPU kernels' source compiles for aarch64 (the Kunpeng 920 hosts of an Atlas 800I A2) with the flags the
build uses, by Debian's cross compiler: proof without an ARM machine that the x86 code sits behind its guards and
every op has a portable path.

Compiled to an object only: linking needs an aarch64 libtorch.  Skipped, saying so, where the cross compiler is
not installed (Debian/Ubuntu package ``g++-aarch64-linux-gnu``; CI installs it).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vicuna_bench import cpu_kernels

pytestmark = pytest.mark.integration

CROSS_CXX = "aarch64-linux-gnu-g++"
CROSS_PACKAGE = "g++-aarch64-linux-gnu"
# Kunpeng 920: ARMv8.2-A with NEON, no SVE.  (-march=native means nothing to a cross compiler.)
KUNPENG_MARCH = "armv8.2-a"
EM_AARCH64 = 183  # ELF e_machine of AArch64 (the ELF for the Arm 64-bit Architecture spec)


def object_command(command: list[str], obj: Path) -> list[str]:
    """The library's compiler call made to compile ``obj`` only: no -shared, no output library, no link flags."""
    cut = command.index("-o")  # the source comes before it; the library path and the link flags after
    return [part for part in command[:cut] if part != "-shared"] + ["-c", "-o", str(obj)]


@pytest.mark.skipif(shutil.which(CROSS_CXX) is None,
                    reason=f"no {CROSS_CXX} on PATH (Debian/Ubuntu: apt-get install {CROSS_PACKAGE})")
def test_kernel_source_compiles_for_aarch64(tmp_path, monkeypatch):
    """The build's own command with CXX set to the cross compiler and -march=armv8.2-a: an AArch64 object."""
    monkeypatch.setenv("CXX", CROSS_CXX)
    monkeypatch.setenv(cpu_kernels.ENV_MARCH, KUNPENG_MARCH)
    command = cpu_kernels.compile_command(tmp_path / cpu_kernels.LIBRARY)
    assert command[0] == CROSS_CXX and f"-march={KUNPENG_MARCH}" in command and str(cpu_kernels.SOURCE) in command
    obj = tmp_path / "cpu_kernels.o"
    done = subprocess.run(object_command(command, obj), capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 0, "\n".join(errors[:10] or done.stderr.splitlines()[-10:])
    header = obj.read_bytes()[:20]
    # ELF magic, 64-bit class, little-endian, e_machine (bytes 18-19)
    assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1, header
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64, header


def test_object_command_drops_only_the_link():
    """The object command keeps every compile flag of a library command and swaps the output and link flags."""
    library = ["g++", "-O3", "-march=x", "-shared", "-fPIC", "-Iinc", "src.cpp", "-o", "lib.so", "-Llib",
               "-Wl,-rpath,lib", "-lc10"]
    assert object_command(library, Path("k.o")) == ["g++", "-O3", "-march=x", "-fPIC", "-Iinc", "src.cpp", "-c",
                                                    "-o", "k.o"]
