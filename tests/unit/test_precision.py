"""Precision suite, step by step: reading, prompts, letter scoring, result files, resume, gates.

Expected values are written by hand (prompt strings, cache rows, accuracies)
or come from independent code (pandas' csv parser, a bisection for the
Wilson interval); none is computed by the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from tests.records import drop_measured_rates
from tests.unit.precision_fixtures import (
    SMOLLM2_LETTER_IDS,
    ScriptedEngine,
    make_synthetic_mmlu,
    write_csv,
)
from vicuna_bench.chat import load_tokenizer
from vicuna_bench.errors import UserError
from vicuna_bench.precision import gates
from vicuna_bench.precision.data import load_dataset, read_split_csv
from vicuna_bench.precision.prompt import (
    fit_prompt,
    letter_from_logits,
    letter_from_text,
    letter_token_ids,
)
from vicuna_bench.drivers import run_jobs
from vicuna_bench.precision.runner import PrecisionConfig, PrecisionJob
from vicuna_bench.runtime import EngineSpec

pytestmark = pytest.mark.unit

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not (SHARED / "mmlu" / "data").is_dir(), reason="no ../shared/datasets beside the checkout")


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


def ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


# ------------------------------------------------------------------ prompts, byte for byte

WORLD_HISTORY_DEV = [
    ["Who came first?", "Ann", "Bob", "Cy", "Di", "B"],
    ['Which, "quoted" one?', "0", "4", "x, y", "line1\nline2", "D"],
    ["Third shot", "t1", "t2", "t3", "t4", "A"],
    ["Fourth shot", "f1", "f2", "f3", "f4", "C"],
    ["Fifth shot", "v1", "v2", "v3", "v4", "B"],
]

EXPECTED_WORLD_HISTORY_2_SHOTS = (
    "The following are multiple choice questions (with answers) about  world history.\n\n"
    "Who came first?\nA. Ann\nB. Bob\nC. Cy\nD. Di\nAnswer: B\n\n"
    'Which, "quoted" one?\nA. 0\nB. 4\nC. x, y\nD. line1\nline2\nAnswer: D\n\n'
    "The question?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
)

EXPECTED_WORLD_HISTORY_5_SHOTS = (
    "The following are multiple choice questions (with answers) about  world history.\n\n"
    "Who came first?\nA. Ann\nB. Bob\nC. Cy\nD. Di\nAnswer: B\n\n"
    'Which, "quoted" one?\nA. 0\nB. 4\nC. x, y\nD. line1\nline2\nAnswer: D\n\n'
    "Third shot\nA. t1\nB. t2\nC. t3\nD. t4\nAnswer: A\n\n"
    "Fourth shot\nA. f1\nB. f2\nC. f3\nD. f4\nAnswer: C\n\n"
    "Fifth shot\nA. v1\nB. v2\nC. v3\nD. v4\nAnswer: B\n\n"
    "The question?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
)


def test_mmlu_prompt_byte_for_byte_with_shot_reduction(tmp_path, smol_tokenizer):
    write_csv(tmp_path / "data" / "dev" / "world_history_dev.csv", WORLD_HISTORY_DEV)
    write_csv(tmp_path / "data" / "val" / "world_history_val.csv", [["The question?", "a", "b", "c", "d", "C"]])
    (tmp_path / "subject_mapping.json").write_text(json.dumps({"world_history": {"category": "humanities"}}))
    ds = load_dataset("mmlu", tmp_path)
    q = ds.val["world_history"][0]

    full = fit_prompt(smol_tokenizer, ds.dev["world_history"], q, 5, 10_000)
    assert (full.shots, full.text) == (5, EXPECTED_WORLD_HISTORY_5_SHOTS)
    assert full.ids == smol_tokenizer(EXPECTED_WORLD_HISTORY_5_SHOTS)["input_ids"]

    budget = ntok(smol_tokenizer, EXPECTED_WORLD_HISTORY_2_SHOTS)  # 5, 4, 3 shots are longer; 2 fit exactly
    two = fit_prompt(smol_tokenizer, ds.dev["world_history"], q, 5, budget)
    assert (two.shots, two.text, two.tokens) == (2, EXPECTED_WORLD_HISTORY_2_SHOTS, budget)

    never = fit_prompt(smol_tokenizer, ds.dev["world_history"], q, 5, 10)
    assert never.too_long and never.shots == 0  # reported, never truncated


def test_ceval_prompt_byte_for_byte_drops_id_and_explanation(tmp_path, smol_tokenizer):
    write_csv(tmp_path / "data" / "dev" / "basic_medicine_dev.csv", [
        ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
        ["0", "甲是____", "一", "二", "三", "四", "B", "因为，\n所以"],
        ["1", "乙是____", "五", "六", "七", "八", "C", ""],
    ])
    write_csv(tmp_path / "data" / "val" / "basic_medicine_val.csv", [
        ["id", "question", "A", "B", "C", "D", "answer"],
        ["7", "丙是____", "$IP_3$", "0", "4", "胰岛素", "D"],
    ])
    ds = load_dataset("ceval", tmp_path)  # categories: the packaged C-Eval mapping
    q = ds.val["basic_medicine"][0]
    assert (q.qid, ds.categories["basic_medicine"]) == ("7", "Other")
    expected_2 = (
        "The following are multiple choice questions (with answers) about  basic medicine.\n\n"
        "甲是____\nA. 一\nB. 二\nC. 三\nD. 四\nAnswer: B\n\n"
        "乙是____\nA. 五\nB. 六\nC. 七\nD. 八\nAnswer: C\n\n"
        "丙是____\nA. $IP_3$\nB. 0\nC. 4\nD. 胰岛素\nAnswer:"
    )
    expected_1 = (
        "The following are multiple choice questions (with answers) about  basic medicine.\n\n"
        "甲是____\nA. 一\nB. 二\nC. 三\nD. 四\nAnswer: B\n\n"
        "丙是____\nA. $IP_3$\nB. 0\nC. 4\nD. 胰岛素\nAnswer:"
    )
    # 5 shots asked, the dev file has 2: all of them when they fit.
    assert fit_prompt(smol_tokenizer, ds.dev["basic_medicine"], q, 5, 10_000).text == expected_2
    one = fit_prompt(smol_tokenizer, ds.dev["basic_medicine"], q, 5, ntok(smol_tokenizer, expected_1))
    assert (one.shots, one.text) == (1, expected_1)


@needs_shared
def test_real_rows_prompt_mmlu_and_ceval(smol_tokenizer):
    mmlu = load_dataset("mmlu", SHARED / "mmlu")
    q = mmlu.val["abstract_algebra"][0]
    expected = (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "The cyclic subgroup of Z_24 generated by 18 has order\nA. 4\nB. 8\nC. 12\nD. 6\nAnswer:"
    )
    got = fit_prompt(smol_tokenizer, mmlu.dev["abstract_algebra"], q, 5, ntok(smol_tokenizer, expected))
    assert (got.shots, got.text) == (1, expected)

    ceval = load_dataset("ceval", SHARED / "ceval")
    q = ceval.val["basic_medicine"][0]
    expected = (
        "The following are multiple choice questions (with answers) about  basic medicine.\n\n"
        "下列选项中，符合原癌基因概念的是____\nA. 是正常基因\nB. 是细胞癌基因\nC. 是肿瘤抑制基因\nD. 凋亡调节基因\nAnswer: A\n\n"
        "不属于第二信使的物质是____\nA. cAMP\nB. cGMP\nC. $IP_3$\nD. 胰岛素\nAnswer:"
    )
    got = fit_prompt(smol_tokenizer, ceval.dev["basic_medicine"], q, 5, ntok(smol_tokenizer, expected))
    assert (got.shots, got.text, q.qid, q.answer) == (1, expected, "0", "D")


# ------------------------------------------------------------------ reading real rows

@needs_shared
def test_real_rows_keep_commas_quotes_newlines_and_numbers_as_text():
    ds = load_dataset("mmlu", SHARED / "mmlu")
    assert len(ds.subjects) == 57 and sum(len(v) for v in ds.val.values()) == 1542
    assert sum(len(v) for v in ds.dev.values()) == 285
    q = ds.val["abstract_algebra"][0]
    assert (q.question, q.choices, q.answer) == (
        "The cyclic subgroup of Z_24 generated by 18 has order", ("4", "8", "12", "6"), "A")
    shot = ds.dev["abstract_algebra"][1]
    assert shot.question.startswith("Statement 1 | If aH is an element of a factor group, then |aH| divides |a|.")
    assert shot.choices == ("True, True", "False, False", "True, False", "False, True")
    assert ds.dev["abstract_algebra"][0].choices == ("0", "1", "2", "3")
    sec = ds.dev["computer_security"][2]
    assert sec.choices[0] == '"Hacking" ethics so they justify unintended selfish behavior'
    assert sec.choices[1] == "Hacking systems (e.g., during penetration testing) to expose vulnerabilities so they can be fixed, rather than exploited"
    ccs = ds.dev["college_computer_science"][1]
    assert ccs.question.startswith("A certain pipelined RISC machine has 8 general-purpose registers R0, R1, . . . , R7 and supports the following operations.\nADD Rs1, Rs2, Rd Add")
    # Every file, field for field, as pandas reads it with every field as text.
    for split, rows in (("dev", ds.dev), ("val", ds.val)):
        for subject in ds.subjects:
            frame = pd.read_csv(SHARED / "mmlu" / "data" / split / f"{subject}_{split}.csv",
                                header=None, dtype=str, keep_default_na=False)
            ours = [[q.question, *q.choices, q.answer] for q in rows[subject]]
            assert ours == frame.values.tolist(), (split, subject)

    ceval = load_dataset("ceval", SHARED / "ceval")
    assert len(ceval.subjects) == 52 and sum(len(v) for v in ceval.val.values()) == 1346
    prog = next(q for q in ceval.val["college_programming"] if q.qid == "2")
    assert prog.question.startswith("#include<iostream.h>\nclass date\n{\nprivate:\nint day,month,year;")
    assert prog.choices[0] == "10/10/2002 1/10/2002" and prog.answer == "B"
    for subject in ceval.subjects:
        frame = pd.read_csv(SHARED / "ceval" / "data" / "val" / f"{subject}_val.csv", dtype=str, keep_default_na=False)
        assert [[q.qid, q.question, *q.choices, q.answer] for q in ceval.val[subject]] == frame.values.tolist()
    assert ceval.categories["clinical_medicine"] == "Other"


@pytest.mark.parametrize("rows, needle", [
    ([["q", "a", "b", "c", "d", "A"], ["q2", "a", "b", "c", "D"]], "row 2: expected 6 fields, got 5"),
    ([["q", "a", "b", "c", "d", "E"]], "row 1: answer 'E' is not one of A, B, C, D"),
    ([], "no question rows"),
])
def test_read_split_csv_defects(tmp_path, rows, needle):
    path = tmp_path / "x_val.csv"
    write_csv(path, rows)
    with pytest.raises(UserError) as err:
        read_split_csv(path, "mmlu", "val", "x")
    assert str(path) in str(err.value) and needle in str(err.value)


# ------------------------------------------------------------------ scoring a letter

@pytest.mark.parametrize("text, letter", [
    (" C\n", "C"), (" b", "B"), ("\n\nD.", "D"), ("(a)", "A"), ("", "-1"), (" 12", "-1"), ("é x", "X"), ("The", "T"),
])
def test_letter_from_text(text, letter):
    assert letter_from_text(text) == letter


def test_letter_tokens_smollm2_are_the_spaced_letters(smol_tokenizer):
    ids = letter_token_ids(smol_tokenizer)
    assert ids == SMOLLM2_LETTER_IDS
    assert [smol_tokenizer.decode([ids[c]]) for c in "ABCD"] == [" A", " B", " C", " D"]
    assert ids["A"] != smol_tokenizer("A", add_special_tokens=False)["input_ids"][0]  # not the bare letter


def llama_like_tokenizer():
    """A SentencePiece-style (Metaspace + unigram) tokenizer that adds BOS, as Llama-2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁Answer", -1.0), (":", -1.0)]
    pieces += [(f"▁{c}", -1.0) for c in "ABCD"] + [(c, -2.0) for c in "ABCDnswer"] + [("▁", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_letter_tokens_llama_style_are_the_spaced_pieces():
    tok = llama_like_tokenizer()
    vocab = tok.get_vocab()
    assert tok("Answer: A")["input_ids"] == [1, vocab["▁Answer"], vocab[":"], vocab["▁A"]]  # BOS, then ▁A
    assert letter_token_ids(tok) == {c: vocab[f"▁{c}"] for c in "ABCD"}
    assert vocab["▁A"] != vocab["A"]


def test_letter_from_logits_picks_highest_and_reports_values():
    import torch

    row = torch.full((10,), -1.0)
    row[3], row[4], row[5], row[6] = 0.5, 2.5, 2.0, -3.0
    assert letter_from_logits(row, {"A": 3, "B": 4, "C": 5, "D": 6}) == ("B", {"A": 0.5, "B": 2.5, "C": 2.0, "D": -3.0})


# ------------------------------------------------------------------ result files on a synthetic set

# question -> (generated text, letter with the top logit); truths are in SYNTHETIC_MMLU.
SCRIPT = {
    "alpha q0": (" A", "A"),    # truth A: gen right, logits right
    "alpha q1": (" C\n", "B"),  # truth B: gen wrong, logits right
    "alpha q2": (" c", "D"),    # truth C: gen right (upper-cased), logits wrong
    "beta q0": (" D", "D"),     # truth D: both right
    "beta q2": ("\n\n", "B"),   # truth B: no letter -> -1 (wrong), logits right
    "physics q0": (" C", "A"),  # truth C: gen right, logits wrong
    "physics q1": (" B", "A"),  # truth A: gen wrong, logits right
}
EXPECTED_CACHE = (
    "0,alpha_studies,A,A\n1,alpha_studies,B,C\n2,alpha_studies,C,C\n"
    "0,beta_facts,D,D\n2,beta_facts,B,-1\n"
    "0,college_physics,C,C\n1,college_physics,A,B\n"
)
EXPECTED_CACHE_LOGITS = (
    "0,alpha_studies,A,A\n1,alpha_studies,B,B\n2,alpha_studies,C,D\n"
    "0,beta_facts,D,D\n2,beta_facts,B,B\n"
    "0,college_physics,C,A\n1,college_physics,A,A\n"
)


def wilson_by_bisection(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The two p with |k/n - p| = z * sqrt(p (1 - p) / n): the Wilson score interval."""
    phat = k / n

    def f(p):
        return (phat - p) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):
        for _ in range(200):
            mid = (lo + hi) / 2
            if (f(lo) > 0) == (f(mid) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return root(0.0, phat), root(phat, 1.0)


@pytest.fixture()
def synthetic(tmp_path):
    return make_synthetic_mmlu(tmp_path / "work")


def fake_spec(smollm2_path) -> EngineSpec:
    return EngineSpec(str(smollm2_path), 1, "cpu", "fp32", 2048)


def run_scripted(work, out, smollm2_path, tokenizer, **kw) -> tuple[dict, ScriptedEngine]:
    engine = ScriptedEngine(tokenizer, SCRIPT)
    cfg = PrecisionConfig(mode="mmlu", work_dir=work, output_dir=out, max_prompt_tokens=300, progress=False, **kw)
    return run_jobs(fake_spec(smollm2_path), [PrecisionJob(cfg)], engine=engine)[0].summary, engine


def test_result_files_match_hand_computed(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    out = tmp_path / "out"
    summary, engine = run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="both", batch=2)
    assert engine.calls == [2, 1, 2, 2]  # 7 answerable questions, batches of 2 within a subject (3, 2, 2)
    assert (out / "cache.csv").read_text() == EXPECTED_CACHE
    assert (out / "cache_logits.csv").read_text() == EXPECTED_CACHE_LOGITS
    subj = json.loads((out / "result_subject_acc.json").read_text())
    assert list(subj.items()) == [("alpha_studies", 2 / 3), ("beta_facts", 1 / 2), ("college_physics", 1 / 2)]
    classes = json.loads((out / "result_classes_acc.json").read_text())
    # Avg(Hard): college_physics' 1 right of its own 2 (the vendor would divide by all 7).
    assert list(classes.items()) == [("STEM", 1 / 2), ("humanities", 2 / 3), ("other", 1 / 2), ("Avg", 4 / 7), ("Avg(Hard)", 1 / 2)]
    assert json.loads((out / "result_subject_acc_logits.json").read_text()) == {
        "alpha_studies": 2 / 3, "beta_facts": 1.0, "college_physics": 1 / 2}
    assert json.loads((out / "result_classes_acc_logits.json").read_text()) == {
        "STEM": 1 / 2, "humanities": 2 / 3, "other": 1.0, "Avg": 5 / 7, "Avg(Hard)": 1 / 2}

    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    gen, lg = s["results"]["generate"], s["results"]["logits"]
    assert (gen["correct"], gen["total"], gen["micro"], gen["macro"]) == (4, 7, 4 / 7, pytest.approx(5 / 9))
    assert (lg["correct"], lg["total"], lg["micro"], lg["macro"]) == (5, 7, 5 / 7, pytest.approx(13 / 18))
    assert gen["categories"] == {
        "STEM": {"correct": 1, "total": 2, "accuracy": 0.5},
        "humanities": {"correct": 2, "total": 3, "accuracy": 2 / 3},
        "other": {"correct": 1, "total": 2, "accuracy": 0.5},
    }
    assert gen["hard"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert gen["wilson95"] == pytest.approx(wilson_by_bisection(4, 7), abs=1e-9)
    assert lg["wilson95"] == pytest.approx(wilson_by_bisection(5, 7), abs=1e-9)
    assert s["agreement"] == pytest.approx(2 / 7)  # alpha q0 and beta q0 (see SCRIPT)
    assert s["questions"] == {"in_data": 8, "selected": 8, "answered": 7, "too_long": 1}
    assert s["too_long"]["count"] == 1
    assert s["too_long"]["questions"][0]["task"] == "beta_facts" and s["too_long"]["questions"][0]["id"] == "1"
    assert s["too_long"]["questions"][0]["tokens_with_1_shot"] > 300
    assert "excluded from the denominator" in s["too_long"]["policy"]
    assert (s["model"], s["dtype"], s["world_size"], s["scoring"]) == ("SmolLM2-135M-Instruct", "fp32", 1, "both")
    assert s["timing"]["asked_this_run"] == 7 and s["timing"]["questions_per_s"] > 0

    log = (out / "device.log").read_text()
    assert log.count("\n=== ") + log.startswith("=== ") == 8  # 7 answered + 1 too long
    assert "=== too long: beta_facts 1 needs" in log
    assert "=== alpha_studies 1  shots=5" in log and "--- generate: ' C\\n' -> C wrong" in log
    assert "--- logits: A=0.00 B=5.00 C=0.00 D=0.00 -> B correct" in log
    assert "The following are multiple choice questions (with answers) about  alpha studies.\n\nalpha shot 0\n" in log


def test_too_long_counted_as_wrong_when_asked(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    out = tmp_path / "out"
    run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="generate", too_long="wrong")
    assert (out / "cache.csv").read_text() == EXPECTED_CACHE  # the unasked question has no cache row
    assert not (out / "cache_logits.csv").exists()
    classes = json.loads((out / "result_classes_acc.json").read_text())
    assert classes == {"STEM": 1 / 2, "humanities": 2 / 3, "other": 1 / 3, "Avg": 4 / 8, "Avg(Hard)": 1 / 2}
    s = json.loads((out / "summary.json").read_text())
    assert "counted as wrong" in s["too_long"]["policy"] and s["results"]["generate"]["total"] == 8


def test_logits_scoring_alone_writes_reference_names(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    out = tmp_path / "out"
    run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="logits")
    assert (out / "cache.csv").read_text() == EXPECTED_CACHE_LOGITS
    assert json.loads((out / "result_classes_acc.json").read_text())["Avg"] == 5 / 7


# ------------------------------------------------------------------ resume after a crash (in-process)

def strip_timing(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc.pop("timing")
    # Where this invocation's ranks were pinned: none when a resumed run found every answer in the cache.
    doc.pop("cpu_binding")
    # The probes' rates (GFLOP/s) are a measurement too; the dtype, ISA and paths they decided stay compared.
    drop_measured_rates(doc.get("environment") or {})
    return doc


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "summary.json":
            assert strip_timing(a / name) == strip_timing(b / name)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_detail_records_keep_unicode_line_separators(tmp_path):
    # Real data: MMLU nutrition_val.csv holds a U+0085 (NEL); str.splitlines() splits there, and the full
    # MMLU run failed to rebuild its files on that record. Records are split on "\n" only.
    from vicuna_bench.precision import results as R

    texts = ["tea\x85drinkers", "a\u2028b\u2029c", "vt\x0bff\x0cfs\x1cgs\x1drs\x1e", "cr\r\nlf"]
    path = tmp_path / "answers.jsonl"
    records = [{"task": "nutrition", "id": str(i), "prompt": t} for i, t in enumerate(texts)]
    path.write_bytes(b"".join(R.json_text_line(r).encode("utf-8") for r in records) + b'{"task": "nutri')
    got = R.read_answers(path)
    assert [got[("nutrition", str(i))]["prompt"] for i in range(len(texts))] == texts  # the partial line is left out
    if (SHARED / "mmlu" / "data").is_dir():
        val = load_dataset("mmlu", SHARED / "mmlu").val["nutrition"]
        assert any("\x85" in q.question + "".join(q.choices) for q in val)


def test_resume_heals_every_crash_window(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    """The states a kill can leave between the writes of one question, each resumed to the same files."""
    ref = tmp_path / "ref"
    run_scripted(synthetic, ref, smollm2_path, smol_tokenizer, scoring="both")
    answers = (ref / "answers.jsonl").read_text().splitlines(keepends=True)
    cache = (ref / "cache.csv").read_text().splitlines(keepends=True)
    logits = (ref / "cache_logits.csv").read_text().splitlines(keepends=True)
    states = {
        # killed after question 3's details, before its cache rows
        "details only": (answers[:4], logits[:3], cache[:3]),
        # killed after question 3's logits row, before its primary row
        "logits row only": (answers[:4], logits[:4], cache[:3]),
        # killed in the middle of writing lines
        "partial lines": (answers[:2] + [answers[2][:17]], logits[:2] + ["2,alpha_st"], cache[:2] + ["2,al"]),
        # killed after every row, before the final rewrite
        "before finalize": (answers, logits, cache),
        # killed before anything was written
        "empty": ([], [], []),
    }
    for name, (a, lg, c) in states.items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        (out / "answers.jsonl").write_text("".join(a))
        (out / "cache_logits.csv").write_text("".join(lg))
        (out / "cache.csv").write_text("".join(c))
        (out / "device.log").write_text("half a log")
        _, engine = run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="both")
        asked = sum(engine.calls)
        assert asked == 7 - len([line for line in c if line.endswith("\n")]), name
        assert_same_files(ref, out)


def test_rerun_of_a_complete_run_asks_nothing(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    out = tmp_path / "out"
    run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="generate")
    summary, engine = run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="generate")
    assert engine.calls == [] and summary["timing"]["asked_this_run"] == 0
    assert (out / "cache.csv").read_text() == EXPECTED_CACHE


def test_a_fully_cached_set_opens_no_engine(synthetic, tmp_path, smollm2_path, smol_tokenizer, monkeypatch):
    from vicuna_bench import drivers

    out = tmp_path / "out"
    run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="generate")
    cfg = PrecisionConfig(mode="mmlu", work_dir=synthetic, output_dir=out, max_prompt_tokens=300, progress=False,
                          scoring="generate")
    job = PrecisionJob(cfg)
    # 8 questions before the spec is known (--seq-len-out 2 tokens each, batch 1); none left once the cache is read.
    assert (job.work().decode_steps, job.work().needs_engine) == (16, True)
    job.check(fake_spec(smollm2_path))
    assert (job.work().decode_steps, job.work().needs_engine) == (0, False)

    def no_engine(spec, **options):
        raise AssertionError("an engine was opened for a fully cached set")

    monkeypatch.setattr(drivers, "open_engine", no_engine)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    [result] = drivers.run_jobs(fake_spec(smollm2_path), [job])
    assert result.summary["timing"]["asked_this_run"] == 0
    assert (out / "cache.csv").read_text() == EXPECTED_CACHE


def test_resume_with_other_settings_is_refused(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    out = tmp_path / "out"
    run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="generate")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="scoring='generate', this run has 'both'"):
        run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="both")
    with pytest.raises(UserError, match="shot=5, this run has 3"):
        run_scripted(synthetic, out, smollm2_path, smol_tokenizer, scoring="generate", shot=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cache_from_other_data_is_refused(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cache.csv").write_text("0,alpha_studies,A,A\n1,alpha_studies,C,C\n")  # truth of row 1 is B
    with pytest.raises(UserError, match=r"cache.csv row 2: truth 'C' but .*alpha_studies_val.csv row 2 says 'B'"):
        run_scripted(synthetic, out, smollm2_path, smol_tokenizer)
    (out / "cache.csv").write_text("9,alpha_studies,A,A\n")
    with pytest.raises(UserError, match="cache.csv row 1: question '9' of 'alpha_studies' is not in"):
        run_scripted(synthetic, out, smollm2_path, smol_tokenizer)


# ------------------------------------------------------------------ gates

def test_identify_model_by_dir_cut_dir_and_config(tmp_path):
    for path in ("vicuna-13b-v1.5-16k", "Vicuna-13B-v1.5-16k_parallel_8/part_model/0", "SmolLM2-135M-Instruct-98362432"):
        (tmp_path / path).mkdir(parents=True)
    assert gates.identify_model(tmp_path / "vicuna-13b-v1.5-16k") == "vicuna-13b-v1.5-16k"
    assert gates.identify_model(tmp_path / "Vicuna-13B-v1.5-16k_parallel_8") == "vicuna-13b-v1.5-16k"
    assert gates.identify_model(tmp_path / "Vicuna-13B-v1.5-16k_parallel_8/part_model/0") == "vicuna-13b-v1.5-16k"
    assert gates.identify_model(tmp_path / "SmolLM2-135M-Instruct-98362432") == "SmolLM2-135M-Instruct"
    other = tmp_path / "my-model"
    other.mkdir()
    assert gates.identify_model(other) is None
    (other / "config.json").write_text(json.dumps({"_name_or_path": "lmsys/vicuna-13b-v1.5-16k"}))
    assert gates.identify_model(other) == "vicuna-13b-v1.5-16k"
    (tmp_path / "llama-2-13b").mkdir()
    assert gates.identify_model(tmp_path / "llama-2-13b") is None
    assert gates.identify_model(tmp_path / "llama-2-13b", override="vicuna-13b-v1.5-16k") == "vicuna-13b-v1.5-16k"
    with pytest.raises(UserError, match="'nope' is not in thresholds.json"):
        gates.identify_model(other, override="nope")


def test_gate_thresholds_and_tolerance():
    th = gates.load_thresholds()
    assert th["tolerance"] == 1.0
    assert th["models"]["vicuna-13b-v1.5-16k"]["mmlu"]["generate"] == 55.69
    assert th["models"]["vicuna-13b-v1.5-16k"]["ceval"]["generate"] == 40.19
    ev = gates.evaluate_gate
    assert ev("mmlu", "generate", 54.69, "vicuna-13b-v1.5-16k")["status"] == "passed"  # exactly threshold - 1.0
    assert ev("mmlu", "generate", 54.68, "vicuna-13b-v1.5-16k")["status"] == "failed"
    assert ev("ceval", "generate", 39.5, "vicuna-13b-v1.5-16k", tolerance=0.5)["status"] == "failed"
    assert ev("ceval", "generate", 39.5, "vicuna-13b-v1.5-16k", tolerance=0.7)["status"] == "passed"
    unjudged = ev("mmlu", "generate", 10.0, None)  # a run without --gate keeps its scores, judged by nothing
    assert unjudged["status"] == "n/a" and "unknown model" in unjudged["reason"]
    assert ev("mmlu", "logits", 90.0, "vicuna-13b-v1.5-16k")["status"] == "n/a"  # no logits threshold


def test_a_gate_names_its_model_or_is_refused(tmp_path):
    from vicuna_bench import settings

    key = gates.gate_model_key
    smol = tmp_path / "SmolLM2-135M-Instruct"
    smol.mkdir()
    other = tmp_path / "llama-2-13b"
    other.mkdir()
    assert key("ceval", ["generate", "logits"], smol) == "SmolLM2-135M-Instruct"
    assert key("mmlu", ["generate"], other, "vicuna-13b-v1.5-16k") == "vicuna-13b-v1.5-16k"
    with settings.front_end("cli"), pytest.raises(UserError) as err:
        key("mmlu", ["generate"], other)
    assert str(err.value) == (f"mmlu gate: model {other} has no release threshold in thresholds.json (known: "
                              "vicuna-13b-v1.5-16k, SmolLM2-135M-Instruct); name the model whose thresholds judge it "
                              "with --gate-model")
    with settings.front_end("cli"), pytest.raises(
            UserError, match=r"no ceval threshold for vicuna-13b-v1\.5-16k with --scoring 'logits' \(it has: generate\)"):
        key("ceval", ["generate", "logits"], other, "vicuna-13b-v1.5-16k")
    with settings.front_end("pytest"), pytest.raises(UserError) as err:
        key("mmlu", ["logits"], other, "vicuna-13b-v1.5-16k")
    assert "--accuracy-scoring 'logits'" in str(err.value) and str(err.value).endswith("with --accuracy-model")


def test_embedded_model_has_measured_thresholds():
    # The embedded model's gates are its own full val-set scores (docs/precision.md), recorded as percentages so
    # its release gates can judge it: both sets, both scorings, none left null.
    entry = gates.load_thresholds()["models"]["SmolLM2-135M-Instruct"]
    assert "measured" in entry["source"]
    for mode in ("mmlu", "ceval"):
        for scoring in ("generate", "logits"):
            t = entry[mode][scoring]
            assert isinstance(t, float) and 0.0 < t < 100.0, (mode, scoring, t)
            assert gates.evaluate_gate(mode, scoring, t - 1.0, "SmolLM2-135M-Instruct")["status"] == "passed"
            assert gates.evaluate_gate(mode, scoring, t - 1.01, "SmolLM2-135M-Instruct")["status"] == "failed"


def test_gate_failure_raises_with_the_category_table(synthetic, tmp_path, smollm2_path, smol_tokenizer):
    from vicuna_bench.errors import GateFailed

    out = tmp_path / "out"
    bad = {k: (" X", "A") for k in SCRIPT}  # every generated answer wrong
    engine = ScriptedEngine(smol_tokenizer, bad)
    cfg = PrecisionConfig(mode="mmlu", work_dir=synthetic, output_dir=out, max_prompt_tokens=300, progress=False,
                          gate=True, gate_model="vicuna-13b-v1.5-16k")
    with pytest.raises(GateFailed) as err:
        run_jobs(fake_spec(smollm2_path), [PrecisionJob(cfg)], engine=engine)[0].summary
    lines = str(err.value).splitlines()
    assert lines[0] == "mmlu gate failed for vicuna-13b-v1.5-16k: generate 0.00% < 55.69 - 1.0"
    assert any(line.startswith("humanities") and "0.00" in line for line in lines)
    assert any(line.startswith("Avg(Hard)") for line in lines)
    assert json.loads((out / "summary.json").read_text())["gate"]["status"] == "failed"  # files written first


def test_gate_needs_the_full_val_set():
    with pytest.raises(UserError, match="--gate judges the full val set"):
        PrecisionConfig(mode="mmlu", work_dir=".", gate=True, limit_per_subject=2).check()


def test_wilson_interval_values():
    from vicuna_bench.precision.results import wilson_interval

    assert wilson_interval(0, 0) is None
    for k, n in ((0, 10), (10, 10), (857, 1542), (1, 3)):
        assert wilson_interval(k, n) == pytest.approx(wilson_by_bisection(k, n), abs=1e-9)
    assert math.isclose(wilson_interval(50, 100)[0], 0.4038, abs_tol=1e-4)  # textbook value


def test_shared_datasets_found_beside_the_checkout_from_any_folder_in_it(tmp_path):
    # pytest's rootdir can be an option's value (it is chosen before the plugin's options are known), so the
    # default --mmlu-dir / --ceval-dir search also starts from the invocation dir.  Only the checkout's own parent
    # is searched: a shared/datasets further up (say /tmp/shared/datasets) belongs to something else.
    from vicuna_bench.drivers import shared_dataset_dir

    (tmp_path / "shared" / "datasets" / "ceval" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "datasets" / "mmlu").mkdir(parents=True)  # no data/: not a work dir
    checkout = tmp_path / "main"
    (checkout / "tests" / "accuracy").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    expected = tmp_path / "shared" / "datasets" / "ceval"
    assert shared_dataset_dir([checkout], "ceval") == expected
    assert shared_dataset_dir([checkout / "tests" / "accuracy"], "ceval") == expected
    assert shared_dataset_dir([tmp_path / "nowhere" / "out", checkout], "ceval") == expected
    assert shared_dataset_dir([checkout], "mmlu") is None
    # Folders that are no checkout, below a shared/datasets: the search does not walk up to it.
    (tmp_path / "elsewhere" / "deep" / "out").mkdir(parents=True)
    assert shared_dataset_dir([tmp_path / "elsewhere" / "deep" / "out"], "ceval") is None
    # A checkout nested below another folder with shared/datasets finds only its own parent's.
    inner = tmp_path / "work" / "inner-checkout"
    (inner / "tests").mkdir(parents=True)
    (inner / "pyproject.toml").write_text("")
    assert shared_dataset_dir([inner / "tests"], "ceval") is None