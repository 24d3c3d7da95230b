"""The settings table: every model, perf and precision option, once.

Both front ends are built from :data:`SETTINGS`: the argparse CLI
(``--repeat``) and the pytest plugin (``--perf-repeat``: the group's prefix,
unless a setting names its own pytest spelling).  Same names, same defaults,
same help.  Library code names an option with :func:`flag`, which spells it
the way the front end in use does, so a pytest user is never told about a
CLI flag.  A new setting is one line here.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

# How each group's settings are spelt in pytest (the CLI uses the bare name).
PYTEST_PREFIX = {"model": "", "perf": "perf-", "precision": "accuracy-"}


@dataclasses.dataclass(frozen=True)
class Setting:
    group: str  # model | perf | precision
    name: str  # the CLI flag without "--"
    type: Callable | None
    default: Any
    help: str
    env: str | None = None  # the environment variable a None default falls back to
    choices: tuple[str, ...] | None = None
    pytest_name: str | None = None  # when the prefixed name would read badly

    @property
    def key(self) -> str:
        """``group.dest``: unique across groups (perf and precision both have an output dir)."""
        return f"{self.group}.{self.dest}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def cli_flag(self) -> str:
        return f"--{self.name}"

    @property
    def pytest_flag(self) -> str:
        return f"--{self.pytest_name or PYTEST_PREFIX[self.group] + self.name}"

    @property
    def pytest_dest(self) -> str:
        return self.pytest_flag[2:].replace("-", "_")

    def pytest_args(self, value: Any) -> list[str]:
        """``value`` as pytest command-line words: ``--name``/``--no-name`` for a bool, else ``--name VALUE``."""
        if self.type is bool:
            return [self.pytest_flag if value else f"--no-{self.pytest_flag[2:]}"]
        return [self.pytest_flag, str(value)]

    def argparse_kwargs(self) -> dict[str, Any]:
        """How argparse (and pytest) take it: a bool is a ``--name/--no-name`` pair, others a typed value."""
        if self.type is bool:
            return {"action": argparse.BooleanOptionalAction}
        return {"type": self.type}

    def help_text(self) -> str:
        if self.env is not None:
            return f"{self.help} (default ${self.env}, else {self.default})"
        return self.help if self.default is None else f"{self.help} (default {self.default})"


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # The model every command runs.
    S("model", "model-path", str, None, "HF model dir or a cut dir; default (or 'embedded'): the embedded "
      "SmolLM2-135M-Instruct; pytest perf: a tiny random Llama"),
    S("model", "world-size", int, 1, "tensor-parallel ranks"),
    S("model", "device", str, "auto", "cpu | cuda | npu | auto (npu, else cuda, else cpu)"),
    S("model", "device-type", str, "auto", "NPU chip family: auto (detected: 910B -> d9, 310P -> d3) | d9 | d3; "
      "one that contradicts the NPU is an error (ignored elsewhere)", choices=("auto", "d9", "d3")),
    S("model", "npu-graph", str, "auto", "NPU graph mode for --compile on: auto (GE on d9, eager on d3) | ge "
      "(torchair max-autotune) | aclgraph (npugraph_ex / reduce-overhead)", choices=("auto", "ge", "aclgraph")),
    S("model", "dtype", str, "auto", "auto | fp32 | fp16 | bf16 (auto: checkpoint dtype, fp32 on CPU)"),
    S("model", "max-seq-len", int, 2048, "KV cache length", env="MAX_SEQ_LENGTH"),
    S("model", "compile", str, "auto", "compile the prefill and decode step: on | off | auto (on when the decode "
      "steps ahead repay the compile time)", choices=("auto", "on", "off")),
    S("model", "bind-cpu", bool, True, "pin each rank's process to CPUs near its device before the model loads "
      "($CPU_BINDING_NUM CPUs each, else an equal share of the device's NUMA node; cpu: of the allowed CPUs)"),
    # The performance test.
    S("perf", "batch-size", int, 1, "rows per generation"),
    S("perf", "case-pair", str, None, "cases as [[seq_in, seq_out], ...]; overrides the sweep "
      "(default: the sweep; pytest's tiny model: [[32,8],[64,8]])"),
    S("perf", "min-len-exp", int, None, "sweep: smallest power of two (default 5)"),
    S("perf", "max-len-exp", int, None, "sweep: largest power of two (default 10)"),
    S("perf", "perf-mode", str, "detail", "detail (every forward timed) | normal (the reference's two generations)",
      choices=("detail", "normal"), pytest_name="perf-mode"),
    S("perf", "repeat", int, 1, "runs of each case (percentiles over them; 1 is the reference's procedure)"),
    S("perf", "model-name", str, None, "name in the CSV file name (default: the model directory's)"),
    S("perf", "output-dir", str, None, "where the CSVs, samples JSON and plot go (default: CLI '.', "
      "pytest 'perf-results/' under the invocation dir)"),
    S("perf", "baseline", str, None, "a reference or extended CSV of an earlier run: slower cases fail"),
    S("perf", "tolerance", float, 0.10, "allowed slowdown against the baseline (0.10 = 10%%)"),
    S("perf", "seed", int, 0, "seed of the random input ids"),
    S("perf", "mem-bandwidth", float, None, "memory bandwidth in GB/s for the decode roofline "
      "(default: measured by a copy probe)"),
    # The precision test (pytest: --accuracy-*; the mode and data dir come from the test and --mmlu-dir/--ceval-dir).
    S("precision", "batch", int, 1, "questions per batch (left padded; same answers as 1)"),
    S("precision", "shot", int, 5, "dev rows shown before each question"),
    S("precision", "seq-len-out", int, 2, "tokens generated per answer"),
    S("precision", "max-prompt-tokens", int, 2000, "drop shots until the prompt fits"),
    S("precision", "scoring", str, "generate", "generate (reference) | logits | both (one pass)",
      choices=("generate", "logits", "both")),
    S("precision", "subjects", str, None, "comma list of subjects (default: all)"),
    S("precision", "limit-per-subject", int, None, "first K val questions of each subject"),
    S("precision", "prefix-cache", str, "on", "prefill each subject's shared few-shot prefix once: on | off "
      "(off: every prompt whole, the reference path)", choices=("on", "off")),
    S("precision", "too-long", str, "exclude", "a question no prompt fits: exclude (listed) | wrong",
      choices=("exclude", "wrong")),
    S("precision", "output-dir", str, None, "result dir (default: CLI WORK_DIR/test_result, "
      "pytest 'accuracy-results/<mode>' under the invocation dir)"),
    S("precision", "gate-model", str, None, "thresholds.json model to gate against (default: recognised)",
      pytest_name="accuracy-model"),
    S("precision", "tolerance", float, None, "gate tolerance in points (default thresholds.json)"),
)
del S

BY_KEY = {s.key: s for s in SETTINGS}

FRONT_ENDS = ("cli", "pytest")
_front_end: contextvars.ContextVar[str] = contextvars.ContextVar("vicuna_bench_front_end", default="cli")


def flag(key: str) -> str:
    """How setting ``key`` (``group.dest``) is spelt in the front end in use, e.g. ``--perf-case-pair``."""
    s = BY_KEY[key]
    return s.pytest_flag if _front_end.get() == "pytest" else s.cli_flag


def set_front_end(name: str) -> None:
    """Name the front end whose spelling errors use (the pytest plugin sets 'pytest' once)."""
    assert name in FRONT_ENDS, name
    _front_end.set(name)


@contextlib.contextmanager
def front_end(name: str) -> Iterator[None]:
    """Spell options as ``name`` does inside the block (the CLI's ``main`` called from a pytest process)."""
    assert name in FRONT_ENDS, name
    token = _front_end.set(name)
    try:
        yield
    finally:
        _front_end.reset(token)


def group(name: str) -> list[Setting]:
    return [s for s in SETTINGS if s.group == name]


def _check_choice(s: Setting, value):
    from .errors import UserError

    if s.choices is not None and value is not None and value not in s.choices:
        raise UserError(f"{flag(s.key)} {value!r} is not supported (valid: {', '.join(s.choices)})")
    return value


def add_to_argparse(parser, group_name: str, *, exclude: tuple[str, ...] = (), only_given: bool = False) -> None:
    """Add a group's settings to an argparse parser (an env-backed default stays None: resolved where it is used).

    ``exclude``: names (``world-size``) another argument takes; ``only_given``:
    no defaults, so the namespace holds just the flags on the command line
    (for layering them over another source, as ``sdk-test`` does over its INI).
    """
    g = parser.add_argument_group(group_name)
    for s in group(group_name):
        if s.name in exclude:
            continue
        default = argparse.SUPPRESS if only_given else None if s.env else s.default
        g.add_argument(s.cli_flag, dest=s.dest, default=default, help=s.help_text(), **s.argparse_kwargs())


def add_to_pytest(parser) -> None:
    """Add every setting to pytest's parser (one 'vicuna-bench' group)."""
    g = parser.getgroup("vicuna-bench")
    for s in SETTINGS:
        g.addoption(s.pytest_flag, dest=s.pytest_dest, default=None if s.env else s.default, help=s.help_text(),
                    **s.argparse_kwargs())


def values(group_name: str, get: Callable[[Setting], Any]) -> dict[str, Any]:
    """A group's values by dest, read with ``get`` (one front end's reader), choices checked."""
    return {s.dest: _check_choice(s, get(s)) for s in group(group_name)}


def defaults(group_name: str) -> dict[str, Any]:
    """A group's table defaults by dest (an env-backed one None: resolved where it is used)."""
    return values(group_name, lambda s: None if s.env else s.default)


def from_namespace(ns, group_name: str) -> dict[str, Any]:
    """A group's values from an argparse namespace."""
    return values(group_name, lambda s: getattr(ns, s.dest))


def from_pytest(config, group_name: str) -> dict[str, Any]:
    """A group's values from pytest's config."""
    return values(group_name, lambda s: config.getoption(s.pytest_dest))
