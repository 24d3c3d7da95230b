"""The process's C heap while a CPU model serves: glibc's thresholds set once, so that a prefill's large buffers
are reused from the heap instead of being mapped, faulted in page by page and unmapped on every call.

glibc serves an allocation of at least its mmap threshold with a fresh ``mmap`` and gives it back on ``free``; the
threshold starts at 128 KiB and rises to the largest such block freed (at most 32 MiB on 64-bit hosts), and the heap
is trimmed back to the OS whenever more than twice the threshold lies free at its top.  Where a process never
frees a block above the size of a prefill's outputs, each prefill maps its outputs anew: SmolLM2-135M bf16 at batch
8 (2048-row products; a gate/up output is 12.6 MB) faulted in ~8,500 pages a generation compiled (the eager engine
~210,000), batch 1 ~3,700, where the frozen path's process, which had freed a larger block while compiling,
faulted in 2 (docs/PERFORMANCE.md, eighteenth pass).  Setting the thresholds to the values glibc's own rule
reaches after freeing a 32 MiB block (mmap threshold 32 MiB, trim threshold 64 MiB) makes every process serve
alike.

A user's own malloc settings (``MALLOC_*_`` variables, ``glibc.malloc`` tunables) are kept; other C libraries are
left as they are; ``VICUNA_BENCH_HEAP=0`` keeps glibc's defaults (for an A/B).  One log line says which.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

from .settings import switch_on

log = logging.getLogger("vicuna_bench")

# <malloc.h>'s mallopt parameters (glibc).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it (HEAP_MAX_SIZE / 2 on 64-bit hosts)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's dynamic rule sets beside it

SWITCH = "VICUNA_BENCH_HEAP"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state: dict = {"said": None}


@functools.cache
def _libc() -> str:
    """``glibc``, or ``""`` where Python cannot tell (musl names none); read from the interpreter's binary once."""
    return platform.libc_ver()[0]


def _mallopt(param: int, value: int) -> int:
    """glibc's ``mallopt`` in this process (1 on success)."""
    return ctypes.CDLL(None).mallopt(ctypes.c_int(param), ctypes.c_int(value))


def user_setting() -> str | None:
    """The user's own malloc setting in the environment, if any (glibc read it at start-up)."""
    for name in USER_SETTINGS:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES (glibc.malloc.*)"
    return None


def decide() -> str | None:
    """Why the heap is left as it is here (None: set it)."""
    if not switch_on(SWITCH):
        return f"{SWITCH}=0: glibc's defaults"
    libc = _libc()
    if libc != "glibc":
        return f"C library {libc or 'unknown'}: left as it is"
    setting = user_setting()
    if setting is not None:
        return f"left as set by {setting}"
    return None


SET = (f"buffers below {MMAP_THRESHOLD >> 20} MiB from the heap, {TRIM_THRESHOLD >> 20} MiB kept free at its top "
       "(glibc mallopt)")


def keep_large_buffers() -> str:
    """Once per process: set glibc's mmap and trim thresholds (module docstring); return what was done, one line
    (logged the first time)."""
    if _state["said"] is not None:
        return _state["said"]
    why_not = decide()
    if why_not is None:
        done = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        said = SET if done else "glibc refused mallopt: its defaults"
    else:
        said = why_not
    _state["said"] = said
    log.info("C heap: %s", said)
    return said


def describe() -> str:
    """For the environment record: what :func:`keep_large_buffers` did in this process, else what it does in a CPU
    rank started with this environment."""
    return _state["said"] or decide() or SET


def status() -> str | None:
    """What :func:`keep_large_buffers` did in this process (None: not called)."""
    return _state["said"]
