"""The head side of an explanation: target activations, logits and the gradients of class logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .split import SplitModel

__all__ = ["HeadOutput", "forward_head", "class_gradients"]


@dataclass
class HeadOutput:
    """Activations [N,K,h,w] at the target layer, the other split-crossing tensors, and logits [N,C].

    `graph_activations`/`graph_logits` hold the tail's autograd graph of that same forward, so the
    gradients of one class per image need no second tail pass.
    """

    activations: torch.Tensor
    extras: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    graph_activations: torch.Tensor | None = None
    graph_logits: torch.Tensor | None = None


def forward_head(split: SplitModel, x: torch.Tensor) -> HeadOutput:
    """One forward of the whole model through head and tail, keeping what the explanation needs."""
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
    return HeadOutput(activations, tuple(extras), logits.detach(), leaf, logits)


def class_gradients(split: SplitModel, head: HeadOutput, targets: torch.Tensor) -> torch.Tensor:
    """∂f_c/∂A for every image and requested class: [N,T,K,h,w] from one backward through the tail only.

    One class per image reuses the graph of the head's forward; for T classes the tail runs once on
    T copies of the activations, so a single backward still gives every gradient. The head is never
    re-run.
    """
    n, t = targets.shape
    graph_logits, graph_activations = head.graph_logits, head.graph_activations
    head.graph_logits = head.graph_activations = None  # the forward's graph serves at most once
    if t == 1 and graph_logits is not None:
        (gradients,) = torch.autograd.grad(graph_logits.gather(1, targets).sum(), graph_activations)
        return gradients[:, None]
    repeat = lambda tensor: tensor.repeat_interleave(t, dim=0)  # noqa: E731 — image-major order
    with torch.enable_grad():
        activations = repeat(head.activations).detach().requires_grad_(True)
        logits = split.tail(activations, *(repeat(e).detach() for e in head.extras))
        selected = logits.gather(1, targets.reshape(n * t, 1)).sum()
        (gradients,) = torch.autograd.grad(selected, activations)
    return gradients.reshape(n, t, *head.activations.shape[1:])
