"""A shortcut body that may change its start rows in place: their first activation writes over them.

The switch passes' start rows (bias + Σ, full − Σ) are buffers the tail engine writes for one chunk and
never reads again, so the body's first element-wise activation can run on them in place: one pass over
the rows instead of a read and a fresh write of as many values (Lite0: ReLU6 over 640 × 1280 × 49).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["owned_start_body"]


def _hardtanh(module: nn.Hardtanh) -> tuple:
    return F.hardtanh, {"min_val": module.min_val, "max_val": module.max_val}


# Module activations and the in-place function that computes the same values, with the module's own arguments.
_MODULES = {
    nn.ReLU: lambda m: (F.relu, {}),
    nn.Hardtanh: _hardtanh,
    nn.ReLU6: _hardtanh,  # a Hardtanh(0, 6)
    nn.Hardswish: lambda m: (F.hardswish, {}),
    nn.SiLU: lambda m: (F.silu, {}),
    nn.LeakyReLU: lambda m: (F.leaky_relu, {"negative_slope": m.negative_slope}),
}
# Functions taking `inplace` after these many positional arguments.
_FUNCTIONS = {F.relu: 1, F.relu6: 1, F.hardtanh: 3, F.hardswish: 1, F.silu: 1, F.leaky_relu: 2}
_TENSOR_FUNCTIONS = {torch.relu: torch.relu_}
# Uses of the start rows that read only their metadata: they see the same values after an in-place activation.
_METADATA_METHODS = {"size", "dim"}


def owned_start_body(body: fx.GraphModule) -> fx.GraphModule:
    """A copy of `body` (start rows, *extras) whose first activation of the start rows runs in place on them, or
    `body` itself when its start rows feed anything else (or no activation this module knows)."""
    start = next((node for node in body.graph.nodes if node.op == "placeholder"), None)
    if start is None:
        return body
    readers = [user for user in start.users if not _reads_metadata(user)]
    if len(readers) != 1 or readers[0].args[:1] != (start,):
        return body
    replacement = _in_place(body, readers[0])
    if replacement is None:
        return body
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(body.graph, copies))
    node = copies[readers[0]]
    target, args, kwargs = replacement
    node.op, node.target = "call_function", target
    node.args, node.kwargs = (node.args[0], *args), kwargs
    owned = fx.GraphModule(body, graph, class_name=type(body).__name__)
    owned.training = body.training
    return owned


def _reads_metadata(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _in_place(body: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(function, extra args, kwargs) computing `node`'s values in place on its first argument, or None."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        module = body.get_submodule(node.target)
        arguments = _MODULES.get(type(module))
        if arguments is None:
            return None
        function, kwargs = arguments(module)
        return function, (), {**kwargs, "inplace": True}
    if node.op == "call_function" and node.target in _FUNCTIONS and len(node.args) <= _FUNCTIONS[node.target]:
        return node.target, tuple(node.args[1:]), {**node.kwargs, "inplace": True}
    if node.op == "call_function" and node.target in _TENSOR_FUNCTIONS and len(node.args) == 1 and not node.kwargs:
        return _TENSOR_FUNCTIONS[node.target], (), {}
    return None
