"""The pytest front end layers its settings as every front end does: default < --vb-config file < environment < flags.

References: the values written in each file, variable and command line here, and the table defaults
spec/CLI.md states (``--world-size`` 1, ``--dtype`` auto, ``--perf-repeat`` 1).
"""

from __future__ import annotations

import pytest
import torch  # noqa: F401  (pytester drops what an in-process run imported; torch cannot load twice)
from _pytest.config.argparsing import Parser

from vicuna_bench.errors import UserError
from vicuna_bench.pytest_plugin import options

pytestmark = pytest.mark.unit
pytest_plugins = ["pytester"]


class Config:
    """The part of pytest's config the options layer reads: parsed options and a stash."""

    def __init__(self, *argv: str):
        parser = Parser(_ispytest=True)
        options.add_options(parser)
        self.ns = parser.parse(list(argv))
        self.stash = pytest.Stash()

    def getoption(self, dest):
        return getattr(self.ns, dest)


TOML = 'world-size = 2\nmax-seq-len = 512\nbind-cpu = false\nperf-repeat = 3\nperf-case-pair = [[16, 4]]\n' \
       'accuracy-batch = 4\naccuracy-model = "vicuna-13b"\n'
INI = "[pytest]\nworld_size = 2\nmax-seq-len = 512\nbind-cpu = no\nperf-repeat = 3\nperf-case-pair = [[16,4]]\n" \
      "accuracy-batch = 4\naccuracy-model = vicuna-13b\n"


@pytest.mark.parametrize("kind", ["toml", "ini"])
def test_a_config_file_sets_what_it_names_and_the_table_the_rest(tmp_path, monkeypatch, kind):
    monkeypatch.delenv("MAX_SEQ_LENGTH", raising=False)
    path = tmp_path / f"bench.{kind}"
    path.write_text(TOML if kind == "toml" else INI)
    config = Config("--vb-config", str(path))
    model, perf, precision = (options.group_values(config, g) for g in ("model", "perf", "precision"))
    assert (model["world_size"], model["max_seq_len"], model["bind_cpu"], model["dtype"]) == (2, 512, False, "auto")
    assert (perf["repeat"], perf["case_pair"].replace(" ", ""), perf["batch_size"]) == (3, "[[16,4]]", 1)
    assert (precision["batch"], precision["gate_model"]) == (4, "vicuna-13b")


def test_the_environment_beats_the_file_and_a_flag_beats_both(tmp_path, monkeypatch):
    path = tmp_path / "bench.toml"
    path.write_text(TOML)
    monkeypatch.setenv("MAX_SEQ_LENGTH", "256")
    assert options.group_values(Config("--vb-config", str(path)), "model")["max_seq_len"] == 256
    # A flag given equal to the table default still wins over the file: given is told from left out.
    flags = Config("--vb-config", str(path), "--max-seq-len", "128", "--world-size", "1", "--bind-cpu",
                   "--perf-repeat", "5")
    model = options.group_values(flags, "model")
    assert (model["max_seq_len"], model["world_size"], model["bind_cpu"]) == (128, 1, True)
    assert options.group_values(flags, "perf")["repeat"] == 5


def test_without_a_file_or_variable_the_table_defaults_hold(monkeypatch):
    monkeypatch.delenv("MAX_SEQ_LENGTH", raising=False)
    model = options.group_values(Config(), "model")
    assert (model["world_size"], model["dtype"], model["max_seq_len"], model["model_path"]) == (1, "auto", None, None)
    assert options.group_values(Config(), "perf")["repeat"] == 1


@pytest.mark.parametrize("text, wanted", [
    ("repeat = 3\n", "--vb-config {path}: unknown key 'repeat' (valid: "),  # the CLI's name, not pytest's
    ("perf-repeat = 'many'\n", "--vb-config {path}: perf-repeat = 'many' is not an int"),
    ("compile = 'sometimes'\n", "--vb-config {path}: compile = 'sometimes' is not supported (valid: auto, on, off)"),
])
def test_a_bad_file_is_one_error_naming_the_file_key_and_value(tmp_path, text, wanted):
    path = tmp_path / "bench.toml"
    path.write_text(text)
    with pytest.raises(UserError) as refused:
        options.layered(Config("--vb-config", str(path)))
    assert str(refused.value).startswith(wanted.format(path=path)) and "\n" not in str(refused.value)


def test_a_bad_environment_value_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MAX_SEQ_LENGTH", "long")
    with pytest.raises(UserError, match=r"^\$MAX_SEQ_LENGTH = 'long' is not an int$"):
        options.layered(Config())


def test_a_real_pytest_run_takes_the_file_and_stops_on_a_bad_one(pytester, monkeypatch):
    monkeypatch.delenv("MAX_SEQ_LENGTH", raising=False)
    pytester.makefile(".toml", good="world-size = 3\nperf-repeat = 2\n", bad="world-size = 'x'\n")
    pytester.makepyfile(test_inner="def test_values(vicuna_options):\n"
                                   "    assert (vicuna_options['world_size'], vicuna_options['perf_repeat'], "
                                   "vicuna_options['dtype']) == (3, 2, 'auto')\n")
    # pytest-benchmark asks git for the project's name at start-up (a subprocess): not loaded in here.
    run = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:benchmark", "--vb-config", "good.toml")
    run.assert_outcomes(passed=1)
    bad = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:benchmark", "--vb-config", "bad.toml")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*vicuna-bench: --vb-config bad.toml: world-size = 'x' is not an int"])
