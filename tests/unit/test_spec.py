"""resolve_engine_spec called without a choice takes the settings table's default, as the CLI's flags do.

Reference: issue 22 (the function said ``compile="off"``, the table and the CLI say ``auto``); ``auto``
compiles when the decode steps ahead repay the compile time (docs/engine.md, ``--compile``).
"""

from __future__ import annotations

import pytest

from vicuna_bench.spec import resolve_engine_spec

pytestmark = pytest.mark.unit


def test_compile_left_out_is_auto_decided_by_the_work_ahead(tiny_models):
    def spec(decode_steps: int):
        return resolve_engine_spec(str(tiny_models["gqa"]), device="cpu", dtype="fp32", max_seq_len=64,
                                   progress=False, decode_steps=decode_steps)

    # A million decode steps repay any compile; none repay nothing (with "off" as the default both were off).
    assert (spec(10**6).compile, spec(0).compile) == ("on", "off")
    assert (spec(0).world_size, spec(0).bind_cpu, spec(0).npu_graph) == (1, True, "auto")
