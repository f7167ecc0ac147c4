"""`fdcam explain-dataset` and `fdcam evaluate --ray`: the dataset runs from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .. import models
from ..arguments import non_negative_float, positive_int
from ..errors import first_line
from ..methods import METHODS
from .sources import MAP_SIZES

__all__ = ["add_arguments", "add_ray_arguments", "run", "run_evaluate"]

EXIT_OK, EXIT_SOME_ERRORS, EXIT_BAD_OPTIONS, EXIT_INTERRUPTED = 0, 1, 2, 130
_Result = TypeVar("_Result")


def add_ray_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options of the Ray cluster and the actor pool, shared by both commands."""
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="an existing Ray cluster ('auto', 'ray://host:10001'); default: $RAY_ADDRESS, else a Ray of its own here",
    )
    parser.add_argument(
        "--actors",
        type=positive_int,
        metavar="N",
        help="model actors (default: sized from the cluster's CPUs/GPUs, leaving CPU for decoding)",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=non_negative_float,
        default=0,
        metavar="G",
        help="GPUs per actor (default 0: CPU actors); 0.5 puts two actors on a GPU",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam explain-dataset` on `parser`."""
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder of images, a labels CSV (file,class_index,wnid,name)"
        " or one image; paths in a CSV may be URIs pyarrow opens (s3://…)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: rows/*.parquet and run.json;"
        " a rerun with the same options resumes, skipping images already there",
    )
    parser.add_argument(
        "--model",
        default="efficientnet_lite0",
        help=f"one of {', '.join(models.NAMES)}, or a factory 'pkg.module:function'",
    )
    parser.add_argument(
        "--weights", default="imagenet", help="'imagenet' (offline default), a state_dict file, or 'random'"
    )
    parser.add_argument("--model-spec", metavar="NAME", help="input format of a factory model: a zoo model's name")
    parser.add_argument("--layer", default=None, help="target layer (`fdcam layers` lists them); default: the model's")
    parser.add_argument("--method", default="fdcam", choices=list(METHODS))
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--topk", type=positive_int, metavar="K", help="explain the K top classes of each image")
    classes.add_argument("--class", dest="class_index", type=int, metavar="N", help="explain class N in every image")
    classes.add_argument(
        "--target",
        choices=["top1", "label"],
        default="top1",
        help="top1 (default) or label (from the CSV, or --labels)",
    )
    parser.add_argument(
        "--labels", metavar="CSV", help="labels CSV for a folder source (default: DIR/labels.csv if present)"
    )
    parser.add_argument(
        "--map-size",
        choices=MAP_SIZES,
        default="feature",
        help="feature (default): the map at the layer's h×w; input: at the input size, as cam(x)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, metavar="B", help="images per actor call (default 4)"
    )
    parser.add_argument(
        "--backend", choices=["torch", "onnxruntime"], help="engine of FD-CAM's / Ablation-CAM's tail passes"
    )
    parser.add_argument(
        "--overlays",
        type=int,
        default=0,
        metavar="N",
        help="also write overlay PNGs of the first N rows to DIR/overlays",
    )
    parser.add_argument(
        "--rows-per-file",
        type=positive_int,
        default=1000,
        metavar="R",
        help="rows (about) per Parquet file, the unit Ctrl-C keeps (default 1000)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress report")
    add_ray_arguments(parser)
    parser.set_defaults(run=run)


def _print_summary(result, what: str) -> None:
    print(f"{what}: {result.line()}")


def _ray_failure(error: Exception) -> bool:
    return type(error).__module__.startswith("ray.")


def run(args: argparse.Namespace) -> int:
    """Run `fdcam explain-dataset`: exit 0 when every image was explained, 1 when some are error rows."""
    from .pipeline import explain_dataset

    targets = args.topk if args.topk else [args.class_index] if args.class_index is not None else args.target
    options = {"backend": args.backend} if args.backend else {}
    if options and not METHODS[args.method].uses_tail_engine:
        raise ValueError(f"--backend applies to fdcam and ablationcam, not {args.method}")
    if args.overlays < 0:
        raise ValueError(f"--overlays must be 0 or more, got {args.overlays}")
    result = _ray_run(
        lambda: explain_dataset(
            args.source,
            out=args.out,
            model=args.model,
            weights=args.weights,
            model_spec=args.model_spec,
            layer=args.layer,
            method=args.method,
            targets=targets,
            labels=args.labels,
            map_size=args.map_size,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            batch_size=args.batch_size,
            ray_address=args.ray_address,
            progress=not args.quiet,
            rows_per_file=args.rows_per_file,
            **options,
        )
    )
    if result is None:
        return EXIT_INTERRUPTED
    if args.overlays:
        for path in write_overlays(Path(args.out), args.overlays):
            print(f"overlay: {path}")
    _print_summary(result, "explain-dataset")
    if result.errors:
        print(f"fdcam: {result.errors} image(s) could not be explained; see the 'error' column", file=sys.stderr)
        return EXIT_SOME_ERRORS
    return EXIT_OK


def _ray_run(start: Callable[[], _Result]) -> _Result | None:
    """What `start()` returns, or None when the user interrupted the run (its summary printed with the hint
    to resume); a failure of Ray itself becomes one line."""
    from .pipeline import DatasetInterrupted

    try:
        return start()
    except DatasetInterrupted as interrupted:
        _print_summary(interrupted.run, "interrupted")
        print("fdcam: interrupted; the same command resumes", file=sys.stderr)
        return None
    except Exception as error:
        if not _ray_failure(error):
            raise
        raise RuntimeError(f"the Ray run failed: {first_line(error)}") from None


def write_overlays(out: Path, count: int) -> list[Path]:
    """Overlay PNGs of the first `count` explained rows under OUT/overlays (the map read back from Parquet)."""
    import numpy as np
    import pyarrow.dataset as ds

    from ..explain_output import output_stems
    from ..images import ImageError, load_image, overlay

    rows = (
        ds.dataset(out / "rows", format="parquet")
        .to_table(columns=["path", "class", "map_height", "map_width", "saliency"], filter=ds.field("error").is_null())
        .slice(0, count)
        .to_pylist()
    )
    folder = out / "overlays"
    folder.mkdir(exist_ok=True)
    written = []
    for row, stem in zip(rows, output_stems([f"{row['path']}#{row['class']}" for row in rows])):
        try:
            image = load_image(row["path"])
        except ImageError:
            continue
        saliency = np.asarray(row["saliency"], dtype=np.float32).reshape(row["map_height"], row["map_width"])
        path = folder / f"{stem}_class{row['class']}.png"
        overlay(image, saliency).save(path)
        written.append(path)
    return written


def run_evaluate(args: argparse.Namespace, specs) -> int:
    """`fdcam evaluate --ray`: insertion/deletion on Ray Data, rows under --out (a folder) and a mean table."""
    import numpy as np
    import pyarrow.parquet as pq

    from .pipeline import evaluate_dataset

    out = Path(args.out) if args.out else Path("fdcam-out") / args.metric
    result = _ray_run(
        lambda: evaluate_dataset(
            args.images,
            out=out,
            model=args.model,
            weights=args.weights,
            layer=args.layer,
            methods=specs,
            target=args.target,
            labels=args.labels,
            step=args.step,
            scorer="torch" if args.scorer == "auto" else args.scorer,
            forward_batch_size=args.batch_size,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            batch_size=args.images_per_call,
            ray_address=args.ray_address,
            progress=not args.quiet,
        )
    )
    if result is None:
        return EXIT_INTERRUPTED
    table = pq.read_table(out / "rows", columns=["method", "insertion", "deletion", "error"]).to_pylist()
    print(f"{'method':<24} {'insertion':>10} {'deletion':>10} {'overall':>10}")
    for method in result.summary["config"]["methods"]:
        scored = [r for r in table if r["method"] == method and r["error"] is None]
        if scored:
            insertion = float(np.mean([r["insertion"] for r in scored]))
            deletion = float(np.mean([r["deletion"] for r in scored]))
            print(f"{method:<24} {insertion:>10.4f} {deletion:>10.4f} {insertion - deletion:>10.4f}")
    _print_summary(result, "evaluate")
    return EXIT_SOME_ERRORS if result.errors else EXIT_OK
