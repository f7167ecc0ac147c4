"""Two-class composite images for measuring discriminability without VOC.

Each 224x224 canvas holds two ImageNet images of different classes, resized to 104x104, one at
the top-left and one at the bottom-right, on a background of the ImageNet mean colour. Which image
of a pair goes top-left alternates from pair to pair.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from .errors import LabelsError

__all__ = [
    "LabelsError",
    "BACKGROUND",
    "BOTTOM_RIGHT_BOX",
    "CANVAS_SIZE",
    "TILE_SIZE",
    "TOP_LEFT_BOX",
    "compose",
    "composite_set",
    "make_pairs",
    "read_labels",
]

Box = tuple[int, int, int, int]
LabelEntry = tuple[str, int]

CANVAS_SIZE = 224
TILE_SIZE = 104
# Boxes are [x0, y0, x1, y1] with inclusive ends.
TOP_LEFT_BOX: Box = (0, 0, TILE_SIZE - 1, TILE_SIZE - 1)
BOTTOM_RIGHT_BOX: Box = (CANVAS_SIZE - TILE_SIZE, CANVAS_SIZE - TILE_SIZE, CANVAS_SIZE - 1, CANVAS_SIZE - 1)
BACKGROUND = tuple(round(channel * 255) for channel in (0.485, 0.456, 0.406))  # (124, 116, 104)


def read_labels(labels_csv: str | Path) -> list[LabelEntry]:
    """The (file, class_index) entries of a labels.csv with columns file,class_index,wnid,name.

    A UTF-8 byte-order mark is accepted; a file listed twice is refused (LabelsError).
    """
    with open(labels_csv, newline="", encoding="utf-8-sig") as handle:
        entries = [(row["file"], int(row["class_index"])) for row in csv.DictReader(handle)]
    first_row: dict[str, int] = {}
    for row, (name, _) in enumerate(entries, start=2):  # row 1 is the header
        if name in first_row:
            raise LabelsError(
                f"{labels_csv} lists {name} twice (rows {first_row[name]} and {row}); keep one row per file"
            )
        first_row[name] = row
    return entries


def make_pairs(labels: Sequence[LabelEntry], n_pairs: int = 250, seed: int = 0) -> list[tuple[LabelEntry, LabelEntry]]:
    """`n_pairs` distinct pairs of entries with different class indices, drawn reproducibly from `seed`."""
    class_counts = Counter(class_index for _, class_index in labels)
    same_class_pairs = sum(count * (count - 1) // 2 for count in class_counts.values())
    available = len(labels) * (len(labels) - 1) // 2 - same_class_pairs
    if n_pairs > available:
        raise ValueError(f"only {available} pairs of different classes exist, {n_pairs} requested")

    rng = random.Random(seed)
    chosen: set[frozenset[int]] = set()
    pairs = []
    while len(pairs) < n_pairs:
        first, second = rng.sample(range(len(labels)), 2)
        key = frozenset((first, second))
        if labels[first][1] == labels[second][1] or key in chosen:
            continue
        chosen.add(key)
        pairs.append((tuple(labels[first]), tuple(labels[second])))
    return pairs


def compose(image_a: Image.Image, image_b: Image.Image, a_top_left: bool) -> tuple[Image.Image, Box, Box]:
    """The 224x224 composite of `image_a` and `image_b` and their boxes [x0, y0, x1, y1] (inclusive)."""
    canvas = Image.new("RGB", (CANVAS_SIZE, CANVAS_SIZE), BACKGROUND)
    box_a, box_b = (TOP_LEFT_BOX, BOTTOM_RIGHT_BOX) if a_top_left else (BOTTOM_RIGHT_BOX, TOP_LEFT_BOX)
    for image, box in ((image_a, box_a), (image_b, box_b)):
        tile = image.convert("RGB").resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BILINEAR)
        canvas.paste(tile, box[:2])
    return canvas, box_a, box_b


def composite_set(
    image_dir: str | Path,
    labels_csv: str | Path,
    n_pairs: int = 250,
    seed: int = 0,
) -> Iterator[tuple[Image.Image, list[tuple[int, Box]]]]:
    """Yield (composite, [(class_a, box_a), (class_b, box_b)]) for seeded pairs.

    Pair i puts a top-left when i is even.
    """
    image_dir = Path(image_dir)
    pairs = make_pairs(read_labels(labels_csv), n_pairs, seed)
    for index, ((file_a, class_a), (file_b, class_b)) in enumerate(pairs):
        with Image.open(image_dir / file_a) as image_a, Image.open(image_dir / file_b) as image_b:
            canvas, box_a, box_b = compose(image_a, image_b, a_top_left=index % 2 == 0)
        yield canvas, [(class_a, box_a), (class_b, box_b)]
