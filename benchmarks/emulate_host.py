"""Run a command as on a smaller host kind: ``avx512_bf16`` (no AMX) or ``avx2`` (no AVX-512), on a bigger host.

The peer table has a row per host kind (issue 33).  This sets, before the command starts, what every library that
picks its code by the CPU reads once, when first used (``vicuna_bench.cpu_isa.EMULATIONS``): our kernel build
without its AMX path (and for haswell, for avx2), ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``,
``ATEN_CPU_CAPABILITY``, and ``VICUNA_BENCH_EMULATE_HOST``, by which the package hides the flags that kind lacks from
its own choices and caps inductor's vector ISA (``vicuna_bench.compile.cap_inductor_isa``), and compiles into an
inductor cache of that kind.  Not capped: the memory system and the cores, and a peer's own build (llama.cpp).

    python benchmarks/emulate_host.py avx512_bf16 -- python benchmarks/bench_peers.py --dtype bf16 --rounds 3 ...
    python benchmarks/emulate_host.py avx2 -- python benchmarks/bench_batch.py --dtype fp32

A kind the host cannot stand in for (it lacks that kind's flags), or an unknown one: one line, exit 2.
"""

from __future__ import annotations

import os
import sys

from vicuna_bench import cpu_isa
from vicuna_bench.errors import UserError


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(f"usage: emulate_host.py {{{','.join(sorted(cpu_isa.EMULATIONS))}}} -- command [args...]",
              file=sys.stderr)
        return 2
    kind, command = argv[0], argv[2:]
    try:
        environ = cpu_isa.emulation_environ(kind, dict(os.environ), cpu_isa.read_cpu_flags())
    except UserError as err:
        print(f"emulate_host.py: {err}", file=sys.stderr)
        return 2
    caps = " ".join(f"{key}={value}" for key, value in cpu_isa.EMULATIONS[kind].env)
    print(f"emulate_host.py: {cpu_isa.ENV_EMULATE}={kind} {caps}", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, environ)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
