"""Small synthetic MMLU / C-Eval work dirs and a scripted engine for the precision tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from vicuna_bench.generation import GenerationResult

# SmolLM2's tokens for " A" .. " D" (read off its tokenizer by hand: "Answer: A" -> [21350, 42, 330]).
SMOLLM2_LETTER_IDS = {"A": 330, "B": 389, "C": 340, "D": 422}


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def mmlu_row(question: str, answer: str) -> list[str]:
    return [question, f"{question} one", f"{question} two", f"{question} three", f"{question} four", answer]


LONG_QUESTION = "long " * 700  # no prompt of at most 300 tokens holds it

# Two ordinary subjects, a hard one, and one question that never fits (--max-prompt-tokens 300).
SYNTHETIC_MMLU = {
    "alpha_studies": {
        "category": "humanities",
        "dev": [mmlu_row(f"alpha shot {i}", "ABCDA"[i]) for i in range(5)],
        "val": [mmlu_row("alpha q0", "A"), mmlu_row("alpha q1", "B"), mmlu_row("alpha q2", "C")],
    },
    "beta_facts": {
        "category": "other",
        "dev": [mmlu_row(f"beta shot {i}", "DCBAD"[i]) for i in range(5)],
        "val": [mmlu_row("beta q0", "D"), mmlu_row(LONG_QUESTION.strip(), "A"), mmlu_row("beta q2", "B")],
    },
    "college_physics": {
        "category": "STEM",
        "dev": [mmlu_row(f"physics shot {i}", "ABCDA"[i]) for i in range(5)],
        "val": [mmlu_row("physics q0", "C"), mmlu_row("physics q1", "A")],
    },
}


def make_synthetic_mmlu(root: Path, subjects: dict = SYNTHETIC_MMLU, mapping: bool = True) -> Path:
    for subject, spec in subjects.items():
        write_csv(root / "data" / "dev" / f"{subject}_dev.csv", spec["dev"])
        write_csv(root / "data" / "val" / f"{subject}_val.csv", spec["val"])
    if mapping:
        doc = {s: {"subcategory": "x", "category": spec["category"]} for s, spec in subjects.items()}
        (root / "subject_mapping.json").write_text(json.dumps(doc))
    return root


CEVAL_DEV_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]  # the C-Eval archive's
CEVAL_VAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer"]


def ceval_row(qid: int, question: str, answer: str, explanation: str | None = None) -> list[str]:
    row = [str(qid), question, f"{question} 甲", f"{question} 乙", f"{question} 丙", f"{question} 丁", answer]
    return row if explanation is None else row + [explanation]


# Two subjects in the C-Eval layout: a header row in every file, an id column, dev rows with an explanation.
SYNTHETIC_CEVAL = {
    "gamma_medicine": {
        "category": "Other",
        "dev": [ceval_row(i, f"gamma shot {i}", "ABCDA"[i], "因为") for i in range(5)],
        "val": [ceval_row(10, "gamma q0", "B"), ceval_row(11, "gamma q1", "D")],
    },
    "delta_law": {
        "category": "Social Science",
        "dev": [ceval_row(i, f"delta shot {i}", "DCBAD"[i], "") for i in range(5)],
        "val": [ceval_row(3, "delta q0", "A")],
    },
}


def make_synthetic_ceval(root: Path, subjects: dict = SYNTHETIC_CEVAL) -> Path:
    """A C-Eval-shaped work dir, with a subject_mapping.json in C-Eval's form (subject -> [en, zh, category])."""
    for subject, spec in subjects.items():
        write_csv(root / "data" / "dev" / f"{subject}_dev.csv", [CEVAL_DEV_HEADER] + spec["dev"])
        write_csv(root / "data" / "val" / f"{subject}_val.csv", [CEVAL_VAL_HEADER] + spec["val"])
    doc = {s: [s.replace("_", " "), s, spec["category"]] for s, spec in subjects.items()}
    (root / "subject_mapping.json").write_text(json.dumps(doc, ensure_ascii=False))
    return root


class ScriptedEngine:
    """Answers by the asked question's text: the test decides every generation and logit.

    ``script[question] = (generated text, letter with the highest logit)``.
    """

    def __init__(self, tokenizer, script: dict[str, tuple[str, str]], vocab: int = 49152):
        self.tokenizer = tokenizer
        self.script = script
        self.vocab = vocab
        self.calls: list[int] = []  # batch sizes

    def generate(self, prompts, max_new_tokens, return_logits=False, logit_ids=None, prefix_len=0, **_):
        self.calls.append(len(prompts))
        outs, logits = [], []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            asked = text.rsplit("\n\n", 1)[-1].split("\nA. ")[0]
            generated, letter = self.script[asked]
            out = self.tokenizer(generated, add_special_tokens=False)["input_ids"][:max_new_tokens]
            outs.append(out)
            row = torch.zeros(len(out), self.vocab)
            row[0, SMOLLM2_LETTER_IDS[letter]] = 5.0
            logits.append(row if logit_ids is None else row[:, list(logit_ids)])  # as the engine returns them
        return GenerationResult(outs, 1.0, [], logits if return_logits else None)

    def close(self):
        pass
