"""fdcam.weights against the paper's Eq. 10 written as a loop in float64: α̂ and ŝ min-max normalised over
the channels, w_k = α̂_k·exp(ŝ_k) − b (or α̂_k·ŝ_k − b, the linear ablation).

(The refusal of other combinations is in test_options.py with the other choices.)"""

import math

import pytest
import torch

from fdcam.weights import combine_weights
from reference import EPS32, assert_same_up_to_rounding


def plain_weights(alpha: list[float], scores: list[float], bias: float, combine: str) -> list[float]:
    """One row of channels; a constant row normalises to zeros."""

    def normalised(values):
        low, high = min(values), max(values)
        return [0.0 if high == low else (v - low) / (high - low) for v in values]

    alpha_hat, score_hat = normalised(alpha), normalised(scores)
    if combine == "exp":
        return [a * math.exp(s) - bias for a, s in zip(alpha_hat, score_hat, strict=True)]
    return [a * s - bias for a, s in zip(alpha_hat, score_hat, strict=True)]


def rows_of(alpha: torch.Tensor, scores: torch.Tensor, bias: float, combine: str) -> torch.Tensor:
    """plain_weights on every [..., K] row."""
    flat = [
        plain_weights(a.tolist(), s.tolist(), bias, combine)
        for a, s in zip(alpha.reshape(-1, alpha.shape[-1]), scores.reshape(-1, scores.shape[-1]), strict=True)
    ]
    return torch.tensor(flat, dtype=torch.float64).reshape(alpha.shape)


@pytest.mark.parametrize("combine", ["exp", "linear"])
@pytest.mark.parametrize("bias", [0.5, 0.0, 1.0])
def test_weights_are_the_papers_combination_for_every_image_and_class(combine, bias):
    generator = torch.Generator().manual_seed(0)
    alpha = torch.randn(3, 2, 16, generator=generator) * 1e-3  # gradients are small, scores are logit-sized
    scores = torch.randn(3, 2, 16, generator=generator) * 5.0
    got = combine_weights(alpha, scores, bias, combine)
    assert got.dtype == torch.float32 and got.shape == (3, 2, 16)
    # float32 min-max and exp against float64 ones: a few float32 roundings of values below e
    assert_same_up_to_rounding(got, rows_of(alpha, scores, bias, combine), rel=16 * EPS32)


def test_the_smallest_gradient_gives_minus_b_and_the_largest_gradient_and_score_e_minus_b():
    alpha = torch.tensor([[0.1, 0.4, -0.2, 0.3]])
    scores = torch.tensor([[2.0, 9.0, -1.0, 3.0]])
    got = combine_weights(alpha, scores)[0]
    assert float(got[2]) == -0.5  # the smallest α has α̂ = 0
    assert float(got[1]) == pytest.approx(math.e - 0.5, abs=4 * EPS32)  # the largest α and s: 1·e¹ − b


def test_a_constant_gradient_or_score_row_normalises_to_zeros_not_nan():
    generator = torch.Generator().manual_seed(1)
    alpha, scores = torch.randn(1, 6, generator=generator), torch.randn(1, 6, generator=generator)
    constant = torch.full((1, 6), 0.25)
    assert torch.equal(combine_weights(constant, scores), torch.full((1, 6), -0.5))  # α̂ = 0: w = −b
    no_score = combine_weights(alpha, constant)  # ŝ = 0: w = α̂·e⁰ − b
    assert_same_up_to_rounding(no_score, rows_of(alpha, constant, 0.5, "exp"), rel=4 * EPS32)
    assert torch.equal(combine_weights(torch.zeros(2, 1, 6), torch.zeros(2, 1, 6)), torch.full((2, 1, 6), -0.5))


def test_a_single_channel_gets_minus_b():
    assert torch.equal(
        combine_weights(torch.tensor([[3.0]]), torch.tensor([[-2.0]]), bias=0.25), torch.tensor([[-0.25]])
    )


def test_each_row_is_normalised_on_its_own():
    generator = torch.Generator().manual_seed(2)
    alpha, scores = torch.randn(4, 3, 8, generator=generator), torch.randn(4, 3, 8, generator=generator)
    together = combine_weights(alpha, scores)
    for n in range(4):
        for t in range(3):
            # the same operations on fewer elements (exp may take another vector path: a few ulps)
            assert_same_up_to_rounding(combine_weights(alpha[n, t], scores[n, t]), together[n, t], rel=4 * EPS32)
