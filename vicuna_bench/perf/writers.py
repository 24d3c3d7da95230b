"""What a run writes, rewritten after every case so a long sweep that dies keeps what it measured.

The reference CSV (byte-compatible header and name), an extended CSV
(percentiles, throughput, memory, the decode bandwidth roofline, loading,
energy), a JSON file of every raw sample, and a terminal summary table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from ..energy import per_token
from ..files import write_atomic
from .figures import decode_floor_ms, decode_step_bytes, percentile
from .measure import CaseResult, PerfRun

REFERENCE_HEADER = (
    "batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),"
    "forward_first_token_time(ms),forward_next_token_time(ms),pre_next_token_time(ms),"
    "post_next_token_time_post(ms)"
)

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
