"""Batched generation on one rank's share of the model.

Every rank of a tensor-parallel group calls :func:`generate` with the same
arguments; collectives inside the model keep them in step, and sampling uses
the same seeded generator on identical (all-gathered) logits, so every rank
picks the same tokens without a broadcast.

Prompts are left-padded; rotary positions come from the attention mask, so
a padded row computes exactly what it would alone.  The prefill is an
ordinary forward; every later token is one :func:`decode_step`, a function
of fixed-shape tensors (the position, the cache slot and the valid-key mask
live on the device), so it can be compiled or captured as a graph; its
inputs advance in one place, :meth:`DecodeState.advance`.  The
loop reads the device only for the "all rows finished?" check (every
``EOS_CHECK_EVERY`` steps on accelerators, never when EOS is ignored) and
for streaming; step times come from device events read once at the end.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import weakref
from typing import Callable, Sequence

import torch

from . import fit
from .errors import UserError, first_line
from .model import Transformer

log = logging.getLogger("vicuna_bench")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``temperature == 0``; else temperature, top-k, top-p, seed."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} must be >= 0")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class GenerationResult:
    """Tokens and timings of one batched generation (times in ms)."""

    output_ids: list[list[int]]
    first_token_ms: float
    step_ms: list[float]
    logits: list[torch.Tensor] | None = None  # per row: [new tokens, vocab] float32
    total_ms: float = 0.0  # the whole call: inputs, cache, prefill, decode, outputs (compiling excluded)
    peak_memory_bytes: list[int] = dataclasses.field(default_factory=list)  # per rank (filled by the runtime)
    compile_ms: float = 0.0  # compiling the decode step for this call's shapes (in total_ms, not in the token times)
    started_s: float = 0.0  # time.perf_counter() at the start of the first-token region (energy: where its regions lie)

    @property
    def next_token_ms(self) -> float:
        """Mean of the decode steps (0.0 when only one token was made)."""
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0


def validate_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int, vocab_size: int) -> None:
    if not prompts:
        raise UserError("no prompts given")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > max_seq_len:
            raise UserError(
                f"prompt {i} has {len(prompt)} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                f"--max-seq-len {max_seq_len} (raise --max-seq-len or $MAX_SEQ_LENGTH)"
            )
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise UserError(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def select_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V] (float32).

    Order as in transformers: temperature, then top-k, then top-p.
    """
    if sampling.greedy:
        # max's indices = argmax's (the first largest, NaN first), at a third of its time on CPU: torch 2.13's argmax
        # is a scalar loop (SmolLM2's 8 x 49152 logits: 0.37 against 0.13 ms, 2% of a batch-8 decode step).
        return logits.max(dim=-1).indices
    scores = logits / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - sampling.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StepClock:
    """Times of consecutive intervals in ms, without a host sync per interval on accelerators.

    CUDA/NPU: a device event per mark, read once by :meth:`intervals_ms`.
    CPU: the host clock (CPU kernels and gloo collectives are synchronous).
    """

    def __init__(self, device: torch.device):
        self.device = device
        module = getattr(torch, device.type, None) if device.type in ("cuda", "npu") else None
        self._event = (lambda: module.Event(enable_timing=True)) if module is not None else None
        self._marks: list = []

    def mark(self) -> None:
        if self._event is None:
            self._marks.append(time.perf_counter())
        else:
            event = self._event()
            event.record()
            self._marks.append(event)

    def intervals_ms(self) -> list[float]:
        """Times between consecutive marks (call after the device work is synchronised)."""
        m = self._marks
        if self._event is None:
            return [(b - a) * 1e3 for a, b in zip(m, m[1:])]
        return [float(a.elapsed_time(b)) for a, b in zip(m, m[1:])]


@dataclasses.dataclass
class DecodeState:
    """The inputs of the next decode step, on the device; :meth:`advance` is the one place they change.

    ``tokens`` [B, 1]: the ids the step feeds; ``positions`` [B, 1]: their
    rotary positions; ``slot`` [1]: the cache slot they are written to;
    ``key_valid`` [B, cache length] (bool): the cache slots holding real
    tokens, ``slot`` included.  No host ints, so one compiled step serves
    every position.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slot: torch.Tensor
    key_valid: torch.Tensor

    @classmethod
    def after_prefill(cls, key_valid: torch.Tensor, last_slot: int, last_positions: torch.Tensor) -> "DecodeState":
        """The state at the prompt's last token (cache slot ``last_slot``, rotary positions ``last_positions`` [B, 1]).

        :meth:`advance` moves it to the first generated token.
        """
        batch = key_valid.shape[0]
        device = key_valid.device
        # Fresh standard strides: a [B, 1] slice of the prompt's positions keeps the prompt's row stride, and a
        # compiled step guards on strides (a recompile inside the timed steps).
        positions = last_positions.clone(memory_format=torch.contiguous_format)
        return cls(torch.zeros((batch, 1), dtype=torch.long, device=device), positions,
                   torch.tensor([last_slot], device=device), key_valid)

    def advance(self, next_ids: torch.Tensor) -> None:
        """Feed ``next_ids`` [B] at the next slot and position, and mark that slot valid.

        In place: the step's inputs stay the same tensors (a captured graph's
        inputs keep their addresses).  Here, outside the compiled step, on
        every device: CUDA graph trees run eagerly a graph that writes an input
        other than the module's parameters and buffers
        (``torch/_inductor/cudagraph_utils.py``,
        ``check_for_mutation_ignore_cuda_graph_managed_tensor``), so the one
        step that every backend compiles writes none of its arguments.
        """
        self.tokens.copy_(next_ids[:, None])
        self.positions += 1
        self.slot += 1
        self.key_valid.index_fill_(1, self.slot, True)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, positions, key_valid, slot)``: the tensor arguments of :func:`decode_step`."""
        return self.tokens, self.positions, self.key_valid, self.slot


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                slot: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, vocab] (float32) for ``tokens`` [B, 1] at rotary ``positions`` [B, 1], cache ``slot`` [1].

    The one decode step, eager or compiled on every device (``--compile
    on`` hands this very function to inductor on CPU and CUDA and to
    torchair on NPU).  Writes only the model's KV cache buffers: every
    layer's key and value rows at ``slot``.  Reads ``key_valid`` [B, cache
    length] (``slot`` already marked, by :meth:`DecodeState.advance`) and
    writes none of its arguments.  Fixed shapes and no host reads.  A
    graph backend may reuse the returned tensor's memory in its next call:
    copy logits that must outlive it.
    """
    return model.decode(tokens, positions, key_valid, slot)[:, -1].float()


@dataclasses.dataclass
class PrefixKV:
    """A prompt prefix shared by many requests: its token ids and its keys/values per layer (this rank's heads)."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    @torch.inference_mode()
    def compute(cls, model: Transformer, ids: Sequence[int]) -> "PrefixKV":
        """Prefill ``ids`` once (batch 1) and keep its keys and values."""
        device = model.lm_head.weight.device
        return cls(list(map(int, ids)), model.prefix_kv(torch.tensor([list(ids)], dtype=torch.long, device=device)))


def prefill_logits(model: Transformer, tokens, positions, key_valid, start: int) -> torch.Tensor:
    """Last-position logits [B, vocab] (float32) of a prefill written at cache slots start..start+T."""
    return model(tokens, positions, key_valid, start=start)[:, -1].float()


class EagerSteps:
    """How a generation runs its two kinds of forward: prefill and :func:`decode_step`, eagerly.

    ``decode(model, state)`` runs :func:`decode_step` on ``state``'s inputs; it
    advances nothing (the caller does, through :meth:`DecodeState.advance`).

    ``--compile on`` swaps in :class:`vicuna_bench.compile.CompiledSteps`,
    which compiles both and makes its graphs in :meth:`warm`, before the
    timed work starts.
    """

    description = "eager"

    def prefill(self, model: Transformer, tokens, positions, key_valid, start: int) -> torch.Tensor:
        return prefill_logits(model, tokens, positions, key_valid, start)

    def decode(self, model: Transformer, state: DecodeState) -> torch.Tensor:
        return decode_step(model, *state.step_inputs())

    def warm(self, model: Transformer, batch: int, length: int, sync=lambda: None) -> float:
        """Make whatever these steps need for ``batch`` rows and a cache of ``length`` slots; seconds spent."""
        return 0.0


EAGER = EagerSteps()

# How often a decode loop on an accelerator reads "all rows finished?" back to the host.
EOS_CHECK_EVERY = 8


def cache_length(needed: int, max_seq_len: int) -> int:
    """KV cache slots for ``needed`` tokens: the next power of two from 256, capped by ``max_seq_len``.

    A decode step attends over its whole cache, so the cache is sized to the
    request (a few buckets, each compiled once) rather than to max_seq_len.
    """
    length = 256
    while length < needed:
        length *= 2
    return min(length, max_seq_len)


def warms_first_prefill(device: str) -> bool:
    """Whether a prefill of a shape new to the model runs once untimed first: on NPU, whose eager ops may compile
    on their first call per shape (``torch.npu.set_compile_mode(jit_compile=True)``)."""
    return device == "npu"


# Prefill shapes (batch, prefill tokens, cache slots, start) already run per model, where warms_first_prefill.
_WARMED_PREFILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def warm_prefill(model: Transformer, steps: "EagerSteps", tokens, positions, key_valid, start: int,
                 sync: Callable[[], None] = lambda: None) -> float:
    """Run this prefill once, untimed, if its shape is new to ``model`` and the device needs it; seconds spent.

    The same tensors as the timed prefill: it writes the very keys and
    values of slots ``start..`` that the timed one then writes again.
    """
    if not warms_first_prefill(tokens.device.type):
        return 0.0
    shape = (*tokens.shape, key_valid.shape[1], start)
    seen = _WARMED_PREFILLS.setdefault(model, set())
    if shape in seen:
        return 0.0
    started = time.perf_counter()
    steps.prefill(model, tokens, positions, key_valid, start)
    sync()
    seen.add(shape)
    spent = time.perf_counter() - started
    log.info("warmed the prefill for batch %d x %d tokens, cache %d, on %s: %.1f s (not in the token times)",
             tokens.shape[0], tokens.shape[1], key_valid.shape[1], tokens.device.type, spent)
    return spent


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory.

    torch's ``OutOfMemoryError`` (CUDA, the CPU allocator), or torch_npu's
    ``RuntimeError`` "NPU out of memory. Tried to allocate ..." (a plain
    ``c10::Error``: torch_npu 2.6.0's libtorch_npu.so never throws
    ``c10::OutOfMemoryError``).
    """
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch 2.1: only torch.cuda's
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _release_device_cache(device: torch.device) -> None:
    """Hand the allocator's cached free blocks back to the device (CUDA/NPU), after the last references go."""
    gc.collect()
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).empty_cache()


def _free_bytes(device: torch.device) -> int | None:
    """Memory the rank can still take: the device's free memory, the host's on CPU (None where unknown)."""
    if device.type in ("cuda", "npu"):
        return fit.device_free_bytes(device)
    return fit.host_available_bytes()


def make_room_for_prefill(model: Transformer, batch: int, slots: int) -> int:
    """Drop the KV sets the pool keeps beside the one in use where this prefill's activations (the fit check's
    bound, :func:`vicuna_bench.fit.prefill_activation_bytes` over ``slots``) would not fit in the free memory;
    bytes dropped.

    Local to the rank and before any collective: at world size > 1 a prefill
    that has run out of memory cannot be rerun (the other ranks wait inside
    its collectives), so the room is made before it starts.
    """
    if len(model.kv_pool) <= 1:
        return 0
    device = model.lm_head.weight.device
    free = _free_bytes(device)
    need = fit.prefill_activation_bytes(model.plan, slots, batch)
    if free is None or need <= free:
        return 0
    kept = len(model.kv_pool) - 1
    dropped = model.kv_pool.drop_kept()
    _release_device_cache(device)
    log.warning("prefill of batch %d over %d cache slots may need %.1f MiB, %.1f MiB free on %s: dropped %d kept KV "
                "cache set(s) (%.1f MiB) first", batch, slots, need / 2**20, free / 2**20, device.type, kept,
                dropped / 2**20)
    return dropped


def _prefill_out_of_memory(model: Transformer, batch: int, length: int, new_tokens: int, retried: bool,
                           why: str) -> UserError:
    """The one-line error of a prefill out of memory: the request, and the batch or prompt length that would fit."""
    device = model.lm_head.weight.device
    element = model.lm_head.weight.element_size()
    held = model.kv_pool.held_bytes  # the set in use and any kept: a smaller request's set takes their place
    free = _free_bytes(device)
    head = f"batch {batch} of {length}-token prompts (+{new_tokens} new): the prefill ran out of {device.type} memory"
    if retried:
        head += " twice (the kept KV cache sets dropped and the device cache emptied in between)"
    else:
        head += (f" (not retried: at world size {model.tp.world_size} the other ranks wait inside this prefill's "
                 "collectives)")
    if free is None:
        return UserError(f"{head}; {why}")
    room = free + held

    def fits(b: int, t: int) -> bool:
        slots = cache_length(t + new_tokens, model.max_seq_len)
        need = fit.kv_cache_bytes(model.plan, slots, b, element) + fit.prefill_activation_bytes(model.plan, t, b)
        return need <= room

    options = []
    smaller = next((b for b in range(batch - 1, 0, -1) if fits(b, length)), None)
    if smaller is not None:
        options.append(f"batch {smaller} at these prompts")
    lo, hi = 0, length - 1  # the longest prompt that fits at this batch (fits is monotone in t)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(batch, mid) else (lo, mid - 1)
    if lo > 0:
        options.append(f"prompts of up to {lo} tokens at batch {batch}")
    where = f"{free / 2**30:.2f} GiB free + {held / 2**30:.2f} GiB of KV cache sets held"
    if options:
        return UserError(f"{head}; by the fit check's bounds ({where}) would fit: {', or '.join(options)}; {why}")
    return UserError(f"{head}; by the fit check's bounds nothing smaller fits in {where}; {why}")


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


@dataclasses.dataclass
class _Batch:
    """A request's prompts laid out in the KV cache: per row [shared prefix | left padding | rest | new tokens]."""

    tokens: torch.Tensor  # [B, T] the prompts past the shared prefix, left-padded
    positions: torch.Tensor  # [B, T] rotary positions
    key_valid: torch.Tensor  # [B, cache slots] slots holding real tokens
    shared: int  # tokens of the shared prefix
    length: int  # prompt slots per row (prefix included)
    new_tokens: int  # the most a row may generate

    @classmethod
    def lay_out(cls, model: Transformer, prompts: Sequence[Sequence[int]], shared: int, new_tokens: int,
                pad_id: int) -> "_Batch":
        device = model.lm_head.weight.device
        rests = [list(p[shared:]) for p in prompts]
        length = shared + max(len(r) for r in rests)
        tokens = torch.full((len(prompts), length - shared), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        mask[:, :shared] = True
        for row, rest in enumerate(rests):
            tokens[row, tokens.shape[1] - len(rest) :] = torch.as_tensor(rest, dtype=torch.long)
            mask[row, length - len(rest) :] = True
        tokens, mask = tokens.to(device), mask.to(device)
        slots = model.setup_caches(len(prompts), cache_length(length + new_tokens, model.max_seq_len))
        key_valid = torch.zeros((len(prompts), slots), dtype=torch.bool, device=device)
        key_valid[:, :length] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, shared:]
        return cls(tokens, positions, key_valid, shared, length, new_tokens)


def _usable_prefix(model: Transformer, prompts: Sequence[Sequence[int]], prefix: PrefixKV | None) -> PrefixKV | None:
    """``prefix`` where every prompt extends it (else a ValueError); None where it cannot be reused."""
    a = model.args
    if prefix is not None and a.rope_type == "dynamic" and max(map(len, prompts)) > a.max_position_embeddings:
        # Dynamic NTK rotates every key by a base that depends on the whole prompt's length: keys computed
        # for the prefix alone would differ.  Such a request is prefilled whole.
        return None
    if prefix is not None:
        shared = len(prefix.ids)
        for i, prompt in enumerate(prompts):
            if len(prompt) <= shared or list(prompt[:shared]) != prefix.ids:
                raise ValueError(f"prompt {i} does not extend the {shared}-token prefix by at least one token")
    return prefix


def _timed_prefill(model: Transformer, steps: EagerSteps, batch: _Batch, prefix: PrefixKV | None,
                   sampling: SamplingConfig, generator: torch.Generator | None, sync: Callable[[], None]):
    """The first token, timed: (clock, host start s, logits, token ids, untimed warm-up s).

    A prefill that runs out of device memory drops the KV sets the pool keeps beside the one in use and runs once
    more (world size 1); then, or at once at a larger world size, a one-line UserError says what would fit.
    """
    warm_s = 0.0
    rows = batch.tokens.shape[0]
    for attempt in (1, 2):
        try:
            warm_s += warm_prefill(model, steps, batch.tokens, batch.positions, batch.key_valid, batch.shared, sync)
            clock = StepClock(batch.tokens.device)
            sync()
            started_s = time.perf_counter()  # the device is idle here: host time and the first mark agree
            clock.mark()
            if prefix is not None:
                model.load_prefix(prefix.kv)
            logits = steps.prefill(model, batch.tokens, batch.positions, batch.key_valid, batch.shared)
            return clock, started_s, logits, select_tokens(logits, sampling, generator), warm_s
        except Exception as exc:  # only a device out of memory is handled; anything else goes up as it is
            if not out_of_memory(exc):
                raise
            why = first_line(exc)
        # Out of memory; the failed prefill's tensors went with the exception at the end of the except clause.
        if attempt == 2 or model.tp.world_size > 1:
            raise _prefill_out_of_memory(model, rows, batch.length, batch.new_tokens, attempt == 2, why)
        kept = len(model.kv_pool) - 1
        dropped = model.kv_pool.drop_kept()
        _release_device_cache(batch.tokens.device)
        log.warning("prefill of batch %d x %d tokens ran out of %s memory (%s): dropped %d kept KV cache set(s) "
                    "(%.1f MiB), trying once more", rows, batch.length, batch.tokens.device.type, why, kept,
                    dropped / 2**20)
        if generator is not None:
            generator.manual_seed(sampling.seed)


@torch.inference_mode()
def generate(model: Transformer, request: GenerationRequest, *, steps: EagerSteps = EAGER,
             prefix: PrefixKV | None = None, sync: Callable[[], None] = lambda: None,
             on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """Generate up to ``request.max_new_tokens`` for each of its prompts (token id lists).

    A row stops after its first EOS (the request's, else the model's; kept in its output, as transformers does)
    unless ``ignore_eos``.  ``first_token_ms`` covers the prefill and the choice of the first token; ``step_ms``
    each later decode step (device events on accelerators, read once at the end); ``total_ms`` the whole call,
    less compiling.  ``on_tokens`` (streaming) receives each step's token per row (-1 for a finished row).
    ``steps`` runs the prefill and decode steps (eager, or compiled by ``--compile on``).  ``prefix``: every
    prompt starts with ``prefix.ids``, whose keys and values are copied into each row's cache; only the rest of
    each prompt is prefilled.  Where the prefill's bound exceeds the free memory, the KV sets the pool keeps
    beside the one in use are dropped before it starts (and see :func:`_timed_prefill`).
    """
    call_start = time.perf_counter()
    device, args, new_tokens = model.lm_head.weight.device, model.args, request.max_new_tokens
    validate_prompts(request.prompts, new_tokens, model.max_seq_len, args.vocab_size)
    prefix = _usable_prefix(model, request.prompts, prefix)
    pad_id = args.pad_token_id if args.pad_token_id is not None else 0
    batch = _Batch.lay_out(model, request.prompts, len(prefix.ids) if prefix else 0, new_tokens, pad_id)
    rows, slots = batch.key_valid.shape
    generator = None
    if not request.sampling.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(request.sampling.seed)
    compile_s = steps.warm(model, rows, slots, sync)  # compiling belongs outside the timed work
    make_room_for_prefill(model, rows, slots)
    clock, started_s, logits, next_ids, warm_s = _timed_prefill(model, steps, batch, prefix, request.sampling,
                                                                generator, sync)
    compile_ms = (compile_s + warm_s) * 1e3
    clock.mark()
    state = DecodeState.after_prefill(batch.key_valid, batch.length - 1, batch.positions[:, -1:])
    eos_ids = () if request.ignore_eos else (args.eos_token_ids if request.eos_ids is None else request.eos_ids)
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=device)
    keep = None if request.logit_ids is None else torch.as_tensor(request.logit_ids, dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else EOS_CHECK_EVERY
    out = torch.full((rows, new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    made = torch.zeros(rows, dtype=torch.long, device=device)  # tokens kept per row
    kept_logits = [] if request.return_logits else None
    for step in range(new_tokens):
        if step > 0:
            state.advance(next_ids)
            logits = steps.decode(model, state)
            next_ids = select_tokens(logits, request.sampling, generator)
            clock.mark()
        live = ~finished
        out[:, step] = torch.where(live, next_ids, out[:, step])
        made += live.long()
        if kept_logits is not None:
            # A copy: a graph backend's next decode step may write over the step's output (decode_step).
            kept_logits.append(logits.clone() if keep is None else logits.index_select(-1, keep))
        if on_tokens is not None:
            on_tokens([int(t) if alive else -1 for t, alive in zip(next_ids.tolist(), live.tolist())])
        if eos.numel():
            finished |= torch.isin(next_ids, eos)
            if step + 1 < new_tokens and (step + 1) % check_every == 0 and bool(finished.all()):
                break
    counts, out_rows = made.tolist(), out.tolist()
    logits_rows = None
    if kept_logits is not None:
        stacked = torch.stack(kept_logits, dim=1).cpu()  # [B, steps, V]
        logits_rows = [stacked[r, : counts[r]] for r in range(rows)]
    sync()
    times = clock.intervals_ms()
    total_ms = (time.perf_counter() - call_start) * 1e3 - compile_ms  # compiling is reported apart
    return GenerationResult([out_rows[r][: counts[r]] for r in range(rows)], times[0], times[1:], logits_rows,
                            total_ms, compile_ms=compile_ms, started_s=started_s)
