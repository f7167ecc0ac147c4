"""ONNX files shared by the tail and explainer exporters: metadata props, weight folding, saving with
external data and moving a staged graph into place."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from fdcam.errors import first_line

__all__ = [
    "EXTERNAL_DATA_BYTES",
    "all_nodes",
    "fold_weight_constants",
    "move_into_place",
    "read_metadata",
    "save",
    "set_props",
]

log = logging.getLogger("fdcam.export")

# Above this many bytes of weights the tensors go to one external-data file (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def set_props(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the graph's metadata_props with `props` (values as strings), fdcam named as the producer."""
    proto.producer_name = "fdcam"
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of a graph on disk, without loading its weights."""
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def save(proto: onnx.ModelProto, path: Path, external: bool, convert_attribute: bool = True) -> None:
    """Write `proto` at `path`; with `external`, every tensor goes to one file beside it (`path` + ".data"),
    the tensors of constant attributes too unless `convert_attribute` is False."""
    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            convert_attribute=convert_attribute,
        )
    else:
        onnx.save_model(proto, str(path))


def move_into_place(staged: Path, path: Path) -> None:
    """Atomic per file: readers never see a half-written graph."""
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, path.with_name(path.name + ".data"))
    os.replace(staged, path)


def fold_weight_constants(model, largest_weight: int) -> None:
    """Fold ops on weights (a reshape + transpose of a Linear weight, say) into the stored weights.

    The exporter's own pass skips tensors above 8192 elements, which would leave ONNX Runtime
    to transpose hundreds of MB at every session start. Folds that grow the file are still skipped.
    """
    try:
        import onnxscript.optimizer

        onnxscript.optimizer.fold_constants(model, input_size_limit=max(largest_weight, 8192))
    except Exception as error:  # folding is an optimisation; the unfolded graph is correct
        log.info("constant folding skipped: %s", first_line(error))


def all_nodes(graph: onnx.GraphProto):
    """Every node of `graph`, those of its subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from all_nodes(sub)
