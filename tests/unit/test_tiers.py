"""The tier rules (tests/tiers.py), on scratch test files run in-process by pytester.

The unit tier refuses every way of starting a process, even where the code
under test catches the error; a test without exactly one tier marker stops
the collection.
"""

from __future__ import annotations

import types

import pytest
import torch.multiprocessing  # noqa: F401  (pytester drops what an in-process run imported; torch cannot load twice)

from tests import tiers

pytestmark = pytest.mark.unit
pytest_plugins = ["pytester"]

STARTS = {
    "subprocess_run": "import subprocess\nsubprocess.run(['true'])",
    "popen": "import subprocess\nsubprocess.Popen(['true']).wait()",
    "os_system": "import os\nos.system('true')",
    "os_fork": "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)",
    "multiprocessing": "import multiprocessing\nmultiprocessing.get_context('spawn').Process(target=print).start()",
    "torch_spawn": "import torch.multiprocessing\ntorch.multiprocessing.spawn(print, nprocs=1)",
    "process_pool": "import concurrent.futures\n"
                    "concurrent.futures.ProcessPoolExecutor(1, mp_context=__import__('multiprocessing')"
                    ".get_context('spawn')).submit(print).result()",
}


def run_inner(pytester, source: str, *args: str):
    pytester.makepyfile(test_inner=source)
    # pytest-benchmark asks git for the project's name at start-up (a subprocess): not loaded in here.
    return pytester.runpytest_inprocess("-p", "tests.tiers", "-p", "no:cacheprovider", "-p", "no:benchmark", *args)


def indented(code: str) -> str:
    return "\n".join("    " + line for line in code.splitlines())


@pytest.mark.parametrize("start", STARTS)
def test_a_unit_test_that_starts_a_process_fails_naming_itself(pytester, start):
    result = run_inner(pytester, f"import pytest\npytestmark = pytest.mark.unit\n\n\ndef test_starts():\n"
                                 f"{indented(STARTS[start])}\n")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ProcessInUnitTier: test_inner.py::test_starts: the unit tier runs in-process, "
                                 "but this test started a process (*); mark its module pytest.mark.integration*"])


def test_a_swallowed_refusal_still_fails_the_test(pytester):
    code = "try:\n    subprocess.run(['true'])\nexcept Exception:\n    pass  # a fallback that hides the error"
    result = run_inner(pytester, "import subprocess\nimport pytest\npytestmark = pytest.mark.unit\n\n\n"
                                 f"def test_hides_it():\n{indented(code)}\n")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_hides_it: the unit tier runs in-process, but this test started a process "
                                 "(subprocess.Popen)*"])


def test_a_session_fixture_a_unit_test_starts_is_refused_too(pytester):
    source = ("import subprocess\nimport pytest\npytestmark = pytest.mark.unit\n\n\n"
              "@pytest.fixture(scope='session')\ndef server():\n    return subprocess.Popen(['true'])\n\n\n"
              "def test_uses_it(server):\n    pass\n")
    result = run_inner(pytester, source)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_uses_it: the unit tier runs in-process*(subprocess.Popen)*"])


def test_an_integration_test_is_left_alone():
    """Outside the unit tier the phase runs with process starts as they were (here: this unit test's own guard)."""
    item = types.SimpleNamespace(nodeid="test_x.py::test_x", get_closest_marker=lambda name: None)
    current = [getattr(owner, name) for owner, name, _ in tiers.PROCESS_STARTS if hasattr(owner, name)]
    phase = tiers._guard_phase(item)
    next(phase)
    assert [getattr(owner, name) for owner, name, _ in tiers.PROCESS_STARTS if hasattr(owner, name)] == current
    with pytest.raises(StopIteration) as done:
        phase.send("the phase's result")
    assert done.value.value == "the phase's result"


def test_a_test_without_a_tier_stops_the_collection(pytester):
    result = run_inner(pytester, "import pytest\n\n\ndef test_a():\n    pass\n\n\n"
                                 "@pytest.mark.unit\n@pytest.mark.integration\ndef test_b():\n    pass\n",
                       "-m", "unit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*tests without a valid tier:",
        "test_inner.py::test_a: no tier marker; mark it with exactly one of pytest.mark.unit | integration | *",
        "test_inner.py::test_b: tier markers integration, unit; *",
    ])


def test_a_tier_its_folder_contradicts_is_named():
    def item(folder: str, tier: str, name: str):
        mark = types.SimpleNamespace(name=tier)
        return types.SimpleNamespace(nodeid=f"tests/{folder}/test_x.py::{name}", path=tiers.SUITE / folder / "test_x.py",
                                     iter_markers=lambda: iter([mark]))

    assert tiers.tier_errors([item("unit", "unit", "test_a"), item("integration", "integration", "test_b")]) == []
    assert tiers.tier_errors([item("unit", "integration", "test_a"), item("unit", "integration", "test_b")]) == [
        "tests/unit/test_x.py (2 tests): marked integration but in tests/unit; move it to tests/integration "
        "or mark it unit"]
