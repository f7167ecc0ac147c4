"""fdcam.maps against loops: the weighted sum ReLU(Σ_k w_k A_k), bilinear upsampling (align_corners=False)
written out by hand, and minmax, the one min-max normalisation of weights (over channels), maps and Score-CAM masks."""

import math

import pytest
import torch

from fdcam.maps import minmax, normalise_maps, to_input_size, weighted_sum
from reference import EPS32, assert_same_up_to_rounding


def _plain(values: torch.Tensor) -> torch.Tensor:
    """Min-max of each row of a 2-D tensor, one row at a time; constant rows become zeros."""
    rows = []
    for row in values:
        low, high = row.min(), row.max()
        rows.append(torch.zeros_like(row) if high == low else (row - low) / (high - low))
    return torch.stack(rows)


def test_minmax_over_one_dim_and_over_the_map_dims_matches_a_plain_loop():
    torch.manual_seed(0)
    values = torch.randn(3, 4, 5, 6)
    values[1, 2] = 7.0  # a constant map
    assert torch.equal(minmax(values.flatten(-2)), _plain(values.flatten(0, 1).flatten(-2)).reshape(3, 4, 30))
    assert torch.equal(minmax(values, dim=(-2, -1)), _plain(values.flatten(0, 1).flatten(-2)).reshape(values.shape))
    assert torch.equal(normalise_maps(values), minmax(values, dim=(-2, -1)))
    assert not minmax(values, dim=(-2, -1))[1, 2].any()


def test_minmax_with_eps_is_the_score_cam_convention():
    values = torch.tensor([[1.0, 2.0, 5.0], [3.0, 3.0, 3.0]])
    expected = torch.stack([(values[0] - 1.0) / (4.0 + 1e-8), torch.zeros(3)])
    assert torch.equal(minmax(values, eps=1e-8), expected)


def plain_weighted_sum(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k w_k A_k) one image, class and channel at a time; weights [N,T,K] or per pixel [N,T,K,h,w]."""
    n, t = weights.shape[:2]
    maps = torch.zeros(n, t, *activations.shape[-2:])
    for i in range(n):
        for j in range(t):
            for k in range(activations.shape[1]):
                maps[i, j] += weights[i, j, k] * activations[i, k]
    return maps.clamp(min=0)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_weighted_sum_is_the_relu_of_the_channel_sum(per_pixel):
    generator = torch.Generator().manual_seed(1)
    activations = torch.relu(torch.randn(2, 6, 4, 5, generator=generator))
    shape = (2, 3, 6, 4, 5) if per_pixel else (2, 3, 6)
    weights = torch.randn(*shape, generator=generator)
    got = weighted_sum(activations, weights)
    expected = plain_weighted_sum(activations, weights)
    assert got.shape == (2, 3, 4, 5) and (got == 0).any() and (got > 0).any()  # the ReLU cuts somewhere
    assert_same_up_to_rounding(got, expected)


def plain_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one [h,w] map, align_corners=False: output pixel centres mapped back onto the input."""

    def taps(out_index: int, out_size: int, in_size: int) -> tuple[int, int, float]:
        source = max((out_index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(source)), in_size - 1)
        return low, min(low + 1, in_size - 1), source - low

    values = image.double().tolist()
    out = torch.zeros(size, dtype=torch.float64)
    for y in range(size[0]):
        y0, y1, fy = taps(y, size[0], image.shape[0])
        for x in range(size[1]):
            x0, x1, fx = taps(x, size[1], image.shape[1])
            top = (1 - fx) * values[y0][x0] + fx * values[y0][x1]
            bottom = (1 - fx) * values[y1][x0] + fx * values[y1][x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


def test_to_input_size_is_bilinear_upsampling_then_min_max():
    maps = torch.relu(torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(2)))
    got = to_input_size(maps, (7, 10))
    assert got.shape == (2, 2, 7, 10)
    for i in range(2):
        for t in range(2):
            upsampled = plain_bilinear(maps[i, t], (7, 10))
            expected = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min())
            assert_same_up_to_rounding(got[i, t], expected, rel=16 * EPS32)
            assert float(got[i, t].min()) == 0.0 and float(got[i, t].max()) == 1.0


def test_constant_all_zero_and_one_pixel_maps_stay_blank():
    maps = torch.relu(torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(3)))
    maps[0, 1], maps[0, 2] = 0.0, 0.37
    got = to_input_size(maps, (8, 8))
    assert not got[0, 1].any() and not got[0, 2].any()  # not rounding noise blown up into a pattern
    assert got[0, 0].max() == 1.0 and torch.isfinite(got).all()
    assert not to_input_size(torch.full((2, 1, 1, 1), 5.0), (6, 4)).any()  # a 1x1 layer
    assert not normalise_maps(torch.zeros(1, 1, 3, 3)).any()
