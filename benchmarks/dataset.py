"""Images/s of `fdcam.datasets.explain_dataset` (Ray Data) with 1 and 2 actors, against the plain in-process loop.

    python -m benchmarks.dataset [--images N] [--batch-size B] [--method fdcam] [--repeat R] [--json out.json]

Lite0 FD-CAM over the first N photos of shared/data/imagenet-sample. The in-process row decodes and explains
them in batches of B in this process (fdcam.images + fdcam.FDCAM, torch using every core). The Ray rows start
one local Ray first (not timed) and time each explain_dataset call from start to the last Parquet file,
actor start-up and the model's load included, into a fresh output folder. The rows run round-robin R times
(background load hits every row alike) and each row reports its fastest round; the load average is printed
beside them. The scaling is the 2-actor row over the 1-actor row. The GPU prediction multiplies the measured
per-GPU throughput of the GPU table in docs/benchmarks.md by the number of GPUs: a prediction for when each actor
holds a GPU and decoding keeps up, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import fdcam
from fdcam.images import load_image, preprocess

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
# Lite0 FD-CAM fp32, batches of 32, on one H100 (docs/benchmarks.md, "Measured latency and throughput (GPU)").
H100_LITE0_FDCAM_PER_SECOND = 587


def in_process(paths: list[Path], method: str, batch_size: int) -> float:
    """Seconds for the plain loop: decode and explain every image in batches, in this process."""
    model = fdcam.models.load("efficientnet_lite0")
    cam = fdcam.METHODS[method](model)
    spec = fdcam.models.spec_of(model)
    cam(preprocess(load_image(paths[0]), spec))  # split traced once, as each actor does before its first batch
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        x = torch.cat([preprocess(load_image(p), spec) for p in paths[start : start + batch_size]])
        cam(x)
    return time.perf_counter() - started


def on_ray(paths: list[Path], method: str, batch_size: int, actors: int) -> float:
    """Seconds for explain_dataset with `actors` actors into a fresh output folder (Ray already running)."""
    from fdcam.datasets import explain_dataset

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = explain_dataset(
            [str(p) for p in paths], out=out, method=method, actors=actors, batch_size=batch_size, progress=False
        )
        seconds = time.perf_counter() - started
    assert result.computed == len(paths) and result.errors == 0
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--method", default="fdcam")
    parser.add_argument("--repeat", type=int, default=2, help="round-robin rounds; each row's fastest is reported")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    import ray

    paths = sorted(SAMPLE.glob("*.JPEG"))[: args.images]
    names = ["in-process loop", "explain_dataset, 1 actor", "explain_dataset, 2 actors"]
    rounds: dict[str, list[float]] = {name: [] for name in names}
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a Ray already running here
    try:
        for _ in range(max(1, args.repeat)):
            rounds[names[0]].append(in_process(paths, args.method, args.batch_size))
            for actors in (1, 2):
                rounds[names[actors]].append(on_ray(paths, args.method, args.batch_size, actors))
    finally:
        ray.shutdown()
    rows = [(name, min(rounds[name])) for name in names]
    rates = {name: len(paths) / seconds for name, seconds in rows}
    one, two = rates["explain_dataset, 1 actor"], rates["explain_dataset, 2 actors"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__};"
        f" {datetime.date.today()}; load average {os.getloadavg()[1]:.1f} (5 min) at the end"
    )
    print(f"command: python -m benchmarks.dataset {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{len(paths)} images, efficientnet_lite0 {args.method}, batch {args.batch_size}")
    print("| row | seconds | images/s |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {rates[name]:.2f} |")
    plain = rates["in-process loop"]
    print(f"scaling 1 → 2 actors: {two / one:.2f}×; 1 actor vs the in-process loop: {one / plain:.2f}×")
    print(
        "prediction (not measured): N GPUs, one actor each, at the H100 table's Lite0 FD-CAM fp32 rate "
        f"({H100_LITE0_FDCAM_PER_SECOND}/s with batches of 32): ≈ {H100_LITE0_FDCAM_PER_SECOND} × N images/s "
        "while decoding keeps up"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "images": len(paths),
                    "batch_size": args.batch_size,
                    "method": args.method,
                    "rounds": rounds,
                    "images_per_second": rates,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
