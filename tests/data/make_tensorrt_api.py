"""Regenerate tests/data/tensorrt_api.json: every name TensorRT's Python bindings define, per version.

Needs a clone (bare is fine) of https://github.com/NVIDIA/TensorRT with its tags:

    git clone --bare https://github.com/NVIDIA/TensorRT /tmp/TensorRT.git
    python tests/data/make_tensorrt_api.py /tmp/TensorRT.git

Each tag's binding sources (python/src/**/*.cpp) are read with ``git show`` and scanned for what
pybind11 binds: classes and enums (``py::class_<...>(scope, "Name")``, ``py::enum_``,
``py::bind_vector``), their methods and properties (``.def("name"``, ``.def_property*``,
``.def_readwrite``/``readonly``, ``.def_static``), enum members (``.value("NAME"``, copied into the
enclosing scope by ``.export_values()``) and module functions (``m.def("name"``); the package's
``tensorrt/__init__.py`` adds its Python-level names (``__version__``, ``nptype``, ...).
``#if EXPORT_ALL_BINDINGS`` blocks count (the full ``tensorrt`` module has them) and
``#if ENABLE_INETWORK_SERIALIZE`` ones do not (not enabled in NVIDIA's builds); other conditionals
keep both branches. Output: {version: {"names": [...], "bases": {class: [base classes]}}} where
names are module-level names ("Builder", "nptype") and scoped ones ("IBuilderConfig.set_flag",
"ILogger.Severity.WARNING").
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# version label -> tag: the oldest and newest release of each supported major version
# (10.0.0 was the early-access release; 10.0.1 is 10.0's GA).
TAGS = {"8.5.1": "8.5.1", "8.6.1": "v8.6.1", "10.0.1": "v10.0.1", "10.16": "v10.16", "11.0": "v11.0",
        "11.1": "v11.1"}
OUT = Path(__file__).with_name("tensorrt_api.json")

DEFINED_MACROS = {"EXPORT_ALL_BINDINGS": True, "ENABLE_INETWORK_SERIALIZE": False}
# Chained calls that bind a name given as their first (string literal) argument.
NAMING_CALLS = {"def", "def_static", "def_property", "def_property_readonly", "def_property_static",
                "def_property_readonly_static", "def_readwrite", "def_readonly", "def_readwrite_static",
                "def_readonly_static", "value", "attr"}
NAMESPACES = re.compile(r"\b(?:nvinfer1|nvonnxparser|nvcaffeparser1|nvuffparser|tensorrt|plugin|v_1_0)::")


def git_show(repo: str, tag: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def binding_sources(repo: str, tag: str) -> list[str]:
    files = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", tag, "--", "python/src"],
                           check=True, capture_output=True, text=True).stdout.split()
    return [f for f in files if f.endswith(".cpp")]


def preprocess(text: str) -> str:
    """Drop the lines of #if blocks whose macro is known to be off; keep both branches otherwise."""
    out, stack = [], []  # stack entries: True (keep), False (drop), None (unknown: keep)
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"#\s*(if|ifdef|ifndef|elif|else|endif)\b\s*(.*)", s)
        if m:
            kind, cond = m.groups()
            cond = re.sub(r"//.*", "", cond).strip()
            if kind in ("if", "ifdef", "ifndef"):
                known = DEFINED_MACROS.get(re.sub(r"^defined\s*\(?\s*(\w+)\s*\)?$", r"\1", cond))
                stack.append(None if known is None else (not known if kind == "ifndef" else known))
            elif kind in ("else", "elif") and stack:
                stack[-1] = None if stack[-1] is None or kind == "elif" else not stack[-1]
            elif kind == "endif" and stack:
                stack.pop()
            out.append("")
            continue
        out.append(line if all(k is not False for k in stack) else "")
    return "\n".join(out)


def strip_comments(text: str) -> str:
    """Comments replaced by spaces; string and character literals kept as they are."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        elif c in "\"'":
            j = skip_literal(text, i)
            out.append(text[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_literal(text: str, i: int) -> int:
    """Index after the string or character literal starting at text[i]."""
    if text[i] == '"' and i > 0 and text[i - 1] == "R":  # raw string R"delim(...)delim"
        delim = text[i + 1:text.index("(", i)]
        return text.index(f"){delim}\"", i) + len(delim) + 2
    quote, j = text[i], i + 1
    while text[j] != quote:
        j += 2 if text[j] == "\\" else 1
    return j + 1


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def matching(text: str, i: int) -> int:
    """Index after the bracket group opening at text[i] ('(', '{', '[' or '<' of a template)."""
    pairs = {"(": ")", "{": "}", "[": "]", "<": ">"}
    stack, j = [pairs[text[i]]], i + 1
    while stack:
        c = text[j]
        if c in "\"'":
            j = skip_literal(text, j)
            continue
        if text[i] == "<" and c in "()":  # inside template arguments only <> nest (plus parentheses)
            stack.append(")") if c == "(" else stack.pop()
        elif c in pairs and (c != "<" or text[i] == "<"):
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        j += 1
    return j


def split_args(inner: str, angles: bool = False) -> list[str]:
    """Top-level comma-separated parts of an argument list (``angles``: a template-argument list,
    where <> nest too; in call arguments < may be a comparison)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(inner):
        c = inner[i]
        if c in "\"'":
            i = skip_literal(inner, i)
            continue
        if c in "([{" or (angles and c == "<"):
            depth += 1
        elif c in ")]}" or (angles and c == ">"):
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
        i += 1
    parts.append(inner[start:].strip())
    return parts


def string_literal(arg: str) -> str | None:
    m = re.fullmatch(r'"([A-Za-z_][A-Za-z0-9_]*)"', arg.strip())
    return m.group(1) if m else None


def cpp_type(arg: str) -> str:
    return NAMESPACES.sub("", re.sub(r"\s+", "", arg))


class Api:
    """Names bound in one version: scopes ('' is the module) -> member names; class bases."""

    def __init__(self) -> None:
        self.members: dict[str, set[str]] = {"": set()}
        self.scope_of_type: dict[str, str] = {}     # C++ type -> Python scope ("ILogger.Severity")
        self.template_args: dict[str, list[str]] = {}  # Python scope -> its other template arguments
        self.unnamed: list[str] = []                   # bindings whose name is not a literal

    def add(self, scope: str, name: str) -> None:
        self.members.setdefault(scope, set()).add(name)

    def scan(self, text: str, where: str) -> None:
        variables = {"m": ""}  # C++ variable -> the Python scope it binds into
        pos = 0
        pattern = re.compile(r"py::(class_|enum_|bind_vector|bind_map)\s*<|\b([A-Za-z_]\w*)\s*\.\s*(?=\w+\s*\()")
        while True:
            m = pattern.search(text, pos)
            if m is None:
                return
            if m.group(1):  # a new class or enum
                t_end = matching(text, m.end() - 1)
                targs = [cpp_type(a) for a in split_args(text[m.end():t_end - 1], angles=True)]
                i = skip_ws(text, t_end)
                var = re.match(r"[A-Za-z_]\w*", text[i:])
                if var:
                    i = skip_ws(text, i + var.end())
                if i >= len(text) or text[i] not in "({":
                    pos = i
                    continue
                a_end = matching(text, i)
                args = split_args(text[i + 1:a_end - 1])
                parent = variables.get(args[0].strip()) if args else None
                name = string_literal(args[1]) if len(args) > 1 else None
                if parent is None or name is None:
                    self.unnamed.append(f"{where}: {text[m.start():a_end][:120]!r}")
                    pos = a_end
                    continue
                scope = f"{parent}.{name}" if parent else name
                self.add(parent, name)
                self.members.setdefault(scope, set())
                self.scope_of_type[targs[0]] = scope
                self.template_args[scope] = targs[1:]
                if var:
                    variables[var.group()] = scope
                pos = self.chain(text, a_end, scope, parent)
            else:  # a statement on a binding variable: m.def(...), someBinding.def(...)
                if m.group(2) not in variables:
                    pos = m.end()
                    continue
                scope = variables[m.group(2)]
                pos = self.chain(text, m.end() - 1, scope, scope.rpartition(".")[0])

    def chain(self, text: str, i: int, scope: str, parent: str) -> int:
        """Follow .call(...) .call(...) from text[i]; returns the index after the chain."""
        while True:
            j = skip_ws(text, i)
            call = re.match(r"\.\s*(\w+)\s*(?:<[^;()]*?>)?\s*\(", text[j:])
            if call is None:
                return j
            open_paren = j + call.end() - 1
            end = matching(text, open_paren)
            method = call.group(1)
            args = split_args(text[open_paren + 1:end - 1])
            if method in NAMING_CALLS and args and string_literal(args[0]):
                self.add(scope, string_literal(args[0]) or "")
            elif method == "export_values":
                self.members.setdefault(parent, set()).update(self.members.get(scope, set()))
            i = end

    def bases(self) -> dict[str, list[str]]:
        """Each class's bound base classes (template arguments that are themselves bound types)."""
        out = {}
        for scope, targs in self.template_args.items():
            found = [self.scope_of_type[t] for t in targs if t in self.scope_of_type]
            if found:
                out[scope] = sorted(set(found) - {scope})
        return {k: v for k, v in sorted(out.items()) if v}

    def names(self) -> list[str]:
        out = set(self.members[""])
        for scope, members in self.members.items():
            if scope:
                out.update(f"{scope}.{n}" for n in members)
        return sorted(out)


def python_names(text: str) -> set[str]:
    """Module-level names the package's __init__.py defines (functions, classes, assignments)."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"(?:def|class)\s+(\w+)|(\w+)\s*(?::[^=]*)?=(?!=)", line)
        name = m and (m.group(1) or m.group(2))
        if name and not (name.startswith("_") and not name.startswith("__")):  # private helpers are no API
            names.add(name)
    return names


def version_api(repo: str, tag: str) -> tuple[Api, list[str]]:
    api = Api()
    for path in binding_sources(repo, tag):
        api.scan(strip_comments(preprocess(git_show(repo, tag, path))), f"{tag}:{path}")
    files = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", tag, "--", "python/packaging"],
                           check=True, capture_output=True, text=True).stdout.split()
    init = [f for f in files if re.search(r"(^|/)tensorrt/__init__\.py$", f) and "frontend_sdist" not in f]
    for path in init:
        api.members[""].update(python_names(git_show(repo, tag, path)))
    return api, init


def main(repo: str) -> None:
    data = {}
    for version, tag in TAGS.items():
        api, init = version_api(repo, tag)
        for note in api.unnamed:
            print(f"not a literal name, skipped: {note}", file=sys.stderr)
        data[version] = {"tag": tag, "names": api.names(), "bases": api.bases()}
        print(f"{version} ({tag}): {len(data[version]['names'])} names, python names from {init}", file=sys.stderr)
    OUT.write_text(json.dumps(data, indent=0) + "\n")  # versions in release order, one name a line
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
