"""vicuna_bench.heap in fresh processes: the embedded SmolLM2-135M's eager bf16 prefill of 256 tokens, repeated,
faults its buffers in again on every call with glibc's starting thresholds (128 KiB, held), and reuses them once a
CPU rank has set the thresholds (docs/PERFORMANCE.md, eighteenth pass: ~11,000 pages a prefill against ~0-100)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vicuna_bench import heap

pytestmark = pytest.mark.integration

PROBE = """
import json, logging, resource, torch
from vicuna_bench import heap
from vicuna_bench.runtime import Engine
from vicuna_bench.spec import ModelChoices, resolve_engine_spec
torch.set_num_threads(1)
spec = resolve_engine_spec(ModelChoices(None, 1, "cpu", "bf16", 264), progress=False)
spec = type(spec)(**{**spec.__dict__, "compile": "off"})
prompt = [[100 + (37 * i) % 9000 for i in range(256)]]
faults = []
with Engine(spec) as engine:
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        engine.generate(prompt, 1, ignore_eos=True)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"said": heap.status(), "faults": faults[1:]}))
"""


# glibc's starting thresholds (128 KiB each), held there: setting them turns off glibc's dynamic rule, under which
# a process that has freed one large mapped block keeps every smaller one from then on.  A process with the defaults
# serves like this until something frees such a block, and whether anything does before the timed prefills depends
# on the host's paths: on the AMD EPYC Zen 4 host (avx512_bf16, no AMX) the bf16 GEMM probe and the prefill's own
# buffers did, and plain defaults faulted in 72-263 pages over three prefills (the AMX host: 900-15,000 a call).
HELD_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def probe(switch: str | None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*heap.USER_SETTINGS, "GLIBC_TUNABLES", heap.SWITCH)}
    if switch is not None:
        env[heap.SWITCH] = switch
    env.update(extra or {})
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap._libc() != "glibc", reason="glibc's malloc thresholds: this host's C library is not glibc")
def test_a_prefills_buffers_are_reused_not_faulted_in_again():
    default, kept = probe(None, HELD_DEFAULTS), probe(None)
    assert default["said"] == "left as set by MALLOC_MMAP_THRESHOLD_" and kept["said"] == heap.SET
    # The prefill's working set at 256 rows is tens of MB (4 KiB pages); glibc's starting thresholds trim or unmap
    # most of it after each call (measured 900-15,000 a call on the AMX host), ours keep it (0-105).
    assert sum(default["faults"]) > 3000, default
    assert max(kept["faults"]) < 1000 and sum(kept["faults"]) < sum(default["faults"]) / 5, (kept, default)
