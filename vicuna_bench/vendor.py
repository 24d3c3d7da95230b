"""The vendor drop-in: reading the vendor SDK's ``sdk_config.ini``.

Sections and keys are those of shared/spec/REFERENCE.md.  Each key is an
alias of a setting of the settings table (:data:`SETTING_OF`) or the
vendor's own (no setting of that meaning); there are no defaults here: a key
the file leaves out takes the table's default (a vendor-only key: None, not
set).  Field names follow our command-line options (shared/spec/CLI.md).

Where the vendor's loader is fragile we are not: an unknown key or section
is one :class:`UserError` naming it, its section and the valid keys (the
vendor dies with a bare TypeError); quotes around a value are stripped even
when unbalanced (the public Vicuna guide opens one it never closes);
``case_pair`` is read as a literal, never evaluated; the guide's spellings
``device_id`` / ``device`` and the legacy ``[ceval]`` section are accepted
with a warning.  The guide lists ``model_path`` and ``device`` under
``[precision]`` too: there they set the precision task's model and devices
(:meth:`SdkConfig.model_for`).  A ``mode`` left out is chosen from the data
(:func:`vicuna_bench.precision.data.detect_mode`), not defaulted to mmlu.
"""

from __future__ import annotations

import configparser
import dataclasses
import logging
import os
from pathlib import Path
from typing import Mapping

from .errors import UserError

log = logging.getLogger("vicuna_bench")

CONFIG_FILE_NAME = "sdk_config.ini"


# Every field is None until the file sets it (``explicit``): a key the file leaves out takes the settings
# table's default (read_sdk_config fills those in), a vendor-only key stays None, "not set".

@dataclasses.dataclass(frozen=True)
class ModelSection:
    """``[model]``: what to load and where."""

    model_path: str | None = None  # for world size > 1: the cut directory
    device_ids: tuple[int, ...] | None = None  # None: rank r runs on device r
    parallel_backend: str | None = None  # None: the backend follows the device
    log_dir: str | None = None
    bind_cpu: bool | None = None
    explicit: frozenset[str] = frozenset()  # the keys the file set


@dataclasses.dataclass(frozen=True)
class PerformanceSection:
    """``[performance]``: the performance test's cases and output."""

    model_name: str | None = None
    batch_size: int | None = None
    max_len_exp: int | None = None  # the table's None: the sweep's largest power (perf.DEFAULT_MAX_LEN_EXP)
    min_len_exp: int | None = None
    case_pair: tuple[tuple[int, int], ...] | None = None  # when set, the exponents are ignored
    save_file_name: str | None = None
    perf_mode: str | None = None  # TIMEIT=1 in the environment forces detail
    skip_decode: bool | None = None
    explicit: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class PrecisionSection:
    """``[precision]`` (legacy ``[ceval]``): the MMLU / C-Eval test."""

    mode: str | None = None  # mmlu | ceval; None: chosen from work_dir's data (the vendor's default is mmlu)
    work_dir: str | None = None
    batch: int | None = None
    shot: int | None = None
    seq_len_out: int | None = None
    # The guide lists these under [precision]: for the precision task they win over [model]'s.
    model_path: str | None = None
    device_ids: tuple[int, ...] | None = None  # the guide's `device`
    explicit: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class SdkConfig:
    """A parsed ``sdk_config.ini``; ``warnings`` lists what was accepted only for compatibility."""

    path: str
    model: ModelSection = ModelSection()
    performance: PerformanceSection = PerformanceSection()
    precision: PrecisionSection = PrecisionSection()
    warnings: tuple[str, ...] = ()

    def model_for(self, task: str | None) -> ModelSection:
        """``[model]`` as ``task`` uses it: for ``precision``, ``[precision]``'s model_path / device_ids laid over."""
        if task != "precision":
            return self.model
        over = {k: getattr(self.precision, k) for k in PRECISION_MODEL_KEYS if k in self.precision.explicit}
        if not over:
            return self.model
        return dataclasses.replace(self.model, **over, explicit=self.model.explicit | frozenset(over))

    def model_key_source(self, task: str | None, key: str) -> str:
        """The section a model key of ``task`` comes from, for messages: ``[precision]`` or ``[model]``."""
        if task == "precision" and key in PRECISION_MODEL_KEYS and key in self.precision.explicit:
            return "[precision]"
        return "[model]"

    def model_conflicts(self) -> list[str]:
        """One line per key that ``[precision]`` and ``[model]`` both set to different values."""
        lines = []
        for key in PRECISION_MODEL_KEYS:
            if key in self.precision.explicit and key in self.model.explicit:
                ours, theirs = getattr(self.precision, key), getattr(self.model, key)
                if ours != theirs:
                    lines.append(f"{self.path}: [precision] {key}={_shown(ours)} differs from [model] {key}="
                                 f"{_shown(theirs)}: the precision task uses [precision]'s")
        return lines

    def explicit_settings(self, task: str | None = None) -> dict[str, object]:
        """The values the file (or ``TIMEIT``) set, by the setting's dest (:data:`SETTING_OF`; the vendor's own keys
        by their name); defaults left out (for layering over flags).

        ``task``: whose model settings (``precision`` takes ``[precision]``'s model_path / device_ids).
        """
        out: dict[str, object] = {}
        sections = (("model", self.model_for(task)), ("performance", self.performance), ("precision", self.precision))
        for section_name, section in sections:
            for name in sorted(section.explicit):
                if section is self.precision and name in PRECISION_MODEL_KEYS:
                    continue  # in model_for's section already, where the task uses them
                key = SETTING_OF[section_name].get(name)
                out[key.split(".", 1)[1] if key else name] = getattr(section, name)
        return out

    def setting_values(self, group: str, task: str | None = None) -> dict[str, object]:
        """The values the file set for the settings table's ``group``, by dest (what sdk-test layers)."""
        mapped = {key for keys in SETTING_OF.values() for key in keys.values() if key}
        return {dest: value for dest, value in self.explicit_settings(task).items() if f"{group}.{dest}" in mapped}


def _shown(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


SECTIONS = {"model": ModelSection, "performance": PerformanceSection, "precision": PrecisionSection}
LEGACY_SECTIONS = {"ceval": "precision"}
KEY_ALIASES = {
    "model": {"device_id": "device_ids", "device": "device_ids"},
    "precision": {"device_id": "device_ids", "device": "device_ids"},
}
PRECISION_MODEL_KEYS = ("model_path", "device_ids")  # [model] keys the guide also lists under [precision]

PRECISION_MODES = ("mmlu", "ceval")
BACKENDS = ("hccl", "nccl", "gloo")

# The vendor's keys onto the settings table (vicuna_bench/settings.py): [section] key -> the setting it sets
# (group.dest); None: the vendor's own key, with no setting of that meaning (read by sdk-test itself).
# The guide's spellings (KEY_ALIASES, [ceval]) are read as these keys first; TIMEIT=1 sets perf.perf_mode.
SETTING_OF = {
    "model": {"model_path": "model.model_path", "device_ids": None, "parallel_backend": None, "log_dir": None,
              "bind_cpu": "model.bind_cpu"},
    "performance": {"model_name": "perf.model_name", "batch_size": "perf.batch_size",
                    "max_len_exp": "perf.max_len_exp", "min_len_exp": "perf.min_len_exp",
                    "case_pair": "perf.case_pair", "save_file_name": None, "perf_mode": "perf.perf_mode",
                    "skip_decode": None},
    "precision": {"mode": None, "work_dir": None, "batch": "precision.batch", "shot": "precision.shot",
                  "seq_len_out": "precision.seq_len_out", "model_path": "model.model_path", "device_ids": None},
}


def _table_choices(key: str) -> tuple[str, ...]:
    from .settings import BY_KEY

    return BY_KEY[key].choices


def table_defaults(section: str) -> dict[str, object]:
    """The settings table's default of each key of ``section`` that aliases a setting (not env-backed ones)."""
    from .settings import BY_KEY

    return {name: BY_KEY[key].default for name, key in SETTING_OF[section].items()
            if key and BY_KEY[key].env is None and not (section == "precision" and name in PRECISION_MODEL_KEYS)}


def _valid_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section]) if f.name != "explicit"]


def strip_quotes(value: str) -> str:
    """A value without surrounding whitespace and quotes, matched or not (``"./dir`` -> ``./dir``)."""
    return value.strip().strip("\"'").strip()


# ------------------------------------------------------------------ value parsers

class _Where:
    """Names a value in messages: ``sdk_config.ini [performance] batch_size='x'``."""

    def __init__(self, path: str, section: str, key: str, raw: str):
        self.path, self.section, self.key, self.raw = path, section, key, raw

    def fail(self, valid: str) -> UserError:
        return UserError(f"{self.path}: [{self.section}] {self.key}={self.raw!r} is not valid ({valid})")


def _int(where: _Where, minimum: int) -> int:
    try:
        value = int(strip_quotes(where.raw))
    except ValueError:
        raise where.fail(f"an integer >= {minimum}") from None
    if value < minimum:
        raise where.fail(f"an integer >= {minimum}")
    return value


def _flag(where: _Where) -> bool:
    from .settings import FALSE_WORDS, TRUE_WORDS, parse_bool

    try:
        return parse_bool(strip_quotes(where.raw), where.key)  # the settings' one bool parser
    except UserError:
        raise where.fail(" | ".join(TRUE_WORDS + FALSE_WORDS)) from None


def _choice(where: _Where, choices: tuple[str, ...]) -> str:
    value = strip_quotes(where.raw).lower()
    if value not in choices:
        raise where.fail(" | ".join(choices))
    return value


def _device_ids(where: _Where) -> tuple[int, ...]:
    parts = [p.strip() for p in strip_quotes(where.raw).strip("[]").split(",")]
    try:
        ids = tuple(int(p) for p in parts if p)
    except ValueError:
        raise where.fail("a comma list of device ids such as 0,1,2,3") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise where.fail("a comma list of distinct device ids >= 0 such as 0,1,2,3")
    return ids


def parse_case_pair(text: str) -> tuple[tuple[int, int], ...]:
    """A case list literal ``[[256,256],[512,512]]`` -> ((input tokens, output tokens), ...); UserError if malformed.

    The perf test's own parser (:func:`vicuna_bench.perf.parse_case_pair`: literals only, nothing executed).
    """
    from .perf import parse_case_pair as parse

    return tuple((c.seq_in, c.seq_out) for c in parse(strip_quotes(text), "case_pair"))


def _case_pair(where: _Where) -> tuple[tuple[int, int], ...]:
    try:
        return parse_case_pair(where.raw)
    except UserError as exc:
        raise where.fail(f"{str(exc).split(': ', 1)[-1]}; expected a list of [input_len, output_len] pairs such as "
                         "[[256,256],[512,512]]") from None


def _text(where: _Where) -> str:
    return strip_quotes(where.raw)


_FIELD_PARSERS = {
    "model": {
        "model_path": _text,
        "device_ids": _device_ids,
        "parallel_backend": lambda w: _choice(w, BACKENDS),
        "log_dir": _text,
        "bind_cpu": _flag,
    },
    "performance": {
        "model_name": _text,
        "batch_size": lambda w: _int(w, 1),
        "max_len_exp": lambda w: _int(w, 0),
        "min_len_exp": lambda w: _int(w, 0),
        "case_pair": _case_pair,
        "save_file_name": _text,
        "perf_mode": lambda w: _choice(w, _table_choices("perf.perf_mode")),
        "skip_decode": _flag,
    },
    "precision": {
        "mode": lambda w: _choice(w, PRECISION_MODES),
        "work_dir": _text,
        "batch": lambda w: _int(w, 1),
        "shot": lambda w: _int(w, 0),
        "seq_len_out": lambda w: _int(w, 1),
        "model_path": _text,
        "device_ids": _device_ids,
    },
}


assert {k: set(v) for k, v in _FIELD_PARSERS.items()} == {k: set(v) for k, v in SETTING_OF.items()}


# ------------------------------------------------------------------ the reader

def _read_parser(path: Path) -> configparser.ConfigParser:
    # No interpolation ('%' in a path is literal); a [DEFAULT] section is an
    # ordinary (hence unknown) section rather than keys copied everywhere.
    parser = configparser.ConfigParser(interpolation=None, default_section="\0no-default")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (the vendor drop-in reads {CONFIG_FILE_NAME} from the current directory)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except configparser.DuplicateSectionError as exc:
        raise UserError(f"{path}: section [{exc.section}] appears twice (line {exc.lineno})") from None
    except configparser.DuplicateOptionError as exc:
        raise UserError(f"{path}: [{exc.section}] {exc.option} is set twice (line {exc.lineno})") from None
    except configparser.MissingSectionHeaderError as exc:
        raise UserError(f"{path}: line {exc.lineno} {exc.line.strip()!r} comes before any [section] (valid: [model], [performance], [precision])") from None
    except configparser.ParsingError as exc:
        lineno, line = exc.errors[0]
        raise UserError(f"{path}: line {lineno} {line.strip()!r} is not 'key = value'") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parser


def _check_exponents(shown: str, values: dict[str, object]) -> None:
    """max_len_exp >= min_len_exp when the sweep is used; a missing one is the sweep's (the table's None)."""
    from .perf import DEFAULT_MAX_LEN_EXP, DEFAULT_MIN_LEN_EXP

    lo = values.get("min_len_exp", DEFAULT_MIN_LEN_EXP)
    hi = values.get("max_len_exp", DEFAULT_MAX_LEN_EXP)
    if "case_pair" not in values and hi < lo:
        raise UserError(
            f"{shown}: [performance] max_len_exp={hi} is below min_len_exp={lo} (valid: max_len_exp >= min_len_exp)"
        )


def read_sdk_config(path: str | os.PathLike = CONFIG_FILE_NAME, *, env: Mapping[str, str] | None = None) -> SdkConfig:
    """Read a vendor ``sdk_config.ini``: every key of REFERENCE.md, a missing one the settings table's default
    (a vendor-only key: None); bad input is one UserError.

    ``env`` (default ``os.environ``) supplies ``TIMEIT``: ``1`` means
    ``perf_mode`` detail, as the vendor's script sets it for ``performance``.
    """
    env = os.environ if env is None else env
    path = Path(path)
    shown = str(path)
    parser = _read_parser(path)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log.warning("%s", message)

    # Section name -> the file's section it is read from.
    sources: dict[str, str] = {}
    for name in parser.sections():
        canonical = name.strip().lower()
        if canonical in LEGACY_SECTIONS:
            target = LEGACY_SECTIONS[canonical]
            if target in sources:
                raise UserError(f"{shown}: both [{sources[target]}] and [{name}] are given; keep [{target}] only")
            warn(f"{shown}: section [{name}] is the legacy name of [{target}]; read as [{target}]")
            sources[target] = name
        elif canonical in SECTIONS:
            if canonical in sources:
                raise UserError(f"{shown}: both [{sources[canonical]}] and [{name}] are given; keep [{canonical}] only")
            sources[canonical] = name
        else:
            raise UserError(
                f"{shown}: unknown section [{name}] (valid: [model], [performance], [precision]; legacy [ceval])"
            )

    parsed: dict[str, object] = {}
    for section, cls in SECTIONS.items():
        values: dict[str, object] = {}
        raw_keys: dict[str, str] = {}
        if section in sources:
            source = sources[section]
            for key, raw in parser.items(source):
                name = KEY_ALIASES.get(section, {}).get(key, key)
                if name not in _FIELD_PARSERS[section]:
                    raise UserError(
                        f"{shown}: unknown key {key!r} in [{source}] (valid: {', '.join(_valid_keys(section))})"
                    )
                if name in raw_keys:
                    raise UserError(f"{shown}: [{source}] sets {name} twice (as {raw_keys[name]!r} and {key!r}); keep {name}")
                if name != key:
                    warn(f"{shown}: [{source}] {key} is read as {name} (the key the vendor's loader uses)")
                raw_keys[name] = key
                if strip_quotes(raw) == "":
                    continue  # an empty value leaves the default
                values[name] = _FIELD_PARSERS[section][name](_Where(shown, source, key, raw))
        if section == "performance":
            if env.get("TIMEIT", "").strip() == "1":
                values["perf_mode"] = "detail"
            _check_exponents(shown, values)
        parsed[section] = cls(**{**table_defaults(section), **values}, explicit=frozenset(values))
    return SdkConfig(shown, parsed["model"], parsed["performance"], parsed["precision"], tuple(warnings))
