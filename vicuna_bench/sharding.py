"""The tensor-parallel split rule, on one screen.

Megatron-style, as the vendor's ``cut_weight.sh`` does it:

* ``q_proj k_proj v_proj gate_proj up_proj`` are column-parallel: cut along
  dim 0 (output features) into N equal contiguous chunks, rank r takes chunk r;
* ``o_proj down_proj`` are row-parallel: cut along dim 1 (input features);
  their partial outputs are summed with an all-reduce (two per layer);
* norms are replicated.

Beyond the vendor rule:

* ``embed_tokens`` and ``lm_head`` are cut by vocabulary rows (padded to a
  multiple of N with zero rows), so no rank holds a full copy; the embedding
  output is all-reduced and the logits all-gathered;
* when N exceeds the number of key/value heads, each rank holds one whole
  key/value head, replicated over the N / n_kv ranks whose query heads use it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .config import ModelArgs
from .errors import UserError

VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> list[int]:
    """World sizes up to ``limit`` that this model can be split over."""
    return [n for n in range(1, limit + 1) if _split_problem(args, n) is None]


def _split_problem(args: ModelArgs, n: int) -> str | None:
    if n < 1:
        return f"world size {n} must be >= 1"
    if args.n_heads % n:
        return f"num_attention_heads={args.n_heads} is not divisible by world size {n}"
    if args.intermediate_size % n:
        return f"intermediate_size={args.intermediate_size} is not divisible by world size {n}"
    if args.n_kv_heads % n and n % args.n_kv_heads:
        return (
            f"num_key_value_heads={args.n_kv_heads} neither divides nor is divisible by world size {n}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which rows/columns of each full tensor rank ``rank`` of ``world_size`` holds."""

    args: ModelArgs
    world_size: int
    rank: int

    def __post_init__(self):
        problem = _split_problem(self.args, self.world_size)
        if problem:
            sizes = ", ".join(str(n) for n in valid_world_sizes(self.args))
            raise UserError(f"config.json: {problem}; world sizes that work: {sizes}")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world size {self.world_size}")

    # sizes of this rank's share
    @property
    def local_heads(self) -> int:
        return self.args.n_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.args.n_kv_heads // self.world_size)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold the same key/value head (1: no replication)."""
        return max(1, self.world_size // self.args.n_kv_heads)

    @property
    def local_intermediate(self) -> int:
        return self.args.intermediate_size // self.world_size

    @property
    def padded_vocab(self) -> int:
        n = self.world_size
        return -(-self.args.vocab_size // n) * n

    @property
    def local_vocab(self) -> int:
        return self.padded_vocab // self.world_size

    @property
    def vocab_start(self) -> int:
        return self.rank * self.local_vocab

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the full tensor ``name`` this rank holds; None = whole.

        For vocabulary-parallel tensors ``stop`` may be short of
        ``start + local_vocab`` on the last rank: the rest is zero padding.
        """
        hd = self.args.head_dim
        r = self.rank
        if name in VOCAB_PARALLEL:
            vocab = self.args.vocab_size  # a rank past the vocabulary holds padding only
            return 0, min(self.vocab_start, vocab), min(self.vocab_start + self.local_vocab, vocab)
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if module == "q_proj":
            size = self.local_heads * hd
            return 0, r * size, (r + 1) * size
        if module in ("k_proj", "v_proj"):
            head = r // self.kv_replicas * self.local_kv_heads
            return 0, head * hd, (head + self.local_kv_heads) * hd
        if module == "o_proj":
            size = self.local_heads * hd
            return 1, r * size, (r + 1) * size
        if module in ("gate_proj", "up_proj"):
            size = self.local_intermediate
            return 0, r * size, (r + 1) * size
        if module == "down_proj":
            size = self.local_intermediate
            return 1, r * size, (r + 1) * size
        return None

    def is_tp_sliced(self, name: str) -> bool:
        """True for the tensors a cut part stores already sliced (the vendor rule)."""
        return self.slice_of(name) is not None and name not in VOCAB_PARALLEL

    def take(self, name: str, read: Callable[[tuple[int, int, int] | None], torch.Tensor]) -> torch.Tensor:
        """This rank's tensor for ``name``; ``read(spec)`` returns that slice of the full tensor."""
        spec = self.slice_of(name)
        tensor = read(spec)
        if name in VOCAB_PARALLEL and tensor.shape[0] < self.local_vocab:
            pad = tensor.new_zeros((self.local_vocab - tensor.shape[0],) + tuple(tensor.shape[1:]))
            tensor = torch.cat([tensor, pad], dim=0)
        return tensor


class TensorParallel:
    """The collectives the model needs; identity when ``world_size == 1``."""

    def __init__(self, world_size: int = 1, rank: int = 0, group=None):
        self.world_size = world_size
        self.rank = rank
        self.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        # Not inference tensors: torch < 2.2's gloo copies into them from its own thread, outside inference mode.
        with torch.inference_mode(False):
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
