"""fdcam.nodes: node names as torchvision prints them, and the list of target layers with their shapes."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fdcam
from fdcam.nodes import last_spatial_layer, trace_with_names


@pytest.mark.parametrize("build", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small, "lite0"])
def test_node_names_are_torchvision_s(build, lite0):
    model = lite0 if build == "lite0" else build().eval()
    _, expected = get_graph_node_names(model, suppress_diff_warning=True)
    _, tracer = trace_with_names(model)
    assert list(tracer.names.values()) == expected


def test_layers_of_lite0_list_both_calls_of_its_activation_with_torchvision_s_shapes(lite0):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    found = {info.name: info for info in fdcam.layers(lite0, x)}
    assert found["_swish"].shape == (1, 32, 112, 112) and found["_swish"].type == "ReLU6"
    assert found["_swish_1"].shape == (1, 1280, 7, 7) and found["_swish_1"].kind == "call_module"
    assert found["_blocks.15"].kind == "module" and found["_blocks.15"].type == "MBConvBlock"
    assert "_fc" not in found and "inputs" not in found  # 2-D output; the input itself is no layer
    assert all(len(info.shape) == 4 for info in found.values())
    # The shapes are those of the same nodes taken by torchvision's feature extractor.
    nodes = [name for name, info in found.items() if info.kind != "module"]
    with torch.no_grad():
        features = create_feature_extractor(lite0, return_nodes=nodes, suppress_diff_warning=True)(x)
    assert {name: tuple(value.shape) for name, value in features.items()} == {name: found[name].shape for name in nodes}


class SideBranch(nn.Module):
    """A conv whose output the logits never use, and a 1x1 map at the end."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        self.unused(y)
        return self.fc(self.pool(y).flatten(1))


def test_layers_skip_what_the_logits_do_not_use_and_leave_the_model_as_it_was():
    model = SideBranch().train()
    found = fdcam.layers(model, torch.randn(1, 3, 16, 16))
    assert [(info.name, info.shape, info.kind) for info in found] == [
        ("conv", (1, 4, 14, 14), "module"),
        ("relu", (1, 4, 14, 14), "call_function"),
        ("pool", (1, 4, 1, 1), "module"),
    ]
    assert model.training and all(module.training for module in model.modules())
    assert last_spatial_layer(model).name == "relu"  # pool is 1x1
