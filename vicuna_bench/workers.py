"""Running the ranks in-process: :class:`Engine` spawns N worker processes that each load their share once,
then serve many requests sent over pipes.

A worker that dies makes the next (or current) call raise :class:`EngineError` within seconds, naming how it
ended (exit code, or the signal and, for SIGKILL, the likely out-of-memory kill); closing the engine ends every
worker.  ``world_size == 1`` runs in the caller's process unless ``workers=True``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

import torch

from . import cpu_kernels, fit
from .errors import EngineError, UserError, VicunaBenchError
from .generation import GenerationRequest, GenerationResult, validate_prompts
from .rank_model import ModelHook, RankRunner, merge_rank_results
from .rank_setup import affinity, bind_this_rank, init_process_group
from .sharding import TensorParallel
from .spec import EngineSpec

log = logging.getLogger("vicuna_bench")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_parent(parent_pid: int) -> None:
    """End this worker if its parent goes away (even mid-collective)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _worker_main(spec: EngineSpec, rank: int, init_method: str, conn, parent_pid: int, timeout_s: float,
                 model_hook: ModelHook | None = None) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        cpu_kernels.adopt_bf16_probe(spec.cpu_gemm_probe)  # the parent measured it once: no rank probes again
        binding = bind_this_rank(spec, rank, spec.world_size)  # before anything is loaded
        tp = init_process_group(spec, rank, rank, init_method, timeout_s)
        runner = RankRunner(spec, rank, rank, tp, model_hook, binding)
        conn.send(("ready", runner.info()))
    except BaseException as exc:  # report, then exit: the parent raises it
        conn.send(("error", _portable(exc)))
        return
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):
            return
        if command == "close":
            return
        try:
            if command == "generate":
                stream = None
                if payload.stream and rank == 0:
                    stream = lambda ids: conn.send(("tokens", ids))  # noqa: E731
                result = runner.generate(payload, on_tokens=stream)
                if rank != 0:  # only rank 0's tokens/logits travel back
                    result.output_ids = []
                    result.logits = None
                elif result.logits is not None:
                    result.logits = [t.numpy() for t in result.logits]
                conn.send(("result", result))
            elif command == "bandwidth":
                conn.send(("result", runner.bandwidth()))
            else:
                conn.send(("error", EngineError(f"unknown command {command!r}")))
        except BaseException as exc:
            conn.send(("error", _portable(exc)))


def _collective_broke(exc: BaseException) -> bool:
    """Whether a rank's error reads as a collective whose peer went away (gloo/NCCL/HCCL transport errors)."""
    text = str(exc).lower()
    return not isinstance(exc, UserError) and any(
        word in text for word in ("gloo", "nccl", "hccl", "connection", "broken pipe", "timed out"))


def _portable(exc: BaseException) -> BaseException:
    """Keep our own errors as they are; wrap others with their traceback."""
    if isinstance(exc, VicunaBenchError):
        return exc
    return EngineError(f"worker failed: {exc!r}\n{traceback.format_exc()}")


class Engine:
    """N worker processes holding one model, serving many requests.

    Use as a context manager, or call :meth:`close`.  ``world_size == 1``
    runs in this process unless ``workers=True``.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        workers: bool | None = None,
        model_hook: ModelHook | None = None,
        start_timeout_s: float = 600.0,
        collective_timeout_s: float = 600.0,
    ):
        self.spec = spec
        self.args = spec.validate()
        self._procs: list = []
        self._conns: list = []
        self._local: RankRunner | None = None
        self.closed = False
        self.rank = 0  # the caller's process: rank 0's tokens come back here
        self.rank_info: list[dict] = []
        use_workers = spec.world_size > 1 if workers is None else workers
        log.info(
            "engine: model=%s world_size=%d device=%s dtype=%s max_seq_len=%d",
            spec.model_path, spec.world_size, spec.device, spec.dtype, spec.max_seq_len,
        )
        if not use_workers:
            # This process is the rank: bound while the engine is open, its own affinity given back on close.
            self._saved_affinity = affinity()
            binding = bind_this_rank(spec, 0, 1, set_threads=False)
            try:
                self._local = RankRunner(spec, 0, 0, TensorParallel(), model_hook, binding)
            except BaseException:
                self._restore_affinity()
                raise
            self.rank_info = [self._local.info()]
            return
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        for rank in range(spec.world_size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(spec, rank, init_method, child_conn, os.getpid(), collective_timeout_s, model_hook),
                name=f"vicuna-bench-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        try:
            self.rank_info = self._collect(deadline=time.monotonic() + start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- public API
    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs] if self._procs else [os.getpid()]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        *,
        on_tokens: Callable[[list[int]], None] | None = None,
        timeout_s: float | None = None,
        **options,
    ) -> GenerationResult:
        """Generate for token-id prompts (options: :class:`GenerationRequest`'s); timings the maximum over ranks (ms)."""
        request = GenerationRequest.make(prompts, max_new_tokens, stream=on_tokens is not None, **options)
        if self.closed:
            raise EngineError("engine is closed")
        if self._local is not None:
            return self._local.generate(request, on_tokens=on_tokens)
        validate_prompts(request.prompts, request.max_new_tokens, self.spec.max_seq_len, self.args.vocab_size)
        self._check_alive()
        for conn in self._conns:
            self._send(conn, ("generate", request))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = self._collect(deadline, on_tokens=on_tokens)
        for r in results:
            if r.logits is not None:  # numpy through the pipe
                r.logits = [torch.from_numpy(a) for a in r.logits]
        return merge_rank_results(results)

    def bandwidth(self) -> list[float]:
        """Each rank's memory bandwidth (bytes/s), probed on all ranks at once.

        Ranks sharing a host share its memory bus, so probing them together
        measures what each gets while the others run too.
        """
        if self.closed:
            raise EngineError("engine is closed")
        if self._local is not None:
            return [self._local.bandwidth()]
        self._check_alive()
        for conn in self._conns:
            self._send(conn, ("bandwidth", None))
        return self._collect(deadline=None)

    def close(self) -> None:
        """End every worker (politely, then by force)."""
        if self.closed:
            return
        self.closed = True
        if self._local is not None:
            self._restore_affinity()
        self._local = None
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, end - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals
    def _restore_affinity(self) -> None:
        saved = getattr(self, "_saved_affinity", None)
        if saved is not None:
            try:
                os.sched_setaffinity(0, saved)
            except OSError as exc:
                log.warning("engine: cannot restore this process's CPU affinity (%s)", exc)
            self._saved_affinity = None

    def _send(self, conn, message) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError, BrokenPipeError):
            rank = self._conns.index(conn)
            self._fail(self._death(rank))

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(self._death(rank))

    def _fail(self, why: str):
        self.close()
        raise EngineError(f"engine failed: {why}; all workers stopped")

    def _death(self, rank: int) -> str:
        """How worker ``rank`` ended: its exit code, or the signal that killed it and, for SIGKILL, the likely
        cause (the kernel's out-of-memory killer) with the rank's memory need."""
        proc = self._procs[rank]
        proc.join(timeout=5.0)  # its pipe closes a moment before its exit status is there
        who = f"worker rank {rank} (pid {proc.pid})"
        when = "while loading" if not self.rank_info else "while serving"
        code = proc.exitcode
        if code is None:
            return f"{who} closed its pipe {when} but is still running"
        if code >= 0:
            return f"{who} exited with code {code} {when}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        line = f"{who} was killed by {name} {when}"
        if -code == signal.SIGKILL:
            spec = self.spec
            need = fit.rank_need(self.args, spec.world_size, spec.dtype, spec.max_seq_len, spec.fit_batch,
                                 spec.device)
            line += (f": likely the kernel's out-of-memory killer (each rank holds {need.weight_bytes / 2**30:.2f} GiB "
                     f"of weights in {spec.dtype} + {need.kv_bytes / 2**30:.2f} GiB of KV cache; see dmesg)")
        return line

    def _signalled_rank(self, grace_s: float) -> int | None:
        """A worker a signal ended, waiting up to ``grace_s`` for one: the cause behind a peer's broken collective."""
        end = time.monotonic() + grace_s
        while True:
            for rank, proc in enumerate(self._procs):
                if proc.exitcode is not None and proc.exitcode < 0:
                    return rank
            alive = [p.sentinel for p in self._procs if p.exitcode is None]
            if not alive or time.monotonic() >= end:
                return None
            wait(alive, timeout=max(0.0, end - time.monotonic()))

    def _collect(self, deadline: float | None, on_tokens=None) -> list:
        """One reply per rank; raises as soon as any worker dies or reports an error."""
        replies: dict[int, Any] = {}
        by_conn = {id(c): r for r, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self._procs)}
        while len(replies) < len(self._conns):
            waiting = [c for r, c in enumerate(self._conns) if r not in replies]
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready = wait(waiting + list(by_sentinel), timeout=timeout)
            for obj in ready:
                if obj in by_sentinel:
                    continue  # a dead worker is handled below, after its last message
                rank = by_conn[id(obj)]
                try:
                    kind, payload = obj.recv()
                except (EOFError, OSError):
                    self._fail(self._death(rank))
                if kind == "tokens":
                    if on_tokens is not None:
                        on_tokens(payload)
                    continue
                if kind == "error":
                    killed = self._signalled_rank(grace_s=1.0 if _collective_broke(payload) else 0.0)
                    if killed is not None:  # the peer's error is only the echo of the killed rank
                        self._fail(self._death(killed))
                    self.close()
                    raise payload
                replies[rank] = payload
            if len(replies) < len(self._conns):
                self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                self._fail("timed out waiting for the workers")
        return [replies[r] for r in range(len(self._conns))]

