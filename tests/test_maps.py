"""fdcam.maps.minmax: the one min-max normalisation of weights (over channels), maps and Score-CAM masks."""

import torch

from fdcam.maps import minmax, normalise_maps


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
