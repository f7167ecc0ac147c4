"""Tests for fdcam.groups.quantile_threshold: the topk-based row quantile equals torch.quantile bit for bit."""

import pytest
import torch

from fdcam.groups import channel_groups, cosine_similarity_matrix, quantile_threshold
from tests.reference import cosine_groups

THETAS = (0.0, 0.05, 1 / 3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 1.0)


def _rows(kind: str, k: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(7, k, generator=generator) * 2 - 1
    if kind == "ties":
        return torch.randint(0, 4, (7, k), generator=generator).float() / 3
    if kind == "constant":
        return torch.full((3, k), 0.3)
    if kind == "signed zeros":
        rows = -torch.rand(4, k, generator=generator)
        rows[0, 0], rows[1], rows[2, ::2] = -0.0, 0.0, -0.0
        return rows
    if kind == "batch":
        return torch.rand(2, 5, k, generator=generator)
    return torch.rand(5, k, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 2, 5, 16, 17, 100, 320, 2048])
@pytest.mark.parametrize("kind", ["random", "ties", "constant", "signed zeros", "batch", "float64"])
def test_threshold_equals_torch_quantile_bit_for_bit(k, kind):
    generator = torch.Generator().manual_seed(k)
    rows = _rows(kind, k, generator)
    for theta in THETAS:
        expected = torch.quantile(rows, theta, dim=-1, keepdim=True)
        got = quantile_threshold(rows, theta)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (theta, (got - expected).abs().max())
        assert torch.equal(rows > got, rows > expected)


def test_threshold_of_rows_with_nan_or_infinities_is_torch_quantiles():
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor(
        [[0.0, 1, 2, inf, inf], [-inf, -inf, 2, 3, 4], [1.0, 2, inf, inf, inf], [0.5, nan, 1, 2, 3], [inf] * 5]
    )
    for theta in (0.0, 0.25, 0.5, 0.6, 0.75, 0.95, 1.0):
        expected = torch.quantile(rows, theta, dim=-1, keepdim=True)
        got = quantile_threshold(rows, theta)
        assert torch.equal(got.isnan(), expected.isnan()), theta
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()), theta


def test_out_of_range_theta_is_refused_as_by_torch_quantile():
    with pytest.raises(RuntimeError):
        quantile_threshold(torch.rand(3, 4), 1.5)


@pytest.mark.parametrize("theta", [0.9, 0.95])
def test_channel_groups_equal_torch_quantile_groups_and_the_numpy_reference(theta):
    generator = torch.Generator().manual_seed(3)
    activations = torch.relu(torch.randn(2, 64, 5, 5, generator=generator))
    activations[0, 3] = 0  # a zero map: similarity 0 with every map
    similarity = cosine_similarity_matrix(activations)
    expected = similarity > torch.quantile(similarity, theta, dim=-1, keepdim=True)
    got = channel_groups(activations, theta)
    assert torch.equal(got, expected)
    assert torch.equal(got[1], cosine_groups(activations[1], theta))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 60, 120, 128])
def test_the_block_selection_selects_what_topk_selects(dtype, count):
    # _select_top takes its candidates from the blocks of the largest maxima where the rows are long enough;
    # ties (few distinct keys), NaN, infinities and signed zeros included.
    from fdcam.groups import _select_top

    generator = torch.Generator().manual_seed(count)
    if dtype == torch.int32:
        keys = torch.randint(-(2**31), 2**31 - 1, (3, 7, 2048), generator=generator, dtype=torch.int32)
        keys[0, :3] = torch.randint(0, 3, (3, 2048), generator=generator, dtype=torch.int32)
    else:
        keys = torch.randn(3, 7, 2048, generator=generator, dtype=dtype)
        keys[0, 0] = torch.randint(0, 3, (2048,), generator=generator).to(dtype)
        keys[0, 1, ::3], keys[0, 2, ::5], keys[0, 3, ::7] = float("nan"), float("inf"), -0.0
    values, index = _select_top(keys, count)
    expected = keys.topk(count, dim=-1, sorted=False).values
    assert torch.equal(values.sort(-1).values.nan_to_num(), expected.sort(-1).values.nan_to_num())
    assert torch.equal(keys.gather(-1, index).nan_to_num(), values.nan_to_num())
    ordered = index.sort(-1).values
    assert bool((ordered[..., 1:] != ordered[..., :-1]).all())  # each column once
    left_out = torch.ones_like(keys, dtype=torch.bool).scatter_(-1, index, False)
    if dtype != torch.int32:
        keys = keys.nan_to_num(nan=float("inf"))  # topk ranks NaN above every number
    lowest = keys.gather(-1, index).amin(-1, keepdim=True)
    assert bool(((keys <= lowest) | ~left_out).all())


@pytest.mark.parametrize("count", [1, 60, 120, 128])
def test_the_block_selection_of_float_bits_selects_what_topk_selects_as_values(count):
    # Bits of floats ≥ 0 take their block maxima from max pooling: selected values as topk's, ties of +0 and −0 in
    # one block included (either zero may be selected: they are one value).
    from fdcam.groups import _select_top

    generator = torch.Generator().manual_seed(count)
    floats = torch.rand(3, 7, 2048, generator=generator)
    floats[0, 0] = torch.randint(0, 3, (2048,), generator=generator).float()  # few distinct values
    floats[0, 1] = 0.0
    floats[0, 1, ::3] = -0.0  # blocks holding both zeros
    floats[0, 2, : 2048 - count // 2] = -0.0  # fewer non-zero values than selected
    values, index = _select_top(floats.view(torch.int32), count, float_bits=True)
    values = values.view(torch.float32)
    expected = floats.topk(count, dim=-1, sorted=False).values
    assert torch.equal(values.sort(-1).values, expected.sort(-1).values)
    assert torch.equal(floats.gather(-1, index), values)
    ordered = index.sort(-1).values
    assert bool((ordered[..., 1:] != ordered[..., :-1]).all())  # each column once
    left_out = torch.ones_like(floats, dtype=torch.bool).scatter_(-1, index, False)
    lowest = values.amin(-1, keepdim=True)
    assert bool(((floats <= lowest) | ~left_out).all())
