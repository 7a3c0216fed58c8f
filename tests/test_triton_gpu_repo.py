"""The GPU form of the Triton repository (serving.repository.write_gpu_repository) and the config
validator (serving/config_check.py), checked with Triton's own model-config protobuf (from tritonclient).

The plan is a dummy byte string beside a real sidecar written by runtime.engine_meta: nothing here
loads it (no TensorRT, no GPU, no Triton on these machines). What runs here for real: the configs
parsed by the protobuf, the ensemble's wiring and data types, the parameters, the validator on
broken repositories, the models' entry files loaded as Triton loads them, and the Python steps' own
code (serving/ensemble_steps.py, which the repository carries a copy of) with the CRF kernels compiled for the CPU, the engine replaced by ONNX Runtime on the
same padded input: its labels equal runtime.Segmenter's.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from crf import CRFParams  # noqa: E402
from runtime import engine_meta  # noqa: E402
from runtime.engine_meta import EngineMeta  # noqa: E402
from serving import ensemble_steps as steps  # noqa: E402
from serving.config_check import ConfigError, dtype_name, model_config_pb2, parse_config, validate_repository  # noqa: E402
from serving.contract import RequestError, crf_params_from_request, read_config_parameters  # noqa: E402
from serving.repository import RepositoryError, write_gpu_repository  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "models" / "deeplab_shapes.onnx"
PLAN_BYTES = b"dummy plan: never deserialised here"
PROFILE = {"min": [1, 65, 65, 3], "opt": [1, 513, 513, 3], "max": [8, 1025, 1025, 3]}


def bundled_metadata() -> tuple[list, list]:
    from runtime.onnx_backend import OnnxRuntimeNetwork

    meta = OnnxRuntimeNetwork(str(ONNX)).metadata
    return json.loads(meta["class_names"]), json.loads(meta["palette"])


def make_plan(tmp_path: Path, profile=PROFILE, sidecar: bool = True) -> Path:
    """A plan file with the sidecar a build of the bundled model would write (its class names and
    palette from the bundled ONNX's metadata)."""
    names, palette = bundled_metadata()
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = tmp_path / "deeplab_shapes.plan"
    plan.write_bytes(PLAN_BYTES)
    if sidecar:
        meta = EngineMeta(
            tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
            precision="fp16", profile=profile, hardware_compatible=False, version_compatible=False, dla_core=None,
            onnx_sha256=engine_meta.file_sha256(ONNX), plan_sha256=hashlib.sha256(PLAN_BYTES).hexdigest(),
            io=[{"name": "image", "mode": "input", "dtype": "uint8", "shape": [-1, -1, -1, 3]},
                {"name": "scores", "mode": "output", "dtype": "float32", "shape": [-1, len(names), -1, -1]}],
            class_names=names, palette=palette, onnx_path=str(ONNX), weights_path=None, engine_path=str(plan))
        engine_meta.write_sidecar(plan, meta)
    return plan


@pytest.fixture()
def repo(tmp_path) -> Path:
    return write_gpu_repository(make_plan(tmp_path), tmp_path / "repo")


def string_parameters(config) -> dict:
    """A parsed config's ``parameters`` as {name: string_value}."""
    return {k: v.string_value for k, v in config.parameters.items()}


def ensemble_steps(config) -> list:
    """An ensemble's steps as plain dicts (model, input_map, output_map), in order."""
    return [{"model": s.model_name, "input_map": dict(s.input_map), "output_map": dict(s.output_map)}
            for s in config.ensemble_scheduling.step]


def instance_kinds(config) -> list:
    return [model_config_pb2().ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group]


# -- the repository -----------------------------------------------------------------------------------

def test_repository_validates_with_tritons_protobuf(repo):
    configs = validate_repository(repo)
    assert sorted(configs) == ["deeplab", "deeplab_crf", "deeplab_network", "deeplab_pad"]
    net, crf, pad, ens = (configs[n] for n in ("deeplab_network", "deeplab_crf", "deeplab_pad", "deeplab"))
    assert net.platform == "tensorrt_plan" and instance_kinds(net) == ["KIND_GPU"] and net.HasField("dynamic_batching")
    assert (repo / "deeplab_network" / "1" / "model.plan").read_bytes() == PLAN_BYTES
    # the sidecar travels with the plan, so a server-side check can say which TensorRT/GPU it needs
    assert engine_meta.read_sidecar(repo / "deeplab_network" / "1" / "model.plan").compute_capability == "9.0"
    assert crf.backend == "python" and instance_kinds(crf) == ["KIND_GPU"]
    assert string_parameters(crf)["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert pad.backend == "python" and instance_kinds(pad) == ["KIND_CPU"]
    assert ens.platform == "ensemble"
    assert {c.max_batch_size for c in configs.values()} == {8}
    # self-contained: the Python models carry the toolkit's serving code, runtime and CRF, kernel source included
    for model in ("deeplab_crf", "deeplab_pad"):
        d = repo / model / "1"
        assert (d / "model.py").is_file()
        for f in ("crf/kernels/densecrf.cu", "serving/ensemble_steps.py", "serving/models.py", "runtime/network.py"):
            assert (d / f).read_bytes() == (ROOT / f).read_bytes(), f
        assert not list(d.rglob("__pycache__"))


def test_ensemble_wiring_types_and_dims(repo):
    configs = validate_repository(repo)
    assert ensemble_steps(configs["deeplab"]) == [
        {"model": "deeplab_pad", "input_map": {"IMAGE": "IMAGE"}, "output_map": {"PADDED_IMAGE": "padded_image"}},
        {"model": "deeplab_network", "input_map": {"image": "padded_image"}, "output_map": {"scores": "scores"}},
        {"model": "deeplab_crf", "input_map": {"SCORES": "scores", "IMAGE": "IMAGE"},
         "output_map": {"LABELS": "LABELS", "PROBABILITIES": "PROBABILITIES"}},
    ]

    def io(config, kind):
        return {t.name: (dtype_name(t.data_type), list(t.dims)) for t in getattr(config, kind)}

    c = len(bundled_metadata()[0])
    assert io(configs["deeplab_network"], "input") == {"image": ("TYPE_UINT8", [-1, -1, 3])}
    assert io(configs["deeplab_network"], "output") == {"scores": ("TYPE_FP32", [c, -1, -1])}
    assert io(configs["deeplab"], "input") == {"IMAGE": ("TYPE_UINT8", [-1, -1, 3])}
    assert io(configs["deeplab"], "output") == {"LABELS": ("TYPE_UINT8", [-1, -1]),
                                                 "PROBABILITIES": ("TYPE_FP32", [c, -1, -1])}
    assert io(configs["deeplab_crf"], "input") == {"SCORES": ("TYPE_FP32", [c, -1, -1]),
                                                    "IMAGE": ("TYPE_UINT8", [-1, -1, 3])}


def test_labels_only_ensemble(tmp_path):
    repo = write_gpu_repository(make_plan(tmp_path), tmp_path / "repo", probabilities=False)
    configs = validate_repository(repo)
    assert [o.name for o in configs["deeplab"].output] == ["LABELS"]
    assert ensemble_steps(configs["deeplab"])[2]["output_map"] == {"LABELS": "LABELS"}


def test_parameters_round_trip(tmp_path, repo):
    names, palette = bundled_metadata()
    configs = validate_repository(repo)
    for model in ("deeplab", "deeplab_crf"):
        assert read_config_parameters(string_parameters(configs[model])) == (names, palette, CRFParams())
    assert json.loads(string_parameters(configs["deeplab_pad"])["profile"]) == PROFILE
    # given values win over the sidecar's; names with quotes and non-ASCII survive the text format
    given = ['back"ground', "Größe", "c", "d", "e"]
    crf = CRFParams(bi_w=4.0, iterations=5, normalization="symmetric")
    other = write_gpu_repository(make_plan(tmp_path / "p2"),
                                 tmp_path / "repo2", class_names=given, palette=[[9, 8, 7]] * 5, crf_defaults=crf)
    cfg = validate_repository(other)["deeplab_crf"]
    assert read_config_parameters(string_parameters(cfg)) == (given, [[9, 8, 7]] * 5, crf)
    off = write_gpu_repository(make_plan(tmp_path), tmp_path / "repo3", crf_defaults=None)
    defaults = read_config_parameters(string_parameters(validate_repository(off)["deeplab"]))[2]
    assert defaults is None and crf_params_from_request({}, defaults) is None


def test_crf_step_bounds_the_iterations_per_request(tmp_path):
    """The CRF step reads max_iterations from its config; the writer keeps the defaults askable."""
    repo = write_gpu_repository(make_plan(tmp_path), tmp_path / "repo", max_iterations=12)
    assert string_parameters(validate_repository(repo)["deeplab_crf"])["max_iterations"] == "12"
    with pytest.raises(RepositoryError, match="max_iterations \\(9\\)"):
        write_gpu_repository(make_plan(tmp_path), tmp_path / "repo2", max_iterations=9)  # defaults: 10


def test_writer_refusals_and_batch_limit(tmp_path):
    plan = make_plan(tmp_path, profile={"min": [1, 65, 65, 3], "opt": [2, 257, 257, 3], "max": [2, 513, 513, 3]})
    with pytest.warns(RuntimeWarning, match="at most 2: max_batch 8 lowered to 2"):
        repo = write_gpu_repository(plan, tmp_path / "repo")
    assert {c.max_batch_size for c in validate_repository(repo).values()} == {2}
    write_gpu_repository(plan, repo, max_batch=2, probabilities=False)  # again: each model replaced whole
    assert sorted(p.name for p in repo.iterdir()) == ["deeplab", "deeplab_crf", "deeplab_network", "deeplab_pad"]
    assert [o.name for o in validate_repository(repo)["deeplab"].output] == ["LABELS"]
    bad = make_plan(tmp_path / "b", profile={"min": [2, 65, 65, 3], "opt": [2, 65, 65, 3], "max": [4, 65, 65, 3]})
    with pytest.raises(RepositoryError, match="starts at batch 2"):
        write_gpu_repository(bad, tmp_path / "r2")
    bare = make_plan(tmp_path / "bare", sidecar=False)
    with pytest.warns(RuntimeWarning, match="no metadata sidecar"), pytest.raises(RepositoryError, match="give class_names"):
        write_gpu_repository(bare, tmp_path / "r3")
    with pytest.warns(RuntimeWarning, match="no metadata sidecar"):
        r = write_gpu_repository(bare, tmp_path / "r4", class_names=["a", "b"])
    assert read_config_parameters(string_parameters(validate_repository(r)["deeplab"]))[0] == ["a", "b"]
    with pytest.raises(RepositoryError, match="missing.plan: no such model file"):
        write_gpu_repository(tmp_path / "missing.plan", tmp_path / "r5")
    with pytest.raises(RepositoryError, match="instances must be a whole number >= 1"):
        write_gpu_repository(plan, tmp_path / "r6", instances=0)


# -- the validator on broken repositories -------------------------------------------------------------

def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


BREAKAGES = {
    "unknown field": (lambda r: _edit(r / "deeplab_crf/config.pbtxt", "max_batch_size", "max_batch_sise"),
                      'no field named "max_batch_sise"'),
    "step names a missing model": (lambda r: _edit(r / "deeplab/config.pbtxt", '"deeplab_crf"', '"deeplab_crf2"'),
                                   "no model 'deeplab_crf2'"),
    "dtype mismatch": (lambda r: _edit(r / "deeplab_crf/config.pbtxt", "TYPE_FP32", "TYPE_FP16"),
                       "tensor 'scores' (output 'scores' of deeplab_network) is TYPE_FP32, but input 'SCORES'"),
    "missing model.plan": (lambda r: (r / "deeplab_network/1/model.plan").unlink(),
                           "version 1 has no model.plan"),
    "name differs from directory": (lambda r: _edit(r / "deeplab_pad/config.pbtxt", 'name: "deeplab_pad"',
                                                    'name: "pad"'), "differs from its directory"),
    "step input the model lacks": (lambda r: _edit(r / "deeplab/config.pbtxt", 'key: "SCORES"', 'key: "LOGITS"'),
                                   "has no input 'LOGITS'"),
    "tensor never produced": (lambda r: _edit(r / "deeplab/config.pbtxt", 'value: "padded_image" }\n    }',
                                              'value: "padded" }\n    }'), "tensor 'padded_image'"),
    "dims mismatch": (lambda r: _edit(r / "deeplab_network/config.pbtxt", "dims: [ -1, -1, 3 ]", "dims: [ -1, -1, 4 ]"),
                      "has dims [-1, -1, 3], input 'image' of 'deeplab_network' takes [-1, -1, 4]"),
    "no version directory": (lambda r: (r / "deeplab/1").rmdir(), "no version directory"),
    "batch below the ensemble's": (lambda r: _edit(r / "deeplab_pad/config.pbtxt", "max_batch_size: 8",
                                                   "max_batch_size: 2"), "max_batch_size 2 is below the ensemble's 8"),
    "step output nothing uses": (lambda r: _edit_re(r / "deeplab/config.pbtxt", r',\n  \{ name: "PROBABILITIES"[^\n]*', ""),
                                 "tensor 'PROBABILITIES' (output 'PROBABILITIES' of deeplab_crf) is unused"),
    "ensemble input nothing uses": (lambda r: _edit(r / "deeplab/config.pbtxt", "input [\n",
                                                    'input [\n  { name: "EXTRA" data_type: TYPE_FP32 dims: [ 1 ] },\n'),
                                    "ensemble input 'EXTRA' is not used by any step"),
    "instance group on the ensemble": (lambda r: _edit(r / "deeplab/config.pbtxt", "ensemble_scheduling {",
                                                       "instance_group [ { kind: KIND_CPU } ]\nensemble_scheduling {"),
                                       "an ensemble takes no instance_group"),
}


def _edit_re(path: Path, pattern: str, new: str) -> None:
    text, n = re.subn(pattern, new, path.read_text(), count=1)
    assert n == 1, f"{pattern!r} not in {path}"
    path.write_text(text)


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_validator_catches(repo, breakage):
    damage, message = BREAKAGES[breakage]
    damage(repo)
    with pytest.raises(ConfigError) as e:
        validate_repository(repo)
    assert message in str(e.value)


def _python_model(root: Path, name: str, max_batch: int, inputs: dict, outputs: dict) -> None:
    """A Python-backend model directory with FP32 tensors of the given dims (model.py is never run)."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text("")
    io = {kind: ",\n".join(f'  {{ name: "{t}" data_type: TYPE_FP32 dims: {dims} }}' for t, dims in ts.items())
          for kind, ts in (("input", inputs), ("output", outputs))}
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        f'input [\n{io["input"]}\n]\noutput [\n{io["output"]}\n]\n')


def _ensemble(root: Path, steps: list, max_batch: int = 4) -> None:
    """Ensemble "e": X [4] in, Z [4] out; steps: (model, {input: tensor}, {output: tensor})."""
    text = "".join(
        f'  step {{ model_name: "{m}" model_version: -1 '
        + "".join(f'input_map {{ key: "{k}" value: "{v}" }} ' for k, v in ins.items())
        + "".join(f'output_map {{ key: "{k}" value: "{v}" }} ' for k, v in outs.items()) + "}\n"
        for m, ins, outs in steps)
    (root / "e" / "1").mkdir(parents=True)
    (root / "e" / "config.pbtxt").write_text(
        f'name: "e"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Z" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        f"ensemble_scheduling {{\n{text}}}\n")


def test_validator_follows_tritons_graph_rules(tmp_path):
    """Steps in any order, a non-batching model in a batching ensemble (its dims hold the batch), as
    Triton accepts them; a cycle refused."""
    ok = tmp_path / "ok"
    _python_model(ok, "first", 4, {"IN": [4]}, {"OUT": [4]})
    _python_model(ok, "second", 0, {"IN": [-1, 4]}, {"OUT": [-1, 4]})  # no batching: [-1, 4] is [batch, 4]
    _ensemble(ok, [("second", {"IN": "y"}, {"OUT": "Z"}), ("first", {"IN": "X"}, {"OUT": "y"})])
    assert sorted(validate_repository(ok)) == ["e", "first", "second"]

    mismatch = tmp_path / "rank"
    _python_model(mismatch, "first", 4, {"IN": [4]}, {"OUT": [4]})
    _python_model(mismatch, "second", 0, {"IN": [-1, 5]}, {"OUT": [-1, 4]})  # [batch, 5] is not [batch, 4]
    _ensemble(mismatch, [("first", {"IN": "X"}, {"OUT": "y"}), ("second", {"IN": "y"}, {"OUT": "Z"})])
    with pytest.raises(ConfigError, match=r"tensor 'y' \(output 'OUT' of first\) has dims \[4\], input 'IN'"):
        validate_repository(mismatch)

    cycle = tmp_path / "cycle"
    _python_model(cycle, "a", 4, {"IN": [4], "BACK": [4]}, {"OUT": [4]})
    _python_model(cycle, "b", 4, {"IN": [4]}, {"OUT": [4], "LOOP": [4]})
    _ensemble(cycle, [("a", {"IN": "X", "BACK": "loop"}, {"OUT": "y"}), ("b", {"IN": "y"}, {"OUT": "Z", "LOOP": "loop"})])
    with pytest.raises(ConfigError, match=r"step 0 \(a\): never runs: tensors \['loop'\] wait on each other"):
        validate_repository(cycle)


def test_parse_config_names_the_line():
    with pytest.raises(ConfigError, match=r"x.pbtxt: 2:\d+ .*no_such_field"):
        parse_config('name: "m"\nno_such_field: 1\n', "x.pbtxt")
    assert parse_config('name: "m"\nmax_batch_size: 4\n').max_batch_size == 4


# -- the Python models' code -------------------------------------------------------------------------------

# What a Triton GPU image's Python has besides the standard library, plus pycuda (deploy/Dockerfile),
# and what the repository itself provides.
ALLOWED_IMPORTS = {"numpy", "pycuda", "triton_python_backend_utils", "crf", "runtime", "serving"}
#: The code a GPU Python model runs, as copied into its version folder.
MODEL_CODE = ("model.py", "serving/models.py", "serving/ensemble_steps.py", "serving/contract.py")


def _top_level_imports(source: str) -> set:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_files_compile_and_import_only_what_triton_has(repo):
    for model in ("deeplab_crf", "deeplab_pad"):
        for f in MODEL_CODE:
            source = (repo / model / "1" / f).read_text()
            compile(source, f"{model}/1/{f}", "exec")
            foreign = _top_level_imports(source) - ALLOWED_IMPORTS - set(sys.stdlib_module_names)
            assert not foreign, f"{model}/1/{f} imports {foreign}"


@pytest.mark.parametrize("model, cls", [("deeplab_crf", "CRFModel"), ("deeplab_pad", "PadModel")])
def test_models_load_from_the_repository_alone(repo, model, cls):
    """model.py loaded as Triton's Python backend loads it, in a fresh interpreter where OpenCV, ONNX
    Runtime, torch, TensorRT, protobuf, tritonclient and this checkout cannot be imported (a stand-in
    for triton_python_backend_utils): its class comes from the repository's own copies."""
    version = repo / model / "1"
    script = f"""
import runpy, sys, types
BLOCKED = {{"cv2", "onnxruntime", "torch", "tensorrt", "google", "tritonclient", "export", "tools"}}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
found = runpy.run_path({str(version / "model.py")!r})["TritonPythonModel"]
import crf, serving.ensemble_steps
assert found.__name__ == {cls!r} and found.__module__ == "serving.models", found
assert crf.__file__.startswith({str(version)!r}), crf.__file__
print("ok")
"""
    res = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=str(repo))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_dlpack_view_reads_the_capsule():
    a = np.arange(2 * 5 * 7 * 9, dtype=np.float32).reshape(2, 5, 7, 9)
    view = steps.dlpack_view(a.__dlpack__())
    assert view.buffer.ptr == a.ctypes.data and view.buffer.nbytes == a.nbytes
    assert view.shape == a.shape and view.dtype == np.float32 and view.device_type == steps.K_DL_CPU
    with pytest.raises(RequestError, match="not C-contiguous"):
        steps.dlpack_view(a.transpose(0, 1, 3, 2).__dlpack__())
    with pytest.raises(RequestError, match="not an unconsumed DLPack"):
        steps.dlpack_view(object())


def test_pad_step_pads_as_the_runtime_and_refuses_what_it_would_shrink():
    from runtime.contract import PAD_PIXEL_BGR

    bounds = steps.bounds_from_profile(PROFILE)
    images = np.random.default_rng(0).integers(0, 256, (2, 100, 70, 3), dtype=np.uint8)
    padded = steps.pad_batch(images, bounds)
    assert padded.shape == (2, 105, 73, 3)  # the next 8k+1 sizes
    assert (padded[:, :100, :70] == images).all() and (padded[:, 100:] == PAD_PIXEL_BGR).all()
    small = steps.pad_batch(images[:, :20, :30], bounds)
    assert small.shape == (2, 65, 65, 3)  # up to the profile's minimum
    with pytest.raises(RequestError, match="image 1200x70 exceeds max_size 1025 and the engine's profile"):
        steps.pad_batch(np.zeros((1, 1200, 70, 3), np.uint8), bounds)
    with pytest.raises(RequestError, match="IMAGE must be UINT8"):
        steps.pad_batch(np.zeros((1, 10, 10, 3), np.float32), bounds)
    with pytest.raises(RequestError, match="IMAGE is empty"):
        steps.pad_batch(np.zeros((1, 0, 10, 3), np.uint8), bounds)


@pytest.mark.parametrize("crf_on", [True, False])
def test_crf_step_on_cpu_kernels_gives_the_segmenters_labels(crf_on, tmp_path, monkeypatch):
    """pad step -> the network (ONNX Runtime standing in for the plan, same padded input) -> the CRF
    step's code with the CRF kernels compiled for the CPU, scores handed by DLPack capsule."""
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))
    from crf.cpu_kernels import CPUKernels
    from runtime import Segmenter
    from runtime.contract import load_image
    from runtime.onnx_backend import OnnxRuntimeNetwork

    image = load_image(ROOT / "samples" / "scene_0.png")
    images = np.stack([image, image[:, ::-1]])
    padded = steps.pad_batch(images, steps.bounds_from_profile(PROFILE))
    scores = np.ascontiguousarray(OnnxRuntimeNetwork(str(ONNX))(padded), np.float32)
    view = steps.dlpack_view(scores.__dlpack__())
    step = steps.CRFStep(CPUKernels())
    params = crf_params_from_request({"crf": crf_on}, CRFParams())
    labels, probs = step.run(step.scores_buffer(view, None), view.shape, images, params, probabilities=True)
    step.close()

    seg = Segmenter(str(ONNX), crf=CRFParams() if crf_on else None, crf_backend="cpu")
    for j in range(2):
        expected = seg(np.ascontiguousarray(images[j]), return_probabilities=True)
        assert np.array_equal(labels[j], expected.labels)
        np.testing.assert_allclose(probs[j], expected.probabilities, atol=1e-6)


def test_crf_step_refuses_mismatched_inputs():
    from crf.cpu_kernels import CPUKernels

    step = steps.CRFStep(CPUKernels())
    scores = np.zeros((1, 5, 65, 65), np.float32)
    buf = step.scores_buffer(steps.dlpack_view(scores.__dlpack__()), None)
    with pytest.raises(RequestError, match="does not fit SCORES"):
        step.run(buf, scores.shape, np.zeros((2, 60, 60, 3), np.uint8), None, False)
    with pytest.raises(RequestError, match="SCORES 65x65 are smaller than IMAGE 70x60"):
        step.run(buf, scores.shape, np.zeros((1, 70, 60, 3), np.uint8), None, False)
    as_float64 = steps.dlpack_view(np.zeros((1, 5, 65, 65)).__dlpack__())
    with pytest.raises(RequestError, match="N x C x H x W float32"):
        step.scores_buffer(as_float64, None)


def test_crf_step_copies_scores_it_cannot_address():
    """A GPU-resident DLPack tensor the CPU kernels cannot read is refused unless a host copy is given."""
    from crf.cpu_kernels import CPUKernels

    step = steps.CRFStep(CPUKernels())
    scores = np.random.default_rng(1).normal(size=(1, 5, 65, 65)).astype(np.float32)
    view = steps.dlpack_view(scores.__dlpack__())._replace(device_type=steps.K_DL_CUDA)
    with pytest.raises(RequestError, match="SCORES are on GPU 0, which the cpu kernels cannot read: on a server "
                       "with several GPUs, pin deeplab_network and deeplab_crf to the same GPU"):
        step.scores_buffer(view, None)
    elsewhere = view._replace(device_type=4)  # e.g. OpenCL memory
    with pytest.raises(RequestError, match="SCORES are on DLPack device type 4 #0, which the cpu kernels cannot read"):
        step.scores_buffer(elsewhere, None)
    buf = step.scores_buffer(view, scores)
    assert buf.ptr != scores.ctypes.data
    image = np.full((1, 65, 65, 3), 128, np.uint8)
    labels, _ = step.run(buf, scores.shape, image, None, False)
    assert np.array_equal(labels[0], scores[0].argmax(0))


def test_the_cpu_form_passes_the_same_validator(tmp_path):
    """The CPU form's Python-backend repository parses with Triton's own protobuf too, and
    its parameters read back as the model's class names, palette and CRF defaults."""
    from runtime import Segmenter
    from serving.repository import write_repository

    model = ROOT / "models" / "deeplab_shapes.onnx"
    write_repository(model, tmp_path, max_batch=4)
    configs = validate_repository(tmp_path)
    assert set(configs) == {"deeplab"}
    cfg = configs["deeplab"]
    assert cfg.backend == "python" and cfg.max_batch_size == 4 and cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("IMAGE", [-1, -1, 3])]
    assert [o.name for o in cfg.output] == ["LABELS", "PROBABILITIES"]
    names, palette, defaults = read_config_parameters(string_parameters(cfg))
    seg = Segmenter(model, crf=None)
    assert names == list(seg.class_names) and palette == seg.palette.tolist() and defaults == CRFParams()
