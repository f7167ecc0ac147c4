"""Switch passes per channel set on a tail that starts with a convolution (the planner's "sets" form, CPUs, fp32).

FD-CAM's switch-on row of group G is bias + Σ_G C_l and its switch-off row full − Σ_G C_l: one gathered sum
serves both, and the switch-off row is taken as (full + bias) − (bias + Σ), one pass over the rows fewer.
`mask_set_passes` finds the sets of given 0/1 mask rows (their sparse sides, deduplicated); `group_set_passes`
takes them from boolean channel groups directly, with no mask rows to build, measure and match. A chunk's rows
are written into one buffer, which the body may change in place. A 1×1 convolution's sums are one product per
chunk over the set's channels and a channel of ones carrying the bias (`TailShortcut.pointwise_operands`),
written channels-last where the body allows (`channels_last_rows`).

Lite0's switch stage (`_blocks.15`, 2 cores, 2026-12-07, 40 interleaved calls a variant, two runs on a slow VM
hour): through mask rows 37.6–43.5 ms; from the groups 0.92–0.93 of that, and 0.83–0.90 with channels-last rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from .engine.plan import PassPlan
from .factorise import TailShortcut
from .mask_rows import pick_sets, set_chunks
from .targets import BatchTargets

__all__ = ["channels_last_rows", "group_set_passes", "mask_set_passes"]

_CHANNELS_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def channels_last_rows(shortcut: TailShortcut, full: torch.Tensor) -> bool:
    """Whether the start rows of a 1×1 convolution's sets are written channels-last (pixels × channels products):
    a body that pools them globally then sums contiguous rows of channels, not rows of a few pixels.

    Checked once per shortcut on rows like `full` (one image's [out,h,w]): the body (without extras) gives the
    same outputs up to rounding in either memory format; a body that views its rows as contiguous raises there,
    and its rows stay contiguous.
    """
    known = _CHANNELS_LAST.get(shortcut)
    if known is None:
        known = _CHANNELS_LAST[shortcut] = _body_takes_channels_last(shortcut.body, full)
    return known


def _body_takes_channels_last(body: torch.nn.Module, full: torch.Tensor) -> bool:
    placeholders = [node for node in body.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1 or full.dim() != 3:
        return False
    noise = torch.randn((2, *full.shape), generator=torch.Generator().manual_seed(0), dtype=full.dtype)
    rows = full + noise.to(full.device) * full.std()
    try:
        with torch.no_grad():
            plain = body(rows.clone())
            last = body(rows.clone(memory_format=torch.channels_last))
    except Exception:  # a view or an op that needs contiguous rows: keep them contiguous
        return False
    if not isinstance(plain, torch.Tensor) or not isinstance(last, torch.Tensor) or plain.shape != last.shape:
        return False
    # Another summation order moves a float32 result by a few ulps of its scale; a layout-dependent body by far more.
    return bool(((plain - last).abs() <= 1e-4 * plain.abs().max() + 1e-6).all())


class _ImageSets:
    """One image's operands for its sets' start rows: bias + Σ, and full − Σ as (full + bias) − (bias + Σ)."""

    def __init__(self, shortcut: TailShortcut, state: tuple, operands, i: int):
        self.shortcut = shortcut
        self.image = shortcut.select(state, i)
        self.bias, self.full = shortcut.row_bases(self.image)
        self.operands = None if operands is None else (operands[0][i], operands[1])  # maps [K+1,hw], rows [K+1,out]
        channels_last = self.operands is not None and channels_last_rows(shortcut, self.full)
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.full_and_bias = (self.full + self.bias)[None].contiguous(memory_format=self.layout)

    def buffer(self, rows: int) -> torch.Tensor:
        """Room for `rows` start rows in this image's layout."""
        full = self.full
        return torch.empty((rows, *full.shape), dtype=full.dtype, device=full.device, memory_format=self.layout)

    def sets(self, index: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's sets [S,g] as `sums` takes them: with the channel of ones (the bias) where products run."""
        if self.operands is None:
            return index, gate
        return self.shortcut.pointwise_sets(index, gate.to(self.full.dtype))

    def sums(self, index: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """bias + Σ_j gate·C_index of sets [c,g] (from `sets`) written to `out` ([c,...] of a `buffer`)."""
        if self.operands is None:
            return self.shortcut.gathered_sums(self.image, index, gate, with_bias=True, out=out)
        maps, rows = self.operands
        c = index.shape[0]
        # index_select, not advanced indexing: 2–3× faster copies (results/lite0-sets-gather-2026-12-07.txt).
        flat = index.flatten()
        gathered = maps.index_select(0, flat).view(*index.shape, -1) * gate[..., None]  # [c,g+1,hw]
        weights = rows.index_select(0, flat).view(*index.shape, -1)  # [c,g+1,out]
        if self.layout == torch.channels_last:
            pixels = out.permute(0, 2, 3, 1).view(c, -1, weights.shape[-1])  # out's memory as [c,hw,out]
            torch.bmm(gathered.transpose(1, 2), weights, out=pixels)
        else:
            torch.bmm(weights.transpose(1, 2), gathered, out=out.view(c, weights.shape[-1], -1))
        return out

    def on_and_off_rows(self, index: torch.Tensor, gate: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """The start rows of c sets [c,g] (from `sets`): bias + Σ, then full − Σ, in `buffer` ([2c,...] at least)."""
        count = index.shape[0]
        start = buffer[: 2 * count]
        sums = self.sums(index, gate, start[:count])
        torch.sub(self.full_and_bias, sums, out=start[count:])
        return start


def _chunk_logits(shortcut, start, extras, i: int, classes, score: BatchTargets | None = None) -> torch.Tensor:
    """Logits [R,C|T] (or target scores) of image i's start rows, which the body may change in place."""
    hidden = shortcut.owned_body(start, *(extra[i : i + 1].expand(len(start), *extra.shape[1:]) for extra in extras))
    logits = shortcut.logits(hidden[None], None if classes is None else classes[i : i + 1])[0]
    return logits if score is None else score.score_rows(logits, i)


def mask_set_passes(
    shortcut: TailShortcut,
    plan: PassPlan,
    state: tuple,
    sparse: tuple,
    masks: torch.Tensor,
    extras: Sequence[torch.Tensor],
    classes: torch.Tensor | None,
    score: BatchTargets | None = None,
) -> tuple[torch.Tensor, int]:
    """Logits [N,M,C|T] of 0/1 mask rows [N,M,K] (`sparse` their `sparse_rows`), one gathered sum per distinct
    channel set of an image, `plan.rows` rows a chunk; and the number of chunks run."""
    n, m, _ = masks.shape
    index, gate, complement = sparse
    operands = shortcut.pointwise_operands(state)
    results, chunks = [], 0
    for i in range(n):
        image_sets = _ImageSets(shortcut, state, operands, i)
        buffer = None  # the chunks' starts, written in place: no fresh block per chunk
        key = torch.cat([index[i].double(), gate[i].double()], dim=-1)
        sets, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((sets.shape[0],), m).scatter_reduce_(0, inverse, torch.arange(m), "amin")
        set_index, set_gate = image_sets.sets(index[i, first], gate[i, first])
        result = None
        for a, b, on, on_sets, off, off_sets in set_chunks(inverse.tolist(), complement[i, :, 0].tolist(), plan.rows):
            chunks += 1
            count = b - a
            if buffer is None or buffer.shape[0] < 2 * count:
                buffer = image_sets.buffer(2 * count)
            start = image_sets.on_and_off_rows(set_index[a:b], set_gate[a:b], buffer)
            if not on_sets == off_sets == list(range(count)):  # not one switch-on and one switch-off row per set
                start = torch.cat([pick_sets(start[:count], on_sets), pick_sets(start[count:], off_sets)])
            logits = _chunk_logits(shortcut, start, extras, i, classes, score)
            if result is None:
                result = logits.new_empty((m, *logits.shape[1:]))
            result[on + off] = logits
        results.append(result)
    return torch.stack(results), chunks


def group_set_passes(
    shortcut: TailShortcut,
    plan: PassPlan,
    features: torch.Tensor,
    groups: torch.Tensor,
    extras: Sequence[torch.Tensor],
    classes: torch.Tensor,
    switch: str = "on_off",
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Logits [N,K,T] of the classes [N,T] with each channel group of boolean `groups` [N,K,K] switched on alone
    (None for switch="off") and switched off, the groups' channels gathered `plan.bound` a row (at least the
    largest group's size); and the number of chunks run. A chunk holds `plan.rows` rows: half as many sets."""
    state = shortcut.prepare(features)
    operands = shortcut.pointwise_operands(state)
    n, k = groups.shape[0], groups.shape[-1]
    step = max(1, plan.rows // 2)
    on = off = buffer = None
    for i in range(n):
        image_sets = _ImageSets(shortcut, state, operands, i)
        buffer = image_sets.buffer(2 * min(step, k)) if buffer is None else buffer
        # Each group's channels (gate 1), padded with gate-0 entries to the bound.
        gate, index = groups[i].to(features.dtype).topk(plan.bound, dim=-1, sorted=False)
        index, gate = image_sets.sets(index, gate)
        for a in range(0, k, step):
            b = min(k, a + step)
            start = image_sets.on_and_off_rows(index[a:b], gate[a:b], buffer)
            logits = _chunk_logits(shortcut, start if switch == "on_off" else start[b - a :], extras, i, classes)
            if off is None:
                off = logits.new_empty((n, k, *logits.shape[1:]))
                on = off.new_empty(off.shape) if switch == "on_off" else None
            off[i, a:b] = logits[-(b - a) :]
            if on is not None:
                on[i, a:b] = logits[: b - a]
    return on, off, n * len(range(0, k, step))
