"""The tests' engine specs: the settings table's model defaults, the overrides a test names, resolved by the driver.

``spec_for(path, 2, "cpu", "fp32", 64)`` is what ``vicuna-bench run --model-path path --world-size 2 --device
cpu --dtype fp32 --max-seq-len 64`` would open (CPU binding on, ``--compile auto``, chip family auto), through
the one resolver every front end uses (:func:`vicuna_bench.drivers.resolve_spec`).  ``--compile auto`` weighs
the decode steps of the ``jobs`` given: with none it stays off, so a test that needs the eager path whatever
its jobs says ``compile="off"``, and one that needs the compiled path says ``compile="on"``.
"""

from __future__ import annotations

from typing import Any, Sequence

from vicuna_bench import drivers, settings


def model_settings(**overrides: Any) -> dict[str, Any]:
    """The model group's values by dest: the table's defaults, then ``overrides`` (an unknown name is a TypeError)."""
    values = settings.defaults("model")
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise TypeError(f"not model settings: {', '.join(unknown)} (valid: {', '.join(sorted(values))})")
    values.update(overrides)
    return values


def spec_for(model_path=None, world_size: int | None = None, device: str | None = None, dtype: str | None = None,
             max_seq_len: int | None = None, *, jobs: Sequence = (), **overrides: Any):
    """The EngineSpec for the table's defaults plus the given settings (None: the table's), sized for ``jobs``.

    ``max_seq_len`` in tokens (None: ``$MAX_SEQ_LENGTH``, else the table's, capped by the model's context).
    """
    given = dict(model_path=model_path, world_size=world_size, device=device, dtype=dtype, max_seq_len=max_seq_len)
    model = model_settings(**{k: v for k, v in given.items() if v is not None}, **overrides)
    return drivers.resolve_spec(model, jobs, progress=False)
