"""Running the ranks under ``torchrun`` (SPMD): every process runs the same front end and is one rank.

``torchrun --nproc-per-node N -m vicuna_bench ...``: :func:`init_from_env` joins the group torchrun describes in
the environment; :class:`SpmdEngine` is this process's rank with :class:`vicuna_bench.workers.Engine`'s interface.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from .errors import UserError
from .generation import GenerationRequest, GenerationResult
from .rank_model import RankRunner, merge_rank_results
from .rank_setup import bind_this_rank, init_process_group
from .spec import EngineSpec

log = logging.getLogger("vicuna_bench")


def init_from_env(spec: EngineSpec) -> RankRunner:
    """Join the process group torchrun set up; load this rank's share."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != spec.world_size:
        raise UserError(f"--world-size {spec.world_size} disagrees with torchrun's WORLD_SIZE={world}")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    binding = bind_this_rank(spec, local_rank, local_world)  # before anything is loaded
    tp = init_process_group(spec, rank, local_rank, None, timeout_s=1800)
    return RankRunner(spec, rank, local_rank, tp, binding=binding)


class SpmdEngine:
    """This process's rank under torchrun, with :class:`Engine`'s interface.

    Every rank makes the same calls; results are merged with collectives
    (timings: maximum over ranks; peak memory and info: gathered), so every
    rank sees what rank 0 reports.
    """

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.args = spec.validate()
        log.info(
            "torchrun rank %s: model=%s world_size=%d device=%s dtype=%s max_seq_len=%d",
            os.environ.get("RANK", "?"), spec.model_path, spec.world_size, spec.device, spec.dtype, spec.max_seq_len,
        )
        self.runner = init_from_env(spec)
        self.rank = self.runner.rank
        self.rank_info = self._gather(self.runner.info())
        self.closed = False

    @staticmethod
    def _gather(obj) -> list:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def generate(self, prompts, max_new_tokens: int = 32, *, on_tokens=None, **options) -> GenerationResult:
        """Every rank calls this alike; each gets its own tokens (all equal) and the merged timings."""
        request = GenerationRequest.make(prompts, max_new_tokens, stream=on_tokens is not None, **options)
        result = self.runner.generate(request, on_tokens=on_tokens if self.rank == 0 else None)
        timings = self._gather(dataclasses.replace(result, output_ids=[], logits=None))
        timings[self.rank] = result
        return merge_rank_results(timings, tokens_from=self.rank)

    def bandwidth(self) -> list[float]:
        return self._gather(self.runner.bandwidth())

    def close(self) -> None:
        import torch.distributed as dist

        if not self.closed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.closed = True

    def __enter__(self) -> "SpmdEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

