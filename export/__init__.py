"""ONNX export: the tail of a split CNN (features + masks → logits) for fast switch passes, and the whole
explanation as one graph (image → logits, targets, saliency) for serving without Python.

The whole-explanation exporter (`export_explainer`, ...) is loaded on first use of its names: it builds on
fdcam.methods, and fdcam.runtime imports the tail exporter (fdcam.export.graph) from this package, so an eager
import here would make the runtime depend on the methods that load it as a backend.
"""

from importlib import import_module

from .graph import (
    DEFAULT_OPSET,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ExportedTail,
    ExportError,
    Tolerance,
    export_split,
    input_names,
    read_metadata,
    to_fp16,
)
from .model import export_tail

_LAZY = {
    name: ".explainer"
    for name in ("EXPLAINER_METHODS", "ExportedExplainer", "export_explainer", "export_explainer_full", "run_explainer")
}

__all__ = [
    "EXPLAINER_METHODS",
    "ExportedExplainer",
    "export_explainer",
    "export_explainer_full",
    "run_explainer",
    "DEFAULT_OPSET",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "ExportError",
    "ExportedTail",
    "Tolerance",
    "export_split",
    "export_tail",
    "input_names",
    "read_metadata",
    "to_fp16",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)
