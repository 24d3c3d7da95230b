"""Which NPU each process brings its runtime up on: every torchrun rank on its own device, a launcher on rank 0's
(torch_npu 2.1.x) or on none (2.5.1 on), never NPU 0 for everyone.

``tests/npu_fake.py`` reproduces torch_npu's wheels: on 2.1.0.post10 ``get_device_name`` initialises the runtime on
the current device (0 before ``set_device``); from 2.5.1 it needs no runtime.  Each rank is one fresh fake (one
process); torchrun's environment says which rank it is.
"""

from __future__ import annotations

import pytest
import torch

from tests.npu_fake import FakeNpu, install_npu_host, accept_npu_devices
from vicuna_bench import rank_setup
from vicuna_bench.spec import ModelChoices, resolve_engine_spec

pytestmark = pytest.mark.unit

TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def npu_process(monkeypatch, release: str, name: str = "Ascend910B3") -> FakeNpu:
    """A fresh process's torch.npu from torch_npu ``release`` (installed, importable, 8 NPUs of ``name``)."""
    return install_npu_host(monkeypatch, name, release)


@pytest.fixture
def rank_env(monkeypatch):
    """Set torchrun's environment for one rank of 8 (None: not under torchrun)."""
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)

    def as_rank(rank: int | None):
        if rank is None:
            for key in TORCHRUN_ENV:
                monkeypatch.delenv(key, raising=False)
            return
        for key, value in (("TORCHELASTIC_RUN_ID", "job"), ("RANK", rank), ("LOCAL_RANK", rank),
                           ("WORLD_SIZE", 8), ("LOCAL_WORLD_SIZE", 8)):
            monkeypatch.setenv(key, str(value))

    return as_rank


@pytest.fixture
def no_collectives(monkeypatch):
    """init_process_group without a real group: torch.distributed's joining and the warm-up are not under test."""
    import torch.distributed as dist

    accept_npu_devices(monkeypatch, torch)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: int(__import__("os").environ.get("RANK", "0")))
    monkeypatch.setattr(rank_setup, "warm_collectives", lambda tp, device: 0.0)


def test_the_fake_is_torch_npu_2_1s_get_device_name():
    # The defect being fixed, as the 2.1.0.post10 wheel has it: a name read before set_device brings NPU 0 up.
    old, new = FakeNpu("2.1.0.post10"), FakeNpu("2.6.0")
    old.get_device_name(3)
    new.get_device_name(3)
    assert (old.contexts, new.contexts) == ([0], [])


@pytest.mark.parametrize("release", ["2.1.0.post10", "2.6.0"])
def test_eight_torchrun_ranks_each_bring_up_only_their_own_npu(monkeypatch, tiny_models, rank_env, no_collectives,
                                                               release):
    contexts = {}
    for rank in range(8):
        with monkeypatch.context() as process:
            npu = npu_process(process, release)
            rank_env(rank)
            spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), 8, "npu", "auto", 64, compile="off"),
                                       progress=False)
            assert spec.chip_family == "d9"
            rank_setup.init_process_group(spec, rank, rank, None, timeout_s=60)
            contexts[rank] = npu.contexts
            assert npu.compile_mode_calls == [False]  # jit_compile=False, set after set_device
    assert contexts == {rank: [rank] for rank in range(8)}


def test_a_torchrun_rank_reads_its_own_device_of_a_device_id_list(monkeypatch, tiny_models, rank_env):
    npu = npu_process(monkeypatch, "2.1.0.post10")
    rank_env(2)
    resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), 8, "npu", "auto", 64, compile="off"),
                        progress=False, device_ids=[7, 6, 5, 4, 3, 2, 1, 0])
    assert npu.contexts == [5]  # rank 2 runs on device_ids[2]


@pytest.mark.parametrize("release, launcher_contexts", [("2.1.0.post10", [4]), ("2.6.0", [])])
def test_a_launcher_brings_up_at_most_rank_0s_device(monkeypatch, tiny_models, rank_env, release, launcher_contexts):
    """The in-process engine's parent resolves the spec for ranks on NPUs 4 and 5: never NPU 0."""
    npu = npu_process(monkeypatch, release)
    rank_env(None)
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), 2, "npu", "auto", 64, compile="off"),
                               progress=False, device_ids=[4, 5])
    assert (spec.chip_family, npu.contexts) == ("d9", launcher_contexts)


def test_a_rank_on_another_chip_than_the_spec_is_stopped(monkeypatch, tiny_models, rank_env, no_collectives):
    from vicuna_bench.errors import UserError

    npu_process(monkeypatch, "2.6.0", name="Ascend910B3")
    rank_env(None)
    spec = resolve_engine_spec(ModelChoices(str(tiny_models["gqa"]), 2, "npu", "fp16", 64, compile="off"),
                               progress=False)
    npu_process(monkeypatch, "2.6.0", name="Ascend310P3")  # rank 1's process sees a 310P
    with pytest.raises(UserError, match=r"^--device-type d9 contradicts NPU 1: Ascend310P3 is d3 "):
        rank_setup.init_process_group(spec, 1, 1, None, timeout_s=60)
