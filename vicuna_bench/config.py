"""Model hyper-parameters read from a Hugging Face ``config.json``.

Two dialects exist in the wild and both are read here:

* the older one that the real Vicuna-13B-v1.5-16k ships:
  ``"rope_scaling": {"type": "linear", "factor": 4.0}``, no ``rope_theta``
  (so 10000), ``"max_sequence_length": 16384``;
* the one transformers 5 writes: ``"rope_parameters": {"rope_type",
  "factor", "rope_theta"}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .settings import BY_KEY

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama-2-family model (full model, not one rank's share)."""

    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    max_position_embeddings: int = 4096
    context_len: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a parsed config.json; ``source`` names the file in errors."""

        def need(key: str) -> Any:
            if key not in cfg:
                raise UserError(f"{source}: required key {key!r} is missing")
            return cfg[key]

        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise UserError(f"{source}: model_type {model_type!r} is not a Llama-family model (expected 'llama')")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UserError(f"{source}: {key}=true is not supported (Llama-2 has no biases)")
        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        if head_dim * n_heads != hidden and "head_dim" not in cfg:
            raise UserError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {n_heads}")
        if n_heads % n_kv:
            raise UserError(
                f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
            )
        rope_type, factor, theta = _read_rope(cfg, source)
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        context = max_pos
        if rope_type in ("linear", "dynamic"):
            context = int(max_pos * factor)
        context = max(context, int(cfg.get("max_sequence_length") or 0))
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        return cls(
            hidden_size=hidden,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_factor=factor,
            max_position_embeddings=max_pos,
            context_len=context,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=str(dtype) if dtype else None,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelArgs":
        """Read ``path`` (a config.json)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file (a model directory needs config.json)")
        return cls.from_dict(read_json_object(path), source=str(path))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object (config.json, tokenizer_config.json); UserError naming the file otherwise."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object")
    return doc


def _read_rope(cfg: dict[str, Any], source: str) -> tuple[str, float, float]:
    """Return (rope_type, factor, rope_theta) from either config dialect."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = cfg.get("rope_scaling") or {}
        key = "rope_scaling"
    else:
        key = "rope_parameters"
    if not isinstance(params, dict):
        raise UserError(f"{source}: {key} must be an object, got {params!r}")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"{source}: {key}.rope_type {rope_type!r} is not supported (valid: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and factor < 1.0:
        raise UserError(f"{source}: {key}.factor {factor} must be >= 1")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return rope_type, factor, theta


def resolve_max_seq_len(explicit: int | None, args: ModelArgs) -> int:
    """The KV cache length in tokens: ``explicit`` if given, else the settings table's default capped at the
    model's context.

    ``explicit`` is what the front end resolved: ``--max-seq-len``, a config
    file, or ``$MAX_SEQ_LENGTH`` (the table's environment layer, its one
    reader).  Only the unasked-for default is capped; an explicit value above
    the context runs, with a warning (``EngineSpec.validate``), as the vendor's does.
    """
    if explicit is not None:
        return explicit
    return min(default_max_seq_len(), args.context_len)


def default_max_seq_len() -> int:
    """The settings table's ``max-seq-len`` default (tokens)."""
    return BY_KEY["model.max_seq_len"].default
