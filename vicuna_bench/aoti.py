"""The CPU decode step as an AOTInductor package: one C++ call a step, no dynamo, the model's own weights.

Called through dynamo, a compiled decode step pays per call for dynamo's
frame and AOTAutograd's runtime wrappers (~0.6 ms of a 20 ms SmolLM2 fp32
step on the AVX2 host) and, inside inductor's C++ wrapper, a size and
stride check for each of its ~250 inputs, the weights among them (~0.4 ms):
serial time during which our kernels' worker thread idles
(docs/PERFORMANCE.md, "Eleventh pass").  Here :func:`decode_step` is
exported (``torch.export``, the model's parameters and KV cache buffers
lifted as constants) and compiled by AOTInductor into a shared library
whose inputs are only the step's four small tensors.  Its constants are the
model's own tensors, handed over by pointer
(``AOTICompiledModel.load_constants(..., user_managed=True)``, torch 2.8+):
no weight is copied, and the KV cache it writes is the model's.

A package is built once per (model graph, batch, cache length, dtype,
threads, host) and kept beside inductor's own cache (:func:`package_dir`), so
a second process loads it in milliseconds instead of compiling for ~10-50 s.
Used on CPU at world size 1 with our kernels loaded (the C++ wrapper cannot
hold the collectives of tensor parallelism, and without the kernels the
bf16 products want inductor's frozen prepacked weights);
``VICUNA_BENCH_AOTI=0`` turns it off.  Where this torch lacks the API, or
exporting or compiling fails, the step is called through dynamo as before,
said in one log line.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import types
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from .generation import DecodeState, decode_step

log = logging.getLogger("vicuna_bench")

ENV_SWITCH = "VICUNA_BENCH_AOTI"
PREFIX = "step."  # the fqn prefix of the model's tensors in the exported wrapper (_DecodeModule.step)
# Weights stay out of the library: the package holds code only, and its constants are bound to the model's tensors.
# Read-only, and handed to AOTInductor as a copy: aoti_compile_and_package adds "aot_inductor.package" to the dict it
# is given (torch 2.13 torch/_inductor/__init__.py), which changed every later package key in the process (a second
# compile of a shape already packaged, and keys that differed from process to process).
INDUCTOR_CONFIGS = types.MappingProxyType({"aot_inductor.package_constants_in_so": False})


def enabled() -> bool:
    """False where ``VICUNA_BENCH_AOTI`` is 0/false/off/no."""
    from .settings import switch_on

    return switch_on(ENV_SWITCH)


def why_unsupported() -> str | None:
    """None where this torch can build a package and bind its constants to tensors it does not own; else why not."""
    import torch._inductor as inductor

    if not (hasattr(inductor, "aoti_compile_and_package") and hasattr(inductor, "aoti_load_package")):
        return f"torch {torch.__version__} has no aoti_compile_and_package (2.6+)"
    try:
        from torch.export.pt2_archive._package import AOTICompiledModel
    except ImportError:
        return f"torch {torch.__version__} has no torch.export.pt2_archive (2.8+)"
    load = getattr(AOTICompiledModel, "load_constants", None)
    if load is None or "user_managed" not in inspect.signature(load).parameters:
        return (f"torch {torch.__version__}'s AOTInductor cannot run on the model's own weights "
                "(load_constants user_managed)")
    return None


def why_not(device: str, world_size: int, kernels_loaded: bool) -> str | None:
    """None where the decode step is an AOTInductor package; else the one-line reason it is called through dynamo."""
    if device != "cpu":
        return f"{device}: only CPU steps are packaged"
    if not enabled():
        return f"{ENV_SWITCH}=0"
    if world_size != 1:
        return f"world size {world_size}: the C++ wrapper cannot hold tensor parallelism's collectives"
    if not kernels_loaded:
        return "our CPU kernels are not loaded (without them the products want inductor's frozen weights)"
    return why_unsupported()


class _DecodeModule(nn.Module):
    """:func:`decode_step` of ``step`` as a module, for ``torch.export``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.step = model

    def forward(self, tokens, positions, key_valid, slot):
        return decode_step(self.step, tokens, positions, key_valid, slot)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by its fqn in the exported wrapper, a tied tensor under each name."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {PREFIX + name: tensor for name, tensor in named.items()}


def scratch_inputs(batch: int, length: int, device) -> tuple[torch.Tensor, ...]:
    """``DecodeState.step_inputs`` of a scratch state at these shapes, to trace with: the package is compiled for
    the very dtypes and strides every real step passes."""
    key_valid = torch.zeros((batch, length), dtype=torch.bool, device=device)
    positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
    return DecodeState.after_prefill(key_valid, 0, positions).step_inputs()


def package_key(program, threads: int) -> str:
    """What decides a package's code: the exported graph (its code and every placeholder's shape, dtype and
    stride, the weights' included), torch, our kernel library's build (host ISA, compiler) and the thread count
    that inductor writes into its OpenMP regions."""
    from . import cpu_kernels

    metas = []
    for node in program.graph_module.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            metas.append(tensor_meta(node.name, val) if hasattr(val, "shape") else f"{node.name}:{val!r}")
    return key_digest(program.graph_module.code, "\n".join(metas), torch.__version__, cpu_kernels.build_key(),
                      str(threads), repr(sorted(INDUCTOR_CONFIGS.items())))


def tensor_meta(name: str, tensor) -> str:
    """``name:shape:dtype:stride``, a tensor's part of a cache key."""
    return f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tuple(tensor.stride())}"


def key_digest(*parts: str) -> str:
    """A cache key: 24 hex digits of the SHA-256 of ``parts``, each ended by a NUL (so no two splits collide)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def drop_export_trace_map() -> int:
    """Let the last traced graph be freed; how many entries were dropped.

    torch's non-strict export (``torch/fx/experimental/proxy_tensor.py``, 2.13) leaves the nodes of its last trace
    in a module-level map, ``_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT``, for its fake-tensor leak check; only the next
    trace clears it.  AOTInductor's compile traces the program again, and the graph module of that trace holds in its
    ``meta`` a clone of every buffer (``compile_fx``: "module parameters and buffers are not lifted ... So we clone
    them here"): the rotary tables and the whole KV cache.  Through the map those clones outlived the compile (a
    tiny model: a second copy of its cache, ``tests/integration/test_cpu_kernels.py``).  The map is read only
    during an export, so emptying it after one is safe; a torch without it has nothing to drop.
    """
    try:
        from torch.fx.experimental import proxy_tensor
    except ImportError:
        return 0
    traced = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if not isinstance(traced, dict):
        return 0
    dropped = len(traced)
    traced.clear()
    return dropped


def package_dir() -> Path:
    """Where packages are kept: ``aoti`` in inductor's cache directory (the project's cache, ``compile/inductor``,
    unless ``TORCHINDUCTOR_CACHE_DIR`` names another), so that an empty inductor cache compiles everything anew."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "aoti"


# Packages this process compiled and loaded from the cache (bench_peers' memory probe reports them beside
# inductor's FX graph cache counts: a cold cache leaves more resident than a warm one).
COUNTS = {"compiled": 0, "loaded": 0}


class PackagedStep:
    """One loaded package (a batch and cache length) whose constants are a model's tensors."""

    def __init__(self, runner, fqns: list[str], path):
        self.runner = runner
        self.fqns = fqns
        self.path = path
        self._run = runner.loader.boxed_run
        # The first layer's KVCache at the last bind (weakly): the pool hands out a bucket's caches as one set, so a
        # set made anew (evicted, or dropped after running out of memory) shows there and is bound before it is used.
        self._bound_cache = None

    def bind(self, model: nn.Module) -> None:
        """Point the package's constants at ``model``'s tensors (its weights and current KV caches; nothing copied)."""
        tensors = model_tensors(model)
        missing = [f for f in self.fqns if f not in tensors]
        if missing:
            raise RuntimeError(f"the package {self.path} wants tensors the model lacks: {missing[:3]}")
        self.runner.load_constants({f: tensors[f] for f in self.fqns}, check_full_update=True, user_managed=True)
        self._bound_cache = weakref.ref(_first_cache(model))

    def __call__(self, model: nn.Module, tokens, positions, key_valid, slot) -> torch.Tensor:
        """:func:`decode_step` on these inputs (``DecodeState.step_inputs`` of this package's shapes)."""
        if self._bound_cache is None or self._bound_cache() is not _first_cache(model):
            self.bind(model)
        return self._run([tokens, positions, key_valid, slot])[0]


def _first_cache(model: nn.Module):
    return model.model.layers[0].self_attn.cache


class PackagedDecode:
    """The decode step's packages per model (held weakly) and (batch, cache length), kept in ``directory`` (None:
    :func:`package_dir`, looked up at each build)."""

    def __init__(self, directory=None):
        self.directory = None if directory is None else Path(directory)
        self._steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def step_for(self, model: nn.Module, shape) -> PackagedStep | None:
        """The package for ``model`` at (batch, length) ``shape``, where :meth:`prepare` made one."""
        try:
            return self._steps.get(model, {}).get(tuple(shape))
        except TypeError:  # not weakly referable
            return None

    def prepare(self, model: nn.Module, batch: int, length: int) -> PackagedStep:
        """Build (or load from the cache) and bind the package for ``batch`` rows and a cache of ``length`` slots;
        bound again to the model's current caches where it exists."""
        steps = self._steps.setdefault(model, {})
        step = steps.get((batch, length))
        if step is None:
            step = steps[(batch, length)] = build(model, batch, length, self.directory or package_dir())
        step.bind(model)
        return step


def build(model: nn.Module, batch: int, length: int, directory: Path) -> PackagedStep:
    """Export :func:`decode_step` for ``model`` at these shapes, compile it into ``directory`` (unless a package
    of that key is there) and load it."""
    with warnings.catch_warnings():  # torch 2.13's export and package code still use a deprecated pytree class
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
        return _build(model, batch, length, directory)


def _build(model: nn.Module, batch: int, length: int, directory: Path) -> PackagedStep:
    import torch._inductor as inductor

    from .errors import first_line

    device = model.lm_head.weight.device
    with torch.no_grad():  # under the caller's inference mode: the KV caches it made are inference tensors
        program = torch.export.export(_DecodeModule(model), scratch_inputs(batch, length, device), strict=False)
    try:
        path = directory / f"{package_key(program, torch.get_num_threads())}.pt2"
        how = "loaded" if path.is_file() else "compiled"
        where = ""
        if how == "compiled":
            where = compile_apart(program, path)
        try:
            runner = inductor.aoti_load_package(str(path))
        except Exception as err:  # noqa: BLE001 - a kept package that cannot be loaded is compiled anew, once
            if how == "compiled":
                raise
            log.warning("the kept decode package %s cannot be loaded (%s): compiling it anew", path, first_line(err))
            how = "compiled"
            where = compile_apart(program, path)
            runner = inductor.aoti_load_package(str(path))
    finally:
        del program
        drop_export_trace_map()
    COUNTS[how] += 1
    log.info("decode step for batch %d, cache %d: AOTInductor package %s (%s)", batch, length, path,
             f"compiled in {where}" if where else how)
    return PackagedStep(runner, list(runner.get_constant_fqns()), path)


def compile_apart(program, path: Path) -> str:
    """Compile ``program`` into the package ``path`` in a forked child process (:mod:`vicuna_bench.apart`); where
    it ran.  A process that compiled its package in-process served with ~1.6x weights + KV resident against ~1.3x
    for one that loaded it (docs/PERFORMANCE.md, "Fourteenth pass").  The child shares the exported program and the
    weights (copy on write), traces nothing again, and writes this process's thread count into the code."""
    from . import apart

    _, where = apart.run(lambda: _compile_into(program, path, apart.code_threads()),
                         f"compiling the decode package {path.name}")
    return where


def _compile_into(program, path: Path, threads: int) -> None:
    """Compile ``program`` into the package ``path`` for ``threads`` intra-op threads: whole or absent (written
    under another name, then renamed, so a crash leaves no half-written package under the key, and a process that
    loaded the old file keeps it)."""
    import torch._inductor as inductor

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        inductor.aoti_compile_and_package(program, package_path=str(partial),
                                          inductor_configs={**INDUCTOR_CONFIGS, "cpp.threads": threads})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
