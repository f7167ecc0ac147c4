"""The Triton Python-backend model behind `fdcam` and `fdcam_image`; runs inside Triton's Python-backend stub process.

Each dynamic batch Triton hands to `execute` is checked request by request; the good requests are
explained in one call and a bad one gets its own error response (one line) without failing the others.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from .. import models
from .engine import ServingConfig, handle_image_requests, handle_tensor_requests, make_explainer

__all__ = ["TritonPythonModel", "INPUTS"]

INPUTS = {"tensor": ("image", "classes"), "image": ("image_bytes", "classes")}


def _parameter(config: dict, key: str) -> str:
    return config["parameters"][key]["string_value"]


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.kind = _parameter(config, "fdcam_kind")
        serving = ServingConfig(**json.loads(base64.b64decode(_parameter(config, "fdcam_config")).decode("utf-8")))
        self.spec = models.spec(serving.model)
        self.explainer = make_explainer(serving)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        decoded = []
        for request in requests:
            inputs = {}
            for name in INPUTS[self.kind]:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            decoded.append(inputs)
        if self.kind == "tensor":
            results = handle_tensor_requests(self.explainer, decoded)
        else:
            results = handle_image_requests(self.explainer, decoded, self.spec)
        return [_response(pb_utils, result) for result in results]

    def finalize(self) -> None:
        self.explainer = None


def _response(pb_utils, result):
    if isinstance(result, str):
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        error = pb_utils.TritonError(result, code) if code is not None else pb_utils.TritonError(result)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)
