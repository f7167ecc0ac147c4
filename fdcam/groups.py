"""Channel groups: channels whose activation maps are most similar (cosine) to each channel."""

from __future__ import annotations

import torch

__all__ = ["QUANTILE_LIMIT", "cosine_similarity_matrix", "channel_groups", "quantile_threshold", "single_channel_groups"]

#: The most elements torch.quantile takes in one call; channel_groups groups images together up to it.
QUANTILE_LIMIT = 2**24


def cosine_similarity_matrix(activations: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [...,K,K] of the flattened maps of activations [...,K,h,w]; a zero map has similarity 0."""
    flat = activations.flatten(-2).double()
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (unit @ unit.transpose(-1, -2)).to(activations.dtype)


def channel_groups(activations: torch.Tensor, theta: float = 0.95, *, quantile_limit: int = QUANTILE_LIMIT) -> torch.Tensor:
    """Boolean [...,K,K]: row k is G(k) = {l : cos(k,l) > quantile_θ(cos(k,·))} (torch.quantile, linear rule).

    Activations [K,h,w] of one image, or [N,K,h,w] for N images at once: in one call while the N·K²
    similarities are at most `quantile_limit`, else one image at a time (the groups are the same).
    """
    if activations.dim() == 4 and activations.shape[0] * activations.shape[1] ** 2 > quantile_limit:
        return torch.stack([channel_groups(image, theta) for image in activations])
    similarity = cosine_similarity_matrix(activations)
    return similarity > quantile_threshold(similarity, theta)


def quantile_threshold(similarity: torch.Tensor, theta: float) -> torch.Tensor:
    """`torch.quantile(similarity, θ, dim=-1, keepdim=True)` (linear rule), bit for bit, without sorting rows.

    torch.quantile (2.14, CPU) takes the sorted row's values at floor and ceil of the position
    θ·(K−1) (θ rounded to the input's dtype, the product in double) and lerps between them; here those
    two order statistics come from `topk`. A row holding NaN gives NaN, as torch.quantile does.
    Other devices and dtypes, and θ outside [0, 1], call torch.quantile.
    """
    k = similarity.shape[-1]
    exact = similarity.device.type == "cpu" and similarity.dtype in (torch.float32, torch.float64)
    if not exact or not 0.0 <= theta <= 1.0 or k == 0:
        return torch.quantile(similarity, theta, dim=-1, keepdim=True)
    position = float(torch.tensor(theta, dtype=similarity.dtype)) * (k - 1)
    below = int(position)
    top = similarity.topk(k - below, dim=-1, sorted=False).values  # the sorted row from `below` on
    if k - below == 1:
        low = high = top
    else:
        low, high = top.topk(2, dim=-1, largest=False).values.split(1, dim=-1)
        high = high if position > below else low
    # torch.lerp with a weight tensor on contiguous operands rounds as torch.quantile's own lerp does.
    weight = torch.full_like(low, position - below, memory_format=torch.contiguous_format)
    threshold = low.contiguous().lerp_(high.contiguous(), weight)
    # topk ranks NaN above every number: a row holding NaN has one among its top values.
    return threshold.masked_fill_(top.isnan().any(-1, keepdim=True), float("nan"))


def single_channel_groups(num_channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [K,K] identity: each group is the channel itself (FD-CAM without grouping)."""
    return torch.eye(num_channels, dtype=torch.bool, device=device)
