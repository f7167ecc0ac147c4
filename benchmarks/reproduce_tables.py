"""Reproduce the FD-CAM paper's Tables I-IV with EfficientNet-Lite0 on the shared ImageNet sample.

    python benchmarks/reproduce_tables.py                # the full run (hours on 2 CPU cores)
    python benchmarks/reproduce_tables.py --limit 5      # a quick check, with timings

Table I   insertion / deletion / overall of the eight methods (RISE metric, top-1 class).
Table II  pointing game on two-class composites (a substitute for VOC) and on multi-object/both.png.
Table III FD-CAM ablation of grouping and switch-on/off scores.
Table IV  FD-CAM combination of gradient and score terms (exp / linear, bias).

Tables I, III and IV come from one insertion/deletion run (FD-CAM variants are extra rows);
Table II from one pointing-game run. Both runs resume from their .partial.jsonl files in --out,
so an interrupted job continues where it stopped. Writes insertion-deletion.json,
pointing-game.json, timings.json and tables.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fdcam import models
from fdcam.evaluate_command import partial_path_for
from fdcam.evaluation import (
    DEFAULT_STEP,
    evaluate_insertion_deletion,
    evaluate_pointing_game,
    format_table,
    markdown_table,
    method_specs,
    require_matplotlib,
    write_json_atomic,
    write_plots,
)
from fdcam.methods import METHODS
from fdcam.scoring import SCORERS

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL, LAYER = "efficientnet_lite0", "_blocks.15"

TABLE3 = [  # (variant, grouping, switch-on, switch-off)
    ("no-group-off", "no", "no", "yes"),
    ("group-off", "yes", "no", "yes"),
    ("full", "yes", "yes", "yes"),
]
TABLE4 = [  # (variant, combination)
    ("linear", "w = a*s - b"),
    ("exp-nobias", "w = a*exp(s)"),
    ("full", "w = a*exp(s) - b"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=Path, default=SHARED / "imagenet-sample", help="ImageNet sample folder with labels.csv"
    )
    parser.add_argument(
        "--multi-object", type=Path, default=SHARED / "multi-object", help="folder with boxes.json ('' to skip)"
    )
    parser.add_argument("--out", type=Path, default=Path("fdcam-out/tables"), help="results folder")
    parser.add_argument(
        "--layer",
        default=LAYER,
        help=f"target layer: module or fx node name (default {LAYER}; `fdcam layers` lists them)",
    )
    parser.add_argument("--limit", type=int, help="only the first N images and N composites (quick check)")
    parser.add_argument("--pairs", type=int, default=250, help="composite pairs for Table II (default 250)")
    parser.add_argument("--tables", default="1,2,3,4", help="which tables to compute (default 1,2,3,4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, help="forward batch size of methods and metric")
    parser.add_argument("--images-per-call", type=int, default=4)
    parser.add_argument(
        "--step",
        type=int,
        default=DEFAULT_STEP,
        help=f"insertion/deletion pixels per step (default {DEFAULT_STEP}, RISE's)",
    )
    parser.add_argument("--plots", action="store_true", help="also write curves and overlay grids to OUT/plots")
    parser.add_argument(
        "--scorer",
        default="auto",
        choices=SCORERS,
        help="forwards of the curves and Score-CAM/Group-CAM: auto (default; ONNX Runtime on CPU), torch, onnxruntime",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _renamed(table: str, names: dict[str, str]) -> str:
    lines = table.splitlines()
    for i, line in enumerate(lines[2:], start=2):
        label = line.split(" | ")[0].removeprefix("| ")
        if label in names:
            lines[i] = line.replace(f"| {label} |", f"| {names[label]} |", 1)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tables = {int(t) for t in args.tables.split(",") if t.strip()}
    if args.plots:
        require_matplotlib()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    model = models.load(MODEL, device=device)
    common = dict(
        layer=args.layer,
        limit=args.limit,
        batch_size=args.batch_size,
        images_per_call=args.images_per_call,
        progress=not args.quiet,
        keep_maps=4 if args.plots else 0,
        model_name=MODEL,
        scorer=args.scorer,
    )
    markdown = [
        f"# FD-CAM tables: {MODEL}, layer {args.layer}, images {args.images}"
        + (f" (limit {args.limit})" if args.limit else "")
    ]
    timings: dict[str, dict] = {}

    if tables & {1, 3, 4}:
        variants = [v for v, *_ in TABLE3] if 3 in tables else []
        variants += [v for v, _ in TABLE4 if 4 in tables and v not in variants]
        specs = method_specs(list(METHODS) if 1 in tables else ["fdcam"], variants=variants)
        out = args.out / "insertion-deletion.json"
        tic = time.perf_counter()
        run = evaluate_insertion_deletion(
            model, args.images, methods=specs, step=args.step, partial_path=partial_path_for(out), **common
        )
        wall = time.perf_counter() - tic
        summary = run.summary
        write_json_atomic(out, summary)
        print(format_table(summary))
        label_of = {s.variant or "full": s.label for s in specs if s.name == "fdcam"}
        if 1 in tables:
            markdown += [
                "",
                f"## Table I: insertion / deletion ({summary['n_images']} images, top-1 class)",
                "",
                markdown_table(summary, list(METHODS)),
            ]
        if 3 in tables:
            names = {
                label_of[v]: f"{label_of[v]} (grouping {g}, switch-on {on}, switch-off {off})"
                for v, g, on, off in TABLE3
            }
            markdown += [
                "",
                "## Table III: FD-CAM grouping and switch ablation",
                "",
                _renamed(markdown_table(summary, [label_of[v] for v, *_ in TABLE3]), names),
            ]
        if 4 in tables:
            names = {label_of[v]: f"{label_of[v]} ({combination})" for v, combination in TABLE4}
            markdown += [
                "",
                "## Table IV: FD-CAM combination of gradient and score",
                "",
                _renamed(markdown_table(summary, [label_of[v] for v, _ in TABLE4]), names),
            ]
        per_image = {
            label: {"explain": m["explain_seconds_per_image"], "insertion_deletion": m["metric_seconds_per_image"]}
            for label, m in summary["methods"].items()
        }
        total = sum(t["explain"] + t["insertion_deletion"] for t in per_image.values())
        timings["insertion-deletion"] = {
            "seconds_per_image_per_method": per_image,
            "seconds_per_image_all_rows": total,
            "projected_hours_for_500_images": total * 500 / 3600,
            "wall_seconds_this_run": wall,
            "computed_images": summary["computed"],
            "scorer": summary["scorer"],
        }
        if args.plots:
            write_plots(run, model, args.out / "plots", layer=args.layer, batch_size=args.batch_size)

    if 2 in tables:
        out = args.out / "pointing-game.json"
        multi = args.multi_object if str(args.multi_object) not in ("", ".") and args.multi_object.is_dir() else None
        tic = time.perf_counter()
        run = evaluate_pointing_game(
            model,
            args.images,
            methods=method_specs("all"),
            pairs=args.pairs,
            multi_object=multi,
            partial_path=partial_path_for(out),
            **common,
        )
        wall = time.perf_counter() - tic
        summary = run.summary
        write_json_atomic(out, summary)
        print(format_table(summary))
        markdown += [
            "",
            f"## Table II (substitute): pointing game, {summary['n_images']} composites + multi-object",
            "",
            markdown_table(summary),
        ]
        per_image = {label: m["explain_seconds_per_image"] for label, m in summary["methods"].items()}
        timings["pointing-game"] = {
            "explain_seconds_per_composite_per_method": per_image,
            "seconds_per_composite_all_methods": sum(per_image.values()),
            "projected_hours_for_pairs": sum(per_image.values()) * args.pairs / 3600,
            "wall_seconds_this_run": wall,
            "computed_composites": summary["computed"],
            "scorer": summary["scorer"],
        }
        if args.plots:
            write_plots(run, model, args.out / "plots", layer=args.layer, batch_size=args.batch_size)

    timings["torch_threads"] = torch.get_num_threads()
    write_json_atomic(args.out / "timings.json", timings)
    (args.out / "tables.md").write_text("\n".join(markdown) + "\n")
    print(json.dumps(timings, indent=2))
    print(f"wrote {args.out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
