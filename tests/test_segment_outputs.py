"""tools/segment.py on bad input: one image's failure of any kind never stops a folder, none of its
files is written, every result lands inside --out, and a killed run's temporary files are cleaned."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLES
from runtime.output_files import remove_stale_temporaries, write_files_together
from conftest import png_declaring


def run_segment(*args):
    return subprocess.run([sys.executable, "-m", "tools.segment", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def files_under(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def bomb_png(width: int, height: int) -> bytes:
    rows = zlib.compress(b"\0" * (width + 1) * 64, 9)  # a real bomb's start: zeros compress ~1000x
    return png_declaring(width, height, idat=rows)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_decompression_bomb_in_a_folder_is_reported_and_the_rest_segmented(tmp_path, bundled_onnx):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLES / "scene_0.png", folder / "a.png")
    (folder / "b.png").write_bytes(bomb_png(70000, 70000))  # OpenCV's own limit raises cv2.error here
    (folder / "c.png").write_bytes(bomb_png(12000, 10000))  # under OpenCV's limit, over ours
    shutil.copy(SAMPLES / "scene_1.png", folder / "d.png")
    res = run_segment(folder, "--model", bundled_onnx, "--out", tmp_path / "out", "--no-crf")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert files_under(tmp_path / "out") == {"a_mask.png", "a_overlay.jpg", "d_mask.png", "d_overlay.jpg"}
    failed = [line for line in res.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and "b.png" in failed[0] and "c.png" in failed[1]
    assert "max_pixels" in failed[1]
    assert "wrote 2 masks" in res.stdout and "2 failed" in res.stdout


def test_the_pixel_limit_is_an_option(tmp_path, bundled_onnx):
    res = run_segment(SAMPLES / "scene_0.png", "--model", bundled_onnx, "--out", tmp_path / "out", "--no-crf",
                      "--max-pixels", "1000")
    assert res.returncode == 1 and "1,000" in res.stderr and not (tmp_path / "out" / "scene_0_mask.png").exists()


def test_patterns_climbing_out_still_write_inside_out(tmp_path, bundled_onnx):
    (tmp_path / "x" / "a").mkdir(parents=True)
    (tmp_path / "y").mkdir()
    shutil.copy(SAMPLES / "scene_0.png", tmp_path / "y" / "f.png")
    out = tmp_path / "x" / "out"
    pattern = str(tmp_path / "x" / "*" / ".." / ".." / "y" / "*.png")
    res = run_segment(pattern, "--model", bundled_onnx, "--out", out, "--no-crf")
    assert res.returncode == 0, res.stderr[-2000:]
    assert files_under(out) == {"f_mask.png", "f_overlay.jpg"}
    assert files_under(tmp_path / "y") == {"f.png"}  # nothing written beside the input


def test_a_failed_image_leaves_none_of_its_files(tmp_path, bundled_onnx):
    out = tmp_path / "out"
    (out / "scene_0_overlay.jpg").mkdir(parents=True)  # its overlay cannot be written
    res = run_segment(SAMPLES / "scene_0.png", SAMPLES / "scene_1.png", "--model", bundled_onnx, "--out", out,
                      "--no-crf")
    assert res.returncode == 1 and "scene_0" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "scene_0_mask.png").exists()  # not half of its set
    assert {"scene_1_mask.png", "scene_1_overlay.jpg"} <= files_under(out)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(tmp_path, bundled_onnx):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".scene_0_mask.png.{dead_pid()}-0123456789ab.tmp"
    live = out / f".other.png.{os.getpid()}-0123456789ab.tmp"  # this process is alive: not touched
    stale.write_bytes(b"half a mask")
    live.write_bytes(b"being written")
    res = run_segment(SAMPLES / "scene_0.png", "--model", bundled_onnx, "--out", out, "--no-crf")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not stale.exists() and live.exists()
    assert files_under(out) == {"scene_0_mask.png", "scene_0_overlay.jpg", live.name}


def test_files_written_together_are_all_or_none(tmp_path):
    (tmp_path / "blocker").write_bytes(b"a file where a folder is needed")
    with pytest.raises(OSError):
        write_files_together({tmp_path / "a.png": b"mask", tmp_path / "blocker" / "b.jpg": b"overlay"})
    assert sorted(os.listdir(tmp_path)) == ["blocker"]
    write_files_together({tmp_path / "a.png": b"mask", tmp_path / "sub" / "b.jpg": b"overlay"})
    assert (tmp_path / "a.png").read_bytes() == b"mask" and (tmp_path / "sub" / "b.jpg").read_bytes() == b"overlay"
    assert files_under(tmp_path) == {"a.png", "blocker", "sub/b.jpg"}


def test_remove_stale_temporaries_keeps_other_files(tmp_path):
    pid = dead_pid()
    names = [f".a.png.{pid}-0123456789ab.tmp", "a.png", ".hidden", f"x.{pid}-0123456789ab.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [names[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
