"""A real Triton server for the test modules that need one. Import the fixtures into a module
(``from triton_fixture import repo, server``): each module gets its own server on the bundled
model's repository (127.0.0.1, free ports), stopped after its last test. Skipped, with the reason,
when the serve extra is not installed or no server can be had."""
from __future__ import annotations

import os

import pytest

from conftest import ROOT

MODEL = ROOT / "models" / "deeplab_shapes.onnx"
MAX_PIXELS = 400 * 500  # the samples (321 x 481) fit; a 500 x 500 image does not
NO_SERVE_EXTRA = "the serve extra is not installed: pip install -e '.[serve]'"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from serving.repository import write_repository

    out = tmp_path_factory.mktemp("triton")
    write_repository(MODEL, out, max_batch=8, max_pixels=MAX_PIXELS)
    return out


def require_server() -> None:
    """Skip the calling test, with the reason, when tritonclient or a tritonserver is missing."""
    pytest.importorskip("tritonclient.http", reason=NO_SERVE_EXTRA)
    from serving import launcher

    try:
        launcher.find_server()
    except launcher.ServerError as e:
        pytest.skip(f"no Triton server for the serve extra: {e}")


@pytest.fixture(scope="module")
def server(repo):
    from serving import launcher

    require_server()
    srv = launcher.start_server(repo)
    yield srv
    launcher.stop_server(srv)
    assert srv.process.poll() is not None
    assert not processes_on(repo), "a model process outlived the server"
    assert not srv.workdir.exists(), "the server's temporary folder outlived it"
    assert not list(launcher.SHM_DIR.glob(srv.shm_prefix + "*")), "the server's shared memory outlived it"


def processes_on(repo) -> list:
    """Processes whose command line names the repository (the server and its model processes)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(repo).encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found
