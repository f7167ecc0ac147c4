"""`fdcam export`: write a model's validated tail graph and the JSON a serving process needs to run FD-CAM,
or (`--explainer`) the whole explanation as one graph, optionally as a Triton model repository."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fdcam.errors import first_line
from fdcam.explain_output import check_output_dir
from fdcam.options import COMBINES, FDCAM_DEFAULTS, SWITCHES

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam export` on `parser`."""
    from fdcam import models

    from .explainer import EXPLAINER_METHODS

    parser.add_argument("--model", required=True, help=f"one of {', '.join(models.NAMES + models.SEGMENTATION_NAMES)}")
    parser.add_argument(
        "--weights", default="imagenet", help="'imagenet' (offline default), a state_dict file, or 'random'"
    )
    parser.add_argument("--layer", default=None, help="target layer (dotted module name); default: the model's")
    parser.add_argument(
        "--fp16", action="store_true", help="tail graph only: fp16 weights and compute, fp32 inputs and outputs"
    )
    parser.add_argument("--out", default=None, help="output directory (required unless --triton is given)")
    whole = parser.add_argument_group("the whole explanation as one graph (--explainer)")
    whole.add_argument(
        "--explainer",
        action="store_true",
        help="export image → logits, targets, saliency as DIR/explainer.onnx + .json",
    )
    whole.add_argument("--method", default="fdcam", help=f"one of {', '.join(EXPLAINER_METHODS)} (default fdcam)")
    whole.add_argument(
        "--classes-input", action="store_true", help="add an int64 input 'classes' [N,T]: the classes to explain"
    )
    whole.add_argument(
        "--target",
        choices=("class", "region"),
        default="class",
        help="class: class logits (default); region: a segmentation model's class summed over a region,"
        " inputs 'classes' [N,T] and float32 'region' [N,T,H,W]",
    )
    whole.add_argument("--input-size", default=None, help="HxW of the image input (default: the model's, 224x224)")
    whole.add_argument(
        "--theta",
        type=float,
        default=None,
        help=f"FD-CAM: row quantile of the cosine matrix ({FDCAM_DEFAULTS['theta']})",
    )
    whole.add_argument(
        "--bias", type=float, default=None, help=f"FD-CAM: b in w = α̂·exp(ŝ) − b ({FDCAM_DEFAULTS['bias']})"
    )
    whole.add_argument("--combine", choices=COMBINES, default=None, help="FD-CAM: exp (default) or linear")
    whole.add_argument("--switch", choices=SWITCHES, default=None, help="FD-CAM: on_off (default) or off")
    whole.add_argument("--no-grouping", action="store_true", help="FD-CAM: each group is its channel alone")
    whole.add_argument("--triton", default=None, metavar="REPO", help="also (or only) write a Triton model repository")
    whole.add_argument("--name", default=None, help="Triton model name (default fdcam_<model>_<method>)")
    whole.add_argument("--max-batch", type=int, default=32, help="Triton max_batch_size (default 32)")
    whole.add_argument(
        "--tensorrt", choices=("fp16", "fp32"), default=None, help="Triton: TensorRT accelerator with this precision"
    )
    parser.set_defaults(run=run)


def output_stem(model: str, layer: str, fp16: bool) -> str:
    """File name stem of an export: <model>_<layer>[_fp16]."""
    return f"{model}_{layer}" + ("_fp16" if fp16 else "")


def run(args: argparse.Namespace) -> int:
    """Export the tail graph (or, with --explainer, the whole explanation) and print the paths written."""
    if getattr(args, "explainer", False):
        return run_explainer(args)
    if args.target != "class":
        raise ValueError("--target applies to --explainer exports (the tail graph returns the whole output)")
    if args.out is None:
        raise ValueError("--out DIR is required (--triton applies to --explainer exports)")
    from fdcam import models

    from .describe import describe_tail
    from .model import export_tail

    weights = None if args.weights == "random" else args.weights
    model = models.load(args.model, weights=weights)
    layer = args.layer or models.spec_of(model).default_layer
    out = Path(args.out)
    check_output_dir(out)
    stem = output_stem(models.spec_of(model).name, layer, args.fp16)
    exported = export_tail(model, layer, out / f"{stem}.onnx", fp16=args.fp16)
    description = out / f"{stem}.json"
    description.write_text(json.dumps(describe_tail(exported), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    form = exported.metadata.get("tail_form", "masked")
    print(
        f"{exported.path}  ({exported.exporter} exporter, {form} tail, max |Δlogit| vs torch {exported.max_error:.2g})"
    )
    print(description)
    return 0


def method_options(args: argparse.Namespace) -> dict:
    """The FD-CAM options given on the command line (refused for other methods)."""
    options = {
        key: getattr(args, key) for key in ("theta", "bias", "combine", "switch") if getattr(args, key) is not None
    }
    if args.no_grouping:
        options["grouping"] = False
    if options and args.method != "fdcam":
        raise ValueError(
            f"--{next(iter(options)).replace('_', '-')} is an FD-CAM option; method {args.method!r} takes none"
        )
    return options


def _input_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input-size must look like 224x224, not {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"--input-size must be two positive numbers of pixels, not {text!r}")
    return height, width


def _check_input_size(model, size: tuple[int, int] | None, name: str) -> None:
    """One line, before the (long) export, when the model cannot run at `size` (its convolutions outgrow the input)."""
    if size is None:
        return
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    except RuntimeError as error:
        reason = first_line(error, None)
        raise ValueError(f"--input-size {size[0]}x{size[1]} is too small for {name} ({reason})") from None


def _check_target(target: str, name: str) -> None:
    """One line, before loading, when --target does not fit the model.

    Regions of segmentation models, classes of classifiers.
    """
    from fdcam import models

    segmentation = name in models.SEGMENTATION_NAMES
    if segmentation and target != "region":
        raise ValueError(f"{name} is a segmentation model: export it with --target region")
    if target == "region" and not segmentation:
        raise ValueError(
            f"--target region explains a segmentation model ({', '.join(models.SEGMENTATION_NAMES)}), not {name}"
        )


def run_explainer(args: argparse.Namespace) -> int:
    """`fdcam export --explainer`: DIR/explainer.onnx + .json and/or a Triton repository."""
    from fdcam import models

    from .explainer import export_explainer_full
    from .triton import default_model_name, write_triton_repository

    if args.out is None and args.triton is None:
        raise ValueError("give --out DIR, --triton REPO or both")
    if args.fp16:
        raise ValueError(
            "--fp16 applies to the tail graph; the explainer graph is validated in fp32 "
            "(use --tensorrt fp16 for Triton)"
        )
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, not {args.max_batch}")
    options = method_options(args)
    input_size = _input_size(args.input_size)
    if args.out is not None:
        check_output_dir(Path(args.out))
    if args.triton is not None:
        check_output_dir(Path(args.triton), "--triton")
    _check_target(args.target, models.spec(args.model).name)
    weights = None if args.weights == "random" else args.weights
    model = models.load(args.model, weights=weights)
    _check_input_size(model, input_size, models.spec_of(model).name)
    with tempfile.TemporaryDirectory(prefix="fdcam-explainer-") as scratch:
        out = Path(args.out) if args.out is not None else Path(scratch)
        exported = export_explainer_full(
            model,
            out / "explainer.onnx",
            args.layer,
            args.method,
            args.classes_input,
            input_size=input_size,
            target=args.target,
            **options,
        )
        summary = (
            f"saliency max |Δ| {exported.saliency_error:.2g}, logits max |Δ| {exported.logits_error:.2g} vs the library"
        )
        if args.out is not None:
            print(f"{exported.path}  ({summary})")
            print(exported.path.with_suffix(".json"))
        if args.triton is not None:
            name = args.name or default_model_name(models.spec_of(model).name, args.method)
            directory = write_triton_repository(exported.path, args.triton, name, args.max_batch, args.tensorrt)
            print(
                f"{directory}  (Triton model {name!r}: config.pbtxt, 1/model.onnx{'' if args.out else '; ' + summary})"
            )
    return 0
