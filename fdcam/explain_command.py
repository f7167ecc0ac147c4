"""`fdcam explain`: saliency overlays and maps for image files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import models
from .backends import BACKENDS
from .explain_output import (
    check_classes,
    check_output_dir,
    class_labels,
    finish,
    output_stems,
    save_explanation,
    skip_line,
)
from .images import MAX_OUTPUT_SIDE, ImageError, load_image, output_size, preprocess, resize_map
from .methods import METHODS
from .methods.base import NON_FINITE_LOGITS, NonFiniteError
from .options import TORCH_PRECISIONS, EngineOptions, engine_changes
from .targets import TopK

_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR

__all__ = ["add_arguments", "run", "resolve_device"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam explain` on `parser`."""
    parser.add_argument("images", nargs="+", help="image files to explain")
    parser.add_argument("--model", default="efficientnet_lite0", help=f"one of {', '.join(models.NAMES)}")
    parser.add_argument(
        "--weights", default="imagenet", help="'imagenet' (offline default), a state_dict file, or 'random'"
    )
    parser.add_argument(
        "--layer",
        default=None,
        help="target layer: module or fx node name (`fdcam layers` lists them); default: the model's",
    )
    parser.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)}, or 'all' (default fdcam)")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--class", dest="classes", type=int, nargs="+", help="class indices to explain")
    targets.add_argument("--topk", type=int, default=1, help="explain the K most likely classes (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="torch", choices=BACKENDS, help="engine for switch passes")
    parser.add_argument("--provider", default=None, help="onnxruntime provider: cpu, cuda or tensorrt")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=TORCH_PRECISIONS,
        help="math of the switch passes (bf16: torch backend only)",
    )
    parser.add_argument(
        "--cuda-graph", action="store_true", help="torch backend on CUDA: replay switch passes as a CUDA graph"
    )
    parser.add_argument("--out", default="fdcam-out", help="output directory (default ./fdcam-out)")
    parser.add_argument(
        "--max-size",
        type=int,
        default=MAX_OUTPUT_SIDE,
        metavar="PIXELS",
        help=f"longest side of the written overlays and maps; larger images' outputs are scaled down "
        f"(default {MAX_OUTPUT_SIDE})",
    )
    parser.add_argument(
        "--server",
        default=None,
        help="explain on a running `fdcam serve` (http://HOST:PORT or grpc://HOST:PORT) instead of locally",
    )
    parser.set_defaults(run=run)


def resolve_device(name: str) -> torch.device:
    """torch.device for `name`; asking for CUDA without a GPU is a clear error."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _method_names(method: str) -> list[str]:
    if method == "all":
        return list(METHODS)
    names = [name.strip().lower() for name in method.split(",")]
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or 'all'")
    return names


def _engine_options(args: argparse.Namespace, method_names: list[str]) -> EngineOptions:
    """The engine options of the command line; ValueError when one is set and no chosen method runs tail passes."""
    given = {
        "backend": args.backend,
        "provider": args.provider,
        "precision": args.precision,
        "cuda_graph": args.cuda_graph,
    }
    changed = engine_changes(given)
    if changed and not any(METHODS[name].uses_tail_engine for name in method_names):
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
        users = ", ".join(name for name, method in METHODS.items() if method.uses_tail_engine)
        raise ValueError(
            f"{flags} applies to methods that run masked tail passes ({users}), not {', '.join(method_names)}"
        )
    return EngineOptions(**given)


def run(args: argparse.Namespace) -> int:
    """Explain every image; a bad image is reported and skipped, the others are still written."""
    if args.server:
        from .serving.client import explain_remote

        return explain_remote(args)
    device = resolve_device(args.device)
    method_names = _method_names(args.method or "fdcam")
    engine = _engine_options(args, method_names)
    if args.max_size < 1:
        raise ValueError(f"--max-size must be a positive number of pixels, not {args.max_size}")
    out = Path(args.out)
    check_output_dir(out)
    weights = None if args.weights == "random" else args.weights
    model = models.load(args.model, weights=weights, device=device)
    spec = models.spec_of(model)
    check_classes(args.classes, args.topk, spec)
    names = class_labels(spec)
    explainers = {
        name: METHODS[name](model, target_layer=args.layer, engine=engine if METHODS[name].uses_tail_engine else None)
        for name in method_names
    }
    rows, failures = [], []
    stems = output_stems(args.images)
    bar = tqdm(total=len(args.images), desc="images", disable=len(args.images) < 2)

    def skip(path: str, error: BaseException | str) -> None:
        failures.append(str(error))
        tqdm.write(skip_line(path, error), file=sys.stderr)  # above the progress bar, not on its line

    for path, stem in _counted(zip(args.images, stems), bar):
        try:
            image = load_image(path)
            x = preprocess(image, spec).to(device)
        except ImageError as error:
            skip(path, error)
            continue
        width, height = output_size(image.size, args.max_size)
        shown = image if (width, height) == image.size else image.resize((width, height), resample=_BILINEAR)
        # One forward per explanation: the first method's own logits give the top-k classes (and the probabilities
        # of the table); the other methods explain those classes.
        classes, probabilities = args.classes, None
        for name, explainer in explainers.items():
            try:
                explanation = explainer.explanation(x, targets=[classes] if classes else TopK(args.topk))
            except NonFiniteError as error:
                if str(error) == NON_FINITE_LOGITS:  # the same model's logits: no method can explain this image
                    skip(path, error)
                    break
                skip(path, f"{name}: {error}")
                continue
            if probabilities is None:
                probabilities = torch.softmax(explanation.logits.float(), dim=1)[0]
                classes = explanation.classes[0].tolist()
            for class_index, saliency in zip(classes, explanation.maps[0]):
                full = resize_map(saliency.cpu(), (height, width)).numpy()
                files = save_explanation(shown, full, out / f"{stem}_{name}_{class_index}")
                rows.append((stem, name, class_index, names[class_index], float(probabilities[class_index]), files))
    bar.close()
    for explainer in explainers.values():
        explainer.close()
    return finish(rows, failures, len(args.images))


def _counted(items: Iterable, bar: tqdm) -> Iterator:
    """The items, each counted on the bar when the loop asks for the next one: once it is written or skipped."""
    for item in items:
        yield item
        bar.update(1)
