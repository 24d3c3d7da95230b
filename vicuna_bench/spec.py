"""The engine spec: what to load and where, the same for every rank, resolved and checked before any process starts.

* :class:`EngineSpec`: the resolved choices (device, dtype, world size, compile on/off, binding, ...) and
  :meth:`EngineSpec.validate`, the checks that need no process (the fit check on CPU included);
* :func:`resolve_engine_spec`: a spec from :class:`ModelChoices`, the user-level choices (``auto`` device, dtype,
  chip family and compile resolved; the dtype once, by :func:`resolve_dtype`), whose defaults are the settings
  table's (:mod:`vicuna_bench.settings`);
* :class:`InferenceEngine`: the interface both launchers offer (:mod:`vicuna_bench.workers`,
  :mod:`vicuna_bench.spmd`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from . import checkpoint, devices, fit, settings
from .binding import binding_num
from .config import ModelArgs, resolve_max_seq_len
from .cpu_isa import CpuDtypeChoice, GemmProbe, cpu_auto_dtype, host_flags, probed_bf16_gemm, warn_if_bf16_slow
from .errors import UserError
from .generation import GenerationResult
from .launch import launched_by_torchrun, local_rank
from .npu_graph import GRAPH_MODES
from .sharding import ShardPlan

log = logging.getLogger("vicuna_bench")


# ---------------------------------------------------------------- --compile auto: decided once, here

COMPILE_MODES = settings.BY_KEY["model.compile"].choices  # declared once, in the settings table

# What compiling costs (s) and what a compiled decode step saves (s a step), per device: `auto` compiles when
# the decode steps ahead repay it (figures: docs/PERFORMANCE.md, "What --compile auto weighs").
_AUTO_COMPILE_S = {"cpu": 70.0, "cuda": 30.0, "npu": 60.0}
_AUTO_SAVING_S = {"cpu": 0.035, "cuda": 0.010, "npu": 0.010}


def check_compile_mode(mode: str, option: str = "--compile") -> str:
    if mode not in COMPILE_MODES:
        raise UserError(f"{option} {mode!r} is not valid (valid: {', '.join(COMPILE_MODES)})")
    return mode


def resolve_compile(mode: str, device: str, decode_steps: int, option: str = "--compile",
                 npu_graph: str = "auto", chip_family: str | None = None) -> str:
    """``on`` or ``off``: ``auto`` compiles when ``decode_steps`` steps repay the compile time (logged).

    On an NPU ``auto`` stays off where the torchair version is unknown or
    lacks the graph mode ``npu_graph`` chooses for ``chip_family``
    (:func:`vicuna_bench.npu_graph.auto_compile_blocker`).
    """
    check_compile_mode(mode, option)
    if mode != "auto":
        return mode
    if device == "npu":
        from .npu_graph import auto_compile_blocker

        blocker = auto_compile_blocker(npu_graph, chip_family)
        if blocker is not None:
            log.info("%s auto: off (%s)", option, blocker)
            return "off"
    saved = decode_steps * _AUTO_SAVING_S.get(device, 0.0)
    cost = _AUTO_COMPILE_S.get(device, float("inf"))
    chosen = "on" if saved > cost else "off"
    log.info(
        "%s auto: %s (%d decode steps ahead would save ~%.0f s against ~%.0f s of compiling on %s)",
        option, chosen, decode_steps, saved, cost, device,
    )
    return chosen



@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What to load and where: the same for every rank."""

    model_path: str
    world_size: int = 1
    device: str = "cpu"  # resolved: cpu | cuda | npu
    dtype: str = "fp32"  # resolved: fp32 | fp16 | bf16
    max_seq_len: int = 2048
    chip_family: str | None = None  # NPU chip family (d9 | d3), detected on NPU; None: unknown or not an NPU
    compile: str = "off"  # resolved: on | off (compile the prefill and decode step)
    npu_graph: str = "auto"  # NPU graph mode for compile on: auto | ge | aclgraph (vicuna_bench.npu_graph)
    npu_jit_compile: str | None = None  # NPU operator compile mode, set in each rank: on | off; None off NPU
    bind_cpu: bool = True  # pin each rank's process to CPUs near its device (vicuna_bench.binding)
    device_ids: tuple[int, ...] | None = None  # rank r runs on device device_ids[r]; None: device r
    log_dir: str | None = None  # each rank appends what it runs, and its binding, to <log_dir>/rank<r>.log
    kv_cache_budget_mb: int | None = None  # KV cache sets kept per bucket (model.KVCachePool); None: 2x the largest
    fit_batch: int = 1  # the largest batch a request will carry: the fit check sizes the KV cache by it
    cpu_dtype_auto: CpuDtypeChoice | None = None  # --dtype auto on CPU: why this dtype (ISA, probe); None otherwise
    # bf16 on a CPU whose flags cannot say whether bf16 GEMMs outrun fp32 (cpu_isa.probed_bf16_gemm): the probe,
    # measured once where the spec was resolved; every rank's bf16 prefill path follows it (never probes again)
    cpu_gemm_probe: GemmProbe | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The run's dtype as torch names it: where the name (``dtype``) turns into a tensor's dtype."""
        return checkpoint.DTYPES[self.dtype]

    def device_index(self, local_rank: int) -> int:
        """The device index local rank ``local_rank`` runs on."""
        return local_rank if self.device_ids is None else self.device_ids[local_rank]

    def validate(self) -> ModelArgs:
        """Check everything that can be checked before a process starts."""
        if self.chip_family is not None and self.chip_family not in settings.CHIP_FAMILY_NAMES:
            raise UserError(f"--device-type {self.chip_family!r} is not supported "
                            f"(valid: {', '.join(settings.CHIP_FAMILY_NAMES)})")
        if self.npu_graph not in GRAPH_MODES:
            raise UserError(f"--npu-graph {self.npu_graph!r} is not supported (valid: {', '.join(GRAPH_MODES)})")
        if self.npu_jit_compile not in (None, "on", "off"):
            raise UserError(f"--npu-jit-compile {self.npu_jit_compile!r}: the engine takes on or off "
                            "(auto is resolved before)")
        if self.world_size < 1:
            raise UserError(f"--world-size {self.world_size} must be >= 1")
        if self.dtype not in checkpoint.DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not supported (valid: {', '.join(checkpoint.DTYPES)})")
        if self.device not in devices.DEVICES:
            raise UserError(f"--device {self.device!r} is not supported (valid: {', '.join(devices.DEVICES)})")
        if self.compile not in ("on", "off"):
            raise UserError(f"--compile {self.compile!r}: the engine takes on or off (auto is resolved before)")
        if self.device_ids is not None and len(self.device_ids) < self.world_size:
            raise UserError(f"device ids {','.join(map(str, self.device_ids))} list {len(self.device_ids)} devices "
                            f"for world size {self.world_size} (valid: at least one device per rank)")
        if self.bind_cpu and self.device != "cpu":
            binding_num(os.environ)  # a malformed CPU_BINDING_NUM is refused before any process starts
        if self.max_seq_len < 2:
            raise UserError(f"--max-seq-len {self.max_seq_len} must be >= 2")
        if self.kv_cache_budget_mb is not None and self.kv_cache_budget_mb < 0:
            raise UserError(f"kv_cache_budget_mb={self.kv_cache_budget_mb} must be >= 0 "
                            "(MiB; 0 keeps only the KV caches in use)")
        if self.fit_batch < 1:
            raise UserError(f"batch {self.fit_batch} must be >= 1")
        if self.device == "cpu" and self.dtype == "fp16" and not cpu_fp16_matmul():
            raise UserError(f"--dtype fp16 on --device cpu: torch {torch.__version__} has no fp16 matrix multiply on "
                            "CPU (valid here: fp32, bf16; newer torch has it)")
        path = Path(self.model_path)
        args = checkpoint.read_model_args(path)
        if checkpoint.is_cut_dir(path):  # first: a cut's own world size is the useful message
            checkpoint.check_cut_dir(path, self.world_size)
        ShardPlan(args, self.world_size, 0)  # raises on a world size the model cannot split over
        if self.max_seq_len > args.context_len and (str(path), self.max_seq_len) not in _WARNED_BEYOND_CONTEXT:
            # The vendor sizes its rope tables to MAX_SEQ_LENGTH and runs: measuring past the trained
            # context is the user's choice.  Said once per process (validate runs again at engine start).
            _WARNED_BEYOND_CONTEXT.add((str(path), self.max_seq_len))
            log.warning(
                "--max-seq-len %d is beyond the model's context of %d tokens (%s: max_position_embeddings=%d, "
                "rope %s x%g): rope tables and KV cache are sized to %d; positions past %d were never trained",
                self.max_seq_len, args.context_len, checkpoint.config_path(path), args.max_position_embeddings,
                args.rope_type, args.rope_factor, self.max_seq_len, args.context_len,
            )
        if self.device == "cpu":  # accelerators: each rank checks its device's free memory before loading
            fit.check_host_fit(args, self.world_size, self.dtype, self.max_seq_len, self.fit_batch,
                               ranks_on_host=self.ranks_on_host(),
                               kv_budget=None if self.kv_cache_budget_mb is None else self.kv_cache_budget_mb << 20)
        return args

    def ranks_on_host(self) -> int:
        """How many of the ranks share this host: torchrun's local world, else all of them (in-process workers)."""
        if launched_by_torchrun():
            return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        return self.world_size


@functools.lru_cache(maxsize=None)
def cpu_fp16_matmul() -> bool:
    """Whether this torch multiplies fp16 matrices on CPU (torch 2.1 does not: 'addmm_impl_cpu_' for 'Half')."""
    try:
        torch.nn.functional.linear(torch.ones(1, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


_WARNED_BEYOND_CONTEXT: set[tuple[str, int]] = set()  # (model path, --max-seq-len) pairs already warned about


EMBEDDED = "embedded"  # --model-path value naming the embedded default model


_DEFAULT = settings.defaults("model")  # the settings table's model defaults, by dest


@dataclasses.dataclass(frozen=True)
class ModelChoices:
    """The model settings as a user gives them (``auto`` allowed), by the settings table's dest; its defaults."""

    model_path: str | os.PathLike | None = _DEFAULT["model_path"]  # None: the embedded default model
    world_size: int = _DEFAULT["world_size"]
    device: str = _DEFAULT["device"]  # cpu | cuda | npu | auto
    dtype: str = _DEFAULT["dtype"]  # fp32 | fp16 | bf16 | auto
    max_seq_len: int | None = _DEFAULT["max_seq_len"]  # tokens; None: $MAX_SEQ_LENGTH, else the table's
    chip_family: str = _DEFAULT["chip_family"]  # d9 | d3 | auto (--device-type)
    compile: str = _DEFAULT["compile"]  # on | off | auto
    bind_cpu: bool = _DEFAULT["bind_cpu"]
    npu_graph: str = _DEFAULT["npu_graph"]
    npu_jit_compile: str = _DEFAULT["npu_jit_compile"]


def resolve_engine_spec(choices: ModelChoices, *, decode_steps: int = 0, device_ids: Sequence[int] | None = None,
                        log_dir: str | os.PathLike | None = None, progress: bool = True) -> EngineSpec:
    """An EngineSpec from user-level ``choices``, validated.

    No ``model_path`` (or ``"embedded"`` where no such directory exists): the
    embedded default model (announced on the log).
    ``device``/``dtype`` may be ``auto`` (:func:`resolve_dtype`); ``compile`` ``auto`` is decided by the
    ``decode_steps`` the caller expects to run; ``chip_family`` ``auto`` is the NPU's detected chip family (an
    explicit one must match it), read on this process's own device (:func:`detecting_device`);
    ``npu_jit_compile`` ``auto`` is the chip's mode (:data:`vicuna_bench.devices.AUTO_JIT_COMPILE`).
    """
    model_path, device = choices.model_path, choices.device
    # The device first: a cpu/cuda run keeps torch_npu out before transformers (the embedded model) can import it.
    device = devices.resolve_device(device)
    if model_path is None or (str(model_path) == EMBEDDED and not Path(EMBEDDED).exists()):
        from .embedded import embedded_model_dir

        model_path = embedded_model_dir(progress=progress)
        log.info("no --model-path: using the embedded default model %s", model_path)
    args = checkpoint.read_model_args(Path(model_path))
    # The chip first: --dtype auto on an NPU depends on it.
    chip_family = devices.resolve_chip_family(device, choices.chip_family, detecting_device(device_ids))
    # Decided once, here: worker ranks read the dtype name and the probe's figures from the spec, never probe again.
    dtype, cpu_dtype_auto = resolve_dtype(choices.dtype, args, device, chip_family)
    devices.check_dtype_for_chip(device, chip_family, dtype, choices.dtype)  # bf16 on d3: before any load
    spec = EngineSpec(
        str(model_path), choices.world_size, device, dtype, resolve_max_seq_len(choices.max_seq_len, args),
        chip_family=chip_family,
        compile=resolve_compile(choices.compile, device, decode_steps, npu_graph=choices.npu_graph,
                             chip_family=chip_family if device == "npu" else None),
        npu_graph=choices.npu_graph,
        npu_jit_compile=devices.resolve_jit_compile(device, chip_family, choices.npu_jit_compile),
        bind_cpu=bool(choices.bind_cpu), device_ids=None if device_ids is None else tuple(int(d) for d in device_ids),
        log_dir=None if log_dir is None else str(log_dir), cpu_dtype_auto=cpu_dtype_auto,
        cpu_gemm_probe=probed_bf16_gemm(host_flags()) if device == "cpu" and dtype == "bf16" else None)
    spec.validate()
    return spec


def resolve_dtype(requested: str, args: ModelArgs, device: str,
                  chip_family: str | None = None) -> tuple[str, CpuDtypeChoice | None]:
    """The dtype name a run uses (fp32 | fp16 | bf16) and, where ``--dtype auto`` chose it on CPU, why.

    ``auto``: on CPU the faster of fp32 and bf16 for this host (:func:`vicuna_bench.cpu_isa.cpu_auto_dtype`), on
    an NPU the checkpoint's dtype where the chip runs it (:func:`vicuna_bench.devices.npu_auto_dtype`), on CUDA the
    checkpoint's dtype.  An explicit bf16 on a CPU where it is the slower dtype warns.
    """
    if requested == "auto":
        if device == "cpu":
            choice = cpu_auto_dtype()
            return choice.dtype, choice
        stored = checkpoint.checkpoint_dtype(args)
        return (devices.npu_auto_dtype(chip_family, stored) if device == "npu" else stored), None
    if requested not in checkpoint.DTYPES:
        raise UserError(f"--dtype {requested!r} is not supported (valid: auto, {', '.join(checkpoint.DTYPES)})")
    if requested == "bf16" and device == "cpu":
        warn_if_bf16_slow()
    return requested, None


def detecting_device(device_ids: Sequence[int] | None = None) -> int:
    """The device this process reads the NPU's chip on: its own under torchrun (``LOCAL_RANK``), else rank 0's
    (this process is rank 0, or starts the ranks)."""
    local = local_rank()
    if device_ids:
        return int(device_ids[local]) if local < len(device_ids) else local
    return local


class InferenceEngine(Protocol):
    """What every engine offers (:class:`vicuna_bench.workers.Engine`, :class:`vicuna_bench.spmd.SpmdEngine`)."""

    spec: EngineSpec
    args: ModelArgs
    rank: int  # this process's rank: 0 except under torchrun
    rank_info: list[dict]  # per rank: weight bytes, decode bytes, device name, ...
    closed: bool

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                 on_tokens: Callable[[list[int]], None] | None = None, **options) -> GenerationResult:
        """Tokens (rank 0's) and timings (ms, maximum over ranks) of one batched generation."""

    def bandwidth(self) -> list[float]:
        """Each rank's memory bandwidth (bytes/s), probed on all ranks at once."""

    def close(self) -> None:
        """Release the ranks."""

