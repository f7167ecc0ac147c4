"""The inputs of a run: items (an image, or a composite with its targets and boxes), loading, chunking."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import models
from ..composites import LabelsError, read_labels
from ..images import ImageError, list_images, load_image, preprocess

__all__ = ["Item", "chunks", "class_name", "image_items", "labels_by_file", "loaded", "log"]


def log(message: str) -> None:
    """A note or warning on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


@dataclass
class Item:
    """One evaluated input: an image file, or an in-memory composite, with what is explained on it."""

    id: str
    path: Path | None = None
    label: int | None = None
    image: Image.Image | None = None
    targets: list[int] = field(default_factory=list)  # pointing game: classes to explain
    target_boxes: list[list[Sequence[float]]] = field(default_factory=list)  # boxes (input pixels) per target
    objects: list[tuple[str, tuple[int, ...], list[int]]] = field(
        default_factory=list
    )  # multi-object: name, box, classes

    def load(self) -> Image.Image:
        """The item's image (read from its file unless it is in memory)."""
        return self.image if self.image is not None else load_image(self.path)


def labels_by_file(labels_csv: Path) -> dict[str, int]:
    """file name -> class index of a labels CSV (columns file,class_index,wnid,name); one-line errors."""
    if not labels_csv.is_file():
        raise FileNotFoundError(f"labels file not found: {labels_csv}")
    try:
        return dict(read_labels(labels_csv))
    except LabelsError:
        raise
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{labels_csv} is not a labels CSV with columns file,class_index,wnid,name") from None


def image_items(
    images_dir: Path,
    labels_csv: Path | None,
    target: str,
    skipped: list[dict[str, str]],
    num_classes: int | None = None,
) -> list[Item]:
    """The images of a folder as items; with target 'label', only those with an in-range label in labels_csv."""
    files = list_images(images_dir)
    if not files:
        raise ValueError(f"no images in {images_dir}")
    labels: dict[str, int] = {}
    if target == "label":
        labels = labels_by_file(labels_csv)
    elif labels_csv is not None and labels_csv.is_file():
        try:
            labels = dict(read_labels(labels_csv))
        except LabelsError:
            raise
        except (KeyError, ValueError, TypeError):
            labels = {}
    items = []
    for path in files:
        label = labels.get(path.name)
        if target == "label" and label is None:
            skipped.append({"item": path.name, "reason": f"not in {labels_csv.name}"})
            continue
        if target == "label" and num_classes is not None and not 0 <= label < num_classes:
            reason = (
                f"label {label} of {path.name} in {labels_csv.name} "
                f"is out of range for a model with {num_classes} classes"
            )
            log(f"fdcam: warning: skipping {path.name}: {reason}")
            skipped.append({"item": path.name, "reason": reason})
            continue
        items.append(Item(path.name, path, label))
    if not items:
        raise ValueError(f"none of the images in {images_dir} is listed in {labels_csv}")
    return items


def loaded(
    items: Iterable[Item], spec: models.ModelSpec, limit: int | None, skipped: list[dict[str, str]]
) -> Iterator[tuple[Item, torch.Tensor]]:
    """(item, input [1,3,H,W]) for the first `limit` items that load; others are logged and skipped."""
    count = 0
    for item in items:
        if limit is not None and count >= limit:
            return
        try:
            x = preprocess(item.load(), spec)
        except ImageError as error:
            log(f"fdcam: warning: skipping {item.id}: {error}")
            skipped.append({"item": item.id, "reason": str(error)})
            continue
        count += 1
        yield item, x


def chunks(iterator: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` consecutive elements (the last one shorter)."""
    chunk = []
    for element in iterator:
        chunk.append(element)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def class_name(index: int | None) -> str | None:
    """The ImageNet name of a class index, or None."""
    if index is None:
        return None
    names = models.class_names()
    return names[index] if 0 <= index < len(names) else None
