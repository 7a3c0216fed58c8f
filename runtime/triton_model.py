"""The Triton Python-backend model that serves ``runtime.Segmenter`` (ONNX Runtime on the CPU + the CRF).

export/triton_repo.py copies this file as ``<repository>/deeplab/1/model.py``, with the ``runtime``
and ``crf`` packages and the ``.onnx`` beside it: the repository carries its own code. Tensor and
parameter names: runtime/triton_contract.py.

Nothing but the standard library is imported at module level: the Python backend's stub embeds the
system's Python, and a server started by tools/serve.py hands the model an environment of its own
(numpy < 2, which the stub's ``triton_python_backend_utils`` needs, OpenCV, ONNX Runtime) in
DEEPLAB_TRITON_SITE. Those paths, then this file's folder (the copied packages), are put first on
``sys.path`` before numpy is first imported.
"""
from __future__ import annotations

import json
import os
import sys

#: Environment variable: import paths (os.pathsep-separated) the model puts first on sys.path.
SITE_ENV = "DEEPLAB_TRITON_SITE"


def _put_first_on_path() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    extra = [p for p in os.environ.get(SITE_ENV, "").split(os.pathsep) if p]
    for path in reversed(extra + [here]):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


if os.path.basename(__file__) == "model.py":  # loaded by the stub from a repository (as "1.model")
    _put_first_on_path()

pb_utils = None  # triton_python_backend_utils, imported in initialize (after the paths are set)


class _Replies:
    """One response per request of an execute call. Where the Python backend lets a model that is
    not decoupled use response senders (Triton 2.51's does), each response is sent as soon as it
    is made: a cheap request batched with an expensive one is then not held back until the whole
    batch is done. Elsewhere execute returns them together (``result``)."""

    def __init__(self, requests):
        self.responses = [None] * len(requests)
        try:
            self.senders = [r.get_response_sender() for r in requests]
        except Exception:  # older backends: "only when the model is using the decoupled transaction policy"
            self.senders = None

    def __setitem__(self, k: int, response) -> None:
        self.responses[k] = response
        if self.senders is not None:
            self.senders[k].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def unanswered(self) -> list:
        return [k for k, r in enumerate(self.responses) if r is None]

    def result(self):
        return None if self.senders is not None else self.responses


class TritonPythonModel:
    """One instance per Triton model instance (a stub process); requests arrive in batches made by
    Triton's dynamic batcher and run through one Segmenter, same-size frames in one network batch."""

    def initialize(self, args) -> None:
        global pb_utils
        import triton_python_backend_utils as utils

        pb_utils = utils
        from runtime.segmenter import Segmenter
        from runtime.triton_contract import (CONFIG_COMPUTE_TIMEOUT, CONFIG_MAX_ITERATIONS, CONFIG_MAX_PIXELS,
                                             DEFAULT_MAX_ITERATIONS, DEFAULT_MAX_PIXELS, read_config_parameters)

        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        self.class_names, self.palette, self.crf_defaults = read_config_parameters(parameters)
        self.max_pixels = int(parameters.get(CONFIG_MAX_PIXELS, {}).get("string_value", DEFAULT_MAX_PIXELS))
        self.max_iterations = int(parameters.get(CONFIG_MAX_ITERATIONS, {}).get("string_value", DEFAULT_MAX_ITERATIONS))
        timeout = parameters.get(CONFIG_COMPUTE_TIMEOUT, {}).get("string_value")
        self.compute_timeout = float(timeout) if timeout else None
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        # Instances are separate processes: share the cores between them rather than oversubscribe.
        threads = max(1, (os.cpu_count() or 1) // instances)
        folder = os.path.join(args["model_repository"], args["model_version"])
        # Made with the CRF on so that any request can turn it on; requests without it use a view.
        self.segmenter = Segmenter(os.path.join(folder, "model.onnx"), backend="onnxruntime", threads=threads,
                                   class_names=self.class_names, palette=self.palette)
        self.response_parameters = self._response_parameters_supported()
        import numpy

        pb_utils.Logger.log_info("deeplab: numpy %s (%s); %s, CRF %s, %d thread(s), response parameters %s" % (
            numpy.__version__, os.path.dirname(numpy.__file__), self.segmenter.backend, self.segmenter.crf_backend, threads,
            "on" if self.response_parameters else "not supported by this Python backend"))

    @staticmethod
    def _response_parameters_supported() -> bool:
        """Newer Python backends take InferenceResponse(parameters=...); older ones (Triton 2.51's) refuse it."""
        try:
            pb_utils.InferenceResponse(output_tensors=[], parameters={"probe": "1"})
        except TypeError:
            return False
        return True

    def execute(self, requests):
        from runtime.triton_contract import (INPUT_IMAGE, OUTPUT_PROBABILITIES, RequestError, check_image_batch,
                                             crf_params_from_request, request_parameters)

        replies = _Replies(requests)
        try:
            groups = {}  # (CRF params, probabilities wanted) -> [(request index, images)]
            for k, request in enumerate(requests):
                try:
                    tensor = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE)
                    if tensor is None:
                        raise RequestError("no %s input" % INPUT_IMAGE)
                    images = check_image_batch(tensor.as_numpy(), self.max_pixels)
                    crf = crf_params_from_request(request_parameters(request.parameters()), self.crf_defaults,
                                                  self.max_iterations)
                except RequestError as e:
                    replies[k] = self._error(str(e))
                    continue
                want = OUTPUT_PROBABILITIES in request.requested_output_names()
                groups.setdefault((crf, want), []).append((k, images))
            # Cheapest first: with the responses sent as they are made, a small request batched with
            # a large one is answered without waiting for it.
            for (crf, want), jobs in sorted(groups.items(), key=lambda item: _cost(item[0][0], item[1])):
                self._run_group(self.segmenter.with_crf(crf), want, jobs, replies)
        except Exception as e:  # a bug here must still answer every request, once
            for k in replies.unanswered():
                replies[k] = self._error("internal error: %s" % (e,), code="INTERNAL")
        return replies.result()

    def _run_group(self, segmenter, want_probabilities: bool, jobs, replies) -> None:
        """Every image of these requests in one Segmenter call (same-size frames share network
        batches). Should the call fail, each request runs alone, so that only the bad one fails."""
        frames = [image for _, images in jobs for image in images]
        try:
            results = segmenter(frames, return_probabilities=want_probabilities, timeout=self.compute_timeout)
        except TimeoutError as e:  # the compute time limit: all of this group, at once (retrying would double it)
            for k, _ in jobs:
                replies[k] = self._error("segmentation stopped after the model's compute_timeout_s (%s s): %s; "
                                         "ask for fewer pixels or iterations" % (self.compute_timeout, e),
                                         code="UNAVAILABLE")
            return
        except Exception as e:  # the Segmenter's own errors name the image; find which request has it
            if len(jobs) > 1:
                for job in jobs:
                    self._run_group(segmenter, want_probabilities, [job], replies)
                return
            # ValueError: the request's data refused (a CRF bandwidth too small for the image's size,
            # ...): a client error. Anything else (out of memory, a bug) is the server's.
            replies[jobs[0][0]] = self._error("segmentation failed: %s" % (e,),
                                              code="INVALID_ARG" if isinstance(e, ValueError) else "INTERNAL")
            return
        start = 0
        for k, images in jobs:
            replies[k] = self._response(results[start:start + len(images)], want_probabilities)
            start += len(images)

    def _response(self, results, want_probabilities: bool):
        import numpy as np
        from runtime.triton_contract import OUTPUT_LABELS, OUTPUT_PROBABILITIES, TIMING_PARAMETERS

        outputs = [pb_utils.Tensor(OUTPUT_LABELS, np.stack([r.labels for r in results]))]
        if want_probabilities:
            outputs.append(pb_utils.Tensor(OUTPUT_PROBABILITIES, np.stack([r.probabilities for r in results])))
        if not self.response_parameters:
            return pb_utils.InferenceResponse(output_tensors=outputs)
        stages = {}
        for r in results:
            for stage, ms in r.timings.items():
                stages[stage] = stages.get(stage, 0.0) + ms
        parameters = {stage + "_ms": "%.3f" % ms for stage, ms in stages.items()
                      if stage + "_ms" in TIMING_PARAMETERS}
        return pb_utils.InferenceResponse(output_tensors=outputs, parameters=parameters)

    @staticmethod
    def _error(message: str, code: str = "INVALID_ARG"):
        """An error response: INVALID_ARG (HTTP 400) for a request the model refuses, INTERNAL
        (500) for its own failures, UNAVAILABLE (503) past the compute time limit; a backend
        without error codes gets the message alone (500)."""
        code = getattr(pb_utils.TritonError, code, None)
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def finalize(self) -> None:
        self.segmenter = None


def _cost(crf, jobs) -> int:
    """Rough relative cost of a group: its pixels, times the CRF's lattice builds (worth ~10
    iterations) and iterations when it runs; the network alone is about one unit."""
    pixels = sum(images.shape[0] * images.shape[1] * images.shape[2] for _, images in jobs)
    return pixels * (1 + (10 + crf.iterations if crf is not None else 0))
