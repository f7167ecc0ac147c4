"""What a method works on for one batch (`BatchContext`) and what an explanation returns (`Explanation`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forward import ForwardPass
from ..split import SplitModel
from ..targets import BatchTargets
from ..timing import stage

__all__ = ["BatchContext", "Explanation"]


class BatchContext:
    """What a method weighs channels from for one batch: the inputs x, the forward pass, the targets
    (fdcam.targets.BatchTargets, N images × T; class indices [N,T] are taken as class logits).

    `gradients` (∂f/∂A [N,T,K,h,w] of those targets) is computed on first use, or given when the
    caller already has it (the exported explainer differentiates in its own graph).
    """

    def __init__(
        self,
        x: torch.Tensor,
        forward: ForwardPass,
        targets: BatchTargets | torch.Tensor,
        gradients: torch.Tensor | None = None,
    ):
        self.x = x
        self.forward = forward
        if isinstance(targets, torch.Tensor):
            targets = BatchTargets.from_classes(targets, forward.logits.shape[1:])
        self.targets = targets
        self._gradients = gradients
        self._scores: torch.Tensor | None = None

    @property
    def split(self) -> SplitModel:
        return self.forward.split

    @property
    def activations(self) -> torch.Tensor:
        return self.forward.activations

    @property
    def extras(self) -> tuple[torch.Tensor, ...]:
        return self.forward.extras

    @property
    def logits(self) -> torch.Tensor:
        return self.forward.logits

    @property
    def scores(self) -> torch.Tensor:
        """Each image's target scores [N,T] on its own output: f(X), what a switch pass is compared with."""
        if self._scores is None:
            self._scores = self.targets.score(self.logits)
        return self._scores

    @property
    def gradients(self) -> torch.Tensor:
        """∂f/∂A [N,T,K,h,w] of the targets' scores, computed once on first use."""
        if self._gradients is None:
            with stage("backward"):
                self._gradients = self.forward.gradients(self.targets)
        return self._gradients


@dataclass(frozen=True)
class Explanation:
    """One explanation of a batch, from one forward pass: the maps, the model's output they explain, the targets.

    `maps` [N,T,H,W] float32 in [0,1]; `logits` the explained output [N,...] of that same forward pass (for
    [N,C] logits, what `model(x)` returns), detached; `targets` the resolved N × T targets (fdcam.targets).
    """

    maps: torch.Tensor
    logits: torch.Tensor
    targets: BatchTargets

    @property
    def classes(self) -> torch.Tensor | None:
        """The explained class indices [N,T] (int64) when every target is a class logit of [N,C] logits, else None."""
        return self.targets.classes
