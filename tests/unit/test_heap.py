"""vicuna_bench.heap: glibc's mmap and trim thresholds set once in a CPU rank, or left with the reason why.

The effect itself (a large buffer reused instead of faulted in again) is measured in a fresh process by
tests/integration/test_heap.py; here the decision, the calls and the record, with mallopt faked.
"""

import logging
import re
from pathlib import Path

import pytest

from vicuna_bench import environment, heap

pytestmark = pytest.mark.unit

MALLOC_H = Path("/usr/include/malloc.h")


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not set its heap yet, no user malloc settings, glibc, and a recording mallopt."""
    monkeypatch.setitem(heap._state, "said", None)
    for name in (*heap.USER_SETTINGS, "GLIBC_TUNABLES", heap.SWITCH):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(heap, "_libc", lambda: "glibc")
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(heap, "_mallopt", mallopt)
    return calls


@pytest.mark.skipif(not MALLOC_H.exists(), reason="no <malloc.h> here to read the parameters from")
def test_parameters_are_glibcs():
    text = MALLOC_H.read_text()
    defined = dict(re.findall(r"#define\s+(M_TRIM_THRESHOLD|M_MMAP_THRESHOLD)\s+(-?\d+)", text))
    assert int(defined["M_TRIM_THRESHOLD"]) == heap.M_TRIM_THRESHOLD
    assert int(defined["M_MMAP_THRESHOLD"]) == heap.M_MMAP_THRESHOLD


def test_thresholds_are_glibcs_dynamic_ceiling():
    # glibc malloc.c: DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long) on 64-bit hosts, and on freeing a
    # mapped block it sets trim_threshold = 2 * mmap_threshold.
    assert heap.MMAP_THRESHOLD == 4 * 1024 * 1024 * 8
    assert heap.TRIM_THRESHOLD == 2 * heap.MMAP_THRESHOLD


def test_sets_both_once_and_logs_one_line(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):
        said = heap.keep_large_buffers()
        again = heap.keep_large_buffers()
    assert fresh == [(-3, 32 << 20), (-1, 64 << 20)]  # mmap threshold, then trim threshold; not repeated
    assert said == again == heap.describe()
    assert "32 MiB" in said and "64 MiB" in said
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("C heap")] == [f"C heap: {said}"]


def test_refused(fresh, monkeypatch):
    monkeypatch.setattr(heap, "_mallopt", lambda param, value: 0)
    assert heap.keep_large_buffers() == "glibc refused mallopt: its defaults"


@pytest.mark.parametrize("name", heap.USER_SETTINGS)
def test_users_own_setting_kept(fresh, monkeypatch, name):
    monkeypatch.setenv(name, "1048576")
    assert heap.keep_large_buffers() == f"left as set by {name}"
    assert fresh == []


def test_glibc_tunables(fresh, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2:glibc.malloc.trim_threshold=100")
    assert heap.keep_large_buffers() == "left as set by GLIBC_TUNABLES (glibc.malloc.*)"
    assert fresh == []


def test_other_tunables_do_not_count(fresh, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")
    assert heap.keep_large_buffers() == heap.SET
    assert len(fresh) == 2


@pytest.mark.parametrize("value", ["0", "off", "false", "no"])
def test_switched_off(fresh, monkeypatch, value):
    monkeypatch.setenv(heap.SWITCH, value)
    assert heap.keep_large_buffers() == "VICUNA_BENCH_HEAP=0: glibc's defaults"
    assert fresh == []


def test_other_c_library(fresh, monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: "")  # musl: platform.libc_ver() names none
    assert heap.keep_large_buffers() == "C library unknown: left as it is"
    assert fresh == []


def test_describe_before_a_rank_set_it(fresh, monkeypatch):
    assert heap.describe() == heap.SET and fresh == []  # says what a CPU rank will do, does nothing
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert heap.describe() == "left as set by MALLOC_TOP_PAD_"


def test_cpu_environment_record_says_it(fresh, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert environment.environment_record("cpu")["c_heap"] == "left as set by MALLOC_MMAP_THRESHOLD_"


def test_a_cpu_rank_sets_it_once_its_weights_are_loaded(fresh, tiny_models, monkeypatch):
    import torch

    from tests.specs import spec_for
    from vicuna_bench import checkpoint
    from vicuna_bench.runtime import build_rank_model
    from vicuna_bench.sharding import TensorParallel

    order = []
    real_load = checkpoint.load_rank_weights
    monkeypatch.setattr(checkpoint, "load_rank_weights", lambda *a, **k: order.append("weights") or real_load(*a, **k))
    monkeypatch.setattr(heap, "keep_large_buffers", lambda: order.append("heap") or heap.SET)
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", 32)
    build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))
    assert order == ["weights", "heap"]
