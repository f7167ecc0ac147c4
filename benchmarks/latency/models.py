"""The benchmarked models: a tiny smoke-test net, VGG16 and ResNet50 (random seeded weights), EfficientNet-Lite0 (ImageNet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fdcam
from fdcam import models

__all__ = ["DEFAULT_MODELS", "MODEL_NAMES", "BenchModel", "TinyNet", "load_model"]

MODEL_NAMES = ("tiny", "vgg16", "efficientnet_lite0", "resnet50")
DEFAULT_MODELS = "vgg16,efficientnet_lite0,resnet50"
IMAGE = Path(fdcam.__file__).parent / "data" / "afghan_hound.jpg"

class TinyNet(nn.Module):
    """A VGG-shaped toy (convs, adaptive pool, MLP) on 3×32×32 inputs, for smoke tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
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


def load_model(name: str, device: torch.device) -> BenchModel:
    """The model, its target layer and one input image; random seeded weights except for lite0."""
    torch.manual_seed(0)
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
