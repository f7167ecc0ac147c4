"""The Triton Python-backend model behind `fdcam` and `fdcam_image`; runs inside Triton's Python-backend stub process.

Each dynamic batch Triton hands to `execute` is checked request by request; the good requests are
explained in one call and a bad one gets its own error response (one line, INVALID_ARG: HTTP 400)
without failing the others.

Responses go out one request at a time through each request's response sender, so an execution holds
one full-size `saliency_original` at a time, not the whole batch's.

Refusals in Triton's statistics and metrics: the Python backend reports one success flag per
execution, for all its requests alike, and it is "failure" only when `execute` fails. Raising after
the responses went out crashes tritonserver (the backend frees each response factory twice); the
backend's own guarded path is a response *returned* for a request already answered, which it takes
as the execution's error without touching the factories again. So an execution whose requests were
all refused answers each with its own line, then returns one such response: Triton counts the
refusals as failures, and the log gets one line ("Failed to process the request(s) ... Non-decoupled
model cannot send more than one response").
A refusal that shares its execution with good requests is counted with them as a success there; the
counter `fdcam_refused_requests_total{model=...}` on the metrics endpoint counts every refusal.
"""

from __future__ import annotations

import base64
import ctypes
import json
import sys

import numpy as np

from .. import models
from ..errors import first_line
from .engine import (
    ORIGINAL_SIZE,
    EngineFailure,
    ServingConfig,
    add_original_maps,
    handle_image_requests,
    handle_tensor_requests,
    make_explainer,
)

__all__ = ["TritonPythonModel", "INPUTS", "ALL_REFUSED"]

INPUTS = {"tensor": ("image", "classes"), "image": ("image_bytes", "classes")}
# What the log says of an all-refused execution (no client sees it: each got its own line already).
ALL_REFUSED = "every request of this execution was refused (each was answered with its reason)"


def _parameter(config: dict, key: str) -> str:
    return config["parameters"][key]["string_value"]


def _malloc_trim():
    """glibc's malloc_trim, or None: hands freed heap pages back to the system after a large request."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        config = json.loads(args["model_config"])
        self.name = config.get("name", "fdcam")
        self.kind = _parameter(config, "fdcam_kind")
        self.serving = ServingConfig(**json.loads(base64.b64decode(_parameter(config, "fdcam_config")).decode("utf-8")))
        self.bounds = self.serving.bounds
        self.spec = models.spec(self.serving.model)
        self.explainer = make_explainer(self.serving)
        self.trim = _malloc_trim()
        self.refused_family = self.refused = None
        if hasattr(pb_utils, "MetricFamily"):  # the family must outlive its metric: both are kept
            self.refused_family = pb_utils.MetricFamily(
                name="fdcam_refused_requests_total",
                description="Requests fdcam refused (bad input, over a bound), each answered with one line",
                kind=pb_utils.MetricFamily.COUNTER,
            )
            self.refused = self.refused_family.Metric(labels={"model": self.name})

    def execute(self, requests: list) -> list | None:
        import triton_python_backend_utils as pb_utils

        try:
            decoded = []
            for request in requests:
                inputs = {}
                for name in INPUTS[self.kind]:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                decoded.append(inputs)
            if self.kind == "tensor":
                results = handle_tensor_requests(self.explainer, decoded, self.bounds)
            else:
                results = handle_image_requests(self.explainer, decoded, self.spec, self.bounds, with_original=False)
            del decoded
        except Exception as error:  # nothing is sent yet; each request still gets one line
            results = [EngineFailure(f"explanation failed: {first_line(error, None)}")] * len(requests)
        # Nothing below may raise once a response is out (see the module's docstring): each step is guarded.
        refused = failed = 0
        for index, request in enumerate(requests):
            result, results[index] = results[index], None  # the batch never holds answers already sent
            try:
                if isinstance(result, dict) and ORIGINAL_SIZE in result:
                    wanted = request.requested_output_names()
                    if not wanted or "saliency_original" in wanted:
                        add_original_maps(result)
                    else:
                        result.pop(ORIGINAL_SIZE)
                response = _response(pb_utils, result)
            except Exception as error:
                result = EngineFailure(f"explanation failed: {first_line(error, None)}")
                response = _response(pb_utils, result)
            if isinstance(result, str):
                failed += 1
                refused += not isinstance(result, EngineFailure)
            try:
                request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as error:  # the client went away, say: nothing more to do for this request
                _warn(pb_utils, f"cannot send a response: {first_line(error, None)}")
            del result, response
        try:
            if self.trim is not None:
                self.trim(0)
            if refused and self.refused is not None:
                self.refused.increment(refused)
        except Exception as error:
            _warn(pb_utils, first_line(error, None))
        if failed == len(requests):
            # Every request is answered: this response goes nowhere; it marks the execution failed (see above).
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(ALL_REFUSED))] + [None] * (
                len(requests) - 1
            )
        return None

    def finalize(self) -> None:
        close = getattr(self.explainer, "close", None)  # the torch backend's sessions and CUDA graphs
        if close is not None:
            close()
        self.explainer = None
        self.refused = self.refused_family = None  # the metric before its family


def _warn(pb_utils, message: str) -> None:
    """One line in the server's log."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_warn(f"fdcam: {message}")
    else:
        print(f"fdcam: warning: {message}", file=sys.stderr, flush=True)


def _response(pb_utils, result):
    if isinstance(result, str):  # a refusal is the client's to fix (400); an engine failure is the server's (500)
        code = getattr(pb_utils.TritonError, "INTERNAL" if isinstance(result, EngineFailure) else "INVALID_ARG", None)
        error = pb_utils.TritonError(result, code) if code is not None else pb_utils.TritonError(result)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)
