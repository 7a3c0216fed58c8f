"""What the repository ships and installs: the bundled ONNX model, the console scripts, the package list."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import cv2
import numpy as np

from conftest import BUNDLED, ROOT, SAMPLES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

SHIPPED_ONNX = ROOT / "models" / "deeplab_shapes.onnx"
REGENERATE = f"deeplab-export {BUNDLED.relative_to(ROOT)} --out {SHIPPED_ONNX.relative_to(ROOT)}"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_shipped_onnx_is_a_fresh_export_of_the_bundled_checkpoint(bundled_onnx):
    assert SHIPPED_ONNX.is_file(), f"{SHIPPED_ONNX} is missing; regenerate it with: {REGENERATE}"
    size = SHIPPED_ONNX.stat().st_size
    assert size < 2_000_000, f"the shipped ONNX model grew to {size / 1e6:.1f} MB (the checkpoint is 1.3 MB)"
    shipped, fresh = session(SHIPPED_ONNX), session(bundled_onnx)

    def meta(s):
        return dict(s.get_modelmeta().custom_metadata_map)

    assert meta(shipped) == meta(fresh), (
        f"{SHIPPED_ONNX.name}'s metadata differs from a fresh export; regenerate it with: {REGENERATE}")
    assert json.loads(meta(shipped)["class_names"]) == ["background", "disc", "square", "triangle", "star"]
    rng = np.random.default_rng(0)
    inputs = [cv2.imread(str(SAMPLES / "scene_0.png"))[None],
              rng.integers(0, 256, (1, 65, 97, 3), dtype=np.uint8),
              rng.integers(0, 256, (2, 81, 81, 3), dtype=np.uint8)]
    for x in inputs:
        a, b = shipped.run(None, {"image": x})[0], fresh.run(None, {"image": x})[0]
        diff = float(np.abs(a - b).max())
        assert a.shape == b.shape == (x.shape[0], 5, x.shape[1], x.shape[2])
        assert diff <= 1e-5, (f"{SHIPPED_ONNX.name} differs from a fresh export of {BUNDLED.name} by {diff:.2e} "
                              f"on a {x.shape} input; regenerate it with: {REGENERATE}")


def test_no_top_level_tools_package_is_installed():
    # a top-level `tools` package would collide with other projects': the commands are installed
    # under another name (the console scripts below are resolved and run under it)
    packages = pyproject()["tool"]["setuptools"]["packages"]
    assert not [p for p in packages if p == "tools" or p.startswith("tools.")], packages


def tool_commands() -> set[str]:
    """The tools/*.py files that define a main(): each is a command."""
    found = set()
    for f in (ROOT / "tools").glob("*.py"):
        tree = ast.parse(f.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            found.add(f.stem)
    return found


def test_every_package_the_tools_import_is_installed():
    """tools/*.py import the libraries by their package names: each of the repository's folders
    they name must be in the installed package list, or the installed commands fail to import."""
    packages = set(pyproject()["tool"]["setuptools"]["packages"])
    named = set()
    for f in (ROOT / "tools").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                named.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                named.update(alias.name.split(".")[0] for alias in node.names)
    # `tools` itself is installed as deeplab_tools: the commands import their siblings relatively
    ours = {n for n in named if n != "tools" and (ROOT / n / "__init__.py").is_file()}
    assert {"evaluation", "benchmarking", "scenes", "export", "runtime", "crf"} <= ours
    assert ours <= packages, ours - packages


def test_every_tool_with_a_main_is_a_console_script():
    scripts = pyproject()["project"]["scripts"]
    assert {"export", "segment", "evaluate", "train"} <= tool_commands()
    # a command is the file's name with "-" for "_" (deeplab-triton-repo runs tools/triton_repo.py)
    assert set(scripts) == {f"deeplab-{name.replace('_', '-')}" for name in tool_commands()}
    for name, target in scripts.items():
        assert target == f"deeplab_tools.{name.removeprefix('deeplab-').replace('-', '_')}:main", (name, target)


# Imports the console scripts' targets under their installed names, as the installed package lays
# them out (package-dir), with the tools/ folder itself not importable as `tools`.
RESOLVE = r"""
import importlib, importlib.util, json, sys
from pathlib import Path
root, package_dir, scripts = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name, folder in package_dir.items():
    spec = importlib.util.spec_from_file_location(name, root / folder / "__init__.py",
                                                  submodule_search_locations=[str(root / folder)])
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
sys.modules["tools"] = None  # a stray `import tools...` fails here as it would in an installed toolkit
for command, target in scripts.items():
    module, _, attr = target.partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main), target
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
    print("resolved", command)
# a library the tools call (the scene generator), found where the install puts it: the working
# folder is not the checkout
image, truth = importlib.import_module("scenes").held_out_scene(0)
print("scene", image.shape, truth.shape)
"""


def test_console_scripts_resolve_to_callables_under_the_installed_name(tmp_path):
    config = pyproject()
    scripts, package_dir = config["project"]["scripts"], config["tool"]["setuptools"]["package-dir"]
    out = subprocess.run([sys.executable, "-c", RESOLVE, str(ROOT), json.dumps(package_dir), json.dumps(scripts)],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(re.findall(r"^resolved (\S+)$", out.stdout, re.M)) == sorted(scripts)
    assert re.search(r"^scene \(\d+, \d+, 3\) \(\d+, \d+\)$", out.stdout, re.M), out.stdout


# The quick start's first command installs the runtime alone (no torch) and segments a sample with
# the bundled ONNX model: the command it installs runs, and writes its files, with torch unimportable.
SEGMENT_WITHOUT_TORCH = r"""
import importlib, importlib.util, json, sys
from pathlib import Path
root, package_dir, target, out = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.modules["torch"] = None  # any `import torch` fails, as where torch is not installed
for name, folder in package_dir.items():
    spec = importlib.util.spec_from_file_location(name, root / folder / "__init__.py",
                                                  submodule_search_locations=[str(root / folder)])
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
module, _, attr = target.partition(":")
main = getattr(importlib.import_module(module), attr)
try:
    code = main([str(root / "samples" / "scene_0.png"), "--model", str(root / "models" / "deeplab_shapes.onnx"),
                 "--out", out])
except SystemExit as e:
    code = e.code
sys.exit(code or 0)
"""


def test_the_segment_command_runs_the_bundled_model_without_torch(tmp_path):
    config = pyproject()
    assert not [d for d in config["project"]["dependencies"] if re.match(r"torch\b", d)]
    target = config["project"]["scripts"]["deeplab-segment"]
    out = tmp_path / "segmented"
    res = subprocess.run([sys.executable, "-c", SEGMENT_WITHOUT_TORCH, str(ROOT),
                          json.dumps(config["tool"]["setuptools"]["package-dir"]), target, str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    mask = cv2.imread(str(out / "scene_0_mask.png"), cv2.IMREAD_UNCHANGED)
    image = cv2.imread(str(SAMPLES / "scene_0.png"))
    assert mask is not None and mask.shape[:2] == image.shape[:2]
    assert (out / "scene_0_overlay.jpg").is_file()
