"""Each supported TensorRT version (8.5, 8.6, 10.x, 11.x) is asked only for names it binds.

TensorRT cannot be installed here and mypy knows only the 10.13 stubs, so this check is static:
the modules in TRT_FILES are walked as ASTs, every attribute that reaches TensorRT is collected, and
the versions on which its line can run are worked out from the guards around it. Each such name
must exist in every one of those versions' bindings (tests/data/tensorrt_api.json, extracted by
tests/data/make_tensorrt_api.py from NVIDIA/TensorRT's pybind11 sources at the oldest and newest tag
of each major version).

What counts as an access:
- ``trt.X``, ``trt.X.Y`` (``trt`` being any name ``tensorrt`` is imported as): resolved in full
  against the module and class scopes (inherited members too: ``trt.Logger.WARNING``);
- ``obj.name`` on anything else, and ``getattr(obj, "name")`` / ``setattr(obj, "name", v)``, when
  ``name`` is bound somewhere in some version (the object's type is not known statically, so the
  name must exist on some class of each version); ``self.x`` and attributes of other imported
  modules are the project's own; a three-argument ``getattr`` has its default and checks nothing;
- annotations are skipped (never evaluated: the modules use ``from __future__ import annotations``).

Guards narrow the versions a line runs on: comparisons of ``trt_compat.version()`` (a (major,
minor) tuple), ``version()[0]`` or names assigned from them with int or tuple constants; calls of
trt_compat's guard functions (functions returning such a condition: each one's range is derived from
its own body); ``hasattr(obj, "name")``, after which ``name`` may be used. They act through
``if``/``elif``/``else``, ``and``/``or``/``not``, conditional expressions, ``assert`` and an ``if``
whose body leaves (return/raise) — a function guards itself: callers' guards are not followed.
"""
from __future__ import annotations

import ast
import json
import operator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT
from runtime.errors import TensorRTUnavailable
from test_tensorrt_types import TRT_FILES

API_FILE = Path(__file__).parent / "data" / "tensorrt_api.json"
COMPAT_FILE = "runtime/trt_compat.py"

# Attribute names that are bound by TensorRT in some versions but that the modules also use on
# their own or the standard library's objects (none so far: extend with the reason when needed).
NOT_TENSORRT: frozenset = frozenset()


class TensorRTApi:
    """The binding names of each version in tests/data/tensorrt_api.json."""

    def __init__(self, data: dict) -> None:
        self.versions = sorted(data, key=version_tuple)
        self.names = {v: set(data[v]["names"]) for v in self.versions}
        self.bases = {v: data[v]["bases"] for v in self.versions}
        self.members = {v: {n.rpartition(".")[2] for n in self.names[v] if "." in n} for v in self.versions}
        self.scopes = {v: {n.rpartition(".")[0] for n in self.names[v] if "." in n} for v in self.versions}
        self.any_member = set().union(*self.members.values())
        self.all = frozenset(self.versions)

    def _member(self, version: str, scope: str, name: str) -> bool:
        todo, seen = [scope], set()
        while todo:
            s = todo.pop()
            if f"{s}.{name}" in self.names[version]:
                return True
            seen.add(s)
            todo += [b for b in self.bases[version].get(s, []) if b not in seen]
        return False

    def has_path(self, version: str, path: list[str]) -> bool:
        """Whether ``tensorrt.<path>`` exists; past the last class or enum scope, the remaining
        attributes (on an instance or enum member) need only be bound on some class."""
        if path[0] not in self.names[version]:
            return False
        scope = path[0]
        for i, name in enumerate(path[1:], 1):
            if scope not in self.scopes[version]:
                return all(self.has_member(version, n) for n in path[i:])
            if not self._member(version, scope, name):
                return False
            scope = f"{scope}.{name}"
        return True

    def has_member(self, version: str, name: str) -> bool:
        return name not in self.any_member or name in self.members[version]

    def describe(self, versions) -> str:
        """'8.5.1-10.16' for a run of consecutive versions, else the list."""
        ordered = [v for v in self.versions if v in versions]
        i = self.versions.index(ordered[0])
        if len(ordered) > 1 and self.versions[i:i + len(ordered)] == ordered:
            return f"{ordered[0]}-{ordered[-1]}"
        return ", ".join(ordered)


def version_tuple(label: str) -> tuple:
    return tuple(int(p) for p in label.split("."))


@dataclass(frozen=True)
class Cond:
    """What a condition tells: the versions where it may be true / false, and the names
    hasattr() proved present when it is true / false."""

    true: frozenset
    false: frozenset
    has_true: frozenset = frozenset()
    has_false: frozenset = frozenset()

    def negate(self) -> Cond:
        return Cond(self.false, self.true, self.has_false, self.has_true)


@dataclass(frozen=True)
class Ctx:
    versions: frozenset                 # where the code can run
    has: frozenset = frozenset()        # names hasattr() guarded
    version_vars: tuple = ()            # (name, "tuple" | "major" | "minor") assigned from version()
    own: frozenset = frozenset()        # local names that hold the project's or Python's objects

    def narrow(self, versions, has) -> Ctx:
        return Ctx(self.versions & versions, self.has | has, self.version_vars, self.own)

    def var(self, name: str) -> str | None:
        return dict(self.version_vars).get(name)


_OPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
_EXITS = (ast.Return, ast.Raise, ast.Continue, ast.Break)


@dataclass
class Checker:
    api: TensorRTApi
    filename: str
    guards: dict = field(default_factory=dict)  # guard function name -> Cond
    problems: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.trt_names: set[str] = set()     # names the tensorrt module is bound to
        self.module_names: set[str] = set()  # other imported modules and names: the project's own
        self.compat_names: set[str] = set()  # names runtime.trt_compat is bound to
        self.local_version = False           # `version` is trt_compat.version itself (or imported from it)

    # --- entry points ----------------------------------------------------------------------------
    def check(self, source: str) -> list[str]:
        tree = ast.parse(source, self.filename)
        self._collect_imports(tree)
        self.stmts(tree.body, Ctx(self.api.all))
        return self.problems

    def guard_functions(self, source: str) -> dict:
        """The functions of ``source`` that return a version or hasattr condition: the docstring
        and imports aside, their body is one ``return <condition>``."""
        tree = ast.parse(source, self.filename)
        self._collect_imports(tree)
        out = {}
        for f in tree.body:
            if not isinstance(f, ast.FunctionDef):
                continue
            body = [s for s in f.body if not isinstance(s, (ast.Import, ast.ImportFrom))
                    and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
                c = self.cond(body[0].value, Ctx(self.api.all))
                if c.true != self.api.all or c.has_true:
                    out[f.name] = c
                    self.guards[f.name] = c  # guards may call guards defined above them
        return out

    def _collect_imports(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "tensorrt":
                        self.trt_names.add(a.asname or a.name)
                    elif a.name.endswith("trt_compat"):
                        self.compat_names.add(a.asname or a.name)
                    else:
                        self.module_names.add((a.asname or a.name).split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    bound = a.asname or a.name
                    if a.name == "trt_compat":
                        self.compat_names.add(bound)
                    elif (node.module or "").endswith("trt_compat") and a.name == "version":
                        self.local_version = True
                    elif (node.module or "").endswith("trt_compat") and a.name in self.guards:
                        self.guards.setdefault(bound, self.guards[a.name])
                    else:
                        self.module_names.add(bound)
            elif isinstance(node, ast.FunctionDef) and node.name == "version" and node.col_offset == 0:
                self.local_version = True
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and isinstance(node.value, ast.Call) and self._called(node.value) == "load_tensorrt"):
                self.trt_names.add(node.targets[0].id)
        self.module_names -= self.trt_names

    # --- statements ------------------------------------------------------------------------------
    def stmts(self, body: list, ctx: Ctx) -> None:
        for s in body:
            if not ctx.versions:
                return  # unreachable on every version
            ctx = self.stmt(s, ctx)

    def stmt(self, s: ast.stmt, ctx: Ctx) -> Ctx:
        """Check ``s`` under ``ctx``; returns the context of the statements after it."""
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for e in s.decorator_list + s.args.defaults + [d for d in s.args.kw_defaults if d is not None]:
                self.expr(e, ctx)
            # It runs where it is defined, with its own version variables.
            self.stmts(s.body, Ctx(ctx.versions, ctx.has, (), self._own_names(s, ctx.own)))
            return ctx
        if isinstance(s, ast.ClassDef):
            for e in s.decorator_list + s.bases:
                self.expr(e, ctx)
            self.stmts(s.body, ctx)
            return ctx
        if isinstance(s, ast.If):
            c = self.cond(s.test, ctx)
            self.stmts(s.body, ctx.narrow(c.true, c.has_true))
            self.stmts(s.orelse, ctx.narrow(c.false, c.has_false))
            body_exits, else_exits = self._exits(s.body), self._exits(s.orelse)
            if body_exits and else_exits:
                return ctx.narrow(frozenset(), frozenset())
            if body_exits:
                return ctx.narrow(c.false, c.has_false)
            if else_exits:
                return ctx.narrow(c.true, c.has_true)
            return ctx
        if isinstance(s, ast.Assert):
            c = self.cond(s.test, ctx)
            if s.msg is not None:
                self.expr(s.msg, ctx.narrow(c.false, c.has_false))
            return ctx.narrow(c.true, c.has_true)
        if isinstance(s, ast.AnnAssign):  # the annotation is never evaluated
            self.expr(s.target, ctx)
            if s.value is not None:
                self.expr(s.value, ctx)
            return ctx
        if isinstance(s, ast.Assign):
            self.expr(s.value, ctx)
            for t in s.targets:
                self.expr(t, ctx)
            return self._version_assignment(s, ctx)
        for child in ast.iter_child_nodes(s):  # the statement's own expressions; bodies below
            if isinstance(child, ast.expr):
                self.expr(child, ctx)
            elif isinstance(child, ast.withitem):
                self.expr(child.context_expr, ctx)
                if child.optional_vars is not None:
                    self.expr(child.optional_vars, ctx)
        for name in ("body", "orelse", "finalbody"):
            self.stmts(getattr(s, name, []) or [], ctx)
        for handler in getattr(s, "handlers", []) or []:
            if handler.type is not None:
                self.expr(handler.type, ctx)
            self.stmts(handler.body, ctx)
        return ctx

    def _own_names(self, func: ast.AST, outer: frozenset) -> frozenset:
        """The names of ``func`` that hold no TensorRT object: parameters annotated with a type that
        is not TensorRT's, and locals every assignment of which is such a value (a literal, a call of
        a builtin or of an imported module's or class's function, another such name)."""
        own, other = set(), set()
        args = func.args
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None:
                mentions_trt = a.annotation is not None and any(
                    isinstance(n, ast.Name) and n.id in self.trt_names | {"tensorrt"} for n in ast.walk(a.annotation))
                (own if a.annotation is not None and not mentions_trt else other).add(a.arg)
        todo = list(func.body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            todo.extend(ast.iter_child_nodes(node))
            pairs = []
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                pairs = [(node.target, node.value)]
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                pairs = [(node.optional_vars, node.context_expr)]
            elif isinstance(node, (ast.For, ast.comprehension)):
                pairs = [(node.target, None)]
            for target, value in pairs:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        single = isinstance(target, ast.Name) and value is not None
                        (own if single and self._own_value(value, outer | own) else other).add(n.id)
        return frozenset((outer - other - own) | (own - other))

    _BUILTINS = frozenset(["open", "str", "int", "float", "bool", "bytes", "len", "list", "dict", "tuple", "set",
                           "sorted", "range", "iter", "zip", "enumerate", "min", "max", "abs", "repr"])

    def _own_value(self, value: ast.AST, own) -> bool:
        if isinstance(value, (ast.Constant, ast.JoinedStr, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.ListComp,
                              ast.DictComp, ast.SetComp, ast.GeneratorExp)):
            return True
        if isinstance(value, ast.Name):
            return value.id in own
        if isinstance(value, ast.Call):
            f = value.func
            if isinstance(f, ast.Name):
                return f.id in self._BUILTINS or f.id in self.module_names
            return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in self.module_names
        return False

    @staticmethod
    def _exits(body: list) -> bool:
        return bool(body) and isinstance(body[-1], _EXITS)

    def _version_assignment(self, s: ast.Assign, ctx: Ctx) -> Ctx:
        """``v = version()``, ``major = version()[0]``, ``major, minor = version()``."""
        if len(s.targets) != 1:
            return ctx
        target, kind = s.targets[0], self._version_kind(s.value, ctx)
        new = []
        if isinstance(target, ast.Name) and kind:
            new = [(target.id, kind)]
        elif isinstance(target, ast.Tuple) and kind == "tuple" and len(target.elts) == 2:
            new = [(e.id, k) for e, k in zip(target.elts, ("major", "minor")) if isinstance(e, ast.Name)]
        kept = tuple(p for p in ctx.version_vars if not (isinstance(target, ast.Name) and p[0] == target.id))
        return Ctx(ctx.versions, ctx.has, kept + tuple(new), ctx.own)

    # --- expressions -----------------------------------------------------------------------------
    def expr(self, node: ast.AST, ctx: Ctx) -> None:
        self.cond(node, ctx)

    def cond(self, node: ast.AST, ctx: Ctx) -> Cond:
        """Check the accesses in ``node`` (short-circuits narrowing the later operands) and return
        what ``node`` tells as a condition."""
        unknown = Cond(self.api.all, self.api.all)
        if not ctx.versions:
            return unknown
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            t, f, ht, hf = (self.api.all, frozenset(), frozenset(), None) if is_and else \
                (frozenset(), self.api.all, None, frozenset())
            inner = ctx
            for v in node.values:
                c = self.cond(v, inner)
                if is_and:
                    t, f, ht = t & c.true, f | c.false, ht | c.has_true
                    hf = c.has_false if hf is None else hf & c.has_false
                    inner = inner.narrow(c.true, c.has_true)
                else:
                    t, f, hf = t | c.true, f & c.false, hf | c.has_false
                    ht = c.has_true if ht is None else ht & c.has_true
                    inner = inner.narrow(c.false, c.has_false)
            return Cond(t, f, ht or frozenset(), hf or frozenset())
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self.cond(node.operand, ctx).negate()
        if isinstance(node, ast.IfExp):
            c = self.cond(node.test, ctx)
            self.expr(node.body, ctx.narrow(c.true, c.has_true))
            self.expr(node.orelse, ctx.narrow(c.false, c.has_false))
            return unknown
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                self.expr(part, ctx)
            return self._version_compare(node, ctx) or unknown
        if isinstance(node, ast.Call):
            return self._call(node, ctx) or unknown
        if isinstance(node, ast.Attribute):
            self._attribute(node, ctx)
            return unknown
        if isinstance(node, ast.Lambda):
            self.expr(node.body, ctx)
            return unknown
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, ctx)
            elif isinstance(child, (ast.comprehension, ast.keyword)):
                for part in ast.iter_child_nodes(child):
                    if isinstance(part, ast.expr):
                        self.expr(part, ctx)
        return unknown

    def _called(self, call: ast.Call) -> str | None:
        """The name of a called function that is trt_compat's (or a builtin's); None otherwise."""
        f = call.func
        if isinstance(f, ast.Name):
            return f.id
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in self.compat_names:
            return f.attr
        return None

    def _call(self, node: ast.Call, ctx: Ctx) -> Cond | None:
        name = self._called(node)
        args = node.args
        text = args[1].value if len(args) > 1 and isinstance(args[1], ast.Constant) and \
            isinstance(args[1].value, str) else None
        if name in ("hasattr", "getattr", "setattr") and isinstance(node.func, ast.Name) and text is not None:
            self.expr(args[0], ctx)
            for extra in args[2:]:
                self.expr(extra, ctx)
            if name == "hasattr":
                return Cond(self.api.all, self.api.all, frozenset([text]))
            if name == "setattr" or len(args) == 2:  # getattr with a default checks nothing
                self._access(args[0], text, node, ctx)
            return None
        self.expr(node.func, ctx)
        for a in node.args:
            self.expr(a, ctx)
        for k in node.keywords:
            self.expr(k.value, ctx)
        return self.guards.get(name)

    def _version_kind(self, node: ast.AST, ctx: Ctx) -> str | None:
        """'tuple' for version(), 'major' / 'minor' for version()[0] / [1] (or names holding them)."""
        if isinstance(node, ast.Name):
            return ctx.var(node.id)
        if isinstance(node, ast.Call) and not node.args and self._called(node) == "version" and (
                isinstance(node.func, ast.Attribute) or self.local_version):
            return "tuple"
        if isinstance(node, ast.Subscript) and self._version_kind(node.value, ctx) == "tuple":
            index = node.slice.value if isinstance(node.slice, ast.Constant) else None
            return {0: "major", 1: "minor"}.get(index) if isinstance(index, int) else None
        return None

    def _version_compare(self, node: ast.Compare, ctx: Ctx) -> Cond | None:
        parts = [node.left, *node.comparators]
        true = set(self.api.all)
        for (left, op, right) in zip(parts, node.ops, parts[1:]):
            kinds = (self._version_kind(left, ctx), self._version_kind(right, ctx))
            if type(op) not in _OPS or (kinds[0] is None) == (kinds[1] is None):
                return None
            const = right if kinds[0] else left
            try:
                value = ast.literal_eval(const)
            except ValueError:
                return None
            kind = kinds[0] or kinds[1]
            if not isinstance(value, tuple if kind == "tuple" else int):
                return None
            for v in self.api.versions:
                major, minor = version_tuple(v)[:2]
                have = {"tuple": (major, minor), "major": major, "minor": minor}[kind]
                a, b = (have, value) if kinds[0] else (value, have)
                if not _OPS[type(op)](a, b):
                    true.discard(v)
        return Cond(frozenset(true), self.api.all - true)

    def _attribute(self, node: ast.Attribute, ctx: Ctx) -> None:
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        chain.reverse()
        if isinstance(base, ast.Name) and base.id in self.trt_names:
            self._report(node, ".".join(chain), [v for v in ctx.versions if not self.api.has_path(v, chain)], ctx)
            return
        if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in self.module_names
                                           or base.id in self.compat_names):
            return  # the project's own objects and modules (the first attribute; deeper ones too)
        self.expr(node.value, ctx)
        self._access(node.value, node.attr, node, ctx)

    def _access(self, obj: ast.AST, name: str, node: ast.AST, ctx: Ctx) -> None:
        """``obj.name`` (or getattr/setattr with "name") where obj's type is not known."""
        if isinstance(obj, ast.Name) and obj.id in self.trt_names:
            self._report(node, name, [v for v in ctx.versions if not self.api.has_path(v, [name])], ctx)
            return
        if isinstance(obj, ast.Attribute):
            chain, base = [obj.attr], obj.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in self.trt_names:
                path = chain[::-1] + [name]
                self._report(node, ".".join(path), [v for v in ctx.versions if not self.api.has_path(v, path)], ctx)
                return
        if name in NOT_TENSORRT or (isinstance(obj, ast.Name) and (obj.id in ("self", "cls") or obj.id in ctx.own
                                                                    or obj.id in self.module_names)):
            return
        self._report(node, name, [v for v in ctx.versions if not self.api.has_member(v, name)], ctx)

    def _report(self, node: ast.AST, name: str, missing: list, ctx: Ctx) -> None:
        if not missing or name.rpartition(".")[2] in ctx.has:
            return
        self.problems.append(
            f"{self.filename}:{node.lineno} uses {name}, absent in TensorRT {self.api.describe(missing)} "
            f"(the code path runs on {self.api.describe(ctx.versions)})")


# --- the checks ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api() -> TensorRTApi:
    return TensorRTApi(json.loads(API_FILE.read_text()))


@pytest.fixture(scope="module")
def guards(api) -> dict:
    return Checker(api, COMPAT_FILE).guard_functions((ROOT / COMPAT_FILE).read_text())


def check_source(api: TensorRTApi, guards: dict, source: str, filename: str) -> list[str]:
    return Checker(api, filename, dict(guards)).check(source)


def test_the_data_covers_each_supported_major_version(api):
    assert {version_tuple(v)[0] for v in api.versions} == {8, 10, 11}
    assert {version_tuple(v)[:2] for v in api.versions} >= {(8, 5), (8, 6), (10, 0), (11, 0)}
    for v in api.versions:  # the core every version has, so a broken extraction shows here
        for path in (["Builder"], ["Runtime", "deserialize_cuda_engine"], ["ICudaEngine", "get_tensor_name"],
                     ["OnnxParser", "parse_from_file"], ["Logger", "WARNING"], ["__version__"]):
            assert api.has_path(v, path), (v, path)


def test_the_guard_functions_ranges_come_from_their_bodies(api, guards):
    """trt_compat's guard functions as the checker reads them: if a body changes into something it
    cannot read, the guard disappears from this table and this test says so."""
    ranges = {name: sorted(c.true, key=version_tuple) for name, c in guards.items()}
    assert ranges["supports_precision_flags"] == [v for v in api.versions if version_tuple(v)[0] < 11]
    assert ranges["supports_portable_plans"] == [v for v in api.versions if version_tuple(v)[:2] >= (8, 6)]
    assert "FP16" in guards["supports_precision_flags"].has_true


@pytest.mark.parametrize("path", TRT_FILES)
def test_each_version_is_asked_only_for_what_it_binds(api, guards, path):
    problems = check_source(api, guards, (ROOT / path).read_text(), path)
    assert not problems, "\n".join(problems)


def check_snippet(api, guards, tmp_path, body: str) -> list[str]:
    f = tmp_path / "snippet.py"
    f.write_text("import tensorrt as trt\nfrom runtime import trt_compat\nfrom runtime.trt_compat import version\n\n"
                 "def f(config, context, engine, error, runtime):\n"
                 + "".join(f"    {line}\n" for line in body.splitlines()))
    return check_source(api, guards, f.read_text(), f.name)


def test_a_removed_builder_flag_fails_for_11(api, guards, tmp_path):
    problems = check_snippet(api, guards, tmp_path, "config.set_flag(trt.BuilderFlag.FP16)")
    assert problems == ["snippet.py:6 uses BuilderFlag.FP16, absent in TensorRT 11.0-11.1 "
                        "(the code path runs on 8.5.1-11.1)"]


@pytest.mark.parametrize("guard", ["if version()[0] < 11:", "if trt_compat.version() < (11, 0):",
                                   "if trt_compat.supports_precision_flags():",
                                   "if hasattr(trt.BuilderFlag, 'FP16'):"])
def test_a_guard_lets_it_pass(api, guards, tmp_path, guard):
    assert check_snippet(api, guards, tmp_path, f"{guard}\n    config.set_flag(trt.BuilderFlag.FP16)") == []


def test_the_else_branch_of_a_guard_runs_on_the_rest(api, guards, tmp_path):
    problems = check_snippet(api, guards, tmp_path, "if version()[0] >= 11:\n    pass\n"
                             "else:\n    flags = trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH\n"
                             "if not version()[0] >= 11:\n    flags = 0\nelse:\n    flags = trt.BuilderFlag.FP16")
    assert problems == ["snippet.py:13 uses BuilderFlag.FP16, absent in TensorRT 11.0-11.1 "
                        "(the code path runs on 11.0-11.1)"]


def test_an_early_exit_guards_the_rest_of_the_function(api, guards, tmp_path):
    assert check_snippet(api, guards, tmp_path, "if version() < (8, 6):\n    raise RuntimeError('8.6+')\n"
                         "runtime.engine_host_code_allowed = True") == []
    problems = check_snippet(api, guards, tmp_path, "if version() < (8, 6):\n    print('8.6+')\n"
                             "runtime.engine_host_code_allowed = True")
    assert problems == ["snippet.py:8 uses engine_host_code_allowed, absent in TensorRT 8.5.1 "
                        "(the code path runs on 8.5.1-11.1)"]


def test_execute_async_v2_fails_for_10_and_11(api, guards, tmp_path):
    problems = check_snippet(api, guards, tmp_path, "context.execute_async_v2([0, 0], 0)")
    assert problems == ["snippet.py:6 uses execute_async_v2, absent in TensorRT 10.0.1-11.1 "
                        "(the code path runs on 8.5.1-11.1)"]


def test_a_name_every_version_binds_passes(api, guards, tmp_path):
    assert check_snippet(api, guards, tmp_path, "name = engine.get_tensor_name(0)") == []


def test_explicit_batch_fails_for_11_unguarded_also_through_getattr(api, guards, tmp_path):
    expected = "uses NetworkDefinitionCreationFlag.EXPLICIT_BATCH, absent in TensorRT 11.0-11.1 " \
               "(the code path runs on 8.5.1-11.1)"
    for line in ("flag = trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
                 "flag = getattr(trt.NetworkDefinitionCreationFlag, 'EXPLICIT_BATCH')"):
        assert check_snippet(api, guards, tmp_path, line) == [f"snippet.py:6 {expected}"]
    assert check_snippet(api, guards, tmp_path,
                         "flag = getattr(trt.NetworkDefinitionCreationFlag, 'EXPLICIT_BATCH', None)") == []


def test_hasattr_guards_only_the_name_it_names(api, guards, tmp_path):
    problems = check_snippet(api, guards, tmp_path, "if hasattr(error, 'node_name'):\n"
                             "    name, op = error.node_name(), error.node_operator()")
    assert problems == ["snippet.py:7 uses node_operator, absent in TensorRT 8.5.1-8.6.1 "
                        "(the code path runs on 8.5.1-11.1)"]
    assert check_snippet(api, guards, tmp_path, "if version() >= (9, 1) and hasattr(error, 'node_name'):\n"
                         "    name, op = error.node_name(), error.node_operator()") == []


def test_a_guard_in_an_and_covers_its_right_operand_only(api, guards, tmp_path):
    ok = "ok = version()[0] < 11 and trt.BuilderFlag.FP16 is not None"
    bad = "ok = trt.BuilderFlag.FP16 is not None and version()[0] < 11"
    assert check_snippet(api, guards, tmp_path, ok) == []
    assert check_snippet(api, guards, tmp_path, bad) == [
        "snippet.py:6 uses BuilderFlag.FP16, absent in TensorRT 11.0-11.1 (the code path runs on 8.5.1-11.1)"]


def test_annotations_and_the_projects_own_objects_are_not_tensorrt(api, guards, tmp_path):
    assert check_snippet(api, guards, tmp_path, "x: trt.NotAClass = self_made()\n"
                         "trt_compat.execute_async_v2\nimport numpy as np\nnp.execute_async_v2") == []
    source = ("from __future__ import annotations\nimport hashlib\nimport tensorrt\n"
              "def f(meta: EngineMeta, context: tensorrt.IExecutionContext, other):\n"
              "    h = hashlib.sha256()\n    with open('x') as stream:\n        stream.execute_async_v2\n"
              "    h.execute_async_v2, meta.execute_async_v2\n"
              "    context.execute_async_v2\n    other.execute_async_v2\n")
    assert [p.split(" uses")[0] for p in check_source(api, guards, source, "own.py")] == ["own.py:9", "own.py:10"]


def test_the_extraction_reads_pybind11_bindings():
    """tests/data/make_tensorrt_api.py on a small binding source: what the JSON is made of."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tensorrt_api", API_FILE.with_name("make_tensorrt_api.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    source = """
    py::class_<ILogger, PyLogger> baseLoggerBinding{m, "ILogger", ILoggerDoc::descr, py::module_local()};
    py::enum_<ILogger::Severity>(baseLoggerBinding, "Severity", py::arithmetic())
        .value("WARNING", ILogger::Severity::kWARNING, "a \\"quoted\\" (doc)") // .value("COMMENTED", 0)
        .export_values();
    baseLoggerBinding.def(py::init<>()).def("log", &ILogger::log, "severity"_a, "msg"_a);
    py::class_<DefaultLogger, ILogger>(m, "Logger")
        .def("lambda_body", [](DefaultLogger& self) { if (a < b) { return self.x(); } return 0; }, "x"_a)
        .def_property_readonly("min_severity", &DefaultLogger::get);
    py::class_<IConvolutionLayer, ILayer, std::unique_ptr<IConvolutionLayer, py::nodelete>>(m, "IConvolutionLayer")
        .def_property("kernel_size_nd", &get, &set);
    py::class_<ILayer, std::unique_ptr<ILayer, py::nodelete>>(m, "ILayer").def_readwrite("name", &ILayer::name);
    #if ENABLE_INETWORK_SERIALIZE
    m.def("serialize_network", &serialize);
    #endif
    #if EXPORT_ALL_BINDINGS
    m.def("get_builder_plugin_registry", &get);
    #endif
    """
    api = make.Api()
    api.scan(make.strip_comments(make.preprocess(source)), "test")
    assert api.names() == ["IConvolutionLayer", "IConvolutionLayer.kernel_size_nd", "ILayer", "ILayer.name",
                           "ILogger", "ILogger.Severity", "ILogger.Severity.WARNING", "ILogger.WARNING",
                           "ILogger.log", "Logger", "Logger.lambda_body", "Logger.min_severity",
                           "get_builder_plugin_registry"]
    assert api.bases() == {"IConvolutionLayer": ["ILayer"], "Logger": ["ILogger"]}


# --- the guards trt_compat runs before a version-limited call --------------------------------------

@pytest.fixture
def running(monkeypatch):
    """Make trt_compat report a TensorRT version (the guards below refuse before importing it)."""
    from runtime import trt_compat

    def run(full: str):
        monkeypatch.setattr(trt_compat, "full_version", lambda: full)
        monkeypatch.setattr(trt_compat, "version", lambda: trt_compat.parse_version(full)[:2])
        return trt_compat
    return run


@pytest.mark.parametrize("call, what", [("set_hardware_compatible", "hardware-compatible plans"),
                                        ("set_version_compatible", "version-compatible plans"),
                                        ("allow_plan_host_code", "version-compatible plans")])
def test_portable_plan_calls_refuse_tensorrt_8_5(running, call, what):
    trt_compat = running("8.5.3.1")
    with pytest.raises(TensorRTUnavailable) as e:
        getattr(trt_compat, call)(object())
    assert str(e.value) == f"{what} need TensorRT 8.6 or newer; this is TensorRT 8.5.3.1"


def test_fp16_flag_refused_on_tensorrt_11(running):
    trt_compat = running("11.0.0.7")
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 11\.0\.0\.7 has no FP16 builder flag: "
                       r"from 11\.0 on the ONNX model's own tensor types decide the precision"):
        trt_compat.set_precision(object(), "fp32", fp16=True)
    # an FP16 or INT8 ONNX needs no flag on 11.x: the config is not touched (an object() would fail)
    for graph in ("fp16", "int8"):
        trt_compat.set_precision(object(), graph, fp16=False)


@pytest.mark.parametrize("major, graph, fp16, flags", [
    (8, "fp32", False, ()), (8, "fp32", True, ("FP16",)), (8, "fp16", False, ("FP16",)),
    (8, "int8", False, ("INT8",)), (8, "int8", True, ("FP16", "INT8")), (10, "int8", False, ("INT8",)),
    (10, "fp16", False, ("FP16",)), (11, "int8", False, ()), (11, "fp16", False, ()), (11, "fp32", False, ()),
])
def test_builder_precision_flags_per_version(major, graph, fp16, flags):
    from runtime import trt_compat

    assert trt_compat.builder_precision_flags(major, graph, fp16) == flags


@pytest.mark.parametrize("graph, fp16, name", [("fp32", False, "fp32"), ("fp32", True, "fp16"),
                                               ("fp16", False, "fp16"), ("fp16", True, "fp16"),
                                               ("int8", False, "int8"), ("int8", True, "int8+fp16")])
def test_plan_precision_names(graph, fp16, name):
    from runtime import trt_compat

    assert trt_compat.precision_name(fp16, graph) == name
