"""Perturbation CAMs that score masked inputs: Score-CAM and Group-CAM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..maps import normalise_maps
from .base import BaseCAM, Explanation

__all__ = ["ScoreCAM", "GroupCAM", "gaussian_blur"]


def _batched_logits(model, inputs: torch.Tensor, batch_size: int, progress: bool, label: str) -> torch.Tensor:
    """Logits of the model on `inputs` in batches of `batch_size`, on the inputs' device."""
    chunks = range(0, inputs.shape[0], batch_size)
    with torch.no_grad():
        outputs = [model(inputs[start : start + batch_size]) for start in tqdm(chunks, desc=label, disable=not progress, leave=False)]
    return torch.cat(outputs)


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al. 2020) in pytorch-grad-cam's convention.

    Each channel, upsampled (align_corners=True) and min-max normalised, masks the normalised input;
    the weights are the softmax over channels of the masked inputs' logits. The K forwards do not
    depend on the class, so every requested class shares them.
    """

    def channel_weights(self, explanation: Explanation) -> torch.Tensor:
        x, activations = explanation.x, explanation.activations
        upsampled = F.interpolate(activations, size=x.shape[-2:], mode="bilinear", align_corners=True)
        low = upsampled.amin(dim=(-2, -1), keepdim=True)
        high = upsampled.amax(dim=(-2, -1), keepdim=True)
        upsampled = (upsampled - low) / (high - low + 1e-8)
        batch_size = self.batch_size or 64
        weights = []
        for i in range(x.shape[0]):
            masked = x[i][None] * upsampled[i][:, None]  # [K,3,H,W]
            logits = _batched_logits(self.model, masked, batch_size, self.progress, "Score-CAM")
            scores = logits[:, explanation.targets[i]].T  # [T,K]
            weights.append(torch.softmax(scores, dim=-1))
        return torch.stack(weights)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 51, sigma: float = 50.0) -> torch.Tensor:
    """Separable Gaussian blur per channel with reflect padding (Group-CAM's kornia blur)."""
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - radius
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


class GroupCAM(BaseCAM):
    """Group-CAM (Zhang et al. 2021): Grad-CAM-weighted channels summed in G groups, scored on blurred inputs.

    Each group map ReLU(Σ_{k∈g} α_k A_k) keeps values above its `percentile` (70, as the authors'
    code), is upsampled and min-max normalised to m_g; the input x·m_g + blur(x)·(1 − m_g) scores
    p_c − p_c(blur(x)) (softmax); the map is ReLU(Σ_g score_g · m_g), min-max normalised.
    """

    def __init__(self, model, target_layer=None, *, groups: int = 32, percentile: float = 70.0, **options):
        super().__init__(model, target_layer, **options)
        self.num_groups = groups
        self.percentile = percentile

    def channel_weights(self, explanation: Explanation) -> torch.Tensor:
        return explanation.gradients.mean(dim=(-2, -1))

    def saliency(self, explanation: Explanation, weights: torch.Tensor) -> torch.Tensor:
        x, activations, targets = explanation.x, explanation.activations, explanation.targets
        size = x.shape[-2:]
        batch_size = self.batch_size or 64
        maps = []
        for i in range(x.shape[0]):
            weighted = weights[i][:, :, None, None] * activations[i][None]  # [T,K,h,w]
            group_maps = torch.stack([chunk.sum(1) for chunk in weighted.chunk(self.num_groups, dim=1)], 1)
            group_maps = F.relu(group_maps)  # [T,G,h,w]
            flat = group_maps.flatten(-2)
            threshold = torch.quantile(flat, self.percentile / 100.0, dim=-1, keepdim=True)
            group_maps = torch.where(flat > threshold, flat, torch.zeros_like(flat)).reshape(group_maps.shape)
            upsampled = F.interpolate(group_maps, size=size, mode="bilinear", align_corners=False)
            low = upsampled.amin(dim=(-2, -1), keepdim=True)
            span = upsampled.amax(dim=(-2, -1), keepdim=True) - low
            valid = span > 0  # the authors skip constant group maps
            masks = torch.where(valid, (upsampled - low) / torch.where(valid, span, torch.ones_like(span)), torch.zeros_like(upsampled))
            blurred = gaussian_blur(x[i : i + 1])
            inputs = x[i] * masks[..., None, :, :] + blurred * (1 - masks[..., None, :, :])  # [T,G,3,H,W]
            probabilities = torch.softmax(
                _batched_logits(self.model, torch.cat([blurred, inputs.flatten(0, 1)]), batch_size, self.progress, "Group-CAM"), -1
            )
            baseline = probabilities[0, targets[i]]  # [T]
            scored = probabilities[1:].reshape(*masks.shape[:2], -1)  # [T,G,C]
            scores = scored.gather(2, targets[i][:, None, None].expand(-1, masks.shape[1], 1))[..., 0] - baseline[:, None]
            scores = torch.where(valid[..., 0, 0], scores, torch.zeros_like(scores))
            maps.append(F.relu((scores[..., None, None] * masks).sum(1)))
        return normalise_maps(torch.stack(maps))
