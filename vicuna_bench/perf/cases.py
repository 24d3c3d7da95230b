"""Which cases a perf run measures, with what settings, and the name of its files.

Cases come from ``case_pair`` or the input-major sweep of powers of two
(shared/spec/REFERENCE.md, "Performance test"); the warm-up is at the
largest input and output length.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path
from collections.abc import Sequence

from ..errors import UserError
from ..jobs import Work
from ..settings import BY_KEY, flag

log = logging.getLogger("vicuna_bench")

MODES = BY_KEY["perf.perf_mode"].choices  # declared once, in the settings table
DEFAULT_MIN_LEN_EXP = 5
DEFAULT_MAX_LEN_EXP = 10  # the vendor guide's value (its code says 11, which overflows MAX_SEQ_LENGTH=2048)
MAX_LEN_EXP_LIMIT = 24  # 16M tokens: beyond any context we can hold


@dataclasses.dataclass(frozen=True, order=True)
class Case:
    seq_in: int
    seq_out: int

    def __str__(self) -> str:
        return f"[{self.seq_in},{self.seq_out}]"


def sweep_cases(min_exp: int, max_exp: int) -> list[Case]:
    """``[2**i, 2**j]`` for i (input) and j (output) in min..max, input-major."""
    if min_exp < 0:
        raise UserError(f"{flag('perf.min_len_exp')} {min_exp} must be >= 0")
    if max_exp > MAX_LEN_EXP_LIMIT:
        raise UserError(f"{flag('perf.max_len_exp')} {max_exp} is too large (at most {MAX_LEN_EXP_LIMIT})")
    if min_exp > max_exp:
        raise UserError(f"{flag('perf.min_len_exp')} {min_exp} is above {flag('perf.max_len_exp')} {max_exp}")
    exps = range(min_exp, max_exp + 1)
    return [Case(2**i, 2**j) for i in exps for j in exps]


def parse_case_pair(text: str, source: str | None = None) -> list[Case]:
    """A literal such as ``[[256,64],[512,64]]`` (order kept, as the reference does)."""
    source = source or flag("perf.case_pair")
    shown = text.strip()
    try:
        value = ast.literal_eval(shown)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise UserError(f"{source} {text!r}: not a literal list of [seq_in, seq_out] pairs") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{source} {text!r}: expected a non-empty list of [seq_in, seq_out] pairs")
    cases = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise UserError(f"{source} {text!r}: {item!r} is not a [seq_in, seq_out] pair")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            raise UserError(f"{source} {text!r}: {item!r} holds a non-integer length")
        if item[0] < 1 or item[1] < 1:
            raise UserError(f"{source} {text!r}: {list(item)} has a length below 1")
        cases.append(Case(int(item[0]), int(item[1])))
    return cases


def select_cases(case_pair: str | None, min_exp: int | None, max_exp: int | None,
                 default_case_pair: str | None = None) -> list[Case]:
    """The run's cases: ``case_pair`` when given (the exponents are then
    ignored, as the reference does); else ``default_case_pair`` when neither
    exponent is given; else the sweep (missing exponents take the defaults)."""
    if case_pair is not None and (not isinstance(case_pair, str) or case_pair.strip()):
        if min_exp is not None or max_exp is not None:
            log.info("%s given: %s/%s are ignored (as the reference does)", flag("perf.case_pair"),
                     flag("perf.min_len_exp"), flag("perf.max_len_exp"))
        if not isinstance(case_pair, str):  # already parsed (the vendor INI's pairs)
            return [Case(int(i), int(o)) for i, o in case_pair]
        return parse_case_pair(case_pair)
    if min_exp is None and max_exp is None and default_case_pair is not None:
        return parse_case_pair(default_case_pair, "default case pair")
    return sweep_cases(DEFAULT_MIN_LEN_EXP if min_exp is None else min_exp,
                       DEFAULT_MAX_LEN_EXP if max_exp is None else max_exp)


def warmup_case(cases: Sequence[Case], max_seq_len: int) -> Case:
    """The reference warms up at (largest input, largest output).

    When those two come from different cases and together exceed the KV
    cache, the largest case by total length is used instead.
    """
    largest = Case(max(c.seq_in for c in cases), max(c.seq_out for c in cases))
    if largest.seq_in + largest.seq_out <= max_seq_len:
        return largest
    return max(cases, key=lambda c: (c.seq_in + c.seq_out, c.seq_in))


@dataclasses.dataclass
class PerfSettings:
    cases: list[Case]
    batch_size: int = BY_KEY["perf.batch_size"].default
    mode: str = BY_KEY["perf.perf_mode"].default
    repeat: int = BY_KEY["perf.repeat"].default
    model_name: str | None = None  # None: the model directory's (resolved by PerfJob.check)
    seed: int = BY_KEY["perf.seed"].default
    mem_bandwidth_gbps: float | None = None  # None: probe it

    @property
    def decode_steps(self) -> int:
        """Decode steps the run will make (warm-up included): what ``--compile auto`` weighs."""
        per_repeat = sum(c.seq_out for c in self.cases) * (2 if self.mode == "normal" else 1)
        return per_repeat * self.repeat + max((c.seq_out for c in self.cases), default=0)

    def validate(self, max_seq_len: int) -> None:
        if self.batch_size < 1:
            raise UserError(f"{flag('perf.batch_size')} {self.batch_size} must be >= 1")
        if self.repeat < 1:
            raise UserError(f"{flag('perf.repeat')} {self.repeat} must be >= 1")
        if self.mode not in MODES:
            raise UserError(f"{flag('perf.perf_mode')} {self.mode!r} is not supported (valid: {', '.join(MODES)})")
        name = self.model_name
        if name is not None and (not name or any(ch in name for ch in "/\\\0") or name in (".", "..")):
            raise UserError(f"{flag('perf.model_name')} {name!r} cannot be part of a file name")
        if self.mem_bandwidth_gbps is not None and not self.mem_bandwidth_gbps > 0:
            raise UserError(f"{flag('perf.mem_bandwidth')} {self.mem_bandwidth_gbps} must be > 0 (GB/s)")
        if not self.cases:
            raise UserError("no perf cases")
        for case in self.cases:
            if case.seq_in + case.seq_out > max_seq_len:
                raise UserError(
                    f"case {case}: seq_in + seq_out = {case.seq_in + case.seq_out} exceeds {flag('model.max_seq_len')} "
                    f"{max_seq_len} (raise {flag('model.max_seq_len')} or $MAX_SEQ_LENGTH)"
                )


def settings_work(settings: PerfSettings) -> Work:
    """What a run of ``settings`` asks of the engine (:class:`jobs.Work`)."""
    return Work(decode_steps=settings.decode_steps, longest_prompt=max((c.seq_in for c in settings.cases), default=0),
                new_tokens=max((c.seq_out for c in settings.cases), default=0), batch=settings.batch_size)


def file_stem(model_name: str, device_name: str, batch_size: int) -> str:
    """``performance_test_{model_name}_{device_name}_bs{batch_size}`` (spaces in the device name -> ``_``)."""
    return f"performance_test_{model_name}_{device_name.replace(' ', '_')}_bs{batch_size}"


def default_model_name(model_path: str) -> str:
    """The embedded model's name, else the model directory's name."""
    from ..embedded import MODEL_NAME, cache_root

    path = Path(model_path)
    try:
        if path.resolve().parent == cache_root().resolve() and path.name.startswith(MODEL_NAME):
            return MODEL_NAME
    except OSError:
        pass
    return path.resolve().name or "model"
