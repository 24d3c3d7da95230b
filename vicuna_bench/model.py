"""The Llama-2-family transformer, in plain PyTorch.

Written for one device.  Tensor parallelism enters in two places only: the
layer sizes are those of this rank's share (see ``sharding.py``), and the
module calls ``tp.all_reduce`` after ``o_proj`` and ``down_proj`` and
``tp`` collectives around the vocabulary-parallel embedding and ``lm_head``.
With ``world_size == 1`` those are no-ops and this is an ordinary model.

Module names mirror Hugging Face's ``LlamaForCausalLM`` so that checkpoint
tensor names map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .sharding import ShardPlan, TensorParallel


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
        inv_freq = self._inv_freq(args.rope_theta)
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

    def forward(self, positions: torch.Tensor, seq_len: int, dtype: torch.dtype):
        """cos, sin of shape [B, T, head_dim] for ``positions`` [B, T].

        ``seq_len`` is the longest row's length after this forward (a host
        int, so no device sync); only dynamic NTK scaling uses it.
        """
        a = self.args
        if a.rope_type == "dynamic" and seq_len > a.max_position_embeddings:
            base = a.rope_theta * (
                (a.rope_factor * seq_len / a.max_position_embeddings) - (a.rope_factor - 1)
            ) ** (a.head_dim / (a.head_dim - 2))
            inv_freq = self._inv_freq(base, device=positions.device)
            freqs = positions.float()[..., None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return self.cos_table[positions].to(dtype), self.sin_table[positions].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by cos/sin [B, T, D]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


class KVCache(nn.Module):
    """Preallocated keys and values [batch, local kv heads, max_seq_len, head_dim]."""

    def __init__(self, batch: int, n_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k/v [B, H, T, D] at slots start..start+T; return slots 0..kv_len."""
        batch, _, steps, _ = k.shape
        self.k[:batch, :, start : start + steps] = k
        self.v[:batch, :, start : start + steps] = v
        return self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.head_dim = args.head_dim
        self.n_heads = plan.local_heads
        self.n_kv_heads = plan.local_kv_heads
        hd = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, start: int, kv_len: int):
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        k, v = self.cache.update(start, k, v, kv_len)
        if self.n_heads != self.n_kv_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, steps, self.n_heads * self.head_dim)
        return self.tp.all_reduce(self.o_proj(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.gate_proj = nn.Linear(args.hidden_size, plan.local_intermediate, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, plan.local_intermediate, bias=False)
        self.down_proj = nn.Linear(plan.local_intermediate, args.hidden_size, bias=False)

    def forward(self, x):
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, plan: ShardPlan, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(args, plan, tp)
        self.mlp = FeedForward(args, plan, tp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(self, x, cos, sin, mask, start: int, kv_len: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start, kv_len)
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
        self.cache_batch = 0

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_caches(self, batch: int) -> None:
        """Allocate KV caches for ``batch`` rows (reused while it is large enough)."""
        if batch <= self.cache_batch:
            return
        ref = self.lm_head.weight
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.cache = KVCache(batch, attn.n_kv_heads, self.max_seq_len, self.args.head_dim, ref.dtype, ref.device)
        self.cache_batch = batch

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        start: int,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits for ``tokens`` [B, T] written at cache slots start..start+T.

        ``positions`` [B, T] are rotary positions (from the attention mask);
        ``key_valid`` [B, >= start+T] marks cache slots holding real tokens.
        Returns [B, T, vocab] if ``all_logits`` else [B, 1, vocab] (last slot),
        in the model's dtype, vocabulary padding removed.
        """
        batch, steps = tokens.shape
        kv_len = start + steps
        if kv_len > self.max_seq_len:
            raise ValueError(f"kv_len {kv_len} exceeds max_seq_len {self.max_seq_len}")
        mask = _attention_mask(key_valid[:, :kv_len], start, steps)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, kv_len, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, start, kv_len)
        if not all_logits:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.tp.all_gather_last_dim(self.lm_head(x))
        return logits[..., : self.args.vocab_size]


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
