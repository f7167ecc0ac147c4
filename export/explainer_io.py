"""The explainer graph's inputs and outputs: their names, its metadata, the JSON description written beside it
and `run_explainer`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fdcam._version import __version__

from .region import REGION_INPUT, region_input

__all__ = ["OUTPUT_NAMES", "describe_explainer", "explainer_inputs", "explainer_metadata", "run_explainer"]


def explainer_inputs(classes_input: bool, region: bool = False) -> list[str]:
    """The graph's input names: image, then classes and region when it takes them."""
    return ["image", "classes"] + ([REGION_INPUT] if region else []) if classes_input else ["image"]


OUTPUT_NAMES = ["logits", "targets", "saliency"]


def describe_explainer(metadata: dict[str, str]) -> dict:
    """The JSON written beside the graph: the metadata typed (JSON-valued entries decoded, booleans and
    integers as JSON's own; ONNX's metadata_props can hold only strings), and the I/O."""
    described = {}
    for key, value in metadata.items():
        try:
            if key in _JSON_KEYS:
                described[key] = json.loads(value)
            elif key in _BOOLEAN_KEYS:
                described[key] = {"true": True, "false": False}[value]
            elif key in _INTEGER_KEYS:
                described[key] = int(value)
            else:
                described[key] = value
        except (ValueError, KeyError):
            described[key] = value
    classes_input = metadata.get("classes_input") == "true"
    h, w = (int(v) for v in metadata["input_size"].split("x"))
    described["inputs"] = [{"name": "image", "dtype": "float32", "shape": ["N", 3, h, w]}]
    if classes_input:
        described["inputs"].append({"name": "classes", "dtype": "int64", "shape": ["N", "T"]})
    described["inputs"].extend(region_input(metadata))
    t = "T" if classes_input else 1
    described["outputs"] = [
        {"name": "logits", "dtype": "float32", "shape": ["N", int(metadata["num_classes"])]},
        {"name": "targets", "dtype": "int64", "shape": ["N", t]},
        {"name": "saliency", "dtype": "float32", "shape": ["N", t, h, w]},
    ]
    return described


_JSON_KEYS = {"mean", "std", "method_options", "class_names", "validation"}
_BOOLEAN_KEYS = {"classes_input"}
_INTEGER_KEYS = {"num_classes", "opset"}


def run_explainer(
    session: ort.InferenceSession,
    image: np.ndarray,
    classes: np.ndarray | None = None,
    region: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, targets, saliency) of an explainer session on a float32 image batch (and int64 classes, and
    for a region graph float32 region masks [N,T,h,w])."""
    feed = {"image": np.ascontiguousarray(image, dtype=np.float32)}
    if classes is not None:
        feed["classes"] = np.ascontiguousarray(classes, dtype=np.int64)
    if region is not None:
        feed[REGION_INPUT] = np.ascontiguousarray(region, dtype=np.float32)
    logits, targets, saliency = session.run(OUTPUT_NAMES, feed)
    return logits, targets, saliency


def explainer_metadata(layer, method, reference, options, classes_input, num_classes, opset) -> dict[str, str]:
    import onnxruntime

    resolved = {}
    if method == "fdcam":
        resolved = {name: getattr(reference, name) for name in ("theta", "bias", "combine", "switch", "grouping")}
    resolved.update({k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))})
    return {
        "target_layer": layer,
        "method": method,
        "method_options": json.dumps(resolved, sort_keys=True),
        "classes_input": "true" if classes_input else "false",
        "num_classes": str(num_classes),
        "inputs": ",".join(explainer_inputs(classes_input)),
        "outputs": ",".join(OUTPUT_NAMES),
        "opset": str(opset),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "fdcam_version": __version__,
    }
