"""The explainer graph's tail engine (`GraphTail`): switch passes that trace into a bounded ONNX graph.

Two choices keep the exported graph's memory and time independent of the batch N:

- the passes of a batch run one image at a time in a `torch.ops.higher_order.scan`, which the ONNX
  exporter lowers to an ONNX `Scan` over the batch axis: what is alive at once is one image's work,
  whatever N ONNX Runtime (or Triton's dynamic batcher) hands the graph;
- an image's M mask rows run in chunks of static size (a Python loop, unrolled by the trace). Gathered
  sums of a first convolution run in cache-sized chunks (`GATHER_CHUNK_BYTES`): ONNX Runtime's batched
  products and element-wise passes are several times faster on a few MB than on one large tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fdcam.engine.plan import DEFAULT_TAIL_BYTES, GATHER_CHUNK_BYTES, PassPlan, plan_passes
from fdcam.factorise import max_group_size, shortcut_passes, sparse_rows, tail_shortcut
from fdcam.factorise.shortcut import TailShortcut, _is_pointwise
from fdcam.methods import METHODS
from fdcam.switch import switch_masks, switch_scores
from fdcam.tail import MaskedTail, expand_masks

__all__ = ["DEFAULT_TAIL_BYTES", "GATHER_CHUNK_BYTES", "GraphTail", "graph_method_for", "per_image"]

_COMPILES = 1 << 20  # torch.compile cache entries of the scan body allowed in one process (one per export)


class GraphTail:
    """The `Tail` protocol over a split's tail, written so that it traces into one static graph.

    The N images run one at a time (`per_image`, an ONNX Scan), and an image's M mask rows in chunks
    of static size, so at most one chunk of masked copies is alive at once. The tail runs through
    its exact shortcuts (`fdcam.factorise`) as the library's TorchTail does: factorised first Linear,
    the rows of the requested classes of the last Linear, and, for a tail starting with a
    convolution, gathered sums of the channels of each mask when the caller bounds them (`sparsity`).
    """

    def __init__(
        self,
        tail: nn.Module,
        features: torch.Tensor,
        extras: Sequence[torch.Tensor],
        budget: int = DEFAULT_TAIL_BYTES,
        gather_bytes: int = GATHER_CHUNK_BYTES,
        batch_size: int | None = None,
    ):
        self.tail = tail
        self.batch_size = batch_size  # mask rows per chunk (tail_batch_size), else from the budgets
        self.shortcut = tail_shortcut(tail, features[:1], tuple(e[:1] for e in extras))
        self.budget, self.gather_bytes = budget, gather_bytes
        if self.shortcut is not None and self.shortcut.kind == "conv":
            with torch.no_grad():
                self.shortcut.prepare(features[:1])  # sets row_numel
        # Rows per chunk (the planner's): of mask rows, and of gathered convolution sums.
        self.rows = self.plan(features, 1).rows
        self.gather_rows = self.plan(features, 1, sparsity=1).rows  # a conv's gathered chunks (if it gathers)

    def plan(
        self,
        features: torch.Tensor,
        num_rows: int,
        sparsity: int | None = None,
        *,
        groups: bool = False,
        output_numel: int = 0,
        budget: int | None = None,
    ) -> PassPlan:
        """The pass plan (fdcam.engine.plan_passes) of one image's rows: the bound is `sparsity`, trusted;
        `output_numel`: elements of each pass's output scored whole (a region graph's output map); `budget`:
        bytes of a chunk, if not this tail's."""
        return plan_passes(
            self.shortcut,
            features[:1],
            num_rows=num_rows,
            sparsity=sparsity,
            groups=groups,
            batch_size=self.batch_size,
            memory_budget=self.budget if budget is None else budget,
            output_numel=output_numel,
            cache_bytes=self.gather_bytes,
            engine="graph",
        )

    def run(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        *,
        sparsity: int | None = None,
    ) -> torch.Tensor:
        """Logits [N,M,C] (or [N,M,T] of classes [N,T]) of M masks (shared [M,K] or per image [N,M,K]) on N images."""
        masks = expand_masks(features, masks)
        inputs = [features, masks, *extras] + ([] if classes is None else [classes])
        count = len(extras)

        def image(features, masks, *rest):
            chosen = None if classes is None else rest[count]
            return self.image_passes(features, masks, rest[:count], chosen, sparsity)

        return per_image(image, inputs)

    def image_passes(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        sparsity: int | None = None,
    ) -> torch.Tensor:
        """`run` on one image (features [1,...], masks [1,M,K]) as a static unrolled loop of row chunks."""
        m = masks.shape[1]
        shortcut = self.shortcut
        if shortcut is None:
            masked = MaskedTail(self.tail)
            logits = _cat([masked(features, masks[:, lo : lo + self.rows], *extras) for lo in range(0, m, self.rows)])
            return logits if classes is None else logits.gather(2, classes[:, None, :].expand(-1, m, -1))
        state = shortcut.prepare(features, classes if shortcut.first_is_final else None)
        if not self.plan(features, m, sparsity).gathers:
            return _cat(
                [
                    shortcut_passes(shortcut, state, masks[:, lo : lo + self.rows], extras, classes)
                    for lo in range(0, m, self.rows)
                ]
            )
        index, gate, complement = sparse_rows(masks, sparsity)
        pointwise = _is_pointwise(shortcut.conv)
        outputs = []
        for lo in range(0, m, self.gather_rows):
            hi = min(m, lo + self.gather_rows)
            sparse = (index[:, lo:hi], gate[:, lo:hi], complement[:, lo:hi])
            if pointwise:
                start = pointwise_sums(state, *sparse)
            else:
                start = shortcut.pre_activation(state, masks[:, lo:hi], sparse)
            outputs.append(_finish(shortcut, start, extras, classes))
        return _cat(outputs)

    def group_passes(
        self,
        features: torch.Tensor,
        groups: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        *,
        sparsity: int | None = None,
        switch: str = "on_off",
    ) -> torch.Tensor:
        """FD-CAM's switch passes of boolean channel groups [N,K,K]: logits [N,M,C] (or [N,M,T] of classes
        [N,T]) of the switch-on rows 1_G(k) then the switch-off rows 1 − 1_G(k) (M = 2K; switch="off": those
        alone). Equals `run(features, switch_masks(groups, switch), ...)`; a group's sum serves both its rows
        (bias + Σ_G C_l and full − Σ_G C_l, as the library's TorchTail computes them per channel set)."""
        inputs = [features, groups, *extras] + ([] if classes is None else [classes])
        count = len(extras)

        def image(features, groups, *rest):
            chosen = None if classes is None else rest[count]
            return self.image_group_passes(features, groups, rest[:count], chosen, sparsity, switch)

        return per_image(image, inputs)

    def image_group_passes(
        self,
        features: torch.Tensor,
        groups: torch.Tensor,
        extras: Sequence[torch.Tensor],
        classes: torch.Tensor | None,
        sparsity: int | None,
        switch: str,
    ) -> torch.Tensor:
        """`group_passes` on one image (features [1,...], groups [1,K,K])."""
        shortcut = self.shortcut
        k = groups.shape[-1]
        form = self.plan(features, k, sparsity, groups=True).form
        if form not in ("group-sums", "sets"):
            return self.image_passes(features, switch_masks(groups, switch), extras, classes, sparsity)
        state = shortcut.prepare(features, classes if shortcut.first_is_final else None)
        on = groups.to(features.dtype)
        if form == "group-sums":
            contributions, bias = state
            # Σ_G(k) C_l for each group, and Σ_l C_l as a row of ones times the contributions: a product costs far
            # less than ONNX Runtime's ReduceSum over the channels (~4 ms of VGG16's graph), and as its own product
            # it copies no [K+1,K] concatenation of the groups (1.5 ms of ResNet-50's graph).
            every = torch.ones_like(on[:, :1])
            summed = torch.bmm(on, contributions)[0]  # [K,out]
            total = torch.bmm(every, contributions)[0]  # [1,out]
            base = torch.zeros_like(total) if bias is None else bias  # [1,out]
            full = total + base
            # Switch-on rows base + Σ_G, then switch-off rows full − Σ_G, each chunk a fresh tensor (never a
            # view of one block of rows, nor a concatenation): the body may start with an in-place ReLU, which
            # the exporter writes back into a viewed base as a ScatterElements over all the rows (65 ms of
            # VGG16's graph with ONNX Runtime, a third of its second Linear's product).
            starts = [lambda rows: base + rows] if switch == "on_off" else []
            starts.append(lambda rows: full - rows)
            return _cat(
                [
                    _finish(shortcut, start(summed[lo : lo + self.rows]), extras, classes)
                    for start in starts
                    for lo in range(0, k, self.rows)
                ]
            )
        _, full, _, bias = state
        gate, index = on[0].topk(sparsity, dim=-1, sorted=False)  # each group's channels, padded with gate 0
        # The bias rides in the product as input channel K, a channel of ones: the product writes the switch-on
        # rows bias + Σ itself and the switch-off rows are (full + bias) − (bias + Σ), as in the library's
        # TorchTail; one Add over the rows fewer (2.6 ms of Lite0's graph).
        index, gate = shortcut.pointwise_sets(index, gate)  # [K,g+1]
        maps, per_input = shortcut.pointwise_operands(state)  # [1,K+1,hw], [K+1,out]
        flat = maps[0]
        full_and_bias = (full.reshape(full.shape[1], -1) + bias[:, None]).contiguous()  # [out,hw]
        step = self.gather_rows
        on_logits, off_logits = [], []
        for lo in range(0, k, step):
            chunk_index = index[lo : lo + step]
            c, g = chunk_index.shape
            # index_select of flat indices: a plain ONNX Gather (advanced indexing becomes a slower GatherND).
            flat_index = chunk_index.reshape(-1)
            gathered = flat.index_select(0, flat_index).reshape(c, g, -1) * gate[lo : lo + step, :, None]  # [c,g,hw]
            rows = per_input.index_select(0, flat_index).reshape(c, g, -1)  # [c,g,out]
            summed = torch.bmm(rows.transpose(1, 2), gathered)  # [c,out,hw]: bias + Σ
            # Operands that differ in leading axes only, which ONNX Runtime subtracts fast (a [out,1] column
            # broadcast over each row of hw values is several times slower); taken before the body, whose first
            # activation may run in place on the switch-on rows.
            off = full_and_bias - summed
            if switch == "on_off":
                on_logits.append(_finish(shortcut, summed.reshape(-1, *full.shape[1:]), extras, classes))
            off_logits.append(_finish(shortcut, off.reshape(-1, *full.shape[1:]), extras, classes))
        return _cat(on_logits + off_logits)


def pointwise_sums(state: tuple, index: torch.Tensor, gate: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution's pre-activations [m,out,h,w] of one image's m sparse rows (`sparse_rows`) as
    gathered sums: bias + Σ_on C_l, or full − Σ_off C_l for complement rows.

    Written for ONNX Runtime: the gathered weights are rows of a [K,out] matrix (a plain Gather), the
    sums one batched product, and the base a product with the 0/1 complement flag rather than a Where
    broadcast over the output.
    """
    features, full, weight, bias = state
    out, plane = weight.shape[0], full[0, 0].numel()
    signed = torch.where(complement, -gate, gate).to(features.dtype)[0]  # [m,g]
    gathered = features.flatten(2)[0][index[0]] * signed[..., None]  # [m,g,hw]
    rows = weight[:, :, 0, 0].t()[index[0]].transpose(1, 2)  # [m,out,g]
    summed = torch.bmm(rows, gathered)  # [m,out,hw]
    delta = full.reshape(out, plane) - bias[:, None]  # [out,hw]
    z = summed + bias[:, None] + complement[0].to(features.dtype)[..., None] * delta
    return z.reshape(index.shape[1], *full.shape[1:])


def _finish(
    shortcut: TailShortcut, start: torch.Tensor, extras: Sequence[torch.Tensor], classes: torch.Tensor | None
) -> torch.Tensor:
    """Logits [1,m,C|T] of one image's m pre-activation rows: the body, then the last Linear."""
    m = start.shape[0]
    hidden = shortcut.body(start, *(e.expand(m, *e.shape[1:]) for e in extras))
    return shortcut.logits(hidden.reshape(1, m, *hidden.shape[1:]), classes)


def per_image(function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`function` on each image of the batch, stacked: function(*[t[i:i+1] for t in inputs])[0] for every i.

    A `torch.ops.higher_order.scan` over the batch axis, which the ONNX exporter lowers to a `Scan`: the
    graph holds one image's work at a time, whatever the batch.
    """
    import torch._dynamo
    from torch._higher_order_ops.scan import scan

    def step(carry, sliced):
        return carry.clone(), function(*(t[None] for t in sliced))[0]

    carry = torch.zeros((), dtype=inputs[0].dtype, device=inputs[0].device)
    # scan runs its body through torch.compile, whose cache outlives one export: with automatic dynamic
    # shapes a second export (another input size, so another chunk size) would see the changed Python
    # ints as symbols, which reach the ONNX Scan as bare ints it cannot translate. Each export compiles
    # its own static body instead (one cache entry per export, hence the raised limits).
    limits = {"recompile_limit": _COMPILES, "accumulated_recompile_limit": _COMPILES}
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, **limits):
        _, outputs = scan(step, carry, list(inputs))
    return outputs


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, 1) if len(tensors) > 1 else tensors[0]


def drop_unused_initializers(graph) -> None:
    """Remove the initializers no node of `graph` (an onnx.GraphProto) or of its subgraphs reads, in every
    subgraph too: the exporter leaves some in the Scan body, and ONNX Runtime warns of each one."""
    import onnx

    def subgraphs(node):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            yield from attribute.graphs

    def reads(g) -> set[str]:
        names = {output.name for output in g.output}
        for node in g.node:
            names.update(node.input)
            for sub in subgraphs(node):
                names |= reads(sub)
        return names

    used = reads(graph)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    for node in graph.node:
        for sub in subgraphs(node):
            drop_unused_initializers(sub)


# --- the library's method over the graph engine ----------------------------------------------


def graph_method_for(method: str, model: nn.Module, layer: str, options: dict, tail: GraphTail):
    """The library's method object, its masked tail passes run by `tail` (the traceable engine)."""
    base = METHODS[method]

    class GraphMethod(base):
        def tail_for(self, context):  # noqa: D102 - the engine swap is the whole point
            return tail

    if method == "fdcam":
        GraphMethod.switch_scores = _group_switch_scores
    GraphMethod.__name__ = f"Graph{base.__name__}"
    return GraphMethod(model, layer, **options)


def _group_switch_scores(self, context):
    """FD-CAM's switch scores with the passes made from the groups themselves (`GraphTail.group_passes`:
    one gathered sum per group serves its switch-on and switch-off rows)."""
    classes = context.targets.classes
    if classes is None:
        return type(self).__mro__[1].switch_scores(self, context)
    activations = context.activations
    sparsity = max_group_size(activations.shape[1], self.theta) if self.grouping else 1
    logits = self.tail_for(context).group_passes(
        activations, self.groups(activations), context.extras, classes, sparsity=sparsity, switch=self.switch
    )
    return switch_scores(logits, context.scores, None, self.switch)
