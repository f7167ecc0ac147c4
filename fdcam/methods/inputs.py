"""Checks of an input batch against the model it is explained on: one clear line for what does not fit."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import first_line

__all__ = ["check_input", "one_line_errors"]


def _model_dtype_and_channels(model: nn.Module) -> tuple[torch.dtype | None, int | None]:
    """The dtype of the model's floating-point weights and the input channels of its first convolution."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return dtype, channels


def check_input(x: torch.Tensor, model: nn.Module | None = None) -> None:
    """Raise a one-line ValueError unless x is a finite, non-empty float batch [N,C,H,W] that the model takes."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"input must be a float tensor [N,C,H,W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be a 4-D float tensor [N,C,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"input must be a float tensor [N,C,H,W], got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"the input batch is empty (shape {tuple(x.shape)}); give at least one image")
    if min(x.shape[-2:]) == 0:
        raise ValueError(f"the input images are empty (shape {tuple(x.shape)})")
    if model is not None:
        dtype, channels = _model_dtype_and_channels(model)
        if dtype is not None and x.dtype != dtype:
            raise ValueError(f"input is {x.dtype} but the model's weights are {dtype}; convert it with x.to({dtype})")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"input has {x.shape[1]} channels but the model's first convolution takes {channels}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")


def one_line_errors(function, x: torch.Tensor):
    """Run `function`; a RuntimeError of the model on this input becomes a one-line ValueError (out of memory stays)."""
    try:
        return function()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise ValueError(f"the model cannot run on an input of shape {tuple(x.shape)} ({first_line(error)})") from error
