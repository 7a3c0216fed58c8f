"""The CRF kernels built ahead of time (crf/build_kernels.py): which library a CPU gets, and the
shipped libraries themselves — portable (old glibc, no C++ runtime of the build machine, no static
TLS) and equal to the run-time build."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from crf.build_kernels import CPU_TARGETS, best_target, cpu_features, targets_for, wheel_platform_tag

X86_V2 = {"sse4_2", "sse4_1", "ssse3", "popcnt", "cx16", "sse2"}
X86_V3 = X86_V2 | {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
X86_V4 = X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("machine,features,expected", [
    ("x86_64", X86_V4 | {"avx512_vnni"}, "x86-64-v4"),
    ("x86_64", X86_V3, "x86-64-v3"),
    ("x86_64", X86_V4 - {"avx512vl"}, "x86-64-v3"),  # AVX-512 without VL is not v4
    ("x86_64", X86_V2, "x86-64-v2"),
    ("x86_64", X86_V2 - {"popcnt"}, None),  # older than the baseline: compiled here instead
    ("aarch64", {"fp", "asimd", "atomics", "fphp", "asimdhp", "asimdrdm", "asimddp"}, "armv8.2-a"),  # Orin
    ("aarch64", {"fp", "asimd", "aes", "atomics", "fphp", "asimdhp", "asimdrdm", "dcpop"}, "armv8.2-a"),  # Xavier
    ("aarch64", {"fp", "asimd"}, "armv8-a"),  # Nano (Cortex-A57)
    ("arm64", {"fp", "asimd"}, "armv8-a"),
    ("riscv64", {"rv64"}, None),
])
def test_the_best_level_the_cpu_runs_is_chosen(machine, features, expected):
    target = best_target(machine, frozenset(features))
    assert (target.name if target else None) == expected


def test_this_machine_gets_a_level_it_runs():
    import platform

    target = best_target()
    if platform.machine() in ("x86_64", "aarch64"):
        assert target is not None and target.needs <= cpu_features()


def test_platform_tags():
    assert wheel_platform_tag("x86_64") == "manylinux_2_28_x86_64"
    assert wheel_platform_tag("aarch64") == "manylinux_2_31_aarch64"
    with pytest.raises(ValueError, match="riscv64"):
        targets_for("riscv64")
    assert {t.machine for t in CPU_TARGETS} == {"x86_64", "aarch64"}


def run_env(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=full,
                          timeout=300)


def test_a_target_forced_by_name_is_checked():
    code = "import sys; sys.path.insert(0, '.'); from crf.cpu_library import prebuilt_cpu_library; prebuilt_cpu_library()"
    out = run_env(code, DEEPLAB_CRF_TARGET="x86-64-v9")
    assert out.returncode != 0 and "DEEPLAB_CRF_TARGET=x86-64-v9" in out.stderr
    out = run_env(code + "; print('ok')", DEEPLAB_CRF_BUILD="runtime", DEEPLAB_CRF_TARGET="x86-64-v9")
    assert out.returncode == 0 and "ok" in out.stdout  # the run-time build asked for: no prebuilt looked at


# -- the shipped libraries themselves (built with zig, as setup.py builds them) ------------------

import re  # noqa: E402
import shutil  # noqa: E402
import venv  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from crf.build_kernels import GLIBC, build_cpu_libraries, zig_command  # noqa: E402

NO_ZIG = "zig's C++ compiler (pip install ziglang) builds the shipped libraries"
needs_zig = pytest.mark.skipif(zig_command() is None, reason=NO_ZIG)
needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) reads the ELF")


def kernel_names() -> set:
    source = (ROOT / "crf" / "kernels" / "densecrf.cu").read_text()
    return set(re.findall(r'extern "C" __global__ void (\w+)\(', source))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    if zig_command() is None:
        pytest.skip(NO_ZIG)
    out = tmp_path_factory.mktemp("prebuilt")
    libs = {}
    for machine in ("x86_64", "aarch64"):
        for lib in build_cpu_libraries(out / machine, machine, log=lambda _: None):
            libs[lib.name] = (machine, lib)
    return libs


def readelf(*args) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


@needs_readelf
def test_shipped_libraries_are_portable(shipped):
    """Each loads on its platform's oldest glibc (manylinux_2_28 x86_64; 2.31 aarch64, JetPack 5),
    needs no C++ runtime of the build machine, never the static TLS block (dlopen()ed late, as
    ctypes does: the Jetson failure), and exports the launchers only."""
    assert len(shipped) == 5
    wanted = {f"launch_{k}" for k in kernel_names()} | {"crf_cpu_set_threads", "crf_cpu_threads"}
    assert len(wanted) > 20
    for name, (machine, lib) in shipped.items():
        header = readelf("-h", str(lib))
        assert ("X86-64" if machine == "x86_64" else "AArch64") in header, name
        symbols = readelf("--dyn-syms", str(lib))
        versions = {tuple(map(int, v.split("."))) for v in re.findall(r"@GLIBC_([0-9.]+)", symbols)}
        assert versions and max(versions) <= GLIBC[machine], (name, max(versions))
        assert "GLIBCXX" not in symbols and "CXXABI" not in symbols, name
        dynamic = readelf("-d", str(lib))
        assert not re.search(r"NEEDED.*(libstdc\+\+|libgcc_s|libc\+\+)", dynamic), name
        assert "STATIC_TLS" not in dynamic, name
        assert not re.search(r"R_\w*(TPOFF|TPREL)", readelf("-r", str(lib))), name  # no initial-exec TLS
        exported = {f[7] for f in (line.split() for line in symbols.splitlines())
                    if len(f) >= 8 and f[6] != "UND" and f[4] in ("GLOBAL", "WEAK") and f[3] in ("FUNC", "OBJECT")}
        assert exported == wanted, (name, exported ^ wanted)


def test_shipped_x86_levels_equal_the_run_time_build_bit_for_bit(shipped):
    import platform

    from crf import CRFParams
    from crf.cpu_kernels import CPUKernels
    from crf.cpu_library import build_cpu_library
    from crf.build_kernels import best_target, cpu_features, targets_for
    from crf.driver import DenseCRFDriver
    from benchmarking.inputs import photo, smooth_logits

    if platform.machine() != "x86_64":
        pytest.skip("runs the x86_64 libraries")
    img = photo("astronaut", 160)
    scores = smooth_logits(*img.shape[:2], 21)
    reference, _ = DenseCRFDriver(CPUKernels(build_cpu_library())).run(scores, img, *img.shape[:2], 21, CRFParams())
    ran = []
    for target in targets_for("x86_64"):
        if not target.needs <= cpu_features():
            continue  # this CPU cannot run that level
        lib = shipped[target.filename][1]
        got, _ = DenseCRFDriver(CPUKernels(lib)).run(scores, img, *img.shape[:2], 21, CRFParams())
        assert np.array_equal(got, reference), target.name
        ran.append(target.name)
    assert best_target().name in ran


def _wheel_venv(tmp_path: Path) -> tuple:
    """A wheel of the project built here, installed in a fresh virtualenv that sees the runtime's
    dependencies (numpy, OpenCV, ONNX Runtime, tqdm) but not the checkout."""
    dist = tmp_path / "dist"
    env = {**os.environ, "DEEPLAB_WHEEL_FATBIN": "1"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(ROOT)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    py = target / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site,
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    deps = [m.__file__ for m in (np, __import__("cv2"), __import__("onnxruntime"), __import__("tqdm"))]
    # the dependencies' folder only, as a plain path entry: the checkout's editable finder (a .pth
    # there) is not run, so `crf` and `runtime` can only come from the wheel
    (Path(site) / "deps.pth").write_text(str(Path(deps[0]).parents[1]) + "\n")
    return wheel, py


@needs_zig
def test_the_wheel_runs_its_prebuilt_kernels_with_no_compiler(tmp_path, bundled_onnx):
    wheel, py = _wheel_venv(tmp_path)
    assert wheel.name.endswith("-py3-none-manylinux_2_28_x86_64.whl") or platform_is_not_x86()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert sum(n.startswith("crf/kernels/prebuilt/libdensecrf_") for n in names) == 3
    if shutil.which("nvcc"):
        assert "crf/kernels/densecrf.fatbin" in names
    code = ("import sys, numpy as np\n"
            "from runtime import Segmenter\n"
            "import crf, crf.cpu_library as b\n"
            "assert 'site-packages' in crf.__file__, crf.__file__\n"
            "seg = Segmenter(sys.argv[1])\n"
            "r = seg(sys.argv[2], return_probabilities=True)\n"
            "np.save(sys.argv[3], r.probabilities)\n"
            "print(seg.crf_backend, b.cpu_library_source)\n")
    probs = tmp_path / "p.npy"
    # no compiler reachable: PATH holds the virtualenv only, CXX points nowhere, an empty cache
    env = {"PATH": str(py.parent), "CXX": str(tmp_path / "no-compiler"), "DEEPLAB_CACHE": str(tmp_path / "cache"),
           "HOME": str(tmp_path)}
    out = subprocess.run([str(py), "-c", code, str(bundled_onnx), str(ROOT / "samples" / "scene_0.png"), str(probs)],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from crf.build_kernels import best_target

    assert out.stdout.split() == ["cpu", "prebuilt", best_target().filename], out.stdout
    assert "compiling" not in out.stderr and "numpy" not in out.stderr, out.stderr
    assert not (tmp_path / "cache").exists()  # nothing compiled, nothing cached
    from runtime import Segmenter

    here = Segmenter(bundled_onnx)(str(ROOT / "samples" / "scene_0.png"), return_probabilities=True)
    assert np.array_equal(np.load(probs), here.probabilities)  # the checkout's run-time build, bit for bit


def platform_is_not_x86() -> bool:
    import platform

    return platform.machine() != "x86_64"
