"""The explainer graph's validation: example and validation images, the library's reference logits, and the
graph's largest differences from the library's logits and maps at batch 1 and 3."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fdcam.concurrency import running
from fdcam.errors import ExportError, first_line
from fdcam.model_state import preserved_model_state
from fdcam.targets import OutputSelector, select_output

from .explainer_io import run_explainer
from .region import library_targets, region_cases

__all__ = ["default_validation_images", "example_images", "max_abs", "reference_logits", "reference_output", "validate"]


def example_images(batch: int, input_size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(seed))


def default_validation_images(input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Three images: the shipped photo (normalised with the model's mean/std), a flipped copy and noise."""
    try:
        from importlib.resources import files

        from PIL import Image

        with Image.open(files("fdcam") / "data" / "afghan_hound.jpg") as picture:
            picture = picture.convert("RGB").resize((input_size[1], input_size[0]), Image.BILINEAR)
            photo = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if mean and std:
            photo = (photo - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    except Exception:  # no picture: random images still check the graph
        photo = example_images(1, input_size, seed=2)[0]
    noise = example_images(1, input_size, seed=3)[0]
    return torch.stack([photo, photo.flip(-1), noise])


def reference_logits(model: nn.Module, image: torch.Tensor, output: OutputSelector = None) -> torch.Tensor:
    """The model's output for `image` (the entry `output` selects of a dict or tuple), float32 on the CPU."""
    return reference_output(model, image, output)[0]


@torch.no_grad()
def reference_output(
    model: nn.Module, image: torch.Tensor, output: OutputSelector = None
) -> tuple[torch.Tensor, OutputSelector]:
    """(`reference_logits`, the key or index of the entry explained: "out" of a dict by default, None for a tensor)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with preserved_model_state(model), running():  # no other thread's trace captures these module calls
        raw = model(image.to(device))
    key = "out" if output is None and isinstance(raw, dict) else output
    return select_output(raw, output).float().cpu(), key


def validate(
    session,
    reference,
    model,
    images: torch.Tensor,
    classes_input: bool,
    num_classes: int,
    output: OutputSelector = None,
    region: bool = False,
):
    """(saliency max |Δ|, logits max |Δ|, max |logit|, cases) of the graph against the library at batch 1 and 3.

    `cases` are the (images, targets, library maps, graph maps) compared, for the conditioning rule (`agreement`).
    A region graph is compared with the library's RegionLogit targets (`region_cases`) and its logits with
    the output map's mean over the pixels.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    saliency_error = logits_error = scale = 0.0
    cases = []
    generator = torch.Generator().manual_seed(0)
    for batch in (images[:1], images[:3]):
        expected_logits = reference_logits(model, batch, output)
        regions = None
        if region:
            classes, regions = region_cases(expected_logits, generator)
            targets, expected_logits = library_targets(classes, regions), expected_logits.mean((-2, -1))
        else:
            targets = expected_logits.argmax(1, keepdim=True)
            classes = None
            if classes_input:
                other = torch.randint(0, num_classes, (batch.shape[0], 1), generator=generator)
                classes = targets = torch.cat([targets, other], 1)
        expected = reference(batch.to(device), targets if region else targets.to(device)).float().cpu()
        echoed = classes if region else targets  # what the graph's `targets` output holds
        try:
            logits, got_targets, saliency = run_explainer(
                session,
                batch.numpy(),
                None if classes is None else classes.numpy(),
                None if regions is None else regions.numpy(),
            )
        except Exception as error:  # ONNX Runtime raises its own types
            raise ExportError(
                f"ONNX Runtime cannot run the explainer graph ({first_line(error)}); nothing was saved"
            ) from None
        if saliency.shape != tuple(expected.shape) or not np.array_equal(got_targets, echoed.numpy()):
            return float("inf"), float("inf"), 0.0, cases
        saliency_error = max(saliency_error, max_abs(saliency, expected))
        logits_error = max(logits_error, max_abs(logits, expected_logits))
        scale = max(scale, float(expected_logits.abs().max()))
        cases.append((batch, targets, expected, saliency))
    return saliency_error, logits_error, scale, cases


def max_abs(got: np.ndarray, expected: torch.Tensor) -> float:
    difference = np.abs(got.astype(np.float64) - expected.double().numpy()).max()
    return float(difference) if np.isfinite(difference) else float("inf")
