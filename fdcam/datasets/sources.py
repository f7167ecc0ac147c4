"""What a dataset run reads and runs: the images (a folder, a labels CSV, or a list of paths/URIs) and the model
spec that travels to Ray's workers (a zoo name with a weights file, or an importable factory)."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import models
from ..composites import LabelsError, read_labels
from ..images import list_images

__all__ = ["ImageRecord", "MAP_SIZES", "ModelRef", "read_source", "file_sha256"]

# "feature": the map at the target layer's h×w before upsampling; "input": the library's map at the input size.
MAP_SIZES = ("feature", "input")


@dataclass(frozen=True)
class ImageRecord:
    """One input of a run: its path or URI as written to the output, and its label (None when not known)."""

    path: str
    label: int | None = None


def _is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _local(text: str) -> str:
    return text[len("file://") :] if text.startswith("file://") else text


def _labels_csv_records(csv_path: Path) -> list[ImageRecord]:
    try:
        entries = read_labels(csv_path)
    except LabelsError:
        raise
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{csv_path} is not a labels CSV with columns file,class_index,wnid,name") from None
    base = csv_path.resolve().parent
    return [ImageRecord(name if _is_uri(name) else str(base / name), label) for name, label in entries]


def read_source(
    source: str | os.PathLike | Sequence[str | os.PathLike], labels: str | os.PathLike | None = None
) -> list[ImageRecord]:
    """The images of `source`, each once, in a stable order.

    A folder gives its images (sorted) with labels from `labels` or, when present, its labels.csv; a .csv file
    is a labels CSV (file,class_index,wnid,name; files relative to it) as `fdcam evaluate` takes; a list gives
    local paths or URIs that pyarrow's file systems open (s3://, gs://, …), labelled from `labels` by file name.
    """
    if isinstance(source, (str, os.PathLike)) and not _is_uri(str(source)):
        path = Path(_local(str(source)))
        if path.is_dir():
            records = [ImageRecord(str(p.resolve())) for p in list_images(path)]
            if labels is None and (path / "labels.csv").is_file():
                labels = path / "labels.csv"
        elif path.is_file() and path.suffix.lower() == ".csv":
            records = _labels_csv_records(path)
        elif path.is_file():
            records = [ImageRecord(str(path.resolve()))]
        else:
            raise FileNotFoundError(f"no such folder, labels CSV or image: {path}")
    elif isinstance(source, (str, os.PathLike)):
        records = [ImageRecord(str(source))]
    else:
        records = [ImageRecord(str(p) if _is_uri(str(p)) else str(Path(_local(str(p))).resolve())) for p in source]
    if labels is not None:
        by_name = dict(read_labels(labels))
        records = [ImageRecord(r.path, by_name.get(r.path.rsplit("/", 1)[-1], r.label)) for r in records]
    unique = list({r.path: r for r in records}.values())  # the same image listed twice is explained once
    if not unique:
        raise ValueError(f"no images in {source}")
    return unique


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelRef:
    """A model every worker can build for itself: a zoo name with weights ("imagenet", a file path, or None for
    random), or `factory` "pkg.module:fn" (an importable function returning an nn.Module) with `spec` naming its
    input format (a fdcam.models.ModelSpec, or a zoo name) unless the factory's model carries one."""

    name: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    factory: str | None = None
    spec: models.ModelSpec | None = None

    @classmethod
    def of(
        cls, model: str, weights: str | os.PathLike | None = "imagenet", spec: models.ModelSpec | str | None = None
    ) -> ModelRef:
        """A reference from the user's `model` (zoo name or "pkg.module:fn") and `weights`; one-line ValueErrors."""
        if isinstance(spec, str):
            spec = models.spec(spec)
        if ":" in model:
            module, _, function = model.partition(":")
            if not module or not function:
                raise ValueError(f"model factory must be 'pkg.module:function', not {model!r}")
            return cls(name=model, weights=None, factory=model, spec=spec)
        name = models.spec(model).name
        if weights not in (None, "imagenet", "random"):
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path}")
            weights = str(path.resolve())  # workers on this machine or a shared file system open the same file
        return cls(name=name, weights=None if weights == "random" else weights, spec=spec)

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model in eval mode on `device` (run on each worker, once per actor)."""
        if self.factory is None:
            return models.load(self.name, weights=self.weights, device=device)
        module_name, _, function_name = self.factory.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import model factory {self.factory!r}: {error}") from None
        model = function()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model factory {self.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model.eval().to(device)

    def input_spec(self, model: torch.nn.Module) -> models.ModelSpec:
        """The model's input format: `spec`, else the one fdcam.models.load attached."""
        found = self.spec or models.spec_of(model)
        if found is None:
            raise ValueError(f"give the input format of {self.name!r} (model_spec=a ModelSpec or a zoo name)")
        return found

    def describe(self) -> dict[str, Any]:
        """The reference for run.json, with the weights file's SHA-256."""
        weights = self.weights if self.weights is not None else "random"
        described: dict[str, Any] = {"model": self.name, "weights": weights}
        if self.factory is None and self.weights is not None:
            path = models._imagenet_weights_path(self.name) if self.weights == "imagenet" else Path(self.weights)
            described["weights_sha256"] = file_sha256(path)
        if self.factory is not None:
            described["weights"] = None
        return described
