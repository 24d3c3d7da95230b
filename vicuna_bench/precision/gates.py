"""Release gates: which model a run measured, its thresholds, and the verdict.

Thresholds live in ``vicuna_bench/thresholds.json`` (percent).  A model is
recognised when one of its ``match`` strings occurs (case-insensitively) in
the model directory's name, a parent's name (cut dirs), or the config's
``_name_or_path``; ``--accuracy-model`` / ``--gate-model`` override that.  A run that asks for
the gate is refused (:func:`gate_model_key`) before a question is asked when
no threshold can judge it: a gate that cannot judge must not look like a pass.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..settings import flag


def load_thresholds() -> dict:
    return json.loads(resources.files("vicuna_bench").joinpath("thresholds.json").read_text("utf-8"))


def model_names(model_path: str | Path) -> list[str]:
    """Names a model goes by: its dir, the dirs above a cut dir's rank, and config names."""
    path = Path(model_path).resolve()
    names = [path.name]
    if path.parent.name == "part_model":  # <cut>/part_model/<rank>
        names.append(path.parent.parent.name)
    for config in (path / "config.json", path / "part_model" / "0" / "config.json"):
        if config.is_file():
            try:
                conf = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            names += [str(conf[k]) for k in ("_name_or_path", "name_or_path") if conf.get(k)]
    return names


def identify_model(model_path: str | Path, override: str | None = None, thresholds: dict | None = None) -> str | None:
    """The thresholds.json key for this model, or None when unknown."""
    models = (thresholds or load_thresholds())["models"]
    if override:
        if override not in models:
            raise UserError(f"{flag('precision.gate_model')} {override!r} is not in thresholds.json (known: {', '.join(models)})")
        return override
    names = [n.lower() for n in model_names(model_path)]
    for key, entry in models.items():
        for needle in entry.get("match", [key]):
            if any(needle.lower() in name for name in names):
                return key
    return None


def gate_model_key(
    mode: str, scorings: list[str], model_path: str | Path, override: str | None = None,
    thresholds: dict | None = None,
) -> str:
    """The thresholds.json model a gated run is judged by; UserError when it or a scoring has no threshold.

    Called before anything is written or an engine starts, by every front end
    that asks for the gate (``precision --gate``, ``pytest -m accuracy``, the nightly).
    """
    thresholds = thresholds or load_thresholds()
    models = thresholds["models"]
    key = identify_model(model_path, override, thresholds)
    if key is None:
        raise UserError(
            f"{mode} gate: model {model_path} has no release threshold in thresholds.json (known: "
            f"{', '.join(models)}); name the model whose thresholds judge it with {flag('precision.gate_model')}"
        )
    have = {s: t for s, t in models[key].get(mode, {}).items() if t is not None}
    missing = [s for s in scorings if s not in have]
    if missing:
        raise UserError(
            f"{mode} gate: thresholds.json has no {mode} threshold for {key} with {flag('precision.scoring')} "
            f"{missing[0]!r} (it has: {', '.join(have) or 'none'}); gate another scoring, or name another model "
            f"with {flag('precision.gate_model')}"
        )
    return key


def evaluate_gate(
    mode: str, scoring: str, score_percent: float | None, model_key: str | None,
    tolerance: float | None = None, thresholds: dict | None = None,
) -> dict:
    """``{"status": passed|failed|n/a, ...}`` for one scoring's average (percent).

    ``n/a`` (with a reason) only where no gate was asked for: a gated run is
    refused before it starts when it could not be judged (:func:`gate_model_key`).
    """
    thresholds = thresholds or load_thresholds()
    tol = thresholds["tolerance"] if tolerance is None else tolerance
    if model_key is None:
        return {"status": "n/a", "reason": f"unknown model: no release threshold (name one with "
                                           f"{flag('precision.gate_model')})"}
    threshold = thresholds["models"][model_key].get(mode, {}).get(scoring)
    if threshold is None:
        return {"status": "n/a", "reason": f"no {mode} threshold for {model_key} with scoring {scoring!r}"}
    if score_percent is None:
        return {"status": "n/a", "reason": "no question was answered"}
    verdict = {
        "model": model_key, "scoring": scoring, "score": round(score_percent, 4),
        "threshold": threshold, "tolerance": tol,
    }
    verdict["status"] = "passed" if score_percent >= threshold - tol else "failed"
    return verdict


RELATION = {"passed": ">=", "failed": "<"}


def format_verdict(v: dict) -> str:
    """One scoring's verdict as a person reads it: 'generate 25.71% >= 25.71 - 1.0' (n/a: its reason)."""
    if "score" not in v:
        return f"n/a ({v.get('reason', '')})"
    return f"{v['scoring']} {v['score']:.2f}% {RELATION[v['status']]} {v['threshold']} - {v['tolerance']}"


def format_verdicts(gate: dict, status: str) -> str:
    """The verdicts of a summary's gate with ``status``, '; '-joined (the GateFailed message's margins)."""
    return "; ".join(format_verdict(v) for v in gate["verdicts"] if v["status"] == status)


def gate_lines(gate: dict) -> list[str]:
    """A summary's gate, one line per scoring: what every front end prints (pytest's summary, the CLI log)."""
    if not gate.get("requested"):
        return ["gate: not judged (a subset run; the gate needs the full val set)"]
    lines = [f"gate {v['scoring']}: {v['status']} ({format_verdict(v)})" if "score" in v
             else f"gate: {v['status']} ({v.get('reason', '')})" for v in gate.get("verdicts") or []]
    return lines or [f"gate: {gate['status']}"]
