"""The prebuilt CUDA fatbin of crf/kernels/densecrf.cu (crf/gpu_module.py).

Three kinds of test, kept apart on purpose:

- the build (needs nvcc, no GPU): fatbin_command builds the fatbin; its container is read here
  (header by header) and, where cuobjdump is found, by cuobjdump: SASS for every architecture of
  FATBIN_ARCHS, the PTX of the newest, every extern "C" kernel in every ELF image, and the ELF
  images byte for byte what pycuda's SourceModule compile makes.
- the selection logic (pure Python): which file load_module hands to the driver and when it falls
  back to nvcc, against a FAKE stand-in for pycuda.driver. Nothing runs on a GPU there, and the
  fake's files are never given to CUDA: these check our decisions, not CUDA.
- the real thing (marked gpu, skipped without a CUDA device): the fatbin loaded by the driver,
  giving the same results as the nvcc-compiled module, with no nvcc on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from crf import gpu_kernels, gpu_module
from crf.kernel_interface import BackendUnavailable
from crf.gpu_module import FATBIN_ARCHS, KERNEL_SOURCE, fatbin_command, fatbin_ident, kernel_names

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not on PATH: the fatbin cannot be built here")
SASS = sorted(sm for sm, _ in FATBIN_ARCHS)
PTX = sorted(sm for sm, ptx in FATBIN_ARCHS if ptx)


def _cuobjdump() -> str | None:
    """cuobjdump from $CUOBJDUMP, PATH, or beside the real nvcc (nvcc may be a wrapper script)."""
    for candidate in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")):
        if candidate and Path(candidate).is_file():
            return candidate
    if NVCC:
        # nvcc --dryrun names the toolkit's root (TOP=...) without compiling (the file need not exist)
        out = subprocess.run([NVCC, "--dryrun", "--fatbin", "probe.cu"], capture_output=True, text=True).stderr
        top = re.search(r"^#\$ TOP=(.*)$", out, re.M)
        for d in ([Path(top.group(1)) / "bin"] if top else []) + [Path(NVCC).resolve().parent]:
            if (d / "cuobjdump").is_file():
                return str(d / "cuobjdump")
    return None


def _cuda_device() -> bool:
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _cuda_device(), reason="no CUDA device with pycuda here")


# ------------------------------------------------------------------------------------------------
# The fatbin container, read without CUDA (layout as nvcc 12 / 13's fatbinary writes it, checked
# against cuobjdump below): a 16-byte header (magic 0xBA55ED50, version, header size, payload size),
# then entries, each a header (kind 1 = PTX, 2 = ELF; the SM; the identifier) and its payload.

def fatbin_entries(data: bytes) -> list[dict]:
    magic, version, header_size, size = struct.unpack_from("<IHHQ", data, 0)
    assert magic == 0xBA55ED50 and version == 1, hex(magic)
    entries, off = [], header_size
    while off < header_size + size:
        (kind, _, entry_header, payload, compressed, _, minor, major, sm, name_off, name_len, flags, _,
         uncompressed) = struct.unpack_from("<HHIQIIHHIIIQQQ", data, off)
        entries.append({"kind": {1: "ptx", 2: "elf"}[kind], "sm": sm, "version": (major, minor),
                        "ident": data[off + name_off: off + name_off + name_len].decode(),
                        "compressed": compressed != 0,
                        "payload": data[off + entry_header: off + entry_header + payload]})
        off += entry_header + payload
    assert off == header_size + size == len(data)
    return entries


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fatbin built once by fatbin_command: (path, seconds)."""
    if NVCC is None:
        pytest.skip("nvcc (CUDA toolkit) not on PATH: the fatbin cannot be built here")
    out = tmp_path_factory.mktemp("fatbin") / "densecrf.fatbin"
    t = time.perf_counter()
    res = subprocess.run(fatbin_command(NVCC, KERNEL_SOURCE, out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out, time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# The build

def test_nvcc_options_are_the_backends():
    assert gpu_module.NVCC_OPTIONS == tuple(gpu_kernels.NVCC_OPTIONS)
    assert gpu_module.KERNEL_SOURCE == gpu_kernels.KERNEL_SOURCE


def test_fatbin_command_has_sass_for_every_arch_and_ptx_of_the_newest_only():
    cmd = fatbin_command("nvcc", KERNEL_SOURCE, Path("/x/out.fatbin"))
    assert cmd[:4] == ["nvcc", "--fatbin", "--fmad=false", "-O3"]
    gencodes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-gencode"]
    assert gencodes == [f"arch=compute_{sm},code=" + (f"[sm_{sm},compute_{sm}]" if ptx else f"sm_{sm}")
                        for sm, ptx in FATBIN_ARCHS]
    assert SASS == [75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121]  # what CUDA 13.0's nvcc builds from Turing up
    assert PTX == [max(SASS)], "the PTX is the newest architecture's, for GPUs after all of them"
    assert cmd[-5:] == ["-Xfatbin", f"--ident={fatbin_ident()}", "-o", "/x/out.fatbin", str(KERNEL_SOURCE)]
    assert fatbin_command("nvcc")[-2] == str(KERNEL_SOURCE.with_suffix(".fatbin"))  # shipped next to the .cu


def test_fatbin_ident_follows_the_source_and_the_options(tmp_path):
    src = tmp_path / "densecrf.cu"
    shutil.copy(KERNEL_SOURCE, src)
    ident = fatbin_ident(src)
    assert ident == fatbin_ident(KERNEL_SOURCE) and re.fullmatch(r"densecrf\.cu:sha256=[0-9a-f]{64}", ident)
    assert fatbin_ident(src, ("--fmad=true", "-O3")) != ident
    src.write_text(src.read_text() + "\n// edited\n")
    assert fatbin_ident(src) != ident


def test_kernel_names_are_every_extern_c_kernel():
    names = kernel_names()
    assert len(names) == KERNEL_SOURCE.read_text().count('extern "C" __global__') == len(set(names))
    assert {"crf_embed", "crf_splat", "crf_blur", "crf_update", "crf_argmax", "crf_fill_float"} <= set(names)


@needs_nvcc
def test_every_fatbin_arch_is_one_this_nvcc_builds():
    listed = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    missing = [f"sm_{sm}" for sm in SASS if f"sm_{sm}" not in listed]
    assert not missing, f"this nvcc cannot build {missing} (it lists {listed})"


def test_fatbin_holds_sass_for_every_arch_ptx_of_the_newest_and_every_kernel(built):
    path, seconds = built
    entries = fatbin_entries(path.read_bytes())
    assert sorted(e["sm"] for e in entries if e["kind"] == "elf") == SASS
    assert sorted(e["sm"] for e in entries if e["kind"] == "ptx") == PTX
    assert {e["ident"] for e in entries} == {fatbin_ident()}  # the stamp load_module checks
    for e in entries:
        if e["kind"] == "elf":
            assert not e["compressed"] and e["payload"][:4] == b"\x7fELF"
            missing = [k for k in kernel_names() if b"\0" + k.encode() + b"\0" not in e["payload"]]
            assert not missing, f"sm_{e['sm']} lacks {missing}"
    print(f"fatbin {path.stat().st_size / 1e6:.2f} MB, built in {seconds:.1f} s")


@needs_nvcc
def test_fatbin_elf_is_what_pycudas_sourcemodule_compiles(built, tmp_path):
    """SourceModule(source, no_extern_c=True, options=NVCC_OPTIONS) runs `nvcc --cubin <options>
    -arch sm_XY kernel.cu` (plus pycuda's include dir, which the .cu does not use): the fatbin's
    image for sm_XY must be that cubin, byte for byte."""
    sm = 90
    cubin = tmp_path / "kernel.cubin"
    shutil.copy(KERNEL_SOURCE, tmp_path / "kernel.cu")
    subprocess.run([NVCC, "--cubin", *gpu_module.NVCC_OPTIONS, "-arch", f"sm_{sm}", "kernel.cu"], cwd=tmp_path,
                   check=True, capture_output=True)
    image = next(e for e in fatbin_entries(built[0].read_bytes()) if e["kind"] == "elf" and e["sm"] == sm)
    data = cubin.read_bytes()
    assert image["payload"][:len(data)] == data and not image["payload"][len(data):].strip(b"\0")


def test_cuobjdump_agrees(built):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, beside nvcc, or $CUOBJDUMP): the container check above stands alone")
    path = built[0]
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True,
                             check=True).stdout
    assert sorted(int(m) for m in re.findall(r"^ELF file .*\.sm_(\d+)\.cubin$", listing, re.M)) == SASS, listing
    assert sorted(int(m) for m in re.findall(r"^PTX file .*\.sm_(\d+)\.ptx$", listing, re.M)) == PTX, listing
    symbols = subprocess.run([tool, "-symbols", str(path)], capture_output=True, text=True, check=True).stdout
    per_arch: dict = {}
    arch = None
    for line in symbols.splitlines():
        m = re.match(r"arch = sm_(\d+)", line.strip())
        if m:
            arch = int(m.group(1))
        elif "STO_ENTRY" in line:
            per_arch.setdefault(arch, set()).add(line.split()[-1])
    assert sorted(per_arch) == SASS
    assert all(names == set(kernel_names()) for names in per_arch.values())


# ------------------------------------------------------------------------------------------------
# The selection logic, against a fake pycuda.driver (nothing here runs CUDA)

class FakeDriver:
    """Stands in for pycuda.driver where load_module decides: its exception classes as pycuda names
    them, and module_from_file recording what it was asked to load (the bytes are never read)."""

    class Error(Exception):
        pass

    class LogicError(Error):
        pass

    class RuntimeError(Error):
        pass

    class MemoryError(Error):
        pass

    class CompileError(Error):
        pass

    def __init__(self, load_error=None, function_error=None):
        self.load_error, self.function_error = load_error, function_error
        self.loaded: list = []
        self.functions: list = []

    def module_from_file(self, path):
        self.loaded.append(path)
        if self.load_error is not None:
            raise self.load_error
        return FakeModule(self, path)


class FakeModule:
    def __init__(self, driver, path):
        self.driver, self.path = driver, path

    def get_function(self, name):
        self.driver.functions.append(name)
        if self.driver.function_error is not None:
            raise self.driver.function_error
        return ("function", name)


NO_BINARY = FakeDriver.RuntimeError("cuModuleLoad failed: no kernel image is available for execution on the device")
OLD_DRIVER_PTX = FakeDriver.LogicError("cuModuleLoad failed: the provided PTX was compiled with an unsupported toolchain.")


@pytest.fixture
def kit(tmp_path):
    """A copy of the .cu, a stand-in "fatbin" stamped for it (bytes CUDA never sees), and a compile
    stand-in that records being called."""
    src = tmp_path / "densecrf.cu"
    shutil.copy(KERNEL_SOURCE, src)
    fat = tmp_path / "densecrf.fatbin"
    fat.write_bytes(b"stand-in, never loaded by CUDA; stamp: " + fatbin_ident(src).encode())
    calls: dict = {"compile": [], "require_nvcc": 0}

    def compile_fn(source, options):
        calls["compile"].append((Path(source), tuple(options)))
        return "compiled-module"

    def require_nvcc():
        calls["require_nvcc"] += 1

    return src, fat, calls, compile_fn, require_nvcc


def test_a_shipped_fatbin_is_loaded_and_nvcc_never_asked_for(kit, capsys):
    src, fat, calls, compile_fn, require_nvcc = kit
    cuda = FakeDriver()
    module = gpu_module.load_module(cuda, src, require_nvcc=require_nvcc, compile_fn=compile_fn)
    assert isinstance(module, FakeModule) and cuda.loaded == [str(fat)]
    assert cuda.functions == kernel_names(src)  # every kernel resolved inside the decision
    assert calls == {"compile": [], "require_nvcc": 0} and capsys.readouterr().err == ""
    origin = gpu_module.module_origin()
    assert origin.how == "fatbin" and origin.path == str(fat) and origin.reason is None
    assert origin.describe() == f"loaded the shipped fatbin {fat}, nvcc not used"


@pytest.mark.parametrize("error", [NO_BINARY, OLD_DRIVER_PTX,
                                   FakeDriver.LogicError("cuModuleLoad failed: device kernel image is invalid")])
def test_a_fatbin_without_code_for_this_gpu_falls_back_to_nvcc_and_says_so(kit, capsys, error):
    src, fat, calls, compile_fn, require_nvcc = kit
    cuda = FakeDriver(load_error=error)
    assert gpu_module.load_module(cuda, src, require_nvcc=require_nvcc, compile_fn=compile_fn) == "compiled-module"
    assert cuda.loaded == [str(fat)] and calls["compile"] == [(src, gpu_module.NVCC_OPTIONS)]
    assert calls["require_nvcc"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "densecrf.fatbin has no code for this GPU" in err and "with nvcc" in err
    origin = gpu_module.module_origin()
    assert origin.how == "nvcc" and origin.path == str(src) and str(error) in origin.reason


def test_no_code_found_only_when_resolving_the_kernels_falls_back_too(kit, capsys):
    """A driver that defers loading (lazy module loading) may say it at cuModuleGetFunction."""
    src, fat, calls, compile_fn, require_nvcc = kit
    cuda = FakeDriver(function_error=NO_BINARY)
    assert gpu_module.load_module(cuda, src, require_nvcc=require_nvcc, compile_fn=compile_fn) == "compiled-module"
    assert gpu_module.module_origin().how == "nvcc" and "no code for this GPU" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    FakeDriver.MemoryError("cuModuleLoad failed: out of memory"),
    FakeDriver.LogicError("cuModuleLoad failed: invalid device context"),
    FakeDriver.RuntimeError("cuModuleLoad failed: file not found"),
    # the right words in the wrong class, and the wrong words in the right class: not ours to guess
    FakeDriver.LogicError("cuModuleLoad failed: no kernel image is available for execution on the device"),
    FakeDriver.RuntimeError("cuModuleLoad failed: no CUDA-capable device is detected"),
])
def test_other_load_errors_are_not_taken_for_a_missing_arch(kit, capsys, error):
    src, fat, calls, compile_fn, require_nvcc = kit
    with pytest.raises(type(error)):
        gpu_module.load_module(FakeDriver(load_error=error), src, require_nvcc=require_nvcc, compile_fn=compile_fn)
    assert calls == {"compile": [], "require_nvcc": 0} and capsys.readouterr().err == ""


def test_no_fatbin_shipped_compiles_without_touching_the_driver_loader(kit, capsys):
    src, fat, calls, compile_fn, require_nvcc = kit
    fat.unlink()
    cuda = FakeDriver()
    assert gpu_module.prebuilt_fatbin(src) is None
    assert gpu_module.load_module(cuda, src, require_nvcc=require_nvcc, compile_fn=compile_fn) == "compiled-module"
    assert cuda.loaded == [] and calls["require_nvcc"] == 1
    err = capsys.readouterr().err
    assert err == f"crf: no prebuilt densecrf.fatbin is shipped next to densecrf.cu; compiling densecrf.cu with nvcc instead\n"


@pytest.mark.parametrize("change", ["source", "options", "unstamped"])
def test_a_stale_fatbin_is_never_loaded(kit, capsys, change):
    src, fat, calls, compile_fn, require_nvcc = kit
    options = gpu_module.NVCC_OPTIONS
    if change == "source":
        src.write_text(src.read_text().replace("#define CRF_PAD_ENERGY 1e30f", "#define CRF_PAD_ENERGY 1e29f"))
    elif change == "options":
        options = ("--fmad=true", "-O3")
    else:
        fat.write_bytes(b"a fatbin built some other way")
    assert gpu_module.prebuilt_fatbin(src, options) is None
    cuda = FakeDriver()
    gpu_module.load_module(cuda, src, options, require_nvcc=require_nvcc, compile_fn=compile_fn)
    assert cuda.loaded == [] and calls["compile"] == [(src, tuple(options))]
    assert "was not built from this densecrf.cu with these nvcc options" in capsys.readouterr().err


def test_prebuilt_fatbin_is_the_stamped_file_next_to_the_source(kit):
    src, fat, *_ = kit
    assert gpu_module.prebuilt_fatbin(src) == fat and gpu_module.fatbin_problem(src) is None


def test_backend_needs_no_nvcc_when_a_fatbin_is_shipped(kit, monkeypatch, capsys):
    """crf.gpu_kernels._compile_module through the fake driver: with a usable fatbin nvcc is not looked
    for; without one, nvcc's absence is the BackendUnavailable it always was."""
    src, fat, *_ = kit
    monkeypatch.setattr(gpu_kernels, "KERNEL_SOURCE", src)
    monkeypatch.setattr(gpu_kernels.shutil, "which", lambda name: None)  # no nvcc anywhere
    cuda = FakeDriver()
    assert isinstance(gpu_kernels._compile_module(cuda), FakeModule) and cuda.loaded == [str(fat)]
    fat.unlink()
    with pytest.raises(BackendUnavailable, match=r"nvcc.*not on PATH"):
        gpu_kernels._compile_module(FakeDriver())
    assert "no prebuilt densecrf.fatbin" in capsys.readouterr().err
    # a load error that is not "no code for this GPU" stays what it was: the kernels do not load
    fat.write_bytes(fatbin_ident(src).encode())
    with pytest.raises(BackendUnavailable, match="do not load on this GPU"):
        gpu_kernels._compile_module(FakeDriver(load_error=FakeDriver.MemoryError("cuModuleLoad failed: out of memory")))


def test_gpu_module_imports_without_the_package_and_without_pycuda():
    """setup.py loads crf/gpu_module.py by path while it builds a wheel: standard library only."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('gm', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(len(m.fatbin_command('nvcc')), sorted(k for k in sys.modules if k.split('.')[0] in "
            "('pycuda', 'numpy', 'crf', 'torch')))\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "crf" / "gpu_module.py")], capture_output=True,
                         text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[1].strip() == "[]"


# ------------------------------------------------------------------------------------------------
# On a GPU (pytest -m gpu on the GPU machine)

@pytest.mark.gpu
@needs_gpu
@needs_nvcc
def test_gpu_fatbin_module_gives_the_same_results_as_the_nvcc_compile(built, tmp_path):
    """The fatbin loaded by the driver for this GPU runs the CRF to the same bits as the module
    pycuda compiles from the same .cu."""
    import numpy as np

    from crf import CRFParams
    from crf.driver import DenseCRFDriver
    from scenes import make_scene
    from benchmarking.inputs import smooth_logits

    src = tmp_path / "densecrf.cu"
    shutil.copy(KERNEL_SOURCE, src)
    shutil.copy(built[0], tmp_path / "densecrf.fatbin")
    img = make_scene(3, 120, 160)[0]
    scores = smooth_logits(120, 160, 21, seed=4)
    results = {}
    for how in ("fatbin", "nvcc"):
        k = gpu_kernels.GPUKernels()
        with k.active():
            if how == "fatbin":
                k.module = gpu_module.load_module(k.cuda, src)
                assert gpu_module.module_origin().how == "fatbin", gpu_module.module_origin()
            else:
                k.module = gpu_module.compile_source(src)
            k._functions = {}
            results[how] = DenseCRFDriver(k).run(scores, img, 120, 160, 21, CRFParams())[0]
    assert np.array_equal(results["fatbin"], results["nvcc"])


@pytest.mark.gpu
@needs_gpu
@needs_nvcc
def test_gpu_backend_runs_from_the_fatbin_with_no_nvcc_on_path(built, tmp_path):
    """A fresh process whose PATH has no nvcc: GPUKernels loads the fatbin, the CRF runs, and the
    module's origin says the fatbin was used."""
    src = tmp_path / "densecrf.cu"
    shutil.copy(KERNEL_SOURCE, src)
    shutil.copy(built[0], tmp_path / "densecrf.fatbin")
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "nvcc").exists())
    code = ("import shutil, sys, numpy as np\n"
            "from pathlib import Path\n"
            "assert shutil.which('nvcc') is None\n"
            "from crf import gpu_kernels, gpu_module, refine\n"
            "from benchmarking.inputs import smooth_logits\n"
            "gpu_kernels.KERNEL_SOURCE = Path(sys.argv[1])\n"
            "img = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)\n"
            "q = refine(smooth_logits(61, 97, 5), img, backend='gpu')\n"
            "assert np.isfinite(q).all()\n"
            "print(gpu_module.module_origin().describe())\n")
    out = subprocess.run([sys.executable, "-c", code, str(src)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PATH=path, PYTHONPATH=os.pathsep.join(
                             p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded the shipped fatbin" in out.stdout and "nvcc not used" in out.stdout, out.stdout
