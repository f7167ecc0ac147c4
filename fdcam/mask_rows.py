"""The rows of masked tail passes: masks as [N,M,K], a chunk's image segments and the chunks of an image's channel
sets (how many rows a call runs is the planner's: fdcam.engine.plan, re-exported here)."""

from __future__ import annotations

import torch

from .engine.plan import DEFAULT_MEMORY_BUDGET, chunk_size
from .targets import BatchTargets

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "chunk_size",
    "concat",
    "expand_masks",
    "pick_sets",
    "segment_rows",
    "set_chunks",
    "split_rows",
]


def expand_masks(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masks as [N,M,K] in the features' dtype (a [M,K] batch is shared by all N images).

    ValueError if they do not fit.
    """
    n = features.shape[0]
    masks = masks.to(features.dtype)
    masks = masks.expand(n, *masks.shape) if masks.dim() == 2 else masks
    if masks.dim() != 3 or masks.shape[0] != n or masks.shape[2] != features.shape[1]:
        raise ValueError(f"masks {tuple(masks.shape)} do not fit features {tuple(features.shape)}")
    return masks


def set_chunks(inverse: list[int], complement: list[bool], step: int) -> list[tuple]:
    """Chunks of consecutive sets holding about `step` rows: (first set, end set, switch-on rows, their
    sets counted from the first, switch-off rows, their sets). A chunk has at least one set."""
    count = max(inverse) + 1 if inverse else 0
    members: list[tuple[list[int], list[int]]] = [([], []) for _ in range(count)]
    for row, (which, off) in enumerate(zip(inverse, complement)):
        members[which][off].append(row)
    chunks, a = [], 0
    while a < count:
        b, size = a, 0
        while b < count and (b == a or size + len(members[b][0]) + len(members[b][1]) <= step):
            size += len(members[b][0]) + len(members[b][1])
            b += 1
        on = [(row, j - a) for j in range(a, b) for row in members[j][0]]
        off = [(row, j - a) for j in range(a, b) for row in members[j][1]]
        chunks.append((a, b, [r for r, _ in on], [j for _, j in on], [r for r, _ in off], [j for _, j in off]))
        a = b
    return chunks


def pick_sets(sums: torch.Tensor, sets: list[int]) -> torch.Tensor:
    """The sums of the given sets, in order (the tensor itself when that is all of them)."""
    if sets == list(range(sums.shape[0])):
        return sums
    return sums.index_select(0, torch.tensor(sets, dtype=torch.long, device=sums.device))


def split_rows(
    logits: torch.Tensor, segments, classes: torch.Tensor | None, score: BatchTargets | None = None
) -> list[torch.Tensor]:
    """The logits of each segment's rows, reduced to its image's classes, or scored by its image's targets."""
    if classes is None and score is None:
        return [logits]
    parts, offset = [], 0
    for i, lo, hi in segments:
        rows = logits[offset : offset + hi - lo]
        parts.append(rows.index_select(1, classes[i]) if score is None else score.score_rows(rows, i))
        offset += hi - lo
    return parts


def concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def segment_rows(extras: list[torch.Tensor], segments: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Each extra repeated for the rows of each image segment (a broadcast view when there is one segment)."""
    return [concat([extra[i : i + 1].expand(hi - lo, *extra.shape[1:]) for i, lo, hi in segments]) for extra in extras]
