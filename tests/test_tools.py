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
    out = run("-m", "tools.export", BUNDLED, "--out", onnx_path)
    assert "exported" in out.stdout and onnx_path.is_file()
    res = run("-m", "tools.segment", SAMPLES, "--model", onnx_path, "--out", tmp_path / "seg")
    samples = sorted(p.stem for p in SAMPLES.glob("*.png"))
    assert samples, "the repo ships sample images"
    for s in samples:
        assert (tmp_path / "seg" / f"{s}_mask.png").is_file()
        assert (tmp_path / "seg" / f"{s}_overlay.jpg").is_file()
    assert "network" in res.stdout and "crf" in res.stdout  # the timing table
    assert "median" in res.stdout and "p90" in res.stdout  # percentiles over the images


def test_segment_reports_bad_files_and_goes_on(tmp_path, bundled_onnx):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    res = run("-m", "tools.segment", tmp_path / "bad.png", SAMPLES / "scene_0.png", "--model", bundled_onnx,
              "--out", tmp_path / "o", "--no-crf", check=False)
    assert res.returncode == 1
    assert "cannot decode" in res.stderr and (tmp_path / "o" / "scene_0_mask.png").is_file()
    res = run("-m", "tools.segment", SAMPLES, "--model", tmp_path / "absent.onnx", check=False)
    assert res.returncode == 2 and "not found" in res.stderr


def test_segment_with_nothing_to_segment(tmp_path, bundled_onnx):
    res = run("-m", "tools.segment", tmp_path / "*.png", "--model", bundled_onnx, check=False)
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
    out = run("-m", "tools.export", tmp_path / "m.caffemodel", "--width", "0.0625", "--out", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file() and "21 classes" in out.stdout
    torch.save(net.state_dict(), tmp_path / "m.pth")
    bad = run("-m", "tools.export", tmp_path / "m.pth", "--num-classes", "5", "--out", tmp_path / "x.onnx", check=False)
    assert bad.returncode == 2 and "--num-classes 21" in bad.stderr and not (tmp_path / "x.onnx").exists()


def test_evaluate_writes_a_table_and_json(tmp_path, bundled_onnx):
    res = run("-m", "tools.evaluate", "--model", bundled_onnx, "--images", "3", "--json", tmp_path / "e.json")
    data = json.loads((tmp_path / "e.json").read_text())
    assert 0 < data["no CRF"]["mean_iou"] <= 1 and 0 < data["CRF"]["mean_iou"] <= 1
    assert "CRF gain" in res.stdout


def test_scene_generator_is_deterministic():
    from scenes import CLASS_NAMES, make_scene

    a, la = make_scene(42, 100, 120)
    b, lb = make_scene(42, 100, 120)
    assert (a == b).all() and (la == lb).all()
    assert a.shape == (100, 120, 3) and la.max() < len(CLASS_NAMES)
    assert not (make_scene(43, 100, 120)[0] == a).all()
    assert np.unique(np.concatenate([make_scene(s)[1].ravel() for s in range(20)])).size == len(CLASS_NAMES)


def test_segment_keeps_same_named_inputs_apart_and_reports_bad_ones(tmp_path, bundled_onnx):
    import cv2

    from scenes import held_out_scene

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inputs = {"a/x.png": held_out_scene(0)[0], "b/x.png": held_out_scene(1)[0], "a/x.jpg": held_out_scene(2)[0]}
    assert len({im.shape for im in inputs.values()}) == 3  # each result can be told by its size
    for rel, im in inputs.items():
        cv2.imwrite(str(tmp_path / rel), im)
    jpg = cv2.imencode(".jpg", held_out_scene(3)[0])[1].tobytes()
    (tmp_path / "b" / "cut.jpg").write_bytes(jpg[:len(jpg) // 2])
    res = run("-m", "tools.segment", tmp_path / "a" / "x.png", tmp_path / "b", tmp_path / "a" / "x.jpg",
              tmp_path / "a" / "x.png", "--model", bundled_onnx, "--out", tmp_path / "o", "--no-crf", check=False)
    assert res.returncode == 1
    assert "wrote 3 masks and overlays" in res.stdout and "1 failed" in res.stdout
    failed = [line for line in res.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "truncated JPEG" in failed[0] and str(tmp_path / "b" / "cut.jpg") in failed[0]
    for rel, out in (("a/x.png", "a/x_png"), ("b/x.png", "b/x"), ("a/x.jpg", "a/x_jpg")):
        mask = cv2.imread(str(tmp_path / "o" / f"{out}_mask.png"))
        overlay = cv2.imread(str(tmp_path / "o" / f"{out}_overlay.jpg"))
        assert mask.shape == overlay.shape == inputs[rel].shape
    written = sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert written == sorted(f"{o}_{k}" for o in ("a/x_png", "b/x", "a/x_jpg") for k in ("mask.png", "overlay.jpg"))


def test_segment_arguments_are_checked_before_any_work(tmp_path, bundled_onnx):
    (tmp_path / "file").write_text("")
    (tmp_path / "in").mkdir()
    for name in ("x.png", "x_mask.png"):
        (tmp_path / "in" / name).write_bytes((SAMPLES / "scene_0.png").read_bytes())
    out = tmp_path / "o"
    for inputs, args, message in (
            (SAMPLES, ["--alpha", "1.5"], "argument --alpha: must be in [0, 1], got 1.5"),
            (SAMPLES, ["--crf-iterations", "-1"], "argument --crf-iterations: must be >= 0, got -1"),
            (SAMPLES, ["--out", tmp_path / "file"], f"--out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder"),
            (SAMPLES, ["--model", tmp_path / "absent.onnx"], "model file not found"),
            (tmp_path / "in", ["--out", tmp_path / "in"], f"a result would overwrite the input {tmp_path / 'in' / 'x_mask.png'}")):
        res = run("-m", "tools.segment", inputs, "--model", bundled_onnx, "--out", out, *args, check=False)
        assert res.returncode == 2 and "usage:" in res.stderr and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and not out.exists()
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["x.png", "x_mask.png"]


def test_export_checks_names_and_weights_before_writing(tmp_path):
    out = tmp_path / "m.onnx"
    bad = run("-m", "tools.export", BUNDLED, "--out", out, "--class-names", "a,b,c", check=False)
    assert bad.returncode == 2 and "--class-names: 3 class names for 5 classes" in bad.stderr
    bad = run("-m", "tools.export", BUNDLED, "--out", out, "--class-names", "a,,c", check=False)
    assert bad.returncode == 2 and "empty class name" in bad.stderr
    bad = run("-m", "tools.export", BUNDLED, "--out", tmp_path, check=False)
    assert bad.returncode == 2 and f"{tmp_path} is a folder" in bad.stderr
    state = DeepLabV1(ModelConfig(num_classes=3, width=0.0625)).state_dict()
    state["conv1_1.bias"][1] = float("inf")
    state["fc8.weight"][2, 5] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    bad = run("-m", "tools.export", tmp_path / "nan.pth", "--out", out, check=False)
    assert bad.returncode == 2 and "NaN/inf weights: conv1_1.bias (1 of 4), fc8.weight (1 of 192)" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]  # no .onnx, no temporary file


def test_evaluate_arguments_are_checked(tmp_path, bundled_onnx):
    res = run("-m", "tools.evaluate", "--model", bundled_onnx, "--images", "0", check=False)
    assert res.returncode == 2 and "argument --images: must be >= 1" in res.stderr
    res = run("-m", "tools.evaluate", "--model", bundled_onnx, "--json", tmp_path, check=False)
    assert res.returncode == 2 and f"{tmp_path} is a folder" in res.stderr


def test_segment_side_by_side(tmp_path, bundled_onnx):
    """input | network alone | with CRF, one image: the right two panels differ where the CRF changed labels."""
    import cv2

    from runtime import Segmenter
    from runtime.palette import colour_mask

    sample = SAMPLES / "scene_0.png"
    run("-m", "tools.segment", sample, "--model", bundled_onnx, "--out", tmp_path / "o", "--side-by-side")
    image = cv2.imread(str(sample))
    h, w = image.shape[:2]
    side = cv2.imread(str(tmp_path / "o" / "scene_0_side_by_side.jpg")).astype(np.int16)
    assert side.shape == (h, 3 * w, 3)
    left, middle, right = side[:, :w], side[:, w:2 * w], side[:, 2 * w:]

    seg = Segmenter(bundled_onnx, crf=None)
    network_colours = colour_mask(seg(image).labels, seg.palette)
    crf_colours = cv2.imread(str(tmp_path / "o" / "scene_0_mask.png"))  # the palettised mask, as BGR
    changed = (network_colours != crf_colours).any(axis=2)
    changed[:40] = False  # the captions
    unchanged = ~changed
    unchanged[:40] = False
    assert changed.sum() > 200, "the CRF changes some labels on this sample"
    step = np.abs(middle - right).mean(axis=2)
    assert step[changed].mean() > 15  # a different colour blended in
    assert step[unchanged].mean() < 6  # JPEG noise only
    assert np.abs(left - image)[40:].mean() < 6  # the left panel is the input (JPEG noise on a noisy image)


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "argument --iters: must be >= 1, got 0"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--size", "32"], "--size must be of the form 8k+1 (the network's stride is 8), got 32"),
    (["--size", "1"], "argument --size: must be >= 9, got 1"),
    (["--width", "-1"], "--width must be in (0, 1], got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--threads", "-2"], "argument --threads: must be >= 0, got -2"),
    (["--out", "{tmp}"], "--out {tmp}: {tmp} is a folder"),
])
def test_train_arguments_are_checked_before_training(tmp_path, args, message):
    """Mistakes that used to surface as a traceback, the folder one after the whole training run."""
    args = [a.format(tmp=tmp_path) for a in args]
    out = ["--out", tmp_path / "m.safetensors"] if "--out" not in args else []
    res = run("-m", "tools.train", *args, *out, check=False)
    assert res.returncode == 2 and message.format(tmp=tmp_path) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "m.safetensors").exists()


def test_train_without_torch_helps_and_says_what_to_install(tmp_path):
    code = ("import sys, runpy\nsys.modules['torch'] = None\nsys.argv = ['train.py'] + sys.argv[1:]\n"
            "runpy.run_module('tools.train', run_name='__main__')\n")
    res = run("-c", code, "--help")
    assert "--iters" in res.stdout
    res = run("-c", code, "--out", tmp_path / "m.safetensors", check=False)
    assert res.returncode == 2 and "training needs torch (not installed): pip install torch" in res.stderr
    assert "Traceback" not in res.stderr


def test_train_saves_a_loadable_checkpoint_whole(tmp_path):
    from export.weights import load_model

    out = tmp_path / "sub" / "m.safetensors"
    res = run("-m", "tools.train", "--iters", "1", "--batch", "1", "--size", "33", "--out", out)
    assert f"saved {out}" in res.stdout
    model, meta = load_model(out)
    assert model.config.num_classes == 5 and meta["class_names"][0] == "background"
    assert [p.name for p in out.parent.iterdir()] == ["m.safetensors"]  # no temporary file left
    assert out.stat().st_mode & 0o044 == 0o044 & ~_umask()  # the umask's permissions, not owner-only


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tools_print_warnings_as_one_plain_line(tmp_path):
    """A library warning reaches a tool's user as "warning: <message>", without the file, line and
    source line of the code that warned."""
    plan = tmp_path / "fake.engine"
    plan.write_text("not an engine")
    out = subprocess.run([sys.executable, "-m", "tools.triton_repo", str(plan), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2  # a model the repository writer cannot take
    assert "warning: " in out.stderr and "has no metadata sidecar" in out.stderr, out.stderr
    assert "RuntimeWarning" not in out.stderr and "engine_meta.read_sidecar(" not in out.stderr, out.stderr
