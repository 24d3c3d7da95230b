"""Build ``vicuna_bench/ge_converters.json``: which aten ops torchair's GE graph can convert, per torch_npu wheel.

Reads each wheel's ``torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/**.py``
with ``ast`` (nothing is imported, so any host can run it) and records every op
registered through ``register_fx_node_ge_converter(<op>)``, spelt as a decorator
or as a call (``register_fx_node_ge_converter(op)(fn)``), with the op written
``torch.ops.<ns>.<op>.<overload>`` or ``getattr(torch.ops.<ns>.<op>, "<overload>", None)``.
A converter whose body (docstring aside) is only ``raise NotImplementedError(...)``
is a stub: GE fails on such a node at the first call.

    python scripts/ge_converter_table.py [--wheels /tmp/wheels] [--out vicuna_bench/ge_converters.json] [V ...]

Versions default to the keys of ``npu_graph.TORCHAIR_OF_TORCH_NPU``; a wheel
missing from ``--wheels`` is fetched with ``pip download --no-deps`` (aarch64,
Python 3.10, else 3.11).
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTERS = "torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/"
REGISTER = "register_fx_node_ge_converter"


def wheel_path(version: str, wheels: str) -> str:
    """The aarch64 wheel of torch_npu ``version`` under ``wheels``, downloaded when absent."""
    found = glob.glob(os.path.join(wheels, f"torch_npu-{version}-*.whl"))
    for python in ("3.10", "3.11"):
        if found:
            break
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64",
                        "--python-version", python, f"torch-npu=={version}", "-d", wheels],
                       check=False, stdout=subprocess.DEVNULL)
        found = glob.glob(os.path.join(wheels, f"torch_npu-{version}-*.whl"))
    if not found:
        raise SystemExit(f"torch-npu=={version}: no aarch64 wheel for Python 3.10 or 3.11")
    return sorted(found)[0]


def _op_name(node: ast.AST) -> str | None:
    """``aten.index_copy.default`` for ``torch.ops.aten.index_copy.default`` or its ``getattr`` spelling."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
        base = _op_name(node.args[0])
        return f"{base}.{node.args[1].value}" if base else None
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "torch" and parts[-1:] == ["ops"]):
        return None  # operator.add, math.floor, torch.sym_float...: not an op overload
    return ".".join(reversed(parts[:-1]))


def _registered(call: ast.AST) -> str | None:
    """The op a ``register_fx_node_ge_converter(op)`` call names, None for any other expression."""
    if not (isinstance(call, ast.Call) and call.args):
        return None
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return _op_name(call.args[0]) if name == REGISTER else None


def _is_stub(fn: ast.AST) -> bool:
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc
    exc = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def converters(source: str) -> dict[str, bool]:
    """{op overload: is a stub} registered in one converter module's source."""
    tree = ast.parse(source)
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                if (op := _registered(deco)) is not None:
                    found[op] = _is_stub(node)
        elif isinstance(node, ast.Call) and (op := _registered(node.func)) is not None and node.args \
                and isinstance(node.args[0], ast.Name) and node.args[0].id in functions:
            found[op] = _is_stub(functions[node.args[0].id])  # register_fx_node_ge_converter(op)(fn)
    return found


def wheel_table(path: str) -> dict:
    """{"real": [...], "stub": [...]} for one wheel (an op registered twice: the later file wins, as on import)."""
    ops: dict[str, bool] = {}
    with zipfile.ZipFile(path) as whl:
        for name in sorted(whl.namelist()):
            if name.startswith(CONVERTERS) and name.endswith(".py"):
                ops.update(converters(whl.read(name).decode("utf-8")))
    return {"real": sorted(op for op, stub in ops.items() if not stub),
            "stub": sorted(op for op, stub in ops.items() if stub)}


def readme_release(path: str) -> str | None:
    """The release a wheel's README clones (``-b v2.13.0-26.2.0`` -> ``26.2.0``), None where it names none.

    Evidence only: the 26.x wheels mostly clone a plain ``v2.N.0`` branch, and
    2.8.0.post4 (26.0.0) still names ``v2.8.0-7.2.0``.
    """
    with zipfile.ZipFile(path) as whl:
        meta = next((n for n in whl.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = whl.read(meta).decode("utf-8", "replace") if meta else ""
    found = re.search(r"git clone \S+ -b v[0-9.]+-([0-9a-z.]+)", text)
    return found.group(1) if found else None


def main(argv=None) -> int:
    sys.path.insert(0, ROOT)
    from vicuna_bench.npu_graph import TORCHAIR_OF_TORCH_NPU

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", help="torch_npu versions (default: npu_graph's table)")
    parser.add_argument("--wheels", default="/tmp/wheels", help="where the wheels are, or go")
    parser.add_argument("--out", default=os.path.join(ROOT, "vicuna_bench", "ge_converters.json"))
    ns = parser.parse_args(argv)
    os.makedirs(ns.wheels, exist_ok=True)
    versions = ns.versions or sorted(TORCHAIR_OF_TORCH_NPU, key=_numeric)
    wheels, tables = {}, []
    for version in versions:
        path = wheel_path(version, ns.wheels)
        table = wheel_table(path)
        tables.append(table)
        wheels[version] = {"torchair": TORCHAIR_OF_TORCH_NPU.get(version), "readme_release": readme_release(path),
                           "wheel": os.path.basename(path), "real": len(table["real"]), "stub": len(table["stub"])}
        print(f"{version}: {len(table['real'])} real, {len(table['stub'])} stubs", file=sys.stderr)
    ops = sorted({op for t in tables for op in t["real"] + t["stub"]})
    real = [set(t["real"]) for t in tables]
    stub = [set(t["stub"]) for t in tables]
    out = {
        "about": "GE converters registered in each torch_npu wheel's torchair (scripts/ge_converter_table.py): "
                 "ops[op][i] is R (a converter), S (a stub: raises NotImplementedError) or - (none) for wheels[i]",
        "wheels": [{"torch_npu": v, **wheels[v]} for v in versions],
        "ops": {op: "".join("R" if op in r else "S" if op in s else "-" for r, s in zip(real, stub)) for op in ops},
    }
    with open(ns.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


def _numeric(version: str) -> tuple:
    return tuple(int(p.removeprefix("post")) if p.removeprefix("post").isdigit() else 0 for p in version.split("."))


if __name__ == "__main__":
    sys.exit(main())
