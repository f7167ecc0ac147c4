"""fdcam.explain_output: what `fdcam explain` writes and prints, shared by the local command and `--server`."""

import numpy as np
import pytest
from PIL import Image

from fdcam import models
from fdcam.explain_output import check_classes, class_labels, output_stems, print_table, save_explanation
from fdcam.images import overlay

TEN = models.ModelSpec("ten", "layer", (8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 10)


def test_the_table_aligns_its_columns_and_rounds_probabilities(capsys):
    print_table(
        [("zebra", "fdcam", 340, "zebra", 0.98765, "out/zebra_fdcam_340.png|.npy"), ("a", "gradcam", 7, "x", 0.5, "f")]
    )
    assert capsys.readouterr().out.splitlines() == [
        "image  method   class  name   prob   files",
        "zebra  fdcam    340    zebra  0.988  out/zebra_fdcam_340.png|.npy",
        "a      gradcam  7      x      0.500  f",
    ]


def test_class_labels_are_imagenet_names_or_indices():
    assert class_labels(TEN) == [str(i) for i in range(10)]
    assert class_labels(models.spec("resnet50"))[340] == "zebra"


@pytest.mark.parametrize(
    "classes, topk, message",
    [
        ([3, 10], 1, "class index 10 is out of range for ten"),
        ([-1], 1, "class index -1 is out of range"),
        (None, 0, "--topk must be between 1 and 10"),
        (None, 11, "--topk must be between 1 and 10"),
    ],
)
def test_bad_classes_are_one_line_errors(classes, topk, message):
    with pytest.raises(ValueError, match=message):
        check_classes(classes, topk, TEN)
    check_classes([0, 9], 11, TEN)  # classes given: --topk does not apply
    check_classes(None, 10, TEN)


def test_saved_files_are_the_overlay_and_the_float32_map(tmp_path):
    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    saliency = np.linspace(0, 1, 24).reshape(4, 6)
    files = save_explanation(image, saliency, tmp_path / "x_fdcam_3")
    assert files == f"{tmp_path / 'x_fdcam_3'}.png|.npy"
    saved = np.load(tmp_path / "x_fdcam_3.npy")
    assert saved.dtype == np.float32 and np.array_equal(saved, saliency.astype(np.float32))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x_fdcam_3.png")), np.asarray(overlay(image, saliency)))


def test_a_skip_names_its_file_once(tmp_path):
    from fdcam.explain_output import skip_line
    from fdcam.images import ImageError, load_image

    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageError) as error:
        load_image(missing)
    assert skip_line(missing, error.value).count(str(missing)) == 1  # load_image's message names it
    refused = skip_line(str(missing), "the server refused the image: 16x16 px")  # a server's message does not
    assert refused == f"fdcam: skipped: {missing}: the server refused the image: 16x16 px"


# ---------------------------------------------------------------------------------------------
# unique output names


def test_output_stems_are_unique():
    assert output_stems(["a/x.jpg", "b/y.jpg"]) == ["x", "y"]
    stems = output_stems(["a/x.jpg", "b/x.jpg", "x.jpg", "x.webp", "x.webp"])
    assert len(set(stems)) == 5
    assert output_stems(["x.jpg", "x.webp"]) == ["x_jpg", "x_webp"]
