"""From channel weights to saliency maps at the input's size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["minmax", "weighted_sum", "normalise_maps", "to_input_size"]


def weighted_sum(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k w_k A_k): activations [N,K,h,w] (or per-pixel weights [N,T,K,h,w]), weights [N,T,K] → [N,T,h,w]."""
    if weights.dim() == 5:
        return F.relu((weights * activations[:, None]).sum(2))
    return F.relu(torch.einsum("ntk,nkhw->nthw", weights, activations))


def minmax(values: torch.Tensor, dim: int | tuple[int, ...] = -1, eps: float | None = None) -> torch.Tensor:
    """(v − min)/(max − min) along `dim`; a constant slice becomes zeros, never NaN.

    With `eps`, (v − min)/(max − min + eps) instead (pytorch-grad-cam's Score-CAM convention).
    """
    low = values.amin(dim=dim, keepdim=True)
    span = values.amax(dim=dim, keepdim=True) - low
    if eps is not None:
        return (values - low) / (span + eps)
    return torch.where(
        span > 0, (values - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(values)
    )


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max over the last two dims; an all-constant map becomes zeros, never NaN."""
    return minmax(maps, dim=(-2, -1))


def to_input_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of [N,T,h,w] maps to `size`, then min-max normalised."""
    upsampled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    # A constant map (a 1x1 layer, say) upsamples to a constant up to rounding, which min-max would
    # blow up into a pattern: it stays blank.
    flat = maps.flatten(-2)
    constant = (flat.amax(-1) == flat.amin(-1))[..., None, None]
    return torch.where(
        constant, torch.zeros((), dtype=upsampled.dtype, device=upsampled.device), normalise_maps(upsampled)
    )
