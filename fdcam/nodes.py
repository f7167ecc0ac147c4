"""Target layers by name: fx node names the way torchvision's `get_graph_node_names` prints them.

A target layer is a module name (the module's output, as before) or a node of the model's torch.fx
graph: `_swish_1` is the second call of the module `_swish`, `layer1.0.add` the residual sum of a
block. `layers(model)` lists every name that can be explained, with its output shape.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .concurrency import model_in_eval, tracing

__all__ = [
    "LayerInfo",
    "NamingTracer",
    "ancestors",
    "descendants",
    "eliminate_dead_code",
    "example_input_for",
    "last_spatial_layer",
    "layers",
    "mutates",
    "trace_with_names",
]


class NamingTracer(fx.Tracer):
    """An fx tracer that names each node by its module path, as torchvision's feature extraction does.

    `leaf_names` are module names kept as one opaque call (the target module of a split); `leaf_modules`
    are module types kept opaque (an untraceable submodule). Other keyword arguments go to fx.Tracer
    (`autowrap_modules`, `autowrap_functions`, ...). After `trace`, `names` maps each node to its name
    and `module_outputs` maps each module name to the nodes its calls returned.
    """

    def __init__(
        self, leaf_names: tuple[str, ...] = (), leaf_modules: tuple[type, ...] | list[type] = (), **tracer_kwargs: Any
    ):
        super().__init__(**tracer_kwargs)
        self.leaf_names = tuple(leaf_names)
        self.leaf_modules = tuple(leaf_modules)
        self.names: dict[fx.Node, str] = {}
        self.module_outputs: dict[str, list[fx.Node]] = {}
        self._scope = ""
        self._last_index: dict[str, int] = {}
        self._order: dict[fx.Node, int] = {}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_names:
            return True
        if qualified_name == "" or any(name.startswith(qualified_name + ".") for name in self.leaf_names):
            return False  # never hide a requested leaf inside another one
        return isinstance(module, self.leaf_modules) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward, args, kwargs):
        outer, self._scope = self._scope, self.path_of_module(module)
        created_before = len(self._order)
        try:
            output = super().call_module(module, forward, args, kwargs)
        finally:
            scope, self._scope = self._scope, outer
        if isinstance(output, fx.Proxy) and self._order.get(output.node, -1) >= created_before:  # not a pass-through
            self.module_outputs.setdefault(scope, []).append(output.node)
        return output

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **more):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **more)
        self.names[proxy.node] = self._name_of(proxy.node)
        self._order[proxy.node] = len(self._order)
        return proxy

    def _name_of(self, node: fx.Node) -> str:
        # A leaf module's call is named by its path; any other op by its scope and fx's name, with
        # fx's graph-wide counter replaced by one per name ("relu", "relu_1", ... within a block).
        name = self._scope if node.op == "call_module" else ".".join(filter(None, (self._scope, node.name)))
        if re.fullmatch(r".+_[0-9]+", name):
            name = name.rsplit("_", 1)[0]
        index = self._last_index.get(name)
        self._last_index[name] = 0 if index is None else index + 1
        return name if index is None else f"{name}_{index + 1}"


def trace_with_names(
    model: nn.Module,
    leaf_names: tuple[str, ...] = (),
    tracer_kwargs: dict[str, Any] | None = None,
    torchvision_leaves: bool = True,
) -> tuple[fx.GraphModule, NamingTracer]:
    """The model's fx graph and the tracer that named its nodes; raises the tracer's own error.

    With `torchvision_leaves`, torchvision.ops modules are leaves and its functions are wrapped, as
    in get_graph_node_names, so that the node names are the ones it prints.
    """
    kwargs = dict(tracer_kwargs or {})
    if torchvision_leaves:
        import math

        import torchvision

        ops = [v for v in vars(torchvision.ops).values() if isinstance(v, type) and issubclass(v, nn.Module)]
        kwargs["leaf_modules"] = [*kwargs.get("leaf_modules", ()), *ops]
        kwargs["autowrap_modules"] = tuple(dict.fromkeys((*kwargs.get("autowrap_modules", ()), math, torchvision.ops)))
    tracer = NamingTracer(leaf_names, **kwargs)
    graph = tracer.trace(model)
    return fx.GraphModule(model, graph, class_name=type(model).__name__ + "Traced"), tracer


@dataclass(frozen=True)
class LayerInfo:
    """A target layer: its name, its output shape for the example input, and what produces it.

    `kind` is "module" for a module name, else the fx op of the node ("call_module", "call_function",
    "call_method"); `type` is the module's class name or the function's or method's name.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    type: str


def example_input_for(model: nn.Module) -> torch.Tensor:
    """One image for `model`: its spec's size for fdcam's models, else 224×224 with its first convolution's channels."""
    from .models import spec_of

    spec = spec_of(model)
    size = spec.input_size if spec is not None else (224, 224)
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, *size, generator=generator).to(device, dtype)


def layers(
    model: nn.Module, example_input: torch.Tensor | None = None, tracer_kwargs: dict[str, Any] | None = None
) -> list[LayerInfo]:
    """Every valid target layer of `model` in execution order.

    Valid layers have 4-D outputs that depend on the input and that the logits depend on.

    Modules are listed by name (a module called once; the outer modules first) and every node of the
    eval-mode fx graph by its node name. `example_input` ([1,C,H,W]; default `example_input_for(model)`)
    gives the shapes; `tracer_kwargs` go to the tracer (`leaf_modules`, `autowrap_functions`, ...).
    """
    return [info for _, info in _layers_by_node(model, example_input, tracer_kwargs)]


def last_spatial_layer(model: nn.Module, tracer_kwargs: dict[str, Any] | None = None) -> LayerInfo | None:
    """The last layer whose output is [1,K,h,w] with h or w above 1, by its outermost module's name if it has one."""
    found = [(node, info) for node, info in _layers_by_node(model, None, tracer_kwargs) if max(info.shape[-2:]) > 1]
    if not found:
        return None
    last = found[-1][0]
    return next(info for node, info in found if node is last)


def _layers_by_node(
    model: nn.Module, example_input: torch.Tensor | None, tracer_kwargs: dict[str, Any] | None
) -> list[tuple[fx.Node, LayerInfo]]:
    x = example_input_for(model) if example_input is None else example_input[:1]
    with model_in_eval(model), tracing():
        traced, tracer = trace_with_names(model, tracer_kwargs=tracer_kwargs)
        shapes = _output_shapes(traced, x)
    graph_nodes = list(traced.graph.nodes)
    output = next(n for n in graph_nodes if n.op == "output")
    inputs = [n for n in graph_nodes if n.op == "placeholder"]
    feeds_output = ancestors([output])
    from_input = set().union(*(descendants(n) for n in inputs))
    modules = dict(model.named_modules())
    modules_at: dict[fx.Node, list[str]] = {}
    for name, outputs in tracer.module_outputs.items():
        if name and len(outputs) == 1:
            modules_at.setdefault(outputs[0], []).append(name)
    found: list[tuple[fx.Node, LayerInfo]] = []
    for node in graph_nodes:
        shape = shapes.get(node)
        if shape is None or len(shape) != 4 or node not in feeds_output or node not in from_input:
            continue
        node_name = tracer.names.get(node)
        for name in sorted(modules_at.get(node, []), key=lambda n: n.count(".")):
            found.append((node, LayerInfo(name, shape, "module", type(modules[name]).__name__)))
        if node_name is not None and node_name not in modules_at.get(node, []):
            found.append((node, LayerInfo(node_name, shape, node.op, _type_of(node, modules))))
    return found


def _type_of(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _output_shapes(traced: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, tuple[int, ...]]:
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class ShapeRecorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                shapes[node] = tuple(result.shape)
            return result

    with torch.no_grad():
        ShapeRecorder(traced).run(x)
    return shapes


def descendants(node: fx.Node) -> set[fx.Node]:
    """The nodes that use `node`'s value, directly or not."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """`nodes` and every node whose value they use, directly or not."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


_IN_PLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor")
)


def mutates(node: fx.Node) -> bool:
    """Whether the node changes a tensor in place: `x.relu_()`, `torch.relu_(x)`, `x += y`, `F.relu(x, inplace=True)`
    or a module built with `inplace=True`. Such a node matters even where nothing uses its result."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        in_place_name = name.endswith("_") and not name.endswith("__")
        return node.target in _IN_PLACE_OPERATORS or in_place_name or node.kwargs.get("inplace") is True
    if node.op == "call_module" and node.graph.owning_module is not None:
        return getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False) is True
    return False


def eliminate_dead_code(graph: fx.Graph) -> None:
    """`graph.eliminate_dead_code()` that keeps in-place calls (`mutates`): fx counts a method call as pure, and
    removing `y.relu_()` whose result nobody uses would leave `y` unchanged for the nodes that read it after."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or mutates(node))


def with_mutations(needed: set[fx.Node], graph: fx.Graph, before: fx.Node) -> set[fx.Node]:
    """`needed` (a set closed under `ancestors`) and the in-place calls placed before `before` that change one of
    its nodes' tensors, with what they read: the value `needed` computes includes those changes."""
    needed = set(needed)
    while True:
        added = []
        for node in graph.nodes:
            if node is before:
                break
            if node not in needed and mutates(node) and node.args and node.args[0] in needed:
                added.append(node)
        if not added:
            return needed
        needed |= ancestors(added)
