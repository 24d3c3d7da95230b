"""Real-size loading: a random Llama-2-7B-shaped checkpoint in the lmsys layout, cut, and run, with the wall
time and the peak memory of every step.

``make`` writes the checkpoint (config.json in the legacy dialect lmsys ships, generation_config.json, two
zip ``pytorch_model-0000N-of-00002.bin`` shards of fp16 N(0, 0.02) weights, their index): the shards' layout
is saved with ``torch.serialization.skip_data`` and each tensor's bytes are generated and written into its
record one at a time, so making 13.5 GB takes the memory of one tensor.  ``--shape 13b`` writes the 13B shape
(26 GB, three shards) for hosts that hold it.

``cut`` and ``run`` start the ``vicuna-bench`` CLI in a subprocess and sample the memory in use on the host
(MemTotal - MemAvailable, every 0.2 s); a row prints the wall time, the peak growth over what was in use
before, and that peak over the weights in the run's dtype, against the goals (docs/PERFORMANCE.md):
``run`` <= 1.2x the weights + 1 GB per rank process, ``cut`` <= 2 GB.  Every row is appended to ``--results``
(JSON lines) and ``table`` prints them as markdown.  Run each step alone on the host (``vb-quiet``): the
memory figure is the whole host's.

    python benchmarks/bench_load.py make --dir /work/bigckpt/llama2-7b
    python benchmarks/bench_load.py cut --dir /work/bigckpt/llama2-7b --world-size 8
    python benchmarks/bench_load.py run --dir /work/bigckpt/llama2-7b --world-size 2 --dtype bf16
    python benchmarks/bench_load.py run --dir /work/bigckpt/llama2-7b-cut8 --world-size 8 --dtype fp16
    python benchmarks/bench_load.py run ... --code /work/main   # the same step on another checkout's code
    python benchmarks/bench_load.py table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
GIB = 2**30

SHAPES = {  # lmsys/vicuna-7b-v1.5 and -13b-v1.5 (Llama-2), with their shard counts; "test": a small one
    "test": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=2, shards=2),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32, shards=2),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40, shards=3),
}


def legacy_config(shape: str) -> dict:
    """config.json as lmsys ships it for Vicuna v1.5 (transformers 4.31 dialect)."""
    s = SHAPES[shape]
    return {
        "_name_or_path": f"vicuna-{shape}-v1.5", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": s["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": s["intermediate_size"], "max_position_embeddings": 4096, "model_type": "llama",
        "num_attention_heads": s["num_attention_heads"], "num_hidden_layers": s["num_hidden_layers"],
        "num_key_value_heads": s["num_attention_heads"], "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 32000,
    }


def tensor_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order lmsys's shards hold them."""
    s = SHAPES[shape]
    h, i, v = s["hidden_size"], s["intermediate_size"], 32000
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_checkpoint(directory: Path, shape: str = "7b", seed: int = 0) -> dict:
    """Write the random fp16 checkpoint; returns its index.  Memory: one tensor at a time."""
    import torch
    from torch.serialization import skip_data

    directory.mkdir(parents=True, exist_ok=False)
    names = tensor_shapes(shape)
    total = sum(2 * _numel(s) for _, s in names)
    shards = SHAPES[shape]["shards"]
    per_shard = -(-total // shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in names:  # fill shards in order up to an equal share, as save_pretrained's max_shard_size does
        if size >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, s))
        size += 2 * _numel(s)
    weight_map = {}
    g = torch.Generator().manual_seed(seed)
    for k, group in enumerate(groups, 1):
        fname = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin"
        path = directory / fname
        layout = {name: torch.empty(s, dtype=torch.float16) for name, s in group}  # never touched: no memory
        with skip_data():
            torch.save(layout, path)
        del layout
        reader = torch._C.PyTorchFileReader(str(path))
        keys = {name: str(n) for n, (name, _) in enumerate(group)}  # torch.save numbers storages in dict order
        fd = os.open(path, os.O_WRONLY)
        try:
            for name, s in group:
                t = torch.ones(s, dtype=torch.float16) if len(s) == 1 else torch.empty(s, dtype=torch.float16).normal_(
                    0.0, 0.02, generator=g)
                data = t.view(torch.uint8).numpy()
                offset = reader.get_record_offset(f"data/{keys[name]}")
                view = memoryview(data).cast("B")
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                weight_map[name] = fname
                del t, data
        finally:
            os.close(fd)
        _check_shard(path, group)
        print(f"wrote {path} ({path.stat().st_size / GB:.2f} GB)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(legacy_config(shape), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}, indent=2) + "\n")
    return index


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_shard(path: Path, group: list[tuple[str, tuple[int, ...]]]) -> None:
    """Read the shard back: norms are ones and matrices N(0, 0.02), so every tensor's bytes sit in its record."""
    import torch

    state = torch.load(path, mmap=True, weights_only=True)
    for name, shape in group:
        t = state[name]
        if tuple(t.shape) != shape or t.dtype != torch.float16:
            raise RuntimeError(f"{path}: {name} is {tuple(t.shape)} {t.dtype}")
        sample = t.reshape(-1)[:: max(1, t.numel() // 4096)].float()
        ok = bool((sample == 1).all()) if len(shape) == 1 else abs(float(sample.std()) - 0.02) < 0.002
        if not ok:
            raise RuntimeError(f"{path}: {name} does not hold what was written")


# ---------------------------------------------------------------- measuring a step

def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def in_use_bytes() -> int:
    """Memory in use on the host: MemTotal - MemAvailable (page cache not counted)."""
    m = _meminfo()
    return m["MemTotal"] - m["MemAvailable"]


def _tree_anon_bytes(pid: int) -> int:
    """Anonymous memory (RssAnon) of process ``pid`` and all its descendants, bytes (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(command: list[str], env: dict, interval_s: float = 0.2, cwd: str | None = None) -> dict:
    """Run ``command``, sampling every ``interval_s``: the host's memory in use (its growth over the start: the
    goal's figure, which other processes on the host disturb) and the anonymous memory of the command's own
    process tree (undisturbed); wall time (s), exit code."""
    before = in_use_bytes()
    peak = before
    tree_peak = 0
    done = threading.Event()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)

    def sample():
        nonlocal peak, tree_peak
        while not done.wait(interval_s):
            peak = max(peak, in_use_bytes())
            tree_peak = max(tree_peak, _tree_anon_bytes(proc.pid))

    thread = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    thread.start()
    _, stderr = proc.communicate()
    wall = time.monotonic() - started
    done.set()
    thread.join()
    peak = max(peak, in_use_bytes())
    tail = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "in_use_before_gib": round(before / GIB, 2),
            "peak_growth_bytes": peak - before, "tree_anon_peak_gib": round(tree_peak / GIB, 2),
            "last_line": tail[-1] if tail else "", "stderr": stderr[-4000:]}


def _cli(code: Path, args: list[str]) -> tuple[list[str], dict]:
    """The CLI of checkout ``code``: run it with ``cwd=code`` too, since ``python -m`` puts the working
    directory before PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(code), PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "vicuna_bench", *args], env


def weight_bytes(directory: Path, dtype: str) -> int:
    """All ranks' weights together in ``dtype`` (2 bytes for fp16/bf16, 4 for fp32)."""
    cfg = directory / "config.json"
    if not cfg.is_file():
        cfg = directory / "part_model" / "0" / "config.json"
    s = json.loads(cfg.read_text())
    h, i, v, n = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    params = 2 * v * h + n * (4 * h * h + 3 * i * h + 2 * h) + h
    return params * (4 if dtype == "fp32" else 2)


def _host() -> dict:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags.update(w for w in line.split() if w in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return {"cpus": os.cpu_count(), "mem_total_gib": round(_meminfo()["MemTotal"] / GIB, 1),
            "cpu_flags": " ".join(sorted(flags))}


def record(results: Path, row: dict) -> None:
    row = {**row, "host": _host(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: v for k, v in row.items() if k not in ("stderr", "host")}
    print(json.dumps(shown))
    if row["exit"] not in (0, 2):
        print(row["stderr"], file=sys.stderr)


def step_run(ns) -> dict:
    directory = Path(ns.dir)
    args = ["run", "--model-path", str(directory), "--world-size", str(ns.world_size), "--device", "cpu",
            "--dtype", ns.dtype, "--max-seq-len", str(ns.max_seq_len), "--prompt-ids", "1,450,7483,310,3444,338",
            "--max-new-tokens", "4", "--ignore-eos", "--compile", "off", "--json"]
    command, env = _cli(Path(ns.code), args)
    row = measure(command, env, cwd=ns.code)
    weights = weight_bytes(directory, ns.dtype)
    goal = 1.2 * weights + 1 * GB * ns.world_size
    row.update(step="run", dir=str(directory), code=str(ns.code), world_size=ns.world_size, dtype=ns.dtype,
               max_seq_len=ns.max_seq_len, weights_gib=round(weights / GIB, 2),
               peak_gib=round(row["peak_growth_bytes"] / GIB, 2),
               peak_over_weights=round(row["peak_growth_bytes"] / weights, 3),
               goal=f"<= {goal / GIB:.2f} GiB", met=row["exit"] == 0 and row["peak_growth_bytes"] <= goal)
    if row["exit"] == 2:  # a refusal: the goal is that it comes before loading
        row["met"] = "refused" in ns.expect and row["wall_s"] < 60
    return row


def step_cut(ns) -> dict:
    directory = Path(ns.dir)
    out = Path(ns.output_dir or f"{directory}-cut{ns.world_size}")
    command, env = _cli(Path(ns.code), ["cut", "--input-dir", str(directory), "--output-dir", str(out),
                                        "--world-size", str(ns.world_size)])
    row = measure(command, env, cwd=ns.code)
    row.update(step="cut", dir=str(directory), output=str(out), code=str(ns.code), world_size=ns.world_size,
               peak_gib=round(row["peak_growth_bytes"] / GIB, 2), goal="<= 2 GB",
               met=row["exit"] == 0 and row["peak_growth_bytes"] <= 2 * GB)
    return row


def table(results: Path) -> str:
    """The results file as a markdown table."""
    lines = ["| step | code | dir | ws | dtype | exit | wall s | peak GiB | peak / weights | processes' anon GiB | goal "
             "| met |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for line in results.read_text().splitlines():
        r = json.loads(line)
        lines.append(
            f"| {r['step']} | {Path(r['code']).name} | {Path(r['dir']).name} | {r['world_size']} | "
            f"{r.get('dtype', '')} | {r['exit']} | {r['wall_s']} | {r['peak_gib']} | "
            f"{r.get('peak_over_weights', '')} | {r.get('tree_anon_peak_gib', '')} | {r['goal']} | {r['met']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    make = sub.add_parser("make", help="write the random checkpoint")
    make.add_argument("--dir", required=True)
    make.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    for name in ("cut", "run"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--world-size", type=int, required=True)
        p.add_argument("--code", default=str(ROOT), help="the checkout whose vicuna_bench runs (default: this one)")
        p.add_argument("--results", default="bench_load.jsonl", help="JSON lines, appended (default: ./bench_load.jsonl)")
    sub.choices["cut"].add_argument("--output-dir")
    run = sub.choices["run"]
    run.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    run.add_argument("--max-seq-len", type=int, default=512)
    run.add_argument("--expect", default="exit 0", help="'refused': the step should be refused before loading")
    tab = sub.add_parser("table")
    tab.add_argument("--results", default="bench_load.jsonl")
    ns = parser.parse_args(argv)
    if ns.step == "make":
        make_checkpoint(Path(ns.dir), ns.shape)
        return 0
    if ns.step == "table":
        print(table(Path(ns.results)))
        return 0
    row = step_cut(ns) if ns.step == "cut" else step_run(ns)
    record(Path(ns.results), row)
    return 0


if __name__ == "__main__":
    from vicuna_bench.errors import script_exit

    sys.exit(script_exit(main))
