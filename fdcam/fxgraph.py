"""Small torch.fx helpers shared by the split (`fdcam.split`) and the tail shortcuts (`fdcam.factorise`)."""

from __future__ import annotations

import torch
from torch import fx, nn

from .nodes import eliminate_dead_code, mutates

__all__ = ["fetch_attr", "is_batch_size", "is_traced", "node_arg", "record_shapes", "subgraph"]


def is_batch_size(node: fx.Node) -> bool:
    """`t.size(0)` or `t.shape[0]`: the batch size, which in the tail is the tail's own batch."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" and node.args[1] == 0:
        source = node.args[0]
        return isinstance(source, fx.Node) and (
            (source.op == "call_method" and source.target == "size" and len(source.args) == 1)
            or (
                source.op == "call_function"
                and getattr(source.target, "__name__", "") == "getattr"
                and source.args[1] == "shape"
            )
        )
    return False


def node_arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` of a call node, or its keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fetch_attr(module: nn.Module, target: str):
    """The attribute at a dotted `get_attr` target."""
    for name in target.split("."):
        module = getattr(module, name)
    return module


def record_shapes(module: fx.GraphModule, *inputs: torch.Tensor) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of every tensor-valued node of `module` on `inputs` (one forward, no grad)."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                shapes[node] = tuple(result.shape)
            return result

    with torch.no_grad():
        Recorder(module).run(*inputs)
    return shapes


class NotASubgraph(Exception):
    """The requested part of a graph reads a value it was not given."""


def subgraph(
    graph_module: fx.GraphModule,
    inputs: list[tuple[fx.Node, str]],
    output: fx.Node,
    class_name: str,
) -> fx.GraphModule:
    """A GraphModule computing `output` from the values of the `inputs` nodes (new placeholders, in order).

    Batch-size reads (`is_batch_size`) become the size of the first input; any other value outside
    the inputs and the nodes between them and `output` (constants and weights aside) raises NotASubgraph.
    """
    graph = fx.Graph()
    env: dict[fx.Node, object] = {node: graph.placeholder(name) for node, name in inputs}
    given = set(env)
    batch: list[fx.Node] = []

    def lookup(node: fx.Node):
        if node in env:
            return env[node]
        if is_batch_size(node):
            if not batch:
                batch.append(graph.call_method("size", (env[inputs[0][0]], 0)))
            return batch[0]
        raise NotASubgraph(node.name)

    needed = set()
    stack = [output]
    while stack:  # the ancestors of output, stopping at the inputs and at batch-size reads
        node = stack.pop()
        if node in needed or node in given:
            continue
        needed.add(node)
        if not is_batch_size(node):
            stack.extend(node.all_input_nodes)
    for node in graph_module.graph.nodes:
        if node not in needed and mutates(node) and node.args and node.args[0] in needed:
            raise NotASubgraph(node.name)  # an in-place change of a value the part computes, made outside it
    for node in graph_module.graph.nodes:
        if node in needed and node not in env and not is_batch_size(node):
            if node.op == "placeholder":
                raise NotASubgraph(node.name)
            env[node] = graph.node_copy(node, lookup)
    graph.output(lookup(output))
    module = fx.GraphModule(graph_module, graph, class_name=class_name)
    eliminate_dead_code(module.graph)
    module.recompile()
    return module


def is_traced(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is symbolic (export tracing), so that checks of its values cannot run."""
    from torch._subclasses.fake_tensor import is_fake

    # Not torch.fx's is_fx_tracing(): that one logs a deprecation warning on its first call in a process,
    # which every CLI run printed; these two are what it combines.
    return is_fake(tensor) or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()
