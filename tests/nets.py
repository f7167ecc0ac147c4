"""Small test networks and the split helper the test files share."""

import torch
import torch.nn.functional as F
from torch import nn

from fdcam.split import split_model


def split_at(model: nn.Module, layer: str, x: torch.Tensor):
    """The model split at `layer` for x, and the head's outputs for x: (split, activations, extras)."""
    split = split_model(model, layer, x)
    with torch.no_grad():
        activations, *extras = split.head(x)
    return split, activations, tuple(extras)


class Residual(nn.Module):
    """A residual block, so a split inside it has an extra (the skip tensor) crossing the cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        skip = torch.relu(self.stem(x))
        y = torch.relu(self.conv1(skip))
        y = self.conv2(y) + skip
        return self.fc(torch.flatten(self.pool(torch.relu(y)), 1))


class Mlp(nn.Module):
    """Conv features then adaptive pool, flatten and an MLP: the factorisable pattern."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TinySegmentation(nn.Module):
    """A small segmentation network returning {"out": [N,C,H,W]} at the input size, as torchvision's do."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        y = self.classifier(self.features(self.stem(x)))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}
