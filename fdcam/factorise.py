"""Exact shortcuts for the switch passes: the tail split at its first linear op and at its final Linear.

A switch pass runs the tail on A ⊙ m for a channel mask m. When the tail's first operation is linear
in the masked features, its pre-activation for m is

    z(m) = Σ_k m_k C_k + b,

C_k the contribution of channel k alone, and only what follows the first non-linearity has to run
per mask. Two first operations are recognised in the fx graph of a tail (`fdcam.split`):

- "linear": ops acting on each channel separately and linearly (average pooling, flatten,
  `view(batch, -1)`, dropout in eval, identity) then a Linear (VGG16 at `features.30`, ResNet-50 at
  `layer4`). C [K, out] is computed once per image; z(m) = m·C + b is one product.
- "conv": a convolution (1×1 or k×k, any zero padding, stride or dilation; groups = 1), with a
  batch norm that follows it folded in (EfficientNet-Lite0 at `_blocks.15`). For a 0/1 mask with few
  ones, z(m) = b + Σ_{l on} C_l is a gathered product over those channels; with few zeros,
  z(m) = z(1) − Σ_{l off} C_l, z(1) the plain pass. FD-CAM's groups (~5 % of the channels) and
  Ablation-CAM's all-but-one masks are both sparse in this sense (`sparse_rows`).

Other tails take the plain path ("plain": the masked features go through the tail). In every kind,
when the tail ends in a Linear, the switch passes can ask for the rows of given classes only.

`tail_shortcut` builds a `TailShortcut` for one feature shape, checks it against the plain masked
tail on a few masks, and returns None when the graph is not understood (the caller then runs the
tail as it is). The user's modules are shared, never copied or changed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fxgraph import NotASubgraph, fetch_attr, is_batch_size, node_arg, record_shapes, subgraph

__all__ = ["ShortcutGraph", "TailShortcut", "expand_rows", "max_group_size", "shortcut_passes", "sparse_rows", "tail_shortcut"]

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


class _TailWeights:
    """A weight and bias of the tail read when used (never copied): a functional call or an exporter that
    swaps the tail's tensors is seen. Static arguments (a convolution's stride, ...) are attributes."""

    def __init__(self, tail: nn.Module, weight: str, bias: str | None, **static):
        self._tail, self._weight, self._bias = tail, weight, bias
        self.__dict__.update(static)

    @property
    def weight(self) -> torch.Tensor:
        return fetch_attr(self._tail, self._weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self._bias is None else fetch_attr(self._tail, self._bias)


def expand_rows(tensors: Sequence[torch.Tensor], n: int, m: int) -> list[torch.Tensor]:
    """Each per-image tensor [n,...] repeated for the m rows of its image: [n·m,...], image-major."""
    return [t[:, None].expand(n, m, *t.shape[1:]).reshape(n * m, *t.shape[1:]) for t in tensors]


def max_group_size(num_channels: int, theta: float) -> int:
    """The most channels that can lie strictly above the θ-quantile (linear rule) of a row of `num_channels`.

    With q = θ(K−1), every value above the quantile is above the sorted value at floor(q): at most
    K − 1 − floor(q) of them. This bounds FD-CAM's group sizes statically (for traced graphs).
    """
    return max(1, num_channels - 1 - int(theta * (num_channels - 1)))


def sparse_rows(masks: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each 0/1 mask row [...,K] as its sparse side: (index [...,g], weight [...,g], complement [...,1]).

    A row with more ones than zeros is described by its zeros (complement True: full − Σ), else by its
    ones; g = `bound` entries per row, padded with weight-0 entries. Exact when no row has more than
    `bound` entries on its sparse side (see `fits_sparse`).
    """
    complement = masks.sum(-1, keepdim=True) * 2 > masks.shape[-1]
    side = torch.where(complement, 1 - masks, masks)
    weight, index = side.topk(bound, dim=-1, sorted=False)
    return index, weight, complement


def fits_sparse(masks: torch.Tensor, bound: int) -> bool:
    """Whether every row is 0/1 with at most `bound` entries on its sparse side (one host sync)."""
    ones = masks.sum(-1)
    sparse = torch.minimum(ones, masks.shape[-1] - ones)
    return bool((((masks == 0) | (masks == 1)).all() & (sparse <= bound).all()).item())


def sparse_bound(masks: torch.Tensor) -> int:
    """The largest sparse side (min of ones and zeros) over 0/1 mask rows (one host sync)."""
    ones = masks.sum(-1)
    return int(torch.minimum(ones, masks.shape[-1] - ones).max().item()) if masks.numel() else 0


class TailShortcut(nn.Module):
    """The tail as first op → body → final Linear, for masked passes with the shortcuts of its `kind`.

    `forward(features [N,K,...], masks [N,M,K], *extras [N,...]) -> logits [N,M,C]` equals the plain
    masked tail (and exports to ONNX). The eager engine (`fdcam.tail.TorchTail`) uses the parts:
    `prepare` once per batch of images, `pre_activation` per chunk of mask rows (dense, or sparse
    with `sparse_rows`), `body` on the stacked rows and extras, `final` per image (all classes or
    the rows of some).
    """

    def __init__(
        self,
        kind: str,
        num_channels: int,
        body: fx.GraphModule,
        final: nn.Module | _TailWeights | None,
        *,
        prefix: fx.GraphModule | None = None,
        linear: nn.Module | _TailWeights | None = None,
        block: int = 1,
        conv: _TailWeights | None = None,
        norm: nn.Module | None = None,
        first_is_final: bool = False,
    ):
        super().__init__()
        self.kind = kind
        self.num_channels = int(num_channels)
        self.body = body  # (start rows [R,...], *extras [R,...]) -> the final Linear's input, or the logits
        self.final = final  # the tail's last Linear (.weight [C,D], .bias), or None
        self.prefix = prefix  # "linear": features [N,K,...] -> [N, K*block], channel-major
        self.linear = linear  # "linear": the first Linear
        self.block = int(block)
        self.out_features = int(linear.weight.shape[0]) if linear is not None else 0
        self.conv = conv  # "conv": the first convolution
        self.norm = norm  # "conv": the BatchNorm2d folded into it, or None
        self.first_is_final = first_is_final  # "linear": the first Linear is also the last
        self.row_numel = 1  # "conv": elements of one row's pre-activation (known after `prepare`)
        # Eval flags on the new wrappers only (the shared modules keep theirs): an exporter that puts
        # the module in eval mode and then "restores" train mode must not switch the user's dropout on.
        for wrapper in (self, prefix, body):
            if wrapper is not None:
                wrapper.training = False

    @property
    def sparse_capable(self) -> bool:
        """Whether pre-activations of 0/1 masks can be gathered sums (`sparse_rows`)."""
        return self.kind == "conv" or (self.kind == "linear" and not self.first_is_final)

    @property
    def selects_rows(self) -> bool:
        """Whether logits of chosen classes cost only those rows of the last Linear."""
        return self.final is not None or self.first_is_final

    # --- the first op ---------------------------------------------------------------------------

    def folded_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's weight and bias with the batch norm after it folded in (running statistics)."""
        weight, bias = self.conv.weight, self.conv.bias
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        if self.norm is None:
            return weight, bias
        norm = self.norm
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        return weight * scale[:, None, None, None], bias * scale + shift

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        conv = self.conv
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)

    def prepare(self, features: torch.Tensor, classes: torch.Tensor | None = None) -> tuple:
        """Per-batch state for `pre_activation`: contributions, or the plain pass and folded weights."""
        if self.kind == "linear":
            blocks = self.prefix(features).reshape(features.shape[0], self.num_channels, self.block)  # [N,K,P]
            weight, bias = self.linear.weight, self.linear.bias
            if classes is not None and self.first_is_final:
                # Only the requested rows of the Linear: C [N,K,T] and the bias of those classes.
                rows = weight[classes].reshape(*classes.shape, self.num_channels, self.block)  # [N,T,K,P]
                contributions = torch.einsum("nkp,ntkp->nkt", blocks, rows)
                bias = None if bias is None else bias[classes]  # [N,T]
            else:
                # A strided view of W as [K, P, out]: one batched product, no copy of the weight.
                view = weight.reshape(self.out_features, self.num_channels, self.block).permute(1, 2, 0)
                contributions = torch.bmm(blocks.transpose(0, 1), view).transpose(0, 1)  # [N,K,out]
                bias = None if bias is None else bias.expand(features.shape[0], -1)
            return contributions, bias
        if self.kind == "conv":
            weight, bias = self.folded_conv()
            full = self._convolve(features, weight, bias)
            self.row_numel = full[0].numel()
            return features, full, weight, bias
        return (features,)

    @staticmethod
    def select(state: tuple, index: int) -> tuple:
        """The state of image `index` alone (leading axis kept)."""
        return tuple(t[index : index + 1] if t is not None and t.dim() > 0 and i < 2 else t for i, t in enumerate(state))

    def pre_activation(self, state: tuple, masks: torch.Tensor, sparse: tuple | None = None) -> torch.Tensor:
        """The body's input for masks [n,m,K] of the n images in `state`: [n·m, ...].

        `sparse` (`sparse_rows` of the masks) takes the gathered form; None the dense one.
        """
        n, m, k = masks.shape
        if self.kind == "linear":
            contributions, bias = state
            if sparse is None:
                pre = torch.bmm(masks, contributions)
                pre = pre if bias is None else pre + bias[:, None]
                return pre.reshape(n * m, -1)
            index, weight, complement = sparse
            out = contributions.shape[-1]
            offsets = (torch.arange(n, device=index.device) * k)[:, None, None]
            summed = F.embedding_bag(
                (index + offsets).reshape(n * m, -1), contributions.reshape(n * k, out),
                per_sample_weights=weight.reshape(n * m, -1).to(contributions.dtype), mode="sum",
            ).reshape(n, m, out)
            base = torch.zeros_like(summed[:, :1]) if bias is None else bias[:, None]
            full = contributions.sum(1, keepdim=True) + base
            return torch.where(complement, full - summed, base + summed).reshape(n * m, out)
        if self.kind == "conv":
            features, full, weight, bias = state
            if sparse is None:
                masked = (features[:, None] * masks[..., None, None]).reshape(n * m, k, *features.shape[2:])
                return self._convolve(masked, weight, bias)
            index, gate, complement = sparse
            g, out = index.shape[-1], weight.shape[0]
            # Rows kept as full − Σ get negated gates, so each row is its base (bias or full) + one product.
            gate = torch.where(complement, -gate, gate).to(features.dtype)
            gathered = features[torch.arange(n, device=index.device)[:, None, None], index] * gate[..., None, None]  # [n,m,g,h,w]
            # Flat [.., out·h'·w'] operands: a contiguous inner axis keeps the broadcast where fast.
            plane = full[0, 0].numel()
            flat_bias = bias.repeat_interleave(plane)
            base = torch.where(complement, full.reshape(n, 1, -1), flat_bias)  # [n,m,out·h'·w']
            if weight.shape[-2:] == (1, 1) and _is_identity_geometry(self.conv):
                per_input = weight[:, :, 0, 0].t().contiguous()  # [K,out]
                rows = per_input[index].reshape(n * m, g, out).transpose(1, 2)  # [n·m,out,g]
                z = base.reshape(n * m, out, -1).baddbmm_(rows, gathered.reshape(n * m, g, -1))
            else:
                rows = weight.transpose(0, 1)[index].transpose(2, 3).reshape(n * m * out, g, *weight.shape[-2:])
                summed = self._convolve(gathered.reshape(1, n * m * g, *features.shape[2:]), rows, None, groups=n * m)
                z = base.reshape(n * m, *full.shape[1:]).add_(summed.reshape(n * m, *full.shape[1:]))
            return z.reshape(n * m, *full.shape[1:])
        (features,) = state
        return (features[:, None] * masks[..., None, None]).reshape(n * m, k, *features.shape[2:])

    def input_rows(self, state: tuple) -> torch.Tensor | None:
        """The "conv" kind's folded weight as rows per input channel [K,out] when the convolution is a
        matrix product per pixel (1×1, stride 1, no padding), else None. For `gathered_sums`."""
        weight = state[2]
        if weight.shape[-2:] != (1, 1) or not _is_identity_geometry(self.conv):
            return None
        return weight[:, :, 0, 0].t().contiguous()

    def gathered_sums(self, state: tuple, index: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_j gate[s,j]·C_index[s,j] for S channel sets [S,g] of the one image in `state` ("conv" kind):
        [S, out, h', w'], without the bias. `rows` is `input_rows(state)`, made once per batch."""
        features, full, weight, _ = state
        s, g = index.shape
        gathered = features[0, index] * gate.to(features.dtype)[..., None, None]  # [S,g,h,w]
        if rows is not None:
            return torch.bmm(rows[index].transpose(1, 2), gathered.reshape(s, g, -1)).reshape(s, *full.shape[1:])
        out = weight.shape[0]
        per_set = weight.transpose(0, 1)[index].transpose(1, 2).reshape(s * out, g, *weight.shape[-2:])
        summed = self._convolve(gathered.reshape(1, s * g, *features.shape[2:]), per_set, None, groups=s)
        return summed.reshape(s, *full.shape[1:])

    # --- the last op ----------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n,m,C] (or [n,m,T] for classes [n,T]) from the body's output [n,m,...] of n images."""
        if self.final is None:
            if classes is None or self.first_is_final:
                return hidden
            return hidden.gather(-1, classes[:, None, :].expand(-1, hidden.shape[1], -1))
        weight, bias = self.final.weight, self.final.bias
        if classes is None:
            return F.linear(hidden, weight, bias)
        rows = weight[classes].transpose(1, 2)  # [n,D,T]
        if bias is None:
            return torch.bmm(hidden, rows)
        return torch.baddbmm(bias[classes][:, None, :], hidden, rows)

    def forward(self, features: torch.Tensor, masks: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        n, m = masks.shape[0], masks.shape[1]
        start = self.pre_activation(self.prepare(features), masks)
        hidden = self.body(start, *expand_rows(extras, n, m))
        return self.logits(hidden.reshape(n, m, *hidden.shape[1:]))


def shortcut_passes(
    shortcut: TailShortcut,
    state: tuple,
    masks: torch.Tensor,
    extras: Sequence[torch.Tensor] = (),
    classes: torch.Tensor | None = None,
    sparse: tuple | None = None,
) -> torch.Tensor:
    """Logits [n,m,C] (or [n,m,T] of classes [n,T]) of mask rows [n,m,K] on the n images of `state`
    (`TailShortcut.prepare`): pre-activation (gathered when `sparse` is given), body, last Linear."""
    n, m = masks.shape[0], masks.shape[1]
    if sparse is not None and shortcut.kind == "conv" and _is_pointwise(shortcut.conv):
        start = _gathered_pointwise(state, sparse)
    else:
        start = shortcut.pre_activation(state, masks, sparse)
    hidden = shortcut.body(start, *expand_rows(extras, n, m))
    return shortcut.logits(hidden.reshape(n, m, *hidden.shape[1:]), classes)


def _is_pointwise(conv: _TailWeights) -> bool:
    return tuple(conv.weight.shape[-2:]) == (1, 1) and _is_identity_geometry(conv)


def _gathered_pointwise(state: tuple, sparse: tuple) -> torch.Tensor:
    """A 1×1 convolution's pre-activations [n·m,out,h,w] as gathered sums, written for exported graphs.

    The same sums as `TailShortcut.pre_activation`, arranged so that no op broadcasts a choice over
    the large output (ONNX Runtime's Where does that slowly): the bias rides in the product as one
    more channel of ones, and the rows kept as full − Σ add (full − bias) times their 0/1 flag.
    """
    features, full, weight, bias = state
    index, gate, complement = sparse
    n, m, g = index.shape
    out, plane = weight.shape[0], full[0, 0].numel()
    gate = torch.where(complement, -gate, gate).to(features.dtype)
    gathered = features.flatten(2)[torch.arange(n, device=index.device)[:, None, None], index] * gate[..., None]  # [n,m,g,hw]
    ones = torch.ones_like(gathered[:, :, :1])
    per_input = torch.cat([weight[:, :, 0, 0].t(), bias[None]])  # [K+1,out]: the bias as channel K
    last = torch.full_like(index[..., :1], weight.shape[1])
    rows = per_input[torch.cat([index, last], -1)].reshape(n * m, g + 1, out).transpose(1, 2)  # [n·m,out,g+1]
    summed = rows @ torch.cat([gathered, ones], 2).reshape(n * m, g + 1, plane)
    delta = full.reshape(n, 1, out * plane) - bias.repeat_interleave(plane)
    z = summed.reshape(n, m, out * plane) + complement.to(features.dtype) * delta
    return z.reshape(n * m, *full.shape[1:])


class ShortcutGraph(nn.Module):
    """A `TailShortcut` with its options fixed, for export: `forward(features, masks, [classes,] *extras)`.

    With `classes` the graph takes classes [N,T] (int64) and returns logits [N,M,T] (only those rows of
    the last Linear); with `bound` the pre-activations are gathered sums over `bound` channels per row
    (`sparse_rows`), exact for 0/1 rows with at most `bound` ones or zeros: the caller checks
    (`fits_sparse`) and runs other masks through a graph without `bound`.
    """

    def __init__(self, shortcut: TailShortcut, classes: bool = False, bound: int | None = None):
        super().__init__()
        self.shortcut = shortcut
        self.classes = classes
        self.bound = bound
        self.training = False  # this wrapper's own flag only (see TailShortcut)

    def forward(self, features: torch.Tensor, masks: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        classes, extras = (rest[0], rest[1:]) if self.classes else (None, rest)
        state = self.shortcut.prepare(features, classes if self.shortcut.first_is_final else None)
        sparse = None if self.bound is None else sparse_rows(masks, self.bound)
        return shortcut_passes(self.shortcut, state, masks, extras, classes, sparse)


def _is_identity_geometry(conv: _TailWeights) -> bool:
    """Stride 1, no padding, no dilation: a 1×1 convolution is then a matrix product per pixel."""
    flat = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    padding = conv.padding
    no_padding = padding == "valid" or (not isinstance(padding, str) and set(flat(padding)) == {0})
    return set(flat(conv.stride)) == {1} and set(flat(conv.dilation)) == {1} and no_padding


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
                return TailShortcut("linear", num_channels, identity, None, prefix=prefix, linear=linear,
                                    block=flat[1] // num_channels, first_is_final=True)
            return TailShortcut("linear", num_channels, body(linear_node), final, prefix=prefix, linear=linear,
                                block=flat[1] // num_channels)
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


def _match_conv(tail: fx.GraphModule, features_node: fx.Node, shapes) -> tuple[fx.Node | None, _TailWeights | None]:
    """The tail's first op when it is a 2-D convolution of the features alone (groups 1, zero padding)."""
    if len(shapes.get(features_node, ())) != 4:
        return None, None
    node = _only_user(features_node, _helpers(tail))
    if node is None or not node.args or node.args[0] is not features_node:
        return None, None
    if node.op == "call_module":
        module = tail.get_submodule(node.target)
        if type(module) is not nn.Conv2d or module.groups != 1 or module.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
            return None, None
        bias = None if module.bias is None else f"{node.target}.bias"
        geometry = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        return node, _TailWeights(tail, f"{node.target}.weight", bias, **geometry)
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        weight, bias = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
        constants = [node_arg(node, i, name, default) for i, name, default in
                     ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None, None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return None, None
        if any(isinstance(value, fx.Node) for value in constants) or constants[3] != 1:
            return None, None
        weights = _TailWeights(tail, weight.target, None if bias is None else bias.target,
                               stride=constants[0], padding=constants[1], dilation=constants[2])
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
    weights = _TailWeights(tail, weight_node.target, None if bias_node is None else bias_node.target)
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
    binary = torch.stack([ones, few, 1 - few, (torch.rand(k, device=features.device, generator=generator) > 0.5).float()])
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


def node_arg(node: fx.Node, index: int, name: str, default=None):
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
