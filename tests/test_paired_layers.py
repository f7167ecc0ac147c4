"""benchmarks/paired_layers.py: two insertion/deletion runs compared image by image, against plain statistics."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed; it lives at the root
from benchmarks.paired_layers import compare, main, paired_difference  # noqa: E402

# image -> method -> (insertion, deletion); overall = insertion - deletion, as the evaluation writes it
FIRST = {
    "a.JPEG": {"gradcam": (0.50, 0.10), "fdcam": (0.40, 0.05), "scorecam": (0.30, 0.20)},
    "b.JPEG": {"gradcam": (0.20, 0.15), "fdcam": (0.35, 0.10), "scorecam": (0.10, 0.10)},
    "c.JPEG": {"gradcam": (0.70, 0.05), "fdcam": (0.60, 0.02), "scorecam": (0.40, 0.30)},
    "d.JPEG": {"gradcam": (0.10, 0.30), "fdcam": (0.25, 0.20), "scorecam": (0.05, 0.01)},
    "only-first.JPEG": {"gradcam": (0.99, 0.00), "fdcam": (0.00, 0.99), "scorecam": (0.50, 0.50)},
}
SECOND = {
    "c.JPEG": {"gradcam": (0.75, 0.04), "fdcam": (0.50, 0.10)},
    "only-second.JPEG": {"gradcam": (0.00, 0.90), "fdcam": (0.90, 0.00)},
    "a.JPEG": {"gradcam": (0.45, 0.12), "fdcam": (0.48, 0.03)},
    "d.JPEG": {"gradcam": (0.22, 0.21), "fdcam": (0.30, 0.25)},
    "b.JPEG": {"gradcam": (0.25, 0.05), "fdcam": (0.31, 0.12)},
}
COMMON = ["a.JPEG", "b.JPEG", "c.JPEG", "d.JPEG"]  # in the first run's order


def _write(path: Path, layer: str, images: dict, classes: dict) -> Path:
    """An insertion-deletion.json as fdcam.evaluation writes it (the fields the script reads, and a few more)."""
    methods = sorted({m for scores in images.values() for m in scores}, key=["gradcam", "scorecam", "fdcam"].index)
    per_image = [
        {
            "file": name,
            "class": classes.get(name, 1),
            "class_name": "x",
            "label": 1,
            "methods": {m: {"insertion": i, "deletion": d, "overall": i - d} for m, (i, d) in scores.items()},
        }
        for name, scores in images.items()
    ]
    summary = {
        "metric": "insertion-deletion",
        "model": "efficientnet_lite0",
        "layer": layer,
        "n_images": len(images),
        "methods": {
            m: {"method": m, "options": {}, "insertion": 0.0, "deletion": 0.0, "overall": 0.0} for m in methods
        },
        "per_image": per_image,
        "skipped": [],
    }
    path.write_text(json.dumps(summary))
    return path


@pytest.fixture
def runs(tmp_path):
    first = _write(tmp_path / "first.json", "_blocks.15", FIRST, {})
    second = _write(tmp_path / "second.json", "_swish_1", SECOND, {"d.JPEG": 7})  # d's target class differs
    return first, second


def _overall(run: dict, name: str, method: str) -> float:
    insertion, deletion = run[name][method]
    return insertion - deletion


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_paired_differences_are_over_the_common_images_only(runs):
    result = compare(*runs)
    assert result.common == COMMON and result.same_class == 3
    assert (result.first_layer, result.second_layer) == ("_blocks.15", "_swish_1")
    assert list(result.means) == ["gradcam", "fdcam"]  # scorecam is in the first run only
    for method in ("gradcam", "fdcam"):
        expected = _mean_and_error([_overall(SECOND, n, method) - _overall(FIRST, n, method) for n in COMMON])
        assert result.delta[method] == pytest.approx(expected, rel=1e-12)
        for run, means in zip((FIRST, SECOND), result.means[method], strict=True):
            insertion = statistics.mean(run[n][method][0] for n in COMMON)
            deletion = statistics.mean(run[n][method][1] for n in COMMON)
            assert means == pytest.approx((insertion, deletion, insertion - deletion), rel=1e-12)
    for run, differences in zip((FIRST, SECOND), result.fdcam_minus, strict=True):
        expected = _mean_and_error([_overall(run, n, "fdcam") - _overall(run, n, "gradcam") for n in COMMON])
        assert list(differences) == ["gradcam"] and differences["gradcam"] == pytest.approx(expected, rel=1e-12)


def test_main_prints_the_counts_and_the_paired_rows(runs, capsys):
    assert main([str(path) for path in runs]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 common images (3 with the same target class); layers _blocks.15 → _swish_1\n")
    mean, error = _mean_and_error([_overall(SECOND, n, "gradcam") - _overall(FIRST, n, "gradcam") for n in COMMON])
    (row,) = [line for line in out.splitlines() if line.startswith("| gradcam |")]
    assert row.endswith(f"| {mean:+.4f} ± {error:.4f} |")
    assert "scorecam" not in out


def test_one_image_has_no_standard_error_and_no_common_image_is_an_error(tmp_path, capsys):
    assert paired_difference([0.25])[0] == 0.25 and math.isnan(paired_difference([0.25])[1])
    first = _write(tmp_path / "first.json", "a", {"x.JPEG": FIRST["a.JPEG"]}, {})
    second = _write(tmp_path / "second.json", "b", {"y.JPEG": SECOND["a.JPEG"]}, {})
    assert main([str(first), str(second)]) == 2
    assert capsys.readouterr().err.strip() == f"paired_layers: error: {first} and {second} have no image in common"
