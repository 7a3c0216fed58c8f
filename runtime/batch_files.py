"""The image files a batch run is given (files, folders, globs) and one distinct output name per file.

    found = expand(["samples/", "photos/**/*.jpg"])     # (file, the folder its name is relative to)
    names = output_names(found)                          # "scene_0", "2024/x", "a/x", "x_png", ...

A name is the file's path relative to its folder (or to a glob's fixed leading folders) without
the extension; inputs whose names coincide take their paths from the folder they share, then their
extensions, then a number, compared case-insensitively (macOS, Windows), so that no result
overwrites another; no name climbs out of the output folder it is joined to.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from .contract import IMAGE_SUFFIXES


def expand(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(file, the folder its output name is relative to) for the files named, in folders (not
    recursive) or matched by globs (relative to the glob's fixed leading folders); each file once."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(f, p) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        elif any(ch in item for ch in "*?["):
            fixed = next((i for i, part in enumerate(p.parts) if any(ch in part for ch in "*?[")), 0)
            base = Path(*p.parts[:fixed]) if fixed else Path(".")
            found += [(Path(f), base) for f in sorted(glob.glob(item, recursive=True)) if Path(f).is_file()]
        else:
            found.append((p, p.parent))  # missing files are reported by the Segmenter with a clear message
    seen: set[str] = set()
    unique = []
    for f, base in found:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append((f, base))
    return unique


def output_names(found: list[tuple[Path, Path]]) -> list[str]:
    """One distinct output name (a relative path without extension) per (file, base) of expand():
    the file's path relative to its base; inputs whose names coincide take their paths relative
    to the folder they share (a/x.png, b/x.png -> a/x, b/x), then their extensions (x_png, x_jpg);
    any name still taken is numbered. Compared case-insensitively (macOS, Windows file systems)."""
    absolute = [os.path.abspath(f) for f, _ in found]
    names = [os.path.splitext(os.path.relpath(a, os.path.abspath(b)))[0] for a, (_, b) in zip(absolute, found)]

    def groups() -> dict[str, list[int]]:
        by_name: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            by_name.setdefault(n.casefold(), []).append(i)
        return {k: v for k, v in by_name.items() if len(v) > 1}

    for idx in groups().values():
        shared = os.path.commonpath([os.path.dirname(absolute[i]) for i in idx])
        for i in idx:
            names[i] = os.path.splitext(os.path.relpath(absolute[i], shared))[0]
    for idx in groups().values():
        for i in idx:
            ext = os.path.splitext(absolute[i])[1].lstrip(".")
            names[i] = f"{names[i]}_{ext}" if ext else names[i]
    # A name that climbs out of its base (a pattern like "a/*/../../b/*.png") would put its results
    # outside --out: it keeps only its file name (numbered below where that is taken).
    names = [n if _stays_inside(n) else os.path.basename(n) for n in names]
    taken = {n.casefold() for n in names}
    used: set[str] = set()
    unique = []
    for n in names:
        u, k = n, 2
        while u.casefold() in used or (u != n and u.casefold() in taken):
            u, k = f"{n}_{k}", k + 1
        used.add(u.casefold())
        unique.append(u)
    return unique


def _stays_inside(name: str) -> bool:
    """Whether a relative output name stays inside the folder it is joined to."""
    norm = os.path.normpath(name)
    return not (os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep))


def inside(folder: Path, target: Path) -> bool:
    """Whether target resolves inside folder (symbolic links followed)."""
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(target)]) == root
