"""The perf job: one run, the same for every front end (check, warm up, measure, write, gate)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from collections.abc import Callable, Sequence

from .. import launch
from ..energy import EnergyProbe
from ..errors import UserError
from ..jobs import Work
from ..settings import flag
from .baseline import Comparison, compare_to_baseline, gate, load_baseline
from .cases import Case, PerfSettings, default_model_name, select_cases, settings_work
from .measure import CaseResult, PerfRun, measure_case, merge_results, open_energy, start_run
from .plot import write_plot
from .writers import extended_row, write_tables

log = logging.getLogger("vicuna_bench")


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
