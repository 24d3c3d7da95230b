"""Compiling the decode step per device, and caching what compiling makes.

``--compile on`` replaces the eager prefill and
:func:`~vicuna_bench.generation.decode_step` by compiled ones.  Every device
compiles that same function, which writes no argument (its inputs advance in
``generation.DecodeState.advance``, outside any graph):

* CPU: inductor with ``max-autotune`` and a C++ wrapper (no Python
  between the step's kernels).  Its GEMMs and the decode attention are our
  kernels (:mod:`vicuna_bench.cpu_kernels`), extern calls that read the
  model's own weights, so nothing is frozen; only where those kernels are
  unavailable do bf16/fp16 freeze and prepack the weights
  (:func:`cpu_inductor_options`).  At world size 1 the decode step is an
  AOTInductor package called without dynamo, its constants the model's own
  tensors (:mod:`vicuna_bench.aoti`); elsewhere dynamo calls it;
* CUDA: ``max-autotune`` (CUDA graphs: one launch per step, and GEMMs
  autotuned per shape);
* NPU: torchair's GE or ACL graph for the decode step, through the API the
  installed torchair version has (:mod:`vicuna_bench.npu_graph`); any
  configuration it refuses leaves the step eager, with one log line.

The prefill is compiled with dynamic shapes (one graph for every prompt
length); the decode step's graphs depend on the batch and the KV cache
length.  Both are made ahead of the timed work by
:meth:`CompiledSteps.warm` (called by
``generate`` before the prefill clock starts) and their time is reported as
``compile_s``, never inside first/next-token figures.  Inductor's caches
live under the project's cache directory, so a second run reuses them.  On
CPU at world size 1 a graph new to the host is compiled in a forked child
(:mod:`vicuna_bench.apart`), which fills those caches; this process loads,
so what compiling leaves resident is not in the serving process.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
import weakref

import torch


log = logging.getLogger("vicuna_bench")

def cache_dir():
    """Where compiled artefacts are kept: ``<vicuna-bench cache>/compile``."""
    from .embedded import cache_root

    return cache_root() / "compile"


def _configure_inductor() -> None:
    import torch._inductor.config as inductor

    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: the directory is read from the environment when first used
        default_cache_dir = None
    # Inductor writes its default into the environment when first asked; a directory the user chose is kept.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    emulated = cap_inductor_isa()
    if chosen is None or (default_cache_dir and os.path.abspath(chosen) == os.path.abspath(default_cache_dir())):
        # An emulated host kind compiles into a directory of its own: inductor's FX graph cache keys do not hold the
        # vector ISA (torch 2.13 codecache.FxGraphHashDetails), so the real host's graphs, AMX GEMMs and all, would
        # be found there.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / ("inductor" if emulated is None else
                                                                   f"inductor-{emulated}"))

    if hasattr(inductor, "fx_graph_cache"):  # torch >= 2.2
        inductor.fx_graph_cache = True
    if hasattr(inductor, "autotune_local_cache"):
        inductor.autotune_local_cache = True
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inductor's own use of it
    # Autotuning prints a table per GEMM on stderr; our log line says what was compiled and how long it took.
    if hasattr(inductor, "max_autotune_report_choices_stats"):
        inductor.max_autotune_report_choices_stats = False
    try:
        import torch._inductor.select_algorithm as select_algorithm

        select_algorithm.PRINT_AUTOTUNE = False
    except ImportError:
        pass


def cap_inductor_isa() -> str | None:
    """Under an emulated host kind (:func:`vicuna_bench.cpu_isa.emulation`), inductor's vector ISAs less those the
    kind lacks, so that its generated code and GEMM templates are that kind's; returns the kind, or None.

    Inductor picks its ISA from cpuid (``torch._inductor.cpu_vec_isa.valid_vec_isa_list``, AMX first wherever the
    host has it) and reads no cap but ``ATEN_CPU_CAPABILITY``, whose ``avx512`` still selects AMX; every pick goes
    through that module's ``valid_vec_isa_list`` (torch 2.13), so it is replaced there, once a process."""
    from . import cpu_isa

    emu = cpu_isa.emulation()
    if emu is None:
        return None
    from torch._inductor import cpu_vec_isa

    if getattr(cpu_vec_isa.valid_vec_isa_list, "emulated_kind", None) != emu.kind:
        real = getattr(cpu_vec_isa.valid_vec_isa_list, "real", cpu_vec_isa.valid_vec_isa_list)

        @functools.cache
        def capped():
            return [isa for isa in real() if not set(str(isa).split()) & set(emu.inductor_lacks)]

        capped.real, capped.emulated_kind = real, emu.kind
        cpu_vec_isa.valid_vec_isa_list = capped
        left = capped()  # (str, never bool: a VecISA's truth value compiles a probe)
        log.info("inductor's vector ISAs capped to a host with %s: %s (%s=%s)", emu.kind,
                 ", ".join(str(isa) for isa in left) or "none", cpu_isa.ENV_EMULATE, emu.kind)
    return emu.kind


# Dynamo keeps one compiled entry per (rank model, batch, KV cache length) of the decode step and per
# (model, batch > 1) of the prefill.  Its default limit of 8 entries per function is reached by a process that
# builds several engines or serves many batch shapes (a precision run's buckets, the nightly, a test session), and
# under fullgraph=True reaching it is an error, not a fallback.
RECOMPILE_LIMIT = 256


def _raise_recompile_limits() -> None:
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    total = "accumulated_recompile_limit" if hasattr(dynamo, "accumulated_recompile_limit") else \
        "accumulated_cache_size_limit"
    if hasattr(dynamo, total):
        setattr(dynamo, total, max(getattr(dynamo, total), 4 * RECOMPILE_LIMIT))


class CompiledSteps:
    """Prefill and decode step compiled for one device (the interface of ``generation.EagerSteps``).

    The decode step is compiled for static shapes, once per (batch, cache
    length); the prefill with dynamic shapes (any prompt length, one graph
    for batch 1 and one for larger batches).  :meth:`warm` makes the graphs
    a request needs before its timed work; ``compile_s`` accumulates.

    ``warm_calls``: how many calls of a new shape a backend needs before the
    next call only replays what it made (inductor without graphs: 1, it
    compiles on the first; CUDA graph trees: 2, the first runs eagerly and
    the second records).  Set by :func:`compiled_steps` per backend.
    """

    def __init__(self, prefill_fn, decode_fn, description: str, warm_calls: int = 1, skip_guards: bool = False,
                 packaged=None, prefill_apart: dict | None = None):
        self._prefill = prefill_fn
        self.decode_fn = decode_fn  # generation.decode_step, compiled
        self.description = description
        self.warm_calls = warm_calls
        self.compile_s = 0.0
        # The graphs warm() made, per rank model (held weakly): ("prefill", batch > 1, batch, length) and
        # ("decode", batch, length), each with the cache addresses it was made for (cache_addresses).
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # skip_guards: a decode step of a (model, batch, cache length) that warm() compiled runs without dynamo's
        # full guard check (see decode()).
        self.skip_guards = skip_guards and SKIP_GUARD_EVAL_SUPPORTED
        # packaged (an aoti.PackagedDecode): the decode step of each warmed shape is an AOTInductor package, called
        # without dynamo; None where the step goes through dynamo (vicuna_bench/aoti.py says where and why).
        self.packaged = packaged
        # prefill_apart (the inductor settings the prefill compiles under, or None): a prefill shape this host has
        # not compiled before (no mark, prefill_mark) is compiled in a forked child first, which fills inductor's
        # caches; this process then loads from them.
        self.prefill_apart = prefill_apart

    def prefill(self, model, tokens, positions, key_valid, start: int):
        from .generation import prefill_logits
        from .model import traced_plain_causal

        if self._prefill is not None and traced_plain_causal(tokens, start) \
                and not bool(key_valid[:, :tokens.shape[1]].all()):
            # That graph attends causal alone: padding there would be attended.
            raise ValueError("a one-row prefill from slot 0 has padding; the compiled prefill takes one row as whole")
        return (self._prefill or prefill_logits)(model, tokens, positions, key_valid, start)

    def decode(self, model, state):
        """The compiled :func:`~vicuna_bench.generation.decode_step` on ``state``'s inputs (advances nothing).

        With ``skip_guards``, a shape :meth:`warm` compiled for this very model runs under dynamo's
        ``skip_guard_eval_unsafe`` stance: only the guards that tell its cache entries apart are checked, not
        every guard of the entry (its cost: docs/PERFORMANCE.md, "Compile options on CPU").
        That is safe here because every call of a warmed shape passes the same kind of inputs (DecodeState's
        tensors: dtypes, strides and device fixed) with the same model, and the graph's own wrapper still asserts
        each input's sizes and strides.  A shape or model not warmed runs the full check (and compiles).
        """
        inputs = state.step_inputs()
        if self.packaged is not None:
            packaged = self.packaged.step_for(model, state.key_valid.shape)
            if packaged is not None:
                return packaged(model, *inputs)
        if self.skip_guards and ("decode", *state.key_valid.shape) in self._graphs_of(model) and _default_stance():
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.decode_fn(model, *inputs)
        return self.decode_fn(model, *inputs)

    @staticmethod
    def _compiled_namespace() -> dict:
        """Where dynamo installs the compiled prefill's and decode step's code: their module's namespace."""
        from . import generation

        return vars(generation)

    def _package(self, model, batch: int, length: int) -> bool:
        """Make (or bind again) the decode step's package for this shape; False, said once, where that fails:
        this and every later shape then go through dynamo."""
        if self.packaged is None:
            return False
        try:
            self.packaged.prepare(model, batch, length)
            return True
        except Exception as err:  # noqa: BLE001 - any failure leaves the dynamo step, said in one line
            from .errors import first_line

            self.packaged = None
            self.description = self.description.replace(PACKAGED_DECODE, f"decode {CPU_DECODE_MODE} through dynamo "
                                                        f"(the AOTInductor package failed: {first_line(err)})")
            log.warning("the decode step's AOTInductor package failed for batch %d, cache %d (%s): the step goes "
                        "through dynamo from now on", batch, length, first_line(err))
            return False

    def _prefill_in_child(self, model, tokens, valid, batch: int, length: int) -> None:
        """Compile the prefill for this shape in a forked child, unless this host's caches are marked as holding it
        (:func:`prefill_mark`); its graph counts join :data:`CHILD_GRAPHS`.  A child that fails is said in one
        line, and the prefill compiles here as before."""
        from . import apart
        from .errors import first_line

        mark = prefill_mark(model, batch, length, self.prefill_apart)
        if mark.exists():
            return

        def compile_prefill() -> dict:
            from torch._dynamo.utils import counters

            before = dict(counters["inductor"])
            self._prefill(model, tokens, torch.zeros_like(tokens), valid, 0)
            return {key: counters["inductor"][f"fxgraph_cache_{key}"] - before.get(f"fxgraph_cache_{key}", 0)
                    for key in ("hit", "miss")}

        try:
            graphs, _ = apart.run(compile_prefill, f"compiling the prefill for batch {batch}, cache {length}")
        except RuntimeError as err:
            log.warning("%s: compiling it in this process", first_line(err))
            return
        for key in CHILD_GRAPHS:
            CHILD_GRAPHS[key] += int(graphs.get(key, 0))
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        log.info("prefill for batch %d, cache %d: compiled in a child process (%d graph(s) compiled, %d from the "
                 "cache), loaded here", batch, length, graphs.get("miss", 0), graphs.get("hit", 0))

    def _graphs_of(self, model) -> dict:
        try:
            return self._seen.get(model, {})
        except TypeError:  # not weakly referable: not a module warm() saw
            return {}

    def warm(self, model, batch: int, length: int, sync=lambda: None) -> float:
        """Compile and record for ``batch`` rows and a cache of ``length`` slots now, once per shape; seconds spent.

        Each graph a shape needs is called ``warm_calls`` times, so that the
        first timed call of that shape replays: no compiling or graph
        recording inside first/next-token times.  The calls run on scratch
        inputs and write garbage keys/values into the cache (slots 0..1 for
        the prefill, ``length - 1`` for the decode step; every repeat the
        same slots) that no real token reads: the real prefill rewrites its
        slots, and a slot's ``key_valid`` (the request's own tensor, not the
        scratch one here) stays false until :meth:`DecodeState.advance` marks
        it for the real token written there.

        A shape is warm for the cache set it was warmed on: a set made anew
        (evicted from the pool, or dropped after running out of memory) sits
        at other addresses, which a recorded graph does not follow, so it is
        warmed again.  Every rank of a tensor-parallel group makes the same
        calls (the model's collectives run in them): a shape one rank must
        warm is warmed on all.
        """
        from .generation import DecodeState

        started = time.perf_counter()
        device = model.lm_head.weight.device
        calls = max(1, int(self.warm_calls))
        made = []
        seen = self._seen.setdefault(model, {})
        addresses = cache_addresses(model)
        prefill_key = ("prefill", batch > 1, batch, length)
        decode_key = ("decode", batch, length)
        warm_prefill, warm_decode = _on_any_rank(model, [
            self._prefill is not None and seen.get(prefill_key) != addresses, seen.get(decode_key) != addresses])
        with torch.inference_mode():
            if warm_prefill:
                tokens = torch.zeros((batch, 2), dtype=torch.long, device=device)
                valid = torch.zeros((batch, length), dtype=torch.bool, device=device)
                if self.prefill_apart is not None:
                    self._prefill_in_child(model, tokens, valid, batch, length)
                for _ in range(calls):
                    self._prefill(model, tokens, torch.zeros_like(tokens), valid, 0)
                seen[prefill_key] = addresses
                made.append("prefill")
                drop_traced_graphs(self._compiled_namespace())  # before the decode step compiles: it reuses the space
            if warm_decode and self._package(model, batch, length):
                seen[decode_key] = addresses
                made.append("decode step (AOTInductor package)")
            elif warm_decode:
                scratch_valid = torch.zeros((batch, length), dtype=torch.bool, device=device)
                # advance() marks the scratch slot valid: a row with no valid key attends over nothing (NaN), the
                # next layers write NaN keys/values, and a later read of that masked slot multiplies NaN by 0.
                state = DecodeState.after_prefill(scratch_valid, length - 2,
                                                  torch.zeros((batch, 1), dtype=torch.long, device=device))
                state.advance(torch.zeros(batch, dtype=torch.long, device=device))
                for _ in range(calls):  # not advanced again: every repeat writes the same scratch slot
                    self.decode(model, state)
                seen[decode_key] = addresses
                made.append("decode step")
                drop_traced_graphs(self._compiled_namespace())
        if not made:
            return 0.0
        sync()
        release_freed_heap()
        spent = time.perf_counter() - started
        self.compile_s += spent
        log.info("compiled the %s (%s) for batch %d, cache %d, %d call(s) each: %.1f s", " and ".join(made),
                 self.description, batch, length, calls, spent)
        return spent


# Inductor's FX graph cache hits and misses inside the children that compiled prefill graphs (bench_peers' memory
# probe counts the graphs compiled anew; the child's misses are loaded here as hits).
CHILD_GRAPHS = {"hit": 0, "miss": 0}


def prefill_mark(model, batch: int, length: int, settings: dict):
    """The file that says this host's caches hold the compiled prefill for ``model``'s graph at this shape: kept in
    inductor's cache directory (emptied with it), named by a digest of what decides that graph (torch, our
    package's source and kernel build, every tensor's name, shape, dtype and stride, the shape, and the prefill's
    inductor settings: ``settings`` with :func:`prefill_thread_options`).  A mark that outlives its graph (a cache
    pruned by hand) costs a compile here, as before; a missing one costs a trace in a child."""
    from . import aoti, cpu_kernels

    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    key = aoti.key_digest(torch.__version__, _source_digest(), cpu_kernels.build_key(),
                          "\n".join(aoti.tensor_meta(name, t) for name, t in tensors), f"{batch}:{length}",
                          repr(sorted({**settings, **prefill_thread_options()}.items())))
    return aoti.package_dir().parent / "prefill-marks" / key


@functools.cache
def _source_digest() -> str:
    """A digest of this package's Python source (what the traced graph is made of), read once per process."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_addresses(model) -> tuple[int, ...]:
    """``data_ptr`` of every layer's key and value cache in use: the addresses a recorded graph holds."""
    layers = getattr(getattr(model, "model", None), "layers", ())
    caches = [layer.self_attn.cache for layer in layers]
    return tuple(t.data_ptr() for cache in caches if cache is not None for t in (cache.k, cache.v))


def _on_any_rank(model, flags: list[bool]) -> list[bool]:
    """``flags`` OR-ed over the model's tensor-parallel group (one small all-reduce; alone: as they are)."""
    tp = getattr(model, "tp", None)
    if tp is None or tp.world_size == 1:
        return list(flags)
    # float32: a dtype every backend's all-reduce takes (gloo, NCCL, HCCL)
    votes = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=model.lm_head.weight.device)
    return [v > 0 for v in tp.all_reduce(votes).tolist()]


def _skip_guard_eval_supported() -> bool:
    """Whether this torch has ``torch.compiler.set_stance(..., skip_guard_eval_unsafe=)`` (2.7 and later)."""
    import inspect

    stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if stance is None:
        return False
    try:
        return "skip_guard_eval_unsafe" in inspect.signature(stance).parameters
    except (TypeError, ValueError):
        return False


SKIP_GUARD_EVAL_SUPPORTED = _skip_guard_eval_supported()


def _default_stance() -> bool:
    """True unless the user set another compiler stance (force_eager, a forced backend...): theirs is kept."""
    try:
        from torch._dynamo.eval_frame import _stance
    except ImportError:
        return False
    return _stance.stance == "default" and _stance.backend is None and not _stance.skip_guard_eval_unsafe


# What aot_module_simplified (torch/_functorch/aot_autograd.py, torch 2.0-2.13) sets on the forward it returns,
# "just for convenience": bound methods of the GraphModule dynamo traced.
_TRACED_GRAPH_METHODS = ("zero_grad", "named_parameters", "named_buffers")


def drop_traced_graphs(namespace: dict) -> int:
    """Let the FX graphs dynamo traced be freed once they are compiled; how many references were dropped.

    Dynamo installs each compiled graph in the compiled function's globals
    (``__compiled_fn_<n>_<uuid>``): AOTAutograd's forward, under wrappers
    that copy its ``__dict__`` (``functools.wraps``) and keep it as
    ``__wrapped__``.  That forward carries three bound methods of the traced
    GraphModule, which pin the whole traced graph: every node with its
    metadata, fake tensors and stack traces (SmolLM2's prefill and decode
    graphs: 5,600 nodes, 20 MiB of Python objects, docs/PERFORMANCE.md
    "Seventh pass").  Nothing calls them: the compiled code runs from
    inductor's output, and the parameters reach it as arguments.  Only those
    three attributes are removed, and only where they are bound to a
    GraphModule; another torch that holds the graph elsewhere keeps it (and
    the count says 0).
    """
    import torch.fx

    dropped = 0
    for name, value in list(namespace.items()):
        if not name.startswith("__compiled_fn"):
            continue
        seen: set[int] = set()
        while value is not None and id(value) not in seen:  # the wrapper chain down to the forward
            seen.add(id(value))
            attrs = getattr(value, "__dict__", None)
            if not isinstance(attrs, dict):
                break
            for attr in _TRACED_GRAPH_METHODS:
                if isinstance(getattr(attrs.get(attr), "__self__", None), torch.fx.GraphModule):
                    del attrs[attr]
                    dropped += 1
            value = attrs.get("__wrapped__")
    if dropped:
        import gc

        gc.collect()  # a traced graph is a web of cycles (nodes <-> graph): only the collector frees it
    return dropped


def release_freed_heap() -> None:
    """Hand the heap pages compiling freed back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Tracing and code generation allocate and free a few hundred MB of small
    objects; glibc keeps those pages resident, so a compiled engine held
    ~240 MB more than an eager one (SmolLM2 fp32: RSS growth 1.45x weights + KV
    against 1.06x eager) with nothing live in them.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own libc (find_library forks)
    except OSError:
        trim = None
    if trim is not None:  # glibc; elsewhere the allocator decides
        trim(0)


CUDA_GRAPH_TREE_WARM_CALLS = 2  # calls before a CUDA graph tree replays: one eager warm-up, one recording
PACKAGED_DECODE = "decode an AOTInductor package (no dynamo, the model's own weights)"
CPU_DECODE_MODE = "max-autotune-no-cudagraphs"  # inductor's C++ micro-GEMMs autotuned against MKL per shape


def cpu_inductor_options(world_size: int = 1, dtype: str = "fp32") -> dict:
    """Inductor settings of a CPU decode step, by dtype and world size.

    * ``freezing`` (weights become graph constants; inductor prepacks those of
      its own GEMMs): never with our CPU kernels loaded.  Every product is then
      our op, which would read the constants in place (one weight copy either
      way), but frozen graphs cost ~76 MiB more resident memory that is not a
      tensor (SmolLM2 bf16: RSS growth 1.64x weights + KV frozen, 1.34x
      unfrozen) for a step within 1-5% of the unfrozen one (four engines built
      unfrozen, frozen, frozen, unfrozen in one process, timed in alternation:
      frozen / unfrozen bf16 0.992 at batch 1 and 0.993 at batch 8, fp32 0.952
      and 0.975; ``benchmarks/bench_freeze.py``, docs/PERFORMANCE.md, sixth
      pass).  Without the kernels, for bf16/fp16, where the GEMM kernels want
      packed weights; in fp32 it buys nothing and the frozen graphs keep their
      own copies of the weights.
    * a C++ wrapper: no Python between the ~200 small kernels of a step.  It
      cannot wrap the collectives that tensor parallelism puts in the graph
      (torch 2.13: "arg type Any").

    The measurements behind both: docs/PERFORMANCE.md, "Compile options on CPU".
    """
    from . import cpu_kernels

    # With the small-M GEMM every product reads the model's own weights, frozen or not: unfrozen holds less memory.
    freeze = not cpu_kernels.load() and dtype != "fp32"  # loaded here too: the model may be built after this
    return {"freezing": freeze, "cpp_wrapper": world_size == 1}


def configure_cpu_inductor(world_size: int = 1, dtype: str = "fp32") -> None:
    """Set :func:`cpu_inductor_options` process-wide (``benchmarks/bench_gemm.py`` compiles under them)."""
    import torch._inductor.config as inductor

    _configure_inductor()
    for key, value in cpu_inductor_options(world_size, dtype).items():
        setattr(inductor, key, value)


def sizes_apart(fn):
    """``fn`` traced with a symbol of its own for every dynamic size, so that no two sizes are tied by equality.

    By default dynamo gives sizes of equal value one symbol ("duck shapes",
    ``torch.fx.experimental._config.use_duck_shape``) and guards on that
    equality.  The prefill is warmed on a 2-token scratch prompt; at batch 2
    its graph held batch == prompt length, so the first real prompt of batch 2
    recompiled inside the timed prefill.  Apart, one graph serves every prompt
    length of 2 or more at every batch of 2 or more.
    """
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # torch < 2.2: the setting lived elsewhere; duck shapes stay
        return fn
    if not hasattr(fx_config, "use_duck_shape"):
        return fn

    def call(*args, **kwargs):
        with fx_config.patch(use_duck_shape=False):
            return fn(*args, **kwargs)

    return call


def under_inductor_options(fn, at_call=None, **options):
    """``fn`` called under these inductor settings, so the graphs it compiles (lazily, on a call) get them
    whatever other engines in the process set; ``at_call()``, where given, adds settings read at each call."""
    import torch._inductor.config as inductor

    def call(*args, **kwargs):
        now = {**options, **at_call()} if at_call is not None else options
        if all(_setting(inductor, key) == value for key, value in now.items()):
            return fn(*args, **kwargs)  # the usual case (one engine): no patch, ~25 us less per decode step
        with inductor.patch(now):
            return fn(*args, **kwargs)

    return call


def _setting(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def prefill_thread_options() -> dict:
    """Inductor settings of the CPU prefill for threads: code generated for :func:`apart.code_threads` threads,
    its parallel regions sized when they run.  So the graph a forked child compiles at one thread (apart's rules)
    is the one this process would compile, under the same cache key, and the child can run it."""
    from . import apart

    return {"cpp.threads": apart.code_threads(), "cpp.dynamic_threads": True}


def compiled_steps(device: str, world_size: int, dtype: str = "fp32", npu_graph: str = "auto",
                   chip_family: str | None = None):
    """The prefill and decode step for ``--compile on`` on ``device``: CompiledSteps, or eager (logged).

    NPU: ``npu_graph`` (auto | ge | aclgraph) for ``chip_family`` through
    the API the installed torchair has (:mod:`vicuna_bench.npu_graph`).
    """
    from .generation import EAGER, decode_step, prefill_logits

    _raise_recompile_limits()
    if device == "npu":
        from .npu_graph import compile_decode

        graph = compile_decode(decode_step, npu_graph, chip_family, world_size)
        if graph is None:
            return EAGER
        steps = CompiledSteps(None, graph.step, f"{graph.description} (decode step)")
        steps.warm_calls = graph.warm_calls  # the calls a new shape needs before the next one replays
        graph.step.on_fallback = lambda why: setattr(steps, "description", f"eager after {graph.description} failed")
        return steps
    _configure_inductor()
    # Collectives (world size > 1) may break the graph; one rank's step must be whole.
    fullgraph = world_size == 1
    if device == "cuda":
        # max-autotune = CUDA graphs + GEMMs autotuned per shape (docs/PERFORMANCE.md, "GPU").
        # The graph is recorded because the step writes no input but the module's buffers (the KV cache).
        graphed = torch.compile(decode_step, mode="max-autotune", fullgraph=fullgraph, dynamic=False)
        prefill = sizes_apart(torch.compile(prefill_logits, dynamic=True))
        steps = CompiledSteps(prefill, graphed, "inductor max-autotune, CUDA graphs")
        # CUDA graph trees (torch/_inductor/cudagraph_trees.py) run a function's first call eagerly as a warm-up
        # and record on its second; only the third replays.
        steps.warm_calls = CUDA_GRAPH_TREE_WARM_CALLS
        return steps
    configure_cpu_inductor(world_size, dtype)  # process-wide too, so the per-call check finds nothing to patch
    options = cpu_inductor_options(world_size, dtype)
    from . import aoti, cpu_kernels

    not_packaged = aoti.why_not(device, world_size, cpu_kernels.load())
    decode = torch.compile(decode_step, mode=CPU_DECODE_MODE, fullgraph=fullgraph, dynamic=False)
    # Compiling the prefill fuses the elementwise work around its GEMMs, in one graph for every prompt length.
    prefill = sizes_apart(torch.compile(prefill_logits, dynamic=True))
    frozen = ", freezing" if options["freezing"] else ""
    wrapper = ", C++ wrapper" if options["cpp_wrapper"] else ""
    if SKIP_GUARD_EVAL_SUPPORTED:
        guards = ", warmed decode shapes skip the full guard check"
    else:
        guards = ""
        log.info("torch %s has no skip_guard_eval_unsafe stance (2.7+): every decode step runs dynamo's full guard "
                 "check", torch.__version__)
    if not_packaged is None:
        how = f"{PACKAGED_DECODE}, prefill dynamic{frozen}{wrapper}"
    else:
        how = f"decode {CPU_DECODE_MODE} through dynamo (no AOTInductor package: {not_packaged}), prefill dynamic" \
              f"{frozen}{wrapper}{guards}"
    log.info("CPU compile: %s", how)
    from . import apart

    # At world size 1, unfrozen (frozen graphs bypass inductor's cache), a prefill graph new to this host is
    # compiled in a forked child first: what compiling leaves resident goes with it (CompiledSteps.warm).
    apart_here = world_size == 1 and not options["freezing"] and apart.available()
    return CompiledSteps(under_inductor_options(prefill, prefill_thread_options, **options),
                         under_inductor_options(decode, **options), f"inductor: {how}", skip_guards=True,
                         packaged=aoti.PackagedDecode() if not_packaged is None else None,
                         prefill_apart=options if apart_here else None)
