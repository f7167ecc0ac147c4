"""Small image folders and readers shared by the dataset (Ray Data) tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
# float16 keeps 11 significant bits: a value in [0, 1] is stored within 2**-12 of itself. The float32 map
# itself moves by ~1e-6 when the image is explained in another batch or thread count (another summation
# order); 1e-5 covers that on any CPU.
FLOAT16_ROUNDING = 2.0**-12
MAP_TOLERANCE = FLOAT16_ROUNDING + 1e-5


def image_folder(folder: Path, count: int, start: int = 0, bad: bool = False) -> list[Path]:
    """Copy `count` sample photos (and with `bad`, an undecodable file and a 16x16 image) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(SAMPLE.glob("*.JPEG"))[start : start + count]
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    lines = ["file,class_index,wnid,name"]
    lines += [f"{p.name},{int(_label(p.name))},{p.name.split('_')[0]},x" for p in photos]
    if bad:
        (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
        Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "tiny.png")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return [folder / p.name for p in photos]


def _label(name: str) -> int:
    import csv

    with open(SAMPLE / "labels.csv", newline="") as handle:
        return next(int(row["class_index"]) for row in csv.DictReader(handle) if row["file"] == name)


def read_rows(out: Path) -> list[dict]:
    """Every row of a run's output, read with pyarrow alone (as a user without fdcam would)."""
    return pq.read_table(out / "rows").to_pylist()


def saliency_of(row: dict) -> torch.Tensor:
    """A row's map as float32 [map_height, map_width]."""
    return torch.from_numpy(np.asarray(row["saliency"], dtype=np.float32).reshape(row["map_height"], row["map_width"]))


def plain_lite0() -> torch.nn.Module:
    """A model factory for `model="datasets_helpers:plain_lite0"`: Lite0 without fdcam's spec attached, as a
    user's own model would come (its input format is then given as model_spec)."""
    import fdcam

    model = fdcam.models.load("efficientnet_lite0")
    delattr(model, "fdcam_spec")
    return model
