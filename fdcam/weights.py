"""Channel weights from gradient and score terms."""

from __future__ import annotations

import torch

from .maps import minmax
from .options import COMBINES, invalid_choice

__all__ = ["minmax", "combine_weights"]


def combine_weights(alpha: torch.Tensor, scores: torch.Tensor, bias: float = 0.5, combine: str = "exp") -> torch.Tensor:
    """FD-CAM weights w = α̂·exp(ŝ) − b ("exp") or α̂·ŝ − b ("linear"), α̂ and ŝ min-max over channels."""
    alpha_hat, score_hat = minmax(alpha), minmax(scores)
    if combine == "exp":
        return alpha_hat * torch.exp(score_hat) - bias
    if combine == "linear":
        return alpha_hat * score_hat - bias
    raise invalid_choice("combine", combine, COMBINES)
