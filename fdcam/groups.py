"""Channel groups: channels whose activation maps are most similar (cosine) to each channel."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .fxgraph import is_traced

__all__ = [
    "GroupMembers",
    "QUANTILE_LIMIT",
    "channel_groups_and_members",
    "cosine_similarity_matrix",
    "channel_groups",
    "quantile_threshold",
    "single_channel_groups",
]

#: The most elements torch.quantile takes in one call; channel_groups groups images together up to it.
QUANTILE_LIMIT = 2**24
#: From this many channels on, channel_groups takes float32 similarities checked against float64
#: (`_float32_groups`); below, the float64 matrix and its selection cost about as little.
FLOAT32_MIN_CHANNELS = 1024
_UNIT_ROUNDOFF32 = 2.0**-24
#: Maps of more pixels take float64: the float32 dot product's error bound γ_n grows with n (and its rows to settle).
_FLOAT32_MAX_PIXELS = 2**16


def cosine_similarity_matrix(activations: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [...,K,K] of the flattened maps of activations [...,K,h,w]; a zero map has similarity 0."""
    unit = _unit_maps(activations.flatten(-2).double())
    return (unit @ unit.transpose(-1, -2)).to(activations.dtype)


class GroupMembers(NamedTuple):
    """Each group's channels as rows of candidates: group k of image n holds `index[n, k, j]` where
    `member[n, k, j]` ([N,K,c] both); every channel of the group is among its row's candidates."""

    index: torch.Tensor
    member: torch.Tensor


def channel_groups_and_members(
    activations: torch.Tensor, theta: float = 0.95
) -> tuple[torch.Tensor, GroupMembers | None]:
    """`channel_groups` of activations [N,K,h,w], and the same groups as `GroupMembers` where the selection
    that found them holds every member (the float32 path), else None.

    A group of c ≪ K channels then costs c per row, not K: what a tail that sums channels needs
    (`fdcam.tail.TorchTail.group_passes`).
    """
    if activations.dim() != 4 or not _takes_float32(activations, theta):
        return channel_groups(activations, theta), None
    step = max(1, QUANTILE_LIMIT // activations.shape[1] ** 2)  # images at once, as channel_groups takes them
    parts = [
        _float32_groups(activations[start : start + step], theta, members=True)
        for start in range(0, len(activations), step)
    ]
    if len(parts) == 1:
        return parts[0]
    groups = torch.cat([part[0] for part in parts])
    if any(part[1] is None for part in parts):
        return groups, None
    return groups, GroupMembers(*(torch.cat([part[1][i] for part in parts]) for i in range(2)))


def channel_groups(
    activations: torch.Tensor, theta: float = 0.95, *, quantile_limit: int = QUANTILE_LIMIT
) -> torch.Tensor:
    """Boolean [...,K,K]: row k is G(k) = {l : cos(k,l) > quantile_θ(cos(k,·))} (torch.quantile, linear rule).

    Activations [K,h,w] of one image, or [N,K,h,w] for N images at once: in one call while the N·K²
    similarities are at most `quantile_limit`, else one image at a time (the groups are the same).
    The similarities are those of `cosine_similarity_matrix` (float64, rounded to the activations'
    dtype); finite float32 activations of many channels take them in float32 and recompute in float64
    only the rows where float32's rounding could move a channel across the threshold (`_float32_groups`).
    """
    if activations.dim() == 4 and activations.shape[0] * activations.shape[1] ** 2 > quantile_limit:
        return torch.stack([channel_groups(image, theta) for image in activations])
    if _takes_float32(activations, theta):
        return _float32_groups(activations, theta)
    similarity = cosine_similarity_matrix(activations)
    return similarity > quantile_threshold(similarity, theta)


def _takes_float32(activations: torch.Tensor, theta: float) -> bool:
    """Whether `channel_groups` takes the float32 similarities checked against float64 (`_float32_groups`)."""
    fast = activations.dtype == torch.float32 and activations.shape[-3] >= FLOAT32_MIN_CHANNELS and 0.0 <= theta <= 1.0
    fast = fast and activations.shape[-2] * activations.shape[-1] <= _FLOAT32_MAX_PIXELS
    # The float32 path checks its selection (`_threshold_and_top`'s topk, on the CPU only; elsewhere torch.quantile
    # selects nothing to check and every row would be settled in float64: the float64 path itself). It settles
    # some rows in float64, a choice that depends on the values: eager runs only.
    fast = fast and activations.device.type == "cpu"
    return fast and not is_traced(activations) and _float32_safe(activations)


def quantile_threshold(similarity: torch.Tensor, theta: float) -> torch.Tensor:
    """`torch.quantile(similarity, θ, dim=-1, keepdim=True)` (linear rule), bit for bit, without sorting rows.

    torch.quantile (2.14, CPU) takes the sorted row's values at floor and ceil of the position
    θ·(K−1) (θ rounded to the input's dtype, the product in double) and lerps between them; here those
    two order statistics come from `topk`. A row holding NaN gives NaN, as torch.quantile does.
    Other devices and dtypes, and θ outside [0, 1], call torch.quantile.
    """
    return _threshold_and_top(similarity, theta)[0]


def _threshold_and_top(
    similarity: torch.Tensor, theta: float, non_negative: bool = False, extra: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`quantile_threshold`, and the row's values from the lower order statistic up plus `extra` more below,
    unordered ([...,K−floor(θ(K−1))+extra]), with their column indices (None, None where torch.quantile ran).

    `non_negative` promises float32 values ≥ 0 with no NaN or infinity: the selection then ranks
    their bits as int32, which orders them as they compare (−0 ranks lowest, tied with +0 as a value)
    and is faster."""
    k = similarity.shape[-1]
    exact = similarity.device.type == "cpu" and similarity.dtype in (torch.float32, torch.float64)
    if not exact or not 0.0 <= theta <= 1.0 or k == 0:
        return torch.quantile(similarity, theta, dim=-1, keepdim=True), None, None
    position = float(torch.tensor(theta, dtype=similarity.dtype)) * (k - 1)
    below = int(position)
    count = min(k, k - below + extra)
    if non_negative and similarity.dtype == torch.float32:
        bits, index = _select_top(similarity.view(torch.int32), count, float_bits=True)
        values = bits.view(torch.float32)
    else:
        values, index = _select_top(similarity, count)
    # The sorted row's values at `below` and `below + 1` are the selection's values at `lowest` and `lowest + 1`,
    # counted from its smallest: a selection from a few dozen values, not a second one from the whole top.
    lowest = count - (k - below)
    smallest = values.topk(min(count, lowest + 2), dim=-1, largest=False, sorted=True).values
    low = smallest[..., lowest : lowest + 1]
    high = smallest[..., lowest + 1 : lowest + 2] if position > below and k - below > 1 else low
    threshold = _lerp(low, high, position - below)
    if non_negative:  # no NaN: the promise
        return threshold, values, index
    # topk ranks NaN above every number: a row holding NaN has one among its top values.
    return threshold.masked_fill(values.isnan().any(-1, keepdim=True), float("nan")), values, index


def _select_top(keys: torch.Tensor, count: int, float_bits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`keys.topk(count, dim=-1, sorted=False)`'s values (the same multiset per row; which of tied keys is
    selected may differ) and their indices, from the blocks holding the largest keys where that is cheaper.

    Rows are cut into blocks of 16 bytes: a key outside the `count` blocks of the largest block maxima is at most
    each of those maxima, so the row's `count` largest keys are found among those blocks' keys (and every key left
    out is at most every key selected). On ResNet-50's 2048 channels this costs two selections over a quarter of
    the keys each: 10.5 against 13.3 ms for the one over all of them in torch (2 threads, median of 60,
    interleaved), 19.9 against 22.7 ms with ONNX Runtime's TopK, where the blocks are gathered as rows of one
    [blocks, 4] matrix (a plain Gather). `float_bits` says int32 keys are the bits of float32 values ≥ 0 (no NaN): their
    block maxima then come from the floats' max pooling, twice as fast as amax over blocks; where a block holds both
    zeros it may give −0's bits, so of keys tied as values (±0) either may be selected.
    """
    k = keys.shape[-1]
    size = 16 // keys.element_size()
    if k % size or k // size < 4 * count:
        return keys.topk(count, dim=-1, sorted=False)
    lead, per_row = keys.shape[:-1], k // size
    if float_bits and keys.dtype == torch.int32 and not is_traced(keys):
        pooled = torch.nn.functional.max_pool1d(keys.view(torch.float32).reshape(-1, 1, k), size, size)
        maxima = pooled.view(torch.int32).reshape(*lead, per_row)
    else:
        maxima = keys.reshape(*lead, per_row, size).amax(-1)
    blocks = maxima.topk(count, dim=-1, sorted=False).indices  # [...,count]
    rows = keys.reshape(-1, size)  # one block a row
    first = torch.arange(0, rows.shape[0], per_row, device=keys.device)  # each key row's first block
    chosen = (blocks.reshape(-1, count) + first[:, None]).flatten()
    candidates = rows.index_select(0, chosen).reshape(*lead, count * size)
    values, position = candidates.topk(count, dim=-1, sorted=False)
    if is_traced(keys):
        # The candidates' columns, then the selected ones' (ONNX shifts only unsigned integers).
        columns = (blocks[..., None] * size + torch.arange(size, device=keys.device)).reshape(*lead, count * size)
        return values, columns.gather(-1, position)
    # Candidate p is key p % size of block blocks[p // size]; shifts and masks, as integer division is slow on CPUs.
    shift = size.bit_length() - 1
    return values, blocks.gather(-1, position >> shift) * size + (position & (size - 1))


def _lerp(low: torch.Tensor, high: torch.Tensor, weight: float) -> torch.Tensor:
    """low + weight·(high − low) rounded as torch.quantile's own lerp: torch.lerp with a weight tensor
    on contiguous operands."""
    weights = torch.full_like(low, weight, memory_format=torch.contiguous_format)
    return torch.lerp(low.contiguous(), high.contiguous(), weights)


def _threshold_of_top(top: torch.Tensor, theta: float, k: int) -> torch.Tensor:
    """`quantile_threshold` [R,1] of rows of length k from their c largest values, in any order [R,c]
    (c ≥ k − floor(θ(k−1)): the order statistics it takes are among them)."""
    position = float(torch.tensor(theta, dtype=top.dtype)) * (k - 1)
    below = int(position)
    lowest = below - (k - top.shape[-1])  # the sorted row's value `below` is the top's `lowest` from its smallest
    ordered = top.topk(min(top.shape[-1], lowest + 2), dim=-1, largest=False, sorted=True).values
    low = ordered[:, lowest : lowest + 1]
    high = ordered[:, lowest + 1 : lowest + 2] if position > below and below + 1 < k else low
    return _lerp(low, high, position - below)


#: Rows of similarities `_float32_groups` computes and selects from at a time (8 MB of float32 at 2048 channels: on
#: ResNet-50's layer4 faster than 512 or 256 rows, and than all 2048 at once).
_SIMILARITY_ROWS = 1024

#: Values below each row's lower order statistic that `_float32_groups` also selects, to re-check in float64.
_CHECK_EXTRA = 16


def _float32_groups(activations: torch.Tensor, theta: float, members: bool = False):
    """`channel_groups` of finite float32 activations on the CPU from float32 similarities, checked against float64.

    The maps are normalised in float64 and rounded to float32, so the float32 similarities s' lie within
    e (`_similarity_error`: the float32 dot product's γ_n and one rounding of each factor, about (n + 3)·u
    for n pixels, u = 2⁻²⁴) of `cosine_similarity_matrix`'s s. A row's order statistics then move by at most
    e and its lerped threshold by e + 6u, so a channel can change sides only where |s' − threshold'| ≤
    m = 2e + 6u. Rows with such a value are settled in float64 (`_settle_rows`); every other row is already
    exact. With `members`, it returns (groups, `GroupMembers` from the selection, or None where a row had to
    be settled whole: its members may lie outside the selection).
    """
    flat = activations.flatten(-2)
    # Norms in float32 would put (n/2 + 2)·u of error into each factor: three times the margin, and three times
    # the rows to settle (443 against 143 of 2048 on ResNet-50's layer4 maps of the zebra, random weights).
    unit64 = _unit_maps(flat.double())
    unit = unit64.float()
    # The float32 difference |s' − threshold'| that is compared with m rounds by at most u of m.
    margin = (2 * _similarity_error(flat.shape[-1]) + 6 * _UNIT_ROUNDOFF32) * (1 + 2 * _UNIT_ROUNDOFF32)
    # Non-negative maps (after a ReLU) have similarities ≥ 0: products and sums of values ≥ 0.
    non_negative = bool((flat >= 0).all())
    # Rows of similarities a block at a time: the block's temporaries stay small enough for the allocator to reuse
    # them from call to call instead of taking (and faulting in) fresh pages for a K×K matrix each time.
    k = unit.shape[-2]
    parts = [
        _threshold_and_top(
            unit[..., start : start + _SIMILARITY_ROWS, :] @ unit.transpose(-1, -2),
            theta,
            non_negative,
            extra=_CHECK_EXTRA,
        )
        for start in range(0, k, _SIMILARITY_ROWS)
    ]
    threshold, values, index = (torch.cat([part[i] for part in parts], -2) for i in range(3))
    # Only selected channels can lie above the threshold (the unselected ones lie at or below the lower order
    # statistic): scattering them is cheaper than comparing all K² similarities.
    above = values > threshold  # each selected channel's membership
    groups = unit.new_zeros((*unit.shape[:-1], k), dtype=torch.bool).scatter_(-1, index, above)
    # Every value within m of the threshold is among the selected ones: the threshold is at least the
    # lower order statistic, and the selection reaches below it (`_settle_rows` checks how far).
    near = (values - threshold).abs_().le_(margin).any(-1)
    near &= flat.abs().amax(-1) > 0  # an all-zero map's row is exact zeros in both
    whole = False
    if bool(near.any()):
        groups, whole = _settle_rows(groups, unit64, theta, near, values, index, threshold, margin, above)
    if not members:
        return groups
    # A channel above the threshold ranks above the lower order statistic: it is among the selected ones.
    return groups, None if whole else GroupMembers(index, above)


def _similarity_error(n: int) -> float:
    """How far a float32 similarity of two maps of n pixels, normalised in float64 and rounded to float32, may
    lie from `cosine_similarity_matrix`'s (the float64 value rounded to float32), both against the exact cosine.

    A unit map's element is a float64 quotient (relative error (n/2 + 2)·2⁻⁵³ from the norm) rounded to float32
    (u more, or 2⁻¹⁵⁰ absolute where subnormal); the float32 dot product of n terms adds γ_n of Σ|aᵢbᵢ| ≤ 1 (and
    2⁻¹⁵⁰ per product that underflows). The reference is the float64 cosine (error (2n + 6)·2⁻⁵³) rounded once.
    Valid while n·u < 1 (`_takes_float32` keeps n far below).
    """
    u, u64 = _UNIT_ROUNDOFF32, 2.0**-53
    factor = u + (n / 2 + 3) * u64
    gamma = n * u / (1 - n * u)
    mine = gamma * (1 + factor) ** 2 + 2 * factor + factor**2 + 4 * n * 2.0**-150
    reference = u * (1 + (2 * n + 6) * u64) + (2 * n + 6) * u64
    return mine + reference


def _settle_rows(groups, unit64, theta, near, values, index, threshold, margin, above):
    """Rows `near` [...,K] of `groups` set to those of the float64 similarities of unit maps `unit64`
    [...,K,n], and whether some row was taken whole (its members may lie outside the selection).

    With the selection (`values`, `index` of each row's largest float32 similarities, reaching
    `_CHECK_EXTRA` values below its lower order statistic) and when the smallest selected value lies
    more than m below the threshold, every unselected channel is out in float64 too and below the
    float64 order statistics: the threshold comes from the selected channels alone. Other rows take
    the whole float64 row's. `above` (the selected channels' membership, [...,K,c]) is set to match.
    """
    single = groups.dim() == 2
    if single:
        groups, near, unit64 = groups[None], near[None], unit64[None]
        values, index, threshold, above = values[None], index[None], threshold[None], above[None]
    k = groups.shape[-1]
    any_whole = False
    for image in near.any(-1).nonzero().flatten().tolist():
        rows = near[image].nonzero().flatten()
        exact = (unit64[image, rows] @ unit64[image].transpose(-1, -2)).float()  # [R,K]
        columns = index[image, rows]
        reaches = values[image, rows].amin(-1) < threshold[image, rows, 0] - margin  # [R]
        cutoff = torch.full_like(exact[:, :1], float("inf"))  # rows taken whole get theirs below
        chosen = exact.gather(-1, columns)
        if bool(reaches.any()):
            # The float64 order statistics are among the selected channels.
            cutoff[reaches] = _threshold_of_top(chosen[reaches], theta, k)
        # An unselected channel of a row that reaches far enough is out (it lies below the threshold).
        settled = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, columns, chosen > cutoff)
        if not bool(reaches.all()):
            whole = ~reaches
            cutoff[whole] = quantile_threshold(exact[whole], theta)
            settled[whole] = exact[whole] > cutoff[whole]
            any_whole = True
        groups[image, rows] = settled
        above[image, rows] = settled.gather(-1, columns)
    return (groups[0] if single else groups), any_whole


def _float32_safe(activations: torch.Tensor) -> bool:
    """Whether every map is all zero or has its largest magnitude within 2^±40: float32 norms of such
    maps neither overflow nor lose precision to underflow, as `_float32_groups`' error bound assumes."""
    largest = activations.flatten(-2).abs().amax(-1)
    return bool(((largest == 0) | ((largest >= 2.0**-40) & (largest <= 2.0**40))).all())


def _unit_maps(flat: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norm (an all-zero row stays zero)."""
    norms = flat.norm(dim=-1, keepdim=True)
    return flat / torch.where(norms > 0, norms, torch.ones_like(norms))


def single_channel_groups(num_channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [K,K] identity: each group is the channel itself (FD-CAM without grouping)."""
    return torch.eye(num_channels, dtype=torch.bool, device=device)
