"""The pytest front end's settings: the settings table's options, layered as every front end layers them.

Each setting of the table's model, perf and precision groups is a pytest
option (``--world-size``, ``--perf-repeat``, ``--accuracy-batch``: spelt by
:attr:`vicuna_bench.settings.Setting.pytest_flag`).  Values come from, lowest
first (:func:`vicuna_bench.settings.resolve`): the table's default, the file
``--vb-config FILE`` names (INI ``[pytest]`` section or TOML, keys the
options without ``--``: ``world-size = 2``, ``perf-repeat = 3``), the
environment (the settings that name a variable: ``$MAX_SEQ_LENGTH``), the
command line.  Options are registered without defaults so that a flag given
on the command line is told apart from one left out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from .. import settings

CONFIG_FLAG = "--vb-config"
CONFIG_DEST = "vb_config"
CONFIG_SECTION = "pytest"  # the INI section (or TOML table) of a --vb-config file
DATASETS = ("mmlu", "ceval")  # --mmlu-dir / --ceval-dir (the table's, shared with the nightly): work dirs of data/

_VALUES = pytest.StashKey[dict]()


def offered() -> list[settings.Setting]:
    """The table's settings pytest offers (its model, perf and precision groups, and the data dirs)."""
    return settings.pytest_settings()


def _case_pair_text(value) -> str:
    """A ``perf-case-pair`` value: a TOML array of pairs as the flag's JSON text, else the text given."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def _named_as_in_pytest(s: settings.Setting) -> settings.Setting:
    """``s`` keyed by its pytest spelling (the --vb-config file's keys, values by pytest dest)."""
    name = s.pytest_flag[2:]
    # The table turns a TOML case list into the flag's text by the setting's CLI name, which this one no longer has.
    kind = _case_pair_text if s.key == "perf.case_pair" else s.type
    return dataclasses.replace(s, name=name, pytest_name=name, dest_name=s.pytest_dest, type=kind)


def add_options(parser) -> None:
    """Every offered setting and ``--vb-config``, in one 'vicuna-bench' group (no defaults: see above)."""
    group = parser.getgroup("vicuna-bench")
    for s in offered():
        group.addoption(s.pytest_flag, dest=s.pytest_dest, default=None, help=s.help_text(), **s.argparse_kwargs())
    group.addoption(CONFIG_FLAG, dest=CONFIG_DEST, default=None, metavar="FILE",
                    help=f"an INI ([{CONFIG_SECTION}] section) or TOML file of these options, keys the options "
                         "without -- (order: table default < this file < environment < command line)")


def _given(config, dest: str):
    """An option's command-line value (None: not given, or a parser built without this plugin's options)."""
    try:
        return config.getoption(dest)
    except (AttributeError, ValueError):
        return None


def _read_file(path, named: list[settings.Setting]) -> dict[str, Any]:
    from ..errors import UserError

    try:
        return settings.read_config_file(path, CONFIG_SECTION, named)
    except UserError as exc:  # the shared reader names the CLI's --config; this front end's flag is --vb-config
        message = str(exc).replace("--config", CONFIG_FLAG, 1)
    raise UserError(message)


def layered(config) -> dict[str, Any]:
    """Every offered setting by pytest dest: default < --vb-config file < environment < command line (once a session).

    Bad input (a file, key or value) is a :class:`vicuna_bench.errors.UserError` naming it.
    """
    if _VALUES not in config.stash:
        named = [_named_as_in_pytest(s) for s in offered()]
        path = _given(config, CONFIG_DEST)
        file = _read_file(path, named) if path else {}
        flags = {s.dest: value for s in named if (value := _given(config, s.dest)) is not None}
        config.stash[_VALUES] = settings.resolve(named, file, settings.from_environment(named), flags)
    return config.stash[_VALUES]


def group_values(config, group: str) -> dict[str, Any]:
    """A table group's layered values by the table's dest (what the drivers and jobs read)."""
    values = layered(config)
    return {s.dest: values[s.pytest_dest] for s in settings.group(group)}


def dataset_dir(config, name: str) -> Path | None:
    """``--{name}-dir``, else ``shared/datasets/<name>`` beside the checkout of pytest's rootdir or invocation dir.

    Both starts are tried: pytest picks the rootdir before plugins register their options, so in
    ``pytest -m accuracy --accuracy-output-dir /tmp/x`` the option's value counts as a path and the rootdir
    becomes /tmp/x.
    """
    from ..drivers import shared_dataset_dir

    given = layered(config)[settings.BY_KEY[f"nightly.{name}_dir"].pytest_dest]
    if given:
        return Path(given)
    starts = [Path(str(config.rootpath)).resolve(), Path(config.invocation_params.dir).resolve()]
    return shared_dataset_dir(starts, name)


@pytest.fixture(scope="session")
def vicuna_options(pytestconfig) -> dict:
    """Every setting by its pytest dest (``world_size``, ``perf_repeat``, ``accuracy_batch``...), data dirs resolved."""
    options = dict(layered(pytestconfig))
    for name in DATASETS:
        options[f"{name}_dir"] = dataset_dir(pytestconfig, name)
    return options
