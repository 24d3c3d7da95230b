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
import time
from typing import Callable, Sequence

import torch

from .errors import UserError
from .model import Transformer


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
        return logits.argmax(dim=-1)
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


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    sampling: SamplingConfig = SamplingConfig(),
    pad_id: int = 0,
    return_logits: bool = False,
    sync: Callable[[], None] = lambda: None,
    on_tokens: Callable[[list[int]], None] | None = None,
    steps: EagerSteps = EAGER,
    prefix: PrefixKV | None = None,
    logit_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (token id lists).

    A row stops after its first EOS (which is kept in its output, as
    transformers does) unless ``ignore_eos``.  ``first_token_ms`` covers the
    prefill and the choice of the first token; ``step_ms`` each later decode
    step (device events on accelerators, read once at the end).
    ``total_ms`` is the whole call.  ``on_tokens`` (streaming) receives each
    step's token per row.  ``steps`` runs the prefill and decode steps
    (eager, or compiled by ``--compile on``).  ``prefix``: every prompt
    starts with ``prefix.ids``, whose keys and values are copied into each
    row's cache; only the rest of each prompt is prefilled.  ``logit_ids``:
    keep only those vocabulary columns of the returned logits.
    """
    call_start = time.perf_counter()
    device = model.lm_head.weight.device
    validate_prompts(prompts, max_new_tokens, model.max_seq_len, model.args.vocab_size)
    batch = len(prompts)
    shared = 0
    a = model.args
    if prefix is not None and a.rope_type == "dynamic" and max(map(len, prompts)) > a.max_position_embeddings:
        # Dynamic NTK rotates every key by a base that depends on the whole prompt's length: keys computed
        # for the prefix alone would differ.  Such a request is prefilled whole.
        prefix = None
    if prefix is not None:
        shared = len(prefix.ids)
        for i, prompt in enumerate(prompts):
            if len(prompt) <= shared or list(prompt[:shared]) != prefix.ids:
                raise ValueError(f"prompt {i} does not extend the {shared}-token prefix by at least one token")
    # Cache layout per row: [shared prefix | left padding | the rest of the prompt | new tokens].
    rests = [list(p[shared:]) for p in prompts]
    length = shared + max(len(r) for r in rests)
    tokens = torch.full((batch, length - shared), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.bool)
    mask[:, :shared] = True
    for row, rest in enumerate(rests):
        tokens[row, tokens.shape[1] - len(rest) :] = torch.as_tensor(rest, dtype=torch.long)
        mask[row, length - len(rest) :] = True
    tokens = tokens.to(device)
    mask = mask.to(device)
    slots = model.setup_caches(batch, cache_length(length + max_new_tokens, model.max_seq_len))
    key_valid = torch.zeros((batch, slots), dtype=torch.bool, device=device)
    key_valid[:, :length] = mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, shared:]
    keep = None if logit_ids is None else torch.as_tensor(list(logit_ids), dtype=torch.long, device=device)
    eos = torch.as_tensor(list(eos_ids) if not ignore_eos else [], dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else EOS_CHECK_EVERY
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)

    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    made = torch.zeros(batch, dtype=torch.long, device=device)  # tokens kept per row
    kept_logits = [] if return_logits else None

    compile_ms = steps.warm(model, batch, slots, sync) * 1e3  # compiling belongs outside the timed work
    clock = StepClock(device)
    sync()
    clock.mark()
    if prefix is not None:
        model.load_prefix(prefix.kv)
    logits = steps.prefill(model, tokens, positions, key_valid, shared)
    next_ids = select_tokens(logits, sampling, generator)
    clock.mark()
    state = DecodeState.after_prefill(key_valid, length - 1, positions[:, -1:])

    for step in range(max_new_tokens):
        if step > 0:
            state.advance(next_ids)
            logits = steps.decode(model, state)
            next_ids = select_tokens(logits, sampling, generator)
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
            if step + 1 < max_new_tokens and (step + 1) % check_every == 0 and bool(finished.all()):
                break

    counts = made.tolist()
    rows = out.tolist()
    output_ids = [rows[r][: counts[r]] for r in range(batch)]
    logits_rows = None
    if kept_logits is not None:
        stacked = torch.stack(kept_logits, dim=1).cpu()  # [B, steps, V]
        logits_rows = [stacked[r, : counts[r]] for r in range(batch)]
    sync()
    times = clock.intervals_ms()
    total_ms = (time.perf_counter() - call_start) * 1e3 - compile_ms  # compiling is reported apart
    return GenerationResult(output_ids, times[0], times[1:], logits_rows, total_ms, compile_ms=compile_ms)
