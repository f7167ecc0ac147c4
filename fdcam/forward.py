"""One forward pass of a split model: target activations, the model's output, and the gradients of targets."""

from __future__ import annotations

import threading

import torch

from .gradients import TailGraph, autograd_enabled
from .split import SplitModel
from .targets import BatchTargets

__all__ = ["ForwardPass", "autograd_enabled"]


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
        graph: TailGraph | None = None,
    ):
        self.split = split
        self.activations = activations
        self.extras = tuple(extras)
        self.logits = logits
        self._graph = graph  # the tail's graph of this forward (one copy per image), until used
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
        graph = TailGraph(split.tail, activations, extras)
        return cls(split, activations, tuple(extras), graph.image_outputs(), graph=graph)

    def gradients(self, targets: BatchTargets | torch.Tensor) -> torch.Tensor:
        """∂f/∂A [N,T,K,h,w] of the targets' scores (fdcam.targets.BatchTargets, or class indices [N,T]),
        from one backward through the tail only (fdcam.gradients.TailGraph).

        The first call with one target per image uses the forward's own graph; otherwise the tail runs
        once on T copies of the activations, so a single backward still gives every gradient. The head
        is never re-run.
        """
        if isinstance(targets, torch.Tensor):
            targets = BatchTargets.from_classes(targets, self.logits.shape[1:])
        copies = targets.shape[1]
        with self._graph_lock:
            # Autograd frees the graph on use: never hand it out twice. Released on any call, so its saved
            # tensors do not outlive the gradients (several targets per image run the tail again).
            graph, self._graph = self._graph, None
        if graph is None or copies != 1:
            graph = TailGraph(self.split.tail, self.activations, self.extras, copies)
        return graph.gradients(targets)
