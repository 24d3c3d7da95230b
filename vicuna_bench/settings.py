"""The settings table: every model, perf, precision and nightly option, once.

Every front end is built from :data:`SETTINGS`: the argparse CLI
(``--repeat``), ``sdk-test``'s INI (vendor key aliases, vicuna_bench/vendor.py),
the nightly's flags and config file, and the pytest plugin (``--perf-repeat``:
the group's prefix, unless a setting names its own pytest spelling;
:func:`pytest_settings` lists what pytest offers).  Same
names, same defaults, same choices, same help.  Library code names an option
with :func:`flag`, which spells it the way the front end in use does, so a
pytest user is never told about a CLI flag.  A new setting is one line here.

Sources, lowest precedence first (:func:`resolve`): the table's default, a
config file (INI or TOML; :func:`read_config_file`), the environment (the
settings that name a variable, e.g. ``$MAX_SEQ_LENGTH``), the command-line
flags.  A bool is ``--x`` / ``--no-x`` on a command line and
``0/1/true/false/yes/no/on/off`` (any case) or a TOML boolean in a file:
one parser, :func:`parse_bool`.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

# How each group's settings are spelt in pytest (the CLI uses the bare name); the nightly group is CLI-only.
PYTEST_PREFIX = {"model": "", "perf": "perf-", "precision": "accuracy-"}
NIGHTLY_STAGES = ("hw", "perf", "mmlu", "ceval")
CHIP_FAMILY_NAMES = ("d9", "d3")  # NPU chip families (--device-type)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Setting:
    group: str  # model | perf | precision | nightly
    name: str  # the CLI flag without "--"
    type: Callable | None
    default: Any
    help: str
    env: str | None = None  # the environment variable a None default falls back to
    choices: tuple[str, ...] | None = None
    pytest_name: str | None = None  # when the prefixed name would read badly
    in_file: bool = True  # may a config file set it
    in_pytest: bool | None = None  # is it a pytest option (None: when its group has a PYTEST_PREFIX)
    dest_name: str | None = None  # its name in the code where that differs from the flag's (--device-type: chip_family)

    @property
    def offered_to_pytest(self) -> bool:
        return self.group in PYTEST_PREFIX if self.in_pytest is None else self.in_pytest

    @property
    def key(self) -> str:
        """``group.dest``: unique across groups (perf and precision both have an output dir)."""
        return f"{self.group}.{self.dest}"

    @property
    def dest(self) -> str:
        return self.dest_name or self.name.replace("-", "_")

    @property
    def cli_flag(self) -> str:
        return f"--{self.name}"

    @property
    def pytest_flag(self) -> str:
        return f"--{self.pytest_name or PYTEST_PREFIX.get(self.group, '') + self.name}"

    @property
    def pytest_dest(self) -> str:
        if self.dest_name and not self.pytest_name:
            return PYTEST_PREFIX.get(self.group, "").replace("-", "_") + self.dest_name
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
      "one that contradicts the NPU is an error (ignored elsewhere)", choices=("auto", *CHIP_FAMILY_NAMES),
      dest_name="chip_family"),
    S("model", "npu-graph", str, "auto", "NPU graph mode for --compile on: auto (GE on d9, eager on d3) | ge "
      "(torchair max-autotune) | aclgraph (npugraph_ex / reduce-overhead)", choices=("auto", "ge", "aclgraph")),  # npu_graph.GRAPH_MODES
    S("model", "npu-jit-compile", str, "auto", "NPU operator compile mode: auto (off on d9 and d3) | off (prebuilt "
      "binary kernels) | on (each operator compiled for its shapes at first use)", choices=("auto", "on", "off")),
    S("model", "dtype", str, "auto", "auto | fp32 | fp16 | bf16 (auto: checkpoint dtype; on CPU the faster of "
      "fp32/bf16 for the host, docs/PERFORMANCE.md)"),
    S("model", "max-seq-len", int, 2048, "KV cache length", env="MAX_SEQ_LENGTH"),
    S("model", "compile", str, "auto", "compile the prefill and decode step: on | off | auto (on when the decode "
      "steps ahead repay the compile time)", choices=("auto", "on", "off")),
    S("model", "bind-cpu", bool, True, "pin each rank's process to CPUs near its device before the model loads "
      "($CPU_BINDING_NUM CPUs each, else an equal share of the device's NUMA node; cpu: of the allowed CPUs)"),
    # The performance test.
    S("perf", "batch-size", int, 1, "rows per generation"),
    S("perf", "batch-sizes", str, None, "batch sweep: comma list such as 1,2,4,8,16: every case at each batch on "
      "one engine, the throughput-latency curve (CSV, PNG) and its knee; overrides batch-size"),
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
    # The nightly run's own (vicuna-bench nightly; its config file's keys are these names).
    S("nightly", "quick", bool, False, "a CPU-sized run: embedded model, 2 short perf cases, a few questions of "
      "2 subjects per set, compile off"),
    S("nightly", "output-dir", str, None, "the run directory (default nightly/<date>-<time>/; must be new or empty; "
      "with --report-only: the run to rebuild)"),
    S("nightly", "history", str, "nightly/history.sqlite", "the SQLite history"),
    S("nightly", "report-only", bool, False, "rebuild REPORT.md and the plots of --output-dir from the history",
      in_file=False),
    S("nightly", "config", str, None, "an INI ([nightly] section) or TOML file of these settings "
      "(keys: the flags without --)", in_file=False),
    S("nightly", "stages", str, ",".join(NIGHTLY_STAGES), f"comma list of stages to run ({', '.join(NIGHTLY_STAGES)})"),
    # The data dirs: the nightly's and pytest's (--mmlu-dir, unprefixed); the precision command takes --work-dir.
    S("nightly", "mmlu-dir", str, None, "MMLU work dir holding data/ (default ../shared/datasets/mmlu beside the "
      "checkout)", in_pytest=True),
    S("nightly", "ceval-dir", str, None, "C-Eval work dir holding data/ (default ../shared/datasets/ceval)",
      in_pytest=True),
    S("nightly", "mmlu-subjects", str, None, "comma list of MMLU subjects (default: all)"),
    S("nightly", "ceval-subjects", str, None, "comma list of C-Eval subjects (default: all)"),
    # Every command that runs a job offers it (cli.py: perf, precision, sdk-test; the nightly); pytest shows none.
    S("nightly", "progress", bool, True, "progress bars (--no-progress: none)"),
    S("nightly", "regression-band", float, 0.10, "how far (0.10 = 10%%) a latency, throughput, memory or rate must "
      "move, significantly, to count as slower or faster (--quick: 0.5)"),
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


def parse_bool(value, where: str) -> bool:
    """The one bool parser of files and the environment: a bool, or 0/1/true/false/yes/no/on/off in any case."""
    from .errors import UserError

    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().strip("\"'").strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().strip("\"'").strip().lower() in TRUE_WORDS
    raise UserError(f"{where} = {value!r} is not a true or false (valid: {', '.join(TRUE_WORDS + FALSE_WORDS)})")


def convert(s: Setting, value, where: str):
    """A file's or the environment's value as setting ``s``'s type, choices checked; one UserError naming ``where``.

    TOML arrays: a case list for ``case-pair`` (kept as its text, the flag's form), a comma list for a text setting.
    """
    import json

    from .errors import UserError

    if s.type is bool:
        return parse_bool(value, where)
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, list) and s.name == "case-pair":
            value = json.dumps(value)
        elif isinstance(value, list) and s.type is str:
            value = ",".join(str(v) for v in value)  # subjects, stages as a TOML array
        elif isinstance(value, float) and s.type is int:
            raise ValueError
        else:
            value = s.type(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        kind = getattr(s.type, "__name__", "value")
        raise UserError(f"{where} = {value!r} is not {'an' if kind == 'int' else 'a'} {kind}") from None
    if s.choices is not None and value not in s.choices:
        raise UserError(f"{where} = {value!r} is not supported (valid: {', '.join(s.choices)})")
    return value


def select(groups: tuple[str, ...], exclude: frozenset[str] | set[str] = frozenset()) -> list[Setting]:
    """The settings of ``groups`` less the keys (``group.dest``) in ``exclude``: what one front end offers."""
    return [s for g in groups for s in group(g) if s.key not in exclude]


def read_config_file(path, section: str, offered: list[Setting]) -> dict[str, Any]:
    """A config file's settings by dest: INI (``[section]``) or TOML (top level or a ``[section]`` table).

    Keys are the flags without ``--`` (``-`` or ``_``); a setting with ``in_file`` False, or an unknown key,
    is one UserError naming the file and the valid keys.
    """
    import configparser
    from pathlib import Path

    from .errors import UserError

    path = Path(path)
    where = f"--config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{where}: cannot read ({exc.strerror})") from exc
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UserError(f"{where}: TOML needs Python 3.11 (tomllib); use an INI file") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{where}: not TOML ({exc})") from None
        raw = doc.get(section, doc)
        if not isinstance(raw, dict):
            raise UserError(f"{where}: [{section}] must be a table")
    else:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            raise UserError(f"{where}: not an INI file ({str(exc).splitlines()[0]})") from None
        if not parser.has_section(section):
            raise UserError(f"{where}: no [{section}] section (INI), or name the file *.toml")
        raw = dict(parser.items(section))
    by_name = {s.name: s for s in offered if s.in_file}
    out = {}
    for key, value in raw.items():
        s = by_name.get(key.replace("_", "-"))
        if s is None:
            raise UserError(f"{where}: unknown key {key!r} (valid: {', '.join(sorted(by_name))})")
        out[s.dest] = convert(s, value, f"{where}: {s.name}")
    return out


def switch_on(variable: str) -> bool:
    """An on/off environment switch (ours: on unless set): False where ``variable`` is 0/false/off/no."""
    import os

    return os.environ.get(variable, "1").strip().lower() not in {"0", "false", "off", "no"}


def from_environment(offered: list[Setting], env=None) -> dict[str, Any]:
    """The settings whose variable is set in ``env`` (default ``os.environ``), by dest, parsed."""
    import os

    env = os.environ if env is None else env
    return {s.dest: convert(s, env[s.env], f"${s.env}") for s in offered if s.env and env.get(s.env, "").strip()}


def resolve(offered: list[Setting], *layers: dict[str, Any]) -> dict[str, Any]:
    """Every offered setting by dest: the table's defaults, then each layer in order (lowest first).

    The documented order is ``resolve(offered, file, from_environment(offered), flags)``; a layer holds only
    what its source set.  Choices are checked whichever layer a value came from.
    """
    values = {s.dest: (None if s.env else s.default) for s in offered}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if k in values})
    for s in offered:
        _check_choice(s, values[s.dest])
    return values


def add_to_argparse(parser, group_name: str, *, exclude: tuple[str, ...] = (), only_given: bool = False,
                    only: tuple[str, ...] | None = None, title: str | None = None) -> None:
    """Add a group's settings to an argparse parser (an env-backed default stays None: resolved where it is used).

    ``exclude``: names (``world-size``) another argument takes; ``only``: just
    these names (``progress`` for a command that runs a job), under the help
    heading ``title`` (default the group's name); ``only_given``: no
    defaults, so the namespace holds just the flags on the command line
    (for layering them over another source, as ``sdk-test`` does over its INI).
    """
    g = parser.add_argument_group(title or group_name)
    for s in group(group_name):
        if s.name in exclude or s.key in exclude or (only is not None and s.name not in only):
            continue
        default = argparse.SUPPRESS if only_given else None if s.env else s.default
        g.add_argument(s.cli_flag, dest=s.dest, default=default, help=s.help_text(), **s.argparse_kwargs())


def pytest_settings() -> list[Setting]:
    """The settings pytest offers: its groups' (PYTEST_PREFIX) and those marked ``in_pytest`` (the data dirs)."""
    return [s for s in SETTINGS if s.offered_to_pytest]


def add_to_pytest(parser) -> None:
    """Add every setting to pytest's parser (one 'vicuna-bench' group)."""
    g = parser.getgroup("vicuna-bench")
    for s in pytest_settings():
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
