"""The precision suite: MMLU and C-Eval 5-shot, the reference procedure (docs/precision.md).

Four separable steps, one module each: read the data (:mod:`.data`), build
the prompt and score the answer (:mod:`.prompt`), aggregate and record
(:mod:`.results`), judge the release gate (:mod:`.gates`); :mod:`.runner`
strings them together as one job (:class:`PrecisionJob`) for every front end.
"""

from .data import Dataset, Question, load_dataset
from .gates import evaluate_gate, identify_model, load_thresholds
from .prompt import build_prompt, fit_prompt, letter_from_text, letter_token_ids
from .runner import PrecisionConfig, PrecisionJob, PrecisionRun

__all__ = [
    "Dataset",
    "PrecisionConfig",
    "PrecisionJob",
    "PrecisionRun",
    "Question",
    "build_prompt",
    "evaluate_gate",
    "fit_prompt",
    "identify_model",
    "letter_from_text",
    "letter_token_ids",
    "load_dataset",
    "load_thresholds",
]
