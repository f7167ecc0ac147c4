"""The tail of a split model run on batches of channel masks: the `Tail` protocol and its torch backend.

A switch pass is one forward of the tail on the target activation with some channels zeroed.
`Tail.run(features, masks, extras, classes)` runs M of them on each of N images: features
[N,K,h,w], masks [N,M,K] (or [M,K] shared by all images) of 0/1 or any weights, extras the other
tensors that cross the split ([N,...]); it returns float32 logits [N,M,C], or [N,M,T] for
`classes` [N,T]. With `score` (fdcam.targets.BatchTargets) it returns each pass's target scores
[N,M,T], scoring the outputs chunk by chunk: a segmentation tail's [N,M,C,H,W] is never held at once.
The ONNX Runtime backend (`fdcam.runtime`) implements the same protocol over an exported `MaskedTail`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .cuda_graphs import GraphedCall
from .engine.plan import PassPlan, plan_passes
from .factorise import TailShortcut, expand_rows, sparse_rows, tail_shortcut
from .groups import GroupMembers
from .mask_rows import chunk_size, concat, expand_masks, segment_rows, split_rows
from .options import TORCH_PRECISIONS
from .precision import check_torch_precision, tail_precision
from .set_passes import group_set_passes, mask_set_passes
from .targets import BatchTargets

__all__ = ["Tail", "MaskedTail", "TorchTail", "TORCH_PRECISIONS", "chunk_size", "expand_masks", "tail_precision"]

_MAX_GRAPHS = 4


@runtime_checkable
class Tail(Protocol):
    """Runs masked copies of images' features through the tail of a split model."""

    def run(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        *,
        sparsity: int | None = None,
        score: BatchTargets | None = None,
    ) -> torch.Tensor:
        """Float32 logits [N,M,C] of the tail on `features[n] * masks[n, m, :, None, None]` (masks [N,M,K]
        or [M,K] shared), or [N,M,T] of the classes [N,T] only, or [N,M,T] target scores of the outputs
        with `score` (each chunk's outputs scored by `score.score_rows`). `sparsity`, if given, promises
        that every mask row is 0/1 with at most that many ones or at most that many zeros."""
        ...


class MaskedTail(nn.Module):
    """`tail(features[n] ⊙ masks[n, m, :, None, None], *extras[n])` for every image n and mask m: logits [N,M,C].

    This is the module exported to ONNX, so the masks are applied inside the graph and only M×K
    floats per image travel.
    """

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail
        self.training = False  # this wrapper's own flag only; see fdcam.factorise.TailShortcut

    def forward(self, features: torch.Tensor, masks: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        n, m = masks.shape[0], masks.shape[1]
        masked = (features[:, None] * masks[..., None, None]).reshape(n * m, *features.shape[1:])
        logits = self.tail(masked, *expand_rows(extras, n, m))
        return logits.reshape(n, m, *logits.shape[1:])


class TorchTail:
    """The torch backend of `Tail`: batched forwards of the fx tail, chunked under a memory budget.

    With `factorise` (the default) the tail runs through its exact shortcuts (`fdcam.factorise`):
    a tail starting with pooling and a Linear or with a convolution computes the masked
    pre-activations from per-channel contributions (0/1 masks with few ones or few zeros as
    gathered sums), and a tail ending in a Linear computes only the rows of the requested classes.
    Tails it does not recognise run as they are. The shortcut is found once per feature shape; each call's
    form (plain, dense, gathered, per channel set, group sums) and rows per chunk are its pass plan's
    (`plan`, fdcam.engine.plan_passes). `batch_size` is at most that many mask rows per tail call.
    `precision` sets the switch passes' math (see `tail_precision`). With `cuda_graph`, CUDA inputs
    run as a CUDA graph captured once per input shape (the last few shapes are kept).
    """

    def __init__(
        self,
        tail: nn.Module,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        factorise: bool = True,
        precision: str = "fp32",
        cuda_graph: bool = False,
    ):
        self.masked_tail = MaskedTail(tail)
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.factorise = factorise
        self.precision = check_torch_precision(precision)
        self.cuda_graph = cuda_graph
        self.calls = 0
        self.sparse_calls = 0
        self.graph_replays = 0
        self._shortcuts: dict[tuple, TailShortcut | None] = {}
        self._graphs: OrderedDict[tuple, GraphedCall] = OrderedDict()

    @property
    def captured_graphs(self) -> int:
        """How many CUDA graphs this tail holds (each with its memory pool and static input and output tensors)."""
        return len(self._graphs)

    def close(self) -> None:
        """Free the captured CUDA graphs; a later CUDA call captures again. The explainer's close() calls it."""
        for graphed in self._graphs.values():
            graphed.graph.reset()
        self._graphs.clear()

    def shortcut_for(self, features: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> TailShortcut | None:
        """The tail's shortcut for features shaped like `features`, or None (plain path, or `factorise` off)."""
        if not self.factorise:
            return None
        key = (
            tuple(features.shape[1:]),
            features.dtype,
            features.device,
            tuple((tuple(extra.shape[1:]), extra.dtype) for extra in extras),
        )
        if key not in self._shortcuts:
            self._shortcuts[key] = tail_shortcut(self.masked_tail.tail, features[:1], tuple(e[:1] for e in extras))
        return self._shortcuts[key]

    @torch.no_grad()
    def run(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        *,
        sparsity: int | None = None,
        score: BatchTargets | None = None,
    ) -> torch.Tensor:
        """Float32 logits [N,M,C] (or [N,M,T] of `classes` [N,T], or target scores [N,M,T] with `score`)
        of M masks on each of N images."""
        masks = expand_masks(features, masks)
        extras = list(extras)
        shortcut = self.shortcut_for(features, extras)
        plan = self.plan(shortcut, features, masks, classes, sparsity, score)
        if self.cuda_graph and features.is_cuda and score is None:  # a target's Python scoring is not captured
            return self._graphed(shortcut, plan, features, masks, extras, classes)
        with tail_precision(self.precision, features.device):
            return self._compute(shortcut, plan, features, masks, extras, classes, score).float()

    def plan(
        self,
        shortcut: TailShortcut | None,
        features: torch.Tensor,
        masks: torch.Tensor | None,
        classes: torch.Tensor | None = None,
        sparsity: int | None = None,
        score: BatchTargets | None = None,
        *,
        groups: bool = False,
    ) -> PassPlan:
        """The plan (fdcam.engine.plan) of masks [N,M,K] (or, with `groups`, of [N,K,K] channel groups' switch
        rows) on these features: measures the masks' sparse side when gathering could apply (one host sync)."""
        return plan_passes(
            shortcut,
            features,
            num_rows=features.shape[1] if masks is None else masks.shape[1],
            classes=classes is not None,
            masks=masks,
            sparsity=sparsity,
            groups=groups,
            precision=self.precision,
            batch_size=self.batch_size,
            memory_budget=self.memory_budget,
            output_numel=0 if score is None else score.output_numel,
            engine="torch",
        )

    @torch.no_grad()
    def group_passes(
        self,
        features: torch.Tensor,
        groups: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        members: GroupMembers | None = None,
        switch: str = "on_off",
    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """Float32 logits [N,K,T] of the classes [N,T] with each channel group of boolean `groups` [N,K,K]
        switched on alone (None for switch="off" where that saves passes), and switched off, or None where this
        tail has no such shortcut.

        A tail whose first op is its last Linear (pooling then the classifier, ResNet-50 at `layer4`)
        scores a group as a sum of per-channel class contributions: on = bias + Σ_G C, off = full − Σ_G C,
        one product of the groups with the contributions, no mask rows at all; with the groups'
        `members` (fdcam.groups.GroupMembers), a sum over each row's few candidates. A 1×1 convolution's
        groups run as channel sets on CPUs (fdcam.set_passes). A `batch_size` given asks for mask rows in
        chunks of that size: None, so they run.
        """
        shortcut = self.shortcut_for(features, extras)
        # The largest group bounds a convolution's channel sets (one host sync, where sets can run: on CPUs).
        conv_on_cpu = shortcut is not None and shortcut.kind == "conv" and features.device.type == "cpu"
        largest = max(1, int(groups.sum(-1).max())) if conv_on_cpu and groups.numel() else None
        plan = self.plan(shortcut, features, None, classes, largest, groups=True)
        if plan.form == "sets":
            with tail_precision(self.precision, features.device):
                on, off, chunks = group_set_passes(shortcut, plan, features, groups, extras, classes, switch)
            self.calls += chunks
            return on, off
        if plan.form != "group-sums":
            return None
        with tail_precision(self.precision, features.device):
            contributions, bias = shortcut.prepare(features, classes)  # [N,K,T], [N,T]
            self.calls += 1  # one call of the tail's shortcut for the batch
            if members is not None:
                summed = _member_sums(contributions, members)
            else:
                summed = _group_sums(contributions, groups, plan.rows)
            base = torch.zeros_like(contributions[:, :1]) if bias is None else bias[:, None]
            full = contributions.sum(1, keepdim=True) + base
            return (summed + base).float(), (full - summed).float()

    def _graphed(self, shortcut, plan: PassPlan, features, masks, extras: list, classes) -> torch.Tensor:
        tensors = [features, masks.contiguous(), *extras] + ([] if classes is None else [classes])
        key = (tuple((tuple(t.shape), t.dtype) for t in tensors), features.device, plan, classes is None)
        graphed = self._graphs.get(key)
        if graphed is None:
            count = len(extras)

            def function(features, masks, *rest):
                chosen = None if classes is None else rest[count]
                return self._compute(shortcut, plan, features, masks, list(rest[:count]), chosen).float()

            with tail_precision(self.precision, features.device):
                graphed = GraphedCall(function, tensors)
            self._graphs[key] = graphed
            while len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        self.graph_replays += 1
        return graphed(*tensors)

    def _compute(self, shortcut, plan: PassPlan, features, masks, extras: list, classes, score=None) -> torch.Tensor:
        """Logits [N,M,C|T] (scores [N,M,T] with `score`): the N·M masked passes in chunks of `plan.rows` rows,
        each chunk one body forward (or per channel set, fdcam.set_passes)."""
        n, m, _ = masks.shape
        total = n * m
        step = plan.rows
        if shortcut is not None:
            state = shortcut.prepare(features, classes if shortcut.first_is_final else None)  # once per batch
            sparse = sparse_rows(masks, plan.bound) if plan.gathers else None
            self.sparse_calls += sparse is not None
            if plan.form == "sets":
                logits, chunks = mask_set_passes(shortcut, plan, state, sparse, masks, extras, classes, score)
                self.calls += chunks
                return logits
        outputs = []
        for start in range(0, total, step):
            end = min(total, start + step)
            segments = [
                (i, max(start, i * m) - i * m, min(end, (i + 1) * m) - i * m)
                for i in range(start // m, (end - 1) // m + 1)
            ]
            self.calls += 1
            if shortcut is None:
                masked = torch.empty((end - start, *features.shape[1:]), dtype=features.dtype, device=features.device)
                offset = 0
                for i, lo, hi in segments:
                    torch.mul(
                        features[i : i + 1], masks[i, lo:hi, :, None, None], out=masked[offset : offset + hi - lo]
                    )
                    offset += hi - lo
                logits = self.masked_tail.tail(masked, *segment_rows(extras, segments))
                del masked
                outputs.extend(split_rows(logits, segments, classes, score))
                continue
            starts = [
                shortcut.pre_activation(
                    shortcut.select(state, i),
                    masks[i : i + 1, lo:hi],
                    None if sparse is None else tuple(t[i : i + 1, lo:hi] for t in sparse),
                )
                for i, lo, hi in segments
            ]
            hidden = shortcut.body(concat(starts), *segment_rows(extras, segments))
            offset = 0
            for i, lo, hi in segments:
                part = hidden[offset : offset + hi - lo]
                chosen = None if classes is None else classes[i : i + 1]
                logits = shortcut.logits(part.reshape(1, hi - lo, *part.shape[1:]), chosen)[0]
                outputs.append(logits if score is None else score.score_rows(logits, i))
                offset += hi - lo
        return concat(outputs).reshape(n, m, *outputs[0].shape[1:])


def _group_sums(contributions: torch.Tensor, groups: torch.Tensor, step: int) -> torch.Tensor:
    """Σ over each group of boolean `groups` [N,K,K] of the contributions [N,K,T]: [N,K,T], the groups
    as floats `step` rows at a time."""
    n, k = groups.shape[0], groups.shape[-1]
    summed = contributions.new_empty(contributions.shape)
    for i in range(n):
        for start in range(0, k, step):
            rows = groups[i, start : start + step].to(contributions.dtype)
            torch.mm(rows, contributions[i], out=summed[i, start : start + step])
    return summed


def _member_sums(contributions: torch.Tensor, members: GroupMembers) -> torch.Tensor:
    """Σ over each group's members ([N,K,c] candidates) of the contributions [N,K,T]: [N,K,T]."""
    n, k, c = members.index.shape
    t = contributions.shape[-1]
    # Gathered along each target's row of K contributions: a gather along a dimension of size T = 1 is slow.
    by_target = contributions.transpose(1, 2)  # [N,T,K]
    gathered = by_target.gather(2, members.index.reshape(n, 1, k * c).expand(n, t, k * c)).view(n, t, k, c)
    return torch.where(members.member[:, None], gathered, 0).sum(-1).transpose(1, 2)
