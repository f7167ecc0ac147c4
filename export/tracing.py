"""The explainer module traced into plain ATen ops (`make_fx`, symbolic batch; backward ops the ONNX translator
lacks rewritten as forward ops) and exported with torch.onnx.export(dynamo=True)."""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator, Sequence

import onnx
import torch
from torch import nn

from fdcam.errors import ExportError, first_line

from .explainer_io import OUTPUT_NAMES, explainer_inputs
from .graph_tail import drop_unused_initializers
from .onnx_io import fold_weight_constants

__all__ = ["Traced", "export_onnx", "op_message", "trace"]


def _decompositions() -> dict:
    """Core ATen decompositions, plus backward ops the ONNX translator lacks written as forward ops."""
    from torch._decomp import core_aten_decompositions

    aten = torch.ops.aten
    table = dict(core_aten_decompositions())

    def convolution_backward(
        grad_output,
        input,
        weight,
        bias_sizes,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        output_mask,
    ):
        if transposed:
            raise ExportError(
                "the tail's gradient needs aten.convolution_backward of a transposed convolution, which is not exported"
            )
        grad_input = grad_weight = grad_bias = None
        if output_mask[0]:
            # ∂/∂input of a convolution is the transposed convolution with the same weights; output_padding
            # restores the rows a strided forward dropped.
            spatial = input.dim() - 2
            extra = [
                input.shape[2 + i]
                - (
                    (grad_output.shape[2 + i] - 1) * stride[i]
                    - 2 * padding[i]
                    + dilation[i] * (weight.shape[2 + i] - 1)
                    + 1
                )
                for i in range(spatial)
            ]
            grad_input = aten.convolution.default(
                grad_output, weight, None, stride, padding, dilation, True, extra, groups
            )
        if output_mask[1] or output_mask[2]:
            raise ExportError("the tail's gradient needs aten.convolution_backward for weights, which is not exported")
        return grad_input, grad_weight, grad_bias

    def adaptive_avg_pool2d_backward(grad_output, input):
        # The adjoint of adaptive average pooling: each input pixel gets the mean-weights of every window it lies in.
        h, w = input.shape[-2], input.shape[-1]
        oh, ow = grad_output.shape[-2], grad_output.shape[-1]
        rows = _pool_matrix(h, oh, input)
        cols = _pool_matrix(w, ow, input)
        return torch.einsum("...ij,ia,jb->...ab", grad_output, rows, cols).to(input.dtype)

    table[aten.convolution_backward.default] = convolution_backward
    table[aten._adaptive_avg_pool2d_backward.default] = adaptive_avg_pool2d_backward
    # The ONNX registry has no translation of `_adaptive_avg_pool2d` (a pool to a size that does not divide the
    # input, VGG16's 7×7): decomposed here as torch.onnx.export's decomposition pass would (torch._decomp's), that
    # pass need not trace the whole program once more (`_decomposition_only_when_needed`; 5.5 s of VGG16's export).
    pool = aten._adaptive_avg_pool2d.default
    if pool in torch._decomp.decomposition_table:
        table[pool] = torch._decomp.decomposition_table[pool]
    return table


def _pool_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """[out, size] weights of adaptive average pooling along one axis (static sizes; built in Python so
    the trace stores it as one constant)."""
    size, out = int(size), int(out)
    rows = []
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def trace(module: nn.Module, image: torch.Tensor, classes: torch.Tensor | None, region: torch.Tensor | None = None):
    """make_fx (symbolic) of the whole explanation with parameters as inputs: a graph of ATen ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    names = list(params) + list(buffers)

    def explain(tensors, image, classes, region):
        state = dict(zip(names, tensors))
        args = tuple(t for t in (image, classes, region) if t is not None)
        return torch.func.functional_call(module, state, args)

    tensors = [*params.values(), *buffers.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fake = _batch_symbolic_inputs(tensors, image, classes, region)
        graph = make_fx(explain, decomposition_table=_decompositions(), tracing_mode="symbolic")(*fake)
    for module in list(graph.modules()):  # the chunks' scan bodies are graphs of their own
        if isinstance(module, torch.fx.GraphModule):
            _out_of_place(module)
    return graph, names, tensors


def _out_of_place(graph_module: torch.fx.GraphModule) -> None:
    """In-place ops (a model's ReLU(inplace=True), `out += identity`, Hardswish(inplace=True)'s `copy_`) rewritten
    as their out-of-place forms where nothing else can see the mutation: the mutated tensor is fresh (made by an op
    whose output aliases no input) and its other users only read it (their outputs alias nothing) before the
    in-place op, so they see the value before the mutation either way; make_fx hands every later reader the
    in-place op's output. The export's decomposition pass then has nothing to do
    (`_decomposition_only_when_needed`); any other mutation is left to that pass."""
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    changed = False
    for node in graph_module.graph.nodes:
        functional = _functional_form(node)
        if functional is None or not isinstance(node.args[0], torch.fx.Node):
            continue
        mutated = node.args[0]
        if not (_makes_fresh_tensor(mutated) or _private_view(mutated)):
            continue
        readers = [user for user in mutated.users if user is not node]
        if not all(order[user] < order[node] and _reads_only(user) for user in readers):
            continue
        node.target, changed = functional, True
    if changed:
        graph_module.recompile()


def _private_view(node: torch.fx.Node) -> bool:
    """Whether the node is a view (reshape) of a fresh tensor, or of such a view, that has no other user: a
    mutation through it changes a tensor nothing else reads."""
    if node.op != "call_function" or node.target not in _VIEWS or not isinstance(node.args[0], torch.fx.Node):
        return False
    base = node.args[0]
    return len(base.users) == 1 and (_makes_fresh_tensor(base) or _private_view(base))


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _reads_only(node: torch.fx.Node) -> bool:
    """Whether the node is an ATen op that mutates nothing and returns no alias of its inputs."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    return not schema.is_mutable and all(value.alias_info is None for value in schema.returns)


def _functional_form(node: torch.fx.Node):
    """The out-of-place overload of an in-place ATen op that mutates only its first argument and returns it."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    name = schema.name.split("::")[-1]
    mutated = [argument for argument in schema.arguments if argument.alias_info and argument.alias_info.is_write]
    if not name.endswith("_") or name.endswith("__") or len(mutated) != 1 or mutated[0] is not schema.arguments[0]:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    if functional is None or functional._schema.is_mutable:
        return None
    same_arguments = [a.name for a in functional._schema.arguments] == [a.name for a in schema.arguments]
    return functional if same_arguments else None


def _makes_fresh_tensor(node: torch.fx.Node) -> bool:
    """Whether the node's output is a new tensor: made by an ATen op whose outputs alias none of its inputs (one of
    them, taken by getitem, for an op with several: batch norm's)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return _reads_only(node)


def _batch_symbolic_inputs(
    tensors: list[torch.Tensor], image: torch.Tensor, classes: torch.Tensor | None, region: torch.Tensor | None = None
):
    """Fake inputs whose only symbolic sizes are the batch N (and the class count T): every other size
    stays a number, which keeps the shape reasoning (sympy) of the trace small."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)

    def fake(tensor: torch.Tensor, dynamic: Sequence[int] = ()):
        sizes = [DimDynamic.DYNAMIC if dim in dynamic else DimDynamic.STATIC for dim in range(tensor.dim())]
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    fake_tensors = [fake(tensor) for tensor in tensors]
    fake_region = None if region is None else fake(region, (0, 1))
    return fake_tensors, fake(image, (0,)), None if classes is None else fake(classes, (0, 1)), fake_region


class Traced(nn.Module):
    """The traced graph with the weights held as buffers, so the exported file carries them inside."""

    def __init__(self, graph, names: list[str], tensors: list[torch.Tensor], classes_input: bool):
        super().__init__()
        self.graph_module = graph
        self.count = len(tensors)
        self.classes_input = classes_input
        for index, tensor in enumerate(tensors):
            self.register_buffer(f"w{index}", tensor.detach(), persistent=True)

    def forward(self, image: torch.Tensor, classes: torch.Tensor | None = None, region: torch.Tensor | None = None):
        tensors = [getattr(self, f"w{index}") for index in range(self.count)]
        return self.graph_module(tensors, image, classes, region)


def export_onnx(
    module: nn.Module, image: torch.Tensor, classes: torch.Tensor | None, opset: int, region: torch.Tensor | None = None
) -> onnx.ModelProto:
    batch = torch.export.Dim("N", min=1)
    if classes is None:
        args, dynamic = (image,), ({0: batch},)
    else:
        rows = {0: batch, 1: torch.export.Dim("T", min=1)}
        args, dynamic = (image, classes), ({0: batch}, rows)
        if region is not None:
            args, dynamic = (*args, region), (*dynamic, rows)
    with warnings.catch_warnings(), _decomposition_only_when_needed():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=explainer_inputs(classes is not None, region is not None),
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
        )
    fold_weight_constants(program.model, max((t.numel() for t in module.buffers()), default=0))
    proto = program.model_proto
    drop_unused_initializers(proto.graph)
    return proto


_SCAN = getattr(torch.ops.higher_order, "scan", None)
#: Set to False to let torch.onnx.export run its decomposition pass on every program (a comparison's baseline).
SKIP_IDLE_DECOMPOSITION = True


@contextlib.contextmanager
def _decomposition_only_when_needed() -> Iterator[None]:
    """Within it, torch.onnx.export skips its decomposition pass on a program that pass would not change.

    That pass traces the whole program once more (after `trace` and torch.export's capture: 5 of Lite0's 14 s) to
    decompose the ops the ONNX registry lacks and to remove mutations. `trace`'s graph is core ATen with no
    mutation; a program holding an op the pass decomposes, a mutation or anything but an ATen op still gets it.
    The export runs under the process-wide tracing lock, so no other export of fdcam sees the swap.
    """
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes

        original = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):  # another torch: its own pass, unchanged
        yield
        return

    def decompose(program, registry):
        table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
        graphs = [module.graph for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)]
        changed = any(_changed_by_decomposition(node, table) for graph in graphs for node in graph.nodes)
        return original(program, registry) if changed or not SKIP_IDLE_DECOMPOSITION else program

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


def _changed_by_decomposition(node: torch.fx.Node, table: dict) -> bool:
    """Whether the decomposition pass could change this node: an op of its table, a mutation, or a call other than
    arithmetic on sizes and the chunks' `scan` (whose body graphs are checked node by node as well)."""
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target in table or node.target._schema.is_mutable
    return not (getattr(node.target, "__module__", None) == "_operator" or node.target is _SCAN)


def op_message(error: BaseException) -> str:
    """The first line of an export error, naming the ATen op when the message carries one."""
    import re

    text = str(error)
    found = re.search(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", text)
    first = first_line(error)
    return f"no ONNX translation for {found.group(1)}: {first}" if found and found.group(1) not in first else first
