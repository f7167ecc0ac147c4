"""Recognising a tail's first op and last Linear in its fx graph (`fdcam.split`), to build its `TailShortcut`.

"linear": ops acting on each channel separately and linearly (average pooling, flatten,
`view(batch, -1)`, dropout in eval, identity) then a Linear (VGG16 at `features.30`, ResNet-50 at
`layer4`). "conv": a convolution (1×1 or k×k, any zero padding, stride or dilation; groups = 1),
with a batch norm that follows it (EfficientNet-Lite0 at `_blocks.15`). Other tails that end in a
Linear are "plain". `tail_shortcut` builds the shortcut for one feature shape, checks it against
the plain masked tail on a few masks, and returns None when the graph is not understood (the
caller then runs the tail as it is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..fxgraph import NotASubgraph, is_batch_size, node_arg, record_shapes, subgraph
from .shortcut import TailShortcut, TailWeights
from .sparse import sparse_rows

__all__ = ["tail_shortcut"]

# Modules that act on each channel separately and linearly, with the rank of input they accept
# (None: any rank; a pooling module given an unbatched input would pool across channels).
_POOL_MODULES: dict[type, int] = {
    nn.AdaptiveAvgPool1d: 3,
    nn.AdaptiveAvgPool2d: 4,
    nn.AdaptiveAvgPool3d: 5,
    nn.AvgPool1d: 3,
    nn.AvgPool2d: 4,
    nn.AvgPool3d: 5,
}
_POOL_FUNCTIONS: dict[object, int] = {
    F.adaptive_avg_pool1d: 3,
    F.adaptive_avg_pool2d: 4,
    F.adaptive_avg_pool3d: 5,
    F.avg_pool1d: 3,
    F.avg_pool2d: 4,
    F.avg_pool3d: 5,
    torch._C._nn.adaptive_avg_pool2d: 4,
    torch._C._nn.adaptive_avg_pool3d: 5,
    torch._C._nn.avg_pool2d: 4,
    torch._C._nn.avg_pool3d: 5,
}
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_CONV_FUNCTIONS = (F.conv2d, torch.conv2d)


def tail_shortcut(
    tail: fx.GraphModule,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor] = (),
    *,
    verify: bool = True,
) -> TailShortcut | None:
    """A `TailShortcut` equal to the plain masked tail for features shaped like `features`, or None.

    None when the graph cannot be cut (not an fx GraphModule, a value the body cannot be given) or,
    with `verify`, when a check on a few masks (dense and sparse, all classes and some) disagrees with
    the plain masked tail. `features` [1,K,...] and `extras` are one image's split-crossing tensors.
    """
    if not isinstance(tail, fx.GraphModule) or features.dim() < 3:
        return None
    features = features[:1]
    extras = tuple(extra[:1] for extra in extras)
    try:
        module = _build(tail, features, extras)
    except Exception:  # any graph the analysis does not understand runs as it is
        return None
    if module is None:
        return None
    if verify:
        try:
            agrees = _agrees(module, tail, features, extras)
        except Exception:
            agrees = False
        if not agrees:
            return None
    return module


def _build(tail: fx.GraphModule, features: torch.Tensor, extras: tuple) -> TailShortcut | None:
    shapes = record_shapes(tail, features, *extras)
    placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"]
    features_node, extra_nodes = placeholders[0], placeholders[1:]
    (output_node,) = [n for n in tail.graph.nodes if n.op == "output"]
    result = output_node.args[0]
    if not isinstance(result, fx.Node):
        return None
    num_channels = features.shape[1]
    final_node = _final_linear(tail, result, shapes)
    end = final_node.args[0] if final_node is not None else result
    final = _linear_parameters(tail, final_node) if final_node is not None else None
    extra_inputs = [(node, f"extra_{index}") for index, node in enumerate(extra_nodes)]

    def body(start: fx.Node) -> fx.GraphModule:
        return subgraph(tail, [(start, "start"), *extra_inputs], end, "ShortcutBody")

    matched = _match_linear(tail, features_node, shapes)
    if matched is not None:
        prefix_nodes, linear_node = matched
        flat = shapes.get(linear_node.args[0])
        linear = _linear_parameters(tail, linear_node)
        if flat is not None and len(flat) == 2 and flat[1] % num_channels == 0 and linear.weight.shape[1] == flat[1]:
            prefix = subgraph(tail, [(features_node, "features")], linear_node.args[0], "ShortcutPrefix")
            if not _reads_only(prefix_nodes, tail, features_node, linear_node.args[0]):
                return None
            if linear_node is final_node:  # pooling then the last Linear (ResNet-50 at layer4)
                identity = subgraph(tail, [(linear_node, "start")], linear_node, "ShortcutBody")
                return TailShortcut(
                    "linear",
                    num_channels,
                    identity,
                    None,
                    prefix=prefix,
                    linear=linear,
                    block=flat[1] // num_channels,
                    first_is_final=True,
                )
            return TailShortcut(
                "linear",
                num_channels,
                body(linear_node),
                final,
                prefix=prefix,
                linear=linear,
                block=flat[1] // num_channels,
            )
    conv_node, conv = _match_conv(tail, features_node, shapes)
    if conv is not None:
        norm_node, norm = _following_norm(tail, conv_node)
        start = norm_node if norm is not None else conv_node
        return TailShortcut("conv", num_channels, body(start), final, conv=conv, norm=norm)
    if final is None:
        return None  # nothing to shorten: the caller runs the tail as it is
    return TailShortcut("plain", num_channels, body(features_node), final)


def _reads_only(prefix_nodes, tail, features_node, output) -> bool:
    """Whether the prefix up to `output` consists of the matched channel-wise nodes, helpers and weights."""
    allowed = set(prefix_nodes) | {features_node}
    stack, seen = [output], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in allowed and not _is_helper(node) and node.op != "get_attr":
            return False
        if not is_batch_size(node):
            stack.extend(node.all_input_nodes)
    return True


def _helpers(tail: fx.GraphModule) -> set[fx.Node]:
    return {n for n in tail.graph.nodes if _is_helper(n)}


def _only_user(node: fx.Node, helpers: set[fx.Node]) -> fx.Node | None:
    users = [user for user in node.users if user not in helpers]
    return users[0] if len(users) == 1 else None


def _match_linear(tail: fx.GraphModule, features_node: fx.Node, shapes):
    """(channel-wise prefix nodes, first Linear node) when the tail starts that way, else None."""
    if len(shapes.get(features_node, ())) < 3:
        return None
    helpers = _helpers(tail)
    prefix: list[fx.Node] = []
    current, flattened = features_node, False
    while True:
        user = _only_user(current, helpers)
        if user is None:
            return None
        if _is_linear(user, current, tail):
            return (prefix, user) if flattened else None
        if not _is_channelwise(user, current, tail, shapes, flattened):
            return None
        prefix.append(user)
        current = user
        flattened = flattened or _is_flattening(user, shapes)


def _match_conv(tail: fx.GraphModule, features_node: fx.Node, shapes) -> tuple[fx.Node | None, TailWeights | None]:
    """The tail's first op when it is a 2-D convolution of the features alone (groups 1, zero padding)."""
    if len(shapes.get(features_node, ())) != 4:
        return None, None
    node = _only_user(features_node, _helpers(tail))
    if node is None or not node.args or node.args[0] is not features_node:
        return None, None
    if node.op == "call_module":
        module = tail.get_submodule(node.target)
        if (
            type(module) is not nn.Conv2d
            or module.groups != 1
            or module.padding_mode != "zeros"
            or len(node.args) != 1
            or node.kwargs
        ):
            return None, None
        bias = None if module.bias is None else f"{node.target}.bias"
        geometry = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        return node, TailWeights(tail, f"{node.target}.weight", bias, **geometry)
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        weight, bias = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
        constants = [
            node_arg(node, i, name, default)
            for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))
        ]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None, None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return None, None
        if any(isinstance(value, fx.Node) for value in constants) or constants[3] != 1:
            return None, None
        weights = TailWeights(
            tail,
            weight.target,
            None if bias is None else bias.target,
            stride=constants[0],
            padding=constants[1],
            dilation=constants[2],
        )
        if not isinstance(weights.weight, torch.Tensor) or weights.weight.dim() != 4:
            return None, None
        return node, weights
    return None, None


def _following_norm(tail: fx.GraphModule, conv_node: fx.Node) -> tuple[fx.Node | None, nn.Module | None]:
    """The BatchNorm2d (eval, running statistics) that is the convolution's only user, if any."""
    if len(conv_node.users) != 1:
        return None, None
    (node,) = conv_node.users
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None, None
    module = tail.get_submodule(node.target)
    if type(module) is not nn.BatchNorm2d or module.training or module.running_mean is None:
        return None, None
    return node, module


def _final_linear(tail: fx.GraphModule, result: fx.Node, shapes) -> fx.Node | None:
    """The Linear whose output is the tail's output, when its input is [batch, features]."""
    if len(result.users) != 1 or not result.args or not isinstance(result.args[0], fx.Node):
        return None
    if not _is_linear(result, result.args[0], tail) or len(shapes.get(result.args[0], ())) != 2:
        return None
    return result


def _linear_parameters(tail: fx.GraphModule, node: fx.Node):
    """The Linear module of a call, or the weight and bias of an `F.linear` call read from the tail."""
    if node.op == "call_module":
        return tail.get_submodule(node.target)
    weight_node, bias_node = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
    weights = TailWeights(tail, weight_node.target, None if bias_node is None else bias_node.target)
    if not isinstance(weights.weight, torch.Tensor) or weights.weight.dim() != 2:
        raise NotASubgraph("F.linear weight")
    return weights


@torch.no_grad()
def _agrees(module: TailShortcut, tail: nn.Module, features: torch.Tensor, extras: tuple) -> bool:
    """The shortcut and the plain masked tail agree on all-on, sparse, random 0/1 and random-weight masks,
    for all classes and for a subset, densely and (where it applies) as gathered sums."""
    generator = torch.Generator(device=features.device).manual_seed(0)
    k = features.shape[1]
    ones = torch.ones(k, device=features.device)
    few = torch.zeros(k, device=features.device)
    few[torch.randperm(k, generator=generator, device=features.device)[: max(1, k // 8)]] = 1
    binary = torch.stack(
        [ones, few, 1 - few, (torch.rand(k, device=features.device, generator=generator) > 0.5).float()]
    )
    weighted = torch.rand(1, k, device=features.device, generator=generator)
    masks = torch.cat([binary, weighted]).to(features.dtype)
    masked = features * masks[:, :, None, None]
    expected = tail(masked, *(extra.expand(masks.shape[0], *extra.shape[1:]) for extra in extras))
    if not isinstance(expected, torch.Tensor) or expected.dim() != 2:
        return False
    scale = expected.abs().max().float().clamp_min(1e-6)
    tolerance = (1e-3 if features.dtype in (torch.float32, torch.float64) else 3e-2) * scale

    def close(got, wanted):
        return got.shape == wanted.shape and bool(((got.float() - wanted.float()).abs().max() <= tolerance).item())

    if not close(module(features, masks[None], *extras)[0], expected):
        return False
    classes = torch.tensor([[expected.shape[1] - 1, 0]], device=features.device)
    state = module.prepare(features, classes)
    rows = [extra.expand(binary.shape[0], *extra.shape[1:]) for extra in extras]
    sparse = sparse_rows(masks[None, : binary.shape[0]], k) if module.sparse_capable else None
    hidden = module.body(module.pre_activation(state, masks[None, : binary.shape[0]], sparse), *rows)
    got = module.logits(hidden.reshape(1, binary.shape[0], *hidden.shape[1:]), classes)[0]
    return close(got, expected[: binary.shape[0]][:, classes[0]])


def _is_shape_source(node: fx.Node) -> bool:
    """`t.size()` or `t.shape` whose only use is taking its first entry (the batch size)."""
    is_size = node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs
    is_shape = node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
    return (is_size or is_shape) and bool(node.users) and all(is_batch_size(user) for user in node.users)


def _is_helper(node: fx.Node) -> bool:
    return is_batch_size(node) or _is_shape_source(node)


def _spatial_dims(dims, rank: int) -> bool:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return bool(dims) and all(isinstance(d, int) and -rank <= d < rank and d % rank >= 2 for d in dims)


def _is_channelwise(node: fx.Node, source: fx.Node, tail: fx.GraphModule, shapes, flattened: bool) -> bool:
    """Whether `node` (whose tensor input is `source`) acts on each channel separately and linearly."""
    if not node.args or node.args[0] is not source:
        return False
    others = [n for n in node.all_input_nodes if n is not source]
    if any(not _is_helper(n) for n in others):
        return False
    rank = len(shapes.get(source, ()))
    if node.op == "call_module":
        module = tail.get_submodule(node.target)
        if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
            return True
        if flattened:
            return False
        for kind, wanted in _POOL_MODULES.items():
            if isinstance(module, kind):
                return rank == wanted
        if isinstance(module, nn.Flatten):
            return module.start_dim == 1 and module.end_dim in (-1, rank - 1)
        return False
    if node.op == "call_function":
        if node.target in _DROPOUT_FUNCTIONS:
            return node_arg(node, 2, "training", True) is False
        if flattened:
            return False
        if node.target in _POOL_FUNCTIONS:
            return rank == _POOL_FUNCTIONS[node.target]
        if node.target is torch.flatten:
            return node_arg(node, 1, "start_dim", 0) == 1 and node_arg(node, 2, "end_dim", -1) in (-1, rank - 1)
        if node.target is torch.mean:
            return _spatial_dims(node_arg(node, 1, "dim"), rank) and node_arg(node, 3, "dtype") is None
        return False
    if node.op == "call_method":
        if node.target == "contiguous":
            return True
        if flattened:
            return False
        if node.target == "flatten":
            return node_arg(node, 1, "start_dim", 0) == 1 and node_arg(node, 2, "end_dim", -1) in (-1, rank - 1)
        if node.target == "mean":
            return _spatial_dims(node_arg(node, 1, "dim"), rank) and node.kwargs.get("dtype") is None
        if node.target == "squeeze":
            return _spatial_dims(node_arg(node, 1, "dim"), rank)
        if node.target in ("view", "reshape"):
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            per_image = 1
            for size in shapes.get(source, (1,))[1:]:
                per_image *= size
            return (
                len(sizes) == 2
                and isinstance(sizes[0], fx.Node)
                and is_batch_size(sizes[0])
                and sizes[1] in (-1, per_image)
            )
    return False


def _is_flattening(node: fx.Node, shapes) -> bool:
    return len(shapes.get(node, ())) == 2


def _is_linear(node: fx.Node, source: fx.Node, tail: fx.GraphModule) -> bool:
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        return isinstance(tail.get_submodule(node.target), nn.Linear)
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        weight, bias = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
        return (
            isinstance(weight, fx.Node)
            and weight.op == "get_attr"
            and (bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr"))
        )
    return False
