"""One forward pass of a split model: target activations, the model's output, and the gradients of targets."""

from __future__ import annotations

import threading

import torch

from .split import SplitModel
from .targets import BatchTargets

__all__ = ["ForwardPass"]


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
        with torch.enable_grad():
            leaf = activations.detach().requires_grad_(True)
            logits = split.tail.forward(leaf, *extras)
        return cls(split, activations, tuple(extras), logits.detach(), graph=(leaf, logits))

    def gradients(self, targets: BatchTargets | torch.Tensor) -> torch.Tensor:
        """∂f/∂A [N,T,K,h,w] of the targets' scores (fdcam.targets.BatchTargets, or class indices [N,T]),
        from one backward through the tail only.

        The first call with one target per image uses the forward's own graph; otherwise the tail runs
        once on T copies of the activations, so a single backward still gives every gradient. The head
        is never re-run.
        """
        if isinstance(targets, torch.Tensor):
            targets = BatchTargets.from_classes(targets, self.logits.shape[1:])
        n, t = targets.shape
        with self._graph_lock:
            graph, self._graph = self._graph, None  # autograd frees the graph on use; never hand it out twice
        if t == 1 and graph is not None:
            leaf, logits = graph
            (gradients,) = torch.autograd.grad(targets.objective(logits), leaf)
            return gradients[:, None]
        repeat = lambda tensor: tensor.repeat_interleave(t, dim=0)  # noqa: E731 — image-major order
        with torch.enable_grad():
            activations = repeat(self.activations).detach().requires_grad_(True)
            logits = self.split.tail(activations, *(repeat(e).detach() for e in self.extras))
            (gradients,) = torch.autograd.grad(targets.objective(logits), activations)
        return gradients.reshape(n, t, *self.activations.shape[1:])
