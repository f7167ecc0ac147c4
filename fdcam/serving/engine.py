"""What a served model does with a dynamic batch.

It checks each request, explains the good ones together and reports the bad ones.

Nothing here imports Triton: the Triton Python-backend model (fdcam.serving.triton_model) turns Triton
requests into dicts of numpy arrays, calls `handle_tensor_requests` / `handle_image_requests`, and turns
each result (outputs, or one line of error) back into a Triton response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import models
from ..bounds import MAX_CLASSES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_OUTPUT_SIDE, BoundsError, ImageBounds
from ..errors import RequestError, first_line
from ..images import ImageError, preprocess, resize_map
from ..methods import METHODS

__all__ = [
    "BACKENDS",
    "ServingConfig",
    "Explainer",
    "TorchExplainer",
    "OnnxExplainer",
    "RequestError",
    "EngineFailure",
    "make_explainer",
    "decode_image",
    "handle_tensor_requests",
    "handle_image_requests",
    "add_original_maps",
]

BACKENDS = ("onnxruntime", "torch")

# One result per request: its outputs, or the one-line message of why it was refused.
Result = dict | str


class EngineFailure(str):
    """The one-line result of a good request whose explanation failed: a server error, not a 400."""


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
    # fdcam.bounds: the same limits and defaults as `fdcam explain` (None: no limit).
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    max_request_bytes: int | None = MAX_IMAGE_BYTES
    max_output_side: int | None = MAX_OUTPUT_SIDE
    max_classes: int | None = MAX_CLASSES

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def bounds(self) -> ImageBounds:
        """The image bounds every request is checked against."""
        return ImageBounds(
            max_pixels=self.max_image_pixels,
            max_bytes=self.max_request_bytes,
            max_output_side=self.max_output_side,
            max_classes=self.max_classes,
        )


class Explainer(Protocol):
    """Explains a batch.

    Images [N,3,H,W] float32 and classes [N,T] int64 or None (top-1) → logits, targets, saliency.
    """

    num_classes: int
    input_size: tuple[int, int]

    def explain(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class TorchExplainer:
    """The library itself: `fdcam.METHODS[method](model, layer)`; the logits (and the top-1 class when a request
    names none) come from the explanation's own forward pass, so each batch runs the model once."""

    def __init__(self, config: ServingConfig):
        self.device = torch.device(config.device)
        self.model = models.load(config.model, weights=config.weights, device=self.device)
        spec = models.spec_of(self.model)
        self.num_classes, self.input_size = spec.num_classes, spec.input_size
        self.cam = METHODS[config.method](self.model, target_layer=config.layer)

    def explain(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        explanation = self.cam.explanation(x, None if classes is None else torch.from_numpy(classes).to(self.device))
        logits, targets = explanation.logits.float().cpu().numpy(), explanation.classes.cpu().numpy().astype(np.int64)
        return logits, targets, explanation.maps.cpu().numpy()

    def close(self) -> None:
        """Release the explainer's sessions and CUDA graphs (the server calls it when it stops)."""
        self.cam.close()


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


def decode_image(data: bytes, bounds: ImageBounds = ImageBounds()) -> PIL.Image.Image:  # noqa: F821
    """Decode an encoded image (JPEG, PNG, ...) as `fdcam.images.load_image` does, within `bounds` (RequestError)."""
    from ..images import decode_image as decode

    try:
        return decode(data, max_pixels=bounds.max_pixels, max_bytes=bounds.max_bytes, name="image_bytes")
    except ImageError as error:
        raise RequestError(first_line(error, None)) from None


def _check_classes(
    request: Mapping[str, np.ndarray], num_classes: int, batched: bool, bounds: ImageBounds = ImageBounds()
) -> np.ndarray | None:
    """The request's classes as int64 [T] (None when absent); out of range, empty or too many is a RequestError."""
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
    try:
        bounds.check_classes(classes.size)
    except BoundsError as error:
        raise RequestError(str(error)) from None
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
    output_size: tuple[int, int] | None = None  # (height, width) of saliency_original; the image itself is not kept


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
                results[item.index] = EngineFailure(f"explanation failed: {first_line(error, None)}")
            continue
        for row, item in enumerate(group):
            results[item.index] = {
                "logits": logits[row : row + 1].astype(np.float32),
                "targets": targets[row : row + 1].astype(np.int64),
                "saliency": saliency[row : row + 1].astype(np.float32),
            }


def handle_tensor_requests(
    explainer: Explainer, requests: Sequence[Mapping[str, np.ndarray]], bounds: ImageBounds = ImageBounds()
) -> list[Result]:
    """Model `fdcam`: each request holds `image` [1,3,H,W] float32 and optionally `classes` [1,T] int64."""
    results: list[Result] = [""] * len(requests)
    items = []
    for index, request in enumerate(requests):
        try:
            if "image" not in request:
                raise RequestError("missing input 'image'")
            image = _check_image_tensor(request["image"], explainer.input_size)
            items.append(_Item(index, image, _check_classes(request, explainer.num_classes, True, bounds)))
        except RequestError as error:
            results[index] = str(error)
        except Exception as error:  # anything else fails this request only, in one line
            results[index] = f"request failed: {first_line(error, None)}"
    _explain_items(explainer, items, results)
    return results


def handle_image_requests(
    explainer: Explainer,
    requests: Sequence[Mapping[str, np.ndarray]],
    spec: models.ModelSpec,
    bounds: ImageBounds = ImageBounds(),
    with_original: bool = True,
) -> list[Result]:
    """Model `fdcam_image`: `image_bytes` [1,1] BYTES of an encoded image, optional `classes` [1,T].

    Images are decoded within `bounds`, resized and normalised as `fdcam explain` does; the outputs add
    `saliency_original` [1,T,h,w], the maps at the size `fdcam explain` writes (the image's, the longer
    side at most bounds.max_output_side). Each image is decoded, preprocessed and dropped before the
    next one, so a batch holds one decoded image at a time. With `with_original=False` the good results
    hold ORIGINAL_SIZE instead, for add_original_maps to fill in one request at a time.
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
            classes = _check_classes(request, explainer.num_classes, True, bounds)  # before decoding: cheap first
            image = decode_image(raw, bounds)
            del raw, data
            try:
                x = preprocess(image, spec)[0].numpy()
            except ImageError as error:
                raise RequestError(first_line(error, None)) from None
            width, height = bounds.output_size(image.size)
            del image
            items.append(_Item(index, x, classes, (height, width)))
        except RequestError as error:
            results[index] = str(error)
        except Exception as error:  # never let one request fail its batchmates: one line for this one
            results[index] = f"cannot use image_bytes: {first_line(error, None)}"
    _explain_items(explainer, items, results)
    for item in items:
        result = results[item.index]
        if isinstance(result, dict):
            result[ORIGINAL_SIZE] = item.output_size
            if with_original:
                add_original_maps(result)
    return results


# Key of a good image result that holds the (height, width) of its saliency_original until it is made.
ORIGINAL_SIZE = "_original_size"


def add_original_maps(result: dict) -> dict:
    """Add `saliency_original` [1,T,h,w] to an image result, at the size it holds under ORIGINAL_SIZE."""
    size = result.pop(ORIGINAL_SIZE)
    maps = torch.from_numpy(result["saliency"][0])
    original = np.empty((1, maps.shape[0], *size), dtype=np.float32)
    for index, saliency in enumerate(maps):  # one full-size float map at a time besides the output
        original[0, index] = resize_map(saliency, size).numpy()
    result["saliency_original"] = original
    return result


def default_onnx_paths(directory: str | Path) -> tuple[Path, Path]:
    """Where `fdcam serve` keeps the two exported explainer graphs (top-1, and with a classes input)."""
    directory = Path(directory)
    return directory / "top1" / "explainer.onnx", directory / "classes" / "explainer.onnx"
