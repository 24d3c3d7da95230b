"""The nightly run: hw suite -> perf -> MMLU -> C-Eval on one set of settings, one run directory, one history row.

:func:`run_nightly` is the one driver (``vicuna-bench nightly``, ``make
nightly``, ``tox -e nightly``).  Everything that can be refused (a setting,
the config file, the history, a data dir, a perf case too long for the KV
cache) is refused before a stage starts.  The stages then run in order,
each isolated: a stage that crashes is recorded as a failed gate and the
others still run.  The run reaches the history in one transaction at the
very end (:func:`vicuna_bench.nightly.report.record_and_report`), so a night
killed at any point before leaves the history as it was.

Settings (the settings table's model, perf, precision and nightly groups), lowest
precedence first: the table's defaults, the ``--quick`` presets when the config
file asks for them, the config file (``--config``, INI ``[nightly]`` section or
TOML), the environment, the ``--quick`` presets when given as a flag, the
command-line flags.  The stages call the drivers (:mod:`vicuna_bench.drivers`)
and record what they return; no result file is read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .. import settings as S
from ..errors import UserError
from ..files import write_atomic
from . import history as H
from . import report as RP
from . import rules

log = logging.getLogger("vicuna_bench")

STAGES = ("hw", "perf", "mmlu", "ceval")
PRECISION_SETS = ("mmlu", "ceval")
SET_LABEL = {"mmlu": "MMLU", "ceval": "C-Eval"}
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding tests/hw (absent in a wheel install)
DEFAULT_ROOT = Path("nightly")  # run directories and the history go here unless told otherwise
JUNIT = "junit-hw.xml"
HW_LOG = "hw-pytest.log"
SETTINGS_FILE = "settings.json"
ENVIRONMENT_FILE = "environment.json"
LOG_FILE = "nightly.log"
EXIT_ERROR = 1  # a stage crashed: the run is recorded with status error

# Settings of the shared table the nightly run lays out itself: each stage writes into the run
# directory; the history, not a baseline CSV, is what perf is judged against; subjects differ per set; the
# history holds one batch size a run, so the batch sweep is perf's alone.
NOT_FROM_TABLE = {"perf.output_dir", "perf.baseline", "perf.tolerance", "perf.batch_sizes", "precision.output_dir",
                  "precision.subjects"}

# --quick: a CPU-sized run of the embedded model (about a minute on 2 idle cores).  One subject per
# set, the one with the shortest 5-shot prompts for the embedded model's tokenizer (MMLU ~270 tokens,
# C-Eval ~510), so its shared few-shot prefix is prefilled once.
QUICK = {
    "model_path": None, "device": "cpu", "world_size": 1, "dtype": "auto", "compile": "off",
    "case_pair": "[[32,8],[64,8]]", "min_len_exp": None, "max_len_exp": None, "repeat": 2,
    "mmlu_subjects": "management", "ceval_subjects": "discrete_mathematics", "limit_per_subject": 4,
    "regression_band": 0.5,  # clean runs on a shared 2-core host drift up to ~+40%; docs/nightly.md has the figures
}


# ---------------------------------------------------------------- the settings (the table's, vicuna_bench/settings.py)

GROUPS = ("model", "perf", "precision", "nightly")


def offered() -> list[S.Setting]:
    """Every nightly setting: the table's model, perf and precision groups (less NOT_FROM_TABLE) and its nightly group."""
    return S.select(GROUPS, exclude=NOT_FROM_TABLE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The nightly's flags on an argparse parser; an absent flag stays absent (so a config file can set it)."""
    for group in GROUPS:
        S.add_to_argparse(parser, group, exclude=tuple(NOT_FROM_TABLE), only_given=True)
    parser.add_argument("--debug", action="store_true", help="full tracebacks")


def resolve_settings(flags: dict[str, Any], env=None) -> dict[str, Any]:
    """Every nightly setting by dest, layered (settings.resolve): defaults < file's quick < file < environment <
    flag's quick < flags."""
    settings = offered()
    config = S.read_config_file(flags["config"], "nightly", settings) if flags.get("config") else {}
    quick = bool(flags.get("quick", config.get("quick", False)))
    values = S.resolve(settings, QUICK if config.get("quick") else {}, config, S.from_environment(settings, env),
                       QUICK if flags.get("quick") else {}, flags)
    values["quick"] = quick
    return values


def group_values(values: dict[str, Any], group: str, **fixed) -> dict[str, Any]:
    """A settings-table group's values (what PerfJob/PrecisionConfig.from_values read), ``fixed`` for the rest."""
    out = {s.dest: values.get(s.dest) for s in S.select((group,), exclude=NOT_FROM_TABLE)}
    out.update(fixed)
    return out


# ---------------------------------------------------------------- the plan: everything checked before a stage starts

@dataclasses.dataclass
class PrecisionPlan:
    """One precision set of the night: its job (data read once, when built) and whether it is a subset."""

    job: Any  # precision.PrecisionJob
    subset: bool

    @property
    def mode(self) -> str:
        return self.job.cfg.mode

    @property
    def config(self) -> Any:  # precision.PrecisionConfig
        return self.job.cfg


@dataclasses.dataclass
class Plan:
    values: dict[str, Any]
    stages: list[str]
    run_dir: Path
    history: Path
    spec: Any = None  # EngineSpec (the engine starts only when perf or precision runs)
    perf: Any = None  # perf.PerfJob
    precision: list[PrecisionPlan] = dataclasses.field(default_factory=list)
    progress: bool = True

    @property
    def jobs(self) -> list:
        """The jobs the engine runs, in the night's order: perf, then each precision set."""
        return ([self.perf] if self.perf is not None else []) + [p.job for p in self.precision]


def parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in STAGES]
    if bad or not names:
        raise UserError(f"--stages {text!r}: {'unknown stage ' + repr(bad[0]) if bad else 'no stage'} "
                        f"(valid: {', '.join(STAGES)})")
    return [s for s in STAGES if s in names]  # always in the nightly's order


def default_run_dir(root: Path = DEFAULT_ROOT, now: datetime.datetime | None = None) -> Path:
    """``nightly/<YYYY-MM-DD>-<HHMM>`` (local time), ``-2``, ``-3``... when taken."""
    stem = (now or datetime.datetime.now()).strftime("%Y-%m-%d-%H%M")
    candidate, n = root / stem, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stem}-{n}"
    return candidate


def shared_dataset_dir(name: str) -> Path | None:
    """``../shared/datasets/<name>`` beside this checkout or the current directory's (drivers.shared_dataset_dir)."""
    from ..drivers import shared_dataset_dir as find

    return find([PROJECT_ROOT, Path.cwd()], name)


def subset_key(mode: str, subjects: list[str] | None, limit: int | None) -> str:
    """The history's name for a set: ``mmlu`` for the full val set, ``mmlu-subset-<6 hex>`` for a part of it.

    A few questions' accuracy must never become the baseline of a full run (or of another subset).
    """
    if not subjects and not limit:
        return mode
    digest = hashlib.sha1(json.dumps([sorted(subjects or []), limit]).encode()).hexdigest()[:6]
    return f"{mode}-subset-{digest}"


def plan_run(values: dict[str, Any]) -> Plan:
    """Check every setting, input file and length; resolve the model.  Writes nothing but a new history file."""
    from ..drivers import resolve_spec
    from ..perf import PerfJob

    stages = parse_stages(values["stages"])
    history = Path(values["history"])
    if values["output_dir"]:
        run_dir = Path(values["output_dir"])
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UserError(f"--output-dir {run_dir}: exists and is not an empty directory (a run directory is "
                            "written once; use --report-only to rebuild its report)")
    else:
        run_dir = default_run_dir()
    plan = Plan(values, stages, run_dir, history, progress=bool(values["progress"]))
    if "perf" in stages:
        plan.perf = PerfJob.from_values(group_values(values, "perf", baseline=None, tolerance=0.10, output_dir=None),
                                        run_dir / "perf", progress=plan.progress)
    plan.precision = [_precision_plan(values, mode, run_dir, plan.progress)
                      for mode in stages if mode in PRECISION_SETS]
    # Resolved even for the hw suite alone: the model settings are checked, and the history's record says
    # what they resolved to (the engine itself starts only for perf and precision).
    plan.spec = resolve_spec(group_values(values, "model"), plan.jobs, progress=plan.progress)
    for job in plan.jobs:  # prompt lengths, a gate nothing could judge: refused before the night starts
        job.check(plan.spec)
    if not values["regression_band"] > 0:
        raise UserError(f"--regression-band {values['regression_band']}: must be above 0 (e.g. 0.10 for 10%)")
    # Last: a newer schema, a non-SQLite file is refused now, not at the end of the night; a new file is created.
    H.connect(history).close()
    return plan


def _precision_plan(values: dict[str, Any], mode: str, run_dir: Path, progress: bool) -> PrecisionPlan:
    """One precision set's job: its data dir found, read and checked (a subset never gates)."""
    from ..precision import PrecisionConfig, PrecisionJob

    work_dir = values[f"{mode}_dir"] or shared_dataset_dir(mode)
    if work_dir is None:
        raise UserError(f"no {SET_LABEL[mode]} data: give --{mode}-dir (a dir holding data/dev and data/val) "
                        f"or leave {mode} out of --stages")
    subjects = [s.strip() for s in (values[f"{mode}_subjects"] or "").split(",") if s.strip()] or None
    subset = bool(subjects or values["limit_per_subject"])
    cfg = PrecisionConfig.from_values(
        group_values(values, "precision", subjects=",".join(subjects or []) or None, output_dir=run_dir / mode),
        mode=mode, work_dir=work_dir, gate=not subset, progress=progress,
    )
    return PrecisionPlan(PrecisionJob(cfg, subjects_flag=f"--{mode}-subjects", raise_gate=False), subset)


# ---------------------------------------------------------------- the run's identity and environment

def run_identity(plan: Plan) -> dict[str, Any]:
    """What makes two runs comparable, resolved: model, device, device name, dtype, world size, batch size."""
    from .. import devices
    from ..perf import default_model_name

    spec = plan.spec
    return {
        "model": default_model_name(spec.model_path), "device": spec.device,
        "device_name": devices.device_name_of(spec.device, spec.device_index(0)).replace(" ", "_"), "dtype": spec.dtype,
        "world_size": spec.world_size, "batch_size": int(plan.values["batch_size"]), "compile": spec.compile,
    }


def environment(device: str, world_size: int, cpu_dtype_auto=None, device_index: int = 0) -> dict[str, Any]:
    """Versions, device names, host, and the CPU binding each rank would get (vicuna_bench.binding);
    ``cpu_dtype_auto``: the spec's --dtype auto choice on CPU (environment.environment_record); ``device_index``: rank
    0's device (on torch_npu 2.1.x reading its name opens a context there, never on NPU 0 by default)."""
    from .. import binding, devices
    from ..environment import environment_record

    record = environment_record(device, device_index, cpu_dtype_auto)
    packages = {}
    for name in ("vicuna-bench", "transformers", "numpy", "safetensors", "pytest", "matplotlib"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    try:
        allowed = binding.format_cpu_list(binding.allowed_cpus())
    except binding.BindingFailed as exc:
        allowed = f"unknown ({exc})"
    record.update(
        host=platform.node(), platform=platform.platform(), cpu=devices.cpu_model_name(), cpu_count=os.cpu_count(),
        cpus_allowed=allowed, packages=packages, argv=sys.argv,
        cpu_binding=[binding.plan_binding(device, r, world_size).as_record() for r in range(world_size)],
    )
    return record


# ---------------------------------------------------------------- the stages

class StageFailed(Exception):
    """A stage could not finish; the run goes on and is recorded with status error."""


ACCELERATORS = ("cuda", "npu")  # a night on one of these must run hardware tests


def hw_command(values: dict[str, Any], junit: Path, tests: Path) -> list[str]:
    """``pytest -m hw`` on the run's model settings, JUnit XML into the run dir.

    The model options (``--model-path``, ``--world-size``, ``--dtype``,
    ``--device-type``, ...) make the hw suite test the night's model at its
    world size (tests/hw/conftest.py); without ``--model-path`` it tests its tiny models.
    """
    cmd = [sys.executable, "-m", "pytest", "-m", "hw", str(tests), f"--junitxml={junit}", "-q", "-rs",
           "-p", "no:cacheprovider"]
    for s in S.group("model"):
        value = values.get(s.dest)
        if value is not None:
            cmd += s.pytest_args(value)
    return cmd


def hw_tests_dir() -> Path | None:
    """``tests/hw`` of this checkout, else of the checkout the command was started in (tox installs a copy)."""
    for base in (PROJECT_ROOT, Path.cwd()):
        if (base / "tests" / "hw").is_dir() and (base / "conftest.py").is_file():
            return (base / "tests" / "hw").resolve()
    return None


def hw_must_run(device: str) -> str:
    """Why the hw suite must run tests tonight ('' when it need not): the night runs on an accelerator."""
    return f"the night's device is {device}" if device in ACCELERATORS else ""


def _hw_not_run(must_run: str, why: str) -> rules.Gate:
    """The hw gate when no test ran: failed on an accelerator night, else not applicable."""
    if must_run:
        return rules.Gate("hw suite", "failed", 0, None, "tests", f"no test ran, though {must_run}: {why}")
    return rules.Gate("hw suite", "n/a", unit="tests", detail=why)


def run_hw_suite(plan: Plan) -> rules.Gate:
    """The hardware suite in a subprocess, on the night's resolved device; its JUnit XML judged as a gate.

    Skipped tests keep their reason.  A suite that ran no test is a failed
    gate on a cuda/npu night (it measured nothing there), not applicable on a CPU one.
    """
    must_run = hw_must_run(plan.spec.device)
    tests = hw_tests_dir()
    if tests is None:
        return _hw_not_run(must_run, "no tests/hw beside the package or in the current directory (run from a checkout)")
    junit = (plan.run_dir / JUNIT).resolve()
    cmd = hw_command({**plan.values, "device": plan.spec.device}, junit, tests)
    log.info("nightly: hw suite: %s", " ".join(cmd[1:]))
    with (plan.run_dir / HW_LOG).open("w", encoding="utf-8") as out:
        rc = subprocess.run(cmd, cwd=tests.parents[1], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    if rc == 5:  # no test collected
        return _hw_not_run(must_run, f"no hw test collected, see {HW_LOG}")
    if rc not in (0, 1) or not junit.is_file():
        raise StageFailed(f"pytest exited {rc} (see {HW_LOG})")
    summary = RP.read_junit(junit)
    gate = RP.junit_gate(summary, skip_reason="; ".join(summary.skip_reasons), must_run=must_run)
    log.info("nightly: hw suite: %d passed, %d failed, %d errors, %d skipped", summary.passed, summary.failures,
             summary.errors, summary.skipped)
    return gate


def perf_metrics(run, env: dict | None = None) -> list[H.Metric]:
    """The perf stage's metrics from its :class:`perf.PerfRun` (the files are outputs, never read back).

    ``env`` (the run's environment) gets the perf run's energy meter over every rank's device, as REPORT.md
    names it (replacing rank 0's environment record's).
    """
    from .. import perf

    if env is not None:
        env["energy"] = run.energy
    log.info("perf results:\n%s", perf.summary_table(run))
    where = run.paths.get("extended_csv", "perf run")
    metrics = H.metrics_from_perf_rows(perf.extended_rows(run), where)
    return H.metrics_with_samples(metrics, perf.samples_doc(run)["cases"], run.paths.get("samples_json", where))


def precision_findings(p: PrecisionPlan, result) -> tuple[list[H.Metric], list[rules.Gate]]:
    """One precision set's metrics (a subset under its own name) and gates from its :class:`PrecisionRun`."""
    if result.gate_failure is not None:  # every file is written first; the gate below says the same
        log.warning("%s", result.gate_failure.splitlines()[0])
    where = result.files["summary.json"]
    metrics = H.metrics_from_summary(result.summary, where)
    gates = rules.gates_from_summary(result.summary, where)
    if p.subset:
        key = subset_key(p.mode, p.config.subjects, p.config.limit_per_subject)
        metrics = [dataclasses.replace(m, case=key + m.case[len(p.mode):]) for m in metrics]
        gates = [dataclasses.replace(g, case=key + g.case[len(p.mode):]) if g.case else g for g in gates]
    return metrics, gates


# ---------------------------------------------------------------- the driver

@dataclasses.dataclass
class NightlyResult:
    """What a finished night left: its exit code (0, 1 or 3), the run id, the run directory and REPORT.md."""

    exit_code: int
    run_id: int
    run_dir: Path
    report: Path
    status: str


def _stage(name: str, errors: list[str], gates: list[rules.Gate], fn: Callable, *args):
    """Run a stage; anything it raises but an interrupt becomes a failed gate, and the night goes on.

    Bad input was refused before the first stage (exit 2); what a stage raises
    after that (a UserError too: say the device vanished) is the night's error.
    """
    log.info("nightly: stage %s", name)
    started = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001: one broken stage must not lose the other stages' results
        first = (str(exc).strip().splitlines() or [""])[0]
        detail = f"crashed: {type(exc).__name__}: {first}" if first else f"crashed: {type(exc).__name__}"
        log.error("nightly: stage %s %s\n%s", name, detail, traceback.format_exc())
        errors.append(name)
        gates.append(rules.Gate(f"{name} stage", "failed", detail=f"{detail} (see {LOG_FILE})"))
        return None
    log.info("nightly: stage %s done in %.1f s", name, time.perf_counter() - started)
    return result


def _files(plan: Plan) -> dict[str, str]:
    """The detailed files REPORT.md links (relative to the run dir; a missing one is named as missing)."""
    files = {"settings": SETTINGS_FILE, "environment": ENVIRONMENT_FILE, "log": LOG_FILE}
    if "hw" in plan.stages:
        files.update({"hw suite (JUnit XML)": JUNIT, "hw suite output": HW_LOG})
    if plan.perf is not None:
        for label, path in sorted(plan.perf.paths.items()):
            files[f"perf {label.replace('_', ' ')}"] = os.path.relpath(path, plan.run_dir)
    for p in plan.precision:
        files[f"{SET_LABEL[p.mode]} summary"] = f"{p.mode}/summary.json"
        files[f"{SET_LABEL[p.mode]} answers (device.log)"] = f"{p.mode}/device.log"
    return files


def _write_json(path: Path, doc) -> None:
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def run_nightly(values: dict[str, Any]) -> NightlyResult:
    """One night: check, run the stages, record the run in the history (one transaction), write REPORT.md."""
    plan = plan_run(values)
    started = H.utc_timestamp()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(plan.run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        return _run(plan, started)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(plan: Plan, started: str) -> NightlyResult:
    ident = run_identity(plan)
    env = environment(ident["device"], ident["world_size"], plan.spec.cpu_dtype_auto, plan.spec.device_index(0))
    settings_doc = {k: v for k, v in plan.values.items() if k not in ("report_only",)}
    settings_doc.update(stages=plan.stages, run_dir=str(plan.run_dir), history=str(plan.history),
                        compile_resolved=ident["compile"])
    _write_json(plan.run_dir / SETTINGS_FILE, settings_doc)
    _write_json(plan.run_dir / ENVIRONMENT_FILE, env)
    log.info("nightly: model=%s device=%s (%s) dtype=%s world_size=%d compile=%s batch=%d; stages %s; into %s, "
             "history %s", ident["model"], ident["device"], ident["device_name"], ident["dtype"], ident["world_size"],
             ident["compile"], ident["batch_size"], ",".join(plan.stages), plan.run_dir, plan.history)

    metrics: list[H.Metric] = []
    gates: list[rules.Gate] = []
    errors: list[str] = []
    for stage in STAGES:
        if stage not in plan.stages:
            gates.append(rules.Gate(f"{stage} stage", "n/a", detail="not in --stages"))
    if "hw" in plan.stages:
        gate = _stage("hw", errors, gates, run_hw_suite, plan)
        if gate is not None:
            gates.append(gate)
    if plan.jobs:
        metrics += _run_engine_stages(plan, env, errors, gates)

    status = "error" if errors else "pass"  # pass/fail is the rule's verdict (record_and_report)
    run = H.RunRecord(
        started, H.utc_timestamp(), status, ident["model"], ident["device"], ident["device_name"], ident["dtype"],
        ident["world_size"], ident["batch_size"], git_commit=H.project_commit(), settings=settings_doc,
        environment=env, **H.perf_setup(ident["compile"], plan.perf.settings if plan.perf is not None else None),
    )
    run_id, outcome, report = RP.record_and_report(plan.run_dir, plan.history, run, metrics, gates=gates,
                                                   files=_files(plan), tolerance=plan.values["regression_band"])
    exit_code = EXIT_ERROR if errors else outcome.exit_code
    log.info("nightly: run %d %s: %s", run_id, "ERROR" if errors else "PASS" if outcome.passed else "FAIL",
             outcome.reason)
    log.info("nightly: wrote %s (history %s)", report, plan.history)
    return NightlyResult(exit_code, run_id, plan.run_dir, report, "error" if errors else run.status)


def _run_engine_stages(plan: Plan, env: dict, errors: list[str], gates: list[rules.Gate]) -> list[H.Metric]:
    """Perf and the precision sets on one engine, each stage isolated (:func:`_stage`); their metrics.

    The engine's ranks join ``env`` and the environment file is rewritten once they are known.
    """
    from ..drivers import open_engine, run_jobs

    engine = _stage("engine start", errors, gates, open_engine, plan.spec)
    if engine is None:
        for job in plan.jobs:
            gates.append(rules.Gate(f"{job.name} stage", "failed", detail="not run: the engine did not start"))
        return []
    record: dict[str, Callable] = {"perf": lambda run: (perf_metrics(run, env), [])}
    record.update({p.mode: (lambda result, p=p: precision_findings(p, result)) for p in plan.precision})
    metrics: list[H.Metric] = []

    def stage(name: str, fn: Callable):
        found = _stage(name, errors, gates, lambda: record[name](fn()))
        if found is not None:  # in the stage's turn: the gates keep the order the stages ran in
            metrics.extend(found[0])
            gates.extend(found[1])

    with engine:
        env["ranks"] = engine.rank_info
        run_jobs(plan.spec, plan.jobs, engine=engine, guard=stage)
    _write_json(plan.run_dir / ENVIRONMENT_FILE, env)
    return metrics


def report_only(values: dict[str, Any]) -> Path:
    """--report-only: REPORT.md and the plots of ``--output-dir`` again, from its nightly.json and the history."""
    if not values.get("output_dir"):
        raise UserError("--report-only needs --output-dir RUN_DIR (the run directory to rebuild)")
    run_dir = Path(values["output_dir"])
    if not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir}: no such run directory")
    return RP.rebuild_report(run_dir, values.get("history"))


def main(flags: dict[str, Any]) -> int:
    """The CLI's handler body: flags by dest (absent when not given) -> exit code 0, 1 or 3 (UserError: 2)."""
    known = {s.dest for s in offered()}
    flags = {k: v for k, v in flags.items() if k in known}  # not the CLI's own (command, debug)
    if flags.get("report_only"):
        path = report_only({"output_dir": flags.get("output_dir"), "history": flags.get("history")})
        log.info("nightly: rebuilt %s", path)
        return 0
    result = run_nightly(resolve_settings(flags))
    print(result.report)
    return result.exit_code
