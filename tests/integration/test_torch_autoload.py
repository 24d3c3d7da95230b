"""A torch_npu that fails to import, loaded by torch's backend autoload: our front ends on cpu never meet it, on npu
report it in one line.

The fake is what torch_npu >= 2.5.1 installs (its wheel's ``entry_points.txt``: ``[torch.backends] torch_npu =
torch_npu:_autoload``) on a host whose CANN is broken: a package whose import raises, as torch_npu's does when
``libhccl.so`` is missing.  The reference that the fake really triggers torch's autoload is a plain ``import torch``
failing with torch's own message (torch/__init__.py, ``_import_device_backends``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

FAILURE = "libhccl.so: cannot open shared object file: No such file or directory"
TORCH_AUTOLOAD_FAILS = "Failed to load the backend extension: torch_npu"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """A directory for PYTHONPATH: a torch_npu whose import raises, registered as a torch.backends entry point."""
    site = tmp_path_factory.mktemp("broken-torch-npu")
    (site / "torch_npu").mkdir()
    (site / "torch_npu" / "__init__.py").write_text(f"raise ImportError({FAILURE!r})\n\n\ndef _autoload():\n    pass\n")
    info = site / "torch_npu-2.6.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.6.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return site


def env_with(site, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def run(argv, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_the_fake_is_autoloaded_by_a_plain_import_torch(broken_site):
    proc = run(["-c", "import torch"], env_with(broken_site))
    assert proc.returncode != 0 and TORCH_AUTOLOAD_FAILS in proc.stderr, proc.stderr


def test_device_cpu_runs_without_importing_torch_npu(broken_site, tiny_models):
    proc = run(["-m", "vicuna_bench", "run", "--model-path", str(tiny_models["gqa"]), "--device", "cpu",
                "--dtype", "fp32", "--prompt-ids", "5,6", "--max-new-tokens", "2", "--ignore-eos", "--json",
                "--max-seq-len", "64"], env_with(broken_site))
    assert proc.returncode == 0, proc.stderr
    assert TORCH_AUTOLOAD_FAILS not in proc.stderr


@pytest.mark.parametrize("device", ["npu", "auto"])
def test_device_npu_or_auto_is_the_one_line_error(broken_site, tiny_models, device):
    proc = run(["-m", "vicuna_bench", "run", "--model-path", str(tiny_models["gqa"]), "--device", device,
                "--prompt-ids", "5"], env_with(broken_site))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert errors == [f"vicuna-bench run: error: --device {device}: torch_npu is installed but cannot be imported "
                      f"(ImportError: {FAILURE}); install torch + torch_npu as a pair, or pass --device cpu|cuda"]


def test_a_user_setting_is_kept(broken_site, tiny_models):
    # TORCH_DEVICE_BACKEND_AUTOLOAD=1 is the user's: torch autoloads, and the broken torch_npu stops the run.
    proc = run(["-m", "vicuna_bench", "run", "--model-path", str(tiny_models["gqa"]), "--device", "cpu",
                "--prompt-ids", "5"], env_with(broken_site, TORCH_DEVICE_BACKEND_AUTOLOAD="1"))
    assert proc.returncode != 0 and TORCH_AUTOLOAD_FAILS in proc.stderr, proc.stderr


PROBE_TEST = textwrap.dedent("""
    import os
    import sys

    import pytest
    import torch

    pytestmark = pytest.mark.unit


    def test_no_torch_npu():
        assert "torch_npu" not in sys.modules
        assert os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] == "0"
""")


def test_pytest_with_device_cpu_does_not_autoload(broken_site, tmp_path):
    """The plugin turns autoload off before a test module imports torch, where ``--device`` is given; a session
    without it is left to torch (it may not be ours): there the import fails as it would without the plugin."""
    (tmp_path / "test_probe.py").write_text(PROBE_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir: not the project's conftest
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "test_probe.py"]
    ours = run(args + ["--device", "cpu"], env_with(broken_site), cwd=tmp_path)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    theirs = run(args, env_with(broken_site), cwd=tmp_path)
    assert theirs.returncode != 0 and TORCH_AUTOLOAD_FAILS in theirs.stdout + theirs.stderr
