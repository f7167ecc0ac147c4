"""Channel weights from gradient and score terms."""

from __future__ import annotations

import torch

__all__ = ["minmax", "combine_weights"]


def minmax(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalise along `dim`; a constant row becomes all zeros rather than NaN."""
    low = values.amin(dim=dim, keepdim=True)
    span = values.amax(dim=dim, keepdim=True) - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(values))


def combine_weights(alpha: torch.Tensor, scores: torch.Tensor, bias: float = 0.5, combine: str = "exp") -> torch.Tensor:
    """FD-CAM weights w = α̂·exp(ŝ) − b ("exp") or α̂·ŝ − b ("linear"), α̂ and ŝ min-max over channels."""
    alpha_hat, score_hat = minmax(alpha), minmax(scores)
    if combine == "exp":
        return alpha_hat * torch.exp(score_hat) - bias
    if combine == "linear":
        return alpha_hat * score_hat - bias
    raise ValueError(f"combine must be 'exp' or 'linear', not {combine!r}")
