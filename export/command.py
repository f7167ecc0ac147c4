"""`fdcam export`: write a model's validated tail graph and the JSON a serving process needs to run FD-CAM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam export` on `parser`."""
    from fdcam import models

    parser.add_argument("--model", required=True, help=f"one of {', '.join(models.NAMES)}")
    parser.add_argument("--weights", default="imagenet", help="'imagenet' (offline default), a state_dict file, or 'random'")
    parser.add_argument("--layer", default=None, help="target layer (dotted module name); default: the model's")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights and compute, fp32 inputs and outputs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(run=run)


def output_stem(model: str, layer: str, fp16: bool) -> str:
    """File name stem of an export: <model>_<layer>[_fp16]."""
    return f"{model}_{layer}" + ("_fp16" if fp16 else "")


def run(args: argparse.Namespace) -> int:
    """Export the tail graph and its JSON description into args.out; print both paths."""
    from fdcam import models

    from .describe import describe_tail
    from .model import export_tail

    weights = None if args.weights == "random" else args.weights
    model = models.load(args.model, weights=weights)
    layer = args.layer or models.spec_of(model).default_layer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(models.spec_of(model).name, layer, args.fp16)
    exported = export_tail(model, layer, out / f"{stem}.onnx", fp16=args.fp16)
    description = out / f"{stem}.json"
    description.write_text(json.dumps(describe_tail(exported), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    form = exported.metadata.get("tail_form", "masked")
    print(f"{exported.path}  ({exported.exporter} exporter, {form} tail, max |Δlogit| vs torch {exported.max_error:.2g})")
    print(description)
    return 0
