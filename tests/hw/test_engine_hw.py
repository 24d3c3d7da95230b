"""On an NPU or GPU: world sizes agree, compiled equals eager, perf writes its files, ranks bind to the device's node.

Skipped with the reason where no NPU or CUDA device is visible.  The models,
dtypes and world sizes are the run's where given (``--model-path``,
``--dtype``, ``--world-size``: tests/hw/conftest.py), else the tiny ones below.  The
expected values come from the engine at world size 1 eager (itself checked
against transformers by the unit suite), from the CPU fp32 run, from the
reference CSV header in the spec and from the device's own sysfs entries.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vicuna_bench import binding
from tests.hw.conftest import device_count, skip_unless_chip_runs

pytestmark = pytest.mark.hw

# Per-dtype tolerance on the last-position logits, relative to the logit scale (the max |logit|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 7, 31], [8, 9, 10]]
STEPS = 32


def _scale(logits: torch.Tensor) -> float:
    return float(logits.abs().max())


def _generate(engine, n=STEPS):
    return engine.generate(PROMPTS, n, ignore_eos=True, return_logits=True)


def assert_greedy_agree(ref, other, dtype: str) -> None:
    """Identical greedy tokens, and each step's logits within the dtype's tolerance of the logit scale.

    A half-precision sum in another order may flip a near tie, after which
    the two texts are unrelated: as vLLM's ``check_logprobs_close`` does, a
    row may part only where ``ref``'s top two logits are within twice the
    tolerance, and is compared up to there.
    """
    tol = TOLERANCE[dtype]
    for row, (a_ids, b_ids, a, b) in enumerate(zip(ref.output_ids, other.output_ids, ref.logits, other.logits)):
        scale = _scale(a)
        parted = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), len(a_ids))
        upto = min(parted + 1, len(a_ids))
        assert (a[:upto] - b[:upto]).abs().max().item() <= tol * scale, f"row {row}: logits apart before step {upto}"
        if parted < len(a_ids):
            top2 = a[parted].topk(2).values
            margin = float(top2[0] - top2[1])
            assert margin <= 2 * tol * scale, (
                f"row {row} parted at step {parted} where the reference's top-two margin {margin:.4g} is no near tie "
                f"(scale {scale:.3g}, tolerance {tol})")


def _ranks_or_skip(kind: str, ranks: int) -> int:
    if device_count(kind) < ranks:
        pytest.skip(f"needs {ranks} {kind} devices, {device_count(kind)} visible")
    return ranks


@pytest.mark.hw_matrix(model=["vicuna", "gqa", "embedded"], dtype=["fp16", "bf16"])
def test_all_devices_match_one_device(device, chip_family, model_path, dtype, hw_run, engine_factory):
    """World size 1 against every visible device (up to 8, as many as the model splits over; the run's world size
    when given): identical greedy tokens over 32 steps."""
    skip_unless_chip_runs(device, chip_family, dtype)
    n = _ranks_or_skip(device, hw_run.spread(device_count(device)))
    if not hw_run.world_size:  # the embedded model's 9 heads split 1 or 3 ways, not over 2 or 8 devices
        from vicuna_bench.checkpoint import read_model_args
        from vicuna_bench.sharding import valid_world_sizes

        n = max(valid_world_sizes(read_model_args(Path(model_path)), limit=n))
    if n < 2:
        pytest.skip(f"one {device} device visible: nothing to shard over")
    one = _generate(engine_factory(hw_run.engine_spec(model_path, 1, device, dtype)))
    many = _generate(engine_factory(hw_run.engine_spec(model_path, n, device, dtype)))
    assert_greedy_agree(one, many, dtype)


@pytest.mark.hw_matrix(model=["vicuna", "embedded"], dtype=["fp32", "fp16", "bf16"])
def test_device_first_logits_track_cpu_fp32(device, chip_family, model_path, dtype, hw_run, engine_factory):
    """The device at the run's world size (1 unless given) against world size 1 on the CPU in fp32."""
    skip_unless_chip_runs(device, chip_family, dtype)
    n = _ranks_or_skip(device, hw_run.world_size or 1)
    ref = engine_factory(hw_run.engine_spec(model_path, 1, "cpu", "fp32")).generate(PROMPTS, 1, return_logits=True)
    dev = engine_factory(hw_run.engine_spec(model_path, n, device, dtype)).generate(PROMPTS, 1,
                                                                                        return_logits=True)
    for a, b in zip(ref.logits, dev.logits):
        assert (a[0] - b[0]).abs().max().item() <= max(TOLERANCE[dtype], 1e-3) * _scale(a[0])


@pytest.mark.hw_matrix(model=["vicuna", "gqa", "embedded"], dtype=["fp32", "fp16"])
def test_compiled_decode_matches_eager(device, chip_family, model_path, dtype, hw_run, engine_factory):
    """--compile on (CUDA graphs / torchair) gives eager's greedy tokens and logits, at the run's world size."""
    skip_unless_chip_runs(device, chip_family, dtype)
    n = _ranks_or_skip(device, hw_run.world_size or 1)
    eager = _generate(engine_factory(hw_run.engine_spec(model_path, n, device, dtype, compile="off")))
    graphed = _generate(engine_factory(hw_run.engine_spec(model_path, n, device, dtype, compile="on")))
    assert_greedy_agree(eager, graphed, dtype)


def test_perf_smoke_writes_the_reference_csv(device, hw_run, tiny_models, tmp_path):
    out = tmp_path / "perf"
    ranks = _ranks_or_skip(device, hw_run.world_size or 1)
    model = hw_run.model_path or str(tiny_models["vicuna"])
    cmd = [sys.executable, "-m", "vicuna_bench", "perf", "--model-path", model, "--world-size", str(ranks),
           "--device", device, "--device-type", hw_run.chip_family, "--dtype", hw_run.dtype or "fp16",
           "--case-pair", "[[16,8],[32,4]]", "--repeat", "2", "--model-name", "hw", "--output-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [ref] = list(out.glob("performance_test_hw_*_bs1.csv"))
    with ref.open(newline="") as f:
        rows = list(csv.reader(f))
    # The reference header (shared/spec/REFERENCE.md), then one row per case in order.
    assert ",".join(rows[0]) == ("batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),"
                                 "forward_first_token_time(ms),forward_next_token_time(ms),pre_next_token_time(ms),"
                                 "post_next_token_time_post(ms)")
    assert [r[:3] for r in rows[1:]] == [["1", "16", "8"], ["1", "32", "4"]]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows[1:])
    [ext] = list(out.glob("*_extended.csv"))
    with ext.open(newline="") as f:
        ext_rows = list(csv.DictReader(f))
    assert len(ext_rows) == 2 and {r["device"] for r in ext_rows} == {device}


def _bus_of(kind: str, index: int) -> str:
    if kind == "cuda":
        return binding.cuda_pci_bus(index)
    bus = binding.parse_npu_pcie_bus(binding.run_tool(["npu-smi", "info", "-t", "board", "-i", str(index)]))
    if bus is None:
        pytest.skip(f"npu-smi names no PCIe bus for NPU {index}")
    return bus


def test_each_rank_binds_within_its_devices_numa_node(device, hw_run):
    """The planned CPUs of rank r are CPUs of device r's NUMA node (sysfs), and the process may use them."""
    n = _ranks_or_skip(device, hw_run.spread(device_count(device)))
    allowed = set(os.sched_getaffinity(0))
    checked = 0
    for rank in range(n):
        bus = _bus_of(device, rank).lower()
        node_file = Path("/sys/bus/pci/devices") / bus / "numa_node"
        if not node_file.is_file() or int(node_file.read_text()) < 0:
            continue  # a VM or a one-node host hides the node: the plan falls back (its own unit test)
        local = set(binding.parse_cpu_list((node_file.parent / "local_cpulist").read_text()))
        plan = binding.plan_binding(device, rank, n)
        assert plan.cpus is not None, f"rank {rank} was left unbound: {plan.describe()}"
        assert set(plan.cpus) <= local & allowed, plan.describe()
        checked += 1
    if not checked:
        pytest.skip(f"no {device} device reports a NUMA node in sysfs (numa_node is -1 or absent)")
