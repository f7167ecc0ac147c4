"""The one image-bounds policy: how many pixels an image may have, how many bytes its file, how large
the written outputs are, and how many classes one request may explain.

`fdcam explain` (local and `--server`), the library's loaders (fdcam.images.load_image,
decode_image) and `fdcam serve` all read their limits from an ImageBounds; its defaults are the
command line's. A limit of None means "no limit beyond Pillow's own" (pixels) or "none" (the others).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .errors import BoundsError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "PILLOW_LIMIT",
    "MAX_IMAGE_BYTES",
    "MAX_OUTPUT_SIDE",
    "MAX_CLASSES",
    "ImageBounds",
    "BoundsError",
    "DEFAULT_BOUNDS",
]

# Images above this many pixels are refused as possible decompression bombs before their pixels are
# decoded: Pillow's own warning threshold, about 89 Mpx. Pillow itself refuses twice that, so no
# limit may be set above PILLOW_LIMIT.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
PILLOW_LIMIT = 2 * MAX_IMAGE_PIXELS
# An encoded image (a file, or a server request's image_bytes) above this many bytes is refused before
# it is decoded. 64 MiB holds an 89 Mpx JPEG and most photographic PNGs of that size; it is also what
# a server holds at most per request while decoding.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# Overlays and maps are written at the image's size up to this many pixels on the longer side;
# larger images get outputs scaled down to it (keeping the aspect ratio). The server's
# saliency_original follows the same rule, so its size is bounded by T × MAX_OUTPUT_SIDE².
MAX_OUTPUT_SIDE = 4096
# Classes one server request may ask for: every class costs a map of the input size and one at the
# output size (up to 64 MiB at 4096²), so T is capped like the pixels are.
MAX_CLASSES = 16


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} Mpx" if pixels >= 1e6 else f"{pixels} px"


@dataclass(frozen=True)
class ImageBounds:
    """Limits on one image: decoded pixels, encoded bytes, side of the written outputs, classes per request."""

    max_pixels: int | None = MAX_IMAGE_PIXELS
    max_bytes: int | None = MAX_IMAGE_BYTES
    max_output_side: int | None = MAX_OUTPUT_SIDE
    max_classes: int | None = MAX_CLASSES

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes", "max_output_side", "max_classes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
        if self.max_pixels is not None and self.max_pixels > PILLOW_LIMIT:
            raise ValueError(
                f"max_pixels may be at most {PILLOW_LIMIT} (Pillow refuses larger images itself), not {self.max_pixels}"
            )

    def check_bytes(self, size: int, what: str = "the image") -> None:
        """BoundsError when an encoded image of `size` bytes is over max_bytes."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise BoundsError(
                f"refused {what}: {size / 2**20:.1f} MiB is more than the "
                f"{self.max_bytes / 2**20:.1f} MiB allowed for an encoded image"
            )

    def check_pixels(self, width: int, height: int, what: str = "the image") -> None:
        """BoundsError when a width × height image is over max_pixels (a possible decompression bomb)."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise self.too_many_pixels(what, width * height, f"{width}x{height} px")

    def too_many_pixels(self, what: str, pixels: int | None, size: str = "the image") -> BoundsError:
        """The refusal of an image of `pixels` pixels (None: not known), in one line."""
        limit = self.max_pixels or PILLOW_LIMIT
        amount = f" ({_mpx(pixels)})" if pixels else ""
        return BoundsError(
            f"refused {what}: {size}{amount} is more than the {_mpx(limit)} allowed (a possible decompression bomb)"
        )

    def check_classes(self, count: int) -> None:
        """BoundsError when one request asks for more than max_classes classes."""
        if self.max_classes is not None and count > self.max_classes:
            raise BoundsError(f"{count} classes in one request is more than the {self.max_classes} allowed")

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the outputs for an image of `image_size`: the same, or scaled to max_output_side."""
        width, height = image_size
        if self.max_output_side is None or max(width, height) <= self.max_output_side:
            return width, height
        scale = self.max_output_side / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))


DEFAULT_BOUNDS = ImageBounds()
