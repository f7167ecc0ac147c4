"""Segmentation networks (torchvision LR-ASPP, DeepLabV3 and FCN, random weights) explained for a class over a region:
the gradient methods against pytorch-grad-cam's SemanticSegmentationTarget, FD-CAM against a plain loop of whole-model
passes, the switch passes' peak memory against the budget, and a batch of mixed targets against one image at a time."""

import copy
from functools import cache

import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fdcam
from fdcam.forward import ForwardPass
from fdcam.groups import channel_groups
from fdcam.switch import switch_logits, switch_masks
from fdcam.tail import TorchTail
from fdcam.targets import RegionLogit, resolve_targets
from reference import (
    agreement,
    assert_same_or_within_the_float32_spread,
    assert_same_up_to_rounding,
    cosine_groups,
    minmax,
)

SIZE = 64
CLASSES = 6
segmentation = torchvision.models.segmentation
NETWORKS = {  # the backbone's last stage, post-activation (Hardswish, ReLU)
    "lraspp": (segmentation.lraspp_mobilenet_v3_large, "backbone.16"),
    "deeplabv3": (segmentation.deeplabv3_mobilenet_v3_large, "backbone.16"),
    "fcn": (segmentation.fcn_resnet50, "backbone.layer4"),
}


@cache
def network(name: str) -> nn.Module:
    """The network with random weights and batch-norm statistics of random images: with torchvision's initial
    statistics MobileNetV3's last stage outputs ~1e-9, where every score is rounding noise."""
    torch.manual_seed(5)
    model = NETWORKS[name][0](weights=None, weights_backbone=None, num_classes=CLASSES)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # one pass sets the statistics of its batch
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))


def region(top: int = SIZE // 4, left: int = SIZE // 8, size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top : top + size // 2, left : left + size // 2] = 1.0
    return mask


class OutOnly(nn.Module):
    """The tensor pytorch-grad-cam needs from a dict output (its segmentation tutorial's wrapper)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


GRADIENT_PAIRS = [
    (fdcam.GradCAM, pgc.GradCAM),
    (fdcam.GradCAMPlusPlus, pgc.GradCAMPlusPlus),
    (fdcam.XGradCAM, pgc.XGradCAM),
    (fdcam.LayerCAM, pgc.LayerCAM),
]


@pytest.mark.parametrize(
    "name",
    [  # FCN's ResNet-50 backbone: in the slow tier
        pytest.param(name, marks=pytest.mark.slow) if name == "fcn" else name for name in NETWORKS
    ],
)
@pytest.mark.parametrize("ours, theirs", GRADIENT_PAIRS, ids=[p[0].__name__ for p in GRADIENT_PAIRS])
def test_gradient_methods_equal_pytorch_grad_cam_on_a_region(images, name, ours, theirs):
    model, layer = network(name), NETWORKS[name][1]
    mask = region()
    mine = ours(model, layer)(images[:1], targets=RegionLogit(3, mask))[0, 0].numpy()
    wrapped = OutOnly(model)
    with theirs(wrapped, [model.get_submodule(layer)]) as reference:
        expected = reference(images[:1], targets=[SemanticSegmentationTarget(3, mask.numpy())])[0]
    assert expected.std() > 0.05  # a blank map would prove nothing
    corr, diff = agreement(mine, expected)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


def _whole_model_score(model, layer_module, x, c, mask, channel_masks=None):
    """Region scores of class c of the whole model on x, one per row of `channel_masks` [B,K] (applied at the layer
    by a forward hook), or of x itself."""
    handle = None
    if channel_masks is not None:
        x = x.expand(channel_masks.shape[0], *x.shape[1:])

        def mask_channels(module, inputs, output):
            return output * channel_masks[..., None, None]

        handle = layer_module.register_forward_hook(mask_channels)
    try:
        out = model(x)["out"]
    finally:
        if handle is not None:
            handle.remove()
    return (out[:, c] * mask).sum((-2, -1))


def fdcam_region_reference(model, layer_module, x, c, mask, theta=0.95, bias=0.5, rows=64):
    """FD-CAM for a region score as the paper defines it: each switch pass through the whole model, masked by a hook."""
    store = {}
    handle = layer_module.register_forward_hook(lambda module, inputs, output: store.__setitem__("a", output))
    try:
        score = _whole_model_score(model, layer_module, x, c, mask)[0]
        (gradient,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    activations, alpha = store["a"][0].detach(), gradient[0].mean((1, 2))
    groups = cosine_groups(activations, theta).float()
    with torch.no_grad():
        passes = torch.cat([groups, 1 - groups])  # switch-on rows, then switch-off rows
        scores = torch.cat(
            [
                _whole_model_score(model, layer_module, x, c, mask, passes[i : i + rows])
                for i in range(0, passes.shape[0], rows)
            ]
        )
    k = activations.shape[0]
    s = (scores[:k] + (score.detach() - scores[k:])) / 2
    w = minmax(alpha) * torch.exp(minmax(s)) - bias
    cam = F.relu((w[:, None, None] * activations).sum(0))
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return minmax(cam)


@pytest.mark.parametrize(
    "name",
    [
        "lraspp",
        pytest.param("deeplabv3", marks=pytest.mark.slow),  # 1920 passes of a 3×3 ASPP on 960 channels
        pytest.param("fcn", marks=pytest.mark.slow),  # 4096 passes of a 3×3 convolution on 2048 channels
    ],
)
def test_fdcam_on_a_region_equals_a_plain_loop_of_whole_model_passes(images, name):
    model, layer = network(name), NETWORKS[name][1]
    # Each network at the input that gives a 2×2 map at its layer (output stride 16, 16 and 8): the smallest that
    # keeps the reference's 2K whole-model passes short and the map not a single value.
    size = 16 if name == "fcn" else 32
    x = images[:1, :, :size, :size]
    mask = region(size // 4, size // 8, size)
    got = fdcam.FDCAM(model, layer)(x, targets=RegionLogit(3, mask))[0, 0]
    expected = fdcam_region_reference(model, model.get_submodule(layer), x, 3, mask)
    assert expected.std() > 0.05

    def exact():
        model64 = copy.deepcopy(model).double()
        return fdcam_region_reference(model64, model64.get_submodule(layer), x.double(), 3, mask.double())

    # FCN's map strays from float64 by ~7e-4 of its scale in either float32 order here (ill-conditioned).
    assert_same_or_within_the_float32_spread(got, expected, exact)


def _peak_tensor_bytes(function) -> int:
    """Peak bytes of tensors allocated and still alive during `function` on the CPU, from the profiler's
    allocation events (each op's own allocations and frees, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(profiler.events(), key=lambda event: event.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage if event.name != "[memory]" else event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_switch_passes_stay_under_the_memory_budget(images):
    model, layer = network("lraspp"), NETWORKS["lraspp"][1]
    x = images[:1]
    split = fdcam.GradCAM(model, layer).split_for(x)
    forward = ForwardPass.run(split, x)
    targets = resolve_targets(RegionLogit(3, region()), forward.logits)
    masks = switch_masks(channel_groups(forward.activations, 0.95))  # [1,1920,960]
    budget = 16 * 2**20
    whole_outputs = masks.shape[1] * forward.logits[0].numel() * 4
    assert whole_outputs > 10 * budget  # the passes' outputs held at once would be far over the budget
    tail = TorchTail(split.tail, memory_budget=budget)
    result = {}

    def run():
        result["scores"] = switch_logits(tail, forward.activations, masks, forward.extras, targets)

    peak = _peak_tensor_bytes(run)
    assert peak <= budget, f"{peak / 2**20:.1f} MiB > {budget / 2**20:.0f} MiB"
    assert tail.calls > 10 and result["scores"].shape == (1, masks.shape[1], 1)
    # The chunked scores are the region scores of whole passes.
    rows = slice(0, 40)
    with torch.no_grad():
        outputs = TorchTail(split.tail, factorise=False).run(forward.activations, masks[:, rows], forward.extras)[0]
    assert_same_up_to_rounding(result["scores"][0, rows, 0], (outputs[:, 3] * region()).sum((-2, -1)))
    print(f"peak {peak / 2**20:.1f} MiB of a {budget / 2**20:.0f} MiB budget, {tail.calls} calls")


@cache
def float64_network(name: str) -> nn.Module:
    return copy.deepcopy(network(name)).double()


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "layercam", "fdcam", "ablationcam", "groupcam"])
def test_a_batch_with_mixed_targets_equals_the_images_one_by_one(images, name):
    # In float64: Grad-CAM++ and XGrad-CAM divide by sums of Hardswish activations near zero, which turns a
    # batch's float32 rounding into differences of 1e-3 in the map; the comparison is of the computation.
    model, layer = float64_network("lraspp"), NETWORKS["lraspp"][1]
    images = images.double()
    explainer = fdcam.METHODS[name](model, layer)
    target = RegionLogit(5, region())
    batch = explainer(images, targets=[3, target])
    one_by_one = torch.cat([explainer(images[:1], targets=3), explainer(images[1:], targets=[target])])
    assert batch.shape == (2, 1, SIZE, SIZE) and float(batch.std()) > 0
    assert_same_up_to_rounding(batch, one_by_one)


def test_a_segmentation_output_without_targets_is_a_one_line_error(images):
    with pytest.raises(ValueError, match=r"^give targets: the model's output is \(1, 6, 64, 64\)"):
        fdcam.GradCAM(network("lraspp"), "backbone.16")(images[:1])


def test_the_onnxruntime_tail_refuses_region_targets_in_one_line(images):
    explainer = fdcam.FDCAM(network("lraspp"), "backbone.16", backend="onnxruntime")
    message = r"^backend='onnxruntime' explains class-logit targets of \[N,C\] logits only; use backend='torch'"
    with pytest.raises(ValueError, match=message):
        explainer(images[:1], targets=RegionLogit(3, region()))
