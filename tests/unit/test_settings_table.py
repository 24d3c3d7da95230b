"""One table, every front end: --no-progress and the data dirs are table settings, spelt as shared/spec/CLI.md says."""

from __future__ import annotations

import inspect

import pytest

from vicuna_bench import cli, settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("argv", [["perf"], ["precision", "--work-dir", "w"], ["sdk-test"], ["nightly"]])
def test_every_command_that_runs_a_job_takes_no_progress_from_the_table(argv):
    parser = cli.build_parser()
    assert parser.parse_args([*argv, "--no-progress"]).progress is False
    if argv != ["nightly"]:  # the nightly's flags stay absent unless given (its config file may set them)
        assert parser.parse_args(argv).progress is True
    sub = parser._subparsers._group_actions[0].choices[argv[0]]  # the command's own help
    (action,) = [a for a in sub._actions if "--no-progress" in a.option_strings]
    assert action.help.startswith(settings.BY_KEY["nightly.progress"].help)
    assert 'add_argument("--no-progress"' not in inspect.getsource(cli)


def test_pytest_takes_the_data_dirs_from_the_table_spelt_as_the_cli_contract():
    flags = [s.pytest_flag for s in settings.pytest_settings()]
    # shared/spec/CLI.md, "pytest options": --mmlu-dir, --ceval-dir, --perf-baseline, --world-size ...
    for flag in ("--mmlu-dir", "--ceval-dir", "--perf-baseline", "--perf-tolerance", "--world-size"):
        assert flags.count(flag) == 1, flag
    assert "--progress" not in flags and "--nightly-progress" not in flags  # pytest shows no progress
    assert settings.BY_KEY["nightly.mmlu_dir"].pytest_dest == "mmlu_dir"
    # The nightly's own spelling is unchanged.
    ns = cli.build_parser().parse_args(["nightly", "--mmlu-dir", "m", "--ceval-dir", "c"])
    assert (ns.mmlu_dir, ns.ceval_dir) == ("m", "c")
