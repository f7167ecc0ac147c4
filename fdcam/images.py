"""Image input and output: loading any common image as RGB, model preprocessing, saliency overlays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from fdcam.models import ModelSpec

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# Matplotlib's "jet" colormap as (position, value) breakpoints per channel.
_JET_RED = ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5))
_JET_GREEN = ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0))
_JET_BLUE = ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0))


class ImageError(ValueError):
    """An image cannot be used: missing, unreadable, or too small."""


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB, applying its EXIF orientation.

    Grayscale, palette, 16-bit and CMYK images are converted; transparent pixels are composited on black.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _to_rgb(image).copy()
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (or a format Pillow cannot read): {path}") from None
    except (OSError, ValueError, SyntaxError) as error:
        # Truncated or corrupt files, and modes Pillow cannot convert to RGB.
        raise ImageError(f"cannot read image {path}: {str(error).splitlines()[0]}") from None


def preprocess(image: Image.Image, spec: ModelSpec, min_size: int = 32) -> torch.Tensor:
    """Turn an image into the model's input [1, 3, H, W]: bilinear resize to spec.input_size, scale to [0, 1], normalise.

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

    A map of another size than the image is resized to it first. Returns an RGB image of the image's size.
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
    heat = _jet(saliency.clamp(0.0, 1.0).numpy()) * 255.0
    base = np.asarray(_to_rgb(image), dtype=np.float64)
    blended = (1.0 - alpha) * base + alpha * heat
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


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
