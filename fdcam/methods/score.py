"""Perturbation CAMs that score masked inputs: Score-CAM and Group-CAM."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..maps import minmax, normalise_maps
from ..metrics import default_batch_size
from ..scoring import Scorer
from ..targets import BatchTargets, ClassLogit, ClassProbability, select_output
from .base import BaseCAM, BatchContext

__all__ = ["ScoreCAM", "GroupCAM", "gaussian_blur"]


def _batched_scores(
    scorer: Scorer,
    count: int,
    make_inputs: Callable[[slice], torch.Tensor],
    batch_size: int,
    progress: bool,
    label: str,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`reduce` of `scorer`'s outputs on `count` inputs, each batch built by `make_inputs(slice)` only when
    it runs and reduced (scored by the targets) before the next, so whole outputs never pile up."""
    chunks = range(0, count, batch_size)
    with torch.no_grad():
        outputs = [
            reduce(scorer(make_inputs(slice(start, start + batch_size))))
            for start in tqdm(chunks, desc=label, disable=not progress, leave=False)
        ]
    return torch.cat(outputs)


class _ScoredCAM(BaseCAM):
    """A CAM whose cost is full-model forwards of perturbed inputs, run by `scorer` (default: the model)."""

    uses_forward_scorer = True

    def __init__(self, model, target_layer=None, *, scorer: Scorer | None = None, **options):
        super().__init__(model, target_layer, **options)
        self.scorer = scorer

    def score(
        self, count: int, make_inputs: Callable[[slice], torch.Tensor], label: str, targets: BatchTargets, image: int
    ) -> torch.Tensor:
        """Target scores [count,T] of image `image`'s targets on `count` perturbed inputs, forward_batch_size
        at a time (default: fdcam.metrics.default_batch_size); a dict or tuple output is read at `output`."""
        scorer = self.scorer if self.scorer is not None else self.model
        batch_size = self.forward_batch_size or default_batch_size(next(self.model.parameters(), torch.empty(0)).device)

        def reduce(output) -> torch.Tensor:
            output = output if isinstance(output, torch.Tensor) else select_output(output, self.output)
            return targets.score_rows(output, image)

        return _batched_scores(scorer, count, make_inputs, batch_size, self.progress, label, reduce)


class ScoreCAM(_ScoredCAM):
    """Score-CAM (Wang et al. 2020) in pytorch-grad-cam's convention.

    Each channel, upsampled (align_corners=True) and min-max normalised, masks the normalised input;
    the weights are the softmax over channels of the masked inputs' logits. The K forwards do not
    depend on the class, so every requested class shares them. `scorer` (a callable inputs -> logits
    equal to the model, e.g. fdcam.scoring.OrtScorer) may run the masked forwards instead of the model.
    """

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        x, activations = context.x, context.activations
        upsampled = F.interpolate(activations, size=x.shape[-2:], mode="bilinear", align_corners=True)
        upsampled = minmax(upsampled, dim=(-2, -1), eps=1e-8)
        weights = []
        for i in range(x.shape[0]):
            image, masks = x[i][None], upsampled[i][:, None]  # [1,3,H,W], [K,1,H,W]
            inputs = lambda rows: image * masks[rows]  # noqa: B023, E731
            scores = self.score(masks.shape[0], inputs, "Score-CAM", context.targets, i).T  # [T,K]
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


class GroupCAM(_ScoredCAM):
    """Group-CAM (Zhang et al. 2021): Grad-CAM-weighted channels summed in G groups, scored on blurred inputs.

    Each group map ReLU(Σ_{k∈g} α_k A_k) keeps values above its `percentile` (70, as the authors'
    code), is upsampled and min-max normalised to m_g; the input x·m_g + blur(x)·(1 − m_g) scores
    p_c − p_c(blur(x)) (softmax); the map is ReLU(Σ_g score_g · m_g), min-max normalised.
    `scorer` may run the masked forwards instead of the model, as in ScoreCAM. Class logits of [N,C]
    logits are scored as their probabilities (the authors' softmax); other targets by their own score.
    """

    _option_attributes = {"groups": "num_groups"}

    def __init__(self, model, target_layer=None, *, groups: int = 32, percentile: float = 70.0, **options):
        super().__init__(model, target_layer, **options)
        self.num_groups = groups
        self.percentile = percentile

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        return context.gradients.mean(dim=(-2, -1))

    def saliency(self, context: BatchContext, weights: torch.Tensor) -> torch.Tensor:
        x, activations, targets = context.x, context.activations, _as_probabilities(context.targets)
        size = x.shape[-2:]
        maps = []
        for i in range(x.shape[0]):
            weighted = weights[i][:, :, None, None] * activations[i][None]  # [T,K,h,w]
            group_maps = torch.stack([chunk.sum(1) for chunk in weighted.chunk(self.num_groups, dim=1)], 1)
            group_maps = F.relu(group_maps)  # [T,G,h,w]
            flat = group_maps.flatten(-2)
            threshold = torch.quantile(flat, self.percentile / 100.0, dim=-1, keepdim=True)
            group_maps = torch.where(flat > threshold, flat, torch.zeros_like(flat)).reshape(group_maps.shape)
            upsampled = F.interpolate(group_maps, size=size, mode="bilinear", align_corners=False)
            masks = minmax(upsampled, dim=(-2, -1))
            # the authors skip constant group maps
            valid = upsampled.amax(dim=(-2, -1), keepdim=True) > upsampled.amin(dim=(-2, -1), keepdim=True)
            blurred = gaussian_blur(x[i : i + 1])
            # Input 0 is the blurred image itself (mask 0), the baseline of every group's score.
            flat_masks = torch.cat([masks.new_zeros(1, *size), masks.flatten(0, 1)])[:, None]  # [1+T*G,1,H,W]
            image = x[i][None]
            inputs = lambda rows: image * flat_masks[rows] + blurred * (1 - flat_masks[rows])  # noqa: B023, E731
            scored = self.score(flat_masks.shape[0], inputs, "Group-CAM", targets, i)  # [1+T*G,T]
            baseline = scored[0]  # [T]
            t = torch.arange(masks.shape[0], device=scored.device)
            own = scored[1:].reshape(*masks.shape[:2], -1)[t, :, t]  # [T,G]: group maps of target t, scored by t
            scores = own - baseline[:, None]
            scores = torch.where(valid[..., 0, 0], scores, torch.zeros_like(scores))
            maps.append(F.relu((scores[..., None, None] * masks).sum(1)))
        return normalise_maps(torch.stack(maps))


def _as_probabilities(targets: BatchTargets) -> BatchTargets:
    """Group-CAM's targets: a class logit of [N,C] logits becomes the class's softmax probability."""
    if len(targets.output_shape) != 1:
        return targets
    rows = (
        targets.items if targets.items is not None else [[ClassLogit(c) for c in r] for r in targets.classes.tolist()]
    )
    items = [[ClassProbability(t.c) if type(t) is ClassLogit else t for t in row] for row in rows]
    return BatchTargets(items, targets.output_shape, "cpu")  # no class rows: every target is scored
