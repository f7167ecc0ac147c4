"""The tail of a split model run on a batch of channel masks: the `Tail` protocol and its torch backend.

A switch pass is one forward of the tail on the target activation with some channels zeroed.
`Tail.run(features, masks, extras)` runs B of them at once: features [1,K,h,w] of one image,
masks [B,K] of 0/1 (or any weights), extras the other tensors that cross the split (batch 1),
and returns logits [B, classes]. The ONNX Runtime backend (`fdcam.runtime`) implements the same
protocol over an exported `MaskedTail`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

__all__ = ["Tail", "MaskedTail", "TorchTail", "chunk_size"]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3


@runtime_checkable
class Tail(Protocol):
    """Runs masked copies of one image's features through the tail of a split model."""

    def run(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits [B, classes] of the tail on `features * masks[:, :, None, None]` (features batch 1)."""
        ...


class MaskedTail(nn.Module):
    """`tail(features ⊙ masks[:, :, None, None], *extras)` with batch-1 features and extras broadcast to B.

    This is the module exported to ONNX, so the masks are applied inside the graph and only B×K
    floats travel per explanation.
    """

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail
        self.training = False  # this wrapper's own flag only; see fdcam.factorise.FactorisedMaskedTail

    def forward(self, features: torch.Tensor, masks: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        batch = masks.shape[0]
        masked = features * masks[:, :, None, None]
        expanded = [extra.expand(batch, *extra.shape[1:]) for extra in extras]
        return self.tail(masked, *expanded)


def chunk_size(features: torch.Tensor, memory_budget: int | None, batch_size: int | None, total: int) -> int:
    """How many masks to run per tail call: `batch_size` if given, else what fits `memory_budget` bytes.

    The budget is split over the masked copies of the features, with a factor of 4 for the tail's
    own intermediate activations.
    """
    if batch_size is not None:
        return max(1, min(int(batch_size), total))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    per_mask = 4 * features[0].numel() * features.element_size()
    return max(1, min(total, budget // max(per_mask, 1)))


class TorchTail:
    """The torch backend of `Tail`: batched forwards of the fx tail, chunked under a memory budget.

    With `factorise` (the default), a tail that starts with channel-wise linear ops and a Linear
    (VGG16 at features.30, ResNet50 at layer4) runs factorised (`fdcam.factorise`): the per-channel
    contributions to the Linear are computed once per image and each chunk of masks is one product
    with them; other tails run as `MaskedTail`. The choice is made once per feature shape.
    """

    def __init__(
        self,
        tail: nn.Module,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        factorise: bool = True,
    ):
        self.masked_tail = MaskedTail(tail)
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.factorise = factorise
        self.calls = 0
        self._factorised: dict[tuple, nn.Module | None] = {}

    def factorised_for(self, features: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> nn.Module | None:
        """The factorised tail for features shaped like `features`, or None (pattern absent or off)."""
        if not self.factorise:
            return None
        key = (
            tuple(features.shape[1:]),
            features.dtype,
            features.device,
            tuple((tuple(extra.shape[1:]), extra.dtype) for extra in extras),
        )
        if key not in self._factorised:
            from .factorise import factorised_masked_tail

            self._factorised[key] = factorised_masked_tail(self.masked_tail.tail, features[:1], tuple(extras))
        return self._factorised[key]

    @torch.no_grad()
    def run(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits [B, classes] for the B masks, in as few tail forwards as the budget allows."""
        step = chunk_size(features, self.memory_budget, self.batch_size, masks.shape[0])
        factorised = self.factorised_for(features, extras)
        if factorised is not None:
            contributions = factorised.contributions(features)  # once per image, shared by every chunk

            def forward(chunk: torch.Tensor) -> torch.Tensor:
                return factorised.from_contributions(contributions, chunk, *extras)

        else:

            def forward(chunk: torch.Tensor) -> torch.Tensor:
                return self.masked_tail(features, chunk, *extras)

        outputs = []
        for start in range(0, masks.shape[0], step):
            self.calls += 1
            outputs.append(forward(masks[start:start + step]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
