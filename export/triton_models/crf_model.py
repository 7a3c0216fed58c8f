"""Triton Python model ``deeplab_crf`` (KIND_GPU): the dense CRF on the engine's scores, on the GPU.

Inputs: SCORES (the TensorRT engine's padded N x C x Hp x Wp float32, left on the GPU: the config
sets FORCE_CPU_ONLY_INPUT_TENSORS "no"), IMAGE (N x H x W x 3 uint8, the request's own). Outputs:
LABELS N x H x W uint8, PROBABILITIES N x C x H x W float32 (only computed when requested).
Request parameters: runtime.triton_contract (the CRF on/off and its fields, within their per-request
bounds; iterations up to the config's "max_iterations"); the defaults come from the config's
parameters. The work itself is ensemble_steps.CRFStep.

Streams: Triton hands a Python model its GPU input tensors with no work pending on them (the
engine's stream was synchronised before its output was released), so the CRF kernels, on their own
stream (GPUKernels.stream), read them without waiting on any Triton stream. In the other direction
Triton may reuse the inputs' memory once execute returns, so CRFStep.run synchronises the kernels'
stream before returning; the outputs are host arrays, with nothing in flight.
"""
import json

import triton_python_backend_utils as pb_utils

from crf.backend import CPUKernels, GPUKernels
from ensemble_steps import CRFStep, StepError, dlpack_view
from runtime.triton_contract import (CONFIG_MAX_ITERATIONS, DEFAULT_MAX_ITERATIONS, INPUT_IMAGE, OUTPUT_LABELS,
                                     OUTPUT_PROBABILITIES, SCORES, crf_params_from_request, read_config_parameters,
                                     request_parameters)


def error_response(step: str, e: Exception):
    """An error response: INVALID_ARG (HTTP 400) for what the request got wrong (ValueError:
    RequestError, StepError, the CRF's input errors), INTERNAL (500) otherwise."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(e, ValueError) else "INTERNAL", None)
    message = f"{step}: {e}"
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        self.class_names, _, self.defaults = read_config_parameters(parameters)
        self.max_iterations = int(parameters.get(CONFIG_MAX_ITERATIONS, {}).get("string_value", DEFAULT_MAX_ITERATIONS))
        self.device_id = int(args.get("model_instance_device_id", 0))
        if args.get("model_instance_kind") == "GPU":
            kernels = GPUKernels(device=self.device_id)  # compiles the kernels with nvcc on first use
        else:  # KIND_CPU: the same kernels compiled for the CPU (inputs must then be on the host)
            kernels = CPUKernels()
        self.step = CRFStep(kernels, self.device_id)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # one bad request must not fail the others of the batch
                responses.append(error_response("deeplab_crf", e))
        return responses

    def _one(self, request):
        params = crf_params_from_request(request_parameters(request.parameters()), self.defaults, self.max_iterations)
        scores_t = pb_utils.get_input_tensor_by_name(request, SCORES)
        image_t = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE)
        if scores_t is None or image_t is None:
            raise StepError(f"both {SCORES} and {INPUT_IMAGE} are needed")
        view = dlpack_view(scores_t.to_dlpack())
        if view.shape[1:2] != (len(self.class_names),):
            raise StepError(f"SCORES {list(view.shape)} do not have the model's {len(self.class_names)} classes")
        scores = self.step.scores_buffer(view, scores_t.as_numpy() if scores_t.is_cpu() else None)
        if not image_t.is_cpu():
            raise StepError(f"{INPUT_IMAGE} arrived on the GPU; the CRF step reads it from the host")
        wanted = request.requested_output_names()
        probabilities = OUTPUT_PROBABILITIES in wanted
        labels, probs = self.step.run(scores, view.shape, image_t.as_numpy(), params, probabilities,
                                      request.request_id() or "request")
        outputs = [pb_utils.Tensor(OUTPUT_LABELS, labels)]
        if probs is not None:
            outputs.append(pb_utils.Tensor(OUTPUT_PROBABILITIES, probs))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        self.step.close()
