"""The package's size rules: no function over 80 lines or with more than 8 parameters without a reason said.

A function may break a rule when the line above its ``def`` (or above its first decorator) is a comment
``# shape: <reason>`` with a reason of a few words.  The checker itself is tested on hand-written sources.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import vicuna_bench

pytestmark = pytest.mark.unit

PACKAGE = Path(vicuna_bench.__file__).resolve().parent
MAX_LINES = 80
MAX_PARAMS = 8  # self / cls not counted


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def oversized(source: str, name: str) -> list[str]:
    """One line per function of ``source`` that breaks a rule with no ``# shape:`` reason above it."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        above = lines[first - 2].strip() if first >= 2 else ""
        reason = above[len("# shape:"):].strip() if above.startswith("# shape:") else ""
        length = node.end_lineno - node.lineno + 1
        broken = []
        if length > MAX_LINES:
            broken.append(f"{length} lines")
        if _params(node) > MAX_PARAMS:
            broken.append(f"{_params(node)} parameters")
        if broken and len(reason.split()) < 2:
            found.append(f"{name}:{node.lineno} {node.name}: {', '.join(broken)}")
    return found


def test_checker_finds_a_long_function_and_many_parameters():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = f"def long():\n{body}\n\ndef wide(a, b, c, d, e, f, g, h, i):\n    pass\n\n" \
             "class K:\n    def ok(self, a, b, c, d, e, f, g, h):\n        pass\n"
    assert oversized(source, "m.py") == [f"m.py:1 long: {MAX_LINES + 1} lines", "m.py:{} wide: 9 parameters".format(
        MAX_LINES + 3)]


def test_checker_takes_a_reason_above_the_def_or_its_decorator():
    source = textwrap.dedent("""\
        # shape: mirrors the C ABI of the kernel
        def wide(a, b, c, d, e, f, g, h, i):
            pass

        # shape: mirrors torchrun's signature
        @staticmethod
        def wide2(a, b, c, d, e, f, g, h, i):
            pass

        # shape:
        def wide3(a, b, c, d, e, f, g, h, i):
            pass
        """)
    assert oversized(source, "m.py") == ["m.py:11 wide3: 9 parameters"]


def test_no_oversized_function_in_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += oversized(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert not found, "functions over the size rules (split them, or say why in '# shape: <reason>' above):\n" + \
        "\n".join(found)
