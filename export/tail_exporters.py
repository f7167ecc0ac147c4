"""The tail exporters, in order: torch.onnx.export(dynamo=True) with dynamic image and mask axes, then the
TorchScript exporter (dynamo=False) with dynamic_axes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch import nn

from .onnx_io import fold_weight_constants
from .tail_form import input_names

__all__ = ["EXAMPLE_IMAGES", "EXAMPLE_MASK_BATCH", "EXPORTERS", "export_dynamo", "export_torchscript"]

# The example image and mask batches used while tracing: a batch of 1 would be specialised into the graph.
EXAMPLE_IMAGES = 2
EXAMPLE_MASK_BATCH = 3


def export_dynamo(
    masked: nn.Module,
    features: torch.Tensor,
    extras: list[torch.Tensor],
    opset: int,
    staging: Path,
    largest_weight: int,
    classes: bool = False,
) -> onnx.ModelProto:
    """torch.export-based exporter, with the image, mask (and class) batches as the dynamic dimensions."""
    features, masks, extras = _example_batch(features, extras)
    images, batch = torch.export.Dim("images", min=1), torch.export.Dim("masks", min=1)
    rest = [*([_example_classes()] if classes else []), *extras]
    rest_shapes = [
        *([{0: images, 1: torch.export.Dim("classes", min=1)}] if classes else []),
        *({0: images} for _ in extras),
    ]
    # MaskedTail takes the extras as *args, which torch.export sees as one tuple argument.
    dynamic_shapes = ({0: images}, {0: images, 1: batch}, tuple(rest_shapes))
    if not rest:
        dynamic_shapes = dynamic_shapes[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            masked,
            (features, masks, *rest),
            input_names=input_names(len(extras), classes),
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    fold_weight_constants(program.model, largest_weight)
    return program.model_proto


def export_torchscript(
    masked: nn.Module,
    features: torch.Tensor,
    extras: list[torch.Tensor],
    opset: int,
    staging: Path,
    largest_weight: int,
    classes: bool = False,
) -> onnx.ModelProto:
    """The legacy TorchScript exporter with a dynamic axis on masks and logits (the fallback)."""
    features, masks, extras = _example_batch(features, extras)
    target = staging / "torchscript.onnx"  # a file path: tails over 2 GB need external data
    names = input_names(len(extras), classes)
    axes = {name: {0: "images"} for name in names}
    axes.update(masks={0: "images", 1: "masks"}, logits={0: "images", 1: "masks"})
    if classes:
        axes.update(classes={0: "images", 1: "classes"}, logits={0: "images", 1: "masks", 2: "classes"})
    rest = [*([_example_classes()] if classes else []), *extras]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            masked,
            (features, masks, *rest),
            str(target),
            input_names=names,
            output_names=["logits"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load(str(target))


def _example_batch(
    features: torch.Tensor, extras: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One image's tensors as a traced example of EXAMPLE_IMAGES images × EXAMPLE_MASK_BATCH masks."""
    repeat = lambda t: t.expand(EXAMPLE_IMAGES, *t.shape[1:]).contiguous()  # noqa: E731
    masks = torch.ones(EXAMPLE_IMAGES, EXAMPLE_MASK_BATCH, features.shape[1])
    return repeat(features), masks, [repeat(extra) for extra in extras]


def _example_classes() -> torch.Tensor:
    """Classes [EXAMPLE_IMAGES, 4] for tracing a graph with a classes input."""
    return torch.zeros(EXAMPLE_IMAGES, 4, dtype=torch.long)


EXPORTERS: list[tuple[str, Callable[..., onnx.ModelProto]]] = [
    ("dynamo", export_dynamo),
    ("torchscript", export_torchscript),
]
