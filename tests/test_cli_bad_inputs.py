"""Every command-line tool over bad inputs, run as a user runs it (python -m tools.<tool> ...): a
missing model, a model that is not ONNX, an ONNX whose metadata is broken, a TensorRT plan where
TensorRT is absent, a missing image, a file that is not an image, an output path that cannot be
written, out-of-range numbers. Each must end with a clean message (never a Python traceback) that
names the file or option at fault, and exit status 2 for a usage or model error, 1 for a failure
of some of the items (an image, a benchmark configuration) or of the work after the inputs were
taken (an engine build where TensorRT is absent)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import BUNDLED, ROOT, SAMPLES

MODEL = ROOT / "models" / "deeplab_shapes.onnx"


def tensorrt_installed() -> bool:
    from runtime.errors import TensorRTUnavailable
    from runtime.trt_compat import load_tensorrt

    try:
        load_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


NEEDS_NO_TENSORRT = pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here: the plan is read")
NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None or
                                 importlib.util.find_spec("safetensors") is None,
                                 reason="exporting weights needs torch and safetensors")


def with_metadata(path, **entries):
    """The shipped export with some metadata_props replaced: a real DeepLab graph, broken labels."""
    model = onnx.load(str(MODEL))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(entries)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad inputs, by name (the templates' {placeholders})."""
    d = tmp_path_factory.mktemp("bad inputs")  # a space in the path, as users' folders have
    f = {"model": MODEL, "image": SAMPLES / "scene_0.png", "missing_onnx": d / "missing.onnx",
         "missing_png": d / "missing.png", "missing_weights": d / "missing.safetensors", "missing_dir": d / "absent"}
    f["random_onnx"] = d / "random.onnx"
    f["random_onnx"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["random_pt"] = d / "random.pt"
    f["random_pt"].write_bytes(np.random.default_rng(1).bytes(4096))
    f["names_onnx"] = with_metadata(d / "names.onnx", class_names="not json")
    f["config_onnx"] = with_metadata(d / "config.onnx", deeplab_config="[]")
    f["palette_onnx"] = with_metadata(d / "palette.onnx", palette="[[1, 2], [3, 4]]")
    f["plan"] = d / "model.engine"  # no sidecar
    f["plan"].write_bytes(b"\x00not a plan")
    f["sidecar_plan"] = d / "sidecar.engine"  # a sidecar that is not JSON
    f["sidecar_plan"].write_bytes(b"\x00not a plan")
    (d / "sidecar.engine.json").write_text("{not json")
    f["not_image"] = d / "not_an_image.png"
    f["not_image"].write_bytes(b"hello, not a PNG")
    f["blocker"] = d / "a_file.txt"  # an output under it cannot be written: it is not a folder
    f["blocker"].write_text("x")
    f["under_file"] = f["blocker"] / "out"
    f["empty_dir"] = d / "empty"
    f["empty_dir"].mkdir()
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.numpy import save_file

        f["meta_weights"] = d / "meta.safetensors"
        save_file({"conv1_1.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(f["meta_weights"]),
                  metadata={"deeplab_config": json.dumps([5, "largefov"])})
    return f


# (tool, arguments with {file} placeholders, expected exit status, what the output must mention)
CASES = {
    # tools/segment.py: model errors 2, one image's failure 1
    "segment-missing-model": ("segment", ["{image}", "--model", "{missing_onnx}", "--out", "{tmp}/o"], 2, ["{missing_onnx}"]),
    "segment-random-model": ("segment", ["{image}", "--model", "{random_onnx}", "--out", "{tmp}/o"], 2, ["{random_onnx}"]),
    "segment-names-metadata": ("segment", ["{image}", "--model", "{names_onnx}", "--out", "{tmp}/o"], 2,
                               ["{names_onnx}", "class_names"]),
    "segment-config-metadata": ("segment", ["{image}", "--model", "{config_onnx}", "--out", "{tmp}/o"], 2,
                                ["{config_onnx}", "deeplab_config"]),
    "segment-palette-metadata": ("segment", ["{image}", "--model", "{palette_onnx}", "--out", "{tmp}/o"], 2,
                                 ["{palette_onnx}", "palette"]),
    "segment-plan": ("segment", ["{image}", "--model", "{plan}", "--out", "{tmp}/o"], 2, ["{plan}"]),
    "segment-missing-image": ("segment", ["{missing_png}", "--model", "{model}", "--out", "{tmp}/o", "--no-crf"], 1,
                              ["{missing_png}"]),
    "segment-not-an-image": ("segment", ["{not_image}", "--model", "{model}", "--out", "{tmp}/o", "--no-crf"], 1,
                             ["{not_image}"]),
    "segment-out-under-a-file": ("segment", ["{image}", "--model", "{model}", "--out", "{under_file}"], 2, ["{blocker}"]),
    "segment-crf-iterations": ("segment", ["{image}", "--model", "{model}", "--out", "{tmp}/o", "--crf-iterations",
                                           "1000000"], 2, ["--crf-iterations"]),
    # tools/benchmark.py: a configuration that cannot load is skipped with its reason; none left is 1
    "benchmark-missing-model": ("benchmark", ["--model", "{missing_onnx}", "--no-progress"], 1, ["{missing_onnx}"]),
    "benchmark-random-model": ("benchmark", ["--model", "{random_onnx}", "--no-progress"], 1, ["{random_onnx}"]),
    "benchmark-config-metadata": ("benchmark", ["--model", "{config_onnx}", "--no-progress"], 1,
                                  ["{config_onnx}", "deeplab_config"]),
    "benchmark-plan": ("benchmark", ["--model", "{plan}", "--no-progress"], 1, ["{plan.name}", "TensorRT"]),
    "benchmark-missing-image": ("benchmark", ["--model", "{model}", "--image", "{missing_png}"], 2, ["{missing_png}"]),
    "benchmark-not-an-image": ("benchmark", ["--model", "{model}", "--image", "{not_image}"], 2, ["{not_image}"]),
    "benchmark-json-under-a-file": ("benchmark", ["--model", "{model}", "--json", "{under_file}"], 2, ["{blocker}"]),
    "benchmark-runs": ("benchmark", ["--model", "{model}", "--runs", "0"], 2, ["--runs"]),
    "benchmark-size": ("benchmark", ["--model", "{model}", "--size", "0x513"], 2, ["--size"]),
    # tools/evaluate.py
    "evaluate-missing-model": ("evaluate", ["--model", "{missing_onnx}", "--quiet"], 2, ["{missing_onnx}"]),
    "evaluate-random-model": ("evaluate", ["--model", "{random_onnx}", "--quiet"], 2, ["{random_onnx}"]),
    "evaluate-names-metadata": ("evaluate", ["--model", "{names_onnx}", "--quiet"], 2, ["{names_onnx}", "class_names"]),
    "evaluate-config-metadata": ("evaluate", ["--model", "{config_onnx}", "--quiet"], 2,
                                 ["{config_onnx}", "deeplab_config"]),
    "evaluate-plan": ("evaluate", ["--model", "{plan}", "--quiet"], 2, ["{plan.name}", "TensorRT"]),
    "evaluate-json-under-a-file": ("evaluate", ["--model", "{model}", "--json", "{under_file}"], 2, ["{blocker}"]),
    "evaluate-missing-dataset": ("evaluate", ["--model", "{model}", "--dataset", "{missing_dir}"], 2, ["{missing_dir}"]),
    "evaluate-images": ("evaluate", ["--model", "{model}", "--images", "0"], 2, ["--images"]),
    # tools/export.py: a bad input is 2; an engine TensorRT cannot build here is 1
    "export-missing-weights": ("export", ["{missing_weights}", "--out", "{tmp}/m.onnx"], 2, ["{missing_weights}"]),
    "export-random-weights": ("export", ["{random_pt}", "--out", "{tmp}/m.onnx"], 2, ["{random_pt}"]),
    "export-weights-metadata": ("export", ["{meta_weights}", "--out", "{tmp}/m.onnx"], 2,
                                ["{meta_weights}", "deeplab_config"]),
    "export-plan-as-input": ("export", ["{plan}", "--out", "{tmp}/m.onnx"], 2, ["{plan}"]),
    "export-random-onnx-to-engine": ("export", ["{random_onnx}", "--engine", "{tmp}/m.engine"], 2, ["{random_onnx}"]),
    "export-config-metadata-to-engine": ("export", ["{config_onnx}", "--engine", "{tmp}/m.engine"], 2,
                                         ["{config_onnx}", "deeplab_config"]),
    "export-engine-without-tensorrt": ("export", ["{model}", "--engine", "{tmp}/m.engine"], 1, ["TensorRT"]),
    "export-out-under-a-file": ("export", ["{model}", "--engine", "{under_file}"], 2, ["{blocker}"]),
    "export-max-batch": ("export", ["{model}", "--engine", "{tmp}/m.engine", "--max-batch", "0"], 2, ["--max-batch"]),
    # tools/train.py: everything refused before training
    "train-out-under-a-file": ("train", ["--out", "{under_file}", "--iters", "1"], 2, ["{blocker}"]),
    "train-iters": ("train", ["--out", "{tmp}/m.safetensors", "--iters", "0"], 2, ["--iters"]),
    "train-size": ("train", ["--out", "{tmp}/m.safetensors", "--size", "10"], 2, ["--size"]),
    "train-width": ("train", ["--out", "{tmp}/m.safetensors", "--width", "5"], 2, ["--width"]),
    "train-lr": ("train", ["--out", "{tmp}/m.safetensors", "--lr", "nan"], 2, ["--lr"]),
    # tools/triton_repo.py
    "triton_repo-missing-model": ("triton_repo", ["{missing_onnx}", "--out", "{tmp}/repo"], 2, ["{missing_onnx}"]),
    "triton_repo-random-model": ("triton_repo", ["{random_onnx}", "--out", "{tmp}/repo"], 2, ["{random_onnx}"]),
    "triton_repo-config-metadata": ("triton_repo", ["{config_onnx}", "--out", "{tmp}/repo"], 2,
                                    ["{config_onnx}", "deeplab_config"]),
    "triton_repo-plan-without-sidecar": ("triton_repo", ["{plan}", "--out", "{tmp}/repo"], 2, ["{plan}"]),
    "triton_repo-plan-bad-sidecar": ("triton_repo", ["{sidecar_plan}", "--out", "{tmp}/repo"], 2,
                                     ["{sidecar_plan}.json"]),
    "triton_repo-out-under-a-file": ("triton_repo", ["{model}", "--out", "{under_file}"], 2, ["{blocker}"]),
    "triton_repo-instances": ("triton_repo", ["{model}", "--out", "{tmp}/repo", "--instances", "0"], 2, ["--instances"]),
    # tools/serve.py: what it serves is a repository folder
    "serve-missing-repo": ("serve", ["--repo", "{missing_dir}"], 2, ["{missing_dir}"]),
    "serve-empty-repo": ("serve", ["--repo", "{empty_dir}"], 2, ["{empty_dir}"]),
    "serve-model-as-repo": ("serve", ["--repo", "{model}"], 2, ["{model}"]),
    "serve-port": ("serve", ["--repo", "{empty_dir}", "--http-port", "70000"], 2, ["--http-port"]),
}

MARKS = {"segment-plan": NEEDS_NO_TENSORRT, "benchmark-plan": NEEDS_NO_TENSORRT, "evaluate-plan": NEEDS_NO_TENSORRT,
         "export-engine-without-tensorrt": NEEDS_NO_TENSORRT, "export-missing-weights": NEEDS_TORCH,
         "export-random-weights": NEEDS_TORCH, "export-weights-metadata": NEEDS_TORCH}


@pytest.mark.parametrize("case", [pytest.param(k, marks=MARKS.get(k, ())) for k in CASES])
def test_bad_input_gives_one_clean_message(files, tmp_path, case):
    tool, template, status, facts = CASES[case]
    names = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path), "plan.name": files["plan"].name}

    def fill(text: str) -> str:
        for k, v in names.items():
            text = text.replace("{" + k + "}", v)
        return text

    args = [fill(a) for a in template]
    out = subprocess.run([sys.executable, "-m", f"tools.{tool}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    said = out.stdout + out.stderr
    assert "Traceback" not in said, said
    assert out.returncode == status, f"exit status {out.returncode}, expected {status}:\n{said}"
    for fact in facts:
        assert fill(fact) in said, f"{fill(fact)!r} is not named:\n{said}"


# Outputs the file system refuses only when they are written: /proc takes no new files, yet to root
# it looks writable (os.access), so the check before the work lets it through (exit 1 after the
# work); other users are refused before the work (exit 2). Either way: one message, no traceback.
PROC = "/proc/deeplab-bad-input"
LATE_WRITES = {
    "segment": ["{image}", "--model", "{model}", "--no-crf", "--out", PROC],
    "benchmark": ["--model", "{model}", "--size", "33x33", "--runs", "1", "--warmup", "0", "--no-progress",
                  "--json", PROC + ".json"],
    "evaluate": ["--model", "{model}", "--images", "1", "--quiet", "--json", PROC + ".json"],
    "export": ["{weights}", "--out", PROC + ".onnx"],
    "train": ["--out", PROC + ".safetensors", "--iters", "1", "--batch", "1", "--size", "17"],
    "triton_repo": ["{model}", "--out", PROC],
}


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("tool", [pytest.param(t, marks=NEEDS_TORCH if t in ("export", "train") else ())
                                  for t in LATE_WRITES])
def test_an_output_refused_when_written_is_one_message(tool):
    args = [a.replace("{image}", str(SAMPLES / "scene_0.png")).replace("{model}", str(MODEL))
            .replace("{weights}", str(BUNDLED)) for a in LATE_WRITES[tool]]
    out = subprocess.run([sys.executable, "-m", f"tools.{tool}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    said = out.stdout + out.stderr
    assert "Traceback" not in said, said
    assert out.returncode in (1, 2) and PROC in said, said
