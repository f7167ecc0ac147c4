"""Splitting models at a layer: equivalence with the whole model and clear errors."""

import pytest
import torch
import torchvision
from torch import nn

from fdcam.head import class_gradients, forward_head
from fdcam.split import SplitError, resolve_layer_name, split_model
from reference import assert_same_up_to_rounding


@pytest.mark.parametrize(
    "builder, layer, extras",
    [
        (torchvision.models.resnet18, "layer3", 0),
        (torchvision.models.resnet18, "layer4.1.conv2", 1),  # bn2 and the skip add follow inside the block
        (torchvision.models.resnet18, "layer4.1.bn2", 1),
        (torchvision.models.resnet50, "layer4.2.conv3", 1),
    ],
)
def test_head_then_tail_equals_model(builder, layer, extras):
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(2, 3, 64, 64)
    split = split_model(model, layer, x)
    activation, *crossing = split.head(x)
    assert split.num_extras == len(crossing) == extras
    with torch.no_grad():
        assert_same_up_to_rounding(split.tail(activation, *crossing), model(x))


def test_batch_size_read_from_the_input_follows_the_tail_batch(lite0):
    x = torch.randn(1, 3, 224, 224)
    split = split_model(lite0, "_blocks.15", x)
    activation = split.head(x)[0]
    with torch.no_grad():
        many = split.tail(activation.expand(5, -1, -1, -1))
    assert many.shape == (5, 1000)
    assert_same_up_to_rounding(many[3], lite0(x)[0])


def test_gradients_from_the_tail_equal_autograd_through_the_whole_model():
    torch.manual_seed(1)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    split = split_model(model, "layer4", x)
    head = forward_head(split, x)
    targets = torch.tensor([[3, 5], [7, 3]])
    grads = class_gradients(split, head, targets)
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    for i in range(2):
        for t in range(2):
            logits = model(x[i : i + 1])
            (expected,) = torch.autograd.grad(logits[0, targets[i, t]], store["a"])
            assert_same_up_to_rounding(grads[i, t], expected[0])
    handle.remove()


def test_unknown_layer_lists_close_names():
    model = torchvision.models.resnet18()
    with pytest.raises(SplitError, match="no layer named 'layer5'.*close names: layer"):
        resolve_layer_name(model, "layer5")


def test_module_given_as_object_is_resolved():
    model = torchvision.models.resnet18()
    assert resolve_layer_name(model, model.layer4[1].conv1) == "layer4.1.conv1"
    with pytest.raises(SplitError):
        resolve_layer_name(model, nn.Conv2d(1, 1, 1))


def test_module_called_twice_is_refused():
    model = torchvision.models.resnet18().eval()  # BasicBlock calls its relu twice
    with pytest.raises(SplitError, match="called 2 times"):
        split_model(model, "layer4.1.relu", torch.randn(1, 3, 64, 64))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: not traceable
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_untraceable_model_gives_one_line_error():
    with pytest.raises(SplitError, match="cannot be traced by torch.fx") as info:
        split_model(DataDependent(), "conv", torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value)


def test_non_4d_layer_is_refused():
    model = torchvision.models.resnet18().eval()
    split = split_model(model, "avgpool", torch.randn(1, 3, 64, 64))
    forward_head(split, torch.randn(1, 3, 64, 64))  # avgpool output is 4-D [N,512,1,1]: allowed
    split = split_model(model, "fc", torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="2-D tensor"):
        forward_head(split, torch.randn(1, 3, 64, 64))
