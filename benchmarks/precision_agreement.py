"""Per-question agreement of two precision runs, e.g. ``--prefix-cache on`` against the reference path (``off``).

    python benchmarks/precision_agreement.py REF_DIR OTHER_DIR [--recheck] [--markdown out.md]

Reads both runs' ``answers.jsonl`` and prints, per scoring, the questions
both answered, the agreement rate and every disagreement with its top-two
letter-logit margin.  ``answers.jsonl`` keeps logits to 2 decimals; with
``--recheck`` each disagreeing question is asked again, alone (batch 1),
on both paths (whole prompt; and the subject's shared prefix reused, found
as the runner finds it: the longest common token prefix of the subject's
prompts at that shot count) and the exact letter logits are printed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from vicuna_bench.precision import results as R


def recheck(dis: list, ref_dir: Path, model_path: str | None) -> dict:
    """Exact letter logits of each disagreeing question: {(subject, qid): {"off": {...}, "on": {...}}}."""
    from vicuna_bench import checkpoint
    from vicuna_bench.chat import load_tokenizer
    from vicuna_bench.precision.prompt import encode, letter_token_ids
    from vicuna_bench.precision.runner import common_prefix_len
    from vicuna_bench.runtime import Engine
    from vicuna_bench.spec import ModelChoices, resolve_engine_spec

    spec = resolve_engine_spec(ModelChoices(model_path, 1, "cpu", "fp32", 2048), progress=False)
    tokenizer = load_tokenizer(checkpoint.tokenizer_dir(Path(spec.model_path)))
    letters = letter_token_ids(tokenizer)
    answers = R.read_answers(ref_dir / "answers.jsonl")
    groups = defaultdict(list)
    for (subject, qid), rec in answers.items():
        groups[(subject, rec["shots"])].append(encode(tokenizer, rec["prompt"]))
    out = {}
    with Engine(spec) as engine:
        for d in {(d.subject, d.qid) for d in dis}:
            rec = answers[d]
            ids = encode(tokenizer, rec["prompt"])
            shared = common_prefix_len(groups[(d[0], rec["shots"])])
            row = {}
            for path, prefix_len in (("off", 0), ("on", shared if shared < len(ids) else 0)):
                res = engine.generate([ids], 1, return_logits=True, logit_ids=list(letters.values()),
                                      prefix_len=prefix_len)
                row[path] = {k: float(res.logits[0][0][i]) for i, k in enumerate(letters)}
            out[d] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ref_dir", type=Path)
    p.add_argument("other_dir", type=Path)
    p.add_argument("--recheck", action="store_true")
    p.add_argument("--model-path", default=None)
    p.add_argument("--markdown", type=Path, default=None)
    ns = p.parse_args(argv)
    cmp = R.compare_answers(ns.ref_dir, ns.other_dir)
    lines = [f"# Agreement: {ns.other_dir} against {ns.ref_dir}", ""]
    if cmp["only_ref"] or cmp["only_other"]:
        lines.append(f"Answered by one run only: {len(cmp['only_ref'])} (ref), {len(cmp['only_other'])} (other).")
    lines += ["| scoring | questions | agree | rate | disagreements |", "| --- | --- | --- | --- | --- |"]
    everything = []
    for scoring, s in cmp["scorings"].items():
        lines.append(f"| {scoring} | {s['questions']} | {s['agree']} | {s['rate']:.4%} | {len(s['disagreements'])} |")
        everything += s["disagreements"]
    exact = recheck(everything, ns.ref_dir, ns.model_path) if ns.recheck and everything else {}
    if everything:
        lines += ["", "| subject | id | scoring | truth | ref | other | ref top-two margin (stored) | exact margin off / on |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d in everything:
            stored = f"{R.top_two_margin(d.ref_logits):.2f}" if d.ref_logits else "-"
            e = exact.get((d.subject, d.qid))
            ex = f"{R.top_two_margin(e['off']):.2e} / {R.top_two_margin(e['on']):.2e}" if e else "-"
            lines.append(f"| {d.subject} | {d.qid} | {d.scoring} | {d.truth} | {d.ref_pred} | {d.other_pred} | {stored} | {ex} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.markdown:
        ns.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
