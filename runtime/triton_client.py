"""``TritonSegmenter``: the Segmenter's call and result, answered by a Triton server.

    from runtime.triton_client import TritonSegmenter
    seg = TritonSegmenter("127.0.0.1:8000")              # protocol="grpc" with the gRPC port
    result = seg("samples/scene_0.png")                   # runtime.Segmentation, as Segmenter gives

Needs tritonclient (``pip install '.[serve]'``), imported when a TritonSegmenter is made. Tensor and
parameter names: runtime/triton_contract.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from crf import CRFParams

from .contract import as_bgr_uint8, load_image
from .palette import ClassAccessors, check_palette
from .segmenter import Segmentation
from .triton_contract import (INPUT_IMAGE, MODEL_NAME, OUTPUT_LABELS, OUTPUT_PROBABILITIES, PARAM_CRF,
                              TIMING_PARAMETERS, read_config_parameters)

_SERVER_DEFAULT = object()


class TritonServerError(RuntimeError):
    """The server refused or failed a request; the message is the server's. ``status``: the
    server's status as tritonclient gives it ("400" over HTTP, "StatusCode.INVALID_ARGUMENT" over
    gRPC: a request the model refuses; "503" / "StatusCode.UNAVAILABLE": the model was busy past
    its queue timeout, worth retrying), None where no answer came."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


def _stats_ms(before: dict, after: dict) -> dict:
    """Server-side milliseconds between two inference-statistics snapshots of the model."""
    def ns(stats: dict, name: str) -> int:
        return int(stats.get(name, {}).get("ns", 0))

    queue = ns(after, "queue") - ns(before, "queue")
    compute = sum(ns(after, k) - ns(before, k) for k in ("compute_input", "compute_infer", "compute_output"))
    return {"server_queue": queue / 1e6, "server_compute": compute / 1e6}


def _check_url(url: str) -> None:
    """host:port as the Triton clients take it; they would take "http://..." or a port out of range
    only to fail later with their own message (and a traceback from their destructor)."""
    host, sep, port = str(url).rpartition(":")
    if "://" in str(url) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url must be host:port without a scheme, e.g. 127.0.0.1:8000, got {url!r}")


class TritonSegmenter(ClassAccessors):
    """Segment images on a Triton server serving the model of tools/triton_repo.py.

    url: "host:port" of the server's HTTP or gRPC endpoint (``protocol`` "http" or "grpc").
    crf: the server's default CRF (the model's config) when not given; None turns it off;
    CRFParams replaces it for every request of this client. server_stats: add the server's queue
    and compute times to ``result.timings`` ("server_queue", "server_compute", ms) from the model's
    inference statistics read before and after each request. Those statistics are per model, summed
    over every client: they are this request's own only while no other client uses the model.
    ``result.timings["total"]`` is the client's wall time for the request; the server's stage times
    ("preprocess", "network", "crf", "postprocess") are added where its Python backend returns
    response parameters. class_names, palette, mask() and overlay() come from the model's config.
    """

    def __init__(self, url: str, protocol: str = "http", model: str = MODEL_NAME,
                 crf: Any = _SERVER_DEFAULT, server_stats: bool = False, timeout: float = 60.0):
        if protocol == "http":
            import tritonclient.http as client_module
        elif protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        from tritonclient.utils import InferenceServerException

        if crf is not _SERVER_DEFAULT and crf is not None and not isinstance(crf, CRFParams):
            raise TypeError(f"crf must be CRFParams or None, got {type(crf).__name__}")
        _check_url(url)
        self._module = client_module
        self._server_exception = InferenceServerException
        self.protocol, self.model, self.url = protocol, model, url
        self.timeout = float(timeout)
        self.server_stats = server_stats
        if protocol == "http":
            self._client = client_module.InferenceServerClient(url, network_timeout=self.timeout,
                                                              connection_timeout=self.timeout)
        else:
            self._client = client_module.InferenceServerClient(url)
        config = self._call(self._config)
        names, palette, defaults = read_config_parameters(config.get("parameters", {}))
        self.class_names = tuple(names)
        self.num_classes = len(self.class_names)
        self.palette = check_palette(palette, self.num_classes)
        self.crf_params = defaults if crf is _SERVER_DEFAULT else crf
        self._parameters: dict = {PARAM_CRF: self.crf_params is not None}
        if crf is not _SERVER_DEFAULT and crf is not None:  # the server's defaults go without saying
            self._parameters.update(crf.to_dict())

    def _config(self) -> dict:
        if self.protocol == "http":
            return self._client.get_model_config(self.model)
        return self._client.get_model_config(self.model, as_json=True)["config"]

    def _call(self, fn, *args, **kwargs):
        """fn(...) with the server's errors raised as TritonServerError carrying its message."""
        try:
            return fn(*args, **kwargs)
        except self._server_exception as e:
            status = e.status()
            raise TritonServerError(f"{self.url} model {self.model!r}: {e.message()}",
                                    None if status is None else str(status)) from None
        except OSError as e:  # refused, unknown host, timed out: the HTTP client raises these as they are
            raise TritonServerError(f"cannot reach a Triton server at {self.url} ({self.protocol}): {e} "
                                    "(is it running? tools/serve.py starts one)") from None

    def _inference_stats(self) -> dict:
        if self.protocol == "http":
            stats = self._client.get_inference_statistics(self.model)
        else:
            stats = self._client.get_inference_statistics(self.model, as_json=True)
        return stats["model_stats"][0]["inference_stats"]

    def _stats_after(self, before: dict) -> dict:
        """The statistics once this request is in them: Triton counts a request as it releases it,
        which can be just after the client has the response (polled for up to 1 s)."""
        def answered(stats: dict) -> int:
            return sum(int(stats.get(k, {}).get("count", 0)) for k in ("success", "fail"))

        deadline = time.monotonic() + 1.0
        after = self._call(self._inference_stats)
        while answered(after) <= answered(before) and time.monotonic() < deadline:
            time.sleep(0.005)
            after = self._call(self._inference_stats)
        return after

    # -- segmentation ---------------------------------------------------------------------------
    def __call__(self, images, return_probabilities: bool = False):
        return self.seg(images, return_probabilities)

    def seg(self, images, return_probabilities: bool = False):
        """One image (path or BGR uint8 array) -> Segmentation, or a list -> list (one request each)."""
        if isinstance(images, (list, tuple)):
            return [self._one(im, return_probabilities) for im in images]
        return self._one(images, return_probabilities)

    def _one(self, image, return_probabilities: bool) -> Segmentation:
        m = self._module
        t0 = time.perf_counter()
        img = load_image(image) if isinstance(image, (str, Path)) else as_bgr_uint8(image)
        tensor = m.InferInput(INPUT_IMAGE, [1, *img.shape], "UINT8")
        tensor.set_data_from_numpy(img[None])
        names = [OUTPUT_LABELS] + ([OUTPUT_PROBABILITIES] if return_probabilities else [])
        outputs = [m.InferRequestedOutput(n) for n in names]
        before = self._call(self._inference_stats) if self.server_stats else None
        t1 = time.perf_counter()
        if self.protocol == "http":
            response = self._call(self._client.infer, self.model, [tensor], outputs=outputs,
                                  parameters=self._parameters)
        else:
            response = self._call(self._client.infer, self.model, [tensor], outputs=outputs,
                                  parameters=self._parameters, client_timeout=self.timeout)
        t2 = time.perf_counter()
        labels = response.as_numpy(OUTPUT_LABELS)[0]
        probs = response.as_numpy(OUTPUT_PROBABILITIES)[0] if return_probabilities else None
        timings = {"request": (t2 - t1) * 1e3}
        timings.update(self._response_timings(response))
        if before is not None:
            timings.update(_stats_ms(before, self._stats_after(before)))
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return Segmentation(labels, probs, timings, img)

    def _response_timings(self, response) -> dict:
        """The server's stage times (ms) from the response parameters, where the server sends them."""
        if self.protocol == "http":
            params = response.get_response().get("parameters", {})
        else:
            params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in
                      response.get_response().parameters.items()}
        found = {}
        for name in TIMING_PARAMETERS:
            if name in params:
                try:
                    found[name[:-len("_ms")]] = float(params[name])
                except (TypeError, ValueError):
                    pass
        return found

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
