"""The fallback build of the CPU CRF (where no prebuilt library is shipped): compiled once into a
private cache, a library that does not load is rebuilt once, a cache directory others could write
is refused (and nothing in it loaded), concurrent processes compile once and failed or killed
builds leave nothing behind.

Every case runs in a subprocess with its own DEEPLAB_CACHE, so the real cache is untouched. Real g++ compiles are few (the first build, the
concurrent build, one rebuild); elsewhere CXX is a stand-in "compiler" that copies the library the
first build made, which keeps every check of what gets loaded while sparing the compile time.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")

COMPILING = "crf: no prebuilt CPU kernels here; compiling them once"
WAITING = "crf: waiting for another process building the CPU kernels"
LOCK = ".build.lock"

# The auto backend, then its result against the numpy CRF on a small photograph.
RUN = """
import warnings
import numpy as np
from crf import refine, resolve_backend
from benchmarking.inputs import photo, smooth_logits
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    name = resolve_backend("auto")
for w in caught:
    print("warning:", str(w.message).replace(chr(10), " | "))
print("backend:", name)
img = photo("coffee", 48)
s = smooth_logits(*img.shape[:2], 4, seed=1)
a, b = refine(s, img, backend=name), refine(s, img, backend="numpy")
print("agree:", bool((a.argmax(0) == b.argmax(0)).all() and np.abs(a - b).max() < 1e-5))
"""


def _env(cache: Path, tmpdir: Path, cxx: Path | None = None) -> dict:
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, DEEPLAB_CACHE=str(cache), TMPDIR=str(tmpdir), PYTHONPATH=str(ROOT),
               DEEPLAB_CRF_BUILD="runtime")  # the run-time build, even where prebuilt libraries are
    env.pop("CXX", None)
    if cxx is not None:
        env["CXX"] = str(cxx)
    return env


def run(cache: Path, tmpdir: Path, cxx: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, env=_env(cache, tmpdir, cxx),
                          capture_output=True, text=True, timeout=600)


def report(out: subprocess.CompletedProcess) -> dict:
    """The run's backend, agreement with numpy, warnings and number of compiles."""
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return {"backend": next(l.split(": ", 1)[1] for l in lines if l.startswith("backend: ")),
            "agree": "agree: True" in lines,
            "warnings": [l.split(": ", 1)[1] for l in lines if l.startswith("warning: ")],
            "compiles": out.stderr.count(COMPILING)}


def script(path: Path, body: str) -> Path:
    """An executable shell script standing in for the C++ compiler (``--version`` asks g++)."""
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = "--version" ]; then exec g++ --version; fi\n'
                    'out=""; prev=""\n'
                    'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n' + body)
    path.chmod(0o755)
    return path


def cache_entries(cache: Path) -> set:
    return {p.name for p in (cache / "deeplab-v1-toolkit").iterdir()}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One real first build on an empty cache: its output and the library it left."""
    base = tmp_path_factory.mktemp("first-build")
    out = run(base / "cache", base / "tmp")
    libs = sorted((base / "cache" / "deeplab-v1-toolkit").glob("libdensecrf_cpu_*.so"))
    assert len(libs) == 1, (out.stderr, libs)
    return {"out": out, "cache": base / "cache", "lib": libs[0]}


@pytest.fixture
def copy_cxx(tmp_path, good):
    """A compiler that outputs the good library: a rebuild without the compile time."""
    return script(tmp_path / "copy-cxx", f'cp "{good["lib"]}" "$out"\n')


def seeded_cache(tmp_path: Path, good: dict, mode: int = 0o700) -> Path:
    """A fresh cache directory holding a copy of the good library."""
    d = tmp_path / "cache" / "deeplab-v1-toolkit"
    d.mkdir(parents=True)
    d.chmod(mode)
    shutil.copy2(good["lib"], d)
    return tmp_path / "cache"


def test_first_build_compiles_once_into_a_private_directory_and_leaves_no_temp_files(good):
    r = report(good["out"])
    assert r["backend"] == "cpu" and r["agree"] and r["compiles"] == 1 and r["warnings"] == []
    assert cache_entries(good["cache"]) == {good["lib"].name, LOCK}
    assert stat.S_IMODE((good["cache"] / "deeplab-v1-toolkit").stat().st_mode) == 0o700


def test_a_cached_library_is_loaded_without_compiling(tmp_path, good):
    cache = seeded_cache(tmp_path, good)
    r = report(run(cache, tmp_path / "tmp"))
    assert r["backend"] == "cpu" and r["agree"] and r["compiles"] == 0 and r["warnings"] == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_library_is_not_loaded_but_rebuilt(tmp_path, good, copy_cxx, damage):
    # a truncated library would not even fail cleanly: dlopen maps past its end and dies of SIGBUS
    cache = seeded_cache(tmp_path, good)
    lib = cache / "deeplab-v1-toolkit" / good["lib"].name
    data = good["lib"].read_bytes()
    lib.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(40000))
    out = run(cache, tmp_path / "tmp", copy_cxx)
    r = report(out)
    assert r["backend"] == "cpu" and r["agree"] and r["compiles"] == 1 and r["warnings"] == []
    assert f"the cached {lib.name} is damaged" in out.stderr
    assert lib.read_bytes() == data
    assert cache_entries(cache) == {lib.name, LOCK}


def test_a_library_that_never_loads_falls_back_to_numpy_with_the_reason(tmp_path):
    cxx = script(tmp_path / "garbage-cxx", 'head -c 5000 /dev/urandom > "$out"\n')
    r = report(run(tmp_path / "cache", tmp_path / "tmp", cxx))
    assert r["backend"] == "numpy" and r["agree"]
    assert r["compiles"] == 1
    assert len(r["warnings"]) == 1
    assert r["warnings"][0].startswith("crf: using the slow numpy CRF: ")
    assert "do not load" in r["warnings"][0] and str(tmp_path / "cache") in r["warnings"][0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A loadable shared library that says so on stderr as soon as it is loaded."""
    d = tmp_path_factory.mktemp("planted")
    src = d / "planted.cpp"
    src.write_text('#include <cstdio>\n'
                   '__attribute__((constructor)) static void planted() { std::fputs("PLANTED CODE RAN\\n", stderr); }\n')
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(d / "planted.so"), str(src)], check=True)
    return d / "planted.so"


def _someone_elses(d: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory away")
    os.chown(d, 65534, 65534)


@pytest.mark.parametrize("make_unsafe", [lambda d: d.chmod(0o775), lambda d: d.chmod(0o757), _someone_elses],
                         ids=["group-writable", "world-writable", "not-owned"])
def test_a_cache_others_can_write_is_refused_and_nothing_in_it_loaded(tmp_path, good, planted, copy_cxx, make_unsafe):
    cache = seeded_cache(tmp_path, good)
    d = cache / "deeplab-v1-toolkit"
    shutil.copy(planted, d / good["lib"].name)  # what someone else could have put there
    make_unsafe(d)
    before = sorted(p.name for p in d.iterdir())
    out = run(cache, tmp_path / "tmp", copy_cxx)
    r = report(out)
    assert "PLANTED CODE RAN" not in out.stderr
    assert r["backend"] == "numpy" and r["agree"] and r["compiles"] == 0
    assert len(r["warnings"]) == 1 and str(d) in r["warnings"][0] and "DEEPLAB_CACHE" in r["warnings"][0]
    assert sorted(p.name for p in d.iterdir()) == before


def test_a_cache_that_cannot_be_created_falls_back_to_numpy_naming_it(tmp_path, copy_cxx):
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "sub"
    r = report(run(cache, tmp_path / "tmp", copy_cxx))
    assert r["backend"] == "numpy" and r["agree"] and r["compiles"] == 0
    assert len(r["warnings"]) == 1
    assert str(cache / "deeplab-v1-toolkit") in r["warnings"][0] and "DEEPLAB_CACHE" in r["warnings"][0]


def test_two_processes_on_an_empty_cache_compile_once(tmp_path):
    # the real compiler, slowed down so that the second process surely arrives during the compile
    cxx = script(tmp_path / "slow-cxx", 'sleep 2\nexec g++ "$@"\n')
    env = _env(tmp_path / "cache", tmp_path / "tmp", cxx)
    procs = [subprocess.Popen([sys.executable, "-c", RUN], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    reports = [report(o) for o in outs]
    assert all(r["backend"] == "cpu" and r["agree"] for r in reports)
    assert sum(r["compiles"] for r in reports) == 1
    assert sum(WAITING in o.stderr for o in outs) == 1  # the other one waited, then loaded that build
    assert len(list((tmp_path / "cache" / "deeplab-v1-toolkit").glob("libdensecrf_cpu_*.so"))) == 1


@pytest.mark.parametrize("failure", ["killed", "exits non-zero"])
def test_a_failed_compile_leaves_nothing_the_next_build_trips_on(tmp_path, copy_cxx, failure):
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    started = tmp_path / "compile-started"
    if failure == "killed":
        cxx = script(tmp_path / "stuck-cxx", f'printf "\\177ELF partial" > "$out"; touch "{started}"; sleep 120\n')
        proc = subprocess.Popen([sys.executable, "-c", RUN], cwd=ROOT, env=_env(cache, tmp, cxx),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the process, its compiler and the compiler's sleep
        proc.wait()
        assert started.exists()
        assert any(n.startswith(".build-") for n in cache_entries(cache))  # what a kill leaves behind
    else:
        cxx = script(tmp_path / "failing-cxx", 'printf "\\177ELF partial" > "$out"; echo "error: no" >&2; exit 1\n')
        r = report(run(cache, tmp, cxx))
        assert r["backend"] == "numpy" and len(r["warnings"]) == 1
        assert r["warnings"][0].startswith("crf: using the slow numpy CRF: building the CPU CRF kernels failed:")
        assert "error: no" in r["warnings"][0]
        assert cache_entries(cache) == {LOCK}

    r = report(run(cache, tmp, copy_cxx))
    assert r["backend"] == "cpu" and r["agree"] and r["compiles"] == 1 and r["warnings"] == []
    lib = next((cache / "deeplab-v1-toolkit").glob("libdensecrf_cpu_*.so"))
    assert cache_entries(cache) == {lib.name, LOCK}
