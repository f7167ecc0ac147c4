"""What an exported tail graph computes (`TailForm`, derived from a `PassPlan`) and its input names: the contract
between the ONNX Runtime engine (fdcam.runtime) and the tail exporter (fdcam.export)."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import PassPlan

__all__ = ["TailForm", "input_names"]


@dataclass(frozen=True)
class TailForm:
    """What a tail graph computes: with `classes`, it takes classes [N,T] and returns [N,M,T]; with `bound`,
    a first convolution's pre-activations are gathered sums over `bound` channels per 0/1 mask row."""

    classes: bool = False
    bound: int | None = None

    @classmethod
    def of(cls, plan: PassPlan) -> TailForm:
        """The graph that runs `plan`: its classes input, and its bound when the plan gathers."""
        return cls(classes=plan.classes, bound=plan.bound if plan.gathers else None)

    @property
    def suffix(self) -> str:
        """The form in a graph's file name: "" for the plain form."""
        return ("-classes" if self.classes else "") + (f"-sparse{self.bound}" if self.bound is not None else "")


def input_names(num_extras: int, classes: bool = False) -> list[str]:
    """Graph input names: features, masks, classes (when the graph takes them), then extra_0 … extra_{n-1}."""
    return ["features", "masks", *(["classes"] if classes else []), *(f"extra_{index}" for index in range(num_extras))]
