"""``TritonSegmenter``: the Segmenter's call and result, answered by a Triton server.

    from serving import TritonSegmenter
    seg = TritonSegmenter("127.0.0.1:8000")              # protocol="grpc" with the gRPC port
    result = seg("samples/scene_0.png")                   # runtime.Segmentation, as Segmenter gives

Needs tritonclient (``pip install '.[serve]'``), imported when a TritonSegmenter is made. Tensor and
parameter names: serving/contract.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crf import CRFParams
from runtime.contract import as_bgr_uint8, load_image
from runtime.palette import ClassAccessors, check_palette
from runtime.result import Segmentation

from .contract import (INPUT_IMAGE, MODEL_NAME, OUTPUT_LABELS, OUTPUT_PROBABILITIES, PARAM_CRF, TIMING_PARAMETERS,
                       read_config_parameters)

_SERVER_DEFAULT = object()


class TritonServerError(RuntimeError):
    """The server refused or failed a request; the message is the server's. ``status``: the
    server's status as tritonclient gives it ("400" over HTTP, "StatusCode.INVALID_ARGUMENT" over
    gRPC: a request the model refuses; "503" / "StatusCode.UNAVAILABLE": the model was busy past
    its queue timeout, worth retrying), None where no answer came."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


#: Triton's per-request statistics of a model's compute.
COMPUTE_STEPS = ("compute_input", "compute_infer", "compute_output")


class ModelStats:
    """A model's inference statistics and config, over a connection of its own."""

    def __init__(self, url: str, protocol: str = "http", model: str = MODEL_NAME):
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        self.protocol, self.model = protocol, model
        self._client = module.InferenceServerClient(url)

    def _json(self, method: str, *args) -> dict:
        fn = getattr(self._client, method)
        return fn(*args) if self.protocol == "http" else fn(*args, as_json=True)

    def snapshot(self) -> dict:
        """Counts and nanoseconds (ints: gRPC's JSON gives int64 as strings)."""
        stats = self._json("get_inference_statistics", self.model)["model_stats"][0]
        inference = stats.get("inference_stats", {})
        out = {"inference_count": int(stats.get("inference_count", 0)),
               "execution_count": int(stats.get("execution_count", 0)),
               "batches": {int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
                           for b in stats.get("batch_stats", [])}}
        for name in ("success", "fail", "queue") + COMPUTE_STEPS:
            part = inference.get(name, {})
            out[name] = (int(part.get("count", 0)), int(part.get("ns", 0)))
        return out

    def settled(self, interval: float = 0.05, timeout: float = 3.0) -> dict:
        """A snapshot once the counts stop moving: Triton updates its statistics as it releases a
        request, which can be just after the client has the response (a single read right after the
        last response may miss it). Read until two reads ``interval`` apart agree."""
        last, deadline = self.snapshot(), time.monotonic() + timeout
        while True:
            time.sleep(interval)
            now = self.snapshot()
            if now == last or time.monotonic() > deadline:
                return now
            last = now

    def answered_after(self, before: dict, timeout: float = 1.0) -> dict:
        """A snapshot once at least one more request is counted than in ``before`` (Triton counts a
        request as it releases it, which can be just after the client has the response)."""
        deadline, after = time.monotonic() + timeout, self.snapshot()
        while sum(after[k][0] - before[k][0] for k in ("success", "fail")) <= 0 and time.monotonic() < deadline:
            time.sleep(0.005)
            after = self.snapshot()
        return after

    def describe(self) -> dict:
        """The server's release and the model's batching and instances, as the server reports them."""
        meta = self._json("get_server_metadata")
        config = self._json("get_model_config", self.model)
        config = config.get("config", config)  # gRPC wraps it
        delay = config.get("dynamic_batching", {}).get("max_queue_delay_microseconds")
        return {"server": meta.get("name"), "version": meta.get("version"),
                "max_batch_size": int(config.get("max_batch_size", 0)),
                "instances": [f"{g.get('kind')} x {g.get('count')}" for g in config.get("instance_group", [])],
                "dynamic_batching": "dynamic_batching" in config,
                "max_queue_delay_us": None if delay is None else int(delay)}

    def close(self) -> None:
        self._client.close()


def _check_url(url: str) -> None:
    """host:port as the Triton clients take it; they would take "http://..." or a port out of range
    only to fail later with their own message (and a traceback from their destructor)."""
    host, sep, port = str(url).rpartition(":")
    if "://" in str(url) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url must be host:port without a scheme, e.g. 127.0.0.1:8000, got {url!r}")


class TritonSegmenter(ClassAccessors):
    """Segment images on a Triton server serving a repository of serving.repository.

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
        self._stats = ModelStats(url, protocol, model) if server_stats else None
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
                                    "(is it running? deeplab-serve starts one)") from None

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
        before = self._call(self._stats.snapshot) if self._stats else None
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
        if before is not None:  # the model's statistics, over every client: this request's own only when alone
            after = self._call(self._stats.answered_after, before)
            timings["server_queue"] = (after["queue"][1] - before["queue"][1]) / 1e6
            timings["server_compute"] = sum(after[k][1] - before[k][1] for k in COMPUTE_STEPS) / 1e6
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
        if self._stats:
            self._stats.close()

    def __enter__(self) -> "TritonSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
