"""What the NPU's GE graph traces instead of SDPA and ``scatter_``: model.attend_explicit and torch_npu's
``scatter_update_`` (npu_graph.graph_attention / graph_write), against the eager model.

References: torch's own ``F.scaled_dot_product_attention`` on k/v repeated
per query head (``repeat_interleave``, not the product's grouped reshape),
in fp32 on the same values; the CANN Scatter op's semantics
(``tests/fake_npu_ops.py``, from hicann/ops-nn); and the eager decode step
of the same tiny model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition

from tests import fake_npu_ops
from vicuna_bench import cpu_kernels, npu_graph
from vicuna_bench.generation import DecodeState, decode_step
from vicuna_bench.model import Attention, KVCache, attend, attend_explicit
from tests.specs import spec_for
from vicuna_bench.runtime import build_rank_model
from vicuna_bench.sharding import TensorParallel

pytestmark = pytest.mark.unit

# (query heads, key/value heads): multi-head, grouped-query (4 per group), multi-query.
HEADS = [(4, 4), (8, 2), (4, 1)]


def _inputs(heads: int, kv_heads: int, steps: int, dtype, seed: int = 0):
    """q [2, H, T, 16], k/v [2, Hkv, 24, 16] and a causal mask with holes: row 1 lost keys 0-2 and 9 (padding)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, steps, 16, generator=g)
    k = torch.randn(2, kv_heads, 24, 16, generator=g)
    v = torch.randn(2, kv_heads, 24, 16, generator=g)
    start = 24 - steps
    causal = torch.arange(24)[None, :] <= torch.arange(start, 24)[:, None]  # [T, L]
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, [0, 1, 2, 9]] = False
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, T, L]
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def _reference(q, k, v, mask):
    """SDPA in fp32 with each key/value head repeated for its query heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask)


@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("steps", [1, 5])
def test_explicit_attention_is_sdpa_in_fp32(heads, kv_heads, steps):
    q, k, v, mask = _inputs(heads, kv_heads, steps, torch.float32)
    out = attend_explicit(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_explicit_attention_in_half_precision_is_close_to_fp32_sdpa(dtype, atol, heads, kv_heads, steps, seed):
    # The scores come out of q @ k^T in the inputs' dtype (as in transformers' eager Llama attention): scores up
    # to ~4 carry an error up to 2 ulps there, 2**-10 * 4 in fp16 and 2**-7 * 4 in bf16, and so does each
    # weight's exp, relatively; outputs of order 1 then err by up to ~2 ulps of theirs on top.
    q, k, v, mask = _inputs(heads, kv_heads, steps, dtype, seed)
    out = attend_explicit(q, k, v, mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference(q, k, v, mask), rtol=0, atol=atol)


def test_a_masked_key_gets_no_weight():
    q, k, v, mask = _inputs(8, 2, 1, torch.float32)
    poisoned = v.clone()
    poisoned[1, :, [0, 1, 2, 9]] = 1e6  # values only a masked key holds
    assert torch.equal(attend_explicit(q, k, poisoned, mask), attend_explicit(q, k, v, mask))


def test_a_row_with_no_key_stays_finite():
    q, k, v, mask = _inputs(4, 4, 1, torch.float32)
    mask[0] = False  # SDPA before torch 2.5 gives NaN here, its _safe_softmax zeros
    out = attend_explicit(q, k, v, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], v[0].mean(dim=1, keepdim=True).expand_as(out[0]))  # equal weights


def test_graph_attention_run_eager_is_sdpa():
    q, k, v, mask = _inputs(8, 2, 5, torch.float32)
    assert torch.equal(npu_graph.graph_attention(q, k, v, mask), attend(q, k, v, mask))


# ---------------------------------------------------------------- the KV write

@pytest.mark.parametrize("slot", [0, 9, 23])
@pytest.mark.parametrize("write", ["write", "scatter_write"])
def test_scatter_update_at_one_slot_is_the_cache_write(slot, write):
    g = torch.Generator().manual_seed(slot)
    ours, theirs = KVCache(3, 2, 24, 16, torch.float16, "cpu"), KVCache(3, 2, 24, 16, torch.float16, "cpu")
    for cache in (ours, theirs):
        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(1)))
        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(2)))
    k, v = (torch.randn(3, 2, 1, 16, generator=g).half() for _ in range(2))
    slots = torch.tensor([slot])
    getattr(ours, write)(slots, k, v)
    fake_npu_ops.scatter_update_reference(theirs.k, slots.expand(3), k, -2)
    fake_npu_ops.scatter_update_reference(theirs.v, slots.expand(3), v, -2)
    assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)
    assert torch.equal(ours.k[:, :, slot], k[:, :, 0])  # and it wrote the slot (by hand)


def test_the_two_writes_store_the_same_slots():
    """A prefill's many slots (not in order) and a decode step's one: index_copy_ and scatter_ agree, and nothing
    outside the slots changes (by hand)."""
    g = torch.Generator().manual_seed(5)
    caches = [KVCache(2, 3, 16, 8, torch.bfloat16, "cpu") for _ in range(2)]
    for slots in (torch.tensor([7, 2, 11]), torch.tensor([15])):
        k, v = (torch.randn(2, 3, len(slots), 8, generator=g).bfloat16() for _ in range(2))
        caches[0].write(slots, k, v)
        caches[1].scatter_write(slots, k, v)
        assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
        assert torch.equal(caches[0].k[:, :, slots], k) and torch.equal(caches[0].v[:, :, slots], v)
    untouched = [s for s in range(16) if s not in (7, 2, 11, 15)]
    assert not caches[0].k[:, :, untouched].any() and not caches[1].v[:, :, untouched].any()


def test_graph_write_run_eager_is_the_scatter_write():
    k, v = torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16)
    ours, theirs = KVCache(3, 2, 24, 16, torch.float32, "cpu"), KVCache(3, 2, 24, 16, torch.float32, "cpu")
    npu_graph.graph_write(ours, torch.tensor([4]), k, v)  # no torch_npu op is called outside a trace
    theirs.scatter_write(torch.tensor([4]), k, v)
    assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)


# ---------------------------------------------------------------- in the decode step

def _model(path):
    spec = spec_for(str(path), 1, "cpu", "fp32", 64)
    return build_rank_model(spec, 0, TensorParallel(), torch.device("cpu"))


def _state(model):
    slots = model.setup_caches(2, 64)
    key_valid = torch.zeros((2, slots), dtype=torch.bool)
    key_valid[0, :6] = True
    key_valid[1, 2:6] = True  # left padding: a hole at the front
    for layer in model.model.layers:  # keys and values a prefill would have written
        g = torch.Generator().manual_seed(7)
        layer.self_attn.cache.k.copy_(torch.randn(layer.self_attn.cache.k.shape, generator=g))
        layer.self_attn.cache.v.copy_(torch.randn(layer.self_attn.cache.v.shape, generator=g))
    state = DecodeState.after_prefill(key_valid, 5, torch.tensor([[5], [3]]))
    state.advance(torch.tensor([11, 12]))
    return state


def test_the_traced_decode_step_with_graph_attention_matches_eager(tiny_models, monkeypatch):
    """Dynamo and aot_autograd (as torchair runs them) trace the explicit attention; the logits are eager SDPA's."""
    monkeypatch.setattr(cpu_kernels, "handles", lambda x: False)
    eager_model, traced_model = _model(tiny_models["gqa"]), _model(tiny_models["gqa"])
    fake_npu_ops.register()
    npu_graph.prepare_for_ge(traced_model)
    attentions = [m for m in traced_model.modules() if isinstance(m, Attention)]
    assert {(m.attend, m.write_kv) for m in attentions} == {(npu_graph.graph_attention, npu_graph.graph_write)}
    graphs = []

    def backend(gm, example_inputs):
        def compiler(fx, inputs):
            graphs.append(fx)
            return fx.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, inference_compiler=compiler,
                                     partition_fn=default_partition, keep_inference_input_mutations=True)

    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            expected = decode_step(eager_model, *_state(eager_model).step_inputs())
            got = torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False)(
                traced_model, *_state(traced_model).step_inputs())
    finally:
        torch._dynamo.reset()
    [graph] = graphs
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "aten._softmax.default" in targets and not any("scaled_dot_product" in t for t in targets)
    assert "npu.scatter_update.default" in targets and "aten.scatter.src" not in targets
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(eager_model.model.layers, traced_model.model.layers):  # the step's cache writes, too
        torch.testing.assert_close(b.self_attn.cache.k, a.self_attn.cache.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.self_attn.cache.v, a.self_attn.cache.v, rtol=1e-5, atol=1e-5)
