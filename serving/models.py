"""The code Triton runs: one Python-backend model class per Python model of a repository.

    SegmenterModel  "deeplab" of the CPU form: runtime.Segmenter (ONNX Runtime on the CPU + the CRF)
    PadModel        "deeplab_pad" of the GPU ensemble: the runtime's padding before the TensorRT engine
    CRFModel        "deeplab_crf" of the GPU ensemble: the dense CRF on the engine's scores, on the GPU

Each model's ``1/model.py`` (serving.repository.MODEL_PY) puts its folder, which holds copies of
``serving/``, ``runtime/`` and ``crf/``, first on ``sys.path`` and imports one of these as
``TritonPythonModel``; only then is numpy first imported, so the paths named in DEEPLAB_TRITON_SITE
(the model's own numpy < 2 for the wheel's server: serving.launcher) win. Tensor and parameter
names: serving/contract.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from crf.cpu_kernels import CPUKernels
from crf.gpu_kernels import GPUKernels

from .contract import (CONFIG_COMPUTE_TIMEOUT, CONFIG_MAX_ITERATIONS, CONFIG_MAX_PIXELS, CONFIG_MAX_SIZE,
                       CONFIG_PROFILE, DEFAULT_MAX_ITERATIONS, DEFAULT_MAX_PIXELS, INPUT_IMAGE, OUTPUT_LABELS,
                       OUTPUT_PROBABILITIES, PADDED_IMAGE, SCORES, TIMING_PARAMETERS, RequestError, check_image_batch,
                       crf_params_from_request, read_config_parameters, request_parameters)
from .ensemble_steps import CRFStep, bounds_from_profile, dlpack_view, pad_batch


def error_response(message: str, code: str = "INVALID_ARG"):
    """An error response: INVALID_ARG (HTTP 400) for a request the model refuses, INTERNAL (500)
    for its own failures, UNAVAILABLE (503) past the compute time limit; a backend without error
    codes gets the message alone (500)."""
    code = getattr(pb_utils.TritonError, code, None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _fault(e: Exception) -> str:
    """ValueError (RequestError, the CRF's input errors): what the request got wrong; else the server's."""
    return "INVALID_ARG" if isinstance(e, ValueError) else "INTERNAL"


def _parameter(parameters: dict, name: str, default=None):
    return parameters.get(name, {}).get("string_value", default)


class _PerRequest:
    """A model answering each request of a batch on its own (``_one``): one bad request must not
    fail the others of the batch."""

    name = ""

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:
                responses.append(error_response(f"{self.name}: {e}", _fault(e)))
        return responses


# -- the CPU form ----------------------------------------------------------------------------------

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


class SegmenterModel:
    """One instance per Triton model instance (a stub process); requests arrive in batches made by
    Triton's dynamic batcher and run through one Segmenter, same-size frames in one network batch."""

    def initialize(self, args) -> None:
        from runtime.segmenter import Segmenter

        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        self.class_names, self.palette, self.crf_defaults = read_config_parameters(parameters)
        self.max_pixels = int(_parameter(parameters, CONFIG_MAX_PIXELS, DEFAULT_MAX_PIXELS))
        self.max_iterations = int(_parameter(parameters, CONFIG_MAX_ITERATIONS, DEFAULT_MAX_ITERATIONS))
        timeout = _parameter(parameters, CONFIG_COMPUTE_TIMEOUT)
        self.compute_timeout = float(timeout) if timeout else None
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        # Instances are separate processes: share the cores between them rather than oversubscribe.
        threads = max(1, (os.cpu_count() or 1) // instances)
        folder = os.path.join(args["model_repository"], args["model_version"])
        # Made with the CRF on so that any request can turn it on; requests without it use a view.
        self.segmenter = Segmenter(os.path.join(folder, "model.onnx"), backend="onnxruntime", threads=threads,
                                   class_names=self.class_names, palette=self.palette)
        self.response_parameters = self._response_parameters_supported()
        pb_utils.Logger.log_info(
            f"deeplab: numpy {np.__version__} ({os.path.dirname(np.__file__)}); {self.segmenter.backend}, "
            f"CRF {self.segmenter.crf_backend}, {threads} thread(s), response parameters "
            + ("on" if self.response_parameters else "not supported by this Python backend"))

    @staticmethod
    def _response_parameters_supported() -> bool:
        """Newer Python backends take InferenceResponse(parameters=...); older ones (Triton 2.51's) refuse it."""
        try:
            pb_utils.InferenceResponse(output_tensors=[], parameters={"probe": "1"})
        except TypeError:
            return False
        return True

    def execute(self, requests):
        replies = _Replies(requests)
        try:
            groups = {}  # (CRF params, probabilities wanted) -> [(request index, images)]
            for k, request in enumerate(requests):
                try:
                    tensor = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE)
                    if tensor is None:
                        raise RequestError(f"no {INPUT_IMAGE} input")
                    images = check_image_batch(tensor.as_numpy(), self.max_pixels)
                    crf = crf_params_from_request(request_parameters(request.parameters()), self.crf_defaults,
                                                  self.max_iterations)
                except RequestError as e:
                    replies[k] = error_response(str(e))
                    continue
                want = OUTPUT_PROBABILITIES in request.requested_output_names()
                groups.setdefault((crf, want), []).append((k, images))
            # Cheapest first: with the responses sent as they are made, a small request batched with
            # a large one is answered without waiting for it.
            for (crf, want), jobs in sorted(groups.items(), key=lambda item: _cost(item[0][0], item[1])):
                self._run_group(self.segmenter.with_crf(crf), want, jobs, replies)
        except Exception as e:  # a bug here must still answer every request, once
            for k in replies.unanswered():
                replies[k] = error_response(f"internal error: {e}", "INTERNAL")
        return replies.result()

    def _run_group(self, segmenter, want_probabilities: bool, jobs, replies) -> None:
        """Every image of these requests in one Segmenter call (same-size frames share network
        batches). Should the call fail, each request runs alone, so that only the bad one fails."""
        frames = [image for _, images in jobs for image in images]
        try:
            results = segmenter(frames, return_probabilities=want_probabilities, timeout=self.compute_timeout)
        except TimeoutError as e:  # the compute time limit: all of this group, at once (retrying would double it)
            for k, _ in jobs:
                replies[k] = error_response(f"segmentation stopped after the model's compute_timeout_s "
                                            f"({self.compute_timeout} s): {e}; ask for fewer pixels or iterations",
                                            "UNAVAILABLE")
            return
        except Exception as e:  # the Segmenter's own errors name the image; find which request has it
            if len(jobs) > 1:
                for job in jobs:
                    self._run_group(segmenter, want_probabilities, [job], replies)
                return
            # ValueError: the request's data refused (a CRF bandwidth too small for the image's size,
            # ...): a client error. Anything else (out of memory, a bug) is the server's.
            replies[jobs[0][0]] = error_response(f"segmentation failed: {e}", _fault(e))
            return
        start = 0
        for k, images in jobs:
            replies[k] = self._response(results[start:start + len(images)], want_probabilities)
            start += len(images)

    def _response(self, results, want_probabilities: bool):
        outputs = [pb_utils.Tensor(OUTPUT_LABELS, np.stack([r.labels for r in results]))]
        if want_probabilities:
            outputs.append(pb_utils.Tensor(OUTPUT_PROBABILITIES, np.stack([r.probabilities for r in results])))
        if not self.response_parameters:
            return pb_utils.InferenceResponse(output_tensors=outputs)
        stages = {}
        for r in results:
            for stage, ms in r.timings.items():
                stages[stage] = stages.get(stage, 0.0) + ms
        parameters = {f"{stage}_ms": f"{ms:.3f}" for stage, ms in stages.items() if f"{stage}_ms" in TIMING_PARAMETERS}
        return pb_utils.InferenceResponse(output_tensors=outputs, parameters=parameters)

    def finalize(self) -> None:
        self.segmenter = None


def _cost(crf, jobs) -> int:
    """Rough relative cost of a group: its pixels, times the CRF's lattice builds (worth ~10
    iterations) and iterations when it runs; the network alone is about one unit."""
    pixels = sum(images.shape[0] * images.shape[1] * images.shape[2] for _, images in jobs)
    return pixels * (1 + (10 + crf.iterations if crf is not None else 0))


# -- the GPU ensemble's Python steps (their work: serving/ensemble_steps.py) -------------------------

class PadModel(_PerRequest):
    """KIND_CPU. IMAGE (N x H x W x 3 uint8 BGR, one request's images of one size) -> PADDED_IMAGE,
    padded as runtime.Segmenter pads for the engine. Config parameters: "profile" (the plan's
    optimisation profile, JSON) and "max_size"."""

    name = "deeplab_pad"

    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.bounds = bounds_from_profile(json.loads(_parameter(parameters, CONFIG_PROFILE)))
        self.max_size = int(_parameter(parameters, CONFIG_MAX_SIZE))

    def _one(self, request):
        images = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE).as_numpy()
        padded = pad_batch(images, self.bounds, self.max_size)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(PADDED_IMAGE, padded)])


class CRFModel(_PerRequest):
    """KIND_GPU. SCORES (the engine's padded N x C x Hp x Wp float32, left on the GPU: the config
    sets FORCE_CPU_ONLY_INPUT_TENSORS "no") and IMAGE (N x H x W x 3 uint8, the request's own) ->
    LABELS N x H x W uint8, PROBABILITIES N x C x H x W float32 (only computed when requested).

    Streams: Triton hands a Python model its GPU input tensors with no work pending on them, so the
    CRF kernels, on their own stream, read them without waiting on any Triton stream. Triton may
    reuse the inputs' memory once execute returns, so CRFStep.run synchronises the kernels' stream
    before returning; the outputs are host arrays, with nothing in flight."""

    name = "deeplab_crf"

    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.class_names, _, self.defaults = read_config_parameters(parameters)
        self.max_iterations = int(_parameter(parameters, CONFIG_MAX_ITERATIONS, DEFAULT_MAX_ITERATIONS))
        self.device_id = int(args.get("model_instance_device_id", 0))
        if args.get("model_instance_kind") == "GPU":
            kernels = GPUKernels(device=self.device_id)  # compiles the kernels with nvcc on first use
        else:  # KIND_CPU: the same kernels compiled for the CPU (inputs must then be on the host)
            kernels = CPUKernels()
        self.step = CRFStep(kernels, self.device_id)

    def _one(self, request):
        params = crf_params_from_request(request_parameters(request.parameters()), self.defaults, self.max_iterations)
        scores_t = pb_utils.get_input_tensor_by_name(request, SCORES)
        image_t = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE)
        if scores_t is None or image_t is None:
            raise RequestError(f"both {SCORES} and {INPUT_IMAGE} are needed")
        view = dlpack_view(scores_t.to_dlpack())
        if view.shape[1:2] != (len(self.class_names),):
            raise RequestError(f"SCORES {list(view.shape)} do not have the model's {len(self.class_names)} classes")
        scores = self.step.scores_buffer(view, scores_t.as_numpy() if scores_t.is_cpu() else None)
        if not image_t.is_cpu():
            raise RequestError(f"{INPUT_IMAGE} arrived on the GPU; the CRF step reads it from the host")
        probabilities = OUTPUT_PROBABILITIES in request.requested_output_names()
        labels, probs = self.step.run(scores, view.shape, image_t.as_numpy(), params, probabilities,
                                      request.request_id() or "request")
        outputs = [pb_utils.Tensor(OUTPUT_LABELS, labels)]
        if probs is not None:
            outputs.append(pb_utils.Tensor(OUTPUT_PROBABILITIES, probs))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        self.step.close()
