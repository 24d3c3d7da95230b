"""The process runtime's public names, kept importable from here; the code lives by concern in:

* :mod:`vicuna_bench.spec`: :class:`EngineSpec`, :func:`resolve_engine_spec`, :class:`InferenceEngine`;
* :mod:`vicuna_bench.rank_setup`: a rank's process before loading (CPU binding, process group, collective
  warm-up, rank log);
* :mod:`vicuna_bench.rank_model`: loading one rank's model and serving requests on it (:class:`RankRunner`);
* :mod:`vicuna_bench.workers`: :class:`Engine`, N in-process worker ranks;
* :mod:`vicuna_bench.spmd`: :class:`SpmdEngine`, the ranks under torchrun.

New code imports from those modules; a test that patches a name patches it where it is looked up there.
"""

from .generation import GenerationRequest
from .rank_model import (ModelHook, RankRunner, build_rank_model, finish_rank_model,
                         load_rank_model, merge_rank_results)
from .rank_setup import RankLog, bind_this_rank, init_process_group, usable_cpus, warm_collectives
from .spec import EMBEDDED, EngineSpec, InferenceEngine, cpu_fp16_matmul, resolve_engine_spec
from .spmd import SpmdEngine, init_from_env
from .workers import Engine

__all__ = [
    "EMBEDDED", "Engine", "EngineSpec", "GenerationRequest", "InferenceEngine", "ModelHook",
    "RankLog", "RankRunner", "SpmdEngine", "bind_this_rank", "build_rank_model", "cpu_fp16_matmul",
    "finish_rank_model", "init_from_env", "init_process_group", "load_rank_model",
    "merge_rank_results", "resolve_engine_spec", "usable_cpus", "warm_collectives",
]
