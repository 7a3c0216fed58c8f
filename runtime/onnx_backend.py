"""The ONNX Runtime network backend: runs an exported DeepLab graph on the CPU or with the CUDA
execution provider (onnxruntime-gpu).

Two ways to run (see runtime/network.py for the interface):
- ``__call__(batch)``: ``session.run``, scores returned as a numpy array (the host path);
- ``run_into(batch)``, with ``kernels`` (the CRF's KernelBackend): an I/O-binding run that writes
  the scores into a Buffer of ``kernels``. With CUDA (``cuda=True``), the batch is copied from a
  pinned staging array into a device buffer and the CUDA provider runs on the kernels' stream
  (provider option ``user_compute_stream``, onnxruntime-gpu 1.18 or newer), so upload, network
  and the CRF after it are ordered on that one stream. On the CPU (``kernels=CPUKernels()``) the
  same binding code binds the batch and a host buffer of the CPU kernels ('cpu' device type):
  that is how the device pipeline runs, and is tested, without a GPU.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from crf.kernel_interface import Buffer, BufferPool, KernelBackend

from .errors import BackendUnavailable, ModelFormatError, OutOfDeviceMemory
from .network import batch_dims

INPUT_NAME = "image"
OUTPUT_NAME = "scores"


class ModelMetadata(NamedTuple):
    """What an exported model's metadata_props say about its labels (each None where absent)."""

    num_classes: Optional[int]        # deeplab_config's "num_classes"
    class_names: Optional[List[str]]
    palette: Optional[np.ndarray]     # K x 3 uint8 RGB rows


def _clip(text: object, limit: int = 80) -> str:
    """A metadata value as quoted in a message: repr, cut to ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def metadata_json(metadata: Dict[str, str], key: str, source: object, expected: type, what: str) -> Any:
    """The JSON value of metadata entry ``key`` (None when there is none). ModelFormatError naming
    ``source`` and the key when it is not JSON or not ``expected`` (``what`` says what it must be)."""
    if key not in metadata:
        return None
    text = metadata[key]
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as e:  # TypeError: a value that is not a string at all
        raise ModelFormatError(f"{source}: metadata '{key}' is not JSON ({e}): {_clip(text)}") from e
    if not isinstance(value, expected):
        raise ModelFormatError(f"{source}: metadata '{key}' must be {what}, found {type(value).__name__} "
                               f"{_clip(value)}")
    return value


def class_names_problem(names: list) -> Optional[str]:
    """What is wrong with a list of class names (None when every one is a string)."""
    bad = next((i for i, n in enumerate(names) if not isinstance(n, str)), None)
    if bad is None:
        return None
    return f"must be a list of strings, found {type(names[bad]).__name__} {_clip(names[bad])} at index {bad}"


def palette_problem(rows: list) -> Optional[str]:
    """What is wrong with a palette as JSON carries it (None when it is [R, G, B] rows of whole
    numbers 0..255). Checked element by element: numpy would take strings, bools and ragged rows."""
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3
                and all(type(v) is int and 0 <= v <= 255 for v in row)):  # type(): no bools
            return f"must be a list of [R, G, B] rows of whole numbers 0..255, found {_clip(row)} at index {i}"
    return None


def parse_metadata(metadata: Dict[str, str], source: object) -> ModelMetadata:
    """The class count, class names and palette in an exported model's metadata_props (JSON
    strings, as export/onnx_export.py writes them). ModelFormatError naming ``source`` and the key
    for an entry that is not JSON or not of its type: deeplab_config an object whose num_classes,
    where given, is a whole number >= 1; class_names a list of strings; palette [R, G, B] rows."""
    config = metadata_json(metadata, "deeplab_config", source, dict, "a JSON object")
    n = None if config is None else config.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ModelFormatError(f"{source}: metadata 'deeplab_config': num_classes must be a whole number >= 1, "
                               f"found {_clip(n)}")
    names = metadata_json(metadata, "class_names", source, list, "a JSON list of strings")
    problem = class_names_problem(names) if names is not None else None
    if problem:
        raise ModelFormatError(f"{source}: metadata 'class_names' {problem}")
    rows = metadata_json(metadata, "palette", source, list, "a JSON list of [R, G, B] rows")
    problem = palette_problem(rows) if rows is not None else None
    if problem:
        raise ModelFormatError(f"{source}: metadata 'palette' {problem}")
    palette = None if rows is None else np.array(rows, np.uint8).reshape(-1, 3)
    return ModelMetadata(n, names, palette)


CUDA_PROVIDER = "CUDAExecutionProvider"
# The CUDA provider's option parser knows user_compute_stream from 1.18 on; 1.17 refuses the
# session, and onnxruntime's Python fallback then retries without any options, on its own stream.
MIN_CUDA_STREAM_VERSION = (1, 18)


def cuda_provider_missing() -> Optional[str]:
    """Why this onnxruntime build has no CUDA provider at all (None when it has one): a CPU-only
    onnxruntime is what was installed, not something that failed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_PROVIDER in available:
        return None
    return (f"ONNX Runtime's {CUDA_PROVIDER} is not in this onnxruntime build (providers: {', '.join(available)}); "
            "install onnxruntime-gpu instead of onnxruntime")


def cuda_provider_too_old(version: str) -> Optional[str]:
    """Why onnxruntime-gpu ``version`` cannot run on the CRF's stream (None when it can)."""
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < MIN_CUDA_STREAM_VERSION:
        return (f"onnxruntime-gpu {version} cannot run on the CRF's stream (the provider option "
                "user_compute_stream needs onnxruntime-gpu 1.18 or newer)")
    return None


def cuda_provider_problem() -> Optional[str]:
    """Why ONNX Runtime's CUDA provider cannot be asked for here (None when it is in this build
    and new enough to run on the CRF's stream)."""
    import onnxruntime as ort

    return cuda_provider_missing() or cuda_provider_too_old(ort.__version__)


def check_user_stream_taken(provider_options: Dict[str, Dict[str, str]], path: object) -> None:
    """Refuse a session whose CUDA provider does not run on the stream it was given: the upload
    queued on that stream could still be in flight when the provider reads the input. onnxruntime
    drops all provider options silently when a first attempt fails (its Python fallback)."""
    taken = provider_options.get(CUDA_PROVIDER, {}).get("has_user_compute_stream")
    if taken != "1":
        raise BackendUnavailable(
            f"ONNX Runtime ignored the CUDA provider options (user_compute_stream) for {path}: it would not "
            f"run on the CRF's stream (has_user_compute_stream={taken!r}; onnxruntime-gpu 1.18 or newer "
            "takes the option, and its log above says why the first attempt failed)")


def _out_of_memory(e: Exception) -> bool:
    # onnxruntime reports allocation failures as its generic RuntimeException; the text is all there is
    text = str(e)
    return "out of memory" in text or "Failed to allocate" in text


class OnnxRuntimeNetwork:
    """uint8 N x H x W x 3 BGR batch -> float32 N x C x H x W upsampled class scores.

    cuda: run with the CUDA provider (onnxruntime-gpu 1.18 or newer) on ``kernels`` (default: a
    new ``GPUKernels()``) and its stream; BackendUnavailable says why when the provider or pycuda
    cannot run. kernels (CPU kernels, without cuda): enable ``run_into`` on the CPU (the
    I/O-binding path). providers: ONNX Runtime's provider list for the host path (default: the
    CPU); not with cuda, which sets its own."""

    name = "onnxruntime"
    #: any size runs (the graph's H and W are dynamic)
    size_bounds = None

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 cuda: bool = False, kernels: Optional[KernelBackend] = None):
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {p}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if cuda and providers:
            raise ValueError(f"cuda=True runs the {CUDA_PROVIDER} on the CRF's stream with its own provider "
                             f"list; leave providers out (got {providers})")
        session_providers: list = providers or ["CPUExecutionProvider"]
        self.device_id = 0
        if cuda:
            problem = cuda_provider_problem()
            if problem:
                raise BackendUnavailable(problem)
            if kernels is None:
                from crf.gpu_kernels import GPUKernels

                kernels = GPUKernels()  # BackendUnavailable naming what is missing (pycuda, GPU, nvcc)
            if kernels.name != "gpu":
                raise ValueError(f"the CUDA provider writes GPU memory: it needs GPU kernels, not {kernels.name!r}")
            self.device_id = int(getattr(kernels, "device", 0))
            # the CRF's stream: upload, network and CRF ordered on one stream
            cuda_options = {"device_id": str(self.device_id),
                            "user_compute_stream": str(getattr(kernels, "stream").handle)}
            session_providers = [(CUDA_PROVIDER, cuda_options), "CPUExecutionProvider"]
            self.name = "onnxruntime-cuda"
        elif kernels is not None and kernels.name != "cpu":
            raise ValueError(f"the CPU provider writes host memory: run_into on the CPU needs CPU kernels, "
                             f"not {kernels.name!r} (pass cuda=True for the GPU)")
        self.kernels = kernels
        self._device_type = "cuda" if cuda else "cpu"
        self._pool = BufferPool(kernels) if kernels is not None else None
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=session_providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid files
            raise ModelFormatError(f"{p} is not a loadable ONNX model: {e}") from e
        if cuda and CUDA_PROVIDER not in self.session.get_providers():
            raise BackendUnavailable(f"ONNX Runtime did not start its {CUDA_PROVIDER} for {p} (CUDA or cuDNN "
                                     f"libraries missing? providers in use: {self.session.get_providers()})")
        if cuda:
            check_user_stream_taken(self.session.get_provider_options(), p)
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if (len(ins) != 1 or ins[0].name != INPUT_NAME or ins[0].type != "tensor(uint8)"
                or len(ins[0].shape) != 4 or ins[0].shape[3] != 3):
            found = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in ins)
            raise ModelFormatError(
                f"{p} is not a DeepLab graph from this toolkit: expected one input "
                f"'{INPUT_NAME}' uint8 [N, H, W, 3] (BGR), found {found}; export it with deeplab-export")
        if len(outs) != 1 or len(outs[0].shape) != 4:
            found = ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outs)
            raise ModelFormatError(f"{p}: expected one output N x C x H x W, found {found}")
        if kernels is not None and outs[0].type != "tensor(float)":
            raise ModelFormatError(f"{p}: output '{outs[0].name}' is {outs[0].type}; writing scores into the CRF's "
                                   "buffers needs float32 (tensor(float)), as deeplab-export exports")
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        labels = parse_metadata(self.metadata, p)  # ModelFormatError naming the file and the key
        c = outs[0].shape[1]
        if not isinstance(c, int):
            c = labels.num_classes
        if not isinstance(c, int):
            raise ModelFormatError(f"{p}: cannot tell the number of classes")
        self.num_classes = c
        #: (N, H, W) of the input where the graph fixes them, else None per axis.
        self.fixed_input_dims = tuple(d if isinstance(d, int) else None for d in ins[0].shape[:3])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._device_type == "cuda":
            assert self.kernels is not None
            buf, shape = self.run_into(batch)
            return self.kernels.download(buf, shape, np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def _buffer(self, role: str, nbytes: int) -> Buffer:
        """A kernels buffer of at least nbytes, kept and reused (grown when a batch is larger)."""
        assert self._pool is not None
        return self._pool.device(role, nbytes)

    def _stage(self, batch: np.ndarray) -> np.ndarray:
        """The batch copied into pinned host memory (kept and reused), the source of an async upload."""
        assert self.kernels is not None and self._pool is not None
        # the previous call's upload from this memory must be over before it is rewritten
        self.kernels.synchronize()
        view = self._pool.host("staging", batch.shape, np.uint8)
        view[...] = batch
        return view

    def run_into(self, batch: np.ndarray) -> Tuple[Buffer, Tuple[int, int, int, int]]:
        """Scores of a uint8 N x H x W x 3 batch written into a Buffer of ``kernels`` (see
        runtime/network.py); the Buffer is reused by the next call. Out of memory raises
        OutOfDeviceMemory; the network stays usable."""
        if self.kernels is None:
            raise RuntimeError("run_into needs the CRF's kernels: OnnxRuntimeNetwork(path, kernels=...) "
                               "or cuda=True")
        batch = np.ascontiguousarray(batch, np.uint8)
        n, h, w = batch_dims(batch)
        shape = (n, self.num_classes, h, w)
        try:
            with self.kernels.active():
                out = self._buffer("scores", n * self.num_classes * h * w * 4)
                if self._device_type == "cuda":
                    src = self._buffer("image", batch.nbytes)
                    self.kernels.upload_async(src, self._stage(batch))
                    self.kernels.mark("upload")
                    ptr = src.ptr
                else:
                    ptr = batch.ctypes.data  # ONNX Runtime reads the caller's batch in place
                binding: Any = self.session.io_binding()
                binding.bind_input(INPUT_NAME, self._device_type, self.device_id, np.uint8, list(batch.shape), ptr)
                binding.bind_output(OUTPUT_NAME, self._device_type, self.device_id, np.float32, list(shape), out.ptr)
                self.session.run_with_iobinding(binding)
                self.kernels.mark("network")
        except OutOfDeviceMemory:
            raise
        except Exception as e:  # onnxruntime's own exception types
            if _out_of_memory(e):
                raise OutOfDeviceMemory(f"{self.name}: out of memory running a {n}x{h}x{w} batch: {e}") from e
            raise
        return out, shape


def read_model_metadata(path: str | Path) -> Dict[str, str]:
    """The metadata_props an exported ONNX carries (class names, palette, model config), read with
    ONNX Runtime where the onnx package is not installed; ModelFormatError for a file that is not one
    of our models, or whose entries are not what parse_metadata takes."""
    return OnnxRuntimeNetwork(path).metadata
