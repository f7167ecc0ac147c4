"""Factorised switch passes: masking commutes with a tail that starts with channel-wise linear ops and a Linear.

When the tail of a split model begins with ops that act on each channel separately and linearly
(average pooling, flatten, `view(batch, -1)`, dropout in eval, identity) followed by a Linear
(VGG16 at `features.30`: AdaptiveAvgPool2d → flatten → Linear 25088→4096; ResNet50 at `layer4`:
AdaptiveAvgPool2d → flatten → Linear 2048→1000), the Linear's pre-activation for a channel mask m is

    z(m) = W · vec(prefix(A ⊙ m)) + b = Σ_k m_k · W[:, block_k] · vec(prefix(A)_k) + b = m · C + b,

with C[k] = W[:, block_k] · vec(prefix(A)_k) computed once per image ([K, out]). All B masked
pre-activations are then one [B,K]×[K,out] product, and the rest of the tail runs from there. For
VGG16 this replaces B×(25088×4096) multiply-adds by 512×25088×4096 once plus B×(512×4096).

`factorised_masked_tail` recognises the pattern in the fx graph of a tail (`fdcam.split`) and returns
a plain `nn.Module` with `MaskedTail`'s signature, exportable with `torch.onnx.export`; it returns
None when the pattern does not apply (a tail starting with a convolution, say), and the caller
falls back to `MaskedTail`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .split import _is_batch_size
from .tail import MaskedTail

__all__ = ["FactorisedMaskedTail", "factorised_masked_tail"]

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


class _LinearParameters(nn.Module):
    """Holds (shares, never copies) the weight and bias of a functional `F.linear` call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)


class FactorisedMaskedTail(nn.Module):
    """`MaskedTail(tail)` computed as masks @ C + b, C the per-channel contributions to the first Linear.

    `forward(features [1,K,...], masks [B,K], *extras [1,...]) -> logits [B, classes]`, as MaskedTail.
    `contributions(features)` ([N, K, out]) and `pre_activation(C, masks)` / `from_contributions(C,
    masks, *extras)` split the work so that a chunked caller computes C once per image. The modules of the tail are shared, not copied.
    """

    def __init__(self, prefix: nn.Module, linear: nn.Module, rest: nn.Module, num_channels: int, block: int):
        super().__init__()
        self.prefix = prefix  # features [1,K,...] -> [1, K*block], channel-major
        self.linear = linear  # .weight [out, K*block], .bias [out] or None
        self.rest = rest  # (pre-activation [B,out], *extras [B,...]) -> logits
        self.num_channels = int(num_channels)
        self.block = int(block)
        self.out_features = int(linear.weight.shape[0])
        self.has_bias = linear.bias is not None
        # Eval flags on the new wrappers only (the shared modules keep theirs): an exporter that puts
        # the module in eval mode and then "restores" train mode must not switch the user's dropout on.
        for wrapper in (self, prefix, rest, linear):
            if isinstance(wrapper, (FactorisedMaskedTail, fx.GraphModule, _LinearParameters)):
                wrapper.training = False

    def contributions(self, features: torch.Tensor) -> torch.Tensor:
        """C [N, K, out]: C[n, k] = W[:, block_k] @ vec(prefix(features)_k) for each image n."""
        blocks = self.prefix(features).reshape(-1, self.num_channels, self.block).transpose(0, 1)  # [K,N,P]
        # A strided view of W as [K, P, out]: one batched product, no copy of the weight.
        weight = self.linear.weight.reshape(self.out_features, self.num_channels, self.block).permute(1, 2, 0)
        return torch.bmm(blocks, weight).transpose(0, 1)

    def pre_activation(self, contributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The Linear's output [B, out] for masks [B,K] from one image's contributions C [K, out]."""
        if self.has_bias:
            return torch.addmm(self.linear.bias, masks, contributions)
        return torch.mm(masks, contributions)

    def from_contributions(self, contributions: torch.Tensor, masks: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of the B masks from the contributions C [K, out] of one image."""
        batch = masks.shape[0]
        expanded = [extra.expand(batch, *extra.shape[1:]) for extra in extras]
        return self.rest(self.pre_activation(contributions, masks), *expanded)

    def forward(self, features: torch.Tensor, masks: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        return self.from_contributions(self.contributions(features)[0], masks, *extras)


def factorised_masked_tail(
    tail: fx.GraphModule,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor] = (),
    *,
    verify: bool = True,
) -> FactorisedMaskedTail | None:
    """A `FactorisedMaskedTail` equal to `MaskedTail(tail)` for features shaped like `features`, or None.

    None when the tail does not start with channel-wise linear ops and a Linear, or (with `verify`)
    when a check on three masks disagrees with `MaskedTail`. `features` [1,K,...] and `extras` are
    one image's split-crossing tensors; they fix the shapes the module is built for.
    """
    if not isinstance(tail, fx.GraphModule) or features.dim() < 2:
        return None
    features = features[:1]
    extras = tuple(extra[:1] for extra in extras)
    try:
        shapes = _record_shapes(tail, features, extras)
        plan = _match(tail, shapes)
        if plan is None:
            return None
        prefix_nodes, linear_node, features_node, extra_nodes, helpers = plan
        linear = _linear_parameters(tail, linear_node)
        prefix = _build_prefix(tail, features_node, prefix_nodes, helpers, linear_node.args[0])
        rest = _build_rest(tail, features_node, extra_nodes, prefix_nodes, helpers, linear_node)
    except Exception:  # any graph the analysis does not understand runs unfactorised (MaskedTail)
        return None
    if rest is None or linear is None:
        return None
    num_channels = features.shape[1]
    flat = shapes.get(linear_node.args[0])
    if flat is None or len(flat) != 2 or flat[1] % num_channels or linear.weight.shape[1] != flat[1]:
        return None
    module = FactorisedMaskedTail(prefix, linear, rest, num_channels, flat[1] // num_channels)
    if verify:
        try:
            agrees = _agrees(module, tail, features, extras)
        except Exception:
            agrees = False
        if not agrees:
            return None
    return module


class _NoMatch(Exception):
    pass


def _record_shapes(tail: fx.GraphModule, features: torch.Tensor, extras: tuple) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of every tensor-valued node of the tail on one image (one batch-1 forward)."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                shapes[node] = tuple(result.shape)
            return result

    with torch.no_grad():
        Recorder(tail).run(features, *extras)
    return shapes


def _is_shape_source(node: fx.Node) -> bool:
    """`t.size()` or `t.shape` whose only use is taking its first entry (the batch size)."""
    is_size = node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs
    is_shape = node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
    return (is_size or is_shape) and bool(node.users) and all(_is_batch_size(user) for user in node.users)


def _is_helper(node: fx.Node) -> bool:
    return _is_batch_size(node) or _is_shape_source(node)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
            return _arg(node, 2, "training", True) is False
        if flattened:
            return False
        if node.target in _POOL_FUNCTIONS:
            return rank == _POOL_FUNCTIONS[node.target]
        if node.target is torch.flatten:
            return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) in (-1, rank - 1)
        if node.target is torch.mean:
            return _spatial_dims(_arg(node, 1, "dim"), rank) and _arg(node, 3, "dtype") is None
        return False
    if node.op == "call_method":
        if node.target == "contiguous":
            return True
        if flattened:
            return False
        if node.target == "flatten":
            return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) in (-1, rank - 1)
        if node.target == "mean":
            return _spatial_dims(_arg(node, 1, "dim"), rank) and node.kwargs.get("dtype") is None
        if node.target == "squeeze":
            return _spatial_dims(_arg(node, 1, "dim"), rank)
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
                and _is_batch_size(sizes[0])
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
        weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        return (
            isinstance(weight, fx.Node)
            and weight.op == "get_attr"
            and (bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr"))
        )
    return False


def _match(tail: fx.GraphModule, shapes):
    """(prefix nodes, Linear node, features placeholder, extra placeholders, batch-size helpers) or None."""
    placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"]
    if not placeholders or len(shapes.get(placeholders[0], ())) < 3:
        return None
    features_node, extra_nodes = placeholders[0], placeholders[1:]
    helpers = {n for n in tail.graph.nodes if _is_helper(n)}
    prefix: list[fx.Node] = []
    current, flattened = features_node, False
    while True:
        users = [user for user in current.users if user not in helpers]
        if len(users) != 1:
            return None
        (user,) = users
        if _is_linear(user, current, tail):
            return (prefix, user, features_node, extra_nodes, helpers) if flattened else None
        if not _is_channelwise(user, current, tail, shapes, flattened):
            return None
        prefix.append(user)
        current = user
        flattened = flattened or _is_flattening(user, shapes)


def _linear_parameters(tail: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return tail.get_submodule(node.target)
    weight_node, bias_node = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    weight = _fetch_attr(tail, weight_node.target)
    bias = None if bias_node is None else _fetch_attr(tail, bias_node.target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return _LinearParameters(weight, bias)


def _fetch_attr(module: nn.Module, target: str):
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _build_prefix(tail, features_node, prefix_nodes, helpers, output_node) -> fx.GraphModule:
    keep = set(prefix_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {features_node: graph.placeholder("features")}
    needed = _ancestors(output_node)
    for node in tail.graph.nodes:
        if node is features_node or node not in needed:
            continue
        if node not in keep and node not in helpers and node.op != "get_attr":
            raise _NoMatch
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output_node])
    module = fx.GraphModule(tail, graph, class_name="FactorisedPrefix")
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _build_rest(tail, features_node, extra_nodes, prefix_nodes, helpers, linear_node) -> fx.GraphModule | None:
    """The tail after the Linear: (pre_activation, *extras) -> output; None if it reads the prefix."""
    graph = fx.Graph()
    pre_activation = graph.placeholder("pre_activation")
    env: dict[fx.Node, object] = {linear_node: pre_activation}
    for index, node in enumerate(extra_nodes):
        env[node] = graph.placeholder(f"extra_{index}")
    excluded = {features_node, *prefix_nodes, *helpers}
    batch: list[fx.Node] = []

    def lookup(node: fx.Node):
        if node in env:
            return env[node]
        if _is_batch_size(node):  # the batch of the rest is the number of masks
            if not batch:
                batch.append(graph.call_method("size", (pre_activation, 0)))
            return batch[0]
        raise _NoMatch

    for node in tail.graph.nodes:
        if node in env or node in excluded:
            continue
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lookup))
            break
        if node.op == "get_attr" and all(user is linear_node for user in node.users):
            continue
        env[node] = graph.node_copy(node, lookup)
    module = fx.GraphModule(tail, graph, class_name="FactorisedRest")
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


@torch.no_grad()
def _agrees(module: FactorisedMaskedTail, tail: nn.Module, features: torch.Tensor, extras: tuple) -> bool:
    """The factorised and the plain masked tail agree on all-on, random 0/1 and random-weight masks."""
    generator = torch.Generator(device=features.device).manual_seed(0)
    k = features.shape[1]
    masks = torch.stack(
        [
            torch.ones(k, device=features.device),
            (torch.rand(k, device=features.device, generator=generator) > 0.5).float(),
            torch.rand(k, device=features.device, generator=generator),
        ]
    ).to(features.dtype)
    expected = MaskedTail(tail)(features, masks, *extras)
    got = module(features, masks, *extras)
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    scale = expected.abs().max().float().clamp_min(1e-6)
    tolerance = 1e-3 if features.dtype in (torch.float32, torch.float64) else 3e-2
    return bool(((got.float() - expected.float()).abs().max() <= tolerance * scale).item())

