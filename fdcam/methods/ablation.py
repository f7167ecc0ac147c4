"""Ablation-CAM (Desai & Ramaswamy, WACV 2020) through the batched tail engine."""

from __future__ import annotations

import torch

from ..switch import switch_logits
from .base import BaseCAM, BatchContext

__all__ = ["AblationCAM"]


class AblationCAM(BaseCAM):
    """w_k = (y_c − y_c^k)/y_c, y_c^k the target's score with channel k set to zero; K tail passes per image,
    no head re-runs."""

    uses_tail_engine = True

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        tail = self.tail_for(context)
        activations = context.activations
        num_channels = activations.shape[1]
        masks = 1.0 - torch.eye(num_channels, device=activations.device, dtype=activations.dtype)
        # Row k switches channel k off: one zero per row, so the shortcut tails take Z(1) − C_k.
        scores = switch_logits(tail, activations, masks, context.extras, context.targets, sparsity=1)  # [N,K,T]
        ablated = scores.transpose(1, 2)  # [N,T,K]
        original = context.scores[..., None]  # [N,T,1]
        return (original - ablated) / original
