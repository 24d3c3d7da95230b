"""The package's import contract (.importlinter): layers front ends > drivers > jobs > engine > model > leaves and
no import cycle, function-local imports included, checked in-process by import-linter on every run."""

from __future__ import annotations

import configparser
import logging
import re
from pathlib import Path

import pytest

# The use case, not importlinter.cli.lint_imports: the CLI's logging.dictConfig disables every logger already made
# (vicuna_bench's included), which would blind the caplog checks of every later test.
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / ".importlinter"


def test_no_contract_is_broken(capsys, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    configuration.configure()  # what importlinter.cli does on import: its readers and adapters
    kept = lint_imports(config_filename=str(CONTRACT), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert kept, f"import-linter: a contract in {CONTRACT.name} is broken:\n{report}"
    assert re.search(r"Contracts: 2 kept, 0 broken", report), report
    with caplog.at_level(logging.INFO, logger="vicuna_bench"):  # and the project's logging is left working
        logging.getLogger("vicuna_bench").info("still heard")
    assert "still heard" in caplog.text


def _layer_modules() -> set[str]:
    config = configparser.ConfigParser(inline_comment_prefixes=("#",))
    config.read(CONTRACT)
    lines = config["importlinter:contract:layers"]["layers"].splitlines()
    return {name.strip() for line in lines for name in re.split(r"[|:]", line) if name.strip()}


def test_every_module_of_the_package_has_a_layer():
    """A new module is placed in the contract, else nothing would check what it imports (nightly's modules by
    name: its runner is a front end, the rest jobs)."""
    package = ROOT / "vicuna_bench"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    placed = _layer_modules()
    nightly = {f"nightly.{p.stem}" for p in (package / "nightly").glob("*.py") if p.stem != "__init__"}
    missing = sorted((modules - {"nightly"}) - placed) + sorted(nightly - placed)
    assert not missing, f"not in any layer of {CONTRACT.name}: {', '.join(missing)}"
