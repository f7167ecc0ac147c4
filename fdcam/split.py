"""Split a CNN at a target layer into a head (input → activation) and a tail (activation → logits).

The split is derived from the model's torch.fx graph. The target is a module that is called once in
the forward pass, or one node of the graph named as torchvision's `get_graph_node_names` prints it
(`_swish_1`: the second call of `_swish`; see fdcam.nodes), so a module called twice can be cut at
one of its call sites. Values the tail needs that the head computed besides the target activation
(the skip tensor of a residual block, say) become extra tail inputs, computed once per image. The
user's modules are shared, never copied or changed.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .concurrency import model_in_eval, tracing
from .errors import SplitError, first_line
from .fxgraph import is_batch_size as _is_batch_size
from .nodes import (
    NamingTracer,
    ancestors,
    descendants,
    eliminate_dead_code,
    mutates,
    trace_with_names,
    with_mutations,
)
from .targets import OutputSelector, select_output

__all__ = ["SplitError", "SplitModel", "resolve_layer_name", "split_model"]


@dataclass(eq=False)
class SplitModel:
    """A model cut at `layer`: `head(x) -> (activation, *extras)`, `tail(activation, *extras) -> logits`.

    Compared and hashed by identity, so that what is built for one split (its tail engine) is kept per object.
    """

    head: fx.GraphModule
    tail: fx.GraphModule
    layer: str
    num_extras: int


def resolve_layer_name(
    model: nn.Module, target_layer: str | nn.Module, tracer_kwargs: dict[str, Any] | None = None
) -> str:
    """The dotted module name of `target_layer` in `model`, or its fx node name; unknown names list the closest ones."""
    names = {name: module for name, module in model.named_modules() if name}
    if isinstance(target_layer, nn.Module):
        for name, module in names.items():
            if module is target_layer:
                return name
        raise SplitError("the target layer module is not a submodule of the model")
    if target_layer in names:
        return target_layer
    try:
        with model_in_eval(model), tracing():
            node_names, untraceable = list(_trace(model, (), tracer_kwargs)[1].names.values()), ""
    except SplitError as error:
        node_names, untraceable = [], f"; fx node names are unknown: {error}"
    if target_layer in node_names:
        return target_layer
    close = difflib.get_close_matches(str(target_layer), list(names) + node_names, n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise SplitError(
        f"no layer named {target_layer!r} in the model{hint}{untraceable or ' (fdcam.layers(model) lists them)'}"
    )


def _trace(
    model: nn.Module, leaf_names: tuple[str, ...], tracer_kwargs: dict[str, Any] | None
) -> tuple[fx.GraphModule, NamingTracer]:
    # A module target is traced as before; node names are those of get_graph_node_names.
    try:
        return trace_with_names(model, leaf_names, tracer_kwargs, torchvision_leaves=not leaf_names)
    except Exception as error:  # fx raises many types; the user needs one line
        raise SplitError(
            f"the model cannot be traced by torch.fx ({first_line(error, None)}); declare the untraceable submodules"
            " leaves with tracer_kwargs={'leaf_modules': [ModuleType]}"
        ) from error


def _record_values(traced: fx.GraphModule, x: torch.Tensor, wanted: set[fx.Node]) -> dict[fx.Node, object]:
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node in wanted:
                values[node] = result
            return result

    with torch.no_grad():
        Recorder(traced).run(x)
    return values


def split_model(
    model: nn.Module,
    target_layer: str | nn.Module,
    example_input: torch.Tensor,
    tracer_kwargs: dict[str, Any] | None = None,
    output: OutputSelector = None,
) -> SplitModel:
    """Cut `model` at `target_layer` (module or fx node name) using its fx graph.

    `example_input` fixes non-batch sizes that cross the cut.

    `tracer_kwargs` go to the fx tracer: `leaf_modules` (module types kept as one call, for submodules
    fx cannot trace), `autowrap_functions`, ... `output` selects the entry of a dict or tuple output
    that the tail returns (see fdcam.targets.select_output; "out" of a dict that has it). Runs under
    fdcam.concurrency's process-wide tracing lock: fx patches process-wide functions while it traces.
    """
    with tracing():
        return _split_model(model, target_layer, example_input, tracer_kwargs, output)


def _split_model(
    model: nn.Module,
    target_layer: str | nn.Module,
    example_input: torch.Tensor,
    tracer_kwargs: dict[str, Any] | None,
    output: OutputSelector = None,
) -> SplitModel:
    layer = resolve_layer_name(model, target_layer, tracer_kwargs)
    is_module = layer in dict(model.named_modules())
    traced, tracer = _trace(model, (layer,) if is_module else (), tracer_kwargs)
    graph = traced.graph
    _select_graph_output(graph, output)
    if is_module:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    else:
        calls = [node for node, name in tracer.names.items() if name == layer]
    if not calls:
        raise SplitError(f"layer {layer!r} is not called in the model's forward pass")
    if len(calls) > 1:
        # As get_graph_node_names prints them, a module's name is also the name of its first call.
        sites = ", ".join(repr(tracer.names[n]) for n in calls[1:])
        warnings.warn(
            f"module {layer!r} is called {len(calls)} times in one forward pass: explaining its first call;"
            f" the others are the nodes {sites}",
            UserWarning,
            stacklevel=4,
        )
    target = calls[0]
    outputs = [n for n in graph.nodes if n.op == "output"]
    input_nodes = [n for n in graph.nodes if n.op == "placeholder"]

    tail_region = descendants(target)
    if outputs[0] not in tail_region:
        raise SplitError(f"the model's output does not depend on layer {layer!r}")
    depends_on_input = set().union(*(descendants(n) for n in input_nodes)) | set(input_nodes)

    # Values used by the tail but produced outside it: constants are copied into the tail,
    # input-dependent ones cross the cut.
    crossing: list[fx.Node] = []
    copied: set[fx.Node] = set()
    for node in graph.nodes:
        if node not in tail_region:
            continue
        for source in node.all_input_nodes:
            if source is target or source in tail_region:
                continue
            if source in depends_on_input:
                if source not in crossing:
                    crossing.append(source)
            else:
                copied |= ancestors([source])

    batch_sizes = [n for n in crossing if _is_batch_size(n)]
    others = [n for n in crossing if n not in batch_sizes]
    values = _record_values(traced, example_input, set(others))
    tensor_extras = [n for n in others if isinstance(values[n], torch.Tensor)]
    constants = {n: values[n] for n in others if n not in tensor_extras}

    head = _build_head(traced, target, tensor_extras)
    tail = _build_tail(traced, target, tail_region | copied, tensor_extras, batch_sizes, constants)
    return SplitModel(head=head, tail=tail, layer=layer, num_extras=len(tensor_extras))


def _select_graph_output(graph: fx.Graph, selector: OutputSelector) -> None:
    """Make the graph return only the explained entry of a dict or tuple output; the rest becomes dead code
    (a segmentation model's auxiliary head is then neither in the head nor in the tail)."""
    (node,) = [n for n in graph.nodes if n.op == "output"]
    chosen = select_output(node.args[0], selector)
    if not isinstance(chosen, fx.Node):
        raise SplitError(f"the model's output entry {selector!r} is not a tensor the graph computes")
    node.args = (chosen,)
    eliminate_dead_code(graph)


def _build_head(traced: fx.GraphModule, target: fx.Node, extras: list[fx.Node]) -> fx.GraphModule:
    last = max([target, *extras], key=list(traced.graph.nodes).index)
    needed = with_mutations(ancestors([target, *extras]), traced.graph, last)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in traced.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output((env[target], *(env[n] for n in extras)))
    head = fx.GraphModule(traced, graph, class_name="Head")
    eliminate_dead_code(head.graph)
    head.recompile()
    return head


def _build_tail(
    traced: fx.GraphModule,
    target: fx.Node,
    region: set[fx.Node],
    extras: list[fx.Node],
    batch_sizes: list[fx.Node],
    constants: dict[fx.Node, object],
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    env[target] = graph.placeholder("features")
    for index, node in enumerate(extras):
        env[node] = graph.placeholder(f"extra_{index}")
    # A tail that changes its inputs in place (`y.mul_(2)` on the target's output) works on copies: the caller's
    # activations make the map, and autograd refuses in-place changes of a leaf that requires grad.
    changed = {node.args[0] for node in region if mutates(node) and node.args} & {target, *extras}
    for node in changed:
        env[node] = graph.call_method("clone", (env[node],))
    for node in batch_sizes:
        env[node] = graph.call_method("size", (env[target], 0))
    env.update(constants)
    for node in traced.graph.nodes:
        if node in region and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    tail = fx.GraphModule(traced, graph, class_name="Tail")
    eliminate_dead_code(tail.graph)
    tail.recompile()
    return tail
