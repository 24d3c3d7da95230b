"""Does the nightly regression rule cry wolf?  Clean and CPU-hogged ``nightly --quick`` runs into one history.

    python benchmarks/nightly_noise.py DIR [--clean 13] [--slowed 2] [--after 1] [--hog spin|matmul]
                                           [--budget-s 170]
    python benchmarks/nightly_noise.py DIR --table          # the table and summary so far, nothing run
    python benchmarks/nightly_noise.py DIR --replay 0.1,0.3,0.5   # the same runs judged again at other bands

The sequence is ``--clean`` clean runs, ``--slowed`` runs with ``--hogs``
busy processes beside them (``spin``: ``while True: pass``; ``matmul``: a
one-thread torch matmul loop each), then ``--after`` clean runs, all
``vicuna-bench nightly --quick`` into ``DIR/history.sqlite`` (run
directories ``DIR/run-NN``).  One call runs what fits in ``--budget-s``
seconds (it starts a run only when the slowest earlier run of that kind
would still fit) and stops; the next call on the same DIR resumes where
the last one stopped (the sequence is kept in ``DIR/noise.json``).  Wrap
each call in ``vb-quiet`` on a shared host: the hogs are the only load the
measurement wants.

Each run prints one row: its kind, exit code, verdict, and every judged
metric (status, change of the median against the baseline, the rank test's
p).  The summary checks the goal of issue 20: no failure among the clean
runs before the slowed ones, a regression by the 2nd slowed run, and the
clean run after them passes.  Each row also says what else used the CPUs
during the run (``other``: busy CPU time of processes that are neither the
run nor the hogs; ``steal``: time the hypervisor gave to other guests), as a
share of the machine.

``--replay`` judges the recorded runs again, in order, into a scratch
history at each given band (the band is the nightly's
``--regression-band``), so one measured sequence shows where the band must
sit on this host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vicuna_bench.nightly import history as H  # noqa: E402
from vicuna_bench.nightly import rules as R  # noqa: E402

STATE = "noise.json"
HOGS = {
    "spin": "while True: pass",
    "matmul": ("import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
               "while True:\n    a @ a"),
}
SHOWN = ("suspicious", "regression", "improved", "ok", "gate-failed")  # judged; report-only etc. are counted


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of avx2/avx512"


def plan(args) -> list[str]:
    return ["clean"] * args.clean + ["slowed"] * args.slowed + ["clean-after"] * args.after


def load_state(out: Path, args) -> dict:
    path = out / STATE
    if path.exists():
        state = json.loads(path.read_text())
        if args.table:
            return state
        wanted = {"sequence": plan(args), "hog": args.hog, "hogs": args.hogs}
        if {k: state[k] for k in wanted} != wanted:
            sys.exit(f"{path}: holds another sequence {({k: state[k] for k in wanted})}; use a fresh DIR")
        return state
    if args.table:
        sys.exit(f"{path}: no runs yet")
    return {"sequence": plan(args), "hog": args.hog, "hogs": args.hogs, "cpu_flags": cpu_flags(),
            "cpu_count": os.cpu_count(), "runs": []}


def save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(out / STATE)


def cpu_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_hogs(kind: str, count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOGS[kind]], stdin=subprocess.DEVNULL) for _ in range(count)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for proc in hogs:  # only the processes this script started, by their own handle
        proc.kill()
    for proc in hogs:
        proc.wait()


def one_run(out: Path, index: int, kind: str, state: dict) -> dict:
    run_dir = out / f"run-{index:02d}"
    history = out / "history.sqlite"
    cmd = [sys.executable, "-m", "vicuna_bench", "nightly", "--quick", "--no-progress",
           "--output-dir", str(run_dir), "--history", str(history)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    load = os.getloadavg()[0]
    hogs = start_hogs(state["hog"], state["hogs"]) if kind == "slowed" else []
    try:
        if hogs:
            time.sleep(1.0)  # the hogs are running before the run starts
        ticks_before, ours_before = cpu_ticks(), children_cpu_s()
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        ticks_after, ours_after = cpu_ticks(), children_cpu_s()
    finally:
        stop_hogs(hogs)
    hz = os.sysconf("SC_CLK_TCK")
    machine_s = (ticks_after[2] - ticks_before[2]) / hz
    busy_s = (ticks_after[0] - ticks_before[0]) / hz
    # The hogs are busy the whole run (one CPU each, at most the machine's share).
    hog_s = min(len(hogs), os.cpu_count()) * seconds
    other = max(0.0, busy_s - (ours_after - ours_before) - hog_s) / machine_s if machine_s else 0.0
    steal = (ticks_after[1] - ticks_before[1]) / hz / machine_s if machine_s else 0.0
    (run_dir / "noise-stderr.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "noise-stderr.log").write_text(done.stderr)
    report = run_dir / "REPORT.md"
    first = report.read_text().splitlines()[0] if report.exists() else f"(no report; exit {done.returncode})"
    row = {"index": index, "kind": kind, "exit": done.returncode, "verdict": first, "seconds": round(seconds, 1),
           "load_before": round(load, 2), "other_cpu": round(other, 3), "steal": round(steal, 3), "metrics": []}
    runs = H.list_runs(history)
    if runs and report.exists():
        run_id = runs[-1].id
        run, metrics = H.load_run(history, run_id)
        nightly = json.loads((run_dir / "nightly.json").read_text())  # the band and gates the run was judged with
        row.update(run_id=run_id, band=nightly["tolerance"])
        gates = [R.Gate(**g) for g in nightly["gates"]]
        for v in R.evaluate_run(history, run, metrics, gates=gates, tolerance=nightly["tolerance"],
                                before_run_id=run_id):
            row["metrics"].append({"name": v.name, "case": v.case, "status": v.status, "value": v.value,
                                   "baseline": v.baseline, "ratio": v.ratio, "p": v.p_value,
                                   "band": list(v.band) if v.band else None, "reason": v.reason})
    return row


def cell(m: dict) -> str:
    if m["ratio"] is None:
        return m["status"]
    p = "" if m["p"] is None else f" p={m['p']:.0e}"
    return f"{m['status']} {100 * (m['ratio'] - 1):+.0f}% (band ±{100 * (m['band'][1] / m['baseline'] - 1):.0f}%){p}"


def table(state: dict) -> str:
    judged_keys: list[tuple[str, str]] = []
    for row in state["runs"]:
        for m in row["metrics"]:
            key = (m["name"], m["case"])
            if m["status"] in SHOWN and key not in judged_keys:
                judged_keys.append(key)
    head = ["#", "kind", "s", "other", "steal", "exit", "verdict"] + [f"{n} {c}" for n, c in judged_keys] + ["not judged"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in state["runs"]:
        by_key = {(m["name"], m["case"]): m for m in row["metrics"]}
        cells = [str(row["index"]), row["kind"], f"{row['seconds']:.0f}", f"{100 * row.get('other_cpu', 0):.0f}%",
                 f"{100 * row.get('steal', 0):.0f}%", str(row["exit"]),
                 "PASS" if row["verdict"].startswith("# PASS") else row["verdict"].lstrip("# ")[:90]]
        cells += [cell(by_key[k]) if k in by_key else "-" for k in judged_keys]
        counts: dict[str, int] = {}
        for m in row["metrics"]:
            if m["status"] not in SHOWN:
                counts[m["status"]] = counts.get(m["status"], 0) + 1
        cells.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(state: dict) -> str:
    runs = state["runs"]
    clean = [r for r in runs if r["kind"] == "clean"]
    judged_clean = [r for r in clean if any(m["status"] in SHOWN for m in r["metrics"])]
    slowed = [r for r in runs if r["kind"] == "slowed"]
    after = [r for r in runs if r["kind"] == "clean-after"]

    def failed(r):
        return r["exit"] != 0

    def slow(r):
        return sum(m["status"] in ("suspicious", "regression") for m in r["metrics"])

    bands = sorted({r["band"] for r in runs if "band" in r})
    lines = [f"CPU flags: {state['cpu_flags']}; {state['cpu_count']} CPUs; hogs: {state['hogs']} x {state['hog']}; "
             f"band {', '.join(f'{b:.0%}' for b in bands) or '?'}",
             f"clean runs: {len(clean)} ({len(judged_clean)} judged against >= {R.MIN_HISTORY} earlier runs): "
             f"{sum(map(failed, clean))} failed, {sum(1 for r in clean if slow(r))} with a suspicious metric"]
    if slowed:
        first_regression = next((i + 1 for i, r in enumerate(slowed)
                                 if any(m["status"] == "regression" for m in r["metrics"])), None)
        lines.append(f"slowed runs: {len(slowed)}: exit codes {[r['exit'] for r in slowed]}; first regression at "
                     f"slowed run {first_regression if first_regression else 'none'}")
    if after:
        lines.append(f"clean runs after the slowed ones: {len(after)}: exit codes {[r['exit'] for r in after]}")
    goals = []
    if len(judged_clean) >= 10 or (clean and len(runs) >= len(state["sequence"])):
        goals.append(f"no failure in {len(judged_clean)} judged clean runs: {'yes' if not any(map(failed, clean)) else 'NO'}")
    if len(slowed) >= 2:
        goals.append("regression by the 2nd slowed run: " + (
            "yes" if any(m["status"] == "regression" for r in slowed[:2] for m in r["metrics"]) else "NO"))
    if after:
        goals.append(f"the clean run after the slowed ones passes: {'yes' if not failed(after[0]) else 'NO'}")
    return "\n".join(lines + goals)


def replay(out: Path, state: dict, bands: list[float]) -> str:
    """The recorded runs judged again, in order, at each band: how many clean runs fail, when the slowdown is caught."""
    history = out / "history.sqlite"
    stored = H.list_runs(history)
    lines = ["| band | clean runs failed | clean runs with a suspicious metric | slowed runs: exit codes "
             "| clean after: exit codes |", "| --- | --- | --- | --- | --- |"]
    kinds = {row.get("run_id"): row["kind"] for row in state["runs"]}
    dirs = {row.get("run_id"): out / f"run-{row['index']:02d}" for row in state["runs"]}
    for band in bands:
        results: dict[str, list[tuple[bool, bool]]] = {"clean": [], "slowed": [], "clean-after": []}
        with tempfile.TemporaryDirectory() as scratch:
            db = Path(scratch) / "replay.sqlite"
            for s in stored:
                run, metrics = H.load_run(history, s.id)
                nightly = json.loads((dirs[s.id] / "nightly.json").read_text())
                gates = [R.Gate(**g) for g in nightly["gates"]]
                verdicts = R.evaluate_run(db, run, metrics, gates=gates, tolerance=band)
                outcome = R.overall(verdicts, gates)
                H.record_run(db, dataclasses.replace(run, status="pass" if outcome.passed else "fail"), metrics,
                             {(v.name, v.case): v.status for v in verdicts})
                slow = any(v.status in ("suspicious", "regression") for v in verdicts)
                results[kinds.get(s.id, "clean")].append((not outcome.passed, slow))
        clean = results["clean"]
        lines.append(f"| {band:.0%} | {sum(f for f, _ in clean)} of {len(clean)} | {sum(s for _, s in clean)} "
                     f"| {[3 if f else 0 for f, _ in results['slowed']]} "
                     f"| {[3 if f else 0 for f, _ in results['clean-after']]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a fresh directory, or one an earlier call left (to resume)")
    parser.add_argument("--clean", type=int, default=13, help="clean runs first (the first 3 build the history)")
    parser.add_argument("--slowed", type=int, default=2, help="runs beside the CPU hogs")
    parser.add_argument("--after", type=int, default=1, help="clean runs after the slowed ones")
    parser.add_argument("--hog", choices=sorted(HOGS), default="spin")
    parser.add_argument("--hogs", type=int, default=2, help="hog processes beside each slowed run")
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop starting runs past this many seconds")
    parser.add_argument("--table", action="store_true", help="print the table and summary so far; run nothing")
    parser.add_argument("--replay", type=str, default=None, help="comma list of bands (0.1 = 10%%): judge the "
                        "recorded runs again at each; run nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replay:
        args.table = True
    state = load_state(args.out, args)
    if args.replay:
        print(replay(args.out, state, [float(b) for b in args.replay.split(",")]))
        return 0
    started = time.perf_counter()
    ran = 0
    while not args.table and len(state["runs"]) < len(state["sequence"]):
        index = len(state["runs"])
        kind = state["sequence"][index]
        # the slowest earlier run of this kind (a slowed one: 2.5x the slowest run) must still fit
        same = [r["seconds"] for r in state["runs"] if r["kind"] == kind] or \
               [2.5 * r["seconds"] for r in state["runs"]] or [60.0]
        if ran and time.perf_counter() - started + max(same) > args.budget_s:
            break
        ran += 1
        row = one_run(args.out, index, kind, state)
        state["runs"].append(row)
        save_state(args.out, state)
        print(f"run {index} ({kind}): exit {row['exit']} in {row['seconds']:.0f} s: {row['verdict']}", flush=True)
    print(table(state))
    print()
    print(summary(state))
    left = len(state["sequence"]) - len(state["runs"])
    if left:
        print(f"\n{left} run(s) left: run the same command again to go on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
