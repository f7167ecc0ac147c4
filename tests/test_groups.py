"""fdcam.groups against the paper's Eq. 4-5 written as loops: cosine similarity of flattened maps and
G(k) = {l : cos(k, l) > the θ quantile of row k} (numpy's linear quantile)."""

import math

import numpy as np
import pytest
import torch

from fdcam.groups import channel_groups, cosine_similarity_matrix, single_channel_groups
from reference import EPS32, assert_same_up_to_rounding, cosine_groups


def plain_cosine(activations: torch.Tensor) -> torch.Tensor:
    """cos(A_k, A_l) = v_k·v_l / (‖v_k‖‖v_l‖) one pair at a time, in float64; 0 where either map is all zero."""
    flat = activations.reshape(activations.shape[0], -1).tolist()
    k = len(flat)
    cos = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            dot = math.fsum(a * b for a, b in zip(flat[i], flat[j], strict=True))
            norms = math.sqrt(math.fsum(a * a for a in flat[i])) * math.sqrt(math.fsum(b * b for b in flat[j]))
            cos[i, j] = dot / norms if norms > 0 else 0.0
    return cos


def random_activations(k: int, seed: int, h: int = 3, w: int = 4) -> torch.Tensor:
    # ReLU-like maps: non-negative with some zeros, as a post-activation layer gives
    return torch.relu(torch.randn(k, h, w, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("k", [1, 2, 7, 20])
def test_cosine_similarity_matrix_is_the_pairwise_cosine(k):
    activations = random_activations(k, seed=k)
    activations[0] *= 1000.0  # the cosine does not see a map's scale
    got = cosine_similarity_matrix(activations)
    assert got.dtype == torch.float32 and got.shape == (k, k)
    # float64 arithmetic cast to float32: equal up to float32's rounding of values in [-1, 1]
    assert_same_up_to_rounding(got, plain_cosine(activations), rel=2 * EPS32)
    assert torch.equal(got, got.T)


def test_an_all_zero_map_has_similarity_zero_with_every_map_and_itself():
    activations = random_activations(5, seed=1)
    activations[2] = 0.0
    got = cosine_similarity_matrix(activations)
    assert not got[2].any() and not got[:, 2].any()
    assert_same_up_to_rounding(got, plain_cosine(activations), rel=2 * EPS32)
    assert not cosine_similarity_matrix(torch.zeros(4, 3, 3)).any()


def test_constant_maps_are_parallel_whatever_their_level():
    activations = random_activations(4, seed=2)
    activations[1], activations[3] = 0.5, 7.0
    got = cosine_similarity_matrix(activations)
    assert abs(float(got[1, 3]) - 1.0) <= 2 * EPS32
    assert_same_up_to_rounding(got, plain_cosine(activations), rel=2 * EPS32)


def test_the_similarity_keeps_the_activations_dtype():
    activations = random_activations(6, seed=3).double()
    got = cosine_similarity_matrix(activations)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, plain_cosine(activations), rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", [1, 2, 7, 20, 64])
@pytest.mark.parametrize("theta", [0.5, 0.9, 0.95, 1.0])
def test_channel_groups_are_the_papers_groups(k, theta):
    activations = random_activations(k, seed=10 + k)
    assert torch.equal(channel_groups(activations, theta), cosine_groups(activations, theta))


def test_groups_at_the_default_theta_hold_the_channels_above_the_row_quantile_by_hand():
    # K = 20: the 0.95 quantile sits at position 0.95·19 = 18.05 of the sorted row, between its two
    # largest values, so G(k) is exactly the channel with the largest similarity (itself).
    activations = random_activations(20, seed=4)
    similarity = cosine_similarity_matrix(activations).double()
    for row in similarity:
        ordered = row.sort().values
        threshold = ordered[18] + 0.05 * (ordered[19] - ordered[18])
        assert ordered[18] < threshold < ordered[19]
        assert float(threshold) == pytest.approx(float(np.quantile(row.numpy(), 0.95)), abs=1e-12)
    got = channel_groups(activations)
    assert torch.equal(got, torch.eye(20, dtype=torch.bool))  # distinct random maps: most similar to itself only


def test_duplicate_and_scaled_channels_tie_and_share_their_group():
    # K = 40: the 0.95 quantile sits at position 37.05, just above the third largest similarity, so a
    # channel and its one copy (similarity 1, tied with itself) form its group.
    activations = random_activations(40, seed=5)
    activations[7] = activations[3]
    assert torch.equal(channel_groups(activations), cosine_groups(activations, 0.95))
    activations[11] = 3.0 * activations[5]  # parallel up to float rounding, which float64 would still see
    got = channel_groups(activations)
    assert got[3].nonzero().flatten().tolist() == got[7].nonzero().flatten().tolist() == [3, 7]
    assert got[5].nonzero().flatten().tolist() == got[11].nonzero().flatten().tolist() == [5, 11]
    # every other channel has them in its group together or not at all (here: tied at its quantile, both out)
    assert torch.equal(got[:, 3], got[:, 7]) and torch.equal(got[:, 5], got[:, 11])


def test_all_zero_activations_give_empty_groups():
    assert not channel_groups(torch.zeros(6, 4, 4)).any()


def test_a_single_channel_is_its_own_top_and_the_strict_threshold_leaves_its_group_empty():
    activations = random_activations(1, seed=6)
    assert torch.equal(cosine_similarity_matrix(activations), torch.ones(1, 1))
    assert torch.equal(channel_groups(activations), cosine_groups(activations, 0.95))
    assert not channel_groups(activations).any()  # cos = 1 is not above the quantile 1 (Eq. 5 is strict)


def test_batched_groups_equal_per_image_groups_also_past_the_quantile_limit():
    activations = torch.rand(3, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    per_image = torch.stack([channel_groups(a) for a in activations])
    assert torch.equal(channel_groups(activations), per_image)
    for image, expected in zip(activations, per_image, strict=True):
        assert torch.equal(expected, cosine_groups(image, 0.95))
    # each image alone, as for very large K
    assert torch.equal(channel_groups(activations, quantile_limit=16 * 16), per_image)


def test_single_channel_groups_are_the_identity():
    assert torch.equal(single_channel_groups(5), torch.eye(5, dtype=torch.bool))
    assert single_channel_groups(1).dtype == torch.bool and single_channel_groups(3, "cpu").device.type == "cpu"


def float64_groups(activations: torch.Tensor, theta: float) -> torch.Tensor:
    """The plain path: float64 similarities rounded to float32, then the row quantile."""
    similarity = cosine_similarity_matrix(activations)
    return similarity > torch.quantile(similarity, theta, dim=-1, keepdim=True)


def _rows_to_settle(activations: torch.Tensor, theta: float) -> int:
    """How many rows of float32 similarities hold a value within _float32_groups' margin of their threshold."""
    from fdcam.groups import _similarity_error

    flat = activations.flatten(-2).double()
    unit = (flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-300)).float()
    similarity = unit @ unit.transpose(-1, -2)
    threshold = torch.quantile(similarity, theta, dim=-1, keepdim=True)
    margin = 2 * _similarity_error(unit.shape[-1]) + 6 * 2.0**-24
    return int(((similarity - threshold).abs() <= margin).any(-1).sum())


def _near_ties(k: int, seed: int, signed: bool = False) -> torch.Tensor:
    """Maps built so that many rows hold similarities at or within float32 rounding of their threshold:
    exact and scaled copies, copies nudged by an ulp, blocks of identical channels, all-zero maps."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(k, 7, 7, generator=generator)
    activations = base if signed else torch.relu(base)
    activations[1:40:2] = activations[0:39:2] * 3.0  # scaled copies: cos 1 up to rounding
    activations[40:60] = activations[40]  # a block of identical maps: its rows' thresholds tie at 1
    activations[60:80] = activations[60:80] * (1 + torch.finfo(torch.float32).eps * torch.arange(20)[:, None, None])
    activations[80:90] = 0.0
    return activations


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("theta", [0.5, 0.95, 0.99])
def test_float32_similarities_checked_in_float64_give_the_float64_groups(signed, theta):
    from fdcam.groups import FLOAT32_MIN_CHANNELS, _float32_groups

    activations = _near_ties(FLOAT32_MIN_CHANNELS, seed=11, signed=signed)
    expected = float64_groups(activations, theta)
    assert _rows_to_settle(activations, theta) > 0  # the float64 check has work to do
    assert torch.equal(_float32_groups(activations, theta), expected)
    assert torch.equal(channel_groups(activations, theta), expected)
    assert torch.equal(_float32_groups(activations[:200], theta), float64_groups(activations[:200], theta))


def test_float32_groups_of_a_batch_equal_each_images_float64_groups():
    from fdcam.groups import _float32_groups

    activations = torch.stack([_near_ties(300, seed=12), torch.relu(torch.randn(300, 7, 7)), _near_ties(300, seed=13)])
    expected = torch.stack([float64_groups(image, 0.95) for image in activations])
    assert torch.equal(_float32_groups(activations, 0.95), expected)


def test_float32_groups_of_real_resnet_like_maps_have_rows_settled_both_ways(monkeypatch):
    # Highly similar maps (a smooth common pattern plus small noise) put many values within float32
    # rounding of the threshold; rows settled from their selection and rows taken whole both agree.
    import fdcam.groups as groups_module

    generator = torch.Generator().manual_seed(14)
    pattern = torch.rand(1, 7, 7, generator=generator)
    activations = torch.relu(pattern + 0.02 * torch.randn(1100, 7, 7, generator=generator))
    expected = float64_groups(activations, 0.95)
    assert _rows_to_settle(activations, 0.95) > 100
    assert torch.equal(groups_module._float32_groups(activations, 0.95), expected)
    monkeypatch.setattr(groups_module, "_CHECK_EXTRA", 0)  # the selection never reaches below: whole rows
    assert torch.equal(groups_module._float32_groups(activations, 0.95), expected)


@pytest.mark.parametrize("pixels", [9, 49, 196, 3136])
def test_float32_similarities_lie_within_the_error_bound_of_the_float64_ones(pixels):
    # _float32_groups' margin rests on this bound; maps of wide dynamic range, signed and not, and near-copies.
    from fdcam.groups import _similarity_error

    generator = torch.Generator().manual_seed(pixels)
    maps = torch.randn(256, pixels, generator=generator) * torch.logspace(-6, 6, 256)[:, None]
    maps[128:] = torch.relu(maps[128:])
    maps[1::8] = maps[0::8] * (1 + 1e-6 * torch.randn(32, pixels, generator=generator))
    unit = (maps.double() / maps.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)).float()
    error = ((unit @ unit.T).double() - cosine_similarity_matrix(maps[..., None]).double()).abs().max()
    assert 0 < error <= _similarity_error(pixels)


def test_maps_too_large_or_too_small_for_float32_norms_take_the_float64_path():
    from fdcam.groups import FLOAT32_MIN_CHANNELS, _float32_safe

    activations = torch.relu(torch.randn(FLOAT32_MIN_CHANNELS, 3, 3, generator=torch.Generator().manual_seed(15)))
    activations[0] = 0.0
    assert _float32_safe(activations)
    for scale in (1e-30, 1e30):  # squares would underflow or overflow in float32
        scaled = activations.clone()
        scaled[5] *= scale
        assert not _float32_safe(scaled) and not _float32_safe(torch.nan_to_num(scaled * float("inf")))
        assert torch.equal(channel_groups(scaled), float64_groups(scaled, 0.95))


def test_members_hold_exactly_the_groups_and_are_none_where_a_row_was_settled_whole(monkeypatch):
    import fdcam.groups as groups_module

    generator = torch.Generator().manual_seed(17)
    pattern = torch.rand(1, 7, 7, generator=generator)
    activations = torch.relu(pattern + 0.2 * torch.randn(2, 1100, 7, 7, generator=generator))
    groups, members = groups_module.channel_groups_and_members(activations, 0.95)
    assert torch.equal(groups, torch.stack([float64_groups(image, 0.95) for image in activations]))
    rebuilt = torch.zeros_like(groups).scatter_(-1, members.index, members.member)
    assert torch.equal(rebuilt, groups)
    assert members.index.shape[-1] < 100  # a few candidates per row, not K
    monkeypatch.setattr(groups_module, "_CHECK_EXTRA", 0)  # near rows are taken whole: members unknown
    groups_whole, none = groups_module.channel_groups_and_members(activations, 0.95)
    assert none is None and torch.equal(groups_whole, groups)
    small = torch.rand(2, 64, 7, 7, generator=generator)  # the float64 path gives no members
    assert channel_groups_and_members_pair_equal(groups_module, small)


def channel_groups_and_members_pair_equal(groups_module, activations) -> bool:
    groups, members = groups_module.channel_groups_and_members(activations, 0.95)
    return members is None and torch.equal(groups, groups_module.channel_groups(activations, 0.95))
