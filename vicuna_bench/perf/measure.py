"""Measuring: the warm-up, every case's samples, the energy of their regions.

The procedure is the reference's (shared/spec/REFERENCE.md, "Performance
test"): random token ids, end of sequence ignored, one warm-up at the largest
input and output length, each figure the maximum over ranks.  Two timing modes:

* ``detail`` (default): the engine times the prefill (with the choice of the
  first token) and every decode step, each closed by a device synchronise;
  next-token time is the mean of the decode steps.
* ``normal``: the reference's two-generation method: a 1-token generation
  is the first-token time; a ``seq_out`` generation minus it, over
  ``seq_out - 1``, is the next-token time (undefined when ``seq_out == 1``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from collections.abc import Sequence

import torch

from ..energy import EnergyProbe, Sampler
from ..settings import flag
from .cases import Case, PerfSettings, file_stem, warmup_case

log = logging.getLogger("vicuna_bench")


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



def open_energy(spec) -> EnergyProbe:
    """The energy meter of the run's devices, all ranks' (n/a with the reason where none is readable)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun's: ranks on this host
    if local is not None and local.strip().isdigit() and int(local) != spec.world_size:
        return EnergyProbe(None, f"{local.strip()} of {spec.world_size} ranks on this host: the other hosts' "
                                 "devices cannot be metered from here")
    return EnergyProbe.open(spec.device, [spec.device_index(r) for r in range(spec.world_size)])
