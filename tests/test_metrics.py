import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from fdcam.metrics import (
    auc,
    blur,
    insertion_deletion,
    insertion_deletion_batch,
    pointing_game,
    rise_blur_kernel,
)
from reference import assert_same_up_to_rounding


def tiny_model(seed: int = 0, n_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, n_classes),
    )
    # Larger output weights so the softmax scores actually move as pixels change.
    with torch.no_grad():
        model[-1].weight.mul_(20)
    return model.eval()


def reference_curves(model, x, saliency, cls, step):
    """RISE's CausalMetric.single_run, unbatched: one forward per step, numpy pixel bookkeeping."""
    _, channels, height, width = x.shape
    area = height * width
    n_steps = (area + step - 1) // step
    order = np.argsort(-saliency.reshape(-1), kind="stable")
    curves = {}
    for mode in ("deletion", "insertion"):
        if mode == "deletion":
            start, finish = x.clone(), torch.zeros_like(x)
        else:
            start, finish = blur(x), x.clone()
        start_flat = start.numpy().reshape(channels, area)
        finish_flat = finish.numpy().reshape(channels, area)
        scores = np.empty(n_steps + 1)
        for i in range(n_steps + 1):
            with torch.no_grad():
                probabilities = model(torch.from_numpy(start_flat.reshape(1, channels, height, width))).softmax(1)
            scores[i] = probabilities[0, cls].item()
            if i < n_steps:
                coords = order[step * i : step * (i + 1)]
                start_flat[:, coords] = finish_flat[:, coords]
        curves[mode] = scores
    return curves


def test_blur_kernel_matches_scipy():
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    expected = gaussian_filter(delta, 5)
    kernel = rise_blur_kernel()
    assert kernel.shape == (11, 11)
    assert kernel.dtype == torch.float32
    np.testing.assert_allclose(kernel.double().numpy(), expected, rtol=0, atol=1e-7)


def test_blur_matches_rise_full_channel_kernel():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 20, 24)
    kernel = torch.zeros(3, 3, 11, 11)
    for channel in range(3):
        kernel[channel, channel] = rise_blur_kernel()
    expected = nn.functional.conv2d(x, kernel, padding=5)
    out = blur(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ([1.0] * 5, 1.0),
        (np.linspace(0, 1, 11), 0.5),
        ([0.0, 1.0, 0.0], 0.5),
        ([2.0, 0.0], 1.0),
        (torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]), 0.875),
    ],
)
def test_auc_on_hand_made_curves(curve, expected):
    assert auc(curve) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("step", "n_steps"), [(64, 16), (100, 11)])
def test_insertion_deletion_matches_unbatched_reference(step, n_steps):
    model = tiny_model()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32)
    saliency = np.random.default_rng(3).permutation(32 * 32).reshape(32, 32).astype(np.float32)  # no ties
    cls = 4
    expected = reference_curves(model, x, saliency, cls, step)

    result = insertion_deletion(model, x, saliency, cls, step=step, batch_size=7)

    for mode in ("insertion", "deletion"):
        curve = result[f"{mode}_curve"]
        assert curve.shape == (n_steps + 1,)
        np.testing.assert_allclose(curve.numpy(), expected[mode], rtol=0, atol=1e-4)
        assert isinstance(result[mode], float)
        assert result[mode] == pytest.approx(auc(expected[mode]), abs=1e-4)
    # The curves are not trivially flat, so the check above means something.
    assert np.ptp(expected["insertion"]) > 1e-3 and np.ptp(expected["deletion"]) > 1e-3


def test_insertion_deletion_accepts_tensor_saliency_and_resolves_ties_in_row_major_order():
    model = tiny_model(seed=5)
    torch.manual_seed(6)
    x = torch.randn(1, 3, 16, 16)
    saliency = torch.zeros(16, 16)
    saliency[4:8, 4:12] = 1.0  # plateau of ties, then more ties outside
    expected = reference_curves(model, x, saliency.numpy(), 2, 20)
    result = insertion_deletion(model, x, saliency, 2, step=20)
    np.testing.assert_allclose(result["deletion_curve"].numpy(), expected["deletion"], atol=1e-4)
    np.testing.assert_allclose(result["insertion_curve"].numpy(), expected["insertion"], atol=1e-4)


def test_full_size_image_gives_28_steps_and_29_scores():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 8, stride=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    saliency = torch.rand(224, 224)
    result = insertion_deletion(model, x, saliency, 1, step=224 * 8, batch_size=64)
    assert result["insertion_curve"].shape == (29,)
    assert result["deletion_curve"].shape == (29,)
    with torch.no_grad():
        original = model(x).softmax(1)[0, 1].item()
        zeros = model(torch.zeros_like(x)).softmax(1)[0, 1].item()
        blurred = model(blur(x)).softmax(1)[0, 1].item()
    assert result["deletion_curve"][0].item() == pytest.approx(original, abs=1e-6)
    assert result["deletion_curve"][-1].item() == pytest.approx(zeros, abs=1e-6)
    assert result["insertion_curve"][0].item() == pytest.approx(blurred, abs=1e-6)
    assert result["insertion_curve"][-1].item() == pytest.approx(original, abs=1e-6)


def test_batched_form_equals_single_form():
    model = tiny_model(seed=8)
    torch.manual_seed(9)
    n_images, n_maps, size, step = 3, 2, 24, 50
    x = torch.randn(n_images, 3, size, size)
    saliencies = torch.rand(n_images, n_maps, size, size)
    classes = torch.tensor([0, 7, 3])

    batched = insertion_deletion_batch(model, x, saliencies, classes, step=step, batch_size=13)

    n_scores = math.ceil(size * size / step) + 1
    assert batched["insertion"].shape == (n_images, n_maps)
    assert batched["deletion"].shape == (n_images, n_maps)
    assert batched["insertion_curve"].shape == (n_images, n_maps, n_scores)
    assert batched["deletion_curve"].shape == (n_images, n_maps, n_scores)
    for i in range(n_images):
        for m in range(n_maps):
            single = insertion_deletion(model, x[i : i + 1], saliencies[i, m], int(classes[i]), step=step, batch_size=4)
            for mode in ("insertion", "deletion"):
                curve, single_curve = batched[f"{mode}_curve"][i, m], single[f"{mode}_curve"]
                assert_same_up_to_rounding(curve, single_curve)
                # an AUC is a mean of its curve, so it cannot differ by more than the curves do
                largest = float((curve.double() - single_curve.double()).abs().max())
                assert abs(batched[mode][i, m].item() - single[mode]) <= largest + 1e-7


def test_single_step_curve_has_only_end_points():
    model = tiny_model()
    x = torch.randn(1, 3, 8, 8)
    result = insertion_deletion(model, x, torch.rand(8, 8), 0, step=1000)
    assert result["insertion_curve"].shape == (2,)
    assert result["deletion_curve"].shape == (2,)


def test_mismatched_saliency_shape_is_rejected():
    with pytest.raises(ValueError):
        insertion_deletion_batch(tiny_model(), torch.randn(1, 3, 8, 8), torch.rand(1, 1, 8, 9), [0], step=8)


def peak_map(y: int, x: int, height: int = 100, width: int = 120) -> np.ndarray:
    saliency = np.zeros((height, width), dtype=np.float32)
    saliency[y, x] = 1.0
    return saliency


def test_pointing_game_inside_box_hits():
    assert pointing_game(peak_map(30, 40), [[20, 10, 50, 60]])
    assert pointing_game(torch.from_numpy(peak_map(10, 20)), [[20, 10, 50, 60]])  # on the inclusive corner


def test_pointing_game_tolerance_boundary():
    # Peak at x=40, y=30; box right edge x1 at 40 - d, so the distance is d along x.
    assert pointing_game(peak_map(30, 40), [[0, 0, 40 - 14.9, 60]])
    assert pointing_game(peak_map(30, 40), [[0, 0, 40 - 15, 60]])  # exactly 15 counts as a hit
    assert not pointing_game(peak_map(30, 40), [[0, 0, 40 - 15.1, 60]])
    # Same along y, box below the peak.
    assert pointing_game(peak_map(30, 40), [[0, 30 + 14.9, 100, 99]])
    assert not pointing_game(peak_map(30, 40), [[0, 30 + 15.1, 100, 99]])


def test_pointing_game_uses_euclidean_distance_to_the_box_corner():
    # Peak at (x=50, y=50); the box's bottom-right corner is (41, 38): dx=9, dy=12, distance 15.
    assert pointing_game(peak_map(50, 50), [[0, 0, 41, 38]])
    # dx=11, dy=11: each under 15 but the distance is 15.56.
    assert not pointing_game(peak_map(50, 50), [[0, 0, 39, 39]])


def test_pointing_game_several_boxes_and_custom_tolerance():
    saliency = peak_map(80, 100)
    far_box, near_box = [0, 0, 10, 10], [60, 60, 90, 90]
    assert not pointing_game(saliency, [far_box])
    assert pointing_game(saliency, [far_box, near_box])
    assert not pointing_game(saliency, [far_box, near_box], tolerance=5)
    assert not pointing_game(saliency, [])


def test_pointing_game_takes_first_maximum_on_ties():
    saliency = np.zeros((50, 50), dtype=np.float32)
    saliency[5, 40] = 1.0  # first in row-major order
    saliency[45, 5] = 1.0
    assert pointing_game(saliency, [[35, 0, 49, 10]], tolerance=0)
    assert not pointing_game(saliency, [[0, 40, 10, 49]], tolerance=0)


def test_endpoints_are_scored_once_per_image_and_shared_by_every_map():
    model = tiny_model(seed=11)
    scored = []

    def counting(images):
        scored.append(images.shape[0])
        return model(images)

    torch.manual_seed(12)
    n_images, n_maps, size, step = 2, 3, 16, 40
    x = torch.randn(n_images, 3, size, size)
    saliencies = torch.rand(n_images, n_maps, size, size)
    classes = torch.tensor([1, 6])
    result = insertion_deletion_batch(counting, x, saliencies, classes, step=step, batch_size=5)

    n_steps = math.ceil(size * size / step)
    # x and blur(x) per image, one all-zero image, then only the n-1 middle points of each curve.
    assert sum(scored) == 2 * n_images + 1 + 2 * n_images * n_maps * (n_steps - 1)
    for i in range(n_images):
        for m in range(n_maps):
            expected = reference_curves(model, x[i : i + 1], saliencies[i, m].numpy(), int(classes[i]), step)
            for mode in ("insertion", "deletion"):
                assert_same_up_to_rounding(result[f"{mode}_curve"][i, m], expected[mode])


def test_onnxruntime_scorer_gives_the_reference_curves():
    from fdcam.scoring import OrtScorer

    model = tiny_model(seed=13)
    torch.manual_seed(14)
    x = torch.randn(1, 3, 32, 32)
    saliency = np.random.default_rng(15).permutation(32 * 32).reshape(32, 32).astype(np.float32)
    expected = reference_curves(model, x, saliency, 3, 64)

    result = insertion_deletion(OrtScorer(model), x, saliency, 3, step=64, batch_size=6)

    for mode in ("insertion", "deletion"):
        np.testing.assert_allclose(result[f"{mode}_curve"].numpy(), expected[mode], rtol=0, atol=1e-4)
        assert result[mode] == pytest.approx(auc(expected[mode]), abs=1e-4)
    assert np.ptp(expected["insertion"]) > 1e-3 and np.ptp(expected["deletion"]) > 1e-3


def test_forwards_without_a_batch_size_run_in_batches_of_the_cpu_default():
    from fdcam import ScoreCAM
    from fdcam.metrics import default_batch_size

    cpu_batch = default_batch_size("cpu")
    sizes = []

    def counting(model):
        def forward(images):
            sizes.append(images.shape[0])
            return model(images)

        return forward

    # Insertion/deletion of one 8x8 image one pixel a step: x and blur(x), the black image, then the
    # 2·63 middle images of the two curves.
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(16))
    insertion_deletion(
        counting(tiny_model(seed=16)), x, torch.rand(8, 8, generator=torch.Generator().manual_seed(17)), 3, step=1
    )
    assert 1 < cpu_batch < 126
    assert sizes == [2, 1] + [cpu_batch] * (126 // cpu_batch) + [126 % cpu_batch] * (126 % cpu_batch > 0)

    # Score-CAM's K = 40 masked inputs of a CPU model.
    torch.manual_seed(18)
    model = nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10)
    ).eval()
    sizes.clear()
    ScoreCAM(model, "1", scorer=counting(model))(x)
    assert sizes == [cpu_batch] * (40 // cpu_batch) + [40 % cpu_batch] * (40 % cpu_batch > 0)
