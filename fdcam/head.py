"""The head side of an explanation: target activations, logits and the gradients of class logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .split import SplitModel

__all__ = ["HeadOutput", "forward_head", "class_gradients"]


@dataclass
class HeadOutput:
    """Activations [N,K,h,w] at the target layer, the other split-crossing tensors, and logits [N,C]."""

    activations: torch.Tensor
    extras: tuple[torch.Tensor, ...]
    logits: torch.Tensor


@torch.no_grad()
def forward_head(split: SplitModel, x: torch.Tensor) -> HeadOutput:
    """One forward of the whole model through head and tail, keeping what the explanation needs."""
    activations, *extras = split.head(x)
    if activations.dim() != 4:
        raise ValueError(
            f"layer {split.layer!r} outputs a {activations.dim()}-D tensor of shape {tuple(activations.shape)};"
            " CAM methods need a 4-D [N,K,h,w] convolutional layer"
        )
    logits = split.tail(activations, *extras)
    return HeadOutput(activations, tuple(extras), logits)


def class_gradients(split: SplitModel, head: HeadOutput, targets: torch.Tensor) -> torch.Tensor:
    """∂f_c/∂A for every image and requested class: [N,T,K,h,w] from one backward through the tail only.

    The T classes of an image are handled as T copies of its activations in one batch, so a single
    backward gives every gradient; the head is never re-run.
    """
    n, t = targets.shape
    repeat = lambda tensor: tensor.repeat_interleave(t, dim=0)  # noqa: E731 — image-major order
    with torch.enable_grad():
        activations = repeat(head.activations).detach().requires_grad_(True)
        logits = split.tail(activations, *(repeat(e).detach() for e in head.extras))
        selected = logits.gather(1, targets.reshape(n * t, 1)).sum()
        (gradients,) = torch.autograd.grad(selected, activations)
    return gradients.reshape(n, t, *head.activations.shape[1:])
