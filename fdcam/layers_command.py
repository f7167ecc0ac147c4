"""`fdcam layers`: the target layers of a model, with their output shapes."""

from __future__ import annotations

import argparse

from . import models
from .nodes import LayerInfo, layers

__all__ = ["add_arguments", "format_layers", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam layers` on `parser`."""
    parser.add_argument("--model", default="efficientnet_lite0", help=f"one of {', '.join(models.NAMES)}")
    parser.add_argument(
        "--weights",
        default=None,
        help="a state_dict file, 'imagenet' or 'random' (default: random; shapes do not depend on weights)",
    )
    parser.set_defaults(run=run)


def format_layers(found: list[LayerInfo], default: str | None = None) -> str:
    """A plain-text table of layers: name, output shape, kind and type; the default layer is marked with '*'."""
    rows = [("name", "output", "kind", "type")]
    rows += [
        (("* " if info.name == default else "  ") + info.name, "x".join(map(str, info.shape[1:])), info.kind, info.type)
        for info in found
    ]
    rows[0] = ("  " + rows[0][0], *rows[0][1:])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows
    )


def run(args: argparse.Namespace) -> int:
    weights = None if args.weights in (None, "random") else args.weights
    model = models.load(args.model, weights=weights)
    spec = models.spec_of(model)
    print(format_layers(layers(model), spec.default_layer if spec else None))
    if spec is not None:
        print(
            f"\n* the default layer; any name above works as --layer (input {spec.input_size[0]}x{spec.input_size[1]})"
        )
    return 0
