"""Splitting models at a layer: equivalence with the whole model and clear errors."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fdcam
from fdcam.split import SplitError, resolve_layer_name, split_model
from reference import assert_same_up_to_rounding


@pytest.mark.parametrize(
    "builder, layer, extras",
    [
        (torchvision.models.resnet18, "layer3", 0),
        (torchvision.models.resnet18, "layer4.1.conv2", 1),  # bn2 and the skip add follow inside the block
        (torchvision.models.resnet18, "layer4.1.bn2", 1),
        ("resnet50_random", "layer4.2.conv3", 1),  # the session's ResNet-50
    ],
)
def test_head_then_tail_equals_model(builder, layer, extras, request):
    torch.manual_seed(0)
    model = request.getfixturevalue(builder) if isinstance(builder, str) else builder().eval()
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


def test_unknown_layer_lists_close_names():
    model = torchvision.models.resnet18()
    with pytest.raises(SplitError, match="no layer named 'layer5'.*close names: layer"):
        resolve_layer_name(model, "layer5")


def test_module_given_as_object_is_resolved():
    model = torchvision.models.resnet18()
    assert resolve_layer_name(model, model.layer4[1].conv1) == "layer4.1.conv1"
    with pytest.raises(SplitError):
        resolve_layer_name(model, nn.Conv2d(1, 1, 1))


def _features(model, name, x):
    """The value of one fx node, by torchvision's feature extractor (no fdcam code)."""
    with torch.no_grad():
        return create_feature_extractor(model, return_nodes=[name], suppress_diff_warning=True)(x)[name]


def test_module_called_twice_is_cut_at_the_call_site_named_as_torchvision_names_it():
    torch.manual_seed(4)
    model = torchvision.models.resnet18().eval()  # BasicBlock calls its relu twice
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match="called 2 times.*first call.*'layer4.1.relu_1'"):
        first = split_model(model, "layer4.1.relu", x)
    second = split_model(model, "layer4.1.relu_1", x)
    for split, name in ((first, "layer4.1.relu"), (second, "layer4.1.relu_1")):
        activation, *crossing = split.head(x)
        assert_same_up_to_rounding(activation, _features(model, name, x))
        with torch.no_grad():
            assert_same_up_to_rounding(split.tail(activation, *crossing), model(x))
    assert first.num_extras == 1 and second.num_extras == 0  # the skip tensor crosses the first cut


def test_lite0_head_activation_call_site_is_a_target(lite0, zebra_input):
    split = split_model(lite0, "_swish_1", zebra_input)  # _swish runs in the stem and in the head
    (activation,) = split.head(zebra_input)
    assert activation.shape == (1, 1280, 7, 7)
    assert_same_up_to_rounding(activation, _features(lite0, "_swish_1", zebra_input))
    with torch.no_grad():
        assert_same_up_to_rounding(split.tail(activation), lite0(zebra_input))


def test_unknown_node_name_lists_close_names(lite0):
    with pytest.raises(SplitError, match="no layer named '_swish_2'.*close names: .*_swish_1"):
        resolve_layer_name(lite0, "_swish_2")


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
    with pytest.raises(SplitError, match="cannot be traced by torch.fx.*leaf_modules") as info:
        split_model(DataDependent(), "conv", torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value)


class Gate(nn.Module):
    def forward(self, y):
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace it, but it can keep it as one call
            return y * 2
        return y


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = self.conv2(self.gate(torch.relu(self.conv(x))))
        return self.fc(torch.relu(y).mean((2, 3)))


@pytest.mark.parametrize("layer", ["conv", "relu", "gate", "conv2"])
def test_untraceable_submodule_declared_a_leaf_is_split(layer):
    torch.manual_seed(5)
    model = GatedNet().eval()
    x = torch.randn(2, 3, 12, 12)
    if layer != "gate":  # a target module is kept as one call anyway
        with pytest.raises(SplitError, match="cannot be traced"):
            split_model(model, layer, x)
    split = split_model(model, layer, x, tracer_kwargs={"leaf_modules": [Gate]})
    activation, *crossing = split.head(x)
    by_hand = {"conv": model.conv(x)}
    by_hand["relu"] = torch.relu(by_hand["conv"])
    by_hand["gate"] = model.gate(by_hand["relu"])
    by_hand["conv2"] = model.conv2(by_hand["gate"])
    with torch.no_grad():
        assert_same_up_to_rounding(activation, by_hand[layer])
        assert_same_up_to_rounding(split.tail(activation, *crossing), model(x))


class _UnusedInPlaceResults(nn.Module):
    """In-place calls whose results nothing uses: before the target (on the head's side) and after it (the tail)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        a = self.stem(x)
        a.relu_()  # changes `a`, which conv reads next
        y = self.conv(a)
        before = y.sum((2, 3))
        y.mul_(0.5)  # after `before` was read: the tail must keep it
        return self.fc(torch.cat([before, y.mean((2, 3))], 1))


def test_in_place_calls_whose_result_is_unused_stay_in_the_head_and_the_tail():
    # fx counts a method call as pure: dead-code elimination and the head's ancestors alone would drop both calls.
    torch.manual_seed(0)
    model, x = _UnusedInPlaceResults().eval(), torch.randn(2, 3, 16, 16)
    seen = []
    handle = model.conv.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    with torch.no_grad():
        expected = model(x)
    handle.remove()
    split = split_model(model, "conv", x)
    activation, *crossing = split.head(x)
    with torch.no_grad():
        assert torch.equal(activation, seen[0])
        assert_same_up_to_rounding(split.tail(activation, *crossing), expected)
        assert torch.equal(activation, seen[0])  # the tail changed a copy: the map is made of these activations
    cam = fdcam.GradCAM(model, "conv")
    assert_same_up_to_rounding(cam.explanation(x, None).logits, expected)
