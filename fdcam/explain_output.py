"""What `fdcam explain` writes and prints, computed here or by a server (`--server`).

File stems, class checks, the files, the table.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import models
from .images import overlay

__all__ = [
    "output_stems",
    "check_output_dir",
    "class_labels",
    "check_classes",
    "save_explanation",
    "print_table",
    "skip_line",
    "finish",
]


def output_stems(paths: list[str]) -> list[str]:
    """A distinct file-name stem per input: the file's stem, or for clashes (a/x.jpg b/x.jpg, x.jpg x.webp)
    the name with its suffix, then with its parent folders, then a counter."""

    def candidates(path: Path):
        yield path.stem
        named = path.stem + (f"_{path.suffix.lstrip('.')}" if path.suffix else "")
        yield named
        parts = [part for part in path.resolve().parent.parts if part not in ("/", "\\")]
        for depth in range(1, len(parts) + 1):
            yield "_".join(parts[-depth:] + [named])

    def safe(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)

    options = [[safe(c) for c in candidates(Path(path))] for path in paths]
    stems: list[str] = []
    for i, mine in enumerate(options):
        others = [o for j, o in enumerate(options) if j != i]
        chosen = next((c for c in mine if all(c not in o for o in others)), mine[-1])
        stems.append(chosen)
    seen: dict[str, int] = {}
    for i, stem in enumerate(stems):  # the same file given twice: number the repeats
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:
            stems[i] = f"{stem}-{seen[stem]}"
    return stems


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Create the output directory, or say in one line why it cannot be written (before any computing)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fdcam-write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} is not writable ({error.strerror or error})") from None


def class_labels(spec: models.ModelSpec) -> list[str]:
    """The name of each class index: ImageNet's names for a 1000-class model, else the indices as text."""
    return models.class_names() if spec.num_classes == 1000 else [str(i) for i in range(spec.num_classes)]


def check_classes(classes: list[int] | None, topk: int, spec: models.ModelSpec) -> None:
    """ValueError (one line) for a class index out of the model's range.

    Or, without classes, for a --topk it cannot give.
    """
    if classes:
        bad = [c for c in classes if not 0 <= c < spec.num_classes]
        if bad:
            raise ValueError(f"class index {bad[0]} is out of range for {spec.name} ({spec.num_classes} classes)")
    elif not 1 <= topk <= spec.num_classes:
        raise ValueError(f"--topk must be between 1 and {spec.num_classes}")


def save_explanation(image: Image.Image, saliency: np.ndarray, base: Path) -> str:
    """Write the overlay `base`.png and the float32 map `base`.npy (the map at the image's size).

    Returns the files column of the table.
    """
    overlay(image, saliency).save(base.with_suffix(".png"))
    np.save(base.with_suffix(".npy"), np.asarray(saliency, dtype=np.float32))
    return f"{base}.png|.npy"


def skip_line(path: str | os.PathLike, error: BaseException | str) -> str:
    """The `fdcam: skipped: …` text for an input: the message, led by the file's name unless it names the file already
    (load_image's messages do; preprocess's "image is 16x16 px" and the server's refusals do not)."""
    message = str(error)
    named = any(f"{name}" in message for name in (path, Path(path)))
    return f"fdcam: skipped: {message if named else f'{path}: {message}'}"


def finish(rows: list[tuple], failures: list[str], image_count: int) -> int:
    """Print the table of what was written (nothing when nothing was) and a summary of the problems; the exit status."""
    if rows:
        print_table(rows)
    if not failures:
        return 0
    problems = f"{len(failures)} problem(s) with {image_count} image(s)"
    if rows:
        print(f"fdcam: {problems}; the others were written", file=sys.stderr)
    else:
        print(f"fdcam: nothing written: {problems}", file=sys.stderr)
    return 1


def print_table(rows: list[tuple]) -> None:
    """One line per written map: image stem, method, class index, class name, probability, files."""
    header = ("image", "method", "class", "name", "prob", "files")
    table = [header] + [(r[0], r[1], str(r[2]), r[3], f"{r[4]:.3f}", r[5]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
