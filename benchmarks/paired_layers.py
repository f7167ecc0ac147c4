"""Compare two insertion/deletion runs (e.g. two target layers) on the images both computed.

    python benchmarks/paired_layers.py results/tables-134/insertion-deletion.json \\
        results/tables-13-head/insertion-deletion.json

For each method row present in both runs: mean insertion, deletion and overall of each run on the
common images, and the paired difference of overall (second − first, mean ± standard error). Then,
within each run, FD-CAM's overall minus every other row's, paired over the same images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _paired(differences: list[float]) -> str:
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else float("nan")
    return f"{mean:+.4f} ± {sd / math.sqrt(n):.4f}"


def _per_image(path: Path) -> tuple[dict, dict[str, dict]]:
    summary = json.loads(path.read_text())
    return summary, {image["file"]: image for image in summary["per_image"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    (first, a), (second, b) = _per_image(args.first), _per_image(args.second)
    common = [name for name in a if name in b]
    same_class = sum(a[name]["class"] == b[name]["class"] for name in common)
    rows = [m for m in first["methods"] if m in second["methods"]]
    print(f"{len(common)} common images ({same_class} with the same target class); "
          f"layers {first['layer']} → {second['layer']}")
    print(f"\n| Method | Ins. {first['layer']} | Del. | Overall | Ins. {second['layer']} | Del. | Overall | Δ overall (paired) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in rows:
        cells = []
        for run in (a, b):
            for key in ("insertion", "deletion", "overall"):
                cells.append(sum(run[name]["methods"][method][key] for name in common) / len(common))
        delta = _paired([b[n]["methods"][method]["overall"] - a[n]["methods"][method]["overall"] for n in common])
        print(f"| {method} | " + " | ".join(f"{c:.4f}" for c in cells) + f" | {delta} |")
    for label, run in ((first["layer"], a), (second["layer"], b)):
        print(f"\nFD-CAM overall minus each row at {label} (paired, mean ± s.e.):")
        for method in rows:
            if method != "fdcam":
                print(f"  {method}: " + _paired([run[n]["methods"]["fdcam"]["overall"] - run[n]["methods"][method]["overall"] for n in common]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
