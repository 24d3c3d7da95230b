"""What the oldest supported stack (torch 2.1) lacks is refused in one line, not met with a worker's traceback."""

from __future__ import annotations

import pytest

from vicuna_bench import spec
from vicuna_bench.errors import UserError
from tests.specs import spec_for

pytestmark = pytest.mark.unit


def test_fp16_on_cpu_is_refused_where_torch_cannot_multiply_it(tiny_models, monkeypatch):
    monkeypatch.setattr(spec, "cpu_fp16_matmul", lambda: False)  # torch 2.1: "addmm_impl_cpu_" for 'Half'
    with pytest.raises(UserError) as err:
        spec_for(tiny_models["gqa"], 1, "cpu", "fp16", 64)
    assert "--dtype fp16 on --device cpu" in str(err.value) and "valid here: fp32, bf16" in str(err.value)
    assert spec_for(tiny_models["gqa"], 1, "cpu", "bf16", 64).dtype == "bf16"
    monkeypatch.setattr(spec, "cpu_fp16_matmul", lambda: True)
    assert spec_for(tiny_models["gqa"], 1, "cpu", "fp16", 64).dtype == "fp16"
