"""The layer a method explains when none is given: the model spec's, else the last layer with a spatial 4-D output."""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import first_line

__all__ = ["default_layer"]


def default_layer(model: nn.Module, tracer_kwargs: dict | None = None) -> str:
    """The spec's layer for fdcam's models, else the last layer with a spatial 4-D output (named in a warning)."""
    from ..models import spec_of
    from ..nodes import last_spatial_layer

    spec = spec_of(model)
    if spec is not None:
        return spec.default_layer
    try:
        chosen = last_spatial_layer(model, tracer_kwargs)
    except Exception as error:  # fx and the model raise many types; the user needs one line
        raise ValueError(
            f"give target_layer: no layer could be found for this model ({first_line(error, None)})"
        ) from error
    if chosen is None:
        raise ValueError("give target_layer: the model has no layer with a spatial 4-D output")
    warnings.warn(
        f"no target_layer given: explaining {chosen.name!r} ({chosen.type}, output {list(chosen.shape)}),"
        " the last layer with a spatial 4-D output",
        UserWarning,
        stacklevel=3,
    )
    return chosen.name
