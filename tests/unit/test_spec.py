"""resolve_engine_spec called without a choice takes the settings table's default, as the CLI's flags do.

``--compile`` left out is ``auto`` (the table and the CLI say so), which compiles when the decode steps ahead repay
the compile time (docs/engine.md, ``--compile``).
"""

from __future__ import annotations

import pytest

from vicuna_bench.spec import ModelChoices, resolve_engine_spec

pytestmark = pytest.mark.unit


def test_compile_left_out_is_auto_decided_by_the_work_ahead(tiny_models):
    def spec(decode_steps: int):
        return resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="cpu", dtype="fp32", max_seq_len=64),
                                   progress=False, decode_steps=decode_steps)

    # A million decode steps repay any compile; none repay nothing (with "off" as the default both were off).
    assert (spec(10**6).compile, spec(0).compile) == ("on", "off")
    assert (spec(0).world_size, spec(0).bind_cpu, spec(0).npu_graph) == (1, True, "auto")


# ---------------------------------------------------------------- NPU: --dtype auto and the jit compile mode follow the chip

def checkpoint_of_dtype(source, tmp_path, dtype: str | None):
    """A copy of a tiny checkpoint whose config.json states ``dtype`` (None: states none)."""
    import json
    import shutil

    target = tmp_path / f"ckpt-{dtype}"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if dtype is not None:
        config["torch_dtype"] = dtype
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def npu_host(monkeypatch):
    """A host whose torch_npu 2.6.0 reports 8 NPUs named ``name`` (tests/npu_fake.py)."""
    from tests.npu_fake import install_npu_host

    def host(name: str):
        install_npu_host(monkeypatch, name)

    return host


# (chip, checkpoint dtype) -> what --dtype auto runs, and whether it says it changed the dtype.  d9: the
# checkpoint's fp16/bf16; d3 (310P) runs fp16 only; never fp32 on an NPU (shared/spec/NPU.md, "The chips").
NPU_AUTO_DTYPES = [
    ("Ascend910B3", "float16", "fp16", False),
    ("Ascend910B3", "bfloat16", "bf16", False),
    ("Ascend910B3", "float32", "fp16", True),
    ("Ascend910B3", None, "fp16", False),  # no dtype stated: the accelerators' fp16 (checkpoint.resolve_dtype)
    ("Ascend310P3", "float16", "fp16", False),
    ("Ascend310P3", "bfloat16", "fp16", True),
    ("Ascend310P3", "float32", "fp16", True),
    ("Ascend910_9392", "float32", "fp16", True),  # neither family: still never fp32
]


@pytest.mark.parametrize("chip, stated, runs, said", NPU_AUTO_DTYPES)
def test_npu_dtype_auto_follows_the_chip(tiny_models, tmp_path, npu_host, caplog, chip, stated, runs, said):
    import logging

    npu_host(chip)
    model = checkpoint_of_dtype(tiny_models["gqa"], tmp_path, stated)
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        spec = resolve_engine_spec(ModelChoices(str(model), device="npu", dtype="auto", max_seq_len=64,
                                                compile="off"),
                                   progress=False)
    assert spec.dtype == runs
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--dtype auto")]
    if said:
        family = {"Ascend910B3": "d9 (Atlas 800I A2 (Ascend 910B))", "Ascend310P3": "d3 (Atlas 300I DUO (Ascend 310P))",
                  "Ascend910_9392": "this NPU"}[chip]
        short = {"float32": "fp32", "bfloat16": "bf16"}[stated]
        assert lines == [f"--dtype auto: the checkpoint is {short}; running fp16 on {family}"]
    else:
        assert lines == []


def test_an_explicit_bf16_on_d3_is_still_refused(tiny_models, tmp_path, npu_host):
    from vicuna_bench.errors import UserError

    npu_host("Ascend310P3")
    model = checkpoint_of_dtype(tiny_models["gqa"], tmp_path, "bfloat16")
    with pytest.raises(UserError) as err:
        resolve_engine_spec(ModelChoices(str(model), device="npu", dtype="bf16", max_seq_len=64, compile="off"),
                            progress=False)
    assert str(err.value) == ("--dtype bf16 is not supported on --device-type d3 (Atlas 300I DUO (Ascend 310P) runs "
                              "fp16 only): pass --dtype fp16")


@pytest.mark.parametrize("chip, requested, mode", [
    ("Ascend910B3", "auto", "off"), ("Ascend310P3", "auto", "off"),  # binary kernels on both (devices.py says whose advice)
    ("Ascend910B3", "on", "on"), ("Ascend310P3", "off", "off"),
])
def test_the_npu_jit_compile_mode_is_chosen_per_chip_and_overridable(tiny_models, npu_host, chip, requested, mode):
    npu_host(chip)
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="npu", dtype="fp16", max_seq_len=64,
                                            compile="off", npu_jit_compile=requested),
                               progress=False)
    assert spec.npu_jit_compile == mode


def test_off_npu_there_is_no_jit_compile_mode(tiny_models):
    from vicuna_bench.errors import UserError

    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="cpu", dtype="fp32", max_seq_len=64),
                               progress=False)
    assert spec.npu_jit_compile is None  # the table's default, auto, resolves to nothing off NPU
    with pytest.raises(UserError, match=r"^--npu-jit-compile 'maybe' is not supported \(valid: auto, on, off\)$"):
        resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), device="cpu", dtype="fp32", max_seq_len=64,
                                         npu_jit_compile="maybe"),
                            progress=False)
