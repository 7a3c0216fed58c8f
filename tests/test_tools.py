"""The command-line tools, run as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BUNDLED, ROOT, SAMPLES
from export.model import DeepLabV1, ModelConfig


def run(*args, check=True):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def test_export_then_segment_folder(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    out = run("tools/export.py", BUNDLED, "--out", onnx_path)
    assert "exported" in out.stdout and onnx_path.is_file()
    res = run("tools/segment.py", SAMPLES, "--model", onnx_path, "--out", tmp_path / "seg")
    samples = sorted(p.stem for p in SAMPLES.glob("*.png"))
    assert samples, "the repo ships sample images"
    for s in samples:
        assert (tmp_path / "seg" / f"{s}_mask.png").is_file()
        assert (tmp_path / "seg" / f"{s}_overlay.jpg").is_file()
    assert "network" in res.stdout and "crf" in res.stdout  # the timing table
    assert "median" in res.stdout and "p90" in res.stdout  # percentiles over the images


def test_segment_reports_bad_files_and_goes_on(tmp_path, bundled_onnx):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    res = run("tools/segment.py", tmp_path / "bad.png", SAMPLES / "scene_0.png", "--model", bundled_onnx,
              "--out", tmp_path / "o", "--no-crf", check=False)
    assert res.returncode == 1
    assert "cannot decode" in res.stderr and (tmp_path / "o" / "scene_0_mask.png").is_file()
    res = run("tools/segment.py", SAMPLES, "--model", tmp_path / "absent.onnx", check=False)
    assert res.returncode == 2 and "not found" in res.stderr


def test_segment_with_nothing_to_segment(tmp_path, bundled_onnx):
    res = run("tools/segment.py", tmp_path / "*.png", "--model", bundled_onnx, check=False)
    assert res.returncode == 2 and "no images found" in res.stderr


def test_tensorrt_profile_is_validated():
    from export.tensorrt_build import ShapeProfile

    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeProfile(min_hw=(600, 600), opt_hw=(513, 513))
    with pytest.raises(ValueError, match="invalid profile"):
        ShapeProfile(max_batch=0)


def test_export_caffemodel_and_class_mismatch(tmp_path):
    from export.caffe import write_caffemodel

    net = DeepLabV1(ModelConfig(num_classes=21, width=0.0625))
    write_caffemodel(net.state_dict(), tmp_path / "m.caffemodel")
    out = run("tools/export.py", tmp_path / "m.caffemodel", "--width", "0.0625", "--out", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file() and "21 classes" in out.stdout
    torch.save(net.state_dict(), tmp_path / "m.pth")
    bad = run("tools/export.py", tmp_path / "m.pth", "--num-classes", "5", "--out", tmp_path / "x.onnx", check=False)
    assert bad.returncode == 2 and "--num-classes 21" in bad.stderr and not (tmp_path / "x.onnx").exists()


def test_evaluate_writes_a_table_and_json(tmp_path, bundled_onnx):
    res = run("tools/evaluate.py", "--model", bundled_onnx, "--images", "3", "--json", tmp_path / "e.json")
    data = json.loads((tmp_path / "e.json").read_text())
    assert 0 < data["no CRF"]["mean_iou"] <= 1 and 0 < data["CRF"]["mean_iou"] <= 1
    assert "CRF gain" in res.stdout


def test_scene_generator_is_deterministic():
    from tools.scenes import CLASS_NAMES, make_scene

    a, la = make_scene(42, 100, 120)
    b, lb = make_scene(42, 100, 120)
    assert (a == b).all() and (la == lb).all()
    assert a.shape == (100, 120, 3) and la.max() < len(CLASS_NAMES)
    assert not (make_scene(43, 100, 120)[0] == a).all()
    assert np.unique(np.concatenate([make_scene(s)[1].ravel() for s in range(20)])).size == len(CLASS_NAMES)
