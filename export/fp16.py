"""fp16 graphs: fp16 weights and compute with fp32 inputs and outputs, the converter's nodes put back in
topological order."""

from __future__ import annotations

import warnings

import onnx

from fdcam.errors import ExportError

__all__ = ["to_fp16"]


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute with fp32 graph inputs and outputs (Casts at the borders)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as error:  # pragma: no cover - shipped with every onnxruntime wheel
        raise ExportError("fp16 export needs onnxruntime.transformers.float16, which this onnxruntime lacks") from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight clipped to the fp16 range
        converted = convert_float_to_float16(proto, keep_io_types=True)
    # The converter appends its input Casts at the end of the node list; ONNX wants topological order.
    _sort_topologically(converted.graph)
    return converted


def _sort_topologically(graph: onnx.GraphProto) -> None:
    known = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in known for name in node.input)]
        if not ready:
            raise ExportError("the fp16 graph has a node whose inputs are never produced")
        for node in ready:
            known.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)
