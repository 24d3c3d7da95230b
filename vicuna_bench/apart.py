"""Compiling in a forked child process: what the compiler leaves resident goes with the child.

CPython's small-object allocator hands an arena back to the OS only when
every object in it has been freed.  Dynamo's traces, inductor's code
generation and AOTInductor's build leave their arenas partly used, so a
process that compiled its graphs serves with more resident than one that
loaded the same code from the caches: SmolLM2 bf16 with our kernels,
1.56-1.64x weights + KV against 1.31x (docs/PERFORMANCE.md, "Fourteenth
pass").  :func:`run` does a compile in a forked child instead; the child
fills the caches on disk and exits, and this process loads from them.
Forked, the child shares this process's memory page by page (copy on write:
the weights, an exported program) and needs nothing handed over.

In the child:

* one intra-op thread.  libgomp's thread team does not survive a fork: a
  parallel region of two threads in the child waits for a thread that is not
  there (measured here: a forked child's matmul after the parent's hung until
  killed).  Code the child runs must therefore size its parallel regions when
  it runs (inductor's ``cpp.dynamic_threads``), and code it generates is
  generated for this process's thread count, not the child's:
  :func:`code_threads`.
* one compile thread (inductor's ``compile_threads``): this process's
  compile workers are not the child's, and starting a pool there costs more
  than the one or two C++ builds it would share.

Where the OS does not fork (not Linux), :func:`run` runs the work here.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import torch

# The intra-op thread count of the process that forked this one (None outside a child of :func:`run`).
_PARENT_THREADS: int | None = None


def available() -> bool:
    """Whether :func:`run` forks here (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def code_threads() -> int:
    """The thread count to generate code for: the forking process's inside a child of :func:`run`, else torch's."""
    return _PARENT_THREADS if _PARENT_THREADS is not None else torch.get_num_threads()


def run(work: Callable[[], Any], what: str) -> tuple[Any, str]:
    """``work()`` in a forked child where :func:`available`, else here: (what it returned, where it ran: "a child
    process" or "this process").  The returned value crosses as JSON; a child that fails or dies raises
    RuntimeError here, naming ``what`` and the child's error in one line."""
    if not available():
        return work(), "this process"
    threads = torch.get_num_threads()
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read_end)
            _enter_child(threads)
            said = json.dumps({"value": work()})
            code = 0
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
            from .errors import first_line

            said = json.dumps({"error": f"{type(err).__name__}: {first_line(err)}"})
        finally:
            try:
                os.write(write_end, said.encode(errors="replace"))
            finally:
                os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        said = reader.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        message = json.loads(said) if said else {}
    except ValueError:
        message = {"error": said[:500]}
    if code != 0 or "value" not in message:
        why = message.get("error") or (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        raise RuntimeError(f"{what} in a child process failed ({why})")
    return message["value"], "a child process"


def _enter_child(threads: int) -> None:
    global _PARENT_THREADS
    _PARENT_THREADS = threads
    torch.set_num_threads(1)
    from torch._inductor import config

    config.compile_threads = 1
