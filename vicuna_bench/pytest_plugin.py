"""pytest plugin: the options, markers and fixtures of the vicuna-bench suites.

Tests ask for fixtures (``engine``, ``engine_factory``, ``engine_spec``) and
know nothing of process groups.  Engines are started once per session for a
given model / world size / device / dtype and closed at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MARKERS = {
    "unit": "CPU, fast, always run",
    "hw": "needs an NPU or GPU (skipped with a reason otherwise)",
    "accuracy": "needs a model and data; release gate",
    "perf": "benchmarks; record, never fail on absolute time",
}


def pytest_addoption(parser):
    g = parser.getgroup("vicuna-bench")
    g.addoption("--world-size", type=int, default=1, help="tensor-parallel ranks (default 1)")
    g.addoption("--device", default="auto", help="cpu | cuda | npu | auto")
    g.addoption("--device-type", default="d9", help="NPU chip family d9 | d3")
    g.addoption("--dtype", default="auto", help="auto | fp32 | fp16 | bf16")
    g.addoption("--model-path", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    g.addoption("--max-seq-len", type=int, default=None, help="KV cache length (default $MAX_SEQ_LENGTH, else 2048)")
    g.addoption("--mmlu-dir", default=None, help="MMLU work dir holding data/ (default ../shared/datasets/mmlu)")
    g.addoption("--ceval-dir", default=None, help="C-Eval work dir holding data/ (default ../shared/datasets/ceval)")
    g.addoption("--accuracy-model", default=None,
                help="thresholds.json model to gate against (default: recognised from the model's name/config)")
    g.addoption("--accuracy-tolerance", type=float, default=None, help="gate tolerance in points (default thresholds.json: 1.0)")
    g.addoption("--accuracy-batch", type=int, default=1, help="precision batch size (default 1)")
    g.addoption("--accuracy-scoring", default="generate", help="precision scoring: generate | logits | both")
    g.addoption("--accuracy-output-dir", default=None, help="where the release gate writes its result dirs (default: tmp)")
    g.addoption("--perf-output-dir", default=None, help="where perf CSVs and plots go")
    g.addoption("--perf-baseline", default=None, help="baseline CSV; a case slower than it by more than the tolerance fails")
    g.addoption("--perf-tolerance", type=float, default=0.10, help="allowed slowdown against --perf-baseline (0.10 = 10%%)")
    g.addoption("--perf-case-pair", default=None,
                help="perf cases [[seq_in, seq_out], ...] (default: [[32,8],[64,8]] on the tiny model, [[256,64]] otherwise)")
    g.addoption("--perf-min-len-exp", type=int, default=None, help="perf sweep: smallest power of two")
    g.addoption("--perf-max-len-exp", type=int, default=None, help="perf sweep: largest power of two")
    g.addoption("--perf-batch-size", type=int, default=1, help="perf batch size (default 1)")
    g.addoption("--perf-mode", default="detail", help="perf timing mode: detail | normal")
    g.addoption("--perf-repeat", type=int, default=3, help="runs of each perf case (default 3)")


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def accelerator_available() -> str | None:
    """'npu' or 'cuda' when one is usable, else None."""
    from . import devices

    try:
        if devices.npu_available():
            return "npu"
    except Exception:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else None


def pytest_collection_modifyitems(config, items):
    hw_items = [item for item in items if "hw" in item.keywords]
    if hw_items and accelerator_available() is None:
        skip = pytest.mark.skip(reason="hw test: no NPU or CUDA device on this machine")
        for item in hw_items:
            item.add_marker(skip)


def shared_dataset_dir(starts: list[Path], name: str) -> Path | None:
    """``shared/datasets/<name>`` beside the checkout (or beside a folder above it), when present.

    Each start (pytest's rootdir, then the invocation dir) and its parents are tried in turn. The rootdir alone is
    not enough: pytest picks it before plugins register their options, so in ``pytest -m accuracy
    --accuracy-output-dir /tmp/x`` the option's value counts as a path argument and the rootdir becomes /tmp/x.
    """
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder.parent / "shared" / "datasets" / name
            if (candidate / "data").is_dir():
                return candidate
    return None


@pytest.fixture(scope="session")
def vicuna_options(pytestconfig) -> dict:
    """The suite options as a dict (defaults resolved where cheap)."""
    opt = pytestconfig.getoption
    starts = [Path(str(pytestconfig.rootpath)).resolve(), Path(pytestconfig.invocation_params.dir).resolve()]
    return {
        "world_size": opt("--world-size"),
        "device": opt("--device"),
        "device_type": opt("--device-type"),
        "dtype": opt("--dtype"),
        "model_path": opt("--model-path"),
        "max_seq_len": opt("--max-seq-len"),
        "mmlu_dir": opt("--mmlu-dir") or shared_dataset_dir(starts, "mmlu"),
        "ceval_dir": opt("--ceval-dir") or shared_dataset_dir(starts, "ceval"),
        "accuracy_model": opt("--accuracy-model"),
        "accuracy_tolerance": opt("--accuracy-tolerance"),
        "accuracy_batch": opt("--accuracy-batch"),
        "accuracy_scoring": opt("--accuracy-scoring"),
        "accuracy_output_dir": opt("--accuracy-output-dir"),
        "perf_output_dir": opt("--perf-output-dir"),
        "perf_baseline": opt("--perf-baseline"),
        "perf_tolerance": opt("--perf-tolerance"),
        "perf_case_pair": opt("--perf-case-pair"),
        "perf_min_len_exp": opt("--perf-min-len-exp"),
        "perf_max_len_exp": opt("--perf-max-len-exp"),
        "perf_batch_size": opt("--perf-batch-size"),
        "perf_mode": opt("--perf-mode"),
        "perf_repeat": opt("--perf-repeat"),
    }


def make_engine_spec(model_path=None, world_size=1, device="auto", dtype="auto", max_seq_len=None):
    """An EngineSpec with the CLI's defaults (embedded model, auto device/dtype), validated."""
    from .runtime import resolve_engine_spec

    return resolve_engine_spec(model_path, world_size, device, dtype, max_seq_len, progress=False)


class EngineFactory:
    """One engine per distinct spec for the whole session."""

    def __init__(self):
        self._engines: dict = {}

    def __call__(self, spec, workers: bool | None = None):
        from .runtime import Engine

        key = (spec, workers)
        engine = self._engines.get(key)
        if engine is None or engine.closed:
            engine = Engine(spec, workers=workers)
            self._engines[key] = engine
        return engine

    def close(self):
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


@pytest.fixture(scope="session")
def engine_factory():
    factory = EngineFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def engine_spec(vicuna_options):
    o = vicuna_options
    return make_engine_spec(o["model_path"], o["world_size"], o["device"], o["dtype"], o["max_seq_len"])


@pytest.fixture(scope="session")
def engine(engine_factory, engine_spec):
    """The engine the command line describes (--model-path, --world-size, ...)."""
    return engine_factory(engine_spec)
