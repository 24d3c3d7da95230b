"""The Llama-2-family transformer, in plain PyTorch.

Written for one device.  Tensor parallelism enters in two places only: the
layer sizes are those of this rank's share (see ``sharding.py``), and the
module calls ``tp.all_reduce`` after ``o_proj`` and ``down_proj`` and
``tp`` collectives around the vocabulary-parallel embedding and ``lm_head``.
With ``world_size == 1`` those are no-ops and this is an ordinary model.

Module names mirror Hugging Face's ``LlamaForCausalLM``, except two fused
projections per layer: ``qkv_proj`` (q, k, v rows stacked) and
``gate_up_proj`` (gate, then up rows), one matrix-vector product each in a
decode step.  :meth:`Transformer.checkpoint_targets` maps each checkpoint
tensor name to its rows, which the loader fills in place.  Our CPU kernels are
no part of it: :mod:`vicuna_bench.kernel_pass` swaps them into a built model.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.compiler import is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling

from .config import ModelArgs
from .sharding import ShardPlan, TensorParallel

# SDPA's enable_gqa (torch >= 2.5): groups of query heads over one key/value head, no copy of the caller's k/v.
_SDPA_GQA = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups()) >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as the reference does:
        # fp16/bf16 checkpoints were trained with exactly this rounding.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (``rotate_half`` layout).

    ``linear`` scaling divides positions by the factor; ``dynamic`` (NTK)
    raises the base once the sequence outgrows ``max_position_embeddings``,
    recomputed per forward from the sequence length as transformers does.
    """

    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        self.args = args
        self.max_seq_len = max_seq_len
        # On the CPU whatever device is ambient: a model laid out on meta for loading would otherwise run
        # arange on meta, whose first use imports sympy (~2.5 s and ~70 MB in every rank process).
        inv_freq = self._inv_freq(args.rope_theta, device="cpu")
        if args.rope_type == "linear":
            inv_freq = inv_freq / args.rope_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = self._table(inv_freq, max_seq_len)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _inv_freq(self, base: float, device=None) -> torch.Tensor:
        dim = self.args.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (base**exponents)

    @staticmethod
    def _table(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, dtype=torch.float32, device=inv_freq.device)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, seq_len: int | torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape [B, T, head_dim] for ``positions`` [B, T].

        ``seq_len`` is the longest row's length after this forward: a host
        int (prefill), or a tensor (the static decode step: no host read);
        only dynamic NTK scaling uses it.
        """
        a = self.args
        table = self.cos_table[positions].to(dtype), self.sin_table[positions].to(dtype)
        if a.rope_type != "dynamic":
            return table
        if isinstance(seq_len, int):
            return self._ntk(positions, float(seq_len), dtype) if seq_len > a.max_position_embeddings else table
        ntk = self._ntk(positions, seq_len.float(), dtype)
        beyond = seq_len > a.max_position_embeddings
        return torch.where(beyond, ntk[0], table[0]), torch.where(beyond, ntk[1], table[1])

    def _ntk(self, positions: torch.Tensor, seq_len, dtype: torch.dtype):
        """Dynamic NTK: the base raised for a sequence of ``seq_len`` tokens (as transformers computes it)."""
        a = self.args
        base = a.rope_theta * ((a.rope_factor * seq_len / a.max_position_embeddings) - (a.rope_factor - 1)) ** (
            a.head_dim / (a.head_dim - 2)
        )
        exponents = torch.arange(0, a.head_dim, 2, dtype=torch.int64, device=positions.device).float() / a.head_dim
        inv_freq = 1.0 / (base**exponents) if isinstance(base, float) else 1.0 / (base.reshape(-1)[:1] ** exponents)
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by cos/sin [B, T, D]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


class KVCache(nn.Module):
    """Preallocated keys and values [batch, local kv heads, length, head_dim].

    Written at slot indices held in a tensor, so a decode step has the same
    shapes at every position (capturable).  :meth:`write` is ``index_copy_``,
    which inductor (CPU, CUDA) writes in place.  :meth:`scatter_write` is the
    same write as ``scatter_`` along the length, for torchair's GE graph: it
    converts the ``aten.scatter.src`` that functionalizes to in every
    torch_npu from 2.1.0.post8, where its ``index_copy`` and ``index_put``
    converters only raise NotImplementedError
    (``vicuna_bench/ge_converters.json``).  Inductor does not reinplace
    ``scatter``: it copies the whole cache each layer and step (on CPU,
    SmolLM2 batch 8 over batch 1 went 1.53 -> 1.41 bf16 and 1.61 -> 1.41
    fp32 with ``index_copy_``; docs/PERFORMANCE.md), so the GE pass
    (``npu_graph.prepare_for_ge``) alone takes it, where torch_npu lacks the
    in-place ``scatter_update_`` it prefers.
    """

    def __init__(self, batch: int, n_heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, H, T, D] at cache slots ``slots`` [T]."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)

    def scatter_write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`write` as ``scatter_`` (the spelling torchair's GE graph converts in every wheel)."""
        index = slots.view(1, 1, -1, 1).expand_as(k)  # a stride-0 view: no index tensor the size of k
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCachePool:
    """One set of KV caches (a :class:`KVCache` per layer) per (batch, length) bucket, kept and reused.

    A compiled decode step (a CUDA graph, a torchair graph) holds the cache
    tensors' addresses: new tensors for a shape it has seen mean a
    re-record, a recompile on old torch, or a copy of the whole cache in and
    out of the graph every step (torchair >= 7.1).  So a bucket's set is made
    once and handed back on every later request of that bucket.

    The sets kept are bounded by :meth:`budget_for` (bytes): ``budget_bytes``
    when set, else the smaller of twice the largest set made so far and
    ``room_bytes``, the memory the rank has for KV caches once its weights
    and runtime allowance are counted (set from the fit check; None:
    unknown).  A new set first evicts the least recently used ones until it
    fits; the set in use is kept even when it alone exceeds the budget.
    Twice the largest holds, for one batch size, every shorter power-of-two
    length bucket beside the largest (1/2 + 1/4 + ... < 1), and costs at most
    one largest set more than making each bucket's set anew did.  An
    allocation that runs out of device memory drops every kept set and tries
    once more (the old peak: one set).
    """

    def __init__(self, budget_bytes: int | None = None, room_bytes: int | None = None):
        self.budget_bytes = budget_bytes
        self.room_bytes = room_bytes
        self._sets: OrderedDict[tuple[int, int], list[KVCache]] = OrderedDict()
        self._largest = 0  # bytes of the largest set made so far

    def __len__(self) -> int:
        return len(self._sets)

    def buckets(self) -> list[tuple[int, int]]:
        """The (batch, length) buckets held, least recently used first."""
        return list(self._sets)

    @property
    def held_bytes(self) -> int:
        return sum(_set_bytes(caches) for caches in self._sets.values())

    def budget(self) -> int:
        """Bytes the sets may hold together."""
        return self.budget_for(self._largest, self.room_bytes, self.budget_bytes)

    @staticmethod
    def budget_for(largest_set: int, room: int | None, override: int | None = None) -> int:
        """The pool's budget (bytes): ``override``, else min(2 x ``largest_set``, ``room``); the fit check's too."""
        if override is not None:
            return override
        return 2 * largest_set if room is None else min(2 * largest_set, max(room, 0))

    def get(self, batch: int, length: int, nbytes: int, make) -> list[KVCache]:
        """The set for (``batch``, ``length``): the one held, else ``make()`` (a set of ``nbytes``) after evicting."""
        key = (batch, length)
        caches = self._sets.get(key)
        if caches is not None:
            self._sets.move_to_end(key)
            return caches
        self._largest = max(self._largest, nbytes)
        while self._sets and self.held_bytes + nbytes > self.budget():
            self._sets.popitem(last=False)
        try:
            caches = make()
        except RuntimeError as exc:  # an accelerator out of memory: drop every kept set, try once more
            if "out of memory" not in str(exc).lower() or not self._sets:
                raise
            self._sets.clear()
            caches = make()
        self._sets[key] = caches
        return caches

    def clear(self) -> None:
        self._sets.clear()

    def drop_kept(self) -> int:
        """Drop every set but the one handed out last (the set in use); bytes dropped."""
        dropped = 0
        while len(self._sets) > 1:
            dropped += _set_bytes(self._sets.popitem(last=False)[1])
        return dropped


def _set_bytes(caches: list[KVCache]) -> int:
    return sum(c.nbytes for c in caches)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k/v [B, Hkv, L, D], grouped-query without copying the cache.

    The ``H / Hkv`` query heads of a group become extra query rows of their
    key/value head (a reshape of q, not a repeat of k/v): any torch >= 2.1,
    and the cache is read once per group rather than once per query head.
    ``mask`` [B, 1, T, L] (bool, True = attend), or None for a prefill from
    slot 0 in which every key is a real token (:func:`plain_causal`): causal
    alone.

    A CPU prefill (T > 1) leaves the grouping to SDPA (``enable_gqa``,
    torch >= 2.5): grouped, the mask's rows would be copied ``H / Hkv`` times
    and converted to an additive mask again in every layer, and a causal
    mask spelled out makes the flash kernel visit the blocks above the
    diagonal (docs/PERFORMANCE.md, "Tenth pass").  The
    outputs are the same bits.
    """
    if q.shape[2] > 1 and q.device.type == "cpu" and _SDPA_GQA:
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    if mask is None:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    qg, mask = _group_queries(q, mask, k.shape[1])
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(q.shape)


def _causal_mask(steps: int, kv_len: int, device) -> torch.Tensor:
    """The mask ``None`` stands for: [1, 1, T, L], query t attends keys 0..t."""
    return torch.ones(steps, kv_len, dtype=torch.bool, device=device).tril()[None, None]


def attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`attend` spelled in matmuls, a masked fill and a softmax: no SDPA op in a traced graph.

    Scores and softmax in fp32, products in the inputs' dtype.  A masked key
    scores float32's lowest finite value, not SDPA's -inf: the same weights
    wherever a row has a key (its exp is 0 either way), and no NaN in a row
    that has none.
    """
    if mask is None:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    qg, mask = _group_queries(q, mask, k.shape[1])
    scores = torch.matmul(qg * q.shape[-1] ** -0.5, k.transpose(-1, -2)).float()
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).reshape(q.shape)


def _group_queries(q: torch.Tensor, mask: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, D] as [B, Hkv, H/Hkv * T, D] and ``mask`` [B, 1, T, L] to match (unchanged if H == Hkv)."""
    batch, heads, steps, dim = q.shape
    if groups == heads:
        return q, mask
    rep = heads // groups
    if steps > 1:
        mask = mask.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(mask.shape[0], 1, rep * steps, mask.shape[-1])
    return q.reshape(batch, groups, rep * steps, dim), mask


def _write_kv(cache: KVCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    cache.write(slots, k, v)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.head_dim = args.head_dim
        self.n_heads = plan.local_heads
        self.n_kv_heads = plan.local_kv_heads
        hd = args.head_dim
        # This rank's q, k and v rows stacked: one matrix-vector product instead of three.
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=False)
        self.cache: KVCache | None = None
        # (q, k, v, mask) -> out for a prefill and for the static decode step, and (cache, slots, k, v) -> None:
        # passes on a built model swap in their own (npu_graph for torchair's GE graph, kernel_pass on CPU).
        self.attend = attend
        self.attend_decode = attend
        self.write_kv = _write_kv

    def qkv_rows(self) -> list[int]:
        """Rows of ``qkv_proj.weight`` per part: q, k, v."""
        hd = self.head_dim
        return [self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd]

    def forward(self, x, cos, sin, mask, slots: torch.Tensor, kv_len: int | None):
        """``slots`` [T]: cache slots of these tokens; attend over slots < ``kv_len`` (None: the whole cache)."""
        batch, steps, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split(self.qkv_rows(), dim=-1)
        q = q.reshape(batch, steps, self.n_heads, hd).transpose(1, 2)
        k = k.reshape(batch, steps, self.n_kv_heads, hd).transpose(1, 2)
        v = v.reshape(batch, steps, self.n_kv_heads, hd).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        self.write_kv(self.cache, slots, k, v)
        keys, values = self.cache.k, self.cache.v
        if kv_len is not None:
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        out = (self.attend if kv_len is not None else self.attend_decode)(q, keys, values, mask)
        out = out.transpose(1, 2).reshape(batch, steps, self.n_heads * hd)
        return self.tp.all_reduce(self.o_proj(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        # This rank's gate rows, then its up rows.
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * plan.local_intermediate, bias=False)
        self.down_proj = nn.Linear(plan.local_intermediate, args.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(args, plan, tp)
        self.mlp = FeedForward(args, plan, tp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(self, x, cos, sin, mask, slots: torch.Tensor, kv_len: int | None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class VocabParallelEmbedding(nn.Module):
    """Rows ``plan.vocab_start .. + plan.local_vocab`` of the (padded) embedding."""

    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_start = plan.vocab_start
        self.local_vocab = plan.local_vocab
        self.weight = nn.Parameter(torch.empty(plan.local_vocab, args.hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.local_vocab)
        out = F.embedding(local.clamp(0, self.local_vocab - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args, plan, tp)
        self.layers = nn.ModuleList(TransformerBlock(args, plan, tp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)


class Transformer(nn.Module):
    """One rank's share of a Llama-2-family causal LM."""

    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel, max_seq_len: int):
        super().__init__()
        self.args = args
        self.plan = plan
        self.tp = tp
        self.max_seq_len = max_seq_len
        self.model = LlamaModel(args, plan, tp)
        # Both are cut by the same vocabulary rows, so a tied checkpoint shares
        # one tensor here too (see tie_weights): no second copy to read.
        self.lm_head = nn.Linear(args.hidden_size, plan.local_vocab, bias=False)
        self.rotary = RotaryEmbedding(args, max_seq_len)
        self.cache_shape = (0, 0)  # (batch, length) of the KV caches in use
        self.kv_pool = KVCachePool()  # every bucket's caches, kept (a plain object: not in the module tree)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def allocate_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give every parameter of a model built on meta uninitialised storage of ``dtype`` on ``device``.

        Tied parameters stay one tensor.  Buffers are left alone (the rotary
        tables are rebuilt when the model is finished, KV caches come later).
        """
        made: dict[int, nn.Parameter] = {}
        for module in self.modules():
            for key, param in module._parameters.items():
                if param is None:
                    continue
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                   requires_grad=param.requires_grad)
                module._parameters[key] = made[id(param)]

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> where it loads: a parameter, or its rows in a fused one (detached views).

        A tied ``lm_head.weight`` has no entry of its own (the embedding is it).
        """
        targets: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            weight = param.detach()
            prefix = name.rsplit(".", 2)[0] + "."
            if name.endswith(".qkv_proj.weight"):
                q, k, v = weight.split(self.get_submodule(name.rsplit(".", 2)[0]).qkv_rows())
                targets.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
            elif name.endswith(".gate_up_proj.weight"):
                gate, up = weight.chunk(2)
                targets.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
            else:
                targets[name] = weight
        return targets

    def setup_caches(self, batch: int, length: int | None = None) -> int:
        """KV caches of exactly ``batch`` rows and ``length`` slots (default max_seq_len); returns the length.

        Exact shapes, so a decode step compiled for them is reused while
        requests keep the same batch and length bucket; each bucket's caches
        come from :attr:`kv_pool`, so a request that returns to a bucket gets
        the very tensors (the same addresses) it had before.
        """
        length = self.max_seq_len if length is None else min(length, self.max_seq_len)
        layers = [layer.self_attn for layer in self.model.layers]
        ref = self.lm_head.weight
        for attn in layers:  # let an evicted set go as soon as the pool drops it
            attn.cache = None
        self.cache_shape = (0, 0)
        nbytes = 2 * batch * length * self.args.head_dim * ref.element_size() * sum(a.n_kv_heads for a in layers)
        caches = self.kv_pool.get(batch, length, nbytes, lambda: [
            KVCache(batch, attn.n_kv_heads, length, self.args.head_dim, ref.dtype, ref.device) for attn in layers])
        for attn, cache in zip(layers, caches):
            attn.cache = cache
        self.cache_shape = (batch, length)
        return length

    def prefix_kv(self, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values [1, local kv heads, P, head_dim] per layer of a shared prompt prefix [1, P].

        Computed in caches of its own (the request caches are left alone), to
        be copied into every row of a batch by :meth:`load_prefix`.
        """
        steps = prefix.shape[1]
        saved, saved_shape = [layer.self_attn.cache for layer in self.model.layers], self.cache_shape
        ref = self.lm_head.weight
        try:
            for layer in self.model.layers:
                attn = layer.self_attn
                attn.cache = KVCache(1, attn.n_kv_heads, steps, self.args.head_dim, ref.dtype, ref.device)
            self.cache_shape = (1, steps)
            valid = torch.ones((1, steps), dtype=torch.bool, device=prefix.device)
            self(prefix, torch.arange(steps, device=prefix.device)[None], valid, start=0)
            return [(layer.self_attn.cache.k, layer.self_attn.cache.v) for layer in self.model.layers]
        finally:
            for layer, cache in zip(self.model.layers, saved):
                layer.self_attn.cache = cache
            self.cache_shape = saved_shape

    def load_prefix(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a :meth:`prefix_kv` into cache slots 0..P-1 of every row."""
        for layer, (k, v) in zip(self.model.layers, kv):
            cache = layer.self_attn.cache
            cache.k[:, :, : k.shape[2]] = k
            cache.v[:, :, : v.shape[2]] = v

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        start: int,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits for ``tokens`` [B, T] written at cache slots start..start+T (prefill; host ints allowed).

        ``positions`` [B, T] are rotary positions (from the attention mask);
        ``key_valid`` [B, >= start+T] marks cache slots holding real tokens.
        Returns [B, T, vocab] if ``all_logits`` else [B, 1, vocab] (last slot),
        in the model's dtype, vocabulary padding removed.
        """
        batch, steps = tokens.shape
        kv_len = start + steps
        if kv_len > self.cache_shape[1]:
            raise ValueError(f"kv_len {kv_len} exceeds the KV cache length {self.cache_shape[1]}")
        mask = None if plain_causal(tokens, key_valid[:, :kv_len], start) else _attention_mask(
            key_valid[:, :kv_len], start, steps)
        slots = torch.arange(start, kv_len, device=tokens.device)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, kv_len, x.dtype)
        return self._blocks_and_head(x, cos, sin, mask, slots, kv_len, all_logits)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
               slot: torch.Tensor) -> torch.Tensor:
        """One decode step with static shapes: logits [B, 1, vocab] for ``tokens`` [B, 1] at cache slot ``slot`` [1].

        Attends over the whole cache under ``key_valid`` [B, cache length]
        (``slot`` already marked); no host ints, no host reads.
        """
        mask = key_valid[:, None, None, :]
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, slot + 1, x.dtype)
        return self._blocks_and_head(x, cos, sin, mask, slot, None, False)

    def _blocks_and_head(self, x, cos, sin, mask, slots, kv_len: int | None, all_logits: bool) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, slots, kv_len)
        if not all_logits:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.tp.all_gather_last_dim(self.lm_head(x))
        return logits[..., : self.args.vocab_size]


def plain_causal(tokens: torch.Tensor, key_valid: torch.Tensor, start: int) -> bool:
    """Whether a prefill's attention is causal alone (its mask may be None): on CPU, from slot 0, no padding.

    Eager, ``key_valid`` (the prefill's slots) says whether a row is padded.  A traced graph cannot branch on it:
    there :func:`traced_plain_causal` decides.  CUDA and NPU keep the mask: their SDPA kernels for ``is_causal``
    were not measured or checked here.
    """
    if is_compiling():
        return traced_plain_causal(tokens, start)
    return _may_drop_mask(tokens, start) and bool(key_valid.all())


def traced_plain_causal(tokens: torch.Tensor, start: int) -> bool:
    """:func:`plain_causal` in a traced prefill: a prefill of one row is taken as unpadded (one prompt has nothing
    to be padded to; dynamo gives a batch of 1 its own graph), larger batches keep the mask.
    ``compile.CompiledSteps.prefill`` refuses a padded row where this holds."""
    return _may_drop_mask(tokens, start) and tokens.shape[0] == 1


def _may_drop_mask(tokens: torch.Tensor, start: int) -> bool:
    return start == 0 and tokens.device.type == "cpu" and _SDPA_GQA


def _attention_mask(key_valid: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, kv_len]: causal, real keys only, and the diagonal.

    The diagonal keeps a left-padding query (which has no real key before it)
    from a softmax over nothing; its output is never read.
    """
    kv_len = key_valid.shape[1]
    q_slot = torch.arange(start, start + steps, device=key_valid.device)[:, None]
    k_slot = torch.arange(kv_len, device=key_valid.device)[None, :]
    causal = k_slot <= q_slot
    mask = (causal[None] & key_valid[:, None, :]) | (k_slot == q_slot)[None]
    return mask[:, None]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters (what one decode step must read)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_read_bytes(model: Transformer) -> tuple[int, int]:
    """What one decode step reads on this rank, as (weight bytes, KV bytes per cached token per row).

    Every matrix is read whole except an untied input embedding, of which a
    step reads one row per sequence (not counted).  A step at cache length
    ``L`` with ``B`` rows reads ``weights + B * L * kv_per_token`` bytes: the
    floor of its time at a given memory bandwidth.
    """
    embed = model.model.embed_tokens.weight
    weights = weight_bytes(model)
    if embed is not model.lm_head.weight:
        weights -= embed.numel() * embed.element_size()
    layer = model.model.layers[0].self_attn
    elem = model.lm_head.weight.element_size()
    kv_per_token = 2 * len(model.model.layers) * layer.n_kv_heads * model.args.head_dim * elem
    return weights, kv_per_token


__all__ = ["Transformer", "RMSNorm", "RotaryEmbedding", "apply_rotary", "weight_bytes", "decode_read_bytes"]
