import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdcam.composites import BACKGROUND, compose, composite_set, make_pairs, read_labels

# shared/ lies beside the repository (as on CI: a clean clone with shared/ next to it).
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
TOP_LEFT, BOTTOM_RIGHT = (0, 0, 103, 103), (120, 120, 223, 223)


def write_dataset(directory: Path, n_images: int = 12) -> Path:
    """Solid-colour images whose colour encodes their class, and a labels.csv for them."""
    labels_csv = directory / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_index", "wnid", "name"])
        for index in range(n_images):
            class_index = index // 2  # two images per class, so same-class pairs must be avoided
            file = f"img_{index}.png"
            Image.new("RGB", (60 + 7 * index, 40 + 5 * index), colour_of(class_index)).save(directory / file)
            writer.writerow([file, class_index, f"n{class_index:08d}", f"class_{class_index}"])
    return labels_csv


def colour_of(class_index: int) -> tuple[int, int, int]:
    return (10 * class_index, 250 - 10 * class_index, 30)


def test_the_background_is_the_mean_colour_the_models_normalise_to_zero():
    from fdcam.images import preprocess
    from fdcam.models import spec

    model_spec = spec("efficientnet_lite0")
    x = preprocess(Image.new("RGB", (224, 224), BACKGROUND), model_spec)
    assert float(x.abs().max()) <= 0.5 / 255 / min(model_spec.std)  # one rounding of 8-bit colour from zero


@pytest.mark.parametrize("a_top_left", [True, False])
def test_compose_places_tiles_in_boxes(a_top_left):
    image_a = Image.new("RGB", (300, 200), (255, 0, 0))
    image_b = Image.new("L", (50, 80), 0)  # converted to RGB
    canvas, box_a, box_b = compose(image_a, image_b, a_top_left)
    assert canvas.size == (224, 224) and canvas.mode == "RGB"
    assert (box_a, box_b) == ((TOP_LEFT, BOTTOM_RIGHT) if a_top_left else (BOTTOM_RIGHT, TOP_LEFT))

    pixels = np.asarray(canvas)
    for box, colour in ((box_a, (255, 0, 0)), (box_b, (0, 0, 0))):
        x0, y0, x1, y1 = box
        assert x1 - x0 + 1 == 104 and y1 - y0 + 1 == 104
        assert (pixels[y0 : y1 + 1, x0 : x1 + 1] == colour).all()
    background = np.ones((224, 224), dtype=bool)
    for x0, y0, x1, y1 in (TOP_LEFT, BOTTOM_RIGHT):
        background[y0 : y1 + 1, x0 : x1 + 1] = False
    assert (pixels[background] == BACKGROUND).all()


def test_make_pairs_differ_in_class_and_are_deterministic():
    labels = [(f"f{i}", i // 3) for i in range(30)]
    pairs = make_pairs(labels, n_pairs=40, seed=3)
    assert len(pairs) == 40
    assert all(a[1] != b[1] for a, b in pairs)
    assert all(a in labels and b in labels for a, b in pairs)
    assert len({frozenset((a, b)) for a, b in pairs}) == 40
    assert make_pairs(labels, n_pairs=40, seed=3) == pairs
    assert make_pairs(labels, n_pairs=40, seed=4) != pairs


def test_make_pairs_rejects_impossible_requests():
    labels = [("a", 0), ("b", 0), ("c", 1)]
    assert len(make_pairs(labels, n_pairs=2)) == 2
    with pytest.raises(ValueError):
        make_pairs(labels, n_pairs=3)


def test_composite_set_alternates_and_matches_classes_to_boxes(tmp_path):
    labels_csv = write_dataset(tmp_path)
    items = list(composite_set(tmp_path, labels_csv, n_pairs=6, seed=1))
    assert len(items) == 6
    for index, (canvas, objects) in enumerate(items):
        assert canvas.size == (224, 224)
        (class_a, box_a), (class_b, box_b) = objects
        assert class_a != class_b
        assert box_a == (TOP_LEFT if index % 2 == 0 else BOTTOM_RIGHT)
        assert box_b == (BOTTOM_RIGHT if index % 2 == 0 else TOP_LEFT)
        pixels = np.asarray(canvas)
        for class_index, (x0, y0, _, _) in objects:
            assert tuple(pixels[y0 + 50, x0 + 50]) == colour_of(class_index)


def test_composite_set_is_deterministic_for_a_seed(tmp_path):
    labels_csv = write_dataset(tmp_path)

    def run(seed):
        return [(np.asarray(canvas), objects) for canvas, objects in composite_set(tmp_path, labels_csv, 5, seed)]

    first, again, other = run(0), run(0), run(1)
    assert [objects for _, objects in first] == [objects for _, objects in again]
    assert all((a == b).all() for (a, _), (b, _) in zip(first, again, strict=True))
    assert [objects for _, objects in first] != [objects for _, objects in other]


@pytest.mark.skipif(not (SAMPLE_DIR / "labels.csv").exists(), reason="ImageNet sample not available")
def test_composite_set_on_the_imagenet_sample():
    labels = read_labels(SAMPLE_DIR / "labels.csv")
    assert labels and all(isinstance(class_index, int) for _, class_index in labels)
    canvas, objects = next(iter(composite_set(SAMPLE_DIR, SAMPLE_DIR / "labels.csv", n_pairs=1)))
    assert canvas.size == (224, 224)
    assert [box for _, box in objects] == [TOP_LEFT, BOTTOM_RIGHT]
