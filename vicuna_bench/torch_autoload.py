"""torch's device-backend autoload (``TORCH_DEVICE_BACKEND_AUTOLOAD``), turned off by our front ends before torch loads.

From torch_npu 2.5.1 the wheel registers a ``torch.backends`` entry point, so ``import torch`` imports torch_npu and
raises ``RuntimeError`` when that fails (a broken CANN): a ``--device cpu`` run would die before its first line.
torch autoloads only while the variable is unset or exactly ``"1"`` (torch/__init__.py,
``_is_device_backend_autoload_enabled``).  The front ends set it to ``"0"`` unless the user set it, and
:mod:`vicuna_bench.devices` imports torch_npu on purpose when a run asks for the NPU or probes for one
(``--device npu|auto``), which turns a broken install into a one-line error.  The device is not looked up here: it is
known only after the settings are layered (flags, ``--config`` files, the vendor's INI), and torch is imported
before that.  Once a front end's run resolves to cpu or cuda, torch_npu is kept out of the process altogether
(:func:`keep_torch_npu_out`): transformers would import it otherwise.  This module imports nothing heavy: it runs
before torch is imported.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Sequence

AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"
OFF = "0"


_front_end = False  # this process's front end took charge of torch_npu before torch was imported


def front_end_default(environ: MutableMapping[str, str] | None = None, modules=None) -> bool:
    """Turn torch's backend autoload off for a front end about to import torch; whether this call set it.

    Nothing changes where the user set the variable (any value) or where torch is imported already (then the
    variable no longer matters, and an in-process caller's environment stays its own).
    """
    global _front_end
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules:
        return False
    _front_end = True
    if AUTOLOAD_ENV in environ:
        return False
    environ[AUTOLOAD_ENV] = OFF
    return True


def is_front_end() -> bool:
    """Whether a front end of ours started this process (:func:`front_end_default` ran before torch was imported)."""
    return _front_end


def keep_torch_npu_out(modules=None) -> bool:
    """Keep torch_npu out of the rest of a cpu/cuda run; whether it is out now.

    transformers imports torch_npu wherever ``importlib.util.find_spec`` finds it (``is_torch_npu_available``,
    reached by loading a Llama config or tokenizer), autoload or not.  ``None`` in ``sys.modules`` makes
    ``find_spec`` answer None and ``import torch_npu`` raise ImportError, which such probes take as "not there".
    A torch_npu already imported stays.
    """
    modules = sys.modules if modules is None else modules
    if "torch_npu" in modules:
        return modules["torch_npu"] is None
    modules["torch_npu"] = None
    return True


def let_torch_npu_in(modules=None) -> None:
    """Undo :func:`keep_torch_npu_out` (a later engine of the same process asks for the NPU)."""
    modules = sys.modules if modules is None else modules
    if "torch_npu" in modules and modules["torch_npu"] is None:
        del modules["torch_npu"]


def device_in_args(args: Sequence[str]) -> str | None:
    """The value of ``--device`` in command-line words (``--device npu`` or ``--device=npu``), the last one given."""
    found = None
    for i, word in enumerate(args):
        if word == "--device" and i + 1 < len(args):
            found = args[i + 1]
        elif word.startswith("--device="):
            found = word.split("=", 1)[1]
    return found
