"""The tail as first op → body → final Linear (`TailShortcut`), its switch passes, and its export form.

"linear" (per-channel linear ops then a Linear): C [K, out] is computed once per image and
z(m) = m·C + b is one product. "conv" (a convolution, a following batch norm folded in): for a 0/1
mask with few ones z(m) = b + Σ_{l on} C_l, with few zeros z(m) = z(1) − Σ_{l off} C_l, z(1) the
plain pass (`fdcam.factorise.sparse`). "plain": the masked features go through the tail. In every
kind, when the tail ends in a Linear, the passes can ask for the rows of given classes only.
The user's modules are shared, never copied or changed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..fxgraph import fetch_attr
from .in_place import owned_start_body
from .sparse import sparse_rows

__all__ = ["GATHER_SHARE", "ShortcutGraph", "TailShortcut", "TailWeights", "expand_rows", "shortcut_passes"]

#: A first Linear's channel-set sums are gathered rows up to this share of the channels (where gathering
#: beats one product of 0/1 set rows on CPUs), one product beyond.
GATHER_SHARE = 0.1


class TailWeights:
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
        final: nn.Module | TailWeights | None,
        *,
        prefix: fx.GraphModule | None = None,
        linear: nn.Module | TailWeights | None = None,
        block: int = 1,
        conv: TailWeights | None = None,
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

    @functools.cached_property
    def owned_body(self) -> fx.GraphModule:
        """The body for start rows the caller gives up: its first activation may change them in place. Kept in the
        instance's dict, not as a submodule: the copy shares the body's modules."""
        return owned_start_body(self.body)

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

    def _convolve(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
    ) -> torch.Tensor:
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
        return tuple(
            t[index : index + 1] if t is not None and t.dim() > 0 and i < 2 else t for i, t in enumerate(state)
        )

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
                (index + offsets).reshape(n * m, -1),
                contributions.reshape(n * k, out),
                per_sample_weights=weight.reshape(n * m, -1).to(contributions.dtype),
                mode="sum",
            ).reshape(n, m, out)
            base, full = _linear_bases(contributions, bias)
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
            gathered = (
                features[torch.arange(n, device=index.device)[:, None, None], index] * gate[..., None, None]
            )  # [n,m,g,h,w]
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

    def pointwise_operands(self, state: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a "conv" kind whose convolution is a matrix product per pixel (1×1, stride 1, no padding): the
        features as maps [N,K+1,h·w] with a channel of ones as channel K, and the folded weight as rows per input
        channel with the bias as row K ([K+1,out]); a set's pre-activation bias + Σ_j gate_j·C_j is then one
        product over its channels and channel K (fdcam.set_passes). None otherwise."""
        if self.kind != "conv":
            return None
        features, _, weight, bias = state
        if weight.shape[-2:] != (1, 1) or not _is_identity_geometry(self.conv):
            return None
        maps = features.flatten(2)
        maps = torch.cat([maps, torch.ones_like(maps[:, :1])], 1)
        return maps, torch.cat([weight[:, :, 0, 0].t(), bias[None]])

    def pointwise_sets(self, index: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel sets [S,g] (index, gate) with channel K, the ones of `pointwise_operands`, appended at gate 1:
        their product over the operands is bias + Σ_j gate_j·C_j ([S,g+1] each)."""
        index = torch.cat([index, torch.full_like(index[:, :1], self.num_channels)], 1)
        return index, torch.cat([gate, torch.ones_like(gate[:, :1])], 1)

    def row_bases(self, state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-activation row of the one image in `state` with every channel off (the bias) and with
        every channel on (the plain pass), each shaped like one row ("linear" and "conv" kinds)."""
        if self.kind == "linear":
            base, full = _linear_bases(*state)
            return base[0, 0], full[0, 0]
        _, full, _, bias = state
        return bias[:, None, None].expand_as(full[0]), full[0]

    def gathered_sums(
        self,
        state: tuple,
        index: torch.Tensor,
        gate: torch.Tensor,
        *,
        with_bias: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Σ_j gate[s,j]·C_index[s,j] for S channel sets [S,g] of the one image in `state`: [S, out] or
        [S, out, h', w'], plus the bias with `with_bias` (the pre-activation of the set alone), written to `out`
        when given. (A 1×1 convolution's sets are products over `pointwise_operands` instead.)"""
        if self.kind == "linear":
            contributions, bias = state[0][0], state[1]  # [K,out], [1,out] or None
            weights = gate.to(contributions.dtype)
            if index.shape[-1] <= GATHER_SHARE * self.num_channels:
                summed = F.embedding_bag(index, contributions, per_sample_weights=weights, mode="sum")
            else:
                # Denser sets: one product with the sets as 0/1 rows (the indices of a row are distinct).
                dense = torch.zeros((index.shape[0], self.num_channels), dtype=contributions.dtype, device=index.device)
                summed = dense.scatter_(1, index, weights) @ contributions
            bias = bias[0] if with_bias and bias is not None else None
        else:
            features, full, weight, bias = state
            s, g = index.shape
            gathered = features[0, index] * gate.to(features.dtype)[..., None, None]  # [S,g,h,w]
            per_set = weight.transpose(0, 1)[index].transpose(1, 2)
            per_set = per_set.reshape(s * weight.shape[0], g, *weight.shape[-2:])
            summed = self._convolve(gathered.reshape(1, s * g, *features.shape[2:]), per_set, None, groups=s)
            summed = summed.reshape(s, *full.shape[1:])
            bias = bias[:, None, None] if with_bias else None
        if bias is not None:
            return torch.add(summed, bias, out=out)
        return summed if out is None else out.copy_(summed)

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


def _linear_bases(contributions: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A first Linear's pre-activation per image with every channel off (the bias) and on: [n,1,out] each."""
    base = torch.zeros_like(contributions[:, :1]) if bias is None else bias[:, None]
    return base, contributions.sum(1, keepdim=True) + base


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


def _is_pointwise(conv: TailWeights) -> bool:
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
    gathered = (
        features.flatten(2)[torch.arange(n, device=index.device)[:, None, None], index] * gate[..., None]
    )  # [n,m,g,hw]
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


def _is_identity_geometry(conv: TailWeights) -> bool:
    """Stride 1, no padding, no dilation: a 1×1 convolution is then a matrix product per pixel."""
    flat = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    padding = conv.padding
    no_padding = padding == "valid" or (not isinstance(padding, str) and set(flat(padding)) == {0})
    return set(flat(conv.stride)) == {1} and set(flat(conv.dilation)) == {1} and no_padding
