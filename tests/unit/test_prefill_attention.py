"""A prefill's attention on CPU: causal alone where it may be (``mask`` None), SDPA's own grouping elsewhere.

Reference: the attention written out here in float64 (k/v repeated per
query head, scores, a -inf fill, softmax), on the same values; and the
mask the model builds for the general case, checked against its
definition (causal, real keys only).
"""

from __future__ import annotations

import pytest
import torch

from vicuna_bench import model as model_mod
from vicuna_bench.model import _attention_mask, attend, attend_explicit, plain_causal
from tests.specs import spec_for
from tests import tiny
from vicuna_bench.devices import device_for_rank
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

HEADS = [(4, 4), (9, 3), (4, 1)]  # multi-head, SmolLM2's grouping (3 per group), multi-query


def _reference(q, k, v, mask):
    """Float64 attention, k/v repeated per query head; ``mask`` [B|1, 1, T, L] bool, None = causal from slot 0."""
    steps, length = q.shape[2], k.shape[2]
    if mask is None:
        mask = torch.ones(steps, length, dtype=torch.bool).tril()[None, None]
    rep = q.shape[1] // k.shape[1]
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _qkv(heads, kv_heads, batch, steps, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, steps, 16, generator=g), torch.randn(batch, kv_heads, length, 16, generator=g),
            torch.randn(batch, kv_heads, length, 16, generator=g))


@pytest.mark.parametrize("sdpa_gqa", [True, False], ids=["enable_gqa", "grouped-rows"])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_causal_alone_is_the_causal_mask(heads, kv_heads, sdpa_gqa, monkeypatch):
    """``mask`` None on the CPU path (SDPA's is_causal and enable_gqa) and on the path torch < 2.5 and other devices
    take (the product's grouped query rows under the spelled-out mask); and attend_explicit's None."""
    monkeypatch.setattr(model_mod, "_SDPA_GQA", sdpa_gqa and model_mod._SDPA_GQA)
    q, k, v = _qkv(heads, kv_heads, 2, 21, 21)
    ref = _reference(q, k, v, None)
    torch.testing.assert_close(attend(q, k, v, None).double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(attend_explicit(q, k, v, None).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("start", [0, 7])
def test_a_padded_or_offset_prefill_keeps_its_mask(heads, kv_heads, start):
    """Left padding (row 1's first 5 slots) and a prefill after a cached prefix (``start`` 7): the mask's path."""
    steps = 13
    q, k, v = _qkv(heads, kv_heads, 2, steps, start + steps, seed=1)
    key_valid = torch.ones(2, start + steps, dtype=torch.bool)
    key_valid[1, :5] = False
    mask = _attention_mask(key_valid, start, steps)
    out = attend(q, k, v, mask).double()
    # Rows whose query is a padding slot attend only themselves (their output is never read); the others:
    real = torch.arange(start, start + steps) >= 5
    ref = _reference(q, k, v, mask)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1][:, real], ref[1][:, real], rtol=0, atol=1e-5)


def test_the_mask_is_causal_over_real_keys():
    key_valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    mask = _attention_mask(key_valid, 2, 4)[:, 0]  # queries at slots 2..5
    for b in range(2):
        for t in range(4):
            for j in range(6):
                want = (j <= t + 2 and bool(key_valid[b, j])) or j == t + 2
                assert bool(mask[b, t, j]) == want, (b, t, j)


def test_which_prefills_are_causal_alone(monkeypatch):
    tokens = torch.zeros(2, 5, dtype=torch.long)
    full = torch.ones(2, 5, dtype=torch.bool)
    padded = full.clone()
    padded[1, 0] = False
    assert plain_causal(tokens, full, 0) is model_mod._SDPA_GQA
    assert not plain_causal(tokens, padded, 0)
    assert not plain_causal(tokens, full, 3)  # after a cached prefix: the queries start at slot 3
    monkeypatch.setattr(model_mod, "is_compiling", lambda: True)  # a traced graph cannot read key_valid:
    assert not plain_causal(tokens, full, 0)  # two rows keep the mask
    assert plain_causal(tokens[:1], padded[:1], 0) is model_mod._SDPA_GQA  # one row is whole
    assert not plain_causal(tokens[:1], full[:1], 3)


@pytest.mark.skipif(not model_mod._SDPA_GQA, reason="torch < 2.5: the compiled prefill keeps its mask, any row")
def test_the_compiled_prefill_refuses_a_padded_row():
    """Its one-row graph attends causal alone, so a padded row (which no generation makes) is refused, not run."""
    from vicuna_bench.compile import CompiledSteps

    ran = []
    steps = CompiledSteps(lambda *a: ran.append(a) or "logits", None, "a stand-in prefill")
    tokens = torch.zeros(1, 4, dtype=torch.long)
    key_valid = torch.ones(1, 9, dtype=torch.bool)
    key_valid[0, 6:] = False  # slots past the prompt: not the prefill's business
    assert steps.prefill(None, tokens, tokens, key_valid, 0) == "logits"
    key_valid[0, 0] = False
    with pytest.raises(ValueError, match="one-row prefill from slot 0 has padding"):
        steps.prefill(None, tokens, tokens, key_valid, 0)
    assert steps.prefill(None, tokens, tokens, key_valid, 2) == "logits"  # after a prefix: its mask says it all
    assert len(ran) == 2


@pytest.mark.skipif(not model_mod._SDPA_GQA, reason="torch < 2.5: no enable_gqa, every prefill keeps its mask")
def test_an_unpadded_prefill_builds_no_mask(tiny_models, monkeypatch):
    """The model's prefill from slot 0 with every key real attends causal alone (no [B, 1, T, L] mask is built);
    its logits are those of transformers on the same weights (within 1e-4 of their scale)."""
    path = tiny_models["gqa"]
    spec = spec_for(path, 1, "cpu", "fp32", max_seq_len=32)
    model = build_rank_model(spec, 0, TensorParallel(), device_for_rank("cpu", 0))
    model.setup_caches(1)
    built = []
    monkeypatch.setattr(model_mod, "_attention_mask", lambda *a: built.append(a) or _attention_mask(*a))
    prompt = torch.randint(3, tiny.hf_model(path).config.vocab_size, (12,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = model(prompt[None], torch.arange(12)[None], torch.ones(1, 12, dtype=torch.bool), start=0,
                     all_logits=True)[0].float()
    assert built == []
    ref = tiny.hf_prefill_logits(tiny.hf_model(path), prompt.tolist())
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
