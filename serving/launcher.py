"""Start NVIDIA Triton Inference Server on a model repository (serving.repository), bound to 127.0.0.1.

    server = start_server("out/triton")      # free ports; waits until model "deeplab" is ready
    server.http_url, server.grpc_url, server.metrics_url
    stop_server(server)

The server used, first found: ``tritonserver=PATH``; `tritonserver` on PATH; /opt/tritonserver (an
NGC container); the nvidia-pytriton wheel installed in this Python; else that wheel
(nvidia-pytriton==0.7.0, Triton 2.51) installed once into the cache with pip. With the wheel's
server, the model runs in an environment of its own (numpy < 2, OpenCV, ONNX Runtime), also made
once into the cache with pip: the Python backend of that server needs numpy < 2, whatever this
Python has. Triton does not start a model process (the Python backend's stub) again when one dies
(killed, out of memory): its requests then fail with "Stub process is not healthy" while the model
still reads as ready, and loading the model again through Triton's repository API hangs on the dead
instance (Triton 2.51). So a watchdog sees a stub go, or the server itself crash (a dead stub can
abort it), and restarts the server on the same ports (a few seconds; requests meanwhile are refused).

What a server leaves in the file system carries the process id of its owner (the process that
started it): its temporary folder <tmp>/deeplab-triton-<pid>-*, the Python backend's shared memory
/dev/shm/deeplab_triton_<pid>_* (one region per model instance). Both are removed when the server
stops, and those of an owner that no longer runs (killed with SIGKILL) at the next start.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from runtime.output_files import process_running

from .contract import MODEL_NAME
from .repository import SITE_ENV

#: The wheel that carries a CPU-capable tritonserver with the Python backend.
SERVER_WHEEL = "nvidia-pytriton==0.7.0"
#: The served model's environment for the wheel's server (its Python backend needs numpy < 2); the
#: same releases tests/numpy_floor.sh runs the runtime on.
MODEL_ENV_PACKAGES = ("numpy==1.26.4", "opencv-python-headless==4.11.0.86", "onnxruntime==1.20.1")
NGC_SERVER = Path("/opt/tritonserver/bin/tritonserver")
HOST = "127.0.0.1"
#: Names of what a server started here leaves behind, each with its owner's process id (see the
#: module's docstring): the temporary folder, and the prefix given to the Python backend's shared
#: memory regions (shm-region-prefix-name; the backend appends a UUID per region).
TEMP_PREFIX = "deeplab-triton-"
SHM_PREFIX = "deeplab_triton_"
SHM_DIR = Path("/dev/shm")
_OWNED = {"temp": re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-"), "shm": re.compile(re.escape(SHM_PREFIX) + r"(\d+)_"),
          "staging": re.compile(r"\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")}


class ServerError(RuntimeError):
    """The server could not be found, prepared or started, with the reason."""


def cache_dir() -> Path:
    """triton/ in the toolkit's cache folder, the one the CRF's compiled kernels use
    (crf.cpu_library.cache_dir(): default ~/.cache/deeplab-v1-toolkit)."""
    from crf.cpu_library import cache_dir as toolkit_cache

    return toolkit_cache() / "triton"


def _pip_install_once(target: Path, packages, no_deps: bool) -> Path:
    """pip install --target into a temporary folder renamed to ``target`` (kept for later runs)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Named with this process's id: a later start removes it should this process be killed meanwhile.
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--target", str(staging)]
    cmd += (["--no-deps"] if no_deps else []) + list(packages)
    print(f"installing {' '.join(packages)} into {target} (once)", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise ServerError(f"pip could not install {' '.join(packages)}:\n{done.stdout[-2000:]}")
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _version_tag() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def model_env(folder: str | None = None) -> Path:
    """The folder of the served model's packages: ``folder``, else the cached one (made on first use)."""
    if folder:
        path = Path(folder)
        if not path.is_dir():
            raise ServerError(f"--model-env {folder}: no such folder")
        return path
    key = "-".join(p.replace("==", "") for p in MODEL_ENV_PACKAGES)
    return _pip_install_once(cache_dir() / f"model-env-py{_version_tag()}-{key}", MODEL_ENV_PACKAGES, no_deps=False)


@dataclass
class ServerInstall:
    """Where a tritonserver is and what it needs: the binary, its backends folder (None: its own
    default), library folders, and whether it is the wheel's (which needs the model's environment)."""

    binary: Path
    backends: Path | None = None
    libraries: list = field(default_factory=list)
    wheel_root: Path | None = None  # the wheel's site folder holding pytriton/ and nvidia_pytriton.libs/


def _wheel_install(site: Path) -> ServerInstall | None:
    binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return ServerInstall(binary, libraries=[site / "nvidia_pytriton.libs"], wheel_root=site)


def _as_install(binary: Path) -> ServerInstall:
    """A tritonserver binary: the wheel's layout (pytriton/tritonserver/bin) or a server tree's (<root>/bin)."""
    binary = binary.resolve()
    if binary.parent.parent.name == "tritonserver" and binary.parent.parent.parent.name == "pytriton":
        found = _wheel_install(binary.parents[3])
        if found is not None:
            return found
    backends = binary.parent.parent / "backends"
    return ServerInstall(binary, backends if backends.is_dir() else None)


def find_server(path: str | None = None, install: bool = True) -> ServerInstall:
    """The tritonserver to run (the order is in the module's docstring); ServerError when there is none."""
    if path:
        p = Path(path)
        if p.is_dir():
            p = p / "bin" / "tritonserver"
        if not p.is_file() or not os.access(p, os.X_OK):
            raise ServerError(f"--tritonserver {path}: not an executable tritonserver")
        return _as_install(p)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _as_install(Path(on_path))
    if NGC_SERVER.is_file():
        return _as_install(NGC_SERVER)
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.origin:
        found = _wheel_install(Path(spec.origin).parents[1])
        if found is not None:
            return found
    cached = cache_dir() / f"server-{SERVER_WHEEL.replace('==', '-')}"
    if not cached.is_dir() and not install:
        raise ServerError(f"no tritonserver found (--tritonserver, PATH, {NGC_SERVER}, {SERVER_WHEEL})")
    found = _wheel_install(_pip_install_once(cached, [SERVER_WHEEL], no_deps=True))
    if found is None:
        raise ServerError(f"{SERVER_WHEEL} installed into {cached} holds no tritonserver")
    return found


def _wheel_backends(install: ServerInstall, into: Path) -> Path:
    """A backends folder for the wheel's server: its Python backend plus the stub built for this
    Python (the wheel keeps one stub per Python version)."""
    assert install.wheel_root is not None
    server = install.wheel_root / "pytriton" / "tritonserver"
    stub = server / "python_backend_stubs" / _version_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"{SERVER_WHEEL} has no Python backend stub for Python {_version_tag()}")
    python = into / "python"
    python.mkdir(parents=True)
    for item in (server / "backends" / "python").iterdir():
        if item.name != "__pycache__":
            os.symlink(item, python / item.name)
    os.symlink(stub, python / stub.name)
    return into


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _paths_in_use() -> str:
    """The command lines and memory maps of every process we can read, as one text: a path in it
    is in use (a server's folder on its command line, a shared memory region mapped)."""
    parts = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            for name in ("cmdline", "maps"):
                try:
                    with open(f"/proc/{entry}/{name}", "rb") as f:
                        parts.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
    return "\n".join(parts)


def remove_stale() -> list:
    """Remove what servers started here left behind when their owner no longer runs: temporary
    folders, shared memory regions, and pip's staging folders in the cache. Never what a running
    owner holds, nor a path a running process still uses (a server still shutting down). Returns
    the paths removed."""
    places = [(Path(tempfile.gettempdir()), _OWNED["temp"]), (SHM_DIR, _OWNED["shm"])]
    with contextlib.suppress(ImportError):
        places.append((cache_dir(), _OWNED["staging"]))
    candidates = []
    for folder, pattern in places:
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                m = pattern.match(entry.name)
                owner = int(m.group(1)) if m else 0
                if owner > 0 and owner != os.getpid() and not process_running(owner):
                    candidates.append(entry)
    if not candidates:
        return []
    in_use = _paths_in_use()
    removed = []
    for path in candidates:
        if str(path) in in_use:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _remove_regions(prefix: str) -> None:
    """The shared memory regions of one server (named with its own prefix), once it has ended."""
    with contextlib.suppress(OSError):
        for entry in SHM_DIR.iterdir():
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    entry.unlink()


STUB_NAME = "triton_python_backend_stub"


def stub_processes(server_pid: int) -> list:
    """Process ids of the Python-backend stubs (model processes) the server ``server_pid`` runs (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == server_pid and os.path.basename(argv0).decode(errors="replace") == STUB_NAME:
            found.append(int(entry))
    return found


@dataclass
class TritonServer:
    """A running server: its process, endpoints, log file and the temporary folder it owns.
    ``restarts`` counts the restarts of the watchdog after a model process died."""

    process: subprocess.Popen | None
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    workdir: Path
    command: list = field(default_factory=list, repr=False)
    env: dict = field(default_factory=dict, repr=False)
    timeout: float = 300.0
    restarts: int = 0
    shm_prefix: str = ""  # the Python backend's shared memory regions are /dev/shm/<shm_prefix>*
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _watchdog: threading.Thread | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


#: exit statuses of a server that was stopped on purpose (SIGTERM, SIGINT) or ended cleanly: not restarted
_STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)


def _watch(server: TritonServer, interval: float = 0.5) -> None:
    """Restart the server whenever fewer stub processes run than after the last start, or the
    server itself crashed (a dead stub can take the server down with it, SIGABRT, before the
    stub's absence is seen)."""
    expected = len(stub_processes(server.process.pid))
    while not server._stop.wait(interval):
        status = server.process.poll()
        if status in _STOPPED:
            return
        if status is None:
            running = len(stub_processes(server.process.pid))
            if running >= expected:
                continue
            why = f"a model process of {MODEL_NAME!r} died ({running} of {expected} running)"
        else:
            why = f"the server crashed (exit status {status})"
        if server._stop.is_set():
            return
        print(f"{why}: restarting the server", file=sys.stderr, flush=True)
        _end_process_group(server.process, 2.0)  # it would wait out its exit timeout on the dead stub
        _remove_regions(server.shm_prefix)  # what a server killed outright leaves
        try:
            _launch(server)
            _wait_ready(server)
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return
        server.restarts += 1
        expected = len(stub_processes(server.process.pid))


def _ready(server: TritonServer) -> bool:
    url = f"http://{server.http_url}/v2/models/{MODEL_NAME}/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server(repo, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, tritonserver: str | None = None,
                 model_env_dir: str | None = None, timeout: float = 300.0, watchdog: bool = True) -> TritonServer:
    """Start tritonserver on ``repo`` bound to 127.0.0.1 and wait until model "deeplab" is ready.
    watchdog: restart the server when one of the model's processes dies (see the module's docstring).
    Raises ServerError (with the server's last log lines when it started and died)."""
    repo = Path(repo)
    if not (repo / MODEL_NAME / "config.pbtxt").is_file():
        raise ServerError(f"{repo}: not a repository with model {MODEL_NAME!r} "
                          "(write one with deeplab-triton-repo MODEL --out DIR)")
    ports = {}
    for name, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        if port is not None and not _port_free(port):
            raise ServerError(f"--{name}-port {port}: in use on {HOST}")
        ports[name] = port
    taken = {p for p in ports.values() if p is not None}
    if len(taken) < sum(p is not None for p in ports.values()):
        raise ServerError("the http, grpc and metrics ports must differ")
    for name in ports:
        while ports[name] is None:
            p = free_port()
            if p not in taken:
                ports[name] = p
                taken.add(p)
    for path in remove_stale():
        print(f"removed {path} (its owner no longer runs)", file=sys.stderr, flush=True)
    install = find_server(tritonserver)
    env = dict(os.environ)
    workdir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}_"
    try:
        backends = install.backends
        libraries = [str(p) for p in install.libraries]
        if install.wheel_root is not None:
            backends = _wheel_backends(install, workdir / "backends")
            # The stub embeds libpython of this Python's version: take this Python's own where it has one.
            libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
            if libdir and soname and (Path(libdir) / soname).is_file():
                libraries.append(libdir)
            env[SITE_ENV] = str(model_env(model_env_dir))
        elif model_env_dir:
            env[SITE_ENV] = str(model_env(model_env_dir))
        if libraries:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        cmd = [str(install.binary), "--model-repository", str(repo.resolve()),
               "--http-address", HOST, "--http-port", str(ports["http"]),
               "--grpc-address", HOST, "--grpc-port", str(ports["grpc"]),
               "--metrics-address", HOST, "--metrics-port", str(ports["metrics"]),
               "--exit-timeout-secs", "10",
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
        if backends is not None:
            cmd += ["--backend-directory", str(backends)]
        server = TritonServer(None, ports["http"], ports["grpc"], ports["metrics"], workdir / "tritonserver.log",
                              workdir, cmd, env, timeout, shm_prefix=shm_prefix)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        _launch(server)
        _wait_ready(server)
    except BaseException:
        stop_server(server)
        raise
    if watchdog and os.path.isdir("/proc"):
        server._watchdog = threading.Thread(target=_watch, args=(server,), name="triton-watchdog", daemon=True)
        server._watchdog.start()
    return server


def _die_with_parent() -> None:
    """In the server's process before exec (Linux): SIGTERM it when the thread that started it ends
    (deeplab-serve or a test run killed outright), so no server is left holding the ports. The watchdog
    thread, which restarts the server, lives as long as the server does."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop_server still ends it


def _launch(server: TritonServer) -> None:
    """Start the server's command (again), its output appended to its log."""
    with open(server.log_path, "ab") as log:
        # Its own process group: _end_process_group ends the server's model processes with it.
        server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=server.env, start_new_session=True,
                                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _wait_ready(server: TritonServer) -> None:
    deadline = time.monotonic() + server.timeout
    while not _ready(server):
        if server.process.poll() is not None:
            raise ServerError(f"tritonserver exited with status {server.process.returncode} before model "
                              f"{MODEL_NAME!r} was ready; its log ends:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise ServerError(f"model {MODEL_NAME!r} not ready after {server.timeout:.0f} s; the server's log "
                              f"ends:\n{server.log_tail()}")
        time.sleep(0.25)


def _end_process_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; then whatever is left of the process group it
    leads (the model's stub processes)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group the server led: stubs it left behind


def stop_server(server: TritonServer, timeout: float = 20.0) -> int | None:
    """Stop the watchdog and the server (SIGTERM, SIGKILL after ``timeout``, then its model
    processes); its temporary folder and shared memory are removed (a server killed outright
    leaves its regions). Returns the server's exit status."""
    server._stop.set()
    if server._watchdog is not None:
        server._watchdog.join(server.timeout)
    if server.process is not None:
        _end_process_group(server.process, timeout)
    if server.shm_prefix:
        _remove_regions(server.shm_prefix)
    shutil.rmtree(server.workdir, ignore_errors=True)
    return None if server.process is None else server.process.returncode


def wait(server: TritonServer) -> int | None:
    """Block until the server has ended for good (the watchdog may be restarting it); its exit status."""
    while server.process.poll() is None or (server._watchdog is not None and server._watchdog.is_alive()):
        time.sleep(0.5)
    return server.process.returncode
