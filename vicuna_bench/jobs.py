"""What a job is: the work it asks of an engine, the checks it needs the spec for, and its run on an open engine.

A job (:class:`perf.PerfJob`, :class:`sweep.SweepJob`, :class:`precision.PrecisionJob`,
:class:`GenerateJob`) reads its data once, when it is built, and knows from that
the work ahead (:class:`Work`).  :func:`vicuna_bench.drivers.run_jobs` resolves
one engine spec from the jobs' combined work, lets each job check it, opens the
engine once and runs the jobs in order.  This module imports no engine module.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

log = logging.getLogger("vicuna_bench")


@dataclasses.dataclass(frozen=True)
class Work:
    """What one job needs of the engine.

    ``decode_steps``: batched decode steps it makes, warm-up included (what ``--compile auto`` weighs);
    ``longest_prompt``: tokens of its longest prompt; ``new_tokens``: most tokens generated per request;
    ``batch``: rows in its largest request (the fit check sizes the KV cache by it);
    ``needs_engine``: False when the job can finish without a model (e.g. a precision set fully cached).
    """

    decode_steps: int = 0
    longest_prompt: int = 0
    new_tokens: int = 0
    batch: int = 1
    needs_engine: bool = True

    @staticmethod
    def combined(works: Iterable["Work"]) -> "Work":
        """The work of several jobs on one engine: decode steps summed, the rest maxed (no job: no work)."""
        works = list(works)
        if not works:
            return Work(needs_engine=False)
        return Work(
            decode_steps=sum(w.decode_steps for w in works),
            longest_prompt=max(w.longest_prompt for w in works),
            new_tokens=max(w.new_tokens for w in works),
            batch=max(w.batch for w in works),
            needs_engine=any(w.needs_engine for w in works),
        )


@runtime_checkable
class Job(Protocol):
    """One piece of work for an engine; :func:`vicuna_bench.drivers.run_jobs` runs a sequence of them."""

    name: str  # "perf", "sweep", "mmlu", "ceval", "generate"

    def work(self) -> Work:
        """The work ahead, known when the job is built."""

    def check(self, spec) -> None:
        """Refuse (UserError) what the resolved EngineSpec rules out, before the engine opens."""

    def run(self, engine, spec) -> Any:
        """Run on an open engine (None when no job needs one in-process); the typed result."""


@dataclasses.dataclass
class Generated:
    """What :class:`GenerateJob` made: each prompt's ids, output ids and text (None without a tokenizer); ms timings."""

    prompts: list[list[int]]
    output_ids: list[list[int]]
    texts: list[str | None]
    first_token_ms: float
    next_token_ms: float
    rank_info: list[dict]  # the engine's, per rank (cpu binding, environment)
    writer: bool  # False on torchrun ranks other than 0 (they print and write nothing)


class GenerateJob:
    """One batched generation: ``texts`` (encoded by the model's tokenizer) then ``prompt_ids``, ``max_new_tokens`` each.

    The tokenizer is read in :meth:`check` (it needs the resolved model path): a text prompt with no tokenizer
    is refused there, before the engine opens.  ``stream(tokenizer, prompts)`` may return an ``on_tokens``
    callback for the engine (None: no streaming).
    """

    name = "generate"

    def __init__(self, texts: Sequence[str] = (), prompt_ids: Sequence[Sequence[int]] = (), max_new_tokens: int = 32,
                 *, chat: bool = True, ignore_eos: bool = False, sampling=None, stream=None,
                 tokenizer_required: bool = False):
        self.texts = list(texts)
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self.ignore_eos = ignore_eos
        self.sampling = sampling
        self.stream = stream
        self.on_tokens = None  # what ``stream`` returned for the run
        self.tokenizer_required = tokenizer_required  # True: no tokenizer files is an error even for ids
        self.tokenizer = None
        self.prompts: list[list[int]] = []  # every prompt's ids, encoded by check
        self._checked = None

    def work(self) -> Work:
        return Work(decode_steps=self.max_new_tokens, longest_prompt=max(map(len, self.prompt_ids), default=0),
                    new_tokens=self.max_new_tokens, batch=max(len(self.texts) + len(self.prompt_ids), 1))

    def check(self, spec) -> None:
        """Read the tokenizer and encode the text prompts (UserError: text prompts but no tokenizer files)."""
        from pathlib import Path

        from .checkpoint import tokenizer_dir
        from .chat import encode_prompt, load_tokenizer
        from .errors import UserError

        if self.prompts and self._checked is spec:
            return  # read and encoded for this spec already
        folder = tokenizer_dir(Path(spec.model_path))
        self.tokenizer = load_tokenizer(folder, required=self.tokenizer_required)
        if self.tokenizer is None:
            if self.texts or not self.prompt_ids:
                raise UserError(f"{folder}: no tokenizer files, so a text prompt cannot be encoded "
                                "(give token ids with --prompt-ids)")
            log.info("no tokenizer found in %s: token ids only (\"text\": null)", folder)
        self.prompts = [encode_prompt(self.tokenizer, text, chat=self.chat) for text in self.texts] + self.prompt_ids
        self._checked = spec

    def run(self, engine, spec) -> Generated:
        """The generation on ``engine`` (rank 0's tokens; timings in ms, the maximum over ranks)."""
        self.on_tokens = self.stream(self.tokenizer, self.prompts) if self.stream is not None else None
        options = {} if self.sampling is None else {"sampling": self.sampling}
        result = engine.generate(self.prompts, self.max_new_tokens, on_tokens=self.on_tokens, ignore_eos=self.ignore_eos,
                                 **options)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else None
                 for ids in result.output_ids]
        return Generated(self.prompts, [list(o) for o in result.output_ids], texts, result.first_token_ms,
                         result.next_token_ms, list(getattr(engine, "rank_info", None) or []),
                         writer=getattr(engine, "rank", 0) == 0)
