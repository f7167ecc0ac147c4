"""Export a whole model's tail at a layer: split, example features from the head, validated graph."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from fdcam.model_state import preserved_model_state
from fdcam.split import resolve_layer_name, split_model

from .graph import DEFAULT_OPSET, ExportedTail, ExportError, export_split, model_metadata

__all__ = ["export_tail", "model_name"]

DEFAULT_INPUT_SIZE = (224, 224)


def model_name(model: nn.Module) -> str:
    """The fdcam.models name of a model made by `load`, else its class name."""
    from fdcam.models import spec_of

    spec = spec_of(model)
    return spec.name if spec is not None else type(model).__name__


def export_tail(
    model: nn.Module,
    target_layer: str | nn.Module | None,
    path: str | os.PathLike,
    *,
    input_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
) -> ExportedTail:
    """Export the tail of `model` after `target_layer` (default: the model's spec) as a validated ONNX file at `path`.

    Input size and normalisation default to the model's spec (models made by fdcam.models.load);
    they only shape the example input and the metadata. Raises ExportError if the graph cannot be
    made or does not match torch (then nothing is written).
    """
    from fdcam.models import spec_of

    spec = spec_of(model)
    if target_layer is None:
        if spec is None:
            raise ExportError("target_layer is required for models not made by fdcam.models.load")
        target_layer = spec.default_layer
    layer = resolve_layer_name(model, target_layer)
    input_size = tuple(input_size or (spec.input_size if spec else DEFAULT_INPUT_SIZE))
    mean = mean if mean is not None else (spec.mean if spec else None)
    std = std if std is not None else (spec.std if spec else None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    with preserved_model_state(model), torch.no_grad():
        split = split_model(model, layer, example)
        features, *extras = split.head(example)
        if features.dim() != 4:
            raise ExportError(
                f"layer {layer!r} outputs a {features.dim()}-D tensor; the tail graph needs [1,K,h,w] features"
            )
        metadata = model_metadata(model_name(model), input_size, mean, std)
        return export_split(split, features, extras, path, fp16=fp16, metadata=metadata, opset=opset)
