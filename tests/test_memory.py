"""fdcam.memory: what one masked tail row holds, and how many rows a budget takes."""

import torch
from torch import fx, nn

from fdcam.memory import LIVE_ACTIVATIONS, largest_activation_bytes, row_bytes, rows_within


class _Widening(nn.Module):
    """4 → 24 channels on 5×5, pooled to a 3-class Linear: the widest activation is the convolution's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 24, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_the_largest_activation_is_found_in_the_graph_and_in_a_plain_module():
    features = torch.randn(7, 4, 5, 5)
    widest = 24 * 5 * 5 * 4  # one image's [24,5,5] float32
    assert largest_activation_bytes(fx.symbolic_trace(_Widening()), features) == widest
    assert largest_activation_bytes(_Widening(), features) == 4 * 5 * 5 * 4  # a plain module: only its input and output
    assert row_bytes(fx.symbolic_trace(_Widening()), features) == LIVE_ACTIVATIONS * widest


def test_extras_count_and_a_narrowing_tail_is_bounded_by_its_input():
    class Add(nn.Module):
        def forward(self, x, skip):
            return (x + skip).mean((2, 3))

    features, skip = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    assert largest_activation_bytes(fx.symbolic_trace(Add()), features, [skip]) == 6 * 4 * 4 * 4


def test_rows_within_a_budget():
    assert rows_within(1000, 100, 64) == 10
    assert rows_within(1000, 100, 5) == 5  # never more than there are
    assert rows_within(10, 100, 64) == 1  # never fewer than one


def test_parameters_read_inside_the_graph_are_not_activations():
    class ReadsItsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(1000, 8))  # 32 kB, far larger than a row

        def forward(self, x):
            return nn.functional.linear(x.mean((2, 3)), self.weight)

    assert largest_activation_bytes(fx.symbolic_trace(ReadsItsWeight()), torch.randn(1, 8, 2, 2)) == 1000 * 4
