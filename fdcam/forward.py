"""One forward pass of a split model: target activations, the model's output, and the gradients of targets."""

from __future__ import annotations

import contextlib
import copy
import threading

import torch

from .split import SplitModel
from .targets import BatchTargets

__all__ = ["ForwardPass", "autograd_enabled"]


def autograd_enabled() -> contextlib.AbstractContextManager[None]:
    """Gradients recorded even when the caller runs inside `torch.no_grad()` or `torch.inference_mode()`.

    Serving code often wraps calls in one of them; the gradient methods need the tail's autograd graph, so
    fdcam leaves inference mode and enables gradients for exactly the tail forward and backward.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _graph_input(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor autograd may record: a detached view, or a copy of an inference-mode tensor (which autograd refuses)."""
    return tensor.clone() if tensor.is_inference() else tensor.detach()


class ForwardPass:
    """One forward of the whole model through head and tail: activations [N,K,h,w] at the target layer,
    the other split-crossing tensors `extras`, and `logits`, the model's output [N,C] (or any [N,...],
    e.g. a segmentation output [N,C,H,W]); `gradients(targets)` gives ∂f/∂A of each target's score f.

    Built by `ForwardPass.run`, the pass keeps the tail's autograd graph of its forward, so the first
    one-class-per-image gradients need no second tail pass. Autograd frees a graph once it is used, so
    later calls, and several classes per image, run the tail again: every call gives the same gradients.
    """

    def __init__(
        self,
        split: SplitModel,
        activations: torch.Tensor,
        extras: tuple[torch.Tensor, ...],
        logits: torch.Tensor,
        graph: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.split = split
        self.activations = activations
        self.extras = tuple(extras)
        self.logits = logits
        self._graph = graph  # (leaf activations, logits with their tail graph) of this forward, until used
        self._graph_lock = threading.Lock()

    @classmethod
    def run(cls, split: SplitModel, x: torch.Tensor) -> ForwardPass:
        """Run head and tail on x, keeping what an explanation needs (ValueError for a layer that is not 4-D)."""
        with torch.no_grad():
            # .forward, not __call__: fx's GraphModule.__call__ prints a traceback to stderr on errors,
            # which the caller turns into one line.
            activations, *extras = split.head.forward(x)
        if activations.dim() != 4:
            raise ValueError(
                f"layer {split.layer!r} outputs a {activations.dim()}-D tensor of shape {tuple(activations.shape)};"
                " CAM methods need a 4-D [N,K,h,w] convolutional layer"
            )
        with autograd_enabled():
            leaf = _graph_input(activations).requires_grad_(True)
            logits = split.tail.forward(leaf, *(_graph_input(e) for e in extras))
        return cls(split, activations, tuple(extras), logits.detach(), graph=(leaf, logits))

    def gradients(self, targets: BatchTargets | torch.Tensor) -> torch.Tensor:
        """∂f/∂A [N,T,K,h,w] of the targets' scores (fdcam.targets.BatchTargets, or class indices [N,T]),
        from one backward through the tail only.

        The first call with one target per image uses the forward's own graph; otherwise the tail runs
        once on T copies of the activations, so a single backward still gives every gradient. The head
        is never re-run.
        """
        if isinstance(targets, torch.Tensor):
            targets = BatchTargets.from_classes(_graph_input(targets), self.logits.shape[1:])
        elif targets.classes is not None and targets.classes.is_inference():
            targets = copy.copy(targets)  # class indices made under inference mode: autograd may not save them
            with torch.inference_mode(False):
                targets.classes = targets.classes.clone()
        n, t = targets.shape
        with self._graph_lock:
            graph, self._graph = self._graph, None  # autograd frees the graph on use; never hand it out twice
        if t == 1 and graph is not None:
            leaf, logits = graph
            with autograd_enabled():
                (gradients,) = torch.autograd.grad(targets.objective(logits), leaf)
            return gradients[:, None]
        repeat = lambda tensor: _graph_input(tensor.repeat_interleave(t, dim=0))  # noqa: E731 — image-major order
        with autograd_enabled():
            activations = repeat(self.activations).requires_grad_(True)
            logits = self.split.tail(activations, *(repeat(e) for e in self.extras))
            (gradients,) = torch.autograd.grad(targets.objective(logits), activations)
        return gradients.reshape(n, t, *self.activations.shape[1:])
