"""Draw docs/gallery.png: a few photos explained by the eight methods, and FD-CAM's maps of two classes of both.png.

The model is the embedded default, EfficientNet-Lite0 with ImageNet weights (shipped with its pip package), at its
default target layer; each photo is explained for the model's top-1 class, both.png for "bull mastiff" (243) and
"tiger cat" (282). The photos are the paper's Fig. 4 examples in ../shared/data/paper-demo (the FD-CAM authors'
demo images) and both.png from ../shared/data/multi-object. Overlays are fdcam's own (`fdcam.images.overlay`, as
`fdcam explain` writes them). The figure is saved as a 256-colour PNG to stay small.
Run: python examples/gallery.py [--shared ../shared] [--out docs/gallery.png] (minutes on a CPU: Score-CAM alone
runs 320 forwards of masked inputs per photo).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
from PIL import Image

import fdcam
from fdcam.images import load_image, overlay, preprocess

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = (  # the paper's Fig. 4 examples: odometer, red fox, desktop computer / monitor, scuba diver
    "paper-demo/ILSVRC2012_val_00001380.JPEG",
    "paper-demo/ILSVRC2012_val_00008726.JPEG",
    "paper-demo/ILSVRC2012_val_00018187.JPEG",
    "paper-demo/ILSVRC2012_val_00042444.JPEG",
)
BOTH = "multi-object/both.png"
BOTH_CLASSES = (243, 282)  # bull mastiff, tiger cat
TITLES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "Layer-CAM",
    "scorecam": "Score-CAM",
    "ablationcam": "Ablation-CAM",
    "groupcam": "Group-CAM",
    "fdcam": "FD-CAM",
}


def explain(model: torch.nn.Module, x: torch.Tensor, targets: list[list[int]]) -> dict[str, torch.Tensor]:
    """Every method's maps [N,T,H,W] for the batch x and its targets, at the model's default layer."""
    return {name: fdcam.METHODS[name](model)(x, targets=targets) for name in TITLES}


def shown(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image as the model sees it (resized to its input), in RGB."""
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def compute(shared: Path) -> dict:
    """Explain the photos (top-1 class, eight methods) and both.png (FD-CAM, two classes) with EfficientNet-Lite0."""
    model = fdcam.models.load("efficientnet_lite0")
    spec = fdcam.models.spec_of(model)
    photos = [load_image(shared / "data" / photo) for photo in PHOTOS]
    x = torch.cat([preprocess(photo, spec) for photo in photos])
    with torch.no_grad():
        top1 = model(x).argmax(dim=1).tolist()
    both = load_image(shared / "data" / BOTH)
    return {
        "size": tuple(spec.input_size[::-1]),  # (width, height)
        "photos": photos,
        "top1": top1,
        "maps": explain(model, x, [[c] for c in top1]),
        "both": both,
        "both_maps": fdcam.FDCAM(model)(preprocess(both, spec), targets=[list(BOTH_CLASSES)])[0],
    }


def render(result: dict, out: Path) -> None:
    """Lay the overlays out as a grid (photos × methods, then both.png's two classes) and save a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = fdcam.models.class_names()
    photos, size = result["photos"], result["size"]
    columns, rows = 1 + len(TITLES), len(photos) + 1
    figure, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.68 * rows))
    figure.subplots_adjust(left=0.005, right=0.995, top=0.96, bottom=0.005, wspace=0.04, hspace=0.2)
    for row, photo in enumerate(photos):
        base = shown(photo, size)
        axes[row, 0].imshow(base)
        axes[row, 0].set_title(names[result["top1"][row]], fontsize=8)
        for column, (name, title) in enumerate(TITLES.items(), start=1):
            axes[row, column].imshow(overlay(base, result["maps"][name][row, 0]))
            if row == 0:
                axes[row, column].set_title(title, fontsize=9, fontweight="bold")
    base = shown(result["both"], size)
    axes[-1, 0].imshow(base)
    axes[-1, 0].set_title("both.png", fontsize=8)
    for column, (target, saliency) in enumerate(zip(BOTH_CLASSES, result["both_maps"]), start=1):
        axes[-1, column].imshow(overlay(base, saliency))
        axes[-1, column].set_title(f"FD-CAM: {names[target]}", fontsize=8)
    legend = (
        "EfficientNet-Lite0 (ImageNet weights), target layer _blocks.15.\n"
        "Rows 1-4: the paper's Fig. 4 photos, each explained for its top-1 class by the eight methods.\n"
        "Last row: FD-CAM's maps for two classes of one image."
    )
    axes[-1, 3].text(0.05, 0.5, legend, fontsize=8, va="center", transform=axes[-1, 3].transAxes)
    for axis in axes.flat:
        axis.axis("off")
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=100)
    plt.close(figure)
    buffer.seek(0)
    # 256 colours keep the file well under a megabyte; the overlays lose little at this size.
    picture = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (default: ../shared)")
    parser.add_argument("--out", type=Path, default=Path("docs/gallery.png"))
    args = parser.parse_args()
    render(compute(args.shared), args.out)


if __name__ == "__main__":
    main()
