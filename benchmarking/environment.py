"""What a timing was measured on: CPU, its ISA flags, cores, OS, library versions, GPU, load.

``environment()`` returns a JSON-ready dict; every probe that cannot answer here (no /proc/cpuinfo,
no nvidia-smi, no pycuda, no TensorRT) gives None rather than failing, so a report is always
written. Nothing here changes any setting.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

#: ISA extensions that decide how fast the network's convolutions and the CRF run: AVX2 + FMA
#: (x86 baseline for ONNX Runtime's fast kernels), AVX-512F and VNNI (INT8 dot products), and
#: ASIMD (ARM's NEON, as /proc/cpuinfo names it on aarch64).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "asimd")


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    try:
        return path.read_text() if path.is_file() else ""
    except OSError:
        return ""


def _field(cpuinfo: str, *names: str) -> str | None:
    """The value of the first line 'name : value' of /proc/cpuinfo for any of names."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return None


def cpu_flags() -> str:
    """This CPU's feature list from /proc/cpuinfo (x86 `flags`, ARM `Features`; '' where there is none)."""
    return _field(_cpuinfo(), "flags", "Features") or ""


def isa_flags(flags: str) -> dict[str, bool] | None:
    """Which of ISA_FLAGS a feature list names; None when the list is unknown (no /proc/cpuinfo)."""
    if not flags:
        return None
    present = set(flags.split())
    found = {f: f in present for f in ISA_FLAGS}
    found["asimd"] = found["asimd"] or "neon" in present  # 32-bit ARM kernels say neon
    return found


def cpu_model() -> str | None:
    info = _cpuinfo()
    name = _field(info, "model name", "Hardware", "Model")  # x86; ARM boards name the SoC or board
    return name or platform.processor() or platform.machine() or None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu() -> dict:
    """GPU name, driver and CUDA versions from nvidia-smi where it is on PATH, else from pycuda
    where it imports (without creating a context); None for what neither can tell."""
    info: dict = {"gpu": None, "compute_capability": None, "nvidia_driver": None, "cuda_driver_api": None,
                  "pycuda": None}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if smi:
        name, _, driver = smi.splitlines()[0].rpartition(",")
        info["gpu"], info["nvidia_driver"] = name.strip() or None, driver.strip() or None
        header = _run(["nvidia-smi"]) or ""
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
        info["cuda_driver_api"] = match.group(1) if match else None
    try:
        import pycuda  # noqa: F401  (only its version here; the context is crf.gpu_kernels')
    except Exception:  # not installed, or built against a CUDA that is missing
        return info
    info["pycuda"] = getattr(pycuda, "VERSION_TEXT", None)
    from crf.gpu_kernels import gpu_identity, import_pycuda

    identity = gpu_identity()
    if identity is not None:
        info["gpu"] = info["gpu"] or identity.name
        info["compute_capability"] = identity.compute_capability
        try:
            v = import_pycuda().get_driver_version()
            info["cuda_driver_api"] = info["cuda_driver_api"] or f"{v // 1000}.{v % 1000 // 10}"
        except Exception:  # a driver pycuda cannot ask
            pass
    return info


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, None where the real library is absent (type stubs are not it)."""
    from runtime.errors import TensorRTUnavailable
    from runtime.trt_compat import load_tensorrt

    try:
        return str(load_tensorrt().__version__)
    except TensorRTUnavailable:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on Windows
        return None


def environment() -> dict:
    import cv2
    import numpy as np
    import onnxruntime as ort

    flags = cpu_flags()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu_model(),
        "isa": isa_flags(flags),
        "logical_cores": os.cpu_count(),
        "cores_usable": usable,
        "load_average": load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": list(ort.get_available_providers()),
        "opencv": cv2.__version__,
        **gpu(),
        "tensorrt": tensorrt_version(),
    }
