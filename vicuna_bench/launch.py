"""How this process was launched: one rank of a torchrun job, or a plain process (a leaf: imports nothing of ours)."""

from __future__ import annotations

import os
from typing import Mapping


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun started this process (then every rank runs the same front end)."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "LOCAL_RANK" in env)


def is_writer(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process writes results and prints them: always in-process, rank 0 under torchrun."""
    env = os.environ if env is None else env
    return not launched_by_torchrun(env) or env.get("RANK", "0") == "0"


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's local rank under torchrun; 0 otherwise."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_RANK", "0")) if launched_by_torchrun(env) else 0
