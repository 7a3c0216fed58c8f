"""Triton Python model ``deeplab_pad`` (KIND_CPU): the runtime's padding before the TensorRT engine.

Input IMAGE (N x H x W x 3 uint8 BGR, one request's images of one size), output PADDED_IMAGE:
padded bottom/right with the mean pixel to the next 8k+1 size within the engine's profile, as
runtime.Segmenter pads (ensemble_steps.pad_batch). Config parameters: "profile" (the plan's
optimisation profile, JSON) and "max_size".
"""
import json

import triton_python_backend_utils as pb_utils

from ensemble_steps import bounds_from_profile, pad_batch
from runtime.triton_contract import CONFIG_MAX_SIZE, CONFIG_PROFILE, INPUT_IMAGE, PADDED_IMAGE


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.bounds = bounds_from_profile(json.loads(parameters[CONFIG_PROFILE]["string_value"]))
        self.max_size = int(parameters[CONFIG_MAX_SIZE]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE).as_numpy()
                padded = pad_batch(images, self.bounds, self.max_size)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(PADDED_IMAGE, padded)]))
            except Exception as e:  # one bad request must not fail the others of the batch
                # ValueError (StepError, a size the profile does not take): the request's fault, 400
                code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(e, ValueError) else "INTERNAL", None)
                error = (pb_utils.TritonError(f"deeplab_pad: {e}") if code is None
                         else pb_utils.TritonError(f"deeplab_pad: {e}", code))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
