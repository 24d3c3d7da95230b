"""NPU graph mode through torchair: which torchair a host has, which graph mode to use, and compiling with it.

torchair ships inside torch_npu (``torch_npu/dynamo/torchair``; ``import
torchair`` resolves through a lazy module torch_npu puts in ``sys.modules``)
and carries no version string: its version is the Ascend Extension for
PyTorch release its torch_npu wheel belongs to, read here from
:data:`TORCHAIR_OF_TORCH_NPU`.  The option surfaces differ by version (read
in the wheels' sources; docs/engine.md lists file by file):

* 6.0.rc3 / 6.0.0 (torch_npu 2.1.0.post8 / post10): ``CompilerConfig`` has
  no ``mode`` option and rejects unknown ones with ``ValueError``; the only
  graph is GE's;
* 7.0.0 - 7.2.0: ``config.mode`` is ``max-autotune`` (GE graph, the default)
  or ``reduce-overhead`` (ACL graph capture);
* 7.3.0 on: torch_npu also registers the torch.compile backend
  ``"npugraph_ex"`` (the ACL graph); from 26.x ``reduce-overhead`` warns that
  it is deprecated in favour of that backend.

Whatever the version, a configuration that fails becomes one log line and an
eager decode step, never a dead rank (:func:`compile_decode`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
import re
import weakref
from typing import Callable

import torch
from torch import nn

try:
    from torch.compiler import is_compiling
except ImportError:  # torch 2.1, 2.2
    from torch._dynamo import is_compiling

from . import settings
from .errors import UserError
from .model import Attention, KVCache, attend, attend_explicit

log = logging.getLogger("vicuna_bench")

GRAPH_MODES = settings.BY_KEY["model.npu_graph"].choices  # declared once, in the settings table
NPUGRAPH_EX = "npugraph_ex"  # the torch.compile backend name torch_npu registers from torchair 7.3.0

# torch_npu wheel version -> the Ascend Extension for PyTorch release (= the torchair it carries), from
# Huawei's release notes (hiascend.com Pytorch 7.0.0 / 7.2.0 "version compatibility") and Ascend/pytorch
# COMPATIBILITY.md; 2.13.0's README clones branch v2.13.0-26.2.0, and 2.14.0's torchair Python sources are
# byte for byte 2.13.0's.  Only releases from 6.0.rc3 on, whose torchair sources were read: an older torch_npu
# is "unknown" (--compile auto leaves it eager); a newer one is taken for the newest release here, in one log
# line (:func:`torchair_status`).
TORCHAIR_OF_TORCH_NPU = {
    "2.1.0.post8": "6.0.rc3", "2.3.1.post2": "6.0.rc3", "2.4.0": "6.0.rc3",
    "2.1.0.post10": "6.0.0", "2.3.1.post4": "6.0.0", "2.4.0.post2": "6.0.0",
    "2.1.0.post12": "7.0.0", "2.3.1.post6": "7.0.0", "2.4.0.post4": "7.0.0", "2.5.1": "7.0.0",
    "2.1.0.post13": "7.1.0", "2.5.1.post1": "7.1.0", "2.6.0": "7.1.0",
    "2.1.0.post17": "7.2.0", "2.6.0.post3": "7.2.0", "2.7.1": "7.2.0", "2.8.0": "7.2.0",
    "2.6.0.post5": "7.3.0", "2.7.1.post2": "7.3.0", "2.8.0.post2": "7.3.0", "2.9.0": "7.3.0",
    "2.7.1.post4": "26.0.0", "2.8.0.post4": "26.0.0", "2.9.0.post2": "26.0.0", "2.10.0": "26.0.0",
    "2.7.1.post8": "26.1.0", "2.9.0.post6": "26.1.0", "2.10.0.post4": "26.1.0", "2.11.0": "26.1.0",
    "2.12.0": "26.1.0",
    "2.7.1.post10": "26.1.1", "2.9.0.post8": "26.1.1", "2.10.0.post6": "26.1.1", "2.11.0.post2": "26.1.1",
    "2.12.0.post2": "26.1.1",
    "2.13.0": "26.2.0", "2.14.0": "26.2.0",
}

# Calls a compiled decode step needs on a new shape before the next call replays.  Both modes do all their
# work in the first call: GeConcreteGraph.__call__ loads and compiles the GE graph, then runs it;
# AclGraph.compile captures (num_warmup_iters is never set, so 0 eager runs before) and the same call then
# replays (torchair _acl_concrete_graph/, 7.0.0 to 26.1.1).
WARM_CALLS = {"ge": 1, "aclgraph": 1}

# Huawei's Llama-2-7B decode on an 800I A2 (910B): 14.2 ms a token in max-autotune (GE graph) against 21.6 ms
# in reduce-overhead (shared/spec/NPU.md).  torchair documents graph mode for A2/A3 only: a 310P runs eager
# until a run on one shows a graph mode works there.
AUTO_GRAPH = {"d9": "ge", "d3": "eager"}

# The op overloads of generation.decode_step as torchair's GE converter receives them (dynamo, then
# aot_module_simplified functionalizing with keep_inference_input_mutations=True; torchair's decompositions touch
# none of them), from a tiny fp16 Llama prepared by :func:`prepare_for_ge`.  tests/unit/test_ge_convert.py traces
# the step and fails when this set falls behind it.
DECODE_GRAPH_OPS = frozenset({
    "aten._softmax.default", "aten._to_copy.default", "aten._unsafe_view.default", "aten.add.Tensor",
    "aten.alias.default", "aten.bitwise_not.default", "aten.bmm.default", "aten.cat.default", "aten.copy_.default",
    "aten.embedding.default", "aten.expand.default", "aten.index.Tensor", "aten.masked_fill.Scalar", "aten.mean.dim",
    "aten.mm.default", "aten.mul.Tensor", "aten.neg.default", "aten.pow.Tensor_Scalar", "aten.rsqrt.default",
    "aten.select.int", "aten.silu.default", "aten.slice.Tensor", "aten.split.Tensor",
    "aten.split_with_sizes.default", "aten.t.default", "aten.transpose.int", "aten.unsqueeze.default",
    "aten.view.default", "npu.scatter_update.default",
})
GE_CONVERTERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ge_converters.json")


# A model compiled for the GE graph attends and writes its cache through these two.  Traced, they take ops every
# wheel of ge_converters.json converts; run eager (the prefill, a decode step fallen back), the model's own.
#
# Attention: SDPA reaches a graph as whatever torch_npu's _fused_sdp_choice picks; from torch 2.7 that is
# _scaled_dot_product_fused_attention_overrideable (op-plugin FusedSdpChoiceKernelNpuOpApi.cpp), which no wheel
# converts, and torch's math lowering brings _safe_softmax (torch >= 2.5), which torch_npu 2.5.1, 2.5.1.post1 and
# 2.6.0 cannot.  Eager keeps the fused kernel: a long prompt's fp32 scores are never made.
#
# Cache write: the model's index_copy_ has a stub converter in every wheel (inductor writes it in place, so CPU and
# CUDA keep it).  scatter_ functionalizes to aten.scatter.src, which torchair converts to ScatterElements
# (ge_converter/aten/scatter.py), a whole new cache per layer and step that an Assign copies back.  scatter_update_
# functionalizes (libtorch_npu's at_npu::functionalization::scatter_update_, in every wheel from 2.1.0.post8) to
# npu.scatter_update on the cache input plus copy_ back into it: TensorMove + Scatter + Assign
# (ge_converter/custom/scatter_update.py, aten/copy_.py), which optimize_reference_op_redundant_copy
# (_ge_concrete_graph/graph_pass.py, every torchair from 6.0.rc3) reduces to one Scatter writing the cache in place.

def graph_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`~vicuna_bench.model.attend_explicit` while dynamo traces, :func:`~vicuna_bench.model.attend` eager."""
    if is_compiling():
        return attend_explicit(q, k, v, mask)
    return attend(q, k, v, mask)


def graph_write(cache: KVCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """torch_npu's ``scatter_update_`` while dynamo traces a decode step (``slots`` [1]), else
    :meth:`KVCache.scatter_write`."""
    if is_compiling() and k.shape[2] == 1:
        rows = slots.expand(k.shape[0])  # Scatter's 1-D indices: where each batch row's update starts on the axis
        torch.ops.npu.scatter_update_(cache.k, rows, k, -2)
        torch.ops.npu.scatter_update_(cache.v, rows, v, -2)
    else:
        cache.scatter_write(slots, k, v)


def prepare_for_ge(model) -> None:
    """Give every :class:`~vicuna_bench.model.Attention` of ``model`` :func:`graph_attention` and a cache write GE
    converts: :func:`graph_write` where torch_npu has ``scatter_update_``, else :meth:`KVCache.scatter_write`
    (the model's own ``index_copy_`` has only a stub converter); idempotent."""
    if not isinstance(model, nn.Module) or model in _prepared_for_ge:
        return
    in_place = _has_npu_op("scatter_update_")
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = graph_attention
            if module.attend_decode is attend:  # a kernel a pass swapped in (CPU: vicuna_bench.kernel_pass) stays
                module.attend_decode = graph_attention
            module.write_kv = graph_write if in_place else KVCache.scatter_write  # both (cache, slots, k, v)
    _prepared_for_ge.add(model)


_prepared_for_ge: weakref.WeakSet = weakref.WeakSet()


def _has_npu_op(name: str) -> bool:
    try:
        getattr(torch.ops.npu, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _for_ge(compiled: Callable) -> Callable:
    """``compiled`` (a decode step) called on a model :func:`prepare_for_ge` has prepared."""
    def step(model, *inputs):
        prepare_for_ge(model)
        return compiled(model, *inputs)

    return step


def check_graph_mode(mode: str, option: str = "--npu-graph") -> str:
    if mode not in GRAPH_MODES:
        raise UserError(f"{option} {mode!r} is not supported (valid: {', '.join(GRAPH_MODES)})")
    return mode


def version_key(version: str) -> tuple:
    """Sortable form of a torchair version (``6.0.rc3`` < ``6.0.0`` < ``7.3.0`` < ``26.0.0``)."""
    parts = []
    for part in version.lower().split("."):
        rc = re.fullmatch(r"rc(\d+)", part)
        parts += [-1, int(rc.group(1))] if rc else [int(part) if part.isdigit() else 0, 0]
    return tuple(parts)


@dataclasses.dataclass(frozen=True)
class TorchairStatus:
    """The torch_npu this process has and the torchair release it carries (None: unknown)."""

    torch_npu: str | None
    version: str | None
    newer_than_known: bool = False  # a torch_npu past the table, taken for its newest release

    @property
    def known(self) -> bool:
        return self.version is not None

    def has(self, mode: str) -> bool:
        """Whether this torchair offers graph ``mode`` (ge | aclgraph): ACL graphs arrived in 7.0.0."""
        if self.version is None:
            return False
        return mode == "ge" or version_key(self.version) >= version_key("7.0.0")

    def describe(self) -> str:
        if self.torch_npu is None:
            return "torch_npu is not installed"
        if self.version is None:
            return f"torch_npu {self.torch_npu}: torchair version unknown (not in npu_graph.TORCHAIR_OF_TORCH_NPU)"
        if self.newer_than_known:
            return f"torchair {self.version} assumed (torch_npu {self.torch_npu}, newer than the table)"
        return f"torchair {self.version} (torch_npu {self.torch_npu})"

    def record(self) -> str | None:
        """For the environment record: the version, ``unknown`` or None without torch_npu."""
        if self.torch_npu is None:
            return None
        return self.version or "unknown"


def torchair_of(torch_npu_version: str) -> str | None:
    """The torchair release a torch_npu wheel version carries (a ``+local`` suffix ignored), None if unknown."""
    return TORCHAIR_OF_TORCH_NPU.get(torch_npu_version.split("+", 1)[0])


def torchair_status() -> TorchairStatus:
    """What the installed torch_npu says about its torchair, without importing either."""
    installed = None
    for name in ("torch_npu", "torch-npu"):
        try:
            installed = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    if installed is None:
        return TorchairStatus(None, None)
    version = torchair_of(installed)
    if version is None and _is_newer_than_known(installed):
        newest = TORCHAIR_OF_TORCH_NPU[max(TORCHAIR_OF_TORCH_NPU, key=_wheel_key)]
        if installed not in _said_newer:
            _said_newer.add(installed)
            log.info("torch_npu %s is newer than any in npu_graph.TORCHAIR_OF_TORCH_NPU: taking its torchair for "
                     "the newest known, %s", installed, newest)
        return TorchairStatus(installed, newest, newer_than_known=True)
    return TorchairStatus(installed, version)


_said_newer: set[str] = set()


def _wheel_key(version: str) -> tuple:
    """Sortable form of a torch_npu version (``2.1.0.post17`` < ``2.14.0``; a ``+local`` or rc suffix ignored)."""
    parts = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"(?:post)?(\d+)", part)
        parts.append(int(digits.group(1)) if digits else 0)
    return tuple(parts + [0] * (4 - len(parts)))


def _is_newer_than_known(version: str) -> bool:
    return _wheel_key(version) > max(map(_wheel_key, TORCHAIR_OF_TORCH_NPU))


@functools.lru_cache(maxsize=1)
def ge_converter_table() -> dict:
    """``ge_converters.json`` (scripts/ge_converter_table.py): per wheel, the ops GE converts, stubs or lacks."""
    with open(GE_CONVERTERS) as f:
        return json.load(f)


def ge_blockers(status: TorchairStatus, ops=DECODE_GRAPH_OPS) -> list[str] | None:
    """The ``ops`` this torchair's GE graph cannot convert (no converter, or a stub); None: no table for it.

    A wheel missing from the table reads the newest one of its torchair release.
    """
    if status.torch_npu is None or status.version is None:
        return None
    table = ge_converter_table()
    wheels = [w["torch_npu"] for w in table["wheels"]]
    exact = status.torch_npu.split("+", 1)[0]
    same_release = [i for i, w in enumerate(table["wheels"]) if w["torchair"] == status.version]
    if exact in wheels:
        column = wheels.index(exact)
    elif same_release:
        column = max(same_release, key=lambda i: _wheel_key(wheels[i]))
    else:
        return None
    return sorted(op for op in ops if table["ops"].get(op, "-" * len(wheels))[column] != "R")


def choose_graph(requested: str, chip_family: str | None, status: TorchairStatus | None = None) -> tuple[str, str]:
    """(ge | aclgraph | eager, why): ``auto`` takes :data:`AUTO_GRAPH` for the chip family, eager where unknown,
    and on a 910B the ACL graph (else eager) where this torchair's GE cannot convert the decode step's ops."""
    check_graph_mode(requested)
    if requested != "auto":
        return requested, f"--npu-graph {requested}"
    mode = AUTO_GRAPH.get(chip_family, "eager")
    if chip_family == "d9":
        why = "--npu-graph auto on d9 (910B): GE graph (Huawei's Llama-2-7B decode: 14.2 ms vs 21.6 ms reduce-overhead)"
        status = status or torchair_status()
        blockers = ge_blockers(status)
        if blockers:
            mode = "aclgraph" if status.has("aclgraph") else "eager"
            why = (f"--npu-graph auto on d9 (910B): {status.describe()} has no working GE converter for "
                   f"{', '.join(blockers)}: {'ACL graph' if mode == 'aclgraph' else 'eager (and no ACL graph)'}")
    elif chip_family == "d3":
        why = "--npu-graph auto on d3 (310P): eager (torchair documents graph mode for A2/A3 only)"
    else:
        why = "--npu-graph auto: the chip family is unknown (neither 910B nor 310P): eager"
    return mode, why


def auto_compile_blocker(requested: str, chip_family: str | None, status: TorchairStatus | None = None) -> str | None:
    """Why ``--compile auto`` must stay off on this NPU host (None: nothing stops it)."""
    status = status or torchair_status()
    mode, why = choose_graph(requested, chip_family, status)
    if mode == "eager":
        return why
    if not status.known:
        return f"{status.describe()}; pass --compile on to try it"
    if not status.has(mode):
        return f"torchair {status.version} has no {mode} graph mode"
    return None


class EagerOnFirstFailure:
    """A compiled decode step that falls back to eager, for good, when a shape's first compiled call raises.

    torchair reads most of its configuration on the first call (the backend
    compiles then), so an option this version refuses raises there.  Later
    calls of a shape that once ran are not guarded: a failure then is a
    real error, not a configuration one.
    """

    def __init__(self, compiled: Callable, eager: Callable, description: str):
        self.compiled = compiled
        self.eager = eager
        self.description = description
        self.failure: str | None = None
        self.on_fallback: Callable[[str], None] | None = None  # told the failure once
        self._ran: set[tuple] = set()

    def __call__(self, *args):
        if self.failure is not None:
            return self.eager(*args)
        shape = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if shape in self._ran:
            return self.compiled(*args)
        try:
            out = self.compiled(*args)
        except Exception as exc:  # noqa: BLE001  (any torchair refusal: fall back, never kill the rank)
            self.failure = _one_line(exc)
            log.warning("--compile on: %s failed on its first call for shapes %s (%s); this rank runs the decode "
                        "step eager from now on", self.description, shape, self.failure)
            if self.on_fallback is not None:
                self.on_fallback(self.failure)
            return self.eager(*args)
        self._ran.add(shape)
        return out


@dataclasses.dataclass
class NpuGraph:
    """A compiled decode step (``generation.decode_step``, same signature) and what made it."""

    step: EagerOnFirstFailure
    description: str
    mode: str  # ge | aclgraph
    warm_calls: int  # calls a new shape needs before the next one replays


def compile_decode(fn: Callable, requested: str = "auto", chip_family: str | None = None,
                   world_size: int = 1) -> NpuGraph | None:
    """``fn`` compiled by torchair in the graph mode chosen for this chip and torchair; None: run eager (logged)."""
    status = torchair_status()
    mode, why = choose_graph(requested, chip_family, status)
    if mode == "eager":
        log.info("--compile on: %s; the NPU runs the decode step eager", why)
        return None
    try:
        import torchair

        torchair.CompilerConfig  # noqa: B018  (torch_npu's lazy module imports torchair on first attribute use)
    except Exception as exc:  # noqa: BLE001  (torch_npu replays torchair's import error, of any type)
        log.warning("--compile on: torchair cannot be imported (%s; %s); the NPU runs eager", _one_line(exc),
                    status.describe())
        return None
    try:
        if world_size > 1 and _torch_before(2, 3, 1):
            # torch 2.1's collectives are not traceable: torchair's patch makes them graph ops (eager unchanged).
            torchair.patch_for_hcom()
        compiled, description, mode = _compile(torchair, fn, mode, status)
        if mode == "ge":
            compiled = _for_ge(compiled)
    except Exception as exc:  # noqa: BLE001  (ValueError from CompilerConfig, InvalidBackend, ...)
        log.warning("--compile on: %s refused the %s graph mode (%s); the NPU runs eager", status.describe(), mode,
                    _one_line(exc))
        return None
    log.info("--compile on: %s (%s, %s)", description, why, status.describe())
    return NpuGraph(EagerOnFirstFailure(compiled, fn, description), description, mode, WARM_CALLS[mode])


def _compile(torchair, fn: Callable, mode: str, status: TorchairStatus) -> tuple[Callable, str, str]:
    """(compiled fn, description, mode used): the ACL graph through the API this torchair has, else GE's."""
    if mode == "aclgraph":
        try:
            return torch.compile(fn, backend=NPUGRAPH_EX, dynamic=False), "torchair npugraph_ex (ACL graph)", mode
        except Exception as exc:  # noqa: BLE001  (before 7.3.0 torch_npu registers no such backend)
            no_backend = _one_line(exc)
        config = torchair.CompilerConfig()
        try:
            config.mode = "reduce-overhead"
        except ValueError as exc:  # before 7.0.0: "CompilerConfig has no option mode"
            log.warning("--npu-graph aclgraph: %s has no ACL graph (no %s backend: %s; no config.mode: %s); "
                        "using its GE graph", status.describe(), NPUGRAPH_EX, no_backend, _one_line(exc))
            mode = "ge"
        else:
            backend = torchair.get_npu_backend(compiler_config=config)
            return torch.compile(fn, backend=backend, dynamic=False), "torchair reduce-overhead (ACL graph)", mode
    # GE (max-autotune) is CompilerConfig's default mode in every version, and the only one before 7.0.0.
    backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    return torch.compile(fn, backend=backend, dynamic=False), "torchair max-autotune (GE graph)", mode


def _torch_before(*version: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__)
    return found is not None and tuple(int(x) for x in found.groups()) < version


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception's root cause (dynamo wraps a backend's error in BackendCompilerFailed;
    torchair's own messages carry a traceback after their first line)."""
    root = exc
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None and inner is not root:
        root = inner
    text = str(root).strip()
    said = f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__
    return said if root is exc else f"{type(exc).__name__} from {said}"
