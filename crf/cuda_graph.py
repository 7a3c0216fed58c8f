"""CUDA graphs for the CRF's repeated launches, through the CUDA driver API (libcuda, by ctypes).

pycuda has no graph API, so this calls the driver directly (the same library pycuda loaded):
stream capture records the launches made on a stream into a graph, which is instantiated once and
then replayed with one ``cuGraphLaunch`` per mean-field iteration instead of 12 kernel launches
(the host work per launch is what a 2 ms CRF cannot afford ~170 times). Every failure is a
``CudaGraphError``; GPUKernels.capture() then falls back to plain launches with one warning.

Symbols used and the CUDA version that has them: cuStreamBeginCapture_v2, cuStreamEndCapture,
cuGraphLaunch, cuGraph(Exec)Destroy, cuGraphGetNodes, cuGraphNodeGetType (10.1);
cuGraphInstantiateWithFlags (11.4); cuGraphKernelNodeGetParams_v2 (12.0, else the v1 entry point
with the same leading fields); cuFuncGetName (12.3, kernel names for the checks only).
"""
from __future__ import annotations

import ctypes
import sys
from typing import Callable, List, Optional, Tuple

CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1  # other threads' CUDA calls are not disturbed by this capture
CU_GRAPH_NODE_TYPE_KERNEL = 0

_c_p = ctypes.c_void_p


class CudaGraphError(RuntimeError):
    """A graph could not be captured, instantiated or launched; the message has the driver's error."""


class _KernelNodeParams(ctypes.Structure):
    # CUDA_KERNEL_NODE_PARAMS_v2 (cuda.h); v1 is the same without the last two fields.
    _fields_ = [("func", _c_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint),
                ("kernelParams", _c_p), ("extra", _c_p), ("kern", _c_p), ("ctx", _c_p)]


_lib: Optional[ctypes.CDLL] = None


def _libcuda() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise CudaGraphError(f"the CUDA driver library {name} cannot be loaded: {e}") from e
        sigs = {
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "cuStreamBeginCapture_v2": [_c_p, ctypes.c_int],
            "cuStreamEndCapture": [_c_p, ctypes.POINTER(_c_p)],
            "cuGraphInstantiateWithFlags": [ctypes.POINTER(_c_p), _c_p, ctypes.c_ulonglong],
            "cuGraphLaunch": [_c_p, _c_p],
            "cuGraphExecDestroy": [_c_p],
            "cuGraphDestroy": [_c_p],
            "cuGraphGetNodes": [_c_p, ctypes.POINTER(_c_p), ctypes.POINTER(ctypes.c_size_t)],
            "cuGraphNodeGetType": [_c_p, ctypes.POINTER(ctypes.c_int)],
        }
        for fn, argtypes in sigs.items():
            try:
                f = getattr(lib, fn)
            except AttributeError as e:
                raise CudaGraphError(f"the CUDA driver has no {fn} (driver too old for CUDA graphs)") from e
            f.argtypes, f.restype = argtypes, ctypes.c_int
        _lib = lib
    return _lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _libcuda().cuGetErrorName(result, ctypes.byref(name))
        raise CudaGraphError(f"{what} failed: {(name.value or b'?').decode()} ({result})")


class CapturedGraph:
    """An instantiated graph: ``launch(stream)`` replays it; destroyed with the object."""

    def __init__(self, graph: _c_p, exe: _c_p, lib: ctypes.CDLL):
        self._graph, self._exe, self._lib = graph, exe, lib

    def launch(self, stream_handle: int) -> None:
        _check(self._lib.cuGraphLaunch(self._exe, _c_p(stream_handle)), "cuGraphLaunch")

    def kernel_nodes(self) -> List[Tuple[Optional[str], int, int]]:
        """(kernel name or None where the driver cannot tell, grid x, block x) of every kernel node,
        sorted (a captured stream is a chain, but the driver lists nodes in no promised order)."""
        lib, n = self._lib, ctypes.c_size_t(0)
        _check(lib.cuGraphGetNodes(self._graph, None, ctypes.byref(n)), "cuGraphGetNodes")
        nodes = (_c_p * max(1, n.value))()
        _check(lib.cuGraphGetNodes(self._graph, nodes, ctypes.byref(n)), "cuGraphGetNodes")
        get_params = getattr(lib, "cuGraphKernelNodeGetParams_v2", None) or lib.cuGraphKernelNodeGetParams
        get_params.argtypes, get_params.restype = [_c_p, ctypes.POINTER(_KernelNodeParams)], ctypes.c_int
        get_name = getattr(lib, "cuFuncGetName", None)
        if get_name is not None:
            get_name.argtypes, get_name.restype = [ctypes.POINTER(ctypes.c_char_p), _c_p], ctypes.c_int
        out: List[Tuple[Optional[str], int, int]] = []
        for i in range(n.value):
            kind = ctypes.c_int(-1)
            _check(lib.cuGraphNodeGetType(nodes[i], ctypes.byref(kind)), "cuGraphNodeGetType")
            if kind.value != CU_GRAPH_NODE_TYPE_KERNEL:
                raise CudaGraphError(f"captured node {i} is not a kernel (type {kind.value})")
            p = _KernelNodeParams()
            _check(get_params(nodes[i], ctypes.byref(p)), "cuGraphKernelNodeGetParams")
            name = None
            if get_name is not None and p.func:
                s = ctypes.c_char_p()
                if get_name(ctypes.byref(s), p.func) == 0 and s.value:
                    name = s.value.decode()
            out.append((name, int(p.gridDimX), int(p.blockDimX)))
        return sorted(out, key=lambda t: (t[0] or "", t[1], t[2]))

    def __del__(self) -> None:
        try:
            if self._exe:
                self._lib.cuGraphExecDestroy(self._exe)
            if self._graph:
                self._lib.cuGraphDestroy(self._graph)
            self._exe = self._graph = _c_p()  # NULL: destroyed
        except Exception:  # interpreter shutdown: the driver or this module's globals may be gone
            pass


def capture_launches(stream_handle: int, launches: List[Callable[[], None]]) -> CapturedGraph:
    """Record ``launches`` (each launches kernels on the stream) into one instantiated graph.
    The context that owns the stream must be current. Nothing runs on the device until launch()."""
    if not stream_handle:
        raise CudaGraphError("the legacy default stream (0) cannot be captured")
    lib = _libcuda()
    stream = _c_p(stream_handle)
    _check(lib.cuStreamBeginCapture_v2(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture")
    graph = _c_p()
    try:
        for launch in launches:
            launch()
    except Exception as e:
        lib.cuStreamEndCapture(stream, ctypes.byref(graph))  # ends the (invalidated) capture
        if graph:
            lib.cuGraphDestroy(graph)
        raise CudaGraphError(f"a launch failed while capturing: {e}") from e
    _check(lib.cuStreamEndCapture(stream, ctypes.byref(graph)), "cuStreamEndCapture")
    exe = _c_p()
    result = lib.cuGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0)
    if result != 0:
        lib.cuGraphDestroy(graph)
        _check(result, "cuGraphInstantiateWithFlags")
    return CapturedGraph(graph, exe, lib)
