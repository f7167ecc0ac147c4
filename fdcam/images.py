"""Image input and output: loading any common image as RGB, model preprocessing, saliency overlays."""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from fdcam.bounds import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_OUTPUT_SIDE, BoundsError, ImageBounds
from fdcam.errors import ImageError, first_line
from fdcam.models import ModelSpec

_OVERLAY_ROWS = 256  # rows blended at a time: an overlay never holds more than this many float rows

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# Matplotlib's "jet" colormap as (position, value) breakpoints per channel.
_JET_RED = ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5))
_JET_GREEN = ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0))
_JET_BLUE = ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        # 16-bit data (also what mode "I" usually holds): 65535 / 257 = 255 exactly.
        scaled = values / 257.0
    else:
        # Float images have no fixed range, so stretch theirs to 0..255.
        low, high = np.nanmin(values), np.nanmax(values)
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    gray = np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on black."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _high_bit_depth_to_8bit(image).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


_warnings_lock = threading.Lock()  # warnings.catch_warnings changes process-wide filters


def load_image(
    path: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS, max_bytes: int | None = MAX_IMAGE_BYTES
) -> Image.Image:
    """Read an image file as RGB, applying its EXIF orientation.

    Grayscale, palette, 16-bit and CMYK images are converted; transparent pixels are composited on
    black. A file of more than `max_bytes` bytes, or an image of more than `max_pixels` pixels, is
    refused before its pixels are decoded (ImageError, one line; the limits are fdcam.bounds', None:
    no limit beyond Pillow's own).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        ImageBounds(max_pixels=max_pixels, max_bytes=max_bytes).check_bytes(path.stat().st_size, str(path))
        with open(path, "rb") as file:
            return _decode(file, str(path), max_pixels)
    except BoundsError as error:
        raise ImageError(str(error)) from None
    except OSError as error:
        raise ImageError(f"cannot read image {path}: {first_line(error, None)}") from None


def decode_image(
    data: bytes,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    max_bytes: int | None = MAX_IMAGE_BYTES,
    name: str = "the image",
) -> Image.Image:
    """`load_image` for an encoded image held in memory (a server request's bytes); `name` is how errors call it."""
    if not data:
        raise ImageError(f"{name} is empty")
    try:
        ImageBounds(max_pixels=max_pixels, max_bytes=max_bytes).check_bytes(len(data), name)
    except BoundsError as error:
        raise ImageError(str(error)) from None
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(file, name: str, max_pixels: int | None) -> Image.Image:
    """Open, check the size against `max_pixels` from the header alone, then decode as RGB."""
    # No limit of ours: Pillow's own decides (its warning becomes an error), and is named as the limit.
    bounds = ImageBounds(max_pixels=max_pixels or MAX_IMAGE_PIXELS, max_bytes=None)
    try:
        with _warnings_lock, warnings.catch_warnings():
            # With a limit of ours, ours decides (Pillow still refuses above twice its own threshold).
            warnings.simplefilter("ignore" if max_pixels else "error", Image.DecompressionBombWarning)
            opened = Image.open(file)
        with opened:
            bounds.check_pixels(*opened.size, name)
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _to_rgb(image).copy()
    except BoundsError as error:
        raise ImageError(str(error)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own check fired first (a frame larger than the header said, or no limit set here).
        raise ImageError(str(bounds.too_many_pixels(name, _pixels_in(str(error))))) from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (or a format Pillow cannot read): {name}") from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, MemoryError, EOFError) as error:
        # Truncated or corrupt files, modes Pillow cannot convert to RGB, images too large to hold.
        raise ImageError(f"cannot read image {name}: {first_line(error, None)}") from None


def _pixels_in(message: str) -> int | None:
    """The pixel count in Pillow's "Image size (N pixels) exceeds ..." message, if it is there."""
    import re

    match = re.search(r"\((\d+) pixels\)", message)
    return int(match.group(1)) if match else None


def output_size(image_size: tuple[int, int], max_side: int | None = MAX_OUTPUT_SIDE) -> tuple[int, int]:
    """(width, height) of the outputs for an image of `image_size`.

    The same, or scaled so the longer side is `max_side`.
    """
    return ImageBounds(max_output_side=max_side).output_size(image_size)


def preprocess(image: Image.Image, spec: ModelSpec, min_size: int = 32) -> torch.Tensor:
    """Turn an image into the model's input [1, 3, H, W].

    Bilinear resize to spec.input_size, scale to [0, 1], normalise.

    Matches torchvision's Resize(spec.input_size), ToTensor(), Normalize(spec.mean, spec.std) on PIL images.
    """
    width, height = image.size
    if width < min_size or height < min_size:
        raise ImageError(f"image is {width}x{height} px; the model needs at least {min_size}x{min_size}")
    target_height, target_width = spec.input_size
    resized = _to_rgb(image).resize((target_width, target_height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / np.float32(255.0))
    x = pixels.permute(2, 0, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0).contiguous()


def denormalize(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Undo the normalisation of preprocess on [3, H, W] or [N, 3, H, W]; the result is not clamped."""
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def resize_map(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a 2-D saliency map to size = (height, width), bilinear with align_corners=False, clamped to [0, 1]."""
    saliency = torch.as_tensor(saliency)
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be a 2-D map [H, W], got shape {tuple(saliency.shape)}")
    as_float = saliency.float() if not saliency.is_floating_point() else saliency
    resized = F.interpolate(as_float[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0.0, 1.0)


def _jet(values: np.ndarray) -> np.ndarray:
    channels = [np.interp(values, positions, levels) for positions, levels in (_JET_RED, _JET_GREEN, _JET_BLUE)]
    return np.stack(channels, axis=-1)


def overlay(image: Image.Image, saliency: torch.Tensor | np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a JET-coloured saliency map in [0, 1] over the image; alpha is the heatmap's weight.

    A map of another size than the image is resized to it first. Returns an RGB image of the image's
    size. Computed in float32, a band of rows at a time, so memory stays a small multiple of the image's.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    width, height = image.size
    saliency = torch.as_tensor(np.asarray(saliency) if not isinstance(saliency, torch.Tensor) else saliency)
    saliency = saliency.detach().float().cpu()
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be a 2-D map [H, W], got shape {tuple(saliency.shape)}")
    saliency = torch.nan_to_num(saliency, nan=0.0)
    if tuple(saliency.shape) != (height, width):
        saliency = resize_map(saliency, (height, width))
    values = saliency.clamp(0.0, 1.0).numpy()
    base = np.asarray(_to_rgb(image))
    out = np.empty((height, width, 3), dtype=np.uint8)
    weight = np.float32(alpha)
    for top in range(0, height, _OVERLAY_ROWS):
        rows = slice(top, top + _OVERLAY_ROWS)
        heat = _jet(values[rows]).astype(np.float32) * np.float32(255.0)
        blended = (np.float32(1.0) - weight) * base[rows].astype(np.float32) + weight * heat
        out[rows] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Return the image files (jpg, jpeg, png, bmp, webp, tif, tiff; any case) directly in a directory, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageError(f"not a directory: {directory}")
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )
