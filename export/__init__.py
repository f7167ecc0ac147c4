"""Export the tail of a split CNN to one validated ONNX graph (features + masks → logits) for fast switch passes."""

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

__all__ = [
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
