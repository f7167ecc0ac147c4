"""`python -m benchmarks.latency`: options, the run over models and rows, the printed table and the JSON file."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

from fdcam.options import TORCH_PRECISIONS

from .models import DEFAULT_MODELS, MODEL_NAMES, load_model
from .profile import format_profile, profile_fdcam
from .report import engine_ratios, format_machine, format_ratios, format_table, machine_info
from .rows import REFERENCE, ROW_KEYS, ROWS, one_line, select_rows
from .timing import Result, run_model

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as usage

    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=usage.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--methods", default=None, help=f"comma list of rows or prefixes: {', '.join(ROW_KEYS)}")
    parser.add_argument("--batch", type=int, default=1, help="images per batch for the throughput column")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median and min reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per row before timing")
    parser.add_argument(
        "--quick", action="store_true", help="slow rows (Score-CAMs, pgc AblationCAM): 1 run, no warm-up"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print FD-CAM's stage breakdown per model (from fdcam.timing)"
    )
    parser.add_argument(
        "--profile-precision",
        default="fp32",
        choices=TORCH_PRECISIONS,
        help="precision of the profiled FD-CAM (its batch is --batch)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.repeat < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeat must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    names = [n.strip().lower().replace("-", "_") for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise SystemExit(f"unknown --models {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    rows = select_rows(args.methods)
    if REFERENCE not in [row.key for row in rows]:
        rows.insert(0, next(row for row in ROWS if row.key == REFERENCE))  # the ratio's reference
    info = machine_info(device)
    print(format_machine(info), flush=True)
    results: list[Result] = []
    profiles: dict[str, dict[str, float]] = {}
    for name in names:
        try:
            bm = load_model(name, device)
        except Exception as error:
            print(f"{name}: skipped ({one_line(error)})", flush=True)
            results.append(Result(name, "*", "-", "-", "-", "-", device.type, status="skipped", reason=one_line(error)))
            continue
        model_results = run_model(rows, bm, device, args)
        reference = next((r for r in model_results if r.method == REFERENCE and r.status == "ok"), None)
        for r in model_results:
            if reference is not None and r.status == "ok":
                r.ratio_to_pgc_gradcam = r.median_ms / reference.median_ms
        results.extend(model_results)
        if args.profile:
            try:
                profiles[name] = profile_fdcam(bm, device, args.repeat, args.batch, args.profile_precision)
            except Exception as error:
                print(f"profile of {name} failed: {one_line(error)}")
        del bm
        gc.collect()
    print()
    print(format_table(results, args.batch))
    ratios = engine_ratios(results)
    if ratios:
        print()
        print(format_ratios(ratios, args.batch))
    for name, profile in profiles.items():
        print()
        print(format_profile(name, profile, args.batch, args.profile_precision))
    if args.json:
        payload = {
            "machine": info,
            "config": {
                "device": device.type,
                "models": names,
                "rows": [row.key for row in rows],
                "batch": args.batch,
                "repeat": args.repeat,
                "warmup": args.warmup,
                "quick": args.quick,
                "command": "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            "results": [r.__dict__ for r in results],
            "ratios": ratios,
            "profile": profiles,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0
