"""Release gate: full val-set MMLU and C-Eval accuracy >= threshold - tolerance (``pytest -m accuracy``).

The model comes from ``--model-path`` (default: the embedded model), the
data from ``--mmlu-dir`` / ``--ceval-dir`` (default ../shared/datasets), the
thresholds from vicuna_bench/thresholds.json; ``--accuracy-model`` names the
thresholds to use, ``--accuracy-tolerance`` overrides the tolerance.  A model
without thresholds is reported and skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna_bench.errors import GateFailed
from vicuna_bench.precision.gates import identify_model, load_thresholds
from vicuna_bench.precision.runner import PrecisionConfig, run_precision


@pytest.mark.parametrize("mode", ["mmlu", "ceval"])
def test_release_gate(mode, vicuna_options, engine_spec, engine_factory, tmp_path):
    o = vicuna_options
    work = o[f"{mode}_dir"]
    if work is None:
        pytest.skip(f"no --{mode}-dir given and no ../shared/datasets/{mode} beside the checkout or a folder above it")
    key = identify_model(engine_spec.model_path, o["accuracy_model"])
    if key is None:
        pytest.skip(f"unknown model {engine_spec.model_path}: no release threshold (name one with --accuracy-model)")
    scoring = o["accuracy_scoring"]
    wanted = ["generate", "logits"] if scoring == "both" else [scoring]
    thresholds = load_thresholds()["models"][key].get(mode, {})
    if all(thresholds.get(s) is None for s in wanted):
        pytest.skip(f"no {mode} threshold for {key} with scoring {scoring!r} in thresholds.json")
    out = Path(o["accuracy_output_dir"]) / mode if o["accuracy_output_dir"] else tmp_path / mode
    cfg = PrecisionConfig(
        mode=mode, work_dir=work, output_dir=out, batch=o["accuracy_batch"], scoring=scoring,
        gate=True, gate_model=key, tolerance=o["accuracy_tolerance"],
    )
    failure = None
    try:
        summary = run_precision(cfg, engine_spec, engine=engine_factory(engine_spec))
    except GateFailed as exc:
        failure = str(exc)
    if failure is not None:  # outside the except block, so the table is reported once, unchained
        pytest.fail(failure, pytrace=False)  # the first line, then the per-category table
    gate = summary["gate"]
    if gate["status"] == "skipped":
        pytest.skip(gate["reason"])
    assert gate["status"] == "passed"
