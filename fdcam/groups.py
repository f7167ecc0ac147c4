"""Channel groups: channels whose activation maps are most similar (cosine) to each channel."""

from __future__ import annotations

import torch

__all__ = ["cosine_similarity_matrix", "channel_groups", "single_channel_groups"]

_QUANTILE_LIMIT = 2**24  # torch.quantile refuses larger inputs


def cosine_similarity_matrix(activations: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [...,K,K] of the flattened maps of activations [...,K,h,w]; a zero map has similarity 0."""
    flat = activations.flatten(-2).double()
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (unit @ unit.transpose(-1, -2)).to(activations.dtype)


def channel_groups(activations: torch.Tensor, theta: float = 0.95) -> torch.Tensor:
    """Boolean [...,K,K]: row k is G(k) = {l : cos(k,l) > quantile_θ(cos(k,·))} (torch.quantile, linear rule).

    Activations [K,h,w] of one image, or [N,K,h,w] for N images at once.
    """
    if activations.dim() == 4 and activations.shape[0] * activations.shape[1] ** 2 > _QUANTILE_LIMIT:
        return torch.stack([channel_groups(image, theta) for image in activations])
    similarity = cosine_similarity_matrix(activations)
    threshold = torch.quantile(similarity, theta, dim=-1, keepdim=True)
    return similarity > threshold


def single_channel_groups(num_channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [K,K] identity: each group is the channel itself (FD-CAM without grouping)."""
    return torch.eye(num_channels, dtype=torch.bool, device=device)
