"""The PNG plot of a run: first-token and next-token latency against input length."""

from __future__ import annotations

import io
from pathlib import Path

from ..files import write_atomic
from .cases import Case
from .figures import decode_floor_ms, percentile
from .measure import CaseResult, PerfRun


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
