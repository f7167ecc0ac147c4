"""A Triton Inference Server model repository for an explainer graph (onnxruntime backend).

Layout: `REPO/NAME/config.pbtxt` and `REPO/NAME/1/model.onnx` (plus `model.onnx.data` for graphs
over 2 GB). The config declares the graph's inputs and outputs without the batch axis (Triton adds
it: `max_batch_size` > 0), dynamic batching, one instance group and, with `tensorrt`, the TensorRT
accelerator of the onnxruntime backend with its precision and an engine cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

__all__ = ["DEFAULT_MAX_BATCH", "TENSORRT_PRECISIONS", "default_model_name", "triton_config", "write_triton_repository"]

DEFAULT_MAX_BATCH = 32
TENSORRT_PRECISIONS = ("fp16", "fp32")
_DATA_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


def default_model_name(model: str, method: str) -> str:
    """`fdcam_<model>_<method>`, with characters Triton dislikes in a directory name made '_'.

    '+' becomes 'p' ('gradcam++' → 'gradcampp').
    """
    clean = lambda text: "".join(c if c.isalnum() or c == "_" else "_" for c in text.replace("+", "p"))  # noqa: E731
    return f"fdcam_{clean(model)}_{clean(method)}"


# Metadata of the graph repeated as the model's parameters (a region graph's target kind and mask size included).
_PARAMETER_KEYS = (
    "model",
    "target_layer",
    "method",
    "method_options",
    "input_size",
    "mean",
    "std",
    "target",
    "region_size",
)


def _tensor_entries(values, data_types) -> str:
    entries = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in data_types:
            raise ValueError(f"graph tensor {value.name!r} has an element type Triton's config is not written for")
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]  # Triton adds the batch
        dims = ", ".join(str(d) for d in shape)
        entries.append(
            f'  {{\n    name: "{value.name}"\n    data_type: {data_types[tensor.elem_type]}\n    dims: [ {dims} ]\n  }}'
        )
    return ",\n".join(entries)


def triton_config(
    graph: str | os.PathLike,
    name: str,
    max_batch: int = DEFAULT_MAX_BATCH,
    tensorrt: str | None = None,
    engine_cache: str = "/tmp/fdcam_trt_cache",
    queue_delay_us: int = 2000,
) -> str:
    """The text of config.pbtxt for `graph` (an explainer ONNX file whose first axis is the batch)."""
    if max_batch < 1:
        raise ValueError(f"max batch must be at least 1, not {max_batch}")
    if tensorrt is not None and tensorrt not in TENSORRT_PRECISIONS:
        raise ValueError(f"tensorrt precision must be one of {', '.join(TENSORRT_PRECISIONS)}, not {tensorrt!r}")
    proto = onnx.load(str(graph), load_external_data=False)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {int(max_batch)}",
        f"input [\n{_tensor_entries(inputs, _DATA_TYPES)}\n]",
        f"output [\n{_tensor_entries(proto.graph.output, _DATA_TYPES)}\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(queue_delay_us)}\n}}",
        "instance_group [\n  {\n    count: 1\n    kind: " + ("KIND_GPU" if tensorrt else "KIND_AUTO") + "\n  }\n]",
    ]
    if tensorrt is not None:
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{tensorrt.upper()}" }}\n'
            '        parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
            '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            f'        parameters {{ key: "trt_engine_cache_path" value: "{engine_cache}" }}\n'
            "      }\n    ]\n  }\n}"
        )
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    parameters = [(f"fdcam_{key}", meta[key]) for key in _PARAMETER_KEYS if key in meta]
    for key, value in parameters:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{escaped}" }}\n}}')
    return "\n".join(lines) + "\n"


def write_triton_repository(
    graph: str | os.PathLike,
    repository: str | os.PathLike,
    name: str,
    max_batch: int = DEFAULT_MAX_BATCH,
    tensorrt: str | None = None,
) -> Path:
    """Copy `graph` into `repository/name/1/model.onnx` and write `repository/name/config.pbtxt`.

    Returns the model directory.
    """
    graph = Path(graph)
    config = triton_config(graph, name, max_batch, tensorrt)
    directory = Path(repository) / name
    version = directory / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(graph, version / "model.onnx")
    data = graph.with_name(graph.name + ".data")
    if data.exists():
        # The graph names its data file; keep that name beside model.onnx.
        shutil.copyfile(data, version / data.name)
    (directory / "config.pbtxt").write_text(config, encoding="utf-8")
    return directory
