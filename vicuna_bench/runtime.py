"""Processes: loading one rank's model, and the two ways to run N ranks.

* SPMD under ``torchrun`` (``torchrun --nproc-per-node N -m vicuna_bench
  ...``): every process runs the CLI; :func:`init_from_env` joins the group
  torchrun describes in the environment.
* In-process: :class:`Engine` spawns its own N worker processes, each loads
  its share once, and then serves many requests sent over pipes.  A worker
  that dies makes the next (or current) call raise :class:`EngineError`
  within seconds; closing the engine ends every worker.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from . import checkpoint, devices, fit
from .binding import CpuBinding, bind_rank, binding_num, format_cpu_list, unbound
from .config import ModelArgs
from .errors import EngineError, UserError, VicunaBenchError
from .generation import EAGER, GenerationResult, PrefixKV, SamplingConfig, generate, validate_prompts
from .npu_graph import GRAPH_MODES
from .model import Transformer, decode_read_bytes, weight_bytes
from .sharding import ShardPlan, TensorParallel

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
    bind_cpu: bool = True  # pin each rank's process to CPUs near its device (vicuna_bench.binding)
    device_ids: tuple[int, ...] | None = None  # rank r runs on device device_ids[r]; None: device r
    log_dir: str | None = None  # each rank appends what it runs, and its binding, to <log_dir>/rank<r>.log
    kv_cache_budget_mb: int | None = None  # KV cache sets kept per bucket (model.KVCachePool); None: 2x the largest
    fit_batch: int = 1  # the largest batch a request will carry: the fit check sizes the KV cache by it

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
                               ranks_on_host=self.ranks_on_host())
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
DEVICE_TYPES = ("d9", "d3")  # NPU chip families


def resolve_engine_spec(
    model_path: str | os.PathLike | None = None,
    world_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    max_seq_len: int | None = None,
    progress: bool = True,
    device_type: str = "auto",
    compile: str = "off",
    decode_steps: int = 0,
    bind_cpu: bool = True,
    device_ids: Sequence[int] | None = None,
    log_dir: str | os.PathLike | None = None,
    npu_graph: str = "auto",
) -> EngineSpec:
    """An EngineSpec from user-level choices, validated.

    No ``model_path`` (or ``"embedded"`` where no such directory exists): the
    embedded default model (announced on the log).
    ``device``/``dtype`` may be ``auto``; ``max_seq_len`` None takes the default;
    ``compile`` ``auto`` is decided by the ``decode_steps`` the caller expects to run;
    ``device_type`` ``auto`` is the NPU's detected chip family (an explicit one must match it).
    """
    from .config import resolve_max_seq_len

    if model_path is None or (str(model_path) == EMBEDDED and not Path(EMBEDDED).exists()):
        from .embedded import embedded_model_dir

        model_path = embedded_model_dir(progress=progress)
        log.info("no --model-path: using the embedded default model %s", model_path)
    args = checkpoint.read_model_args(Path(model_path))
    device = devices.resolve_device_type(device)
    requested_dtype = dtype
    dtype = checkpoint.dtype_name(checkpoint.resolve_dtype(dtype, args, device))
    device_type = devices.resolve_chip_family(device, device_type, int(device_ids[0]) if device_ids else 0)
    devices.check_dtype_for_chip(device, device_type, dtype, requested_dtype)  # bf16 on d3: before any load
    from .compile import resolve_mode

    compile = resolve_mode(compile, device, decode_steps, npu_graph=npu_graph,
                           chip_family=device_type if device == "npu" else None)
    spec = EngineSpec(str(model_path), world_size, device, dtype, resolve_max_seq_len(max_seq_len, args),
                      device_type=device_type, compile=compile, npu_graph=npu_graph, bind_cpu=bool(bind_cpu),
                      device_ids=None if device_ids is None else tuple(int(d) for d in device_ids),
                      log_dir=None if log_dir is None else str(log_dir))
    spec.validate()
    return spec


def build_rank_model(spec: EngineSpec, rank: int, tp: TensorParallel, device: torch.device,
                     fuse: bool = True) -> Transformer:
    """Load rank ``rank``'s share of the model onto ``device`` (``fuse``: fused qkv and gate/up projections)."""
    return load_rank_model(spec, rank, tp, device, fuse)[0]


def load_rank_model(spec: EngineSpec, rank: int, tp: TensorParallel, device: torch.device,
                    fuse: bool = True) -> tuple[Transformer, checkpoint.LoadStats]:
    """Rank ``rank``'s model on ``device`` and what loading it read.

    The model is laid out on meta (fused where ``fuse``), its parameters are
    allocated once in the run's dtype on ``device``, and each checkpoint
    tensor is written straight into its place: the rank needs its share of
    memory and no second copy, on the host or the device.
    """
    path = Path(spec.model_path)
    args = checkpoint.read_model_args(path)
    plan = ShardPlan(args, spec.world_size, rank)
    dtype = checkpoint.DTYPES[spec.dtype]
    if device.type in ("cuda", "npu"):  # before anything is allocated on it
        count = (torch.cuda if device.type == "cuda" else getattr(torch, "npu")).device_count()
        fit.check_device_fit(args, spec.world_size, spec.dtype, spec.max_seq_len, spec.fit_batch, device, count)
    with torch.device("meta"):
        model = Transformer(args, plan, tp, spec.max_seq_len)
    model.tie_weights()
    model.allocate_parameters(device, dtype)
    # One bar, from rank 0, and only for checkpoints big enough to wait for.
    big = sum(p.numel() for p in model.parameters()) * spec.world_size > 1_000_000_000
    stats = checkpoint.load_rank_weights(path, plan, model.checkpoint_targets(), progress=rank == 0 and big)
    return finish_rank_model(model, device, fuse), stats


def finish_rank_model(model: Transformer, device: torch.device, fuse: bool = True) -> Transformer:
    """What a rank model needs once its weights are real: tied head, fused projections (``fuse``; done already
    where it was loaded fused), rope tables rebuilt off meta, on ``device``, in eval mode."""
    model.tie_weights()
    model.rotary = type(model.rotary)(model.args, model.max_seq_len)
    return model.to(device).eval()


ModelHook = Callable[[Transformer], Transformer]


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One batched generation, the same on every rank (a misspelt option is a TypeError, not ignored)."""

    prompts: list[list[int]]
    max_new_tokens: int = 32
    ignore_eos: bool = False
    sampling: SamplingConfig = SamplingConfig()
    return_logits: bool = False
    eos_ids: tuple[int, ...] | None = None  # None: the model's
    stream: bool = False  # rank 0 sends each step's tokens back
    prefix_len: int = 0  # every prompt starts with the same this many tokens: prefill them once (kept per rank)
    logit_ids: tuple[int, ...] | None = None  # return_logits: only these vocabulary columns cross back

    @classmethod
    def make(cls, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, **options) -> "GenerationRequest":
        """Normalised types (ints, lists, a SamplingConfig) from a caller's values."""
        eos = options.pop("eos_ids", None)
        sampling = options.pop("sampling", None) or SamplingConfig()
        logit_ids = options.pop("logit_ids", None)
        return cls([list(map(int, p)) for p in prompts], int(max_new_tokens), sampling=sampling,
                   eos_ids=None if eos is None else tuple(int(e) for e in eos),
                   logit_ids=None if logit_ids is None else tuple(int(i) for i in logit_ids), **options)


class InferenceEngine(Protocol):
    """What every engine offers (:class:`Engine` in-process workers, :class:`SpmdEngine` under torchrun)."""

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


def merge_rank_results(results: Sequence[GenerationResult], tokens_from: int = 0) -> GenerationResult:
    """One result from every rank's: rank ``tokens_from``'s tokens and logits, each timing the maximum over
    ranks (ms), peak memory per rank in rank order (bytes)."""
    head = results[tokens_from]
    return GenerationResult(
        output_ids=head.output_ids,
        first_token_ms=max(r.first_token_ms for r in results),
        step_ms=[max(vals) for vals in zip(*(r.step_ms for r in results))],
        logits=head.logits,
        total_ms=max(r.total_ms for r in results),
        peak_memory_bytes=[p for r in results for p in r.peak_memory_bytes],
        compile_ms=max(r.compile_ms for r in results),
    )


class RankRunner:
    """One rank: its model and the requests it serves (the same on every rank).

    ``model_hook`` (optional, picklable: a module-level function) receives the
    loaded model and returns the one to run, e.g. an instrumented wrapper.
    """

    def __init__(self, spec: EngineSpec, rank: int, local_rank: int, tp: TensorParallel,
                 model_hook: ModelHook | None = None, binding: CpuBinding | None = None):
        self.spec = spec
        self.rank = rank
        self.device = devices.device_for_rank(spec.device, spec.device_index(local_rank))
        self.binding = binding or unbound(local_rank, _device_label(spec, local_rank), "not bound by its caller")
        self.environment = devices.environment_record(spec.device, spec.device_index(local_rank))
        rank_log = RankLog(spec, rank)
        rank_log.write(
            f"start: model={spec.model_path} world_size={spec.world_size} device={self.device} "
            f"({self.environment['device_name']}) dtype={spec.dtype} compile={spec.compile} "
            f"max_seq_len={spec.max_seq_len} threads={torch.get_num_threads()} pid={os.getpid()}"
        )
        rank_log.write(f"cpu binding: {self.binding.describe()}")
        rank_log.write(f"environment: {json.dumps(self.environment, sort_keys=True)}")
        accelerator = self.device.type in ("cuda", "npu")
        if accelerator:
            devices.reset_peak_memory(self.device)
        started = time.perf_counter()
        with fit.LoadPeak() as peak:
            self.model, stats = load_rank_model(spec, rank, tp, self.device)
            if accelerator:
                devices.synchronize(self.device)
        if spec.kv_cache_budget_mb is not None:
            self.model.kv_pool.budget_bytes = spec.kv_cache_budget_mb << 20
        self.load_s = time.perf_counter() - started
        self.load_bytes_read = stats.bytes_read
        self.load_peak_host_bytes = peak.peak_growth
        self.load_peak_device_bytes = devices.peak_memory_bytes(self.device) if accelerator else None
        rank_log.write(
            f"loaded rank {rank}'s share in {self.load_s:.2f} s: {weight_bytes(self.model) / 2**20:.1f} MiB of weights, "
            f"{stats.bytes_read / 2**20:.1f} MiB read ({stats.bytes_read / 1e9 / max(self.load_s, 1e-9):.2f} GB/s), "
            f"peak host memory growth {peak.peak_growth / 2**20:.1f} MiB"
            + (f", peak device memory {self.load_peak_device_bytes / 2**20:.1f} MiB" if accelerator else "")
        )
        if model_hook is not None:
            self.model = model_hook(self.model)
        self.args = self.model.args
        self.steps = EAGER
        self._prefix: PrefixKV | None = None
        if spec.compile == "on":
            from .compile import compiled_steps

            self.steps = compiled_steps(spec.device, spec.world_size, spec.dtype, spec.npu_graph, spec.chip_family)

    def info(self) -> dict:
        decode_weights, kv_per_token = decode_read_bytes(self.model)
        return {
            "rank": self.rank,
            "weight_bytes": weight_bytes(self.model),
            "decode_weight_bytes": decode_weights,
            "kv_bytes_per_token": kv_per_token,
            "load_s": self.load_s,
            "load_bytes_read": self.load_bytes_read,
            "load_gb_per_s": self.load_bytes_read / 1e9 / max(self.load_s, 1e-9),
            "load_peak_host_bytes": self.load_peak_host_bytes,  # growth of anonymous memory while loading
            "load_peak_device_bytes": self.load_peak_device_bytes,  # accelerators: allocator peak; CPU: None
            "device_name": devices.device_name(self.device),
            "threads": torch.get_num_threads(),
            "cpu_binding": self.binding.as_record(),
            "affinity": _affinity_text(),  # read back from this process, not from the plan
            "environment": self.environment,
        }

    def bandwidth(self) -> float:
        """This rank's memory bandwidth (bytes/s) by a copy probe on its device."""
        return devices.copy_bandwidth(self.device)

    def generate(self, request: GenerationRequest, on_tokens=None) -> GenerationResult:
        """This rank's part of ``request``; its peak memory (bytes) in ``peak_memory_bytes``."""
        args = self.args
        devices.reset_peak_memory(self.device)
        prefix = self._prefix_for(request)
        result = generate(
            self.model,
            request.prompts,
            request.max_new_tokens,
            eos_ids=args.eos_token_ids if request.eos_ids is None else request.eos_ids,
            ignore_eos=request.ignore_eos,
            sampling=request.sampling,
            pad_id=args.pad_token_id if args.pad_token_id is not None else 0,
            return_logits=request.return_logits,
            sync=lambda: devices.synchronize(self.device),
            on_tokens=on_tokens,
            steps=self.steps,
            prefix=prefix,
            logit_ids=request.logit_ids,
        )
        result.peak_memory_bytes = [devices.peak_memory_bytes(self.device)]
        return result

    def _prefix_for(self, request: GenerationRequest) -> PrefixKV | None:
        """The request's shared prefix, computed on first use and kept while requests share it."""
        n = request.prefix_len
        if n <= 0:
            return None
        ids = request.prompts[0][:n]
        if any(len(p) <= n or p[:n] != ids for p in request.prompts):
            raise UserError(f"prefix_len {n}: not every prompt extends the same {n}-token prefix")
        if self._prefix is None or self._prefix.ids != ids:
            self._prefix = None  # free the old one first
            self._prefix = PrefixKV.compute(self.model, ids)
        return self._prefix


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset/cgroups/xdist shares narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads_per_rank(world_size: int) -> int:
    return max(1, usable_cpus() // world_size)


def _affinity() -> set[int] | None:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return None


def _affinity_text() -> str | None:
    try:
        return format_cpu_list(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return None


def _device_label(spec: EngineSpec, local_rank: int) -> str:
    return "cpu" if spec.device == "cpu" else f"{spec.device}:{spec.device_index(local_rank)}"


def bind_this_rank(spec: EngineSpec, local_rank: int, local_world: int, *, set_threads: bool = True) -> CpuBinding:
    """Before the model loads: pin this process as local rank ``local_rank`` (``spec.bind_cpu``), size torch's threads.

    A failure to bind is one warning line and the rank runs unbound
    (vicuna_bench.binding); on CPU a bound rank runs one thread per CPU it holds.
    """
    ids = [spec.device_index(i) for i in range(local_world)]
    binding = bind_rank(spec.device, local_rank, local_world, ids, enabled=spec.bind_cpu)
    if set_threads and spec.device == "cpu":
        torch.set_num_threads(len(binding.cpus) if binding.cpus else _threads_per_rank(local_world))
    return binding


class RankLog:
    """``<log_dir>/rank<r>.log``: what a rank runs and where it is bound (appended; nothing when no log_dir)."""

    def __init__(self, spec: EngineSpec, rank: int):
        self.path = None if spec.log_dir is None else Path(spec.log_dir) / f"rank{rank}.log"
        self.rank = rank

    def write(self, line: str) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} rank {self.rank}: {line}\n")
        except OSError as exc:
            log.warning("rank %d: cannot write %s (%s); logging to it stops", self.rank, self.path, exc.strerror or exc)
            self.path = None


def init_process_group(spec: EngineSpec, rank: int, local_rank: int, init_method: str | None,
                       timeout_s: float) -> TensorParallel:
    """Join the ranks' process group as ``rank`` (device ``spec.device_index(local_rank)``), its collectives warmed.

    Every path that starts a rank comes through here (the in-process
    workers, torchrun, and so sdk-test), in this order: the device is made
    current, the group is joined, one small collective runs eagerly.  NCCL
    and HCCL make a rank's communicator on the device current at its first
    collective, and making one while a stream is capturing a graph is not
    allowed: without the warm-up that first collective is inside the first
    compiled (captured) decode step.
    """
    device = devices.device_for_rank(spec.device, spec.device_index(local_rank))  # set_device before the group
    if spec.world_size == 1:
        return TensorParallel()
    import torch.distributed as dist

    backend = devices.BACKENDS[spec.device]
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=spec.world_size)
    dist.init_process_group(**kwargs)
    tp = TensorParallel(spec.world_size, dist.get_rank(), None)
    spent_ms = warm_collectives(tp, device)
    RankLog(spec, rank).write(f"process group: {backend}, {spec.world_size} ranks, on {device}; "
                              f"first collective (warm-up all-reduce) {spent_ms:.1f} ms")
    return tp


def warm_collectives(tp: TensorParallel, device: torch.device) -> float:
    """Run one all-reduce of a 1-element tensor on ``device`` now, eagerly, and wait for it; ms spent.

    Creates the communicator outside any graph capture (see
    :func:`init_process_group`); a sum that is not the world size means the
    group is broken, and says so before a model is loaded.
    """
    started = time.perf_counter()
    probe = torch.ones(1, dtype=torch.float32, device=device)
    tp.all_reduce(probe)
    total = float(probe.item())  # waits for the device
    if total != tp.world_size:
        raise EngineError(f"rank {tp.rank}: the warm-up all-reduce over {tp.world_size} ranks summed to {total:g} "
                          f"on {device} (expected {tp.world_size})")
    return (time.perf_counter() - started) * 1e3


# ---------------------------------------------------------------- torchrun

def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def init_from_env(spec: EngineSpec) -> RankRunner:
    """Join the process group torchrun set up; load this rank's share."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != spec.world_size:
        raise UserError(f"--world-size {spec.world_size} disagrees with torchrun's WORLD_SIZE={world}")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    binding = bind_this_rank(spec, local_rank, local_world)  # before anything is loaded
    tp = init_process_group(spec, rank, local_rank, None, timeout_s=1800)
    return RankRunner(spec, rank, local_rank, tp, binding=binding)


class SpmdEngine:
    """This process's rank under torchrun, with :class:`Engine`'s interface.

    Every rank makes the same calls; results are merged with collectives
    (timings: maximum over ranks; peak memory and info: gathered), so every
    rank sees what rank 0 reports.
    """

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.args = spec.validate()
        log.info(
            "torchrun rank %s: model=%s world_size=%d device=%s dtype=%s max_seq_len=%d",
            os.environ.get("RANK", "?"), spec.model_path, spec.world_size, spec.device, spec.dtype, spec.max_seq_len,
        )
        self.runner = init_from_env(spec)
        self.rank = self.runner.rank
        self.rank_info = self._gather(self.runner.info())
        self.closed = False

    @staticmethod
    def _gather(obj) -> list:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def generate(self, prompts, max_new_tokens: int = 32, *, on_tokens=None, **options) -> GenerationResult:
        """Every rank calls this alike; each gets its own tokens (all equal) and the merged timings."""
        request = GenerationRequest.make(prompts, max_new_tokens, stream=on_tokens is not None, **options)
        result = self.runner.generate(request, on_tokens=on_tokens if self.rank == 0 else None)
        timings = self._gather(dataclasses.replace(result, output_ids=[], logits=None))
        timings[self.rank] = result
        return merge_rank_results(timings, tokens_from=self.rank)

    def bandwidth(self) -> list[float]:
        return self._gather(self.runner.bandwidth())

    def close(self) -> None:
        import torch.distributed as dist

        if not self.closed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.closed = True

    def __enter__(self) -> "SpmdEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- in-process engine

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_parent(parent_pid: int) -> None:
    """End this worker if its parent goes away (even mid-collective)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _worker_main(spec: EngineSpec, rank: int, init_method: str, conn, parent_pid: int, timeout_s: float,
                 model_hook: ModelHook | None = None) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        binding = bind_this_rank(spec, rank, spec.world_size)  # before anything is loaded
        tp = init_process_group(spec, rank, rank, init_method, timeout_s)
        runner = RankRunner(spec, rank, rank, tp, model_hook, binding)
        conn.send(("ready", runner.info()))
    except BaseException as exc:  # report, then exit: the parent raises it
        conn.send(("error", _portable(exc)))
        return
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):
            return
        if command == "close":
            return
        try:
            if command == "generate":
                stream = None
                if payload.stream and rank == 0:
                    stream = lambda ids: conn.send(("tokens", ids))  # noqa: E731
                result = runner.generate(payload, on_tokens=stream)
                if rank != 0:  # only rank 0's tokens/logits travel back
                    result.output_ids = []
                    result.logits = None
                elif result.logits is not None:
                    result.logits = [t.numpy() for t in result.logits]
                conn.send(("result", result))
            elif command == "bandwidth":
                conn.send(("result", runner.bandwidth()))
            else:
                conn.send(("error", EngineError(f"unknown command {command!r}")))
        except BaseException as exc:
            conn.send(("error", _portable(exc)))


def _collective_broke(exc: BaseException) -> bool:
    """Whether a rank's error reads as a collective whose peer went away (gloo/NCCL/HCCL transport errors)."""
    text = str(exc).lower()
    return not isinstance(exc, UserError) and any(
        word in text for word in ("gloo", "nccl", "hccl", "connection", "broken pipe", "timed out"))


def _portable(exc: BaseException) -> BaseException:
    """Keep our own errors as they are; wrap others with their traceback."""
    if isinstance(exc, VicunaBenchError):
        return exc
    return EngineError(f"worker failed: {exc!r}\n{traceback.format_exc()}")


class Engine:
    """N worker processes holding one model, serving many requests.

    Use as a context manager, or call :meth:`close`.  ``world_size == 1``
    runs in this process unless ``workers=True``.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        workers: bool | None = None,
        model_hook: ModelHook | None = None,
        start_timeout_s: float = 600.0,
        collective_timeout_s: float = 600.0,
    ):
        self.spec = spec
        self.args = spec.validate()
        self._procs: list = []
        self._conns: list = []
        self._local: RankRunner | None = None
        self.closed = False
        self.rank = 0  # the caller's process: rank 0's tokens come back here
        self.rank_info: list[dict] = []
        use_workers = spec.world_size > 1 if workers is None else workers
        log.info(
            "engine: model=%s world_size=%d device=%s dtype=%s max_seq_len=%d",
            spec.model_path, spec.world_size, spec.device, spec.dtype, spec.max_seq_len,
        )
        if not use_workers:
            # This process is the rank: bound while the engine is open, its own affinity given back on close.
            self._saved_affinity = _affinity()
            binding = bind_this_rank(spec, 0, 1, set_threads=False)
            try:
                self._local = RankRunner(spec, 0, 0, TensorParallel(), model_hook, binding)
            except BaseException:
                self._restore_affinity()
                raise
            self.rank_info = [self._local.info()]
            return
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        for rank in range(spec.world_size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(spec, rank, init_method, child_conn, os.getpid(), collective_timeout_s, model_hook),
                name=f"vicuna-bench-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        try:
            self.rank_info = self._collect(deadline=time.monotonic() + start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- public API
    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs] if self._procs else [os.getpid()]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        *,
        on_tokens: Callable[[list[int]], None] | None = None,
        timeout_s: float | None = None,
        **options,
    ) -> GenerationResult:
        """Generate for token-id prompts (options: :class:`GenerationRequest`'s); timings the maximum over ranks (ms)."""
        request = GenerationRequest.make(prompts, max_new_tokens, stream=on_tokens is not None, **options)
        if self.closed:
            raise EngineError("engine is closed")
        if self._local is not None:
            return self._local.generate(request, on_tokens=on_tokens)
        validate_prompts(request.prompts, request.max_new_tokens, self.spec.max_seq_len, self.args.vocab_size)
        self._check_alive()
        for conn in self._conns:
            self._send(conn, ("generate", request))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = self._collect(deadline, on_tokens=on_tokens)
        for r in results:
            if r.logits is not None:  # numpy through the pipe
                r.logits = [torch.from_numpy(a) for a in r.logits]
        return merge_rank_results(results)

    def bandwidth(self) -> list[float]:
        """Each rank's memory bandwidth (bytes/s), probed on all ranks at once.

        Ranks sharing a host share its memory bus, so probing them together
        measures what each gets while the others run too.
        """
        if self.closed:
            raise EngineError("engine is closed")
        if self._local is not None:
            return [self._local.bandwidth()]
        self._check_alive()
        for conn in self._conns:
            self._send(conn, ("bandwidth", None))
        return self._collect(deadline=None)

    def close(self) -> None:
        """End every worker (politely, then by force)."""
        if self.closed:
            return
        self.closed = True
        if self._local is not None:
            self._restore_affinity()
        self._local = None
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, end - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals
    def _restore_affinity(self) -> None:
        saved = getattr(self, "_saved_affinity", None)
        if saved is not None:
            try:
                os.sched_setaffinity(0, saved)
            except OSError as exc:
                log.warning("engine: cannot restore this process's CPU affinity (%s)", exc)
            self._saved_affinity = None

    def _send(self, conn, message) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError, BrokenPipeError):
            rank = self._conns.index(conn)
            self._fail(self._death(rank))

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(self._death(rank))

    def _fail(self, why: str):
        self.close()
        raise EngineError(f"engine failed: {why}; all workers stopped")

    def _death(self, rank: int) -> str:
        """How worker ``rank`` ended: its exit code, or the signal that killed it and, for SIGKILL, the likely
        cause (the kernel's out-of-memory killer) with the rank's memory need."""
        proc = self._procs[rank]
        proc.join(timeout=5.0)  # its pipe closes a moment before its exit status is there
        who = f"worker rank {rank} (pid {proc.pid})"
        when = "while loading" if not self.rank_info else "while serving"
        code = proc.exitcode
        if code is None:
            return f"{who} closed its pipe {when} but is still running"
        if code >= 0:
            return f"{who} exited with code {code} {when}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        line = f"{who} was killed by {name} {when}"
        if -code == signal.SIGKILL:
            spec = self.spec
            need = fit.rank_need(self.args, spec.world_size, spec.dtype, spec.max_seq_len, spec.fit_batch,
                                 spec.device)
            line += (f": likely the kernel's out-of-memory killer (each rank holds {need.weight_bytes / 2**30:.2f} GiB "
                     f"of weights in {spec.dtype} + {need.kv_bytes / 2**30:.2f} GiB of KV cache; see dmesg)")
        return line

    def _signalled_rank(self, grace_s: float) -> int | None:
        """A worker a signal ended, waiting up to ``grace_s`` for one: the cause behind a peer's broken collective."""
        end = time.monotonic() + grace_s
        while True:
            for rank, proc in enumerate(self._procs):
                if proc.exitcode is not None and proc.exitcode < 0:
                    return rank
            alive = [p.sentinel for p in self._procs if p.exitcode is None]
            if not alive or time.monotonic() >= end:
                return None
            wait(alive, timeout=max(0.0, end - time.monotonic()))

    def _collect(self, deadline: float | None, on_tokens=None) -> list:
        """One reply per rank; raises as soon as any worker dies or reports an error."""
        replies: dict[int, Any] = {}
        by_conn = {id(c): r for r, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self._procs)}
        while len(replies) < len(self._conns):
            waiting = [c for r, c in enumerate(self._conns) if r not in replies]
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready = wait(waiting + list(by_sentinel), timeout=timeout)
            for obj in ready:
                if obj in by_sentinel:
                    continue  # a dead worker is handled below, after its last message
                rank = by_conn[id(obj)]
                try:
                    kind, payload = obj.recv()
                except (EOFError, OSError):
                    self._fail(self._death(rank))
                if kind == "tokens":
                    if on_tokens is not None:
                        on_tokens(payload)
                    continue
                if kind == "error":
                    killed = self._signalled_rank(grace_s=1.0 if _collective_broke(payload) else 0.0)
                    if killed is not None:  # the peer's error is only the echo of the killed rank
                        self._fail(self._death(killed))
                    self.close()
                    raise payload
                replies[rank] = payload
            if len(replies) < len(self._conns):
                self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                self._fail("timed out waiting for the workers")
        return [replies[r] for r in range(len(self._conns))]

