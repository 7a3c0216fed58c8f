"""runtime/ and crf/ are what a Jetson installs: JetPack 5 runs them on Python 3.8. Checked statically
here (this test run is on a newer Python, where 3.9+ code would pass every other test):

- vermin: syntax and the standard library (match, walrus, str.removeprefix on literals,
  functools.cache, math.lcm, new keyword arguments, ...). Annotations are not evaluated: every module
  there has `from __future__ import annotations`, under which `list[int] | None` in a signature is fine.
- a small AST pass for what vermin cannot see without false alarms: `X | Y` of types and `list[int]`
  evaluated at run time (vermin's own union check also flags annotations and `os.O_CREAT | os.O_EXCL`),
  and `.removeprefix()` / `.removesuffix()` on a name (vermin knows the receiver's type only for literals).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FLOOR = "3.8"
JETSON_PACKAGES = ["runtime", "crf"]

# Names whose `X | Y` or `X[...]` is a type expression (3.10 / 3.9 when evaluated), not bitwise or indexing.
BUILTIN_TYPES = {"int", "float", "complex", "str", "bytes", "bytearray", "bool", "object", "type",
                 "list", "dict", "tuple", "set", "frozenset"}
BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}
TYPING_GENERICS = {"List", "Dict", "Tuple", "Set", "FrozenSet", "Type", "Optional", "Union", "Callable",
                   "Sequence", "Mapping", "Iterable", "Iterator", "Any"}
NEW_STR_METHODS = {"removeprefix": "3.9", "removesuffix": "3.9"}


def vermin_violations(paths: list[Path]) -> list[str]:
    """'path:line: feature (needs 3.x)' for each construct newer than FLOOR that vermin finds."""
    try:
        import vermin  # noqa: F401
    except ImportError:
        pytest.fail("vermin is not installed: it is in the test extra (pip install -e '.[test]')")
    cmd = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
           f"--target={FLOOR}-", "--no-tips", "--violations", "--no-config-file", "--format", "parsable",
           *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = []
    for line in proc.stdout.splitlines():
        # parsable format: path:line:column:py2:py3:feature; per-file and overall verdicts have no line
        parts = line.split(":", 5)
        if len(parts) == 6 and parts[0] and parts[1]:
            found.append(f"{parts[0]}:{parts[1]}: {parts[5]} (needs {parts[4]})")
    if proc.returncode not in (0, 1) or (proc.returncode == 1) != bool(found):
        pytest.fail(f"vermin exited {proc.returncode} with {len(found)} violations:\n{proc.stdout}\n{proc.stderr}")
    return found


def _is_type_expr(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in BUILTIN_TYPES or node.id in TYPING_GENERICS
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return isinstance(node.value, ast.Name) and (node.value.id in BUILTIN_GENERICS
                                                     or node.value.id in TYPING_GENERICS)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_expr(node.left) or _is_type_expr(node.right)
    return False


def _annotations(tree: ast.Module) -> list[ast.expr]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            args = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
            out += [x.annotation for x in args if x.annotation is not None]
            if node.returns is not None:
                out.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            out.append(node.annotation)
    return out


def runtime_type_violations(path: Path) -> list[str]:
    """'path:line: ...' for type expressions that Python evaluates and FLOOR cannot: `X | Y` (3.10),
    `list[int]` (3.9), and str methods newer than FLOOR called on anything."""
    tree = ast.parse(path.read_text(), str(path))
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                    and any(a.name == "annotations" for a in n.names) for n in tree.body)
    skip = {id(n) for a in _annotations(tree) if postponed for n in ast.walk(a)}
    found: list[tuple[int, str]] = []

    def report(node: ast.AST, what: str) -> None:
        found.append((node.lineno, f"{path}:{node.lineno}: {what}"))

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and _is_type_expr(node):
            skip.update(id(n) for n in ast.walk(node))  # one report per union
            report(node, "union type `X | Y` evaluated at run time (needs 3.10)")
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
              and node.value.id in BUILTIN_GENERICS):
            report(node, f"builtin generic `{node.value.id}[...]` evaluated at run time (needs 3.9)")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in NEW_STR_METHODS and not isinstance(node.func.value, ast.Constant)):
            report(node, f"`.{node.func.attr}()` (needs {NEW_STR_METHODS[node.func.attr]})")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
              and isinstance(node.args[1], ast.BinOp) and isinstance(node.args[1].op, ast.BitOr)):
            skip.update(id(n) for n in ast.walk(node.args[1]))
            report(node, f"{node.func.id}() with a `X | Y` union (needs 3.10)")
    return [text for _, text in sorted(found)]


def floor_violations(paths: list[Path]) -> list[str]:
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    return vermin_violations(paths) + [v for f in files for v in runtime_type_violations(f)]


def test_jetson_packages_keep_to_python_3_8():
    found = floor_violations([ROOT / p for p in JETSON_PACKAGES])
    assert not found, (f"runtime/ and crf/ must run on Python {FLOOR} (JetPack 5):\n"
                       + "\n".join(v.replace(f"{ROOT}/", "") for v in found))


GOOD = '''\
from __future__ import annotations
import functools
import os
from typing import Optional, List

def f(x: list[int] | None, y: dict[str, tuple[int, ...]] = None) -> int | None:
    z: list[str] | None = None
    flags = os.O_WRONLY | os.O_CREAT | 0o600
    return isinstance(x, (int, str)) and flags | 1

class A:
    a: int | None = None
    b: Optional[List[int]] = None

@functools.lru_cache(maxsize=None)
def g(v: str):
    return v[len("x"):] if v.startswith("x") else v
'''

BAD = {  # name: (source, the line vermin or the AST pass must name, what the report says)
    "match": ("def g(v):\n    match v:\n        case 1:\n            return 0\n", 2, "pattern matching"),
    "removeprefix literal": ("a = 1\nb = 'abc'.removeprefix('a')\n", 2, "str.removeprefix"),
    "removeprefix name": ("def g(name):\n    return name.removeprefix('x')\n", 2, ".removeprefix()"),
    "functools.cache": ("import functools\n\n@functools.cache\ndef g(v):\n    return v\n", 3, "functools.cache"),
    "runtime union": ("from __future__ import annotations\nAlias = int | None\n", 2, "union type"),
    "isinstance union": ("def g(v, A, B):\n    return isinstance(v, A | B)\n", 2, "isinstance() with a `X | Y`"),
    "annotation without future import": ("def g(v: int | None) -> None:\n    pass\n", 1, "union type"),
    "builtin generic": ("from __future__ import annotations\nIntList = list[int]\n", 2, "builtin generic"),
    "math.lcm": ("import math\nprint(math.lcm(2, 3))\n", 2, "math.lcm"),
    "zip strict": ("a = list(zip([1], [2], strict=True))\n", 1, "strict"),
}


def test_annotations_and_bitwise_or_are_not_flagged(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(GOOD)
    assert floor_violations([tmp_path]) == []


@pytest.mark.parametrize("name", BAD)
def test_the_check_names_file_and_line_of_newer_code(tmp_path, name):
    source, line, what = BAD[name]
    bad = tmp_path / "pkg" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(source)
    (tmp_path / "pkg" / "good.py").write_text(GOOD)
    found = floor_violations([tmp_path / "pkg"])
    assert found, f"{name} was not flagged"
    assert all(v.startswith(f"{bad}:{line}: ") for v in found), found
    assert any(what in v for v in found), found
