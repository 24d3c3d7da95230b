"""The engine spec: what to load and where, the same for every rank, resolved and checked before any process starts.

* :class:`EngineSpec`: the resolved choices (device, dtype, world size, compile on/off, binding, ...) and
  :meth:`EngineSpec.validate`, the checks that need no process (the fit check on CPU included);
* :func:`resolve_engine_spec`: a spec from user-level choices (``auto`` device, dtype, chip family and compile
  resolved), its defaults those of the settings table (:mod:`vicuna_bench.settings`);
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
from .config import ModelArgs
from .cpu_isa import CpuDtypeChoice, cpu_auto_dtype
from .errors import UserError
from .generation import GenerationResult
from .npu_graph import GRAPH_MODES
from .sharding import ShardPlan

log = logging.getLogger("vicuna_bench")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What to load and where: the same for every rank."""

    model_path: str
    world_size: int = 1
    device: str = "cpu"  # resolved: cpu | cuda | npu
    dtype: str = "fp32"  # resolved: fp32 | fp16 | bf16
    max_seq_len: int = 2048
    device_type: str | None = None  # NPU chip family (d9 | d3), detected on NPU; None: unknown or not an NPU
    compile: str = "off"  # resolved: on | off (compile the prefill and decode step)
    npu_graph: str = "auto"  # NPU graph mode for compile on: auto | ge | aclgraph (vicuna_bench.npu_graph)
    npu_jit_compile: str | None = None  # NPU operator compile mode, set in each rank: on | off; None off NPU
    bind_cpu: bool = True  # pin each rank's process to CPUs near its device (vicuna_bench.binding)
    device_ids: tuple[int, ...] | None = None  # rank r runs on device device_ids[r]; None: device r
    log_dir: str | None = None  # each rank appends what it runs, and its binding, to <log_dir>/rank<r>.log
    kv_cache_budget_mb: int | None = None  # KV cache sets kept per bucket (model.KVCachePool); None: 2x the largest
    fit_batch: int = 1  # the largest batch a request will carry: the fit check sizes the KV cache by it
    cpu_dtype_auto: CpuDtypeChoice | None = None  # --dtype auto on CPU: why this dtype (ISA, probe); None otherwise

    def device_index(self, local_rank: int) -> int:
        """The device index local rank ``local_rank`` runs on."""
        return local_rank if self.device_ids is None else self.device_ids[local_rank]

    @property
    def chip_family(self) -> str | None:
        """The NPU chip family the run is on (d9 | d3); None off NPU or for a chip of neither family."""
        return self.device_type if self.device == "npu" else None

    def validate(self) -> ModelArgs:
        """Check everything that can be checked before a process starts."""
        if self.device_type is not None and self.device_type not in DEVICE_TYPES:
            raise UserError(f"--device-type {self.device_type!r} is not supported (valid: {', '.join(DEVICE_TYPES)})")
        if self.npu_graph not in GRAPH_MODES:
            raise UserError(f"--npu-graph {self.npu_graph!r} is not supported (valid: {', '.join(GRAPH_MODES)})")
        if self.npu_jit_compile not in (None, "on", "off"):
            raise UserError(f"--npu-jit-compile {self.npu_jit_compile!r}: the engine takes on or off "
                            "(auto is resolved before)")
        if self.world_size < 1:
            raise UserError(f"--world-size {self.world_size} must be >= 1")
        if self.dtype not in checkpoint.DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not supported (valid: {', '.join(checkpoint.DTYPES)})")
        if self.device not in devices.DEVICE_TYPES:
            raise UserError(f"--device {self.device!r} is not supported (valid: {', '.join(devices.DEVICE_TYPES)})")
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
        from .spmd import launched_by_torchrun

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
DEVICE_TYPES = settings.DEVICE_TYPES  # NPU chip families: declared once, in the settings table


_DEFAULT = settings.defaults("model")  # the settings table's model defaults, by parameter name


def resolve_engine_spec(
    model_path: str | os.PathLike | None = _DEFAULT["model_path"],
    world_size: int = _DEFAULT["world_size"],
    device: str = _DEFAULT["device"],
    dtype: str = _DEFAULT["dtype"],
    max_seq_len: int | None = _DEFAULT["max_seq_len"],
    progress: bool = True,
    device_type: str = _DEFAULT["device_type"],
    compile: str = _DEFAULT["compile"],
    decode_steps: int = 0,
    bind_cpu: bool = _DEFAULT["bind_cpu"],
    device_ids: Sequence[int] | None = None,
    log_dir: str | os.PathLike | None = None,
    npu_graph: str = _DEFAULT["npu_graph"],
    npu_jit_compile: str = _DEFAULT["npu_jit_compile"],
) -> EngineSpec:
    """An EngineSpec from user-level choices, validated.

    No ``model_path`` (or ``"embedded"`` where no such directory exists): the
    embedded default model (announced on the log).
    ``device``/``dtype`` may be ``auto``; ``max_seq_len`` None takes the default;
    ``compile`` ``auto`` is decided by the ``decode_steps`` the caller expects to run;
    ``device_type`` ``auto`` is the NPU's detected chip family (an explicit one must match it), read on this
    process's own device (:func:`detecting_device`); ``dtype`` ``auto`` on an NPU follows the chip
    (:func:`vicuna_bench.devices.npu_auto_dtype`); ``npu_jit_compile`` ``auto`` is the chip's mode
    (:data:`vicuna_bench.devices.AUTO_JIT_COMPILE`).
    """
    from .config import resolve_max_seq_len

    # The device first: a cpu/cuda run keeps torch_npu out before transformers (the embedded model) can import it.
    device = devices.resolve_device_type(device)
    if model_path is None or (str(model_path) == EMBEDDED and not Path(EMBEDDED).exists()):
        from .embedded import embedded_model_dir

        model_path = embedded_model_dir(progress=progress)
        log.info("no --model-path: using the embedded default model %s", model_path)
    args = checkpoint.read_model_args(Path(model_path))
    # The chip first: --dtype auto on an NPU depends on it.
    device_type = devices.resolve_chip_family(device, device_type, detecting_device(device_ids))
    requested_dtype = dtype
    if dtype == "auto" and device == "npu":
        dtype = devices.npu_auto_dtype(device_type, checkpoint.dtype_name(checkpoint.resolve_dtype("auto", args, device)))
    else:
        dtype = checkpoint.dtype_name(checkpoint.resolve_dtype(dtype, args, device))
    # Decided once, here: worker ranks read the dtype and the probe's figures from the spec, never probe again.
    cpu_dtype_auto = cpu_auto_dtype() if requested_dtype == "auto" and device == "cpu" else None
    devices.check_dtype_for_chip(device, device_type, dtype, requested_dtype)  # bf16 on d3: before any load
    jit_compile = devices.resolve_jit_compile(device, device_type, npu_jit_compile)
    from .compile import resolve_mode

    compile = resolve_mode(compile, device, decode_steps, npu_graph=npu_graph,
                           chip_family=device_type if device == "npu" else None)
    spec = EngineSpec(str(model_path), world_size, device, dtype, resolve_max_seq_len(max_seq_len, args),
                      device_type=device_type, compile=compile, npu_graph=npu_graph, npu_jit_compile=jit_compile,
                      bind_cpu=bool(bind_cpu),
                      device_ids=None if device_ids is None else tuple(int(d) for d in device_ids),
                      log_dir=None if log_dir is None else str(log_dir), cpu_dtype_auto=cpu_dtype_auto)
    spec.validate()
    return spec


def detecting_device(device_ids: Sequence[int] | None = None) -> int:
    """The device this process reads the NPU's chip on: its own under torchrun (``LOCAL_RANK``), else rank 0's
    (this process is rank 0, or starts the ranks)."""
    from .spmd import launched_by_torchrun

    local = int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0
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

