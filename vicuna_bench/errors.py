"""The exceptions a user of vicuna-bench can meet.

A :class:`UserError` is bad input (a file, key or value at fault): the CLI
prints its one-line message and exits 2.  A :class:`GateFailed` is a release
gate that did not hold: exit 3.  :class:`EngineError` means the worker
processes of an engine failed (one died, or a collective broke): exit 1.
Anything else is a bug and keeps its traceback.
"""

import os
import sys


class VicunaBenchError(Exception):
    """Base of every error vicuna-bench raises on purpose."""

    exit_code = 1


class UserError(VicunaBenchError, ValueError):
    """Bad input: the message names the file, key or value and what is valid."""

    exit_code = 2


class GateFailed(VicunaBenchError):
    """A perf baseline or accuracy threshold did not hold."""

    exit_code = 3


class EngineError(VicunaBenchError, RuntimeError):
    """The engine's worker processes failed or were closed."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The one line an error is reported by: its message's first line, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def script_exit(main, argv=None, prog: str | None = None) -> int:
    """Run a script's ``main(argv)`` as the CLI runs a command: an error of ours is one line on stderr
    (``<prog>: error: ...``, prog defaulting to the script's file name) and its exit code (bad input: 2);
    anything else keeps its traceback."""
    try:
        return main(argv) if argv is not None else main()
    except VicunaBenchError as exc:
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {first_line(exc)}", file=sys.stderr)
        return exc.exit_code
