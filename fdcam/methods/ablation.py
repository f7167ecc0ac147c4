"""Ablation-CAM (Desai & Ramaswamy, WACV 2020) through the batched tail engine."""

from __future__ import annotations

import torch

from ..switch import switch_logits
from .base import BaseCAM, Explanation

__all__ = ["AblationCAM"]


class AblationCAM(BaseCAM):
    """w_k = (y_c − y_c^k)/y_c, y_c^k the logit with channel k set to zero; K tail passes per image, no head re-runs."""

    def channel_weights(self, explanation: Explanation) -> torch.Tensor:
        tail = self.tail_for(explanation)
        activations = explanation.activations
        num_channels = activations.shape[1]
        masks = 1.0 - torch.eye(num_channels, device=activations.device, dtype=activations.dtype)
        weights = []
        for i, features in enumerate(activations):
            extras = [extra[i : i + 1] for extra in explanation.head.extras]
            logits = switch_logits(tail, features[None], masks, extras)
            classes = explanation.targets[i]
            ablated = logits[:, classes].T  # [T, K]
            original = explanation.head.logits[i, classes][:, None]
            weights.append((original - ablated) / original)
        return torch.stack(weights)
