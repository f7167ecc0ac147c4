"""∂f/∂A: the gradients of a batch's targets at the target layer, from one backward through the tail only.

The one place fdcam differentiates the tail. `ForwardPass` (the library) keeps the `TailGraph` of its own
forward for the first one-target-per-image call; the explainer graphs (export/explainer.py, export/region.py)
build theirs while make_fx traces them, so the code below stays traceable: no branching on tensor values, the
copies made by `expand` + `reshape` (a symbolic T traces), no locks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .targets import BatchTargets

__all__ = ["TailGraph", "autograd_enabled", "graph_input", "image_major"]


def autograd_enabled() -> contextlib.AbstractContextManager[None]:
    """Gradients recorded even when the caller runs inside `torch.no_grad()` or `torch.inference_mode()`.

    Serving code often wraps calls in one of them; the gradient methods need the tail's autograd graph, so
    fdcam leaves inference mode and enables gradients for exactly the tail forward and backward.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def graph_input(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor autograd may record: a detached view, or a copy of an inference-mode tensor (which autograd refuses
    to save for backward; the copy is made outside inference mode, so it is a normal tensor)."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.detach()


def image_major(tensor: torch.Tensor, copies: int | torch.SymInt) -> torch.Tensor:
    """`copies` consecutive copies of each image's row [N,...] → [N·copies,...] (row n·copies + t is image n).

    `expand` + `reshape`, not `repeat_interleave`: a symbolic `copies` (the explainer graph's T) traces."""
    if isinstance(copies, int) and copies == 1:
        return tensor
    n = tensor.shape[0]
    return tensor[:, None].expand(n, copies, *tensor.shape[1:]).reshape(n * copies, *tensor.shape[1:])


class TailGraph:
    """The tail run with its autograd graph kept on `copies` image-major copies of each image's activations
    [N,K,h,w] (and its extras): `outputs` [N·copies,...]; `gradients(targets)` gives the gradients of
    T = copies targets per image, each scored on its own copy, from one backward. Autograd frees the graph on
    that backward: one `gradients` call per TailGraph.
    """

    def __init__(
        self,
        tail: Callable[..., torch.Tensor],
        activations: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        copies: int | torch.SymInt = 1,
    ):
        self.images = activations.shape[0]
        self.copies = copies
        with autograd_enabled():
            self.leaf = graph_input(image_major(activations, copies)).requires_grad_(True)
            rows = (graph_input(image_major(extra, copies)) for extra in extras)
            # .forward, not __call__: fx's GraphModule.__call__ prints a traceback to stderr on errors,
            # which the caller turns into one line.
            forward = getattr(tail, "forward", tail)
            self.outputs = forward(self.leaf, *rows)

    def image_outputs(self) -> torch.Tensor:
        """Each image's output [N,...] (its first copy), detached."""
        outputs = self.outputs.detach()
        if isinstance(self.copies, int) and self.copies == 1:
            return outputs
        return outputs.reshape(self.images, self.copies, *outputs.shape[1:])[:, 0]

    def gradients(self, targets: BatchTargets) -> torch.Tensor:
        """∂f/∂A [N,T,K,h,w] of the targets' scores (`targets.objective` on the image-major outputs, T = copies)."""
        targets = _recordable(targets)
        with autograd_enabled():
            (gradients,) = torch.autograd.grad(targets.objective(self.outputs), self.leaf)
        return gradients.reshape(self.images, self.copies, *gradients.shape[1:])


def _recordable(targets: BatchTargets) -> BatchTargets:
    """The targets with class indices made under inference mode copied, as autograd saves them for backward."""
    classes = targets.classes
    if classes is None or not classes.is_inference():
        return targets
    targets = copy.copy(targets)
    targets.classes = graph_input(classes)
    return targets
