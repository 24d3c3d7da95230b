"""Tiny random Llama checkpoints written by transformers (the independent reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VICUNA_SHAPED = dict(  # multi-head attention, rope linear x4 (as Vicuna-13B-v1.5-16k), vocab not a multiple of 8
    hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
    intermediate_size=128, vocab_size=1001, max_position_embeddings=64,
    rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False,
)
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
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5, initializer_range=0.2, **shape)
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
        rope = conf.pop("rope_parameters")
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

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
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
    inner = model.forward

    def forward(tokens, positions, key_valid, start, all_logits=False):
        time.sleep((prefill_s if tokens.shape[1] > 1 else decode_s) * scale)
        return inner(tokens, positions, key_valid, start, all_logits)

    model.forward = forward
    return model
