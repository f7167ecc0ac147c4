"""What a served model does with a dynamic batch: check each request, explain the good ones together, report the bad ones.

Nothing here imports Triton: the Triton Python-backend model (fdcam.serving.triton_model) turns Triton
requests into dicts of numpy arrays, calls `handle_tensor_requests` / `handle_image_requests`, and turns
each result (outputs, or one line of error) back into a Triton response.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence, Union

import numpy as np
import torch

from .. import models
from ..errors import first_line
from ..images import ImageError, _to_rgb, preprocess, resize_map
from ..methods import METHODS

__all__ = [
    "BACKENDS",
    "ServingConfig",
    "Explainer",
    "TorchExplainer",
    "OnnxExplainer",
    "RequestError",
    "make_explainer",
    "decode_image",
    "handle_tensor_requests",
    "handle_image_requests",
]

BACKENDS = ("onnxruntime", "torch")

# One result per request: its outputs, or the one-line message of why it was refused.
Result = Union[dict, str]


class RequestError(ValueError):
    """A request that cannot be explained; its message is the one line the client gets back."""


@dataclass(frozen=True)
class ServingConfig:
    """What a server explains with: model, weights, target layer, method, engine and device."""

    model: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    layer: str | None = None
    method: str = "fdcam"
    backend: str = "onnxruntime"
    device: str = "cpu"
    explainer_onnx: str | None = None  # explainer graph without a classes input (top-1)
    explainer_classes_onnx: str | None = None  # the same graph with a classes input

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Explainer(Protocol):
    """Explains a batch: images [N,3,H,W] float32 and classes [N,T] int64 or None (top-1) → logits, targets, saliency."""

    num_classes: int
    input_size: tuple[int, int]

    def explain(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ...


class TorchExplainer:
    """The library itself: logits from the model, maps from `fdcam.METHODS[method](model, layer)`."""

    def __init__(self, config: ServingConfig):
        self.device = torch.device(config.device)
        self.model = models.load(config.model, weights=config.weights, device=self.device)
        spec = models.spec_of(self.model)
        self.num_classes, self.input_size = spec.num_classes, spec.input_size
        self.cam = METHODS[config.method](self.model, target_layer=config.layer)

    def explain(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            logits = self.model(x)
        targets = logits.argmax(1, keepdim=True) if classes is None else torch.from_numpy(classes).to(self.device)
        saliency = self.cam(x, targets)
        return logits.float().cpu().numpy(), targets.cpu().numpy().astype(np.int64), saliency.cpu().numpy()


class OnnxExplainer:
    """The exported explainer graph (fdcam.export.export_explainer) in ONNX Runtime: CUDA provider on a GPU."""

    def __init__(self, config: ServingConfig):
        import onnxruntime as ort

        if not config.explainer_onnx or not config.explainer_classes_onnx:
            raise ValueError("the onnxruntime backend needs the exported explainer graphs (explainer_onnx paths)")
        providers = ["CPUExecutionProvider"]
        if torch.device(config.device).type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        spec = models.spec(config.model)
        self.num_classes, self.input_size = spec.num_classes, spec.input_size
        self.top1 = ort.InferenceSession(config.explainer_onnx, providers=providers)
        self.with_classes = ort.InferenceSession(config.explainer_classes_onnx, providers=providers)

    def explain(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if classes is None:
            logits, targets, saliency = self.top1.run(["logits", "targets", "saliency"], {"image": images})
        else:
            feeds = {"image": images, "classes": np.ascontiguousarray(classes, dtype=np.int64)}
            logits, targets, saliency = self.with_classes.run(["logits", "targets", "saliency"], feeds)
        return logits, targets.astype(np.int64), saliency


def make_explainer(config: ServingConfig) -> Explainer:
    """The explainer of `config.backend`."""
    if config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {config.backend!r}")
    return TorchExplainer(config) if config.backend == "torch" else OnnxExplainer(config)


def decode_image(data: bytes) -> "PIL.Image.Image":  # noqa: F821
    """Decode an encoded image (JPEG, PNG, ...) as RGB with its EXIF orientation applied, like `fdcam.images.load_image`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise RequestError("image_bytes is empty")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened)).copy()
    except UnidentifiedImageError:
        raise RequestError("image_bytes is not an image (or a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(f"cannot decode image_bytes: {first_line(error, None)}") from None


def _check_classes(request: Mapping[str, np.ndarray], num_classes: int, batched: bool) -> np.ndarray | None:
    """The request's classes as int64 [T] (None when absent); out of range or empty is a RequestError."""
    classes = request.get("classes")
    if classes is None:
        return None
    classes = np.asarray(classes)
    if batched:
        if classes.ndim != 2 or classes.shape[0] != 1:
            raise RequestError(f"classes must have shape [1, T], got {list(classes.shape)}")
        classes = classes[0]
    if classes.ndim != 1 or classes.size == 0:
        raise RequestError(f"classes must hold at least one class index, got shape {list(classes.shape)}")
    if classes.dtype != np.int64:
        raise RequestError(f"classes must be int64, got {classes.dtype}")
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.size:
        raise RequestError(f"class index {int(bad[0])} is out of range for a model with {num_classes} classes")
    return classes


def _check_image_tensor(image: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    expected = (1, 3, *input_size)
    if image.shape != expected:
        raise RequestError(f"image must have shape {list(expected)}, got {list(image.shape)}")
    if image.dtype != np.float32:
        raise RequestError(f"image must be float32, got {image.dtype}")
    if not np.isfinite(image).all():
        raise RequestError("image contains NaN or infinite values")
    return image[0]


@dataclass
class _Item:
    index: int
    image: np.ndarray  # [3,H,W]
    classes: np.ndarray | None  # [T]
    original: "PIL.Image.Image | None" = None  # noqa: F821


def _explain_items(explainer: Explainer, items: Sequence[_Item], results: list) -> None:
    """Explain valid items in as few calls as possible: one per (top-1 | T classes) group."""
    groups: dict[int | None, list[_Item]] = {}
    for item in items:
        groups.setdefault(None if item.classes is None else len(item.classes), []).append(item)
    for count, group in groups.items():
        images = np.stack([item.image for item in group])
        classes = None if count is None else np.stack([item.classes for item in group])
        try:
            logits, targets, saliency = explainer.explain(images, classes)
        except Exception as error:  # an engine failure fails this group only, as one line
            for item in group:
                results[item.index] = f"explanation failed: {first_line(error, None)}"
            continue
        for row, item in enumerate(group):
            results[item.index] = {
                "logits": logits[row : row + 1].astype(np.float32),
                "targets": targets[row : row + 1].astype(np.int64),
                "saliency": saliency[row : row + 1].astype(np.float32),
            }


def handle_tensor_requests(explainer: Explainer, requests: Sequence[Mapping[str, np.ndarray]]) -> list[Result]:
    """Model `fdcam`: each request holds `image` [1,3,H,W] float32 and optionally `classes` [1,T] int64."""
    results: list[Result] = [""] * len(requests)
    items = []
    for index, request in enumerate(requests):
        try:
            if "image" not in request:
                raise RequestError("missing input 'image'")
            image = _check_image_tensor(request["image"], explainer.input_size)
            items.append(_Item(index, image, _check_classes(request, explainer.num_classes, batched=True)))
        except RequestError as error:
            results[index] = str(error)
    _explain_items(explainer, items, results)
    return results


def handle_image_requests(
    explainer: Explainer, requests: Sequence[Mapping[str, np.ndarray]], spec: models.ModelSpec
) -> list[Result]:
    """Model `fdcam_image`: `image_bytes` [1,1] BYTES of an encoded image, optional `classes` [1,T].

    Images are decoded, resized and normalised as `fdcam explain` does; the outputs add
    `saliency_original` [1,T,h,w], the maps at the image's own size.
    """
    results: list[Result] = [""] * len(requests)
    items = []
    for index, request in enumerate(requests):
        try:
            data = request.get("image_bytes")
            if data is None:
                raise RequestError("missing input 'image_bytes'")
            data = np.asarray(data, dtype=object).reshape(-1)
            if data.size != 1:
                raise RequestError(f"image_bytes must hold one encoded image, got {data.size}")
            raw = data[0]
            raw = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
            image = decode_image(raw)
            try:
                x = preprocess(image, spec)[0].numpy()
            except ImageError as error:
                raise RequestError(first_line(error, None)) from None
            items.append(_Item(index, x, _check_classes(request, explainer.num_classes, batched=True), image))
        except RequestError as error:
            results[index] = str(error)
    _explain_items(explainer, items, results)
    for item in items:
        result = results[item.index]
        if isinstance(result, dict):
            size = (item.original.height, item.original.width)
            maps = torch.from_numpy(result["saliency"][0])
            result["saliency_original"] = torch.stack([resize_map(m, size) for m in maps]).numpy()[None]
    return results


def default_onnx_paths(directory: str | Path) -> tuple[Path, Path]:
    """Where `fdcam serve` keeps the two exported explainer graphs (top-1, and with a classes input)."""
    directory = Path(directory)
    return directory / "top1" / "explainer.onnx", directory / "classes" / "explainer.onnx"
