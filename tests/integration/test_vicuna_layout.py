"""The real target checkpoint, file for file: Vicuna's SentencePiece tokenizer and sharded .bin layout.

The fixture (``vicuna_layout``, conftest.py) is a tiny random model written
exactly as ``lmsys/vicuna-13b-v1.5-16k`` ships: legacy config.json, three
``pytorch_model-0000N-of-00003.bin`` shards with their index, and the
Llama-2 SentencePiece ``tokenizer.model`` (shared/models/llama2-tokenizer)
with no ``tokenizer.json``.  References: the ``sentencepiece`` library
itself, llama.cpp's test vectors for this vocabulary, and transformers'
``generate`` on the same files.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny
from tests.integration.test_cli import assert_one_line_error, vb
from vicuna_bench.chat import load_tokenizer, vicuna_v11_prompt
from vicuna_bench.checkpoint import cut_checkpoint
from vicuna_bench.precision.data import load_dataset
from vicuna_bench.precision.prompt import build_prompt, fit_prompt, letter_token_ids
from tests.specs import spec_for
from vicuna_bench.runtime import Engine

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[3] / "shared"
VECTORS = SHARED / "models" / "llama2-tokenizer"
SEPARATOR = "\n__ggml_vocab_test__\n"


def sentencepiece_ids(text: str) -> list[int]:
    """The reference: the sentencepiece library on the shared tokenizer.model, no BOS."""
    import sentencepiece

    return list(sentencepiece.SentencePieceProcessor(model_file=str(VECTORS / "tokenizer.model")).encode(text))


def test_layout_is_the_real_one(vicuna_layout):
    names = sorted(p.name for p in vicuna_layout.iterdir())
    assert names == [
        "config.json", "generation_config.json",
        "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin",
        "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json",
    ]
    config = json.loads((vicuna_layout / "config.json").read_text())
    assert config["rope_scaling"] == {"factor": 4.0, "type": "linear"} and "rope_theta" not in config
    assert (config["max_position_embeddings"], config["max_sequence_length"]) == (4096, 16384)
    assert config["num_key_value_heads"] == config["num_attention_heads"] and config["vocab_size"] == 32000
    index = json.loads((vicuna_layout / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3


def test_llama_cpp_test_vectors(vicuna_layout):
    """llama.cpp's vectors for this vocabulary, through our tokenizer loading: 47/47 (split as the builder does)."""
    texts = (VECTORS / "test_vectors.inp").read_text(encoding="utf-8").split(SEPARATOR)
    expected = (VECTORS / "test_vectors.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(expected) == 47  # 46 cases + the empty text after the last separator
    tok = load_tokenizer(vicuna_layout)
    wrong = [
        (text, ids, tok(text, add_special_tokens=False)["input_ids"])
        for text, ids in ((t, [int(x) for x in e.split()]) for t, e in zip(texts, expected))
        if tok(text, add_special_tokens=False)["input_ids"] != ids
    ]
    assert wrong == []
    # The case transformers' converted tokenizer gets wrong, and BOS added by default (config: add_bos_token).
    assert tok(" Hello world")["input_ids"] == [1, 29871, 15043, 3186]
    assert tok("Hello world")["input_ids"] == [1, 15043, 3186]


def test_which_tokenizer_is_logged(vicuna_layout, caplog):
    with caplog.at_level("INFO", logger="vicuna_bench"):
        load_tokenizer(vicuna_layout)
    assert any("tokenizer: SentencePiece" in r.message and "BOS added, EOS not added" in r.message for r in caplog.records)


def test_decode_drops_bos_and_eos(vicuna_layout):
    tok = load_tokenizer(vicuna_layout)
    assert tok.decode([1, 15043, 3186, 2], skip_special_tokens=True) == "Hello world"
    assert tok.decode([1, 15043, 3186, 2]) == "<s>Hello world</s>"


@pytest.mark.parametrize("mode", ["mmlu", "ceval"])
def test_precision_prompt_ids_are_sentencepiece_ids(vicuna_layout, mode):
    """First val question of every subject: ids = [1] + sentencepiece, shots by the 2,000-token rule."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(VECTORS / "tokenizer.model"))
    tok = load_tokenizer(vicuna_layout)
    dataset = load_dataset(mode, SHARED / "datasets" / mode)
    questions = dataset.questions(None, 1)
    assert len(questions) == {"mmlu": 57, "ceval": 52}[mode]
    reduced = []
    for q in questions:
        fitted = fit_prompt(tok, dataset.dev[q.subject], q, 5, 2000)
        assert fitted.ids == [1] + sp.encode(fitted.text), q.subject
        lengths = {k: 1 + len(sp.encode(build_prompt(q.subject, dataset.dev[q.subject][:k], q))) for k in range(1, 6)}
        expected_shots = max([k for k, n in lengths.items() if n <= 2000], default=0)
        assert fitted.shots == expected_shots, (q.subject, lengths)
        if fitted.shots < 5:
            reduced.append(q.subject)
    # Checked by hand with sentencepiece when this was written: these subjects' first prompts exceed 2,000 tokens.
    assert reduced == {"mmlu": ["high_school_european_history", "high_school_us_history"],
                       "ceval": ["high_school_chinese", "logic"]}[mode]
    assert letter_token_ids(tok) == {"A": 319, "B": 350, "C": 315, "D": 360}


def test_missing_sentencepiece_exits_2_naming_it(vicuna_layout, monkeypatch, capsys):
    from vicuna_bench import cli

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece -> ImportError
    assert cli.main(["run", "--model-path", str(vicuna_layout), "--prompt", "Hello"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "`sentencepiece`" in errors[0] and "tokenizer.model" in errors[0], errors
    assert "tiktoken" not in errors[0]


def test_missing_tokenizer_model_names_the_file(vicuna_layout, tmp_path):
    broken = tmp_path / "no-spm"
    shutil.copytree(vicuna_layout, broken)
    (broken / "tokenizer.model").unlink()
    proc = vb("run", "--model-path", str(broken), "--prompt", "Hello")
    assert_one_line_error(proc, str(broken), "tokenizer.model")


def test_a_tiktoken_file_is_not_taken_for_sentencepiece(vicuna_layout, tmp_path):
    other = tmp_path / "llama3-like"
    shutil.copytree(vicuna_layout, other)
    (other / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # the tiktoken format Llama-3 ships
    proc = vb("run", "--model-path", str(other), "--prompt", "Hello")
    assert_one_line_error(proc, str(other / "tokenizer.model"), "not a SentencePiece model")


# ------------------------------------------------------------------ the engine on the real layout

def _hf_reference(path: Path, prompt: list[int], steps: int, eos: bool):
    model = tiny.hf_model(path)
    if not eos:
        return tiny.hf_greedy(model, prompt, steps)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist(), None


def test_cut_two_ways_gives_the_uncut_logits(vicuna_layout, tmp_path):
    cut = tmp_path / "vicuna_parallel_2"
    cut_checkpoint(vicuna_layout, cut, 2, progress=False)
    assert (cut / "tokenizer" / "tokenizer.model").read_bytes() == (vicuna_layout / "tokenizer.model").read_bytes()
    prompt = load_tokenizer(cut / "tokenizer")("USER: Hello ASSISTANT:")["input_ids"]
    assert prompt == [1] + sentencepiece_ids("USER: Hello ASSISTANT:")
    ref_tokens, ref_logits = _hf_reference(vicuna_layout, prompt, 4, eos=False)
    results = {}
    for name, path, ws in (("uncut-1", vicuna_layout, 1), ("uncut-2", vicuna_layout, 2), ("cut-2", cut, 2)):
        with Engine(spec_for(str(path), ws, "cpu", "fp32")) as engine:
            res = engine.generate([prompt], 4, ignore_eos=True, return_logits=True)
        results[name] = res
        assert res.output_ids[0] == ref_tokens, name
        scale = ref_logits.abs().max()
        assert (res.logits[0] - ref_logits).abs().max() <= 1e-4 * scale, name
    assert torch.equal(results["cut-2"].logits[0], results["uncut-2"].logits[0])


@pytest.fixture(scope="module")
def vicuna_says_eos(vicuna_layout, tmp_path_factory):
    """The fixture with the head's ``</s>`` row made to win within three steps of the Vicuna prompt "Hello".

    Row 2 becomes 1.5x the row of the token greedy decoding picks at step 2, so
    by step 2 at the latest ``</s>`` has the highest logit.
    """
    path = tmp_path_factory.mktemp("eos") / "vicuna-13b-v1.5-16k"
    shutil.copytree(vicuna_layout, path)
    prompt = [1] + sentencepiece_ids(vicuna_v11_prompt("Hello"))
    tokens, _ = _hf_reference(path, prompt, 3, eos=False)
    shard = path / "pytorch_model-00003-of-00003.bin"
    state = torch.load(shard, weights_only=True)
    head = state["lm_head.weight"]
    head[2] = head[tokens[2]].float().mul(1.5).to(head.dtype)
    torch.save(state, shard)
    return path


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_vicuna_prompt_stops_at_eos(vicuna_says_eos, world_size, tmp_path):
    text_prompt = vicuna_v11_prompt("Hello")
    assert text_prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hello ASSISTANT:"
    )
    expected_prompt = [1] + sentencepiece_ids(text_prompt)
    model = vicuna_says_eos
    if world_size == 2:  # the vendor path: cut first, run the cut directory
        model = tmp_path / "vicuna_parallel_2"
        assert vb("cut", "--input-dir", str(vicuna_says_eos), "--output-dir", str(model), "--world-size", "2").returncode == 0
    proc = vb("run", "--model-path", str(model), "--world-size", str(world_size), "--prompt", "Hello",
              "--max-new-tokens", "8", "--json", "--dtype", "fp32")  # the reference is transformers in fp32
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer: SentencePiece" in proc.stderr
    out = json.loads(proc.stdout)["outputs"][0]
    assert out["prompt_ids"] == expected_prompt
    ref, _ = _hf_reference(vicuna_says_eos, expected_prompt, 8, eos=True)
    assert ref[-1] == 2 and len(ref) <= 3
    assert out["output_ids"] == ref
    assert "</s>" not in out["text"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_perf_on_the_real_layout(vicuna_layout, world_size, tmp_path):
    proc = vb("perf", "--model-path", str(vicuna_layout), "--world-size", str(world_size), "--case-pair", "[[64,4]]",
              "--output-dir", str(tmp_path), "--no-progress", "--mem-bandwidth", "30")
    assert proc.returncode == 0, proc.stderr
    [csv_path] = [p for p in tmp_path.glob("performance_test_vicuna-13b-v1.5-16k_*_bs1.csv")]
    rows = list(csv.reader(csv_path.open()))
    assert len(rows) == 2 and rows[1][:3] == ["1", "64", "4"], rows


@pytest.mark.parametrize("world_size, mode", [(1, "mmlu"), (2, "ceval")])
def test_precision_on_the_real_layout(vicuna_layout, world_size, mode, tmp_path):
    subjects = {"mmlu": "abstract_algebra,high_school_european_history", "ceval": "logic,marxism"}[mode]
    proc = vb("precision", "--mode", mode, "--work-dir", str(SHARED / "datasets" / mode), "--model-path",
              str(vicuna_layout), "--world-size", str(world_size), "--subjects", subjects, "--limit-per-subject", "1",
              "--scoring", "both", "--output-dir", str(tmp_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["questions"]["answered"] == 2, summary["questions"]
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    shots = {r["task"]: r["shots"] for r in records}
    assert shots == {"mmlu": {"abstract_algebra": 5, "high_school_european_history": 2},
                     "ceval": {"logic": 4, "marxism": 5}}[mode]


def test_a_sentencepiece_chat_template_renders_with_special_token_ids(vicuna_layout, tmp_path):
    """A Llama-2-chat style template: the rendered ``<s>`` is id 1, the text around it SentencePiece's ids."""
    from vicuna_bench.chat import encode_prompt

    chat = tmp_path / "chat"
    shutil.copytree(vicuna_layout, chat)
    conf = json.loads((chat / "tokenizer_config.json").read_text())
    conf["chat_template"] = "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (chat / "tokenizer_config.json").write_text(json.dumps(conf))
    ids = encode_prompt(load_tokenizer(chat), "Hello")
    assert ids == [1] + sentencepiece_ids("[INST] Hello [/INST]")
    assert ids[:3] == [1, 518, 25580]  # "▁[", "INST" (Meta's chat code: [1] + encode("[INST] ..."))
