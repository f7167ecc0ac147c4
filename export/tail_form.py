"""What a tail graph computes (`TailForm`: the classes input, gathered sums under a bound) and its input
names; shared by the tail exporter, its checks and fdcam.runtime."""

from __future__ import annotations

from dataclasses import dataclass

from fdcam.factorise import TailShortcut
from fdcam.tail import CONV_SPARSE_SHARE

__all__ = ["TailForm", "gathers", "input_names"]


@dataclass(frozen=True)
class TailForm:
    """What a tail graph computes: with `classes`, it takes classes [N,T] and returns [N,M,T]; with `bound`,
    a first convolution's pre-activations are gathered sums over `bound` channels per 0/1 mask row."""

    classes: bool = False
    bound: int | None = None

    @property
    def suffix(self) -> str:
        """The form in a graph's file name: "" for the plain form."""
        return ("-classes" if self.classes else "") + (f"-sparse{self.bound}" if self.bound is not None else "")


def gathers(shortcut: TailShortcut | None, num_channels: int, sparsity: int | None) -> bool:
    """Whether masks whose rows have at most `sparsity` ones or zeros take the gathered sums of a first
    convolution (as fdcam.tail.TorchTail does for a convolution) rather than its dense product."""
    return (
        shortcut is not None
        and shortcut.kind == "conv"
        and sparsity is not None
        and 1 <= sparsity <= CONV_SPARSE_SHARE * num_channels
    )


def input_names(num_extras: int, classes: bool = False) -> list[str]:
    """Graph input names: features, masks, classes (when the graph takes them), then extra_0 … extra_{n-1}."""
    return ["features", "masks", *(["classes"] if classes else []), *(f"extra_{index}" for index in range(num_extras))]
