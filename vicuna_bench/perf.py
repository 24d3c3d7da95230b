"""The performance harness: first-token and per-token latency into CSV.

The procedure is the reference's (shared/spec/REFERENCE.md, "Performance
test"): cases from ``case_pair`` or the input-major sweep of powers of two,
random token ids, end of sequence ignored, one warm-up at the largest input
and output length, each figure the maximum over ranks.  Two timing modes:

* ``detail`` (default): the engine times the prefill (with the choice of the
  first token) and every decode step, each closed by a device synchronise;
  next-token time is the mean of the decode steps.
* ``normal``: the reference's two-generation method: a 1-token generation
  is the first-token time; a ``seq_out`` generation minus it, over
  ``seq_out - 1``, is the next-token time (undefined when ``seq_out == 1``).

Outputs, rewritten after every case so a long sweep that dies keeps what it
measured: the reference CSV (byte-compatible header and name), an extended
CSV (percentiles, throughput, memory, the decode bandwidth roofline), a JSON
file of every raw sample, and a PNG plot.  A baseline CSV (either
kind) turns the run into a regression gate.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import launch
from .energy import EnergyProbe, Sampler, per_token
from .errors import GateFailed, UserError
from .settings import BY_KEY, flag
from .stats import judge_change
from .files import write_atomic
from .jobs import Work

log = logging.getLogger("vicuna_bench")

REFERENCE_HEADER = (
    "batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),"
    "forward_first_token_time(ms),forward_next_token_time(ms),pre_next_token_time(ms),"
    "post_next_token_time_post(ms)"
)
MODES = BY_KEY["perf.perf_mode"].choices  # declared once, in the settings table
DEFAULT_MIN_LEN_EXP = 5
DEFAULT_MAX_LEN_EXP = 10  # the vendor guide's value (its code says 11, which overflows MAX_SEQ_LENGTH=2048)
MAX_LEN_EXP_LIMIT = 24  # 16M tokens: beyond any context we can hold

EXTENDED_COLUMNS = [
    "model_name", "device_name", "device", "dtype", "world_size", "perf_mode",
    "batch_size", "seq_in", "seq_out", "repeats",
    "first_token_ms_mean", "first_token_ms_p50", "first_token_ms_p90", "first_token_ms_p99",
    "next_token_ms_mean", "next_token_ms_p50", "next_token_ms_p90", "next_token_ms_p99",
    "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_s_mean", "response_time_s",
    "peak_memory_mib_max", "peak_memory_mib_per_rank", "weight_mib_per_rank",
    "decode_bytes_per_step", "mem_bandwidth_gbps", "decode_floor_ms", "decode_roofline_fraction",
    "compile", "compile_s", "cpu_binding",
    "load_s", "load_gb_per_s", "load_peak_host_mib_per_rank", "load_peak_device_mib_per_rank",
    "chip_family",
    "prefill_j_per_token", "decode_j_per_token", "energy_source",
]
# Extended CSVs written before the compile, binding, load, chip family or energy columns existed still serve as
# baselines.
_EXTENDED_HEADERS = tuple(",".join(EXTENDED_COLUMNS[:len(EXTENDED_COLUMNS) - n]) for n in (0, 3, 4, 8, 9, 11))


# ---------------------------------------------------------------- cases and settings

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


# ---------------------------------------------------------------- measuring

@dataclasses.dataclass
class CaseResult:
    """Every sample of one case (times in ms, maxima over ranks)."""

    case: Case
    batch_size: int
    mode: str
    first_ms: list[float] = dataclasses.field(default_factory=list)  # one per repeat
    next_ms: list[float] = dataclasses.field(default_factory=list)  # one per repeat (mean of its steps)
    step_ms: list[float] = dataclasses.field(default_factory=list)  # detail: every decode step; normal: next_ms
    e2e_ms: list[float] = dataclasses.field(default_factory=list)  # the seq_out generation, whole call
    response_s: list[float] = dataclasses.field(default_factory=list)  # the reference's ResponseTime
    peak_memory_bytes: list[int] = dataclasses.field(default_factory=list)  # per rank, max over repeats
    compile_ms: float = 0.0  # compiling for this case's shapes (--compile on): in no timing above
    prefill_j: list = dataclasses.field(default_factory=list)  # per repeat: J over the first-token region (None: n/a)
    decode_j: list = dataclasses.field(default_factory=list)  # per repeat: J over the decode steps (None: n/a)

    @property
    def has_next(self) -> bool:
        return self.case.seq_out > 1


@dataclasses.dataclass
class PerfRun:
    """What ran: the context every figure needs."""

    model_name: str
    model_path: str
    device: str
    device_name: str
    dtype: str
    world_size: int
    settings: PerfSettings
    rank_info: list[dict]
    bandwidth_bytes_per_s: list[float]  # per rank
    bandwidth_source: str
    warmup: Case
    results: list[CaseResult] = dataclasses.field(default_factory=list)
    started: str = ""
    torch_version: str = torch.__version__
    generator: torch.Generator | None = None  # the input ids' random stream
    warmup_compile_ms: float = 0.0  # compiling during the warm-up (--compile on)
    compile: str = "off"  # the engine's --compile, resolved (on | off)
    chip_family: str | None = None  # NPU chip family (d9 | d3); None off NPU or for a chip of neither
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)  # the files written (rank 0), by name
    energy: dict = dataclasses.field(default_factory=lambda: {"source": "n/a", "reason": "not measured"})

    @property
    def stem(self) -> str:
        return file_stem(self.model_name, self.device_name, self.settings.batch_size)


def _max_per_rank(a: list[int], b: list[int]) -> list[int]:
    return [max(x, y) for x, y in zip(a, b)] if a else list(b)


def _random_prompts(batch: int, seq_in: int, vocab: int, generator: torch.Generator) -> list[list[int]]:
    return torch.randint(0, vocab, (batch, seq_in), generator=generator).tolist()


def measure_case(engine, case: Case, settings: PerfSettings, generator: torch.Generator,
                 energy: EnergyProbe | None = None) -> CaseResult:
    """Run one case ``settings.repeat`` times on ``engine`` (an Engine or SpmdEngine); ``energy``: meter each
    repeat's first-token and decode regions (J)."""
    result = CaseResult(case, settings.batch_size, settings.mode)
    peaks: list[int] = []
    for _ in range(settings.repeat):
        prompts = _random_prompts(settings.batch_size, case.seq_in, engine.args.vocab_size, generator)
        sampler = energy.sampler() if energy is not None else None
        if sampler is not None:
            sampler.start()
        if settings.mode == "detail":
            try:
                run = engine.generate(prompts, case.seq_out, ignore_eos=True)
            finally:
                if sampler is not None:
                    sampler.stop()
            _check_made(run, case)
            if sampler is not None:
                _detail_energy(result, sampler, run)
                energy.check(sampler)
            result.first_ms.append(run.first_token_ms)
            if case.seq_out > 1:
                result.next_ms.append(run.next_token_ms)
                result.step_ms.extend(run.step_ms)
            result.e2e_ms.append(run.total_ms)
            result.response_s.append(run.total_ms / 1e3)
            runs = [run]
        else:
            try:
                marks = [time.perf_counter()]
                one = engine.generate(prompts, 1, ignore_eos=True)
                marks.append(time.perf_counter())
                full = engine.generate(prompts, case.seq_out, ignore_eos=True)
                marks.append(time.perf_counter())
            finally:
                if sampler is not None:
                    sampler.stop()
            _check_made(full, case)
            if sampler is not None:
                _normal_energy(result, sampler, marks)
                energy.check(sampler)
            result.first_ms.append(one.total_ms)
            if case.seq_out > 1:
                next_ms = (full.total_ms - one.total_ms) / (case.seq_out - 1)
                if next_ms <= 0:
                    log.warning("perf: case %s: normal mode's next-token time came out %.3f ms (the two generations' "
                                "noise exceeds %d decode steps); --perf-mode detail times each step", case, next_ms,
                                case.seq_out - 1)
                result.next_ms.append(next_ms)
                result.step_ms.append(next_ms)
            result.e2e_ms.append(full.total_ms)
            result.response_s.append((one.total_ms + full.total_ms) / 1e3)  # the reference times both
            runs = [one, full]
        for run in runs:
            peaks = _max_per_rank(peaks, run.peak_memory_bytes)
            result.compile_ms += run.compile_ms
    result.peak_memory_bytes = peaks
    return result


def _detail_energy(result: CaseResult, sampler: Sampler, run) -> None:
    """The joules of the regions the device events timed: from the first mark, first_token_ms, then the steps."""
    start = run.started_s or None  # 0.0: an engine that does not report where its regions lie
    prefill_end = None if start is None else start + run.first_token_ms / 1e3
    result.prefill_j.append(None if start is None else sampler.joules_between(start, prefill_end))
    if result.has_next:
        decode_end = None if start is None else prefill_end + sum(run.step_ms) / 1e3
        result.decode_j.append(None if start is None else sampler.joules_between(prefill_end, decode_end))


def _normal_energy(result: CaseResult, sampler: Sampler, marks: list[float]) -> None:
    """Normal mode's two generations, as its times: the 1-token call is the prefill; the full call minus it the decode."""
    one = sampler.joules_between(marks[0], marks[1])
    full = sampler.joules_between(marks[1], marks[2])
    result.prefill_j.append(one)
    if result.has_next:
        result.decode_j.append(None if one is None or full is None else full - one)


def _check_made(run, case: Case) -> None:
    made = {len(ids) for ids in run.output_ids}
    if made and made != {case.seq_out}:  # rank 0 only carries tokens
        raise RuntimeError(f"case {case}: made {sorted(made)} tokens instead of {case.seq_out}")


def merge_results(parts: Sequence[CaseResult]) -> CaseResult:
    """One case's results from several runs of it (repeats concatenated)."""
    head = parts[0]
    merged = CaseResult(head.case, head.batch_size, head.mode)
    for part in parts:
        for name in ("first_ms", "next_ms", "step_ms", "e2e_ms", "response_s", "prefill_j", "decode_j"):
            getattr(merged, name).extend(getattr(part, name))
        merged.peak_memory_bytes = _max_per_rank(merged.peak_memory_bytes, part.peak_memory_bytes)
        merged.compile_ms += part.compile_ms
    return merged


def start_run(engine, settings: PerfSettings, announce: bool = True) -> PerfRun:
    """Check the settings, measure bandwidth, warm up: a run ready for its cases."""
    spec = engine.spec
    settings.validate(spec.max_seq_len)
    warm = warmup_case(settings.cases, spec.max_seq_len)
    info = engine.rank_info
    device_name = info[0]["device_name"]
    if settings.mem_bandwidth_gbps is not None:
        bandwidth = [settings.mem_bandwidth_gbps * 1e9] * spec.world_size
        source = f"given ({flag('perf.mem_bandwidth')})"
    else:
        bandwidth = list(engine.bandwidth())
        source = "copy probe, all ranks at once"
    run = PerfRun(
        settings.model_name, spec.model_path, spec.device, device_name, spec.dtype, spec.world_size, settings,
        info, bandwidth, source, warm, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        generator=torch.Generator().manual_seed(settings.seed), compile=spec.compile,
        chip_family=spec.chip_family if spec.device == "npu" else None,  # the spec carries a given one off NPU
    )
    say = log.info if announce else log.debug
    say(
        "perf: model=%s (%s) device=%s (%s) dtype=%s world_size=%d batch=%d mode=%s repeat=%d cases=%d; "
        "memory bandwidth %.1f GB/s per rank (%s)",
        run.model_name, spec.model_path, spec.device, device_name, spec.dtype, spec.world_size,
        settings.batch_size, settings.mode, settings.repeat, len(settings.cases), min(bandwidth) / 1e9, source,
    )
    say("perf: warm-up at %s", warm)
    warmed = engine.generate(
        _random_prompts(settings.batch_size, warm.seq_in, engine.args.vocab_size, run.generator), warm.seq_out,
        ignore_eos=True,
    )
    run.warmup_compile_ms = warmed.compile_ms
    if spec.compile == "on":
        say("perf: compile %s: %.1f s in the warm-up (never in the token times)", spec.compile,
            warmed.compile_ms / 1e3)
    return run


class PerfJob:
    """One perf run, the same for every front end: check, warm up, measure a case, write, gate (a :class:`jobs.Job`).

    Everything that can be refused (settings, the baseline file, a baseline
    sharing no case, lengths over the KV cache) is refused before the engine
    starts.  The four files are rewritten after every case, by the writer
    alone (:func:`launch.is_writer`); the other torchrun ranks measure without
    writing or logging.
    """

    name = "perf"

    def __init__(self, settings: PerfSettings, output_dir: Path | None, *, baseline: str | Path | None = None,
                 tolerance: float = 0.10, progress: bool = True):
        settings.validate(max_seq_len=1 << 62)  # all but the lengths: those need the model's settings
        if not tolerance >= 0:
            raise UserError(f"{flag('perf.tolerance')} {tolerance} must be >= 0")
        self.settings = settings
        self.baseline = load_baseline(Path(baseline)) if baseline else None
        if self.baseline is not None:
            keys = {(settings.batch_size, c.seq_in, c.seq_out) for c in settings.cases}
            if not keys & set(self.baseline.rows):
                raise UserError(f"{flag('perf.baseline')} {self.baseline.path}: it holds none of this run's cases "
                                f"(batch size {settings.batch_size})")
        self.tolerance = tolerance
        self.output_dir = None if output_dir is None else Path(output_dir)
        if self.output_dir is not None and self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"{flag('perf.output_dir')} {self.output_dir} is not a directory")
        self.write = launch.is_writer()
        self.progress = progress
        self.perf_run: PerfRun | None = None
        self.energy: EnergyProbe | None = None
        self.paths: dict[str, Path] = {}  # what was written: reference_csv, extended_csv, samples_json, plot_png
        self._engine = None

    @classmethod
    def from_values(cls, v: dict, output_dir: Path | None, *, default_case_pair: str | None = None,
                    progress: bool = True) -> "PerfJob":
        """A job from the settings table's perf group (:func:`vicuna_bench.settings.values`)."""
        cases = select_cases(v["case_pair"], v["min_len_exp"], v["max_len_exp"], default_case_pair)
        settings = PerfSettings(cases=cases, batch_size=v["batch_size"], mode=v["perf_mode"], repeat=v["repeat"],
                                model_name=v["model_name"], seed=v["seed"], mem_bandwidth_gbps=v["mem_bandwidth"])
        return cls(settings, output_dir, baseline=v["baseline"], tolerance=v["tolerance"], progress=progress)

    def work(self) -> Work:
        """Decode steps (warm-up included), the longest input and output, the batch."""
        return settings_work(self.settings)

    def check(self, spec) -> None:
        """The checks that need the model's settings; names the run after the model when no name was given."""
        if self.settings.model_name is None:
            self.settings.model_name = default_model_name(spec.model_path)
        self.settings.validate(spec.max_seq_len)

    def run(self, engine, spec=None) -> PerfRun:
        """Every case on ``engine`` (a progress bar on the writer when ``progress``); the :class:`PerfRun`."""
        from tqdm import tqdm

        self.start(engine)
        bar = tqdm(self.settings.cases, desc="perf cases", unit="case", disable=not (self.progress and self.write))
        for case in bar:
            bar.set_postfix_str(f"in={case.seq_in} out={case.seq_out}")
            self.measure(case)
        self.perf_run.paths = dict(self.paths)
        return self.perf_run

    def start(self, engine) -> PerfRun:
        """Probe bandwidth and warm up on ``engine`` (an Engine or SpmdEngine)."""
        self.check(engine.spec)
        self.perf_run = start_run(engine, self.settings, announce=self.write)
        self._engine = engine
        if self.write:  # rank 0 meters every rank's device; the other SPMD ranks measure time only
            self.energy = open_energy(engine.spec)
            self.perf_run.energy = self.energy.record()
        return self.perf_run

    def measure_round(self, case: Case) -> CaseResult:
        """One timed run of ``case`` (not yet recorded)."""
        one = dataclasses.replace(self.settings, repeat=1)
        return measure_case(self._engine, case, one, self.perf_run.generator, energy=self.energy)

    def record(self, rounds: Sequence[CaseResult]) -> CaseResult:
        """Merge a case's rounds into the run, log it, rewrite the files."""
        result = merge_results(rounds)
        self.perf_run.results.append(result)
        if self.energy is not None:
            self.perf_run.energy = self.energy.record()  # a meter that failed mid-run now says why
        row = extended_row(self.perf_run, result)
        (log.info if self.write else log.debug)(
            "perf: case %s first %.2f ms, next %s ms, e2e %.3f s", result.case, row["first_token_ms_p50"],
            "-" if row["next_token_ms_p50"] == "" else f"{row['next_token_ms_p50']:.2f}", row["e2e_s_mean"],
        )
        if self.write and self.output_dir is not None:
            self.paths = write_tables(self.perf_run, self.output_dir)
            self.paths["plot_png"] = write_plot(self.perf_run, self.output_dir / f"{self.perf_run.stem}.png")
        return result

    def measure(self, case: Case) -> CaseResult:
        """``settings.repeat`` rounds of ``case``, recorded."""
        return self.record([self.measure_round(case) for _ in range(self.settings.repeat)])

    def compare(self, results: Sequence[CaseResult] | None = None) -> Comparison | None:
        """This run's (or ``results``') comparison with the baseline; None without one."""
        if self.baseline is None:
            return None
        run = self.perf_run if results is None else dataclasses.replace(self.perf_run, results=list(results))
        return compare_to_baseline(run, self.baseline, self.tolerance)

    def gate(self, echo: Callable[[str], None] = print) -> Comparison | None:
        """Print the comparison and raise :class:`GateFailed` on a regression (nothing without a baseline)."""
        if self.baseline is None:
            return None
        return gate(self.perf_run, self.baseline, self.tolerance, echo=echo)


def open_energy(spec) -> EnergyProbe:
    """The energy meter of the run's devices, all ranks' (n/a with the reason where none is readable)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun's: ranks on this host
    if local is not None and local.strip().isdigit() and int(local) != spec.world_size:
        return EnergyProbe(None, f"{local.strip()} of {spec.world_size} ranks on this host: the other hosts' "
                                 "devices cannot be metered from here")
    return EnergyProbe.open(spec.device, [spec.device_index(r) for r in range(spec.world_size)])


# ---------------------------------------------------------------- statistics and rows

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


def decode_step_bytes(run: PerfRun, case: Case) -> list[int]:
    """Bytes each rank reads in an average decode step of ``case``.

    The weights (see :func:`vicuna_bench.model.decode_read_bytes`) plus the
    keys and values of every cached token; decode step k (1..seq_out-1)
    attends over seq_in + k slots, seq_in + seq_out/2 on average.
    """
    batch = run.settings.batch_size
    mean_kv = case.seq_in + case.seq_out / 2
    return [int(i["decode_weight_bytes"] + batch * mean_kv * i["kv_bytes_per_token"]) for i in run.rank_info]


def decode_floor_ms(run: PerfRun, case: Case) -> float:
    """The bandwidth floor of one decode step: the slowest rank's bytes / its bandwidth."""
    return max(b / bw * 1e3 for b, bw in zip(decode_step_bytes(run, case), run.bandwidth_bytes_per_s))


def _mib(values: Sequence[int]) -> str:
    return ";".join(f"{v / 2**20:.1f}" for v in values)


def extended_row(run: PerfRun, r: CaseResult) -> dict:
    """One extended-CSV row; next-token figures are empty when seq_out == 1."""
    case, batch = r.case, r.batch_size
    first_p50 = percentile(r.first_ms, 50)
    row: dict = {
        "model_name": run.model_name, "device_name": run.device_name, "device": run.device, "dtype": run.dtype,
        "world_size": run.world_size, "perf_mode": r.mode, "batch_size": batch, "seq_in": case.seq_in,
        "seq_out": case.seq_out, "repeats": len(r.first_ms),
        "first_token_ms_mean": float(np.mean(r.first_ms)),
        "first_token_ms_p50": first_p50,
        "first_token_ms_p90": percentile(r.first_ms, 90),
        "first_token_ms_p99": percentile(r.first_ms, 99),
        "prefill_tokens_per_s": batch * case.seq_in / (first_p50 / 1e3),
        "e2e_s_mean": float(np.mean(r.e2e_ms)) / 1e3,
        "response_time_s": float(np.mean(r.response_s)),
        "peak_memory_mib_max": max(r.peak_memory_bytes) / 2**20 if r.peak_memory_bytes else "",
        "peak_memory_mib_per_rank": _mib(r.peak_memory_bytes),
        "weight_mib_per_rank": _mib([i["weight_bytes"] for i in run.rank_info]),
        "decode_bytes_per_step": max(decode_step_bytes(run, case)),
        "mem_bandwidth_gbps": min(run.bandwidth_bytes_per_s) / 1e9,
        "decode_floor_ms": decode_floor_ms(run, case),
        "compile": run.compile,
        "compile_s": r.compile_ms / 1e3,
        "cpu_binding": cpu_binding_text(run.rank_info),
        **load_columns(run.rank_info),
        "chip_family": run.chip_family or "",
        "prefill_j_per_token": _blank(per_token(r.prefill_j, batch * case.seq_in)),
        "decode_j_per_token": _blank(per_token(r.decode_j, batch * (case.seq_out - 1))) if r.has_next else "",
        "energy_source": energy_source_text(run.energy),
    }
    if r.has_next:
        next_p50 = percentile(r.step_ms, 50)
        row.update({
            "next_token_ms_mean": float(np.mean(r.next_ms)),
            "next_token_ms_p50": next_p50,
            "next_token_ms_p90": percentile(r.step_ms, 90),
            "next_token_ms_p99": percentile(r.step_ms, 99),
            "decode_tokens_per_s": batch / (next_p50 / 1e3),
            "decode_roofline_fraction": row["decode_floor_ms"] / next_p50,
        })
    else:
        for key in ("next_token_ms_mean", "next_token_ms_p50", "next_token_ms_p90", "next_token_ms_p99",
                    "decode_tokens_per_s", "decode_roofline_fraction"):
            row[key] = ""
    return row


def _blank(value: float | None):
    return "" if value is None else value


def energy_source_text(record: dict) -> str:
    """The extended CSV's energy_source cell: ``nvml`` | ``npu-smi`` | ``rapl`` | ``n/a: <why>``."""
    source = record.get("source") or "n/a"
    return f"n/a: {record.get('reason') or 'not measured'}" if source == "n/a" else source


def load_columns(rank_info: Sequence[dict]) -> dict:
    """Loading, from each rank's record: the slowest rank's seconds, all ranks' bytes read over that time
    (GB/s), and each rank's peak memory growth while loading (MiB; the device's only on accelerators)."""
    seconds = max((i.get("load_s") or 0.0 for i in rank_info), default=0.0)
    read = sum(i.get("load_bytes_read") or 0 for i in rank_info)
    device = [i.get("load_peak_device_bytes") for i in rank_info]
    return {
        "load_s": seconds,
        "load_gb_per_s": read / 1e9 / seconds if seconds and read else "",
        "load_peak_host_mib_per_rank": _mib([i.get("load_peak_host_bytes") or 0 for i in rank_info]),
        "load_peak_device_mib_per_rank": _mib(device) if all(d is not None for d in device) else "",
    }


def cpu_binding_text(rank_info: Sequence[dict]) -> str:
    """Each rank's CPUs in rank order, ``;``-separated (``0-23;24-47``); ``unbound`` where a rank is not pinned."""
    parts = []
    for info in rank_info:
        record = info.get("cpu_binding") or {}
        parts.append(record.get("cpus") or "unbound")
    return ";".join(parts)


def summary_table(run: PerfRun) -> str:
    """A per-case table for a terminal: first/next-token p50/p90 (ms), decode tokens/s, fraction of the floor."""
    head = (f"{'batch':>5} {'seq_in':>6} {'seq_out':>7} {'first p50':>10} {'first p90':>10} {'next p50':>9} "
            f"{'next p90':>9} {'decode tok/s':>12} {'of floor':>8}")
    lines = [head, "-" * len(head)]

    def cell(value, width, fmt):
        return f"{'-':>{width}}" if value == "" else f"{value:>{width}{fmt}}"

    for r in run.results:
        row = extended_row(run, r)
        lines.append(
            f"{r.batch_size:>5} {r.case.seq_in:>6} {r.case.seq_out:>7} {row['first_token_ms_p50']:>10.2f} "
            f"{row['first_token_ms_p90']:>10.2f} {cell(row['next_token_ms_p50'], 9, '.2f')} "
            f"{cell(row['next_token_ms_p90'], 9, '.2f')} {cell(row['decode_tokens_per_s'], 12, '.1f')} "
            f"{cell(row['decode_roofline_fraction'], 8, '.3g')}"
        )
    return "\n".join(lines)


def reference_line(r: CaseResult) -> str:
    """One line of the reference CSV, formatted as the reference writes it.

    ResponseTime with 2 decimals; the latencies as plain floats (means over
    repeats); the two columns the reference leaves at zero are ``0.0``.  Its
    next-token time is undefined for seq_out == 1: written as ``0.0``.
    """
    first = float(np.mean(r.first_ms))
    nxt = float(np.mean(r.next_ms)) if r.has_next else 0.0
    response = float(np.mean(r.response_s))
    return (f"{r.batch_size},{r.case.seq_in},{r.case.seq_out},{response:.2f},"
            f"{round(first, 4)},{round(nxt, 4)},0.0,0.0")


# ---------------------------------------------------------------- writing

def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}" if abs(value) >= 1e6 else f"{round(value, 6)}"
    return str(value)


def write_tables(run: PerfRun, output_dir: Path) -> dict[str, Path]:
    """The reference CSV, the extended CSV and the raw-sample JSON (atomically)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "reference_csv": output_dir / f"{run.stem}.csv",
        "extended_csv": output_dir / f"{run.stem}_extended.csv",
        "samples_json": output_dir / f"{run.stem}_samples.json",
    }
    write_atomic(paths["reference_csv"], REFERENCE_HEADER + "\n" + "".join(reference_line(r) + "\n" for r in run.results))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EXTENDED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(extended_rows(run))
    write_atomic(paths["extended_csv"], buf.getvalue())
    write_atomic(paths["samples_json"], json.dumps(samples_doc(run), indent=1) + "\n")
    return paths


def extended_rows(run: PerfRun) -> list[dict[str, str]]:
    """The extended CSV's rows, cells as written: what the nightly records, without reading the file back."""
    return [{k: _fmt(v) for k, v in extended_row(run, r).items()} for r in run.results]


def samples_doc(run: PerfRun) -> dict:
    """The samples JSON's content: the run's context and every raw sample (ms) of every case."""
    return {
        "model_name": run.model_name, "model_path": run.model_path, "device": run.device,
        "device_name": run.device_name, "chip_family": run.chip_family, "dtype": run.dtype,
        "world_size": run.world_size, "batch_size": run.settings.batch_size, "perf_mode": run.settings.mode, "repeat": run.settings.repeat,
        "seed": run.settings.seed, "warmup": [run.warmup.seq_in, run.warmup.seq_out],
        "bandwidth_bytes_per_s": run.bandwidth_bytes_per_s, "bandwidth_source": run.bandwidth_source,
        "rank_info": run.rank_info, "started": run.started, "torch": run.torch_version,
        "compile": run.compile, "warmup_compile_s": run.warmup_compile_ms / 1e3,
        "host": platform.node(),
        "environment": run.rank_info[0].get("environment") if run.rank_info else None,
        "cpu_binding": [i.get("cpu_binding") for i in run.rank_info],
        "energy": run.energy,
        "cases": [
            {"seq_in": r.case.seq_in, "seq_out": r.case.seq_out, "first_ms": r.first_ms, "next_ms": r.next_ms,
             "step_ms": r.step_ms, "e2e_ms": r.e2e_ms, "response_s": r.response_s,
             "peak_memory_bytes": r.peak_memory_bytes, "compile_s": r.compile_ms / 1e3,
             "prefill_j": r.prefill_j, "decode_j": r.decode_j}
            for r in run.results
        ],
    }


def write_plot(run: PerfRun, path: Path) -> Path:
    """First-token and next-token latency against input length, one line per output length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_first, ax_next) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_out: dict[int, list[CaseResult]] = {}
    for r in run.results:
        by_out.setdefault(r.case.seq_out, []).append(r)
    for seq_out in sorted(by_out):
        rows = sorted(by_out[seq_out], key=lambda r: r.case.seq_in)
        xs = [r.case.seq_in for r in rows]
        ax_first.plot(xs, [percentile(r.first_ms, 50) for r in rows], marker="o", label=f"out {seq_out}")
        with_next = [r for r in rows if r.has_next]
        if with_next:
            ax_next.plot([r.case.seq_in for r in with_next], [percentile(r.step_ms, 50) for r in with_next],
                         marker="o", label=f"out {seq_out}")
    floors = sorted({(r.case.seq_in, decode_floor_ms(run, Case(r.case.seq_in, 1))) for r in run.results})
    if floors:
        ax_next.plot([f[0] for f in floors], [f[1] for f in floors], "k--", linewidth=1,
                     label="bandwidth floor (batch, seq_in)")
    for ax, title in ((ax_first, "first token (prefill) p50"), (ax_next, "next token (decode step) p50")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", title="output length" if ax is ax_first else None)
    fig.suptitle(f"{run.model_name} on {run.device_name} ({run.device}), {run.dtype}, world size "
                 f"{run.world_size}, batch {run.settings.batch_size}, {run.settings.mode} mode", fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG (110 dpi) at ``path``, atomically, and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


# ---------------------------------------------------------------- baseline gate

@dataclasses.dataclass(frozen=True)
class Baseline:
    path: Path
    kind: str  # "reference" | "extended"
    rows: dict  # (batch, seq_in, seq_out) -> {"first": ms, "next": ms | None}


def load_baseline(path: Path) -> Baseline:
    """Read a baseline: a reference CSV or an extended CSV of an earlier run."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag('perf.baseline')} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag('perf.baseline')} {path}: cannot read it ({exc})") from None
    lines = text.splitlines()
    if not lines:
        raise UserError(f"{flag('perf.baseline')} {path}: empty file")
    header = lines[0].strip()
    if header == REFERENCE_HEADER:
        kind, keys = "reference", ("batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)",
                                    "forward_first_token_time(ms)", "forward_next_token_time(ms)")
    elif header in _EXTENDED_HEADERS:
        kind, keys = "extended", ("batch_size", "seq_in", "seq_out", "first_token_ms_p50", "next_token_ms_p50")
    else:
        raise UserError(f"{flag('perf.baseline')} {path}: line 1 is neither the reference CSV header nor the extended one")
    rows: dict = {}
    for lineno, rec in enumerate(csv.DictReader(lines), start=2):
        try:
            key = (int(rec[keys[0]]), int(rec[keys[1]]), int(rec[keys[2]]))
            first = float(rec[keys[3]])
            nxt = float(rec[keys[4]]) if rec[keys[4]] not in ("", None) else None
        except (TypeError, ValueError, KeyError):
            raise UserError(f"{flag('perf.baseline')} {path}: line {lineno} is not a row of numbers") from None
        if key[2] <= 1:
            nxt = None  # undefined for one output token (the reference writes 0)
        rows[key] = {"first": first, "next": nxt}
    if not rows:
        raise UserError(f"{flag('perf.baseline')} {path}: no rows")
    return Baseline(path, kind, rows)


@dataclasses.dataclass(frozen=True)
class Comparison:
    lines: list[dict]  # case, metric, old, new, ratio, verdict
    regressions: list[dict]
    unmatched: list[str]  # cases of this run that the baseline lacks

    def table(self) -> str:
        head = f"{'case':>16} {'metric':>10} {'old ms':>11} {'new ms':>11} {'new/old':>8}  verdict"
        out = [head, "-" * len(head)]
        for ln in self.lines:
            out.append(f"{ln['case']:>16} {ln['metric']:>10} {ln['old']:>11.3f} {ln['new']:>11.3f} "
                       f"{ln['ratio']:>8.3f}  {ln['verdict']}")
        for case in self.unmatched:
            out.append(f"{case:>16} {'':>10} {'':>11} {'':>11} {'':>8}  not in the baseline")
        return "\n".join(out)


def compare_to_baseline(run: PerfRun, baseline: Baseline, tolerance: float) -> Comparison:
    """Case by case: slower than the baseline by more than ``tolerance`` is a regression.

    Like for like: a reference baseline is compared with this run's means
    (what its reference CSV holds), an extended one with the p50s; each by
    :func:`vicuna_bench.stats.judge_change`, the comparison of the nightly and ``compare``.
    """
    if not tolerance >= 0:
        raise UserError(f"{flag('perf.tolerance')} {tolerance} must be >= 0")
    lines, regressions, unmatched = [], [], []
    for r in run.results:
        key = (r.batch_size, r.case.seq_in, r.case.seq_out)
        label = f"bs{key[0]} {r.case}"
        old = baseline.rows.get(key)
        if old is None:
            unmatched.append(label)
            continue
        if baseline.kind == "reference":
            new = {"first": float(np.mean(r.first_ms)), "next": float(np.mean(r.next_ms)) if r.has_next else None}
        else:
            new = {"first": percentile(r.first_ms, 50), "next": percentile(r.step_ms, 50) if r.has_next else None}
        for metric in ("first", "next"):
            if old[metric] is None or new[metric] is None or old[metric] <= 0:
                continue
            # A CSV holds figures, not samples: the band alone decides (stats.judge_change without samples).
            change = judge_change(None, None, tolerance, level_b=new[metric], level_a=old[metric])
            bad = change.word == "slower"
            line = {"case": label, "metric": metric + "_token", "old": old[metric], "new": new[metric],
                    "ratio": change.ratio, "verdict": f"SLOWER by more than {tolerance:.0%}" if bad else "ok"}
            lines.append(line)
            if bad:
                regressions.append(line)
    return Comparison(lines, regressions, unmatched)


def gate(run: PerfRun, baseline: Baseline, tolerance: float, echo: Callable[[str], None] = print) -> Comparison:
    """Compare, print the table, raise :class:`GateFailed` on any regression."""
    comparison = compare_to_baseline(run, baseline, tolerance)
    echo(f"baseline {baseline.path} ({baseline.kind} CSV), tolerance {tolerance:.0%}:\n{comparison.table()}")
    if not comparison.lines:
        raise UserError(f"{flag('perf.baseline')} {baseline.path}: it shares no case with this run")
    if comparison.regressions:
        worst = max(comparison.regressions, key=lambda ln: ln["ratio"])
        raise GateFailed(
            f"{len(comparison.regressions)} perf figure(s) slower than the baseline by more than {tolerance:.0%} "
            f"(worst: {worst['case']} {worst['metric']} x{worst['ratio']:.2f})"
        )
    return comparison


def default_model_name(model_path: str) -> str:
    """The embedded model's name, else the model directory's name."""
    from .embedded import MODEL_NAME, cache_root

    path = Path(model_path)
    try:
        if path.resolve().parent == cache_root().resolve() and path.name.startswith(MODEL_NAME):
            return MODEL_NAME
    except OSError:
        pass
    return path.resolve().name or "model"
