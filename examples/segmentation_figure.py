"""Draw docs/segmentation.png: an image, a region, and FD-CAM's map of a class's logits summed over that region.

The segmentation network is EfficientNet-Lite0 (ImageNet weights, shipped with its pip package) made fully
convolutional: the rows of two classes of its classifier ("bull mastiff" 243, "tiger cat" 282) applied at
every position of the last feature map, upsampled to the input, so the output is [N,2,H,W] per-pixel class
logits, like torchvision's segmentation models. It is explained at its head's last activation for the tiger
cat over the bottom of fdcam/data/both.png (the cat) with fdcam.targets.RegionLogit.
Run: python examples/segmentation_figure.py [--out docs/segmentation.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fdcam
from fdcam.images import load_image, preprocess
from fdcam.targets import RegionLogit

CLASSES = (243, 282)  # bull mastiff, tiger cat: the output's classes 0 and 1
TIGER_CAT = 1
IMAGE = Path(fdcam.__file__).parent / "data" / "both.png"


class PerPixelClassifier(nn.Module):
    """Some rows of a classifier's last Linear applied at every position of its feature map, upsampled to the
    input: [N,len(classes),H,W]."""

    def __init__(self, classifier: nn.Module, classes: tuple[int, ...]):
        super().__init__()
        self.classifier = classifier
        fc = classifier._fc
        self.conv = nn.Conv2d(fc.in_features, len(classes), 1)
        with torch.no_grad():
            self.conv.weight.copy_(fc.weight[list(classes), :, None, None])
            self.conv.bias.copy_(fc.bias[list(classes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv(self.classifier.extract_features(x))  # [N,C,h,w]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/segmentation.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifier = fdcam.models.load("efficientnet_lite0")
    image = load_image(IMAGE)
    x = preprocess(image, fdcam.models.spec_of(classifier))
    model = PerPixelClassifier(classifier, CLASSES).eval()
    mask = torch.zeros(x.shape[-2:])
    mask[x.shape[-2] * 3 // 5 :, :] = 1.0  # the bottom two fifths of both.png: the cat
    saliency = fdcam.FDCAM(model, "classifier._swish_1")(x, targets=RegionLogit(TIGER_CAT, mask))[0, 0]

    shown = image.convert("RGB").resize(tuple(x.shape[-1:-3:-1]))
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(shown)
    axes[0].set_title("image")
    axes[1].imshow(shown)
    axes[1].imshow(mask.numpy(), cmap="Blues", alpha=0.45)
    axes[1].set_title("region (tiger cat)")
    axes[2].imshow(shown)
    axes[2].imshow(saliency.numpy(), cmap="jet", alpha=0.5)
    axes[2].set_title("FD-CAM of RegionLogit")
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
