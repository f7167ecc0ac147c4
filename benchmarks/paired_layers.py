"""Compare two insertion/deletion runs (e.g. two target layers) on the images both computed.

    python benchmarks/paired_layers.py results/tables-134/insertion-deletion.json \\
        results/tables-13-head/insertion-deletion.json

For each method row present in both runs: mean insertion, deletion and overall of each run on the
common images, and the paired difference of overall (second − first, mean ± standard error). Then,
within each run, FD-CAM's overall minus every other row's, paired over the same images. An image
that only one run computed (skipped or not reached by the other) is left out of every number.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Comparison", "compare", "main", "paired_difference"]

_KEYS = ("insertion", "deletion", "overall")


def paired_difference(differences: list[float]) -> tuple[float, float]:
    """(mean, standard error) of per-image differences; the standard error is NaN for a single image."""
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else float("nan")
    return mean, sd / math.sqrt(n)


@dataclass
class Comparison:
    """Two runs compared on their common images (in the first run's order)."""

    first_layer: str
    second_layer: str
    common: list[str]
    same_class: int  # common images whose target class is the same in both runs
    #: method -> (insertion, deletion, overall) means of the first run, then of the second
    means: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = field(default_factory=dict)
    #: method -> (mean, s.e.) of second − first overall
    delta: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per run (first, second): method -> (mean, s.e.) of FD-CAM's overall minus the method's
    fdcam_minus: tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]] = field(
        default_factory=lambda: ({}, {})
    )


def _per_image(path: Path) -> tuple[dict, dict[str, dict]]:
    summary = json.loads(path.read_text())
    return summary, {image["file"]: image for image in summary["per_image"]}


def compare(first_path: Path, second_path: Path) -> Comparison:
    """The paired comparison of two `insertion-deletion.json` files written by fdcam's evaluation."""
    (first, a), (second, b) = _per_image(Path(first_path)), _per_image(Path(second_path))
    common = [name for name in a if name in b]
    if not common:
        raise ValueError(f"{first_path} and {second_path} have no image in common")
    rows = [m for m in first["methods"] if m in second["methods"]]
    result = Comparison(
        first["layer"], second["layer"], common, sum(a[name]["class"] == b[name]["class"] for name in common)
    )

    def mean(run: dict, method: str, key: str) -> float:
        return sum(run[name]["methods"][method][key] for name in common) / len(common)

    def overall(run: dict, name: str, method: str) -> float:
        return run[name]["methods"][method]["overall"]

    for method in rows:
        result.means[method] = (
            tuple(mean(a, method, key) for key in _KEYS),
            tuple(mean(b, method, key) for key in _KEYS),
        )
        result.delta[method] = paired_difference([overall(b, n, method) - overall(a, n, method) for n in common])
    result.fdcam_minus = tuple(
        {
            method: paired_difference([overall(run, n, "fdcam") - overall(run, n, method) for n in common])
            for method in rows
            if method != "fdcam"
        }
        if "fdcam" in rows
        else {}
        for run in (a, b)
    )
    return result


def _paired(mean_and_error: tuple[float, float]) -> str:
    return f"{mean_and_error[0]:+.4f} ± {mean_and_error[1]:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    try:
        result = compare(args.first, args.second)
    except ValueError as error:
        print(f"paired_layers: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{len(result.common)} common images ({result.same_class} with the same target class); "
        f"layers {result.first_layer} → {result.second_layer}"
    )
    print(
        f"\n| Method | Ins. {result.first_layer} | Del. | Overall "
        f"| Ins. {result.second_layer} | Del. | Overall | Δ overall (paired) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, (first, second) in result.means.items():
        print(
            f"| {method} | "
            + " | ".join(f"{c:.4f}" for c in (*first, *second))
            + f" | {_paired(result.delta[method])} |"
        )
    for label, differences in zip((result.first_layer, result.second_layer), result.fdcam_minus):
        print(f"\nFD-CAM overall minus each row at {label} (paired, mean ± s.e.):")
        for method, difference in differences.items():
            print(f"  {method}: " + _paired(difference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
