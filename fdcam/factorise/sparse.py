"""0/1 mask rows as their sparse side, for the gathered sums of the tail shortcuts (`fdcam.factorise`).

FD-CAM's groups (~5 % of the channels) and Ablation-CAM's all-but-one masks are both sparse: few
ones, or few zeros. `sparse_rows` describes each row by the indices of its sparse side, and
`fits_sparse` says when that is exact for a given bound.
"""

from __future__ import annotations

import torch

__all__ = ["fits_sparse", "max_group_size", "sparse_rows"]


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
