"""The exceptions a user of vicuna-bench can meet.

A :class:`UserError` is bad input (a file, key or value at fault): the CLI
prints its one-line message and exits 2.  A :class:`GateFailed` is a release
gate that did not hold: exit 3.  :class:`EngineError` means the worker
processes of an engine failed (one died, or a collective broke): exit 1.
Anything else is a bug and keeps its traceback.
"""


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
