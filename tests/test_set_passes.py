"""fdcam.set_passes: switch passes per channel set, from mask rows and from groups, against the plain masked tail."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdcam.groups import channel_groups
from fdcam.set_passes import channels_last_rows
from fdcam.switch import group_switch_logits, switch_masks
from fdcam.tail import MaskedTail, TorchTail
from nets import ConvStart, split_at
from reference import assert_same_up_to_rounding

# A 1×1 convolution's sums over at most a dozen channels, then a pool: float32 reorderings of a few terms each.
REL = 1e-5


class ViewedRows(nn.Module):
    """A 1×1 convolution, a ReLU, then the maps viewed as one flat row each (no pooling): a body that cannot take
    channels-last rows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6 * 5 * 5, 7)

    def forward(self, x):
        y = F.relu(self.conv(self.stem(x)))
        return self.fc(y.view(y.shape[0], -1))


def _plain_switch_logits(split, activations, groups, switch, extras, classes):
    masks = switch_masks(groups, switch)
    with torch.no_grad():
        logits = MaskedTail(split.tail)(activations, masks, *extras)
    return logits.gather(2, classes[:, None].expand(-1, masks.shape[1], -1))


@pytest.mark.parametrize("switch", ["on_off", "off"])
@pytest.mark.parametrize(
    "model, channels_last",
    [
        (lambda: ConvStart(kernel=1, classes=7), True),
        (lambda: ConvStart(kernel=1, classes=7, activation=torch.relu_), True),  # the body's ReLU runs in place
        (lambda: ConvStart(kernel=1, classes=7, activation=F.relu6, hidden=None), True),
        (ViewedRows, False),
    ],
    ids=["relu", "in-place", "relu6-linear", "viewed"],
)
def test_groups_run_as_channel_sets_equal_the_plain_tail(model, channels_last, switch):
    torch.manual_seed(0)
    split, activations, extras = split_at(model().eval(), "stem", torch.randn(2, 3, 5, 5))
    groups = channel_groups(activations, 0.8)  # a few channels each
    classes = torch.tensor([[4, 0], [1, 6]])
    expected = _plain_switch_logits(split, activations, groups, switch, extras, classes)
    tail = TorchTail(split.tail)
    with torch.no_grad():
        direct = tail.group_passes(activations, groups, extras, classes, switch=switch)
        got = group_switch_logits(tail, activations, groups, switch, extras, classes)
    assert direct is not None and (direct[0] is None) == (switch == "off")  # the groups' own form, no mask rows
    assert tail.sparse_calls == 0 and tail.calls > 0
    assert_same_up_to_rounding(got, expected, rel=REL)
    shortcut = tail.shortcut_for(activations, extras)
    assert channels_last_rows(shortcut, shortcut.row_bases(shortcut.select(shortcut.prepare(activations), 0))[1]) is (
        channels_last
    )
    # The same groups' mask rows through the tail's own sets (fdcam.set_passes.mask_set_passes) agree.
    with torch.no_grad():
        rows = tail.run(activations, switch_masks(groups, switch), extras, classes, sparsity=int(groups.sum(-1).max()))
    assert tail.sparse_calls == 1
    assert_same_up_to_rounding(rows, expected, rel=REL)


def test_groups_larger_than_a_quarter_of_the_channels_run_as_mask_rows():
    # Sets gather at most CONV_SPARSE_SHARE of the channels; larger groups leave the groups' form.
    torch.manual_seed(0)
    split, activations, extras = split_at(ConvStart(kernel=1, classes=7).eval(), "stem", torch.randn(1, 3, 5, 5))
    groups = channel_groups(activations, 0.3)  # about 70 % of the channels each
    classes = torch.tensor([[2, 5]])
    tail = TorchTail(split.tail)
    with torch.no_grad():
        assert tail.group_passes(activations, groups, extras, classes) is None
        got = group_switch_logits(tail, activations, groups, "on_off", extras, classes)
    assert_same_up_to_rounding(got, _plain_switch_logits(split, activations, groups, "on_off", extras, classes))
