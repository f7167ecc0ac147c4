"""What one masked row of a tail costs in memory, read off the tail's own activations.

A switch pass keeps a few of the tail's activations alive at once (its input, the current op's output,
a temporary), so the bytes of its largest activation times `LIVE_ACTIVATIONS` bound what one mask row
needs; a memory budget divided by that is how many rows one engine call may hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

__all__ = ["LIVE_ACTIVATIONS", "largest_activation_bytes", "row_bytes", "rows_within"]

#: Activations alive at once in one row's pass: measured on EfficientNet-Lite0's `_blocks.15` tail in ONNX
#: Runtime (about 0.8 MB per row against a largest activation of 0.25 MB), with room for allocator slack.
LIVE_ACTIVATIONS = 4


class _LargestOutput(fx.Interpreter):
    """Runs a GraphModule and remembers the bytes of its largest activation (parameters read by `get_attr`
    are the model's, not the row's)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=True)
        self.largest = 0

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        for tensor in [] if node.op == "get_attr" else _tensors(value):
            self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return value


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


@torch.no_grad()
def largest_activation_bytes(tail: torch.nn.Module, features: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the largest tensor the tail computes for one image (the first of `features`, `extras`)."""
    one = [features[:1], *(extra[:1] for extra in extras)]
    if isinstance(tail, fx.GraphModule):
        interpreter = _LargestOutput(tail)
        interpreter.run(*one)
        return max(interpreter.largest, one[0].numel() * one[0].element_size())
    output = tail(*one)
    return max(t.numel() * t.element_size() for t in [*one, *_tensors(output)])


def row_bytes(tail: torch.nn.Module, features: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> int:
    """What one mask row's pass through `tail` holds at once, in bytes (at least one byte)."""
    return max(1, LIVE_ACTIVATIONS * largest_activation_bytes(tail, features, extras))


def rows_within(budget: int, bytes_per_row: int, total: int) -> int:
    """How many of `total` rows fit `budget` bytes (at least one)."""
    return max(1, min(total, int(budget) // max(1, bytes_per_row)))
