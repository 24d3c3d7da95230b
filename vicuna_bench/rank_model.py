"""One rank: its share of the model loaded onto its device, and the requests it serves.

* :func:`load_rank_model` (and :func:`build_rank_model`, :func:`finish_rank_model`): the model laid out on meta,
  allocated once in the run's dtype, each checkpoint tensor written into its place, projections fused;
* :class:`RankRunner`: a loaded rank serving :class:`GenerationRequest` s (the same on every rank);
* :func:`merge_rank_results`: one result from every rank's (what the launchers return).

What a rank's process does before it loads (CPU binding, process group) is :mod:`vicuna_bench.rank_setup`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import checkpoint, cpu_kernels, devices, environment, fit, heap
from .kernel_pass import apply_cpu_kernels
from .binding import CpuBinding, unbound
from .errors import UserError
from .generation import EAGER, GenerationRequest, GenerationResult, PrefixKV, generate
from .model import Transformer, decode_read_bytes, weight_bytes
from .rank_setup import RankLog, affinity_text, device_label
from .sharding import ShardPlan, TensorParallel
from .spec import EngineSpec


def build_rank_model(spec: EngineSpec, rank: int, tp: TensorParallel, device: torch.device) -> Transformer:
    """Load rank ``rank``'s share of the model onto ``device`` (fused qkv and gate/up projections)."""
    return load_rank_model(spec, rank, tp, device)[0]


def load_rank_model(spec: EngineSpec, rank: int, tp: TensorParallel,
                    device: torch.device) -> tuple[Transformer, checkpoint.LoadStats]:
    """Rank ``rank``'s model on ``device`` and what loading it read.

    The model is laid out fused on meta, its parameters are allocated once
    in the run's dtype on ``device``, and each checkpoint tensor is written
    straight into its place: the rank needs its share of memory and no
    second copy, on the host or the device.
    """
    path = Path(spec.model_path)
    args = checkpoint.read_model_args(path)
    plan = ShardPlan(args, spec.world_size, rank)
    kernels = device.type == "cpu" and cpu_kernels.load()  # our CPU GEMM and decode attention, else why not (logged)
    kv_budget = None if spec.kv_cache_budget_mb is None else spec.kv_cache_budget_mb << 20
    if device.type in ("cuda", "npu"):  # before anything is allocated on it
        count = (torch.cuda if device.type == "cuda" else getattr(torch, "npu")).device_count()
        need = fit.check_device_fit(args, spec.world_size, spec.dtype, spec.max_seq_len, spec.fit_batch, device,
                                    count, kv_budget=kv_budget)
    else:  # checked before the ranks started (EngineSpec.validate); here only the room its KV pool may take
        need = fit.host_need(args, spec.world_size, spec.dtype, spec.max_seq_len, spec.fit_batch,
                             spec.ranks_on_host())
    with torch.device("meta"):
        model = Transformer(args, plan, tp, spec.max_seq_len)
    model.kv_pool.room_bytes = None if need is None else need.kv_room_bytes
    if kernels:
        apply_cpu_kernels(model)
    model.tie_weights()
    model.allocate_parameters(device, spec.torch_dtype)
    # One bar, from rank 0, and only for checkpoints big enough to wait for.
    big = sum(p.numel() for p in model.parameters()) * spec.world_size > 1_000_000_000
    stats = checkpoint.load_rank_weights(path, plan, model.checkpoint_targets(), progress=rank == 0 and big)
    if device.type == "cpu":  # after loading: a prefill's buffers reused from the heap, not faulted in per call
        heap.keep_large_buffers()
    return finish_rank_model(model, device), stats


def finish_rank_model(model: Transformer, device: torch.device) -> Transformer:
    """What a rank model needs once its weights are real: tied head, rope tables rebuilt off meta, on ``device``,
    in eval mode."""
    model.tie_weights()
    model.rotary = type(model.rotary)(model.args, model.max_seq_len)
    return model.to(device).eval()


ModelHook = Callable[[Transformer], Transformer]


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
        started_s=head.started_s,
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
        self.device = devices.device_for_rank(spec.device, spec.device_index(local_rank), spec.npu_jit_compile)
        self.binding = binding or unbound(local_rank, device_label(spec, local_rank), "not bound by its caller")
        self.environment = environment.environment_record(spec.device, spec.device_index(local_rank),
                                                          spec.cpu_dtype_auto)
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
            "kv_room_bytes": getattr(getattr(self.model, "kv_pool", None), "room_bytes", None),  # fit check (sweep)
            "device_name": devices.device_name(self.device),
            "threads": torch.get_num_threads(),
            "cpu_binding": self.binding.as_record(),
            "affinity": affinity_text(),  # read back from this process, not from the plan
            "environment": self.environment,
            "compile_path": getattr(self.steps, "description", "eager"),  # what --compile on runs here, or why not
        }

    def bandwidth(self) -> float:
        """This rank's memory bandwidth (bytes/s) by a copy probe on its device."""
        return devices.copy_bandwidth(self.device)

    def generate(self, request: GenerationRequest, on_tokens=None) -> GenerationResult:
        """This rank's part of ``request``; its peak memory (bytes) in ``peak_memory_bytes``."""
        devices.reset_peak_memory(self.device)
        prefix = self._prefix_for(request)
        result = generate(self.model, request, steps=self.steps, prefix=prefix, on_tokens=on_tokens,
                          sync=lambda: devices.synchronize(self.device))
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

