"""The statistics of a run: percentiles and the decode step's bandwidth floor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .cases import Case
from .measure import PerfRun


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
