"""What a tail graph computes (`TailForm`, fdcam.engine's: derived from the pass plan) and its input names;
shared by the tail exporter, its checks and fdcam.runtime."""

from __future__ import annotations

from fdcam.engine import plan_passes
from fdcam.engine.forms import TailForm, input_names
from fdcam.factorise import TailShortcut

__all__ = ["TailForm", "gathers", "input_names"]


def gathers(shortcut: TailShortcut | None, num_channels: int, sparsity: int | None) -> bool:
    """Whether a graph of a tail with `shortcut` gathers a first convolution's channels under the bound
    `sparsity` (the planner's choice, fdcam.engine.plan_passes, for exported graphs)."""
    import torch

    features = torch.empty(1, num_channels, 1, 1, device="meta")
    return plan_passes(shortcut, features, num_rows=1, sparsity=sparsity, engine="graph").gathers
