"""runtime.output_files: whole files or none, output locations checked up front; the output names
runtime.batch_files gives (deeplab-segment's results) to inputs that share a name."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.batch_files import expand, output_names
from runtime.output_files import output_file_problem, output_folder_problem, replacing, write_bytes_atomically


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    write_bytes_atomically(target, b"first")
    with pytest.raises(RuntimeError, match="check failed"):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("check failed")
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["r.json"]
    write_bytes_atomically(target, b"second")
    assert target.read_bytes() == b"second" and os.listdir(tmp_path) == ["r.json"]


def test_missing_folders_are_created_for_the_file(tmp_path):
    target = tmp_path / "new" / "deeper" / "r.json"
    write_bytes_atomically(target, b"data")
    assert target.read_bytes() == b"data" and os.listdir(target.parent) == ["r.json"]


def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes_atomically(tmp_path / "m.png", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o640


def test_output_locations(tmp_path):
    (tmp_path / "f").write_text("")
    assert output_file_problem(tmp_path / "new" / "deeper" / "m.onnx") is None
    assert output_file_problem(tmp_path / "f") is None  # replaced
    assert output_file_problem(tmp_path) == f"{tmp_path} is a folder"
    assert output_file_problem(tmp_path / "f" / "m.onnx") == f"{tmp_path / 'f'} is a file, not a folder"
    assert output_folder_problem(tmp_path / "new" / "seg") is None
    assert output_folder_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a folder"
    assert output_folder_problem(tmp_path / "f" / "seg") == f"{tmp_path / 'f'} is a file, not a folder"


def test_output_names_are_distinct(tmp_path):
    def names(*rel):  # files named one by one, as on a command line
        return output_names([(tmp_path / r, (tmp_path / r).parent) for r in rel])

    assert names("s/scene_0.png", "t/scene_1.png") == ["scene_0", "scene_1"]
    assert names("a/x.png", "b/x.png", "a/x.jpg") == ["a/x_png", "b/x", "a/x_jpg"]
    assert names("a/x.png", "a/deep/x.png") == ["x", "deep/x"]
    # a name already given (x.png kept its extension) is numbered, case-insensitively
    assert names("x.png", "x.jpg", "x_png.bmp") == ["x_png", "x_jpg", "x_png_2"]
    assert names("x.png", "X.PNG") == ["x_png", "X_PNG_2"]


def test_globs_and_folders_keep_their_relative_paths(tmp_path, monkeypatch):
    for rel in ("p/2023/x.jpg", "p/2024/x.jpg", "p/2024/y.jpg", "q/x.png", "q/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    found = expand(["p/**/*.jpg", "q", "p/2024/y.jpg"])  # y.jpg twice: segmented once
    assert [str(f) for f, _ in found] == ["p/2023/x.jpg", "p/2024/x.jpg", "p/2024/y.jpg", "q/x.png"]
    assert output_names(found) == ["2023/x", "2024/x", "2024/y", "x"]
