"""The JSON that travels next to an exported tail graph: enough for a service in another language to run FD-CAM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from fdcam.options import FDCAM_DEFAULTS

from .graph import FP16_TOLERANCE, FP32_TOLERANCE, ExportedTail

__all__ = ["describe_tail"]

THETA = FDCAM_DEFAULTS["theta"]
BIAS = FDCAM_DEFAULTS["bias"]


def _graph_shapes(path: Path) -> dict[str, list[tuple[str, list[Any]]]]:
    """Input and output names with shapes (symbolic axes by name) read from the graph file."""
    proto = onnx.load(str(path), load_external_data=False)

    def shape(value: onnx.ValueInfoProto) -> list[Any]:
        return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]

    return {
        "inputs": [(value.name, shape(value)) for value in proto.graph.input],
        "outputs": [(value.name, shape(value)) for value in proto.graph.output],
    }


def _tensor(name: str, shape: list[Any], meaning: str) -> dict[str, Any]:
    return {"name": name, "dtype": "float32", "shape": shape, "meaning": meaning}


def describe_tail(exported: ExportedTail) -> dict[str, Any]:
    """Inputs, outputs, how the switch masks are built and how FD-CAM combines the scores, as a JSON-ready dict."""
    meta = exported.metadata
    channels = int(meta["channels"])
    fp16 = meta.get("precision") == "fp16"
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    shapes = _graph_shapes(exported.path)
    meanings = {
        "features": f"activations A of N images at layer {meta['target_layer']}",
        "masks": "per image, one row per switch pass: 1 keeps channel k, 0 zeroes it (any weight works)",
        "logits": "class logits of each image's masked passes",
    }
    extra_meaning = "another tensor the tail needs from the head, one per image (e.g. a residual skip)"
    inputs = [_tensor(name, shape, meanings.get(name, extra_meaning)) for name, shape in shapes["inputs"]]
    outputs = [_tensor(name, shape, meanings.get(name, "")) for name, shape in shapes["outputs"]]
    return {
        "format": "fdcam-tail/2",
        "graph": exported.path.name,
        "model": meta.get("model"),
        "target_layer": meta["target_layer"],
        "precision": meta.get("precision", "fp32"),
        "exporter": exported.exporter,
        "tail_form": meta.get("tail_form", "masked"),
        "opset": int(meta["opset"]),
        "validation": {
            "max_abs_logit_difference": exported.max_error,
            "rule": f"max |onnx − torch| ≤ {tolerance.atol:g} + {tolerance.rtol:g}·max |torch logit|",
        },
        "input_image": {
            "size_hw": [int(v) for v in meta["input_size"].split("x")] if "input_size" in meta else None,
            "mean": json.loads(meta["mean"]) if "mean" in meta else None,
            "std": json.loads(meta["std"]) if "std" in meta else None,
            "layout": "NCHW RGB, pixels scaled to [0,1], then (x − mean)/std per channel",
        },
        "inputs": inputs,
        "outputs": outputs,
        "masks": {
            "similarity": "cos(k,l) of the flattened maps A_k, A_l (a zero map has similarity 0)",
            "groups": f"G(k) = {{l : cos(k,l) > q_k}}, q_k the θ-quantile of row k of the cosine matrix "
            f"(linear interpolation), θ = {THETA}",
            "theta": THETA,
            "rows": "2K rows in one batch: rows 0…K−1 switch-on 1_G(k) (only the group kept), "
            "rows K…2K−1 switch-off 1 − 1_G(k)",
            "batch": 2 * channels,
            "runs": "one graph run per image for all 2K rows; "
            "the rows do not depend on the class, so all classes share it",
        },
        "scores": {
            "full_logit": "f_c(X): the model's logit for class c (equal to the tail with an all-ones mask row)",
            "switch_on": "s⁺_k = f_c(tail(A ⊙ 1_G(k)))",
            "switch_off": "s⁻_k = f_c(X) − f_c(tail(A ⊙ (1 − 1_G(k))))",
            "score": "s_k = (s⁺_k + s⁻_k) / 2",
        },
        "weights": {
            "alpha": "Grad-CAM weights α_k = mean over h×w of ∂f_c/∂A_k "
            "(computed by the caller; not part of this graph)",
            "normalisation": "x̂ = (x − min_k x)/(max_k x − min_k x) over channels; a constant vector becomes 0",
            "formula": f"w_k = α̂_k · exp(ŝ_k) − {BIAS}",
            "bias": BIAS,
        },
        "saliency": "ReLU(Σ_k w_k A_k), bilinear upsampling (align_corners=false) to the input size, min-max to [0,1]",
    }
