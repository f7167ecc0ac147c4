"""Leaving the user's model as it was: eval mode while fdcam runs it, every flag restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .concurrency import model_in_eval

__all__ = ["preserved_model_state"]


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore every module's train/eval flag and every parameter's requires_grad.

    Safe under threads: the model stays in eval mode while any thread is inside, and the flags are
    restored when the last one leaves (fdcam.concurrency.model_in_eval).
    """
    with model_in_eval(model):
        yield
