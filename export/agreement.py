"""When an exported explainer's maps count as the library's: within 1e-4, or the conditioning rule.

Maps live in [0,1]; a float32 graph of a few hundred ops differs from torch by ~1e-6, so 1e-4 leaves
two orders of magnitude for another CPU's summation order. Some maps are ill-conditioned in float32,
and there no float32 implementation can promise 1e-4: FD-CAM's map is discontinuous where a channel's
cosine similarity sits at its row's quantile (a rounding flips its group membership and moves the map
by up to ~1e-3); XGrad-CAM divides by near-zero activation sums; random weights give near-cancelling
sums. The rule: a graph's maps pass when max |graph − library| ≤ 1e-4; otherwise they are judged
against the library run in float64 and pass when within 1e-4 + ILL_CONDITIONED_FACTOR × `spread`,
the largest distance from float64 of the float32 library's own maps under float32 rounding alone:
its batched and per-image paths, the input moved by one ulp per pixel (two random sign draws), and
for FD-CAM with grouping every row's quantile moved one ulp up and one down. Where a map is
well-conditioned the spread is ~1e-6 and the rule is 1e-4 again; where the library's own map moves by
more than 1e-4 under those perturbations, the graph may differ from it as much as the library differs
from itself (with a factor for the perturbations not tried).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fdcam.groups import cosine_similarity_matrix, quantile_threshold
from fdcam.methods import METHODS

__all__ = ["Agreement", "ILL_CONDITIONED_FACTOR", "SALIENCY_TOLERANCE", "agreement", "float32_spread"]

SALIENCY_TOLERANCE = 1e-4  # max |Δ| of maps in [0,1]
# How much farther from float64 than the float32 library's own perturbed maps the graph's may be: the
# perturbations tried are a sample (the graph's rounding is another one), and 4x covered the spread we
# measured between the library's paths.
ILL_CONDITIONED_FACTOR = 4.0
_INPUT_DRAWS = 2


@dataclass(frozen=True)
class Agreement:
    """How a graph's maps compare with the library's: `error` vs float32; `spread` and `exact_error` (vs
    float64) only when `error` is over the tolerance."""

    error: float
    tolerance: float = SALIENCY_TOLERANCE
    spread: float | None = None
    exact_error: float | None = None

    @property
    def allowed(self) -> float:
        """The bound on `exact_error` (ill-conditioned maps), else on `error`."""
        return self.tolerance if self.spread is None else self.tolerance + ILL_CONDITIONED_FACTOR * self.spread

    @property
    def passed(self) -> bool:
        if self.error <= self.tolerance:
            return True
        return self.exact_error is not None and self.exact_error <= self.allowed

    @property
    def ill_conditioned(self) -> bool:
        """Whether the library's own float32 maps stray from float64 by more than the tolerance."""
        return self.spread is not None and self.spread > self.tolerance


def agreement(
    model: nn.Module,
    layer: str,
    method: str,
    options: dict,
    images: torch.Tensor,
    targets: torch.Tensor | list,
    got: np.ndarray | torch.Tensor,
    expected: torch.Tensor,
    tolerance: float = SALIENCY_TOLERANCE,
) -> Agreement:
    """The graph's maps `got` [N,T,H,W] against the library's `expected` for `images` and `targets`, under the rule."""
    got = torch.from_numpy(np.array(got, dtype=np.float64))  # a copy: answers from a server are read-only arrays
    error = _max_abs(got, expected)
    if error <= tolerance or not np.isfinite(error):
        return Agreement(error, tolerance)
    spread, exact = float32_spread(model, layer, method, options, images, targets, expected)
    return Agreement(error, tolerance, spread, _max_abs(got, exact))


def float32_spread(
    model: nn.Module,
    layer: str,
    method: str,
    options: dict,
    images: torch.Tensor,
    targets: torch.Tensor | list,
    expected: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """(largest |float32 library − float64 library| over the rounding perturbations, the float64 maps on the CPU)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    images, targets = images.to(device), _on(targets, device)
    double = copy.deepcopy(model).to("cpu", torch.float64).eval()
    exact = METHODS[method](double, layer, **options)(images.cpu().double(), _on(targets, "cpu")).double()
    del double
    library = METHODS[method](model, layer, **options)
    variants = [expected if expected is not None else library(images, targets)]
    variants.append(torch.cat([library(images[i : i + 1], targets[i : i + 1]) for i in range(images.shape[0])]))
    generator = torch.Generator().manual_seed(0)
    for _ in range(_INPUT_DRAWS):
        up = torch.rand(images.shape, generator=generator) < 0.5
        towards = torch.where(up, float("inf"), float("-inf")).to(device, images.dtype)
        variants.append(library(torch.nextafter(images, towards), targets))
    if method == "fdcam" and options.get("grouping", True):
        for direction in (float("inf"), float("-inf")):
            variants.append(_nudged_quantile(direction)(model, layer, **options)(images, targets))
    spread = max(_max_abs(variant, exact) for variant in variants)
    return spread, exact


def _nudged_quantile(direction: float) -> type:
    """FD-CAM with every row's quantile moved one float ulp towards `direction` (±inf)."""

    class NudgedQuantileFDCAM(METHODS["fdcam"]):
        def groups_and_members(self, activations: torch.Tensor) -> tuple[torch.Tensor, None]:
            return torch.stack([self.groups(image) for image in activations]), None

        def groups(self, activations: torch.Tensor) -> torch.Tensor:
            if activations.dim() == 4:  # per image, as channel_groups does for large batches
                return torch.stack([self.groups(image) for image in activations])
            similarity = cosine_similarity_matrix(activations)
            threshold = quantile_threshold(similarity, self.theta)
            return similarity > torch.nextafter(threshold, torch.full_like(threshold, direction))

    return NudgedQuantileFDCAM


def _on(targets, device):
    """Class indices moved to `device`; target objects (fdcam.targets, one list per image) move their own tensors."""
    return targets.to(device) if isinstance(targets, torch.Tensor) else targets


def _max_abs(got: torch.Tensor, expected: torch.Tensor) -> float:
    difference = float((got.detach().cpu().double() - expected.detach().cpu().double()).abs().max())
    return difference if np.isfinite(difference) else float("inf")
