"""Tiny random Llama checkpoints written by transformers (the independent reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VICUNA_SHAPED = dict(  # multi-head attention, rope linear x4 (as Vicuna-13B-v1.5-16k), vocab not a multiple of 8
    hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
    intermediate_size=128, vocab_size=1001, max_position_embeddings=64,
    rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False,
)
# Vicuna-13B-v1.5-16k's context at a tiny size: 4096 positions x linear 4 = 16384 (use with legacy_config=True).
VICUNA_16K_SHAPED = dict(VICUNA_SHAPED, max_position_embeddings=4096)
GQA = dict(  # grouped-query attention, 2 key/value heads (replicated over 4 and 8 ranks), tied embeddings
    hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    intermediate_size=96 + 32, vocab_size=777, max_position_embeddings=256,
    rope_theta=50000.0, tie_word_embeddings=True,
)
DYNAMIC = dict(  # dynamic NTK scaling, exercised past max_position_embeddings
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=500, max_position_embeddings=16,
    rope_scaling={"rope_type": "dynamic", "factor": 4.0}, tie_word_embeddings=False,
)


def _old_stack() -> tuple[bool, bool]:
    """(torch older than 2.1.1, transformers older than 4.56): the compat tier's stack (tox -e compat)."""
    import transformers

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())

    return version(torch.__version__) < (2, 1, 1), version(transformers.__version__) < (4, 56)


# transformers' SDPA path needs torch >= 2.1.1: on torch 2.1.0 the reference runs its eager attention.
REFERENCE_KWARGS = {"attn_implementation": "eager"} if _old_stack()[0] else {}


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype=`` (transformers >= 4.56), ``torch_dtype=`` before."""
    return {"torch_dtype": dtype} if _old_stack()[1] else {"dtype": dtype}


def make_tiny_llama(
    path: Path,
    shape: dict,
    *,
    seed: int = 0,
    fmt: str = "safetensors",
    legacy_config: bool = False,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> Path:
    """Save a random LlamaForCausalLM of ``shape`` to ``path`` and return it.

    ``fmt``: ``safetensors`` (one file), ``sharded`` (safetensors + index) or
    ``bin`` (pytorch_model.bin).  ``legacy_config`` rewrites config.json in
    the older dialect the real Vicuna-16k ships (``rope_scaling``, no
    ``rope_theta``, ``max_sequence_length``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5, initializer_range=0.2,
                      **REFERENCE_KWARGS, **shape)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        model.save_pretrained(str(path), safe_serialization=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, path / "pytorch_model.bin")
        for extra in path.glob("*.safetensors"):
            extra.unlink()
    elif fmt == "sharded":
        model.save_pretrained(str(path), max_shard_size="100KB")
        assert (path / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(str(path))
    if legacy_config:
        conf = json.loads((path / "config.json").read_text())
        rope = conf.pop("rope_parameters", None)
        if rope is None:  # transformers 4.x (the compat tier) writes rope_scaling and rope_theta
            scaling = conf.pop("rope_scaling")
            rope = {"rope_type": scaling.get("rope_type") or scaling["type"], "factor": scaling["factor"],
                    "rope_theta": conf.get("rope_theta", 10000.0)}
        conf.pop("rope_theta", None)
        assert rope["rope_theta"] == 10000.0, "the legacy dialect implies the default base"
        conf["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
        conf["max_sequence_length"] = int(conf["max_position_embeddings"] * rope["factor"])
        conf["torch_dtype"] = conf.pop("dtype", "float32")
        (path / "config.json").write_text(json.dumps(conf, indent=2))
    if tokenizer:
        save_word_tokenizer(path, shape["vocab_size"])
    return path


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``w3 .. w{vocab-1}`` (ids 0..2: unk, BOS, EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.save_pretrained(str(path))


def hf_model(path: Path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), **dtype_kwarg(dtype), **REFERENCE_KWARGS)
    model.eval()
    return model


def hf_greedy(model, prompt: list[int], steps: int):
    """Greedy tokens and per-step logits [steps, vocab] from transformers' ``generate``, EOS ignored."""
    model.generation_config.eos_token_id = None
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack(out.logits, dim=1)[0].float()
    return tokens, logits


def hf_prefill_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def sleepy_model(model, prefill_s: float, decode_s: float, per_rank: float = 0.0):
    """Model hook for the engine: sleep a known time in each prefill and decode forward.

    Rank r sleeps ``(1 + per_rank * r)`` times as long, so the slowest rank is
    known.  Use with ``functools.partial`` (the hook must pickle to reach workers).
    """
    import time

    scale = 1.0 + per_rank * model.tp.rank
    prefill, decode = model.forward, model.decode

    def forward(tokens, positions, key_valid, start, all_logits=False):
        time.sleep((prefill_s if tokens.shape[1] > 1 else decode_s) * scale)
        return prefill(tokens, positions, key_valid, start, all_logits)

    def decode_step(tokens, positions, key_valid, slot):
        time.sleep(decode_s * scale)
        return decode(tokens, positions, key_valid, slot)

    model.forward, model.decode = forward, decode_step
    return model


# ---------------------------------------------------------------- the real Vicuna layout

LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "llama2-tokenizer"

# lmsys/vicuna-13b-v1.5-16k is hidden 5120, 40 layers, 40 heads (no GQA), intermediate 13824 (2.7x hidden),
# vocab 32000; scaled down, keeping the vocabulary, multi-head attention, the MLP ratio and a split 8 ways.
VICUNA_LAYOUT = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8,
    intermediate_size=176, vocab_size=32000,
)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def make_vicuna_layout(path: Path, *, seed: int = 7, tokenizer_model: Path | None = None) -> Path:
    """A tiny random checkpoint laid out file for file as ``lmsys/vicuna-13b-v1.5-16k`` ships.

    ``config.json`` in the older dialect (linear rope x4, no ``rope_theta``,
    4096 native / 16384 positions, float16), ``generation_config.json``, three
    ``pytorch_model-0000N-of-00003.bin`` shards (float16) with their index,
    ``special_tokens_map.json``, ``tokenizer_config.json`` (LlamaTokenizer,
    BOS added, EOS not) and the Llama-2 SentencePiece ``tokenizer.model``.
    No ``tokenizer.json``, no safetensors.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = VICUNA_LAYOUT
    config = {
        "_name_or_path": "vicuna-13b-v1.5-16k",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "max_sequence_length": 16384,
        "model_type": "llama",
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 4.0, "type": "linear"},
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        **shape,
    }
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**shape, "initializer_range": 0.2, "tie_word_embeddings": False,
                                            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                            "max_position_embeddings": 4096}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    # Shard 1: embeddings and the first layer; 2: the middle layers; 3: the last layer, final norm and head.
    last = shape["num_hidden_layers"] - 1

    def shard_of(name: str) -> int:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            return 1 if layer == 0 else 3 if layer == last else 2
        return 1 if name.startswith("model.embed_tokens") else 3

    weight_map, total = {}, 0
    for n in (1, 2, 3):
        fname = f"pytorch_model-0000{n}-of-00003.bin"
        part = {k: v for k, v in state.items() if shard_of(k) == n}
        torch.save(part, path / fname)
        weight_map.update({k: fname for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
                  "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.31.0"}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    special = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "pad_token": "<unk>",
               "unk_token": _added_token("<unk>")}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tok_config = {
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_added_token("<s>")},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_added_token("</s>")},
        "legacy": False, "model_max_length": 16384, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token("<unk>")},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    shutil.copyfile(tokenizer_model or LLAMA2_TOKENIZER / "tokenizer.model", path / "tokenizer.model")
    return path
