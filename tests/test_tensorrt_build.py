"""The TensorRT engine build's parts that run without TensorRT: the plan's metadata sidecar, the
loader-side compatibility check, the engine cache key, and tools/export.py's engine options.

TensorRT cannot be installed here, so the builder itself is only type-checked
(tests/test_tensorrt_types.py); nothing below pretends to run it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from conftest import BUNDLED, ROOT
from export.tensorrt_build import BuildOptions, ShapeProfile, _json_list, _onnx_nodes_and_metadata, check_options
from runtime import engine_meta, trt_compat
from runtime.engine_meta import EngineMeta
from runtime.errors import EngineMismatch, ModelFormatError, SidecarError, TensorRTUnavailable
from runtime.output_files import write_bytes_atomically

OUR_IO = [{"name": "image", "mode": "input", "dtype": "uint8", "shape": [-1, -1, -1, 3]},
          {"name": "scores", "mode": "output", "dtype": "float32", "shape": [-1, 5, -1, -1]}]


def tensorrt_installed() -> bool:
    try:
        trt_compat.load_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


@pytest.fixture()
def meta(bundled_onnx, tmp_path) -> EngineMeta:
    """What a build of the bundled model would record: the values come from the same functions the
    builder calls (ONNX hash and metadata, profile shapes); TensorRT's own answers (version, GPU,
    I/O) are the ones a TensorRT 10.3 build on a Jetson Orin gives."""
    _, metadata = _onnx_nodes_and_metadata(bundled_onnx)
    return EngineMeta(
        tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7", precision="fp16",
        profile=ShapeProfile((257, 257), (257, 257), (257, 257), 1).shapes(), hardware_compatible=False,
        version_compatible=False, dla_core=0, onnx_sha256=engine_meta.file_sha256(bundled_onnx),
        plan_sha256=hashlib.sha256(b"plan bytes").hexdigest(), io=OUR_IO,
        class_names=_json_list(metadata, "class_names"), palette=_json_list(metadata, "palette"),
        onnx_path=str(bundled_onnx), weights_path=str(BUNDLED), engine_path=str(tmp_path / "m.engine"))


def write_plan(meta: EngineMeta, plan_bytes: bytes = b"plan bytes"):
    plan = Path(meta.engine_path)
    write_bytes_atomically(plan, plan_bytes)
    engine_meta.write_sidecar(plan, meta)
    return plan


# --- sidecar ---------------------------------------------------------------------------------------

def test_sidecar_round_trip(meta, tmp_path):
    plan = write_plan(meta)
    side = tmp_path / "m.engine.json"
    assert engine_meta.sidecar_path(plan) == side and side.is_file()
    assert engine_meta.read_sidecar(plan) == meta
    data = json.loads(side.read_text())
    assert data["profile"] == {"min": [1, 257, 257, 3], "opt": [1, 257, 257, 3], "max": [1, 257, 257, 3]}
    # class names and palette came from the ONNX's metadata (export/onnx_export.py wrote them)
    assert data["class_names"][0] == "background" and len(data["class_names"]) == 5
    assert len(data["palette"]) >= 5 and len(data["palette"][0]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]  # no temporary left


def test_plan_without_sidecar_warns_that_nothing_is_checked(tmp_path):
    (tmp_path / "m.engine").write_bytes(b"plan")
    with pytest.warns(RuntimeWarning, match="no metadata sidecar .*cannot be checked"):
        assert engine_meta.read_sidecar(tmp_path / "m.engine") is None


@pytest.mark.parametrize("io, named", [
    ([dict(OUR_IO[0], name="input"), OUR_IO[1]], ["no input 'image'", "unexpected tensors ['input']"]),
    ([dict(OUR_IO[0], dtype="float32"), OUR_IO[1]], ["'image' is input float32"]),
    ([OUR_IO[0], dict(OUR_IO[1], dtype="float16")], ["'scores' is output float16"]),
    ([dict(OUR_IO[0], shape=[-1, 3, -1, -1]), OUR_IO[1]], ["'image' is input uint8 [-1, 3, -1, -1]"]),
    ([OUR_IO[0], OUR_IO[1], {"name": "labels", "mode": "output", "dtype": "int64", "shape": [-1, -1, -1]}],
     ["unexpected tensors ['labels']"]),
])
def test_sidecar_with_foreign_io_is_refused(meta, tmp_path, io, named):
    side = tmp_path / "m.engine.json"
    data = json.loads(json.dumps(asdict(meta)))
    data["io"] = io
    side.write_text(json.dumps(data))
    with pytest.raises(SidecarError, match="not a plan of this toolkit's DeepLab graph") as e:
        engine_meta.read_sidecar(tmp_path / "m.engine")
    for text in named:
        assert text in str(e.value)
    with pytest.raises(SidecarError):  # the builder's writer refuses it too
        engine_meta.write_sidecar(tmp_path / "other.engine", replace(meta, io=io))
    assert not (tmp_path / "other.engine.json").exists()


def test_corrupt_or_incomplete_sidecar_is_a_clear_error(meta, tmp_path):
    plan, side = tmp_path / "m.engine", tmp_path / "m.engine.json"
    side.write_text('{"tensorrt_version": "10.3')
    with pytest.raises(SidecarError, match="not valid JSON.*deeplab-export"):
        engine_meta.read_sidecar(plan)
    side.write_text("[1, 2]")
    with pytest.raises(SidecarError, match="expected a JSON object, found list"):
        engine_meta.read_sidecar(plan)
    data = asdict(meta)
    del data["tensorrt_version"], data["io"]
    side.write_text(json.dumps(data))
    with pytest.raises(SidecarError, match="misses io, tensorrt_version"):
        engine_meta.read_sidecar(plan)
    side.write_text(json.dumps(dict(asdict(meta), dla_core="0", version_compatible=1)))
    with pytest.raises(SidecarError, match="wrong types for version_compatible=1, dla_core='0'"):
        engine_meta.read_sidecar(plan)
    side.write_text(json.dumps(dict(asdict(meta), profile={"min": [1, 2]})))
    with pytest.raises(SidecarError, match="'profile' must map min, opt and max"):
        engine_meta.read_sidecar(plan)


# --- loader-side compatibility check ----------------------------------------------------------------

def test_same_tensorrt_and_gpu_passes(meta):
    assert engine_meta.check_compatible(meta, "10.3.0.30", "Orin", "8.7") == []


def test_tensorrt_version_mismatch_names_both_and_the_rebuild_command(meta):
    with pytest.raises(EngineMismatch) as e:
        engine_meta.check_compatible(meta, "10.4.0.26", "Orin", "8.7")
    msg = str(e.value)
    assert "built by TensorRT 10.3.0.30, this is TensorRT 10.4.0.26" in msg and "GPU" not in msg
    cmd = msg.split("Rebuild it on this machine: ")[1]
    assert shlex.split(cmd) == [
        "deeplab-export", str(BUNDLED), "--out", meta.onnx_path, "--engine", meta.engine_path,
        "--min-size", "257x257", "--opt-size", "257x257", "--max-size", "257x257", "--max-batch", "1",
        "--fp16", "--dla-core", "0"]


def test_gpu_mismatch_names_both(meta):
    with pytest.raises(EngineMismatch, match=r"built for Orin \(compute capability 8.7\), this GPU is "
                                             r"NVIDIA A100-SXM4-80GB \(compute capability 8.0\)") as e:
        engine_meta.check_compatible(meta, "10.3.0.30", "NVIDIA A100-SXM4-80GB", "8.0")
    assert "TensorRT 10.3" not in str(e.value)


def test_another_gpu_model_of_the_same_compute_capability_is_a_warning(meta):
    """TensorRT refuses a plan only on another compute capability; another model of the same one
    (A100 40GB and 80GB) runs it, with TensorRT's own warning: so a note here, not an error."""
    a100 = replace(meta, gpu_name="NVIDIA A100-SXM4-40GB", compute_capability="8.0", dla_core=None)
    notes = engine_meta.check_compatible(a100, "10.3.0.30", "NVIDIA A100-SXM4-80GB", "8.0")
    assert len(notes) == 1
    assert notes[0].startswith("built on NVIDIA A100-SXM4-40GB (compute capability 8.0), running on "
                               "NVIDIA A100-SXM4-80GB: the same compute capability, so TensorRT runs it")
    assert "--engine " + a100.engine_path in notes[0]
    # a hardware-compatible plan is meant for other models: nothing to say
    assert engine_meta.check_compatible(replace(a100, hardware_compatible=True), "10.3.0.30",
                                        "NVIDIA A100-SXM4-80GB", "8.0") == []
    # the same name with another compute capability is still refused
    with pytest.raises(EngineMismatch, match=r"this GPU is NVIDIA A100-SXM4-40GB \(compute capability 8.6\)"):
        engine_meta.check_compatible(a100, "10.3.0.30", "NVIDIA A100-SXM4-40GB", "8.6")


def test_a_dla_plan_needs_its_core_on_this_machine(meta):
    engine_meta.check_dla_core(meta, 2)  # core 0 of 2
    for dla_core, cores in ((0, 0), (1, 1)):
        with pytest.raises(EngineMismatch, match=rf"runs on DLA core {dla_core}, this machine has {cores} DLA "
                                                 r"core\(s\)\. Rebuild it .*--dla-core"):
            engine_meta.check_dla_core(replace(meta, dla_core=dla_core), cores)
    engine_meta.check_dla_core(replace(meta, dla_core=None), 0)  # a GPU plan needs no DLA


def test_a_plan_that_does_not_deserialize_is_explained(meta):
    with_sidecar = engine_meta.undeserializable_message(meta, "10.3.0.30", meta.engine_path)
    assert with_sidecar.startswith(f"{meta.engine_path}: TensorRT 10.3.0.30 cannot deserialize it: a corrupt")
    assert "; rebuild it: deeplab-export" in with_sidecar and "sidecar" not in with_sidecar
    without = engine_meta.undeserializable_message(None, "10.3.0.30", "/models/vc.engine")
    assert ("A version-compatible plan also needs its sidecar (vc.engine.json) so that its embedded runtime may "
            "be loaded") in without
    assert "a DLA plan so that its core is set" in without


def test_dims_list_refuses_the_invalid_dims_of_an_unknown_tensor():
    class InvalidDims:
        """What the bindings' Dims is for nbDims -1: __len__ returns nbDims."""

        def __len__(self):
            return -1

    assert trt_compat.dims_list((-1, 5, 65, 65), "scores") == [-1, 5, 65, 65]
    assert trt_compat.dims_list((), "scalar") == []
    with pytest.raises(ModelFormatError, match="TensorRT has no shape for tensor 'labels' .*no such tensor"):
        trt_compat.dims_list(InvalidDims(), "labels")  # type: ignore[arg-type]


def test_both_mismatches_are_reported_together(meta):
    with pytest.raises(EngineMismatch) as e:
        engine_meta.check_compatible(meta, "8.6.2.3", "Xavier", "7.2", plan_path="/models/moved.engine")
    msg = str(e.value)
    assert "TensorRT 10.3.0.30, this is TensorRT 8.6.2.3" in msg and "this GPU is Xavier (compute capability 7.2)" in msg
    assert "--engine /models/moved.engine" in msg and msg.startswith("TensorRT plan /models/moved.engine")


def test_version_compatible_plan_tolerates_a_newer_tensorrt_only(meta):
    vc = replace(meta, version_compatible=True, dla_core=None)
    for newer in ("10.3.0.31", "10.7.0.23", "11.0.0.4"):
        assert engine_meta.check_compatible(vc, newer, "Orin", "8.7") == []
    for refused in ("10.2.0.19", "12.0.0.1"):
        with pytest.raises(EngineMismatch, match="same or a newer TensorRT only.*--version-compatible"):
            engine_meta.check_compatible(vc, refused, "Orin", "8.7")
    with pytest.raises(EngineMismatch, match="this is TensorRT 10.4.0.26"):  # not version-compatible
        engine_meta.check_compatible(meta, "10.4.0.26", "Orin", "8.7")
    # TensorRT 8 plans load on 9 and 10 but not 11; 8.5 had no version-compatible plans at all
    assert trt_compat.runs_version_compatible_plan("8.6.1.6", "10.3.0.30")
    assert not trt_compat.runs_version_compatible_plan("8.6.1.6", "11.0.0.4")
    assert not trt_compat.runs_version_compatible_plan("8.5.2.2", "8.6.1.6")


def test_hardware_compatible_plan_tolerates_other_ampere_plus_gpus(meta):
    hc = replace(meta, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", hardware_compatible=True,
                 dla_core=None)
    assert engine_meta.check_compatible(hc, "10.3.0.30", "NVIDIA GeForce RTX 4090", "8.9") == []
    assert engine_meta.check_compatible(hc, "10.3.0.30", "NVIDIA H100 80GB HBM3", "9.0") == []
    with pytest.raises(EngineMismatch, match="this GPU is Tesla T4 .*compute capability 8.0 or newer"):
        engine_meta.check_compatible(hc, "10.3.0.30", "Tesla T4", "7.5")
    with pytest.raises(EngineMismatch, match="this is TensorRT 10.4"):  # hardware- is not version-compatible
        engine_meta.check_compatible(hc, "10.4.0.26", "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(EngineMismatch, match="this GPU is NVIDIA GeForce RTX 4090"):
        engine_meta.check_compatible(replace(hc, hardware_compatible=False), "10.3.0.30", "NVIDIA GeForce RTX 4090", "8.9")


def test_unknown_gpu_is_reported_not_checked(meta):
    notes = engine_meta.check_compatible(replace(meta, gpu_name=None, compute_capability=None),
                                         "10.3.0.30", "Orin", "8.7")
    assert len(notes) == 1 and "GPU not checked: the plan was built on an unknown GPU" in notes[0]
    notes = engine_meta.check_compatible(meta, "10.3.0.30", None, None)
    assert "this is an unknown GPU" in notes[0]


def test_version_strings():
    assert trt_compat.parse_version("10.3.0.30") == (10, 3, 0, 30)
    assert trt_compat.parse_version("10.0.0b6") == (10, 0, 0)
    assert trt_compat.parse_version("8.6.1.post1") == (8, 6, 1)
    with pytest.raises(ValueError, match="not a TensorRT version"):
        trt_compat.parse_version("unknown")


# --- engine cache -------------------------------------------------------------------------------------

KEY_ARGS = dict(onnx_sha256="ab" * 32, tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7",
                precision="fp16", profile=ShapeProfile().shapes(), hardware_compatible=False,
                version_compatible=False, dla_core=None)


def test_engine_key_equality():
    assert engine_meta.engine_key(**KEY_ARGS) == engine_meta.engine_key(**dict(KEY_ARGS))
    assert engine_meta.engine_key(**KEY_ARGS) == engine_meta.engine_key(
        **dict(KEY_ARGS, profile={k: tuple(v) for k, v in reversed(list(KEY_ARGS["profile"].items()))}))


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "cd" * 32), ("tensorrt_version", "10.3.0.31"), ("gpu_name", "NVIDIA A100"),
    ("compute_capability", "8.0"), ("precision", "fp32"), ("profile", ShapeProfile(max_batch=4).shapes()),
    ("hardware_compatible", True), ("version_compatible", True), ("dla_core", 1)])
def test_engine_key_changes_with_every_input(field, value):
    assert engine_meta.engine_key(**KEY_ARGS) != engine_meta.engine_key(**dict(KEY_ARGS, **{field: value}))


def test_up_to_date_needs_the_same_key_and_the_described_plan(meta, tmp_path):
    plan = tmp_path / "m.engine"
    assert not engine_meta.up_to_date(plan, meta.key())  # nothing built yet
    write_plan(meta)
    assert engine_meta.up_to_date(plan, meta.key())
    assert not engine_meta.up_to_date(plan, replace(meta, tensorrt_version="10.4.0.26").key())
    plan.write_bytes(b"another plan")  # replaced behind the sidecar's back
    assert not engine_meta.up_to_date(plan, meta.key())
    write_plan(meta)
    (tmp_path / "m.engine.json").write_text("{")
    assert not engine_meta.up_to_date(plan, meta.key())


def test_onnx_sha256_of_an_export_is_stable(bundled_onnx, tmp_path):
    """The cache key hashes the ONNX that tools/export.py writes again on every run: an export of the
    same weights must give the same bytes, other weights other bytes."""
    pytest.importorskip("torch")
    from export.onnx_export import export_onnx
    from export.weights import load_model

    digest = engine_meta.file_sha256(bundled_onnx)
    assert digest == hashlib.sha256(bundled_onnx.read_bytes()).hexdigest() and len(digest) == 64
    model, m = load_model(BUNDLED)
    again = export_onnx(model, tmp_path / "again.onnx", class_names=m.get("class_names"), palette=m.get("palette"))
    assert engine_meta.file_sha256(again) == digest
    import torch

    with torch.no_grad():
        model.fc8.bias.add_(1.0)
    other = export_onnx(model, tmp_path / "other.onnx", class_names=m.get("class_names"), palette=m.get("palette"))
    assert engine_meta.file_sha256(other) != digest


@pytest.mark.parametrize("precision, weights, trt, expected", [
    ("fp16", "w.safetensors", "10.3.0.30", ["--fp16"]),
    ("fp16", "w.safetensors", "11.0.0.7", ["--precision", "fp16"]),
    ("fp16", "m_fp16.onnx", "11.0.0.7", []),
    ("int8", "w.safetensors", "10.3.0.30", ["--precision", "int8", "--calibration", "CALIBRATION_DIR"]),
    ("int8+fp16", "w.safetensors", "10.3.0.30", ["--precision", "int8", "--calibration", "CALIBRATION_DIR", "--fp16"]),
    ("int8", "m_int8.onnx", "10.3.0.30", []),
    ("fp32", "w.safetensors", "10.3.0.30", []),
])
def test_rebuild_command_keeps_the_precision(meta, precision, weights, trt, expected):
    meta = replace(meta, precision=precision, weights_path=weights, tensorrt_version=trt, dla_core=None)
    cmd = shlex.split(engine_meta.rebuild_command(meta))
    tail = cmd[cmd.index("--max-batch") + 2:]
    assert tail == expected


# --- tools/export.py ----------------------------------------------------------------------------------

def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.export", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def test_engine_without_tensorrt_fails_after_writing_the_onnx(meta, tmp_path):
    """Run the rebuild command a sidecar prints (here a DLA FP16 one): tools/export.py accepts it,
    writes the ONNX, and exits non-zero with one line saying why no engine was built."""
    if tensorrt_installed():
        pytest.skip("TensorRT is installed here: the engine would be built")
    pytest.importorskip("torch")  # tools/export.py exports the ONNX
    meta = replace(meta, onnx_path=str(tmp_path / "m.onnx"))
    cmd = shlex.split(engine_meta.rebuild_command(meta))
    assert cmd[0] == "deeplab-export"
    res = export_cli(*cmd[1:])
    assert res.returncode == 1, res.stdout + res.stderr
    assert (tmp_path / "m.onnx").is_file() and "exported" in res.stdout
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: no TensorRT engine built: TensorRT is not installed")
    assert not (tmp_path / "m.engine").exists() and not (tmp_path / "m.engine.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--min-size", "600x600"], "profile sizes must be ordered min <= opt <= max in H and in W, got min 600x600, "
                                "opt 513x513, max 1025x1025"),
    (["--opt-size", "513x513", "--max-size", "513x257"], "min <= opt <= max"),
    (["--max-size", "abc"], "expected HxW (e.g. 513x513) or one size, got 'abc'"),
    (["--min-size", "0x64"], "sizes must be >= 1, got '0x64'"),
    (["--max-batch", "0"], "--max-batch: must be >= 1, got 0"),
    (["--dla-core", "-1", "--fp16"], "--dla-core: must be >= 0, got -1"),
    (["--dla-core", "0", "--fp16"], "DLA runs static shapes only: give one size as --min-size, --opt-size and "
                                    "--max-size and --max-batch 1 (got min 65x65, opt 513x513, max 1025x1025"),
    (["--dla-core", "0", "--fp16", "--min-size", "513", "--max-size", "513", "--max-batch", "2"],
     "DLA runs static shapes only"),
    (["--dla-core", "0", "--fp16", "--min-size", "513", "--max-size", "513", "--hardware-compatible"],
     "--hardware-compatible does not apply with --dla-core"),
])
def test_bad_engine_options_are_refused_at_parse_time(tmp_path, args, message):
    res = export_cli(BUNDLED, "--out", tmp_path / "m.onnx", "--engine", tmp_path / "m.engine", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "m.onnx").exists()  # refused before anything was exported


def test_engine_options_without_engine_are_refused(tmp_path):
    res = export_cli(BUNDLED, "--out", tmp_path / "m.onnx", "--fp16", "--version-compatible")
    assert res.returncode == 2 and "--fp16, --version-compatible apply to the TensorRT engine: add --engine PATH" \
        in res.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_static_dla_profile_is_accepted():
    check_options(ShapeProfile((513, 513), (513, 513), (513, 513), 1), BuildOptions(fp16=True, dla_core=1))
    with pytest.raises(ValueError, match="DLA runs static shapes only"):
        check_options(ShapeProfile((513, 513), (513, 513), (513, 769), 1), BuildOptions(fp16=True, dla_core=1))
    check_options(ShapeProfile(), BuildOptions(hardware_compatible=True, version_compatible=True))


def test_engine_from_an_onnx_needs_no_torch(tmp_path):
    """A Jetson builds its plan from an ONNX exported elsewhere: tools/export.py takes the .onnx
    with --engine and never imports torch (here torch is blocked; TensorRT is absent, so the build
    stops with its reason, exit 1); without --engine, or with export options, it says why (exit 2)."""
    onnx_model = ROOT / "models" / "deeplab_shapes.onnx"
    code = ("import sys, runpy\nsys.modules['torch'] = None  # as on a Jetson without PyTorch\n"
            "sys.argv = ['export.py'] + sys.argv[1:]\nrunpy.run_module('tools.export', run_name='__main__')\n")

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)

    out = run(str(onnx_model), "--engine", str(tmp_path / "m.engine"))
    assert out.returncode == 1, out.stderr
    assert "no TensorRT engine built" in out.stderr and "torch" not in out.stderr.lower()
    out = run(str(onnx_model))
    assert out.returncode == 2 and "give --engine PATH" in out.stderr
    out = run(str(onnx_model), "--engine", str(tmp_path / "m.engine"), "--precision", "fp16")
    assert out.returncode == 2 and "--precision apply to exporting weights" in out.stderr
    out = run(str(tmp_path / "absent.onnx"), "--engine", str(tmp_path / "m.engine"))
    assert out.returncode == 2 and "no such file" in out.stderr


def test_engine_from_an_onnx_on_a_runtime_only_install(tmp_path):
    """A Jetson that installed the runtime alone has neither torch nor onnx: the .onnx's metadata
    is read by ONNX Runtime (the same as onnx reads), and a file that is no ONNX model is refused
    in one line whichever reads it (exit 2: the input is at fault, not the build; no traceback)."""
    onnx_model = ROOT / "models" / "deeplab_shapes.onnx"
    not_a_model = tmp_path / "model.onnx"
    not_a_model.write_text("hello\n")
    code = ("import sys, runpy\nsys.modules['torch'] = sys.modules['onnx'] = None  # pip install . only\n"
            "sys.argv = ['export.py'] + sys.argv[1:]\nrunpy.run_module('tools.export', run_name='__main__')\n")

    def run(*args, block=True):
        cmd = [sys.executable, "-c", code, *args] if block else [sys.executable, "-m", "tools.export", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    out = run(str(onnx_model), "--engine", str(tmp_path / "m.engine"))
    assert out.returncode == 1 and "no TensorRT engine built" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    for block in (True, False):
        out = run(str(not_a_model), "--engine", str(tmp_path / "m.engine"), block=block)
        errors = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(errors) == 1, out.stderr
        assert errors[0].startswith(f"error: {not_a_model} is not a loadable ONNX model")
    # exporting weights is what needs torch and onnx: said before any work, with the install command
    out = run(str(BUNDLED), "--out", str(tmp_path / "m.onnx"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    # (safetensors is named too where it is missing as well: the runtime-only run on numpy 1.x)
    assert re.search(r"error: exporting weights \(an \.onnx with --engine needs none of these\) needs torch, onnx"
                     r"(, safetensors)? \(not installed\): pip install torch --index-url "
                     r"https://download\.pytorch\.org/whl/cpu", out.stderr), out.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_engine_path_that_cannot_be_written_is_refused_at_parse_time(tmp_path):
    (tmp_path / "plans").mkdir()
    res = export_cli(ROOT / "models" / "deeplab_shapes.onnx", "--engine", tmp_path / "plans")
    assert res.returncode == 2 and f"--engine {tmp_path / 'plans'}: {tmp_path / 'plans'} is a folder" in res.stderr
    res = export_cli(ROOT / "models" / "deeplab_shapes.onnx", "--engine", tmp_path / "m.engine",
                     "--timing-cache", tmp_path / "plans")
    assert res.returncode == 2 and "--timing-cache" in res.stderr and "is a folder" in res.stderr


def test_onnx_metadata_without_the_onnx_package_equals_onnx_s(bundled_onnx, monkeypatch):
    nodes, with_onnx = _onnx_nodes_and_metadata(bundled_onnx)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert nodes and _onnx_nodes_and_metadata(bundled_onnx) == ([], with_onnx)
    assert "class_names" in with_onnx


def test_model_precision_from_metadata_or_sidecar(meta, tmp_path):
    """runtime.backend_choice.model_precision, what the benchmark and the evaluation report."""
    from runtime.backend_choice import model_precision

    assert model_precision("m.onnx", {}) == "fp32" and model_precision("m.onnx", {"precision": "int8"}) == "int8"
    plan = tmp_path / "m.engine"
    plan.write_bytes(b"not loaded here")
    assert model_precision(plan) == "unknown (no sidecar)"
    engine_meta.write_sidecar(plan, replace(meta, precision="int8+fp16"))
    assert model_precision(plan) == "int8+fp16"
    (tmp_path / "m.engine.json").write_text("{not json")
    assert model_precision(plan).startswith("unknown (")
