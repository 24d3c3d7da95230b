"""Synthetic nightly runs and metrics for the nightly tests (no model, no device)."""

from __future__ import annotations

import pytest

from vicuna_bench.errors import UserError
from vicuna_bench.nightly.history import Metric, RunRecord, record_run


def run_record(n: int = 0, **overrides) -> RunRecord:
    """A CPU fp32 run of the embedded model, started on day ``n`` of November 2026."""
    fields = dict(
        started_utc=f"2026-11-{1 + n:02d}T01:00:00Z", finished_utc=f"2026-11-{1 + n:02d}T01:40:00Z",
        status="pass", model="SmolLM2-135M-Instruct", device="cpu", device_name="AMD_EPYC", dtype="fp32",
        world_size=1, batch_size=1, git_commit=f"{n:040x}", settings={"quick": True},
        environment={"torch": "2.5.1"},
    )
    fields.update(overrides)
    return RunRecord(**fields)


def latency(value: float, name: str = "next_token_ms_p50", case: str = "256x64") -> Metric:
    return Metric("latency", name, case, value, "ms", "lower")


def accuracy(value: float, n: int, case: str = "mmlu/generate") -> Metric:
    return Metric("accuracy", "accuracy", case, value, "fraction", "higher", n=n)


def record_series(db, values, metric=latency, start: int = 0, **overrides) -> list[int]:
    """Record one run per value (oldest first), each with the one metric ``metric(value)``; their ids."""
    return [record_run(db, run_record(start + i, **overrides), [metric(v)]) for i, v in enumerate(values)]


def assert_bad_file(path, text: str, reader, message: str) -> None:
    """Write ``text`` to ``path``: ``reader(path)`` must raise one UserError matching ``message``, naming the file first."""
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        reader(path)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)
