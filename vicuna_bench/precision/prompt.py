"""The reference prompt (the original MMLU format), shot reduction, and the two scorings.

Prompt: ``The following are multiple choice questions (with answers) about ``
(trailing space) + the subject's words each preceded by a space (so two
spaces after "about", as in the original MMLU code) + ``.\\n\\n``, then ``k``
shots ``{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}\\n\\n``,
then the question ending in ``Answer:``.  English scaffolding for C-Eval
too, no chat template, the tokenizer's default special tokens (BOS for a
Llama tokenizer, nothing for SmolLM2's).
"""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..settings import flag
from .data import LETTERS, Question

HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"  # + " word" each: two spaces


def format_subject(subject: str) -> str:
    """``high_school_physics`` -> `` high school physics`` (each word after a space)."""
    return "".join(" " + word for word in subject.split("_"))


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question
    for letter, choice in zip(LETTERS, q.choices):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if with_answer:
        text += f" {q.answer}\n\n"
    return text


def build_prompt(subject: str, shots: list[Question], question: Question) -> str:
    """The reference prompt with ``len(shots)`` worked examples."""
    text = HEADER.format(format_subject(subject))
    for shot in shots:
        text += format_question(shot, with_answer=True)
    return text + format_question(question, with_answer=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's default special tokens (BOS for Llama)."""
    return list(tokenizer(text)["input_ids"])


@dataclasses.dataclass(frozen=True)
class FittedPrompt:
    """A question's prompt: ``shots`` used (0 = none fits) and its ids; ``tokens`` its length."""

    question: Question
    shots: int
    text: str
    ids: list[int]

    @property
    def too_long(self) -> bool:
        return self.shots == 0

    @property
    def tokens(self) -> int:
        return len(self.ids)


def fit_prompt(tokenizer, dev: list[Question], question: Question, shot: int, max_tokens: int) -> FittedPrompt:
    """Try ``shot``, ``shot - 1``, ... 1 dev rows; keep the first prompt of at most ``max_tokens`` tokens.

    When even one shot does not fit the result has ``shots == 0`` and the
    one-shot prompt (so its length can be reported); it is never truncated.
    """
    k = min(shot, len(dev))
    while True:
        text = build_prompt(question.subject, dev[:k], question)
        ids = encode(tokenizer, text)
        if len(ids) <= max_tokens:
            return FittedPrompt(question, k, text, ids)
        if k <= 1:
            return FittedPrompt(question, 0, text, ids)
        k -= 1


def letter_token_ids(tokenizer) -> dict[str, int]:
    """The token the model would write after ``Answer:`` for each letter.

    The shots end ``Answer: C``, so the answer is the letter *with* its
    leading space: ``▁C`` for a Llama (SentencePiece) tokenizer, ``ĠC`` for
    SmolLM2's byte-level BPE.  It is found as the one token that
    ``encode("Answer: C")`` adds to ``encode("Answer:")``; a tokenizer that
    splits it in two cannot be scored this way (UserError).
    """
    base = encode(tokenizer, "Answer:")
    out: dict[str, int] = {}
    for letter in LETTERS:
        ids = encode(tokenizer, f"Answer: {letter}")
        if len(ids) != len(base) + 1 or ids[: len(base)] != base:
            raise UserError(
                f"{flag('precision.scoring')} logits: the tokenizer writes ' {letter}' after 'Answer:' as {ids[len(base):]!r} "
                "(not one token); use --scoring generate"
            )
        out[letter] = ids[-1]
    if len(set(out.values())) != len(LETTERS):
        raise UserError(f"{flag('precision.scoring')} logits: the letters share tokens {out}")
    return out


def letter_from_text(text: str) -> str:
    """First ASCII letter of the generated text, upper-cased; ``-1`` when there is none."""
    for ch in text:
        if ("a" <= ch <= "z") or ("A" <= ch <= "Z"):
            return ch.upper()
    return "-1"


def letter_from_logits(next_token_logits, letter_ids: dict[str, int]) -> tuple[str, dict[str, float]]:
    """The letter whose token has the highest next-token logit (first letter on an exact tie)."""
    values = {letter: float(next_token_logits[tid]) for letter, tid in letter_ids.items()}
    best = max(LETTERS, key=lambda letter: (values[letter], -LETTERS.index(letter)))
    return best, values
