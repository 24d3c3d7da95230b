"""Will a rank fit?  Its memory need against the memory it will have, checked before any weight is read.

A rank needs (bytes):

* its share of the weights in the run's dtype, from config.json's shapes
  and the split rule (``sharding.py``);
* its KV cache: keys and values of its key/value heads for ``batch`` rows
  of ``max_seq_len`` slots, in the run's dtype;
* a runtime allowance: the fixed cost of a torch process (measured, see
  ``RUNTIME_BYTES``) plus a prefill's activations at ``max_seq_len``;
* the KV cache sets its pool keeps beside the one in use
  (``model.KVCachePool``): what :meth:`KVCachePool.budget_for` gives for
  that set and the memory left after weights and runtime, so the default
  budget (twice the largest set) shrinks to what is free and a set budget
  (``kv_cache_budget_mb``) is counted whole.

It has: on CPU the host's available memory (``MemAvailable``, capped by a
cgroup limit) divided among the ranks on the host; on CUDA/NPU its device's
free memory, read by the rank itself once its device is set (so the caller
never creates a device context of its own).

``batch`` is what the caller knows: ``run`` its prompt count, ``perf`` its
batch size; 1 elsewhere.  The check is on the rank's steady state; loading
adds no more than one tensor in flight (``checkpoint.load_rank_weights``).

:class:`LoadPeak` measures what loading took: the peak growth of the
process's anonymous memory (``RssAnon``; the checkpoint's mapped pages are
page cache, reclaimable and shared, so not counted) and, on an accelerator,
the allocator's peak.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import UserError
from .model import KVCachePool
from .sharding import ShardPlan, valid_world_sizes

GIB = 2**30

# The fixed cost of one rank's process.  CPU: measured, the anonymous memory of a spawned rank once torch,
# gloo and its thread pools are up and its weights are subtracted: 150 MiB (torch 2.13, docs/engine.md),
# rounded up.  CUDA/NPU: not measured here (no device): an allowance for library workspaces and allocator
# rounding (the context itself is already out of the free memory the rank reads).
RUNTIME_BYTES = {"cpu": 256 << 20, "cuda": 768 << 20, "npu": 768 << 20}
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class RankNeed:
    """One rank's memory need in bytes, by part."""

    weight_bytes: int
    kv_bytes: int  # one KV cache set: ``batch`` rows of ``max_seq_len`` slots
    runtime_bytes: int
    kv_pool_bytes: int | None = None  # the pool's budget on this rank (check_fit; None: not checked)
    kv_room_bytes: int | None = None  # memory left for KV cache sets after weights and runtime (check_fit)

    @property
    def total(self) -> int:
        """Bytes the rank holds at most: weights, runtime, and the KV sets (the one in use, or the pool's budget)."""
        return self.weight_bytes + max(self.kv_bytes, self.kv_pool_bytes or 0) + self.runtime_bytes


def rank_weight_elements(plan: ShardPlan) -> int:
    """Elements of rank ``plan.rank``'s parameters (vocabulary padding included, a tied head once)."""
    a = plan.args
    hd, hidden, inter = a.head_dim, a.hidden_size, plan.local_intermediate
    attention = (plan.local_heads + 2 * plan.local_kv_heads) * hd * hidden + hidden * plan.local_heads * hd
    layer = attention + 3 * inter * hidden + 2 * hidden
    vocab = plan.local_vocab * hidden * (1 if a.tie_word_embeddings else 2)
    return vocab + a.n_layers * layer + hidden


def kv_cache_bytes(plan: ShardPlan, max_seq_len: int, batch: int, element_bytes: int) -> int:
    """Keys and values of rank ``plan.rank``: 2 x layers x local kv heads x head_dim x slots x rows x element."""
    a = plan.args
    return 2 * a.n_layers * plan.local_kv_heads * a.head_dim * max_seq_len * batch * element_bytes


def prefill_activation_bytes(plan: ShardPlan, max_seq_len: int, batch: int) -> int:
    """A bound on one layer's live activations in a prefill of ``max_seq_len`` tokens, counted in fp32: hidden
    states (residual, normed, attention and MLP outputs), q/k/v, the MLP's gate/up, and the attention scores
    of the rank's heads (SDPA with a mask).

    Measured against it (hidden 1024, 8 heads, intermediate 2816, world size 2, a 2,000-token prefill at
    max_seq_len 2048): 85 MiB in bf16, 127 MiB in fp32, for 130 MiB counted.
    """
    a = plan.args
    tokens = batch * max_seq_len
    per_token = 4 * a.hidden_size + (plan.local_heads + 2 * plan.local_kv_heads) * a.head_dim
    per_token += 2 * plan.local_intermediate
    scores = batch * plan.local_heads * max_seq_len * max_seq_len
    return 4 * (tokens * per_token + scores)


def rank_need(args: ModelArgs, world_size: int, dtype: str, max_seq_len: int, batch: int = 1,
              device: str = "cpu") -> RankNeed:
    """What the most loaded rank of ``world_size`` needs (bytes), ``dtype`` one of fp32/fp16/bf16."""
    element = ELEMENT_BYTES[dtype]
    plan = ShardPlan(args, world_size, 0)  # every rank holds the same shapes (padding included)
    return RankNeed(
        weight_bytes=rank_weight_elements(plan) * element,
        kv_bytes=kv_cache_bytes(plan, max_seq_len, batch, element),
        runtime_bytes=RUNTIME_BYTES[device] + prefill_activation_bytes(plan, max_seq_len, batch),
    )


# ---------------------------------------------------------------- the memory a rank will have

def _meminfo_bytes(field: str) -> int | None:
    from .devices import proc_file_bytes

    return proc_file_bytes("/proc/meminfo", field)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's memory cgroup still allows (its limit less its non-cache use); None: no limit."""
    for limit_file, usage_file, cache_keys in (
        (root / "memory.max", root / "memory.current", ("file",)),  # cgroup v2
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes",
         ("total_cache", "cache")),  # cgroup v1
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None:
            continue
        cache = 0
        try:
            stats = dict(line.split() for line in (limit_file.parent / "memory.stat").read_text().splitlines())
            cache = next((int(stats[k]) for k in cache_keys if k in stats), 0)
        except (OSError, ValueError):
            pass
        return max(0, limit - (usage - cache))
    return None


def host_available_bytes() -> int | None:
    """Memory the host can still give (``MemAvailable``, capped by a cgroup limit); None where unknown."""
    available = _meminfo_bytes("MemAvailable")
    headroom = _cgroup_headroom()
    if headroom is not None and (available is None or headroom < available):
        return headroom
    return available


def device_free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CUDA/NPU) as its driver reports it, from inside the rank that uses it.

    ``torch.npu.mem_get_info(device)`` returns ``(free, total)`` as CUDA's does (torch_npu 2.1.0.post8
    ``npu/utils.py`` through 2.12.0.post3 ``npu/memory.py``).
    """
    module = torch.cuda if device.type == "cuda" else getattr(torch, "npu")
    free, _total = module.mem_get_info(device)
    return int(free)


# ---------------------------------------------------------------- the check

def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def kv_room_bytes(need: RankNeed, has: int) -> int:
    """Bytes a rank with ``has`` bytes keeps for KV cache sets once its weights and runtime are counted."""
    return has - need.weight_bytes - need.runtime_bytes


@dataclasses.dataclass(frozen=True)
class FitCase:
    """What a run asks of each rank's memory: the model, world size, dtype (fp32 | fp16 | bf16), context (tokens),
    batch (rows) and device kind (cpu | cuda | npu)."""

    args: ModelArgs
    world_size: int
    dtype: str
    max_seq_len: int
    batch: int
    device: str

    def need(self, **changes) -> RankNeed:
        """:func:`rank_need` of this case, or of it with ``changes`` (e.g. ``world_size=2``)."""
        case = dataclasses.replace(self, **changes) if changes else self
        return rank_need(case.args, case.world_size, case.dtype, case.max_seq_len, case.batch, case.device)


def check_fit(case: FitCase, available: int, where: str, ranks_sharing: int = 1, device_count: int | None = None,
              kv_budget: int | None = None) -> RankNeed:
    """Raise a one-line UserError when a rank's need exceeds ``available`` / ``ranks_sharing`` bytes.

    ``where`` says what ``available`` is (for the message); ``ranks_sharing``
    is how many ranks divide it (the ranks on one host for CPU, 1 for a
    device); ``kv_budget``: the KV pool's budget set by the user (bytes;
    None: the default, which fits whatever is left).  Returns the need with
    the pool's budget and the room for KV sets filled in.  The message
    gives the numbers and what would fit instead.
    """
    need = case.need()
    has = available // ranks_sharing
    room = kv_room_bytes(need, has)
    checked = dataclasses.replace(need, kv_pool_bytes=KVCachePool.budget_for(need.kv_bytes, room, kv_budget),
                                  kv_room_bytes=room)
    if max(need.kv_bytes, kv_budget or 0) <= room:
        return checked
    share = f"{where} / {ranks_sharing} ranks" if ranks_sharing > 1 else where
    if kv_budget is not None and kv_budget > need.kv_bytes:
        kv = f"KV cache pool {_gib(kv_budget)} (kv_cache_budget_mb={kv_budget >> 20})"
    else:
        kv = f"KV cache {_gib(need.kv_bytes)}"
    raise UserError(
        f"world size {case.world_size}, --dtype {case.dtype}, --max-seq-len {case.max_seq_len}, batch {case.batch}: "
        f"each rank needs {_gib(checked.total)} (weights {_gib(need.weight_bytes)} + {kv} + runtime "
        f"{_gib(need.runtime_bytes)}) but has {_gib(has)} ({share}); "
        + _what_fits(case, available, device_count, kv_budget)
    )


def _what_fits(case: FitCase, available: int, device_count: int | None, kv_budget: int | None = None) -> str:
    """Settings that would fit, one change at a time: world size, dtype, max-seq-len, the pool's budget."""
    on_host = case.device == "cpu"
    world_size, dtype, max_seq_len = case.world_size, case.dtype, case.max_seq_len

    def fits(ws: int, dt: str, length: int, budget: int | None = kv_budget) -> bool:
        sharing = ws if on_host else 1  # host memory is split among the host's ranks; a device is the rank's own
        need = case.need(world_size=ws, dtype=dt, max_seq_len=length)
        return max(need.kv_bytes, budget or 0) <= kv_room_bytes(need, available // sharing)

    options = []
    limit = world_size if on_host else (device_count or 64)
    sizes = [ws for ws in valid_world_sizes(case.args, max(limit, 1))
             if ws != world_size and fits(ws, dtype, max_seq_len)]
    if sizes:
        options.append("--world-size " + "/".join(map(str, sizes[:4])))
    if dtype == "fp32":
        options += [f"--dtype {dt}" for dt in ("bf16", "fp16") if fits(world_size, dt, max_seq_len)][:1]
    length = max_seq_len
    while length > 2 and not fits(world_size, dtype, length):
        length //= 2
    if length < max_seq_len and fits(world_size, dtype, length):
        options.append(f"--max-seq-len {length}")
    if kv_budget is not None and fits(world_size, dtype, max_seq_len, budget=None):
        room = kv_room_bytes(case.need(), available // (world_size if on_host else 1))
        options.append(f"kv_cache_budget_mb={room >> 20} or less")
    if options:
        return "would fit: " + ", or ".join(options)
    small = "bf16" if dtype == "fp32" else dtype
    weights = case.need(world_size=1, dtype=small, max_seq_len=2, batch=1).weight_bytes
    return f"nothing fits here: the weights alone are {_gib(weights)} in {small}"


def check_host_fit(args: ModelArgs, world_size: int, dtype: str, max_seq_len: int, batch: int,
                   ranks_on_host: int, kv_budget: int | None = None) -> RankNeed | None:
    """The CPU check: ``ranks_on_host`` ranks share the host's available memory.  None where it is unknown."""
    available = host_available_bytes()
    if available is None:
        return None
    return check_fit(FitCase(args, world_size, dtype, max_seq_len, batch, "cpu"), available,
                     f"{_gib(available)} available on the host", ranks_sharing=ranks_on_host, kv_budget=kv_budget)


def host_need(args: ModelArgs, world_size: int, dtype: str, max_seq_len: int, batch: int,
              ranks_on_host: int) -> RankNeed | None:
    """A CPU rank's need with the room for its KV sets (host memory now / ``ranks_on_host``); never raises.

    None where the host's memory is unknown.  Read in the rank before it
    allocates: ranks loading beside it make it smaller, never larger.
    """
    available = host_available_bytes()
    if available is None:
        return None
    need = rank_need(args, world_size, dtype, max_seq_len, batch, "cpu")
    return dataclasses.replace(need, kv_room_bytes=kv_room_bytes(need, available // ranks_on_host))


def check_device_fit(args: ModelArgs, world_size: int, dtype: str, max_seq_len: int, batch: int,
                     device: torch.device, device_count: int | None = None,
                     kv_budget: int | None = None) -> RankNeed:
    """The CUDA/NPU check, in the rank on ``device``, before it allocates anything."""
    free = device_free_bytes(device)
    return check_fit(FitCase(args, world_size, dtype, max_seq_len, batch, device.type), free,
                     f"{_gib(free)} free on {device}", device_count=device_count, kv_budget=kv_budget)


# ---------------------------------------------------------------- what loading took

def _status_bytes(fd: int, field: bytes) -> int:
    text = os.pread(fd, 8192, 0)
    start = text.find(field + b":")
    if start < 0:
        return 0
    return int(text[start:text.index(b"\n", start)].split()[1]) * 1024


class LoadPeak:
    """Peak growth of this process's anonymous memory (bytes) while the block runs, sampled by a thread.

    ``RssAnon`` every ``interval_s``: what the process allocated, without the
    checkpoint's memory-mapped (page cache) pages.  ``peak_growth`` is 0
    where /proc is not there.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_growth = 0
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0

    def _sample(self) -> None:
        while True:
            self.peak_growth = max(self.peak_growth, _status_bytes(self._fd, b"RssAnon") - self._start)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "LoadPeak":
        try:
            self._fd = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            return self
        self._start = _status_bytes(self._fd, b"RssAnon")
        self._thread = threading.Thread(target=self._sample, name="load-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_growth = max(self.peak_growth, _status_bytes(self._fd, b"RssAnon") - self._start)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = ["FitCase", "LoadPeak", "RankNeed", "check_device_fit", "check_fit", "check_host_fit", "host_available_bytes",
           "host_need", "kv_room_bytes", "rank_need", "rank_weight_elements", "kv_cache_bytes"]
