"""config.json in both dialects, the usable context, and the split rule's arithmetic."""

from __future__ import annotations

import pytest

from vicuna_bench.config import ModelArgs, resolve_max_seq_len
from vicuna_bench.errors import UserError
from vicuna_bench.sharding import ShardPlan, valid_world_sizes

pytestmark = pytest.mark.unit

# config.json as lmsys/vicuna-13b-v1.5-16k ships it (older dialect)
VICUNA_16K = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 13824, "max_position_embeddings": 4096,
    "max_sequence_length": 16384, "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 40, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 4.0, "type": "linear"}, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 32000,
}


def test_vicuna_16k_legacy_dialect():
    a = ModelArgs.from_dict(VICUNA_16K)
    assert (a.rope_type, a.rope_factor, a.rope_theta) == ("linear", 4.0, 10000.0)
    assert a.context_len == 16384  # 4096 x 4, not max_position_embeddings
    assert (a.n_heads, a.n_kv_heads, a.head_dim) == (40, 40, 128)
    assert a.torch_dtype == "float16" and a.eos_token_ids == (2,)


def test_transformers5_dialect_reads_the_same():
    cfg = dict(VICUNA_16K)
    del cfg["rope_scaling"], cfg["max_sequence_length"]
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    a, b = ModelArgs.from_dict(cfg), ModelArgs.from_dict(VICUNA_16K)
    assert (a.rope_type, a.rope_factor, a.rope_theta, a.context_len) == (b.rope_type, b.rope_factor, b.rope_theta, b.context_len)


def test_vicuna_13b_on_8_ranks():
    plan = ShardPlan(ModelArgs.from_dict(VICUNA_16K), 8, 3)
    assert (plan.local_heads, plan.local_kv_heads, plan.local_intermediate) == (5, 5, 1728)
    assert plan.slice_of("model.layers.0.self_attn.q_proj.weight") == (0, 3 * 640, 4 * 640)
    assert plan.slice_of("model.layers.0.self_attn.o_proj.weight") == (1, 3 * 640, 4 * 640)
    assert plan.slice_of("model.layers.0.mlp.down_proj.weight") == (1, 3 * 1728, 4 * 1728)
    assert plan.slice_of("lm_head.weight") == (0, 12000, 16000)
    assert plan.slice_of("model.norm.weight") is None
    # 40 heads, 13824 = 2^9 * 27 intermediate features
    assert valid_world_sizes(ModelArgs.from_dict(VICUNA_16K), 16) == [1, 2, 4, 8]


def test_smollm2_world_sizes():
    smol = dict(VICUNA_16K, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                vocab_size=49152, rope_scaling=None, head_dim=64)
    assert valid_world_sizes(ModelArgs.from_dict(smol), 64) == [1, 3]
    with pytest.raises(UserError, match=r"intermediate_size=1536 is not divisible by world size 9.*work: 1, 3"):
        ShardPlan(ModelArgs.from_dict(smol), 9, 0)


def test_kv_replication_and_vocab_padding():
    a = ModelArgs.from_dict(dict(VICUNA_16K, num_key_value_heads=2, vocab_size=32001))
    plans = [ShardPlan(a, 8, r) for r in range(8)]
    assert [p.kv_replicas for p in plans] == [4] * 8
    # ranks 0-3 hold kv head 0, ranks 4-7 head 1 (128 features each)
    assert [p.slice_of("model.layers.0.self_attn.k_proj.weight")[1] for p in plans] == [0] * 4 + [128] * 4
    assert plans[0].padded_vocab == 32008 and plans[0].local_vocab == 4001
    assert plans[7].slice_of("model.embed_tokens.weight") == (0, 28007, 32001)  # 3994 real rows + 7 padding


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"num_key_value_heads": 7}, "not a multiple of num_key_value_heads 7"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(UserError, match=message):
        ModelArgs.from_dict(dict(VICUNA_16K, **change))


def test_missing_key_is_named():
    cfg = dict(VICUNA_16K)
    del cfg["num_hidden_layers"]
    with pytest.raises(UserError, match="'num_hidden_layers' is missing"):
        ModelArgs.from_dict(cfg)


def test_max_seq_length_is_read_once_by_the_settings_tables_environment_layer(monkeypatch):
    import inspect

    from vicuna_bench import config, settings

    args = ModelArgs.from_dict(VICUNA_16K)  # context 4096 x 4 = 16384 tokens
    monkeypatch.setenv("MAX_SEQ_LENGTH", "16512")
    # The model layer takes what the front end resolved; unasked, the CLI contract's 2048 (below the context).
    assert resolve_max_seq_len(None, args) == 2048
    assert resolve_max_seq_len(16512, args) == 16512  # explicit: not capped at the context
    short = ModelArgs.from_dict(dict(VICUNA_16K, max_position_embeddings=256, max_sequence_length=None,
                                     rope_scaling=None))
    assert resolve_max_seq_len(None, short) == 256  # the default capped at a 256-token context
    assert "os.environ" not in inspect.getsource(config) and "getenv" not in inspect.getsource(config)
    model = settings.select(("model",))
    assert settings.from_environment(model, {"MAX_SEQ_LENGTH": "16512"}) == {"max_seq_len": 16512}
    with pytest.raises(UserError, match=r"\$MAX_SEQ_LENGTH = 'lots' is not an int"):
        settings.from_environment(model, {"MAX_SEQ_LENGTH": "lots"})


def test_ranks_past_a_tiny_vocabulary_hold_padding_only():
    import torch

    a = ModelArgs.from_dict(dict(VICUNA_16K, vocab_size=5))
    full = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    rows = []
    for r in range(8):
        plan = ShardPlan(a, 8, r)
        spec = plan.slice_of("model.embed_tokens.weight")
        assert spec[1] <= spec[2]
        part = plan.take("model.embed_tokens.weight", lambda s: full[s[1] : s[2]])
        assert part.shape == (1, 3)
        rows.append(part)
    assert torch.equal(torch.cat(rows)[:5], full) and not torch.cat(rows)[5:].any()
