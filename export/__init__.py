"""ONNX export: the tail of a split CNN (features + masks → logits) for fast switch passes, and the whole
explanation as one graph (image → logits, targets, saliency) for serving without Python."""

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
from .explainer import EXPLAINER_METHODS, ExportedExplainer, export_explainer, export_explainer_full, run_explainer
from .model import export_tail

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
