"""The benchmarked models: a tiny smoke-test net, VGG16 and ResNet50 (random seeded weights), EfficientNet-Lite0
(ImageNet), and the segmentation row's LR-ASPP MobileNetV3 (random seeded weights, a class over a region as
the target)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fdcam
from fdcam import models

__all__ = ["DEFAULT_MODELS", "MODEL_NAMES", "BenchModel", "TinyNet", "load_model"]

MODEL_NAMES = ("tiny", "vgg16", "efficientnet_lite0", "resnet50", "lraspp")
SEGMENTATION_SIZE = 224  # LR-ASPP's input side in the segmentation row
SEGMENTATION_CLASS = 15  # person in the 21 VOC classes torchvision's segmentation models predict
DEFAULT_MODELS = "vgg16,efficientnet_lite0,resnet50"
IMAGE = Path(fdcam.__file__).parent / "data" / "afghan_hound.jpg"


class TinyNet(nn.Module):
    """A VGG-shaped toy (convs, adaptive pool, MLP) on 3×32×32 inputs, for smoke tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(nn.Linear(32 * 16, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@dataclass
class BenchModel:
    name: str
    model: nn.Module
    layer: str
    x: torch.Tensor  # [1,3,H,W] on the device
    weights: str
    targets: Callable[[torch.Tensor], Any] = lambda x: None  # fdcam's targets for a batch (None: top-1)
    pgc_targets: Callable[[torch.Tensor], Any] = lambda x: None  # pytorch-grad-cam's, the same scores
    pgc_model: nn.Module | None = None  # the model pytorch-grad-cam runs (a dict output's tensor), else `model`


class OutOnly(nn.Module):
    """The "out" tensor of a dict output: what pytorch-grad-cam needs from a torchvision segmentation model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _segmentation_model(device: torch.device) -> BenchModel:
    """LR-ASPP MobileNetV3 split at its backbone's last stage, explained for one class over the image's centre."""
    import torchvision
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from fdcam.targets import RegionLogit

    build = torchvision.models.segmentation.lraspp_mobilenet_v3_large
    model = build(weights=None, weights_backbone=None).eval().to(device)
    size = SEGMENTATION_SIZE
    mask = torch.zeros(size, size, device=device)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return BenchModel(
        "lraspp",
        model,
        "backbone.16",
        torch.randn(1, 3, size, size, device=device),
        "random",
        targets=lambda x: RegionLogit(SEGMENTATION_CLASS, mask),
        pgc_targets=lambda x: [SemanticSegmentationTarget(SEGMENTATION_CLASS, mask.cpu().numpy())] * x.shape[0],
        pgc_model=OutOnly(model),
    )


def load_model(name: str, device: torch.device) -> BenchModel:
    """The model, its target layer and one input image; random seeded weights except for lite0."""
    torch.manual_seed(0)
    if name == "lraspp":
        return _segmentation_model(device)
    if name == "tiny":
        model = TinyNet().eval().to(device)
        return BenchModel(name, model, "features.5", torch.randn(1, 3, 32, 32, device=device), "random")
    weights = "imagenet" if name == "efficientnet_lite0" else None
    model = models.load(name, weights=weights, device=device)
    spec = models.spec_of(model)
    try:
        from fdcam.images import load_image, preprocess

        x = preprocess(load_image(IMAGE), spec)
    except Exception:  # the image is only a realistic input; noise does as well for timing
        x = torch.randn(1, 3, *spec.input_size)
    return BenchModel(name, model, spec.default_layer, x.to(device), weights or "random")
