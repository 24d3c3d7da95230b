"""A cut made by the vendor's rules (shared/spec/REFERENCE.md, "Weight cutting"), written without our code.

The vendor's ``cut_weight.sh --float N`` loads the Hugging Face model, cuts
``q_proj k_proj v_proj gate_proj up_proj`` along dim 0 and ``o_proj
down_proj`` along dim 1 into N equal contiguous chunks (rank r takes chunk
r), copies the embedding, lm_head and every norm whole, and saves each rank
with ``save_pretrained``: ``part_model/<r>/`` holding ``pytorch_model.bin``
and a ``config.json`` with the full model's values plus ``"world_size": N``.
The tokenizer goes to ``tokenizer/``.  No manifest, no checksums.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # cut along dim 0
ROW_PARALLEL = ("o_proj", "down_proj")  # cut along dim 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def vendor_split(name: str, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s tensor by the vendor's rule: N equal contiguous chunks of the cut dim, else whole."""
    module = name.split(".")[-2] if name.count(".") >= 2 else ""
    if module in COLUMN_PARALLEL or module in ROW_PARALLEL:
        dim = 0 if module in COLUMN_PARALLEL else 1
        assert tensor.shape[dim] % world_size == 0, f"the vendor's tool needs {name} to split {world_size} ways"
        return torch.chunk(tensor, world_size, dim=dim)[rank].clone()
    return tensor.clone()


def make_vendor_cut(source: Path, out: Path, world_size: int) -> Path:
    """Cut the HF model directory ``source`` ``world_size`` ways into ``out`` as the vendor's tool does."""
    from transformers import LlamaForCausalLM

    from tests.tiny import REFERENCE_KWARGS, dtype_kwarg

    model = LlamaForCausalLM.from_pretrained(str(source), **dtype_kwarg(torch.float32), **REFERENCE_KWARGS)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # save_pretrained stores a tied head once, as the embedding
    config = json.loads((source / "config.json").read_text())
    config["world_size"] = world_size
    for rank in range(world_size):
        part = out / "part_model" / str(rank)
        part.mkdir(parents=True)
        torch.save({k: vendor_split(k, v, world_size, rank) for k, v in state.items()}, part / "pytorch_model.bin")
        (part / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (source / "generation_config.json").is_file():
            shutil.copy2(source / "generation_config.json", part / "generation_config.json")
    (out / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / "tokenizer" / name)
    return out
