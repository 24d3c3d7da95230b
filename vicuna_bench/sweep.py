"""The batch sweep: every case at each batch size on one engine, the throughput-latency curve and its knee.

Each batch size is an ordinary perf run (:class:`perf.PerfJob`: its own
warm-up and its four files, ``..._bs{N}``); the sweep adds a CSV and a PNG
of decode tokens/s against next-token p50 per case, the knee
(:func:`knee_index`) and a verdict line per case.  A batch is measured only
once the fit check (``fit.check_fit``) passes for it against the memory the
rank had when it loaded; the first batch that does not fit ends the sweep
with its message, before anything is allocated for it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from pathlib import Path
from collections.abc import Sequence

from . import fit
from .errors import UserError
from .files import write_atomic
from .model import KVCachePool
from .jobs import Work
from .perf import Case, PerfJob, PerfRun, extended_row, percentile, save_figure, settings_work
from .settings import flag

log = logging.getLogger("vicuna_bench")

# The knee: the first batch after which one more ms of next-token p50 buys less than this fraction of the
# tokens/s that the first latency-costing step bought (see knee_index).
KNEE_FRACTION = 0.25

SWEEP_COLUMNS = [
    "model_name", "device_name", "device", "dtype", "world_size", "perf_mode", "seq_in", "seq_out", "batch_size",
    "first_token_ms_p50", "first_token_ms_p99", "next_token_ms_p50", "next_token_ms_p99",
    "decode_tokens_per_s", "e2e_tokens_per_s", "peak_memory_mib_max", "knee",
]


def parse_batch_sizes(text: str | None) -> list[int] | None:
    """``"1,2,4,8"`` as sorted distinct batch sizes; None for no sweep (None or blank)."""
    if text is None or not str(text).strip():
        return None
    sizes = set()
    for word in str(text).split(","):
        word = word.strip()
        if not word.isdigit() or int(word) < 1:
            raise UserError(f"{flag('perf.batch_sizes')} {text!r}: {word!r} is not a batch size (valid: integers "
                            ">= 1, comma-separated, e.g. 1,2,4,8)")
        sizes.add(int(word))
    return sorted(sizes)


# ---------------------------------------------------------------- the knee and the verdict

@dataclasses.dataclass(frozen=True)
class Point:
    """One case at one batch size on the curve."""

    batch: int
    latency_ms: float  # next-token p50
    tokens_per_s: float  # decode tokens/s: batch / next-token p50


def knee_index(points: Sequence[Point], fraction: float = KNEE_FRACTION) -> int | None:
    """Index of the knee in ``points`` (sorted by batch); None where the curve has not bent.

    Walking the segments from batch to batch in order, with dT the change of
    tokens/s and dL the change of next-token p50 (ms):
    dT <= 0 (more rows bought no throughput): the knee is the segment's start;
    dL <= 0 and dT > 0: free throughput, go on;
    otherwise the gain g = dT / dL (tokens/s per extra ms): the first such
    segment's g is the reference; a later one with g < ``fraction`` x the
    reference makes its start the knee.
    """
    reference = None
    for i in range(1, len(points)):
        d_t = points[i].tokens_per_s - points[i - 1].tokens_per_s
        d_l = points[i].latency_ms - points[i - 1].latency_ms
        if d_t <= 0:
            return i - 1
        if d_l <= 0:
            continue
        gain = d_t / d_l
        if reference is None:
            reference = gain
        elif gain < fraction * reference:
            return i - 1
    return None


def _times(ratio: float) -> str:
    """``5.1x``; two significant digits below 0.95 (``0.42x``), where one decimal would round to nothing."""
    return f"{ratio:.1f}x" if ratio >= 0.95 else f"{ratio:.2g}x"


def verdict(case: Case, points: Sequence[Point], fraction: float = KNEE_FRACTION) -> str:
    """One line: the knee's tokens/s and latency against the first batch's (the last batch where no knee)."""
    k = knee_index(points, fraction)
    at = points[-1 if k is None else k]
    base = points[0]
    line = (f"case {case}: batch {at.batch}: {_times(at.tokens_per_s / base.tokens_per_s)} the tokens/s of batch "
            f"{base.batch} at {_times(at.latency_ms / base.latency_ms)} the latency")
    if k is None:
        return line + f" (no knee up to batch {at.batch})" if len(points) > 1 else line + " (one batch size)"
    return line + " (the knee)"


# ---------------------------------------------------------------- the fit check per batch

def check_batch(engine, batch: int) -> None:
    """Raise the fit check's UserError when ``batch`` rows would not fit the memory a rank had at load.

    Each rank reports the room it kept for KV caches (``kv_room_bytes``:
    its memory at load less weights and the runtime allowance for the batch
    it was opened for); that memory is rebuilt from it and checked for
    ``batch`` as the rank itself checks at load.  Where a rank does not know
    its memory, nothing is checked (said once, by the caller).
    """
    spec, args = engine.spec, engine.args
    rooms = [info.get("kv_room_bytes") for info in engine.rank_info]
    if not rooms or any(r is None for r in rooms):
        raise _Unknown()
    opened = fit.rank_need(args, spec.world_size, spec.dtype, spec.max_seq_len, spec.fit_batch, spec.device)
    has = min(rooms) + opened.weight_bytes + opened.runtime_bytes
    _check_batch_fit(args, spec, batch, has)
    if spec.kv_cache_budget_mb is None:
        # The rank's pool keeps up to min(2 sets, the room it kept at load for its smaller batch); that room
        # ignores this batch's larger activations, so the pool's reach is checked against this batch's room.
        need = fit.rank_need(args, spec.world_size, spec.dtype, spec.max_seq_len, batch, spec.device)
        room = fit.kv_room_bytes(need, has)
        pool = KVCachePool.budget_for(need.kv_bytes, min(rooms))
        if pool > room:
            raise UserError(
                f"batch {batch}: the KV cache pool opened for batch {spec.fit_batch} may keep {_gib(pool)} "
                f"(up to two sets of {_gib(need.kv_bytes)}) beside this batch's weights and runtime, but each rank has "
                f"{_gib(room)} for it; start the sweep at batch {batch} to size the pool for it")


def _gib(n: int) -> str:
    return f"{n / fit.GIB:.2f} GiB"


def _check_batch_fit(args, spec, batch: int, has: int) -> None:
    """The fit check for ``batch`` with ``has`` bytes per rank (the host's shared by its ranks on CPU)."""
    budget = None if spec.kv_cache_budget_mb is None else spec.kv_cache_budget_mb << 20
    if spec.device == "cpu":  # the host's memory, shared by its ranks (as the check at load counts it)
        sharing = spec.ranks_on_host()
        where = f"{has * sharing / fit.GIB:.2f} GiB available on the host at load"
        fit.check_fit(fit.FitCase(args, spec.world_size, spec.dtype, spec.max_seq_len, batch, "cpu"), has * sharing,
                      where, ranks_sharing=sharing, kv_budget=budget)
    else:
        fit.check_fit(fit.FitCase(args, spec.world_size, spec.dtype, spec.max_seq_len, batch, spec.device), has,
                      f"{has / fit.GIB:.2f} GiB free per device at load", kv_budget=budget)


class _Unknown(Exception):
    """A rank does not know its memory."""


# ---------------------------------------------------------------- the sweep

@dataclasses.dataclass
class Sweep:
    """What the sweep measured: one perf run per batch that fitted, and why it stopped early (if it did)."""

    batch_sizes: list[int]
    runs: list[PerfRun] = dataclasses.field(default_factory=list)
    stopped: str | None = None  # the line that ended the sweep at a batch that does not fit
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    def curves(self) -> dict[Case, list[Point]]:
        """Per case with a next token, its points by batch."""
        out: dict[Case, list[Point]] = {}
        for run in self.runs:
            for r in run.results:
                if not r.has_next:
                    continue
                p50 = percentile(r.step_ms, 50)
                out.setdefault(r.case, []).append(Point(r.batch_size, p50, r.batch_size / (p50 / 1e3)))
        return {c: sorted(ps, key=lambda p: p.batch) for c, ps in out.items()}

    def verdicts(self) -> list[str]:
        return [verdict(c, ps) for c, ps in self.curves().items()]

    @property
    def stem(self) -> str:
        run = self.runs[0]
        return f"performance_test_{run.model_name}_{run.device_name.replace(' ', '_')}_sweep"


class SweepJob:
    """``perf --batch-sizes``: a perf job's cases at each batch size on one engine (a :class:`jobs.Job`).

    A baseline is refused when the job is built (the gate is per batch size).  The engine is opened for
    the first batch (the fit check at load sizes it); each later batch is checked before it is measured.
    """

    name = "sweep"

    def __init__(self, perf_job: PerfJob, batch_sizes: Sequence[int]):
        if perf_job.baseline is not None:
            raise UserError(f"{flag('perf.batch_sizes')} with {flag('perf.baseline')} {perf_job.baseline.path}: "
                            f"gate one batch size at a time ({flag('perf.batch_size')})")
        self.perf_job = perf_job
        self.batch_sizes = list(batch_sizes)

    def work(self) -> Work:
        """Every batch's decode steps; the first batch (the one checked at load)."""
        settings = dataclasses.replace(self.perf_job.settings, batch_size=self.batch_sizes[0],
                                       repeat=self.perf_job.settings.repeat * len(self.batch_sizes))
        return settings_work(settings)

    def check(self, spec) -> None:
        self.perf_job.check(spec)

    def run(self, engine, spec=None) -> Sweep:
        """The cases at each batch size; files rewritten after each batch (writer only)."""
        return run_sweep(engine, self.perf_job, self.batch_sizes)


def run_sweep(engine, job: PerfJob, batch_sizes: Sequence[int]) -> Sweep:
    """``job``'s cases at each of ``batch_sizes`` on ``engine``; files rewritten after each batch (writer only)."""
    sweep = Sweep(list(batch_sizes))
    unknown_said = False
    for batch in batch_sizes:
        try:
            check_batch(engine, batch)
        except _Unknown:
            if not unknown_said and job.write:
                log.warning("perf sweep: a rank does not know its memory: batches are measured unchecked")
            unknown_said = True
        except UserError as exc:
            sweep.stopped = f"batch {batch} does not fit, the sweep stops here: {exc}"
            if job.write:
                log.warning("perf sweep: %s", sweep.stopped)
            break
        one = PerfJob(dataclasses.replace(job.settings, batch_size=batch), job.output_dir, progress=job.progress)
        sweep.runs.append(one.run(engine))
        if job.write and job.output_dir is not None:
            sweep.paths = write_sweep(sweep, job.output_dir)
    return sweep


# ---------------------------------------------------------------- writing

def sweep_rows(sweep: Sweep) -> list[dict]:
    """One row per case and batch, cases in run order, batches ascending; ``knee`` 1 on each case's knee."""
    knees = {c: (None if k is None else ps[k].batch) for c, ps in sweep.curves().items()
             for k in [knee_index(ps)]}
    rows = []
    by_case: dict[Case, list[dict]] = {}
    for run in sweep.runs:
        for r in run.results:
            ext = extended_row(run, r)
            e2e_p50 = percentile(r.e2e_ms, 50)
            by_case.setdefault(r.case, []).append({
                "model_name": run.model_name, "device_name": run.device_name, "device": run.device,
                "dtype": run.dtype, "world_size": run.world_size, "perf_mode": run.settings.mode,
                "seq_in": r.case.seq_in, "seq_out": r.case.seq_out, "batch_size": r.batch_size,
                "first_token_ms_p50": ext["first_token_ms_p50"], "first_token_ms_p99": ext["first_token_ms_p99"],
                "next_token_ms_p50": ext["next_token_ms_p50"], "next_token_ms_p99": ext["next_token_ms_p99"],
                "decode_tokens_per_s": ext["decode_tokens_per_s"],
                "e2e_tokens_per_s": r.batch_size * r.case.seq_out / (e2e_p50 / 1e3),
                "peak_memory_mib_max": ext["peak_memory_mib_max"],
                "knee": int(knees.get(r.case) == r.batch_size),
            })
    for case_rows in by_case.values():
        rows += sorted(case_rows, key=lambda row: row["batch_size"])
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{round(value, 6)}"
    return str(value)


def write_sweep(sweep: Sweep, output_dir: Path) -> dict[str, Path]:
    """The sweep's CSV and PNG under ``output_dir`` (atomically)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in sweep_rows(sweep))
    paths = {"sweep_csv": output_dir / f"{sweep.stem}.csv", "sweep_png": output_dir / f"{sweep.stem}.png"}
    write_atomic(paths["sweep_csv"], buf.getvalue())
    write_sweep_plot(sweep, paths["sweep_png"])
    return paths


def write_sweep_plot(sweep: Sweep, path: Path) -> Path:
    """Decode tokens/s against next-token p50, a labelled point per batch, a line per case, knees ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    curves = sweep.curves()
    for case, points in curves.items():
        xs, ys = [p.latency_ms for p in points], [p.tokens_per_s for p in points]
        line, = ax.plot(xs, ys, marker="o", label=f"[in {case.seq_in}, out {case.seq_out}]")
        for p in points:
            ax.annotate(f"bs {p.batch}", (p.latency_ms, p.tokens_per_s), textcoords="offset points",
                        xytext=(5, -12), fontsize="small")
        k = knee_index(points)
        if k is not None:
            ax.plot([points[k].latency_ms], [points[k].tokens_per_s], marker="o", markersize=16, fillstyle="none",
                    color=line.get_color(), linestyle="none")
    ax.plot([], [], marker="o", markersize=12, fillstyle="none", color="k", linestyle="none",
            label=f"knee (gain per ms < {KNEE_FRACTION:g} x the first step's)")
    ax.set_xlabel("next-token latency p50 (ms)")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title="case")
    run = sweep.runs[0]
    title = (f"{run.model_name} on {run.device_name} ({run.device}), {run.dtype}, world size {run.world_size}: "
             f"batch {', '.join(str(r.settings.batch_size) for r in sweep.runs)}")
    ax.set_title(title, fontsize="medium")
    notes = sweep.verdicts() + ([sweep.stopped.split(":")[0]] if sweep.stopped else [])
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize="small", va="bottom")
        fig.tight_layout(rect=(0, 0.03 * len(notes) + 0.02, 1, 1))
    else:
        fig.tight_layout()
    return save_figure(fig, path)


def summary(sweep: Sweep) -> str:
    """The terminal's account: the verdicts, and the stop line where the sweep stopped early."""
    lines = sweep.verdicts() or ["no case has a next token: no curve"]
    if sweep.stopped:
        lines.append(sweep.stopped)
    return "\n".join(lines)
