"""What deeplab-serve (tools/serve.py) leaves behind. Killed outright (SIGKILL: no handler runs), it takes its Triton
server with it, so no server is left holding the ports; a SIGTERM stops it cleanly, its temporary
folder and shared memory removed. What a killed serve.py (and server) could not remove, the next
start removes, but never what a running server holds."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from triton_fixture import NO_SERVE_EXTRA, repo, require_server, server  # noqa: F401  (fixtures)

pytest.importorskip("tritonclient.http", reason=NO_SERVE_EXTRA)

from runtime.output_files import process_running  # noqa: E402  (a zombie nobody reaps is not running)
from serving import launcher  # noqa: E402
from serving.client import TritonSegmenter  # noqa: E402


def _pids_naming(text: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return [pid for pid in found if process_running(pid)]


def _children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _regions(server_pid: int) -> set:
    """The /dev/shm files the server and its model processes map (the Python backend's regions)."""
    found = set()
    for pid in [server_pid] + _children(server_pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                found.update(Path(line.split()[-1]) for line in f if "/dev/shm/" in line)
        except OSError:
            pass
    return found


def _start_cli(repo, log_path: Path) -> tuple:
    """serve.py in a process of its own: (its Popen, its server's pid, the server's temporary folder)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--repo", str(repo)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "model 'deeplab' ready" not in log_path.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.5)
    assert proc.poll() is None, log_path.read_text()
    workdir = Path(re.search(r"log +(\S+)/tritonserver\.log", log_path.read_text()).group(1))
    servers = [pid for pid in _children(proc.pid) if process_running(pid)]
    assert len(servers) == 1, servers
    return proc, servers[0], workdir


def _wait_gone(pids, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while any(process_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_running(p) for p in pids), "processes outlived the kill"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_server_ends_with_serve_py(repo, tmp_path, sig):
    require_server()
    proc, server_pid, workdir = _start_cli(repo, tmp_path / "serve.log")
    try:
        regions = _regions(server_pid)
        assert regions and workdir.is_dir() and _pids_naming(str(workdir))
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while _pids_naming(str(workdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _pids_naming(str(workdir)), f"server or model processes outlived serve.py ({sig.name})"
        assert not any(r.exists() for r in regions), "shared memory left behind"
        if sig == signal.SIGTERM:  # a SIGKILL leaves the folder: the next start removes it (below)
            assert not workdir.exists(), "temporary folder left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _pids_naming(str(workdir)):
            os.kill(pid, signal.SIGKILL)


def test_a_new_start_removes_what_a_killed_serve_py_left_but_not_a_running_servers(server, repo, tmp_path):
    """serve.py and its server killed outright (SIGKILL to both, as the OOM killer or a container
    stop may) leave the server's temporary folder and the Python backend's shared memory (1 MB per
    model instance, more when requests are large). The next start removes them; the running
    server of this module (its owner, this process, runs) keeps its own and goes on serving."""
    proc, server_pid, workdir = _start_cli(repo, tmp_path / "serve.log")
    try:
        regions = _regions(server_pid)
        assert regions
        os.killpg(server_pid, signal.SIGSTOP)  # the server may not clean up: it is killed with serve.py
        proc.kill()
        proc.wait(30)
        os.killpg(server_pid, signal.SIGKILL)
        _wait_gone([server_pid])
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _pids_naming(str(workdir)):
            os.kill(pid, signal.SIGKILL)
    assert workdir.is_dir() and all(r.exists() for r in regions)  # what was left behind

    live_regions = _regions(server.process.pid)
    assert live_regions and not live_regions & regions
    fresh = launcher.start_server(repo)
    try:
        assert not workdir.exists(), "the killed server's temporary folder is still there"
        assert not any(r.exists() for r in regions), "the killed server's shared memory is still there"
        assert server.workdir.is_dir() and all(r.exists() for r in live_regions), "a running server's were removed"
        for url in (server.http_url, fresh.http_url):
            assert TritonSegmenter(url)(np.zeros((33, 41, 3), np.uint8)).labels.shape == (33, 41)
    finally:
        launcher.stop_server(fresh)


def test_stop_removes_the_shared_memory_of_a_server_it_had_to_kill(repo):
    """A server that does not stop on SIGTERM (here: stopped; in life: hung, or busy past the
    timeout) is killed, with its model processes: nothing of theirs removes their shared memory."""
    require_server()
    srv = launcher.start_server(repo)
    try:
        regions = _regions(srv.process.pid)
        assert regions and all(r.name.startswith(srv.shm_prefix) for r in regions)
        os.killpg(srv.process.pid, signal.SIGSTOP)
    finally:
        launcher.stop_server(srv, timeout=1)
    assert srv.process.returncode == -signal.SIGKILL
    assert not any(r.exists() for r in regions) and not srv.workdir.exists()


def test_stale_files_are_those_of_owners_that_no_longer_run(tmp_path, monkeypatch):
    """The rule remove_stale follows, on stand-ins for each kind of leftover: removed when the pid in
    its name is not running and no running process names or maps it; kept otherwise."""
    temp, shm, cache = tmp_path / "tmp", tmp_path / "shm", tmp_path / "cache"
    for d in (temp, shm, cache):
        d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(launcher, "SHM_DIR", shm)
    monkeypatch.setattr(launcher, "cache_dir", lambda: cache)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = finished.pid
    holder = None
    try:
        def leftovers(pid: int) -> list:
            paths = [temp / f"deeplab-triton-{pid}-ab12cd34", shm / f"deeplab_triton_{pid}_0a1b2c3d_uuid",
                     cache / f".server-nvidia-pytriton-0.7.0.{pid}.0123456789ab.tmp"]
            for p in paths:
                p.mkdir() if p.parent != shm else p.write_bytes(b"\0" * 16)
            return paths

        gone = leftovers(dead)
        # a live owner's: another process that runs (this one's own are never touched either)
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        kept = leftovers(holder.pid) + leftovers(os.getpid())
        # a dead owner's folder that a running process still names (a server still shutting down)
        in_use = temp / f"deeplab-triton-{dead}-inuse123"
        in_use.mkdir()
        user = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(in_use)])
        try:
            unrelated = temp / "deeplab-triton-notapid"
            unrelated.mkdir()
            removed = launcher.remove_stale()
        finally:
            user.kill()
            user.wait()
        assert sorted(removed) == sorted(gone) and not any(p.exists() for p in gone)
        assert all(p.exists() for p in kept + [in_use, unrelated])
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
