"""fdcam.export.agreement: the explainer's tolerance and conditioning rule, and the photo sweep behind the claim."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fdcam
from fdcam.export import agreement as agreement_module
from fdcam.export import run_explainer
from fdcam.export.agreement import ILL_CONDITIONED_FACTOR, SALIENCY_TOLERANCE, Agreement, agreement, float32_spread
from fdcam.images import load_image, preprocess
from fdcam.models import spec_of

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
SWEEP_PHOTOS = 200
BATCH = 4


def test_the_rule_is_the_tolerance_where_the_map_is_well_conditioned():
    assert Agreement(5e-5).passed and Agreement(5e-5).allowed == SALIENCY_TOLERANCE
    # Over 1e-4 while float32 rounding barely moves the library: a real difference, refused.
    assert not Agreement(2e-4, spread=1e-6, exact_error=2e-4).passed
    # Over 1e-4 where rounding alone moves the library's own maps by 1e-3: judged against float64.
    moved = Agreement(1.2e-3, spread=1e-3, exact_error=1.5e-3)
    assert moved.ill_conditioned and moved.passed
    assert moved.allowed == pytest.approx(1e-4 + ILL_CONDITIONED_FACTOR * 1e-3)
    assert not Agreement(1.2e-3, spread=1e-3, exact_error=5e-3).passed


def small_model(duplicate: bool) -> torch.nn.Module:
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    if duplicate:  # channel 1 repeats channel 0: in their rows the two top similarities tie at the quantile
        with torch.no_grad():
            model[0].weight[1], model[0].bias[1] = model[0].weight[0], model[0].bias[0]
    return model


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
TARGETS = torch.tensor([[1], [2]])


def test_a_well_conditioned_map_keeps_the_tolerance():
    model = small_model(duplicate=False)
    expected = fdcam.FDCAM(model, "1")(X, TARGETS)
    spread, exact = float32_spread(model, "1", "fdcam", {}, X, TARGETS, expected)
    assert spread < 1e-5 and float((expected.double() - exact).abs().max()) <= spread
    judged = agreement(model, "1", "fdcam", {}, X, TARGETS, expected.numpy() + 5e-4, expected)
    assert judged.spread is not None and not judged.passed  # 5e-4 off a well-conditioned map is a real difference


def test_a_similarity_at_its_quantile_is_ill_conditioned_and_either_side_passes():
    # A tie at the quantile: one ulp of the threshold decides the group, and the map jumps. A graph whose
    # rounding lands on the other side of it passes the rule; the same jump on a well-conditioned map does not.
    model = small_model(duplicate=True)
    expected = fdcam.FDCAM(model, "1")(X, TARGETS)
    spread, _ = float32_spread(model, "1", "fdcam", {}, X, TARGETS, expected)
    assert spread > SALIENCY_TOLERANCE
    other_side = agreement_module._nudged_quantile(float("-inf"))(model, "1")(X, TARGETS)
    judged = agreement(model, "1", "fdcam", {}, X, TARGETS, other_side.numpy(), expected)
    assert judged.error > SALIENCY_TOLERANCE and judged.ill_conditioned and judged.passed
    assert not agreement(model, "1", "fdcam", {}, X, TARGETS, expected.numpy() + 6 * spread + 2e-4, expected).passed


@pytest.mark.slow
def test_the_graph_equals_the_library_on_shared_photos_under_the_rule(lite0, lite0_fdcam, capsys):
    """Lite0 FD-CAM's explainer.onnx against fdcam.FDCAM on SWEEP_PHOTOS photos of the shared ImageNet sample."""
    photos = sorted(SAMPLE.glob("*.JPEG"))[:SWEEP_PHOTOS]
    assert len(photos) >= 50, f"the photo sweep needs the shared ImageNet sample in {SAMPLE}"
    session = ort.InferenceSession(str(lite0_fdcam), providers=["CPUExecutionProvider"])
    spec = spec_of(lite0)
    library = fdcam.FDCAM(lite0, "_blocks.15")
    errors, ill_conditioned, failed = [], [], []
    for start in range(0, len(photos), BATCH):
        batch = photos[start : start + BATCH]
        images = torch.cat([preprocess(load_image(photo), spec) for photo in batch])
        _, targets, saliency = run_explainer(session, images.numpy())
        targets = torch.from_numpy(targets)
        expected = library(images, targets)
        for i, photo in enumerate(batch):
            one = slice(i, i + 1)
            judged = agreement(
                lite0, "_blocks.15", "fdcam", {}, images[one], targets[one], saliency[one], expected[one]
            )
            errors.append(judged.error)
            if judged.spread is not None:
                ill_conditioned.append((photo.name, judged))
            if not judged.passed:
                failed.append((photo.name, judged))
    errors = np.array(errors)
    report = (
        f"explainer.onnx vs fdcam.FDCAM, Lite0 _blocks.15, {len(errors)} photos: max |Δ| "
        f"median {np.median(errors):.2g}, "
        f"p99 {np.percentile(errors, 99):.2g}, max {errors.max():.2g}; {len(ill_conditioned)} over 1e-4, "
        "judged against float64: "
        + "; ".join(
            f"{name} |Δ| {a.error:.2g}, float32 spread {a.spread:.2g}, vs float64 {a.exact_error:.2g}"
            f" (allowed {a.allowed:.2g})"
            for name, a in ill_conditioned
        )
    )
    with capsys.disabled():
        print("\n" + report)
    assert not failed, report
    assert np.median(errors) <= SALIENCY_TOLERANCE / 10  # most photos are far inside the tolerance
