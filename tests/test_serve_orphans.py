"""tools/serve.py killed outright (SIGKILL: no handler runs) takes its Triton server with it, so no
server is left holding the ports; a SIGTERM stops it cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytest.importorskip("tritonclient.http", reason="the serve extra is not installed: pip install -e '.[serve]'")

from export.triton_repo import write_repository  # noqa: E402
from tools import serve  # noqa: E402


def _pids_naming(text: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_server_ends_with_serve_py(tmp_path, sig):
    try:
        serve.find_server()
    except serve.ServerError as e:
        pytest.skip(f"no Triton server for the serve extra: {e}")
    repo = tmp_path / "repo"
    write_repository(ROOT / "models" / "deeplab_shapes.onnx", repo, max_batch=2)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "tools/serve.py", "--repo", str(repo)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "model 'deeplab' ready" not in log_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        assert proc.poll() is None, log_path.read_text()
        assert _pids_naming(str(repo)), "no server process found while serving"
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while _pids_naming(str(repo)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _pids_naming(str(repo)), f"server or model processes outlived serve.py ({sig.name})"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _pids_naming(str(repo)):
            os.kill(pid, signal.SIGKILL)
