"""Property: for any model shape and every world size it splits over, the ranks' shares cover each tensor exactly.

Each weight of a random checkpoint holds its own element numbers (1, 2, ...),
so the values a rank loads say which elements it got.  The expected cover is
the rule of sharding.py's docstring, written out by hand: a split tensor is
held once, a norm by every rank, a key/value head by ``world_size / n_kv``
ranks when ranks outnumber heads, vocabulary padding by nobody.  Both load
paths: the uncut directory (each rank slices) and a cut one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vicuna_bench.checkpoint import cut_checkpoint, iter_rank_tensors, read_model_args
from vicuna_bench.sharding import ShardPlan, valid_world_sizes

pytestmark = pytest.mark.unit

MAX_WORLD = 8


@st.composite
def shapes(draw) -> dict:
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4]))
    return {
        "hidden_size": n_heads * head_dim, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": draw(st.sampled_from([8, 12, 16, 24])), "vocab_size": draw(st.integers(9, 40)),
        "num_hidden_layers": 1, "tie_word_embeddings": draw(st.booleans()),
    }


def write_numbered_checkpoint(path: Path, shape: dict) -> dict[str, torch.Tensor]:
    """An uncut HF directory whose tensors hold their global element numbers 1..N (0 is reserved for padding)."""
    h, v, inter = shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    p = "model.layers.0."
    sizes = {
        "model.embed_tokens.weight": (v, h), p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter), "model.norm.weight": (h,),
    }
    if not shape["tie_word_embeddings"]:
        sizes["lm_head.weight"] = (v, h)
    tensors, first = {}, 1
    for name, size in sizes.items():
        n = int(torch.tensor(size).prod())
        tensors[name] = torch.arange(first, first + n, dtype=torch.float32).reshape(size)
        first += n
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 64, **shape}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def expected_holders(name: str, world_size: int, n_kv: int) -> int:
    """How many ranks hold each element of ``name`` (by the rule, not by ShardPlan)."""
    if name.endswith("norm.weight"):
        return world_size
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return max(1, world_size // n_kv)
    return 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes())
def test_rank_shares_cover_every_tensor_exactly(shape, tmp_path_factory):
    root = tmp_path_factory.mktemp("cover")
    full = write_numbered_checkpoint(root / "uncut", shape)
    total = sum(t.numel() for t in full.values())
    args = read_model_args(root / "uncut")
    world_sizes = valid_world_sizes(args, MAX_WORLD)
    assert 1 in world_sizes
    for ws in world_sizes:
        cut = root / f"cut{ws}"
        cut_checkpoint(root / "uncut", cut, ws)
        for source in (root / "uncut", cut):
            counts = torch.zeros(total + 1, dtype=torch.long)  # element number -> ranks holding it
            seen: dict[str, int] = {}
            for rank in range(ws):
                for name, tensor in iter_rank_tensors(source, ShardPlan(args, ws, rank)):
                    ids = tensor.flatten().long()
                    counts.index_add_(0, ids, torch.ones_like(ids))
                    seen[name] = seen.get(name, 0) + 1
            assert set(seen) == set(full) and set(seen.values()) == {ws}, (source.name, seen)
            for name, tensor in full.items():
                got = counts[tensor.flatten().long()]
                want = expected_holders(name, ws, shape["num_key_value_heads"])
                assert bool((got == want).all()), f"{source.name} ws={ws} {name}: held {got.unique().tolist()} times"
