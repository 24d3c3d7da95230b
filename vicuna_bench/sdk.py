"""``vicuna-bench sdk-test``: the vendor's ``run_sdk_test.sh``, driven by its ``sdk_config.ini``.

``sdk-test [WORLD_SIZE=8] [DEVICE_TYPE=d9] [TASK=run]`` reads the INI
(:mod:`vicuna_bench.vendor`), lays its values over the settings table
(:mod:`vicuna_bench.settings`) under the same names the flags fill, and calls
the drivers the dedicated commands call (:mod:`vicuna_bench.drivers`).  So
an INI value and the equivalent flag behave identically, and ``sdk-test``
writes the files ``vicuna-bench perf`` / ``precision`` write with the same
settings; ``precision`` under torchrun works as ``vicuna-bench precision``
does there (every rank asks, rank 0 writes).

Precedence, lowest first (:func:`vicuna_bench.settings.resolve`): the settings
table's defaults, the INI's keys, the environment (``$MAX_SEQ_LENGTH``), the
model flags given on the command line (``--device``, ``--dtype``, ...).
Everything that can be refused is refused in :func:`prepare`, before a file
is written or a rank starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Mapping

from . import settings
from .errors import UserError
from .files import write_atomic
from .vendor import CONFIG_FILE_NAME, SdkConfig, read_sdk_config

log = logging.getLogger("vicuna_bench")

TASKS = ("run", "performance", "precision")
# run_sdk_test.sh's defaults (the vendor guide's prose says 1 and d3: the script wins).
DEFAULT_WORLD_SIZE = 8
DEFAULT_CHIP_FAMILY = "d9"
DEFAULT_TASK = "run"

# The ``run`` task: a few completion-style prompts, sent as text without a chat
# template, greedy, RUN_MAX_NEW_TOKENS tokens each (end of sequence honoured).
SAMPLE_PROMPTS = (
    "Common sense questions and answers\n\nQuestion: What is the capital of France?\nFactual answer:",
    "Hamlet->Shakespeare\nOne Hundred Years of Solitude->",
    "The three primary colours are",
)
RUN_MAX_NEW_TOKENS = 32
RUN_OUTPUTS = "run_outputs.json"  # the run task's answers, in log_dir

# INI section -> settings-table group whose names its keys share.
SECTION_GROUPS = (("model", "model"), ("performance", "perf"), ("precision", "precision"))


@dataclasses.dataclass
class SdkTest:
    """One checked ``sdk-test`` invocation, ready to run: its task's job, checked against the resolved spec."""

    task: str
    config: SdkConfig
    spec: object  # runtime.EngineSpec
    log_dir: Path | None
    job: object  # perf.PerfJob (performance), precision.PrecisionJob (precision), jobs.GenerateJob (run)


def layered_values(config: SdkConfig, group: str, flags: Mapping[str, object] | None = None,
                   task: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, object]:
    """A settings group's values: table defaults < the INI's keys of the same name < the environment < ``flags``.

    ``task``: the task whose model settings apply (``precision`` takes ``[precision]``'s model_path / device).
    """
    offered = settings.select((group,))
    ini = config.setting_values(group, task)  # the vendor's keys onto the table (vendor.SETTING_OF)
    return settings.resolve(offered, ini, settings.from_environment(offered, env), dict(flags or {}))


def _device_ids(config: SdkConfig, world_size: int, task: str) -> tuple[int, ...] | None:
    """``device_ids`` when the file sets it for ``task`` (at least one per rank); None: devices 0..N-1."""
    model = config.model_for(task)
    if "device_ids" not in model.explicit:
        if world_size > 1:
            log.info("%s: [model] device_ids not set: rank r runs on device r", config.path)
        return None
    ids = model.device_ids
    if len(ids) < world_size:
        raise UserError(
            f"{config.path}: {config.model_key_source(task, 'device_ids')} device_ids={','.join(map(str, ids))!r} "
            f"lists {len(ids)} device(s) for "
            f"WORLD_SIZE {world_size} (valid: at least {world_size} comma-separated device ids)"
        )
    return ids[:world_size]


def _log_dir(config: SdkConfig) -> Path | None:
    if config.model.log_dir is None:
        return None
    path = Path(config.model.log_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{config.path}: [model] log_dir={config.model.log_dir!r} is not a directory")
    return path


def prepare(
    world_size: int = DEFAULT_WORLD_SIZE,
    chip_family: str = DEFAULT_CHIP_FAMILY,
    task: str = DEFAULT_TASK,
    config_path: str | os.PathLike = CONFIG_FILE_NAME,
    *,
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    progress: bool = True,
) -> SdkTest:
    """Read the INI, check every setting and build the run: nothing is written, no rank starts.

    ``flags``: model settings given on the command line, by dest (they win
    over the INI); ``env`` (default ``os.environ``) supplies ``TIMEIT`` and,
    under torchrun, ``WORLD_SIZE`` / ``RANK``.
    """
    from . import drivers
    from .launch import is_writer, launched_by_torchrun

    env = os.environ if env is None else env
    if task not in TASKS:
        raise UserError(f"TASK {task!r} is not supported (valid: {', '.join(TASKS)})")
    if world_size < 1:
        raise UserError(f"WORLD_SIZE {world_size} must be >= 1")
    config = read_sdk_config(config_path, env=env)
    if launched_by_torchrun() and int(env.get("WORLD_SIZE", "1")) != world_size:
        raise UserError(f"WORLD_SIZE {world_size} disagrees with torchrun's WORLD_SIZE={env.get('WORLD_SIZE')}")
    if task == "precision":
        for line in config.model_conflicts():
            log.warning("%s", line)
    device_ids = _device_ids(config, world_size, task)
    log_dir = _log_dir(config)
    model = layered_values(config, "model", flags, task, env)
    model.update(world_size=world_size, chip_family=chip_family)
    job = _task_job(task, config, env, progress and is_writer(env))
    spec = drivers.resolve_spec(model, [job], device_ids=device_ids, log_dir=log_dir, progress=progress)
    if config.model.parallel_backend and "parallel_backend" in config.model.explicit:
        from .devices import BACKENDS

        chosen = BACKENDS[spec.device]
        if world_size > 1 and chosen != config.model.parallel_backend:
            log.info("%s: [model] parallel_backend=%s: the backend follows the device (%s: %s)",
                     config.path, config.model.parallel_backend, spec.device, chosen)
    job.check(spec)  # run_jobs checks again: a no-op for the same spec
    return SdkTest(task, config, spec, log_dir, job)


def _task_job(task: str, config: SdkConfig, env: Mapping[str, str], progress: bool):
    """The job of ``task``, its settings from the INI (its data read and checked for ``precision``)."""
    if task == "performance":
        from .perf import PerfJob

        return PerfJob.from_values(layered_values(config, "perf", env=env), Path("."), progress=progress)
    if task == "precision":
        from .precision import PrecisionConfig, PrecisionJob
        from .precision.data import resolve_mode

        section = config.precision
        if section.work_dir is None:
            raise UserError(f"{config.path}: [precision] work_dir is not set (valid: a directory holding data/dev "
                            "and data/val)")
        # No mode in the file (the guide's C-Eval steps set only work_dir): the data says which it is.
        source = f"{config.path}: [precision] mode"
        mode = resolve_mode(section.mode, section.work_dir, source)
        cfg = PrecisionConfig.from_values(layered_values(config, "precision", env=env), mode=mode,
                                          work_dir=section.work_dir, progress=progress)
        return PrecisionJob(cfg, source)  # bad data is reported before the model is touched
    from .jobs import GenerateJob

    return GenerateJob(SAMPLE_PROMPTS, (), RUN_MAX_NEW_TOKENS, chat=False, tokenizer_required=True)


def run(test: SdkTest) -> dict[str, Path]:
    """Run a prepared ``sdk-test``; returns the files written by name (rank 0's; empty on other ranks)."""
    from . import drivers
    from .launch import is_writer

    if test.log_dir is not None:
        test.log_dir.mkdir(parents=True, exist_ok=True)
    spec = test.spec
    log.info("sdk-test %s: %s, world size %d on %s (%s), dtype %s, device type %s", test.task, test.config.path,
             spec.world_size, spec.device, "device ids " + ",".join(map(str, spec.device_ids))
             if spec.device_ids else "devices 0..N-1", spec.dtype, spec.chip_family)
    (result,) = drivers.run_jobs(spec, [test.job])
    if not is_writer():
        return {}
    if test.task == "precision":
        return result.files
    if test.task == "performance":
        from . import perf

        log.info("perf results:\n%s", perf.summary_table(result))
        test.job.gate()
        return dict(result.paths)
    return _write_run_outputs(test, result)


def _write_run_outputs(test: SdkTest, result) -> dict[str, Path]:
    """Print the ``run`` task's answers; write them to ``log_dir``/run_outputs.json when it is set."""
    spec = test.spec
    outputs = []
    for text, prompt, ids, answer in zip(SAMPLE_PROMPTS, result.prompts, result.output_ids, result.texts):
        outputs.append({"prompt": text, "prompt_ids": prompt, "output_ids": ids, "text": answer})
        print(f"--- {text!r}\n{answer}", flush=True)
    log.info("first token %.1f ms, next token %.1f ms", result.first_token_ms, result.next_token_ms)
    if test.log_dir is None:
        return {}
    doc = {
        "outputs": outputs, "first_token_ms": round(result.first_token_ms, 3),
        "next_token_ms": round(result.next_token_ms, 3), "world_size": spec.world_size, "device": spec.device,
        "device_ids": list(spec.device_ids) if spec.device_ids else None, "dtype": spec.dtype,
        "model": spec.model_path, "cpu_binding": [i.get("cpu_binding") for i in result.rank_info],
        "environment": result.rank_info[0].get("environment") if result.rank_info else None,
    }
    path = test.log_dir / RUN_OUTPUTS
    write_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return {"run_outputs": path}
