"""What the hardware suite tests: the run's model settings where given, its own tiny models and choices otherwise.

So ``pytest -m hw --model-path M --world-size 8 --dtype fp16`` (the nightly's
hw stage) tests M at 8 ranks in fp16, and plain ``pytest -m hw`` the tiny
random models at every visible device.  A hw test states its own choices with
``@pytest.mark.hw_matrix(model=[...], dtype=[...], world_size=[...])``
(tests/hw/conftest.py turns them into parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest

from vicuna_bench import settings

RUN_MODEL = "run"  # the hw suite's name (and test id) for the model given with --model-path
# The model group's dest of --device-type (the NPU chip family), looked up by the flag the CLI contract fixes.
CHIP_FAMILY_DEST = next(s.dest for s in settings.group("model") if s.name == "device-type")


@dataclasses.dataclass(frozen=True)
class HwRun:
    """The hw suite's choices: the run's model, world size, dtype, chip family and device where given."""

    model_path: str | None  # --model-path; None: the tests' tiny models
    world_size: int | None  # --world-size when above 1; None: each test's own (every visible device, up to 8)
    dtype: str | None  # --dtype unless auto; None: each test's own dtypes
    chip_family: str  # --device-type: auto (detected on an NPU) | d9 | d3
    device: str | None  # --device when cuda or npu; None: whichever accelerator is there

    def models(self, own: Sequence[str]) -> list[str]:
        """Model names a test runs: the run's model alone (:data:`RUN_MODEL`) when given, else its own."""
        return [RUN_MODEL] if self.model_path else list(own)

    def dtypes(self, own: Sequence[str]) -> list[str]:
        return [self.dtype] if self.dtype else list(own)

    def world_sizes(self, own: Sequence[int]) -> list[int]:
        return [self.world_size] if self.world_size else list(own)

    def model_dir(self, model: str, tiny: Mapping[str, object]) -> str:
        """The directory of a hw test's ``model`` parameter: the run's --model-path, the embedded model (skipped
        where it cannot be had), or the tiny model of that name."""
        if model == RUN_MODEL:
            return str(self.model_path)
        if model == "embedded":
            from vicuna_bench.embedded import embedded_model_dir

            try:
                return str(embedded_model_dir(progress=False))
            except Exception as exc:  # not installed on this machine (a 93 MB wheel), or cannot convert
                pytest.skip(f"embedded model unavailable here: {str(exc).splitlines()[0]}")
        return str(tiny[model])

    def spread(self, visible: int) -> int:
        """Ranks of a test over many devices: the run's world size, else every visible device up to 8."""
        return self.world_size or min(visible, 8)

    def engine_spec(self, model_path, world_size: int, device: str, dtype: str, compile: str = "off",
                    max_seq_len: int = 64):
        """An EngineSpec of this run's chip family (max_seq_len in tokens: the hw tests' prompts are short).

        Eager unless ``compile`` says otherwise: the hw tests compare devices, not compile decisions.
        """
        from tests.specs import spec_for

        return spec_for(model_path, world_size, device, dtype, max_seq_len, compile=compile,
                        **{CHIP_FAMILY_DEST: self.chip_family})

    def choices(self, name: str, own: Sequence):
        """A ``hw_matrix`` argument's values: ``model``, ``dtype`` or ``world_size``."""
        return {"model": self.models, "dtype": self.dtypes, "world_size": self.world_sizes}[name](own)


def hw_run_of(model_options: Mapping[str, object]) -> HwRun:
    """The hw suite's choices from the model group's values by the table's dest."""
    world_size = model_options.get("world_size")
    dtype = model_options.get("dtype")
    device = model_options.get("device")
    return HwRun(
        model_path=model_options.get("model_path") or None,
        world_size=int(world_size) if world_size and int(world_size) > 1 else None,
        dtype=None if dtype in (None, "auto") else str(dtype),
        chip_family=str(model_options.get(CHIP_FAMILY_DEST) or "auto"),
        device=device if device in ("cuda", "npu") else None,
    )
