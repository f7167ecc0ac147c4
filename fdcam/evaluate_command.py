"""`fdcam evaluate`: insertion/deletion (Table I, III, IV) or the pointing game (Table II substitute)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import models
from .arguments import positive_int
from .datasets.command import add_ray_arguments
from .evaluation import (
    DEFAULT_STEP,
    FDCAM_VARIANTS,
    evaluate_insertion_deletion,
    evaluate_pointing_game,
    format_table,
    method_specs,
    require_matplotlib,
    write_json_atomic,
    write_plots,
)
from .explain_output import check_output_dir
from .methods import METHODS
from .options import COMBINES, FDCAM_DEFAULTS
from .scoring import SCORERS

__all__ = ["add_arguments", "run", "partial_path_for"]

METRICS = ("insertion-deletion", "pointing-game")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam evaluate` on `parser`."""
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images (every image in it, sorted)")
    parser.add_argument(
        "--labels", metavar="CSV", help="labels CSV (file,class_index,wnid,name); default DIR/labels.csv"
    )
    parser.add_argument("--model", default="efficientnet_lite0", help=f"one of {', '.join(models.NAMES)}")
    parser.add_argument(
        "--weights", default="imagenet", help="'imagenet' (offline default), a state_dict file, or 'random'"
    )
    parser.add_argument(
        "--layer",
        default=None,
        help="target layer: module or fx node name (`fdcam layers` lists them); default: the model's",
    )
    parser.add_argument(
        "--methods", default="all", help=f"comma-separated methods, or 'all' (default): {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--target",
        default="predicted",
        choices=["predicted", "label"],
        help="class to explain and score: the model's top-1 (default, as RISE) or the label from --labels",
    )
    parser.add_argument("--metric", default="insertion-deletion", choices=METRICS)
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images (or composites)")
    parser.add_argument(
        "--out",
        metavar="JSON",
        help="results file (default fdcam-out/<metric>.json); "
        "per-image results go to OUT.partial.jsonl as they come, and a rerun resumes from it",
    )
    parser.add_argument("--no-resume", action="store_true", help="recompute everything, ignoring OUT.partial.jsonl")
    parser.add_argument("--plots", metavar="DIR", help="write PNG curves and overlay grids to DIR (needs matplotlib)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="forward batch size of methods and metric")
    parser.add_argument(
        "--images-per-call",
        type=positive_int,
        default=4,
        metavar="N",
        help="images explained per method call and scored together (default 4)",
    )
    parser.add_argument(
        "--step",
        type=positive_int,
        default=DEFAULT_STEP,
        metavar="PIXELS",
        help=f"pixels per insertion/deletion step (default {DEFAULT_STEP}, RISE's)",
    )
    parser.add_argument(
        "--scorer",
        default="auto",
        choices=SCORERS,
        help="what runs the curves' and Score-CAM/Group-CAM's forwards: auto (default: ONNX Runtime "
        "on CPU once it matched torch to 1e-4 on the first images, else torch), torch or onnxruntime",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    ray = parser.add_argument_group("Ray Data (insertion-deletion only; --out is then a folder of Parquet rows)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: a local Ray, or --ray-address")
    add_ray_arguments(ray)

    pointing = parser.add_argument_group("pointing game")
    pointing.add_argument("--pairs", type=positive_int, default=250, metavar="N", help="composite pairs (default 250)")
    pointing.add_argument("--seed", type=int, default=0, help="seed of the composite pairs (default 0)")
    pointing.add_argument(
        "--tolerance", type=float, default=15.0, metavar="PX", help="hit distance in pixels (default 15)"
    )
    pointing.add_argument(
        "--multi-object", metavar="DIR", help="also a folder with boxes.json (e.g. shared/data/multi-object)"
    )

    fdcam = parser.add_argument_group("FD-CAM options and ablations (Tables III, IV)")
    fdcam.add_argument(
        "--theta",
        type=float,
        help=f"row quantile of the cosine matrix for grouping (default {FDCAM_DEFAULTS['theta']})",
    )
    fdcam.add_argument("--bias", type=float, help=f"bias b in w = a*exp(s) - b (default {FDCAM_DEFAULTS['bias']})")
    fdcam.add_argument("--combine", choices=COMBINES, help="combination of gradient and score (default exp)")
    fdcam.add_argument("--switch", choices=["on_off", "on-off", "off"], help="switch scores: on_off (default) or off")
    fdcam.add_argument("--no-grouping", action="store_true", help="each channel in its own group")
    fdcam.add_argument(
        "--fdcam-variant",
        action="append",
        default=[],
        metavar="NAMES",
        help=f"add FD-CAM ablation rows (comma-separated, repeatable): {', '.join(FDCAM_VARIANTS)}",
    )
    parser.set_defaults(run=run)


def partial_path_for(out: Path) -> Path:
    """Where the per-image results of `out` are appended: OUT.partial.jsonl next to it."""
    return out.with_name(out.name + ".partial.jsonl")


def _device(name: str):
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _fdcam_options(args: argparse.Namespace) -> dict:
    options = {"theta": args.theta, "bias": args.bias, "combine": args.combine}
    if args.switch is not None:
        options["switch"] = args.switch.replace("-", "_")
    if args.no_grouping:
        options["grouping"] = False
    return options


def _run_on_ray(args: argparse.Namespace, specs) -> int:
    from .datasets.command import run_evaluate

    if args.metric != "insertion-deletion" or args.plots or args.limit or args.no_resume or args.device != "cpu":
        raise ValueError(
            "--ray runs --metric insertion-deletion on CPU or --gpus-per-actor, without --plots,"
            " --limit, --no-resume or --device"
        )
    return run_evaluate(args, specs)


def run(args: argparse.Namespace) -> int:
    images = Path(args.images)
    if not images.is_dir():
        raise FileNotFoundError(f"--images: not a directory: {images}")
    variants = [name for value in args.fdcam_variant for name in value.split(",")]
    specs = method_specs(args.methods, _fdcam_options(args), variants)
    if args.multi_object is not None and args.metric != "pointing-game":
        raise ValueError("--multi-object is only used with --metric pointing-game")
    if args.ray:
        return _run_on_ray(args, specs)
    out = Path(args.out) if args.out else Path("fdcam-out") / f"{args.metric}.json"
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'results.json'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a directory")
    check_output_dir(out.parent if str(out.parent) else Path("."), "--out")  # fail now, not after the run
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} is not writable")
    if args.plots:
        require_matplotlib()  # fail now, not after the run
        check_output_dir(Path(args.plots), "--plots")
    device = _device(args.device)
    weights = None if args.weights == "random" else args.weights
    model = models.load(args.model, weights=weights, device=device)
    common = dict(
        methods=specs,
        layer=args.layer,
        limit=args.limit,
        batch_size=args.batch_size,
        images_per_call=args.images_per_call,
        partial_path=partial_path_for(out),
        resume=not args.no_resume,
        progress=not args.quiet,
        keep_maps=4 if args.plots else 0,
        model_name=models.spec(args.model).name,
        weights=args.weights if args.weights in ("imagenet", "random") else str(Path(args.weights).resolve()),
        scorer=args.scorer,
    )
    if args.metric == "insertion-deletion":
        result = evaluate_insertion_deletion(
            model, images, target=args.target, labels_csv=args.labels, step=args.step, **common
        )
    else:
        result = evaluate_pointing_game(
            model,
            images,
            args.labels,
            pairs=args.pairs,
            seed=args.seed,
            tolerance=args.tolerance,
            multi_object=args.multi_object,
            **common,
        )
    write_json_atomic(out, result.summary)
    print(format_table(result.summary))
    if result.summary.get("skipped"):
        print(f"skipped {len(result.summary['skipped'])} file(s); see 'skipped' in {out}", file=sys.stderr)
    print(f"results: {out} ({result.summary['computed']} computed, {result.summary['resumed']} resumed)")
    if args.plots:
        for path in write_plots(result, model, args.plots, layer=args.layer, batch_size=args.batch_size):
            print(f"plot: {path}")
    return 0
