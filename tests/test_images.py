"""Tests for fdcam.images: loading odd images, preprocessing, overlays and map resizing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fdcam import models
from fdcam.cli import main
from fdcam.images import ImageError, denormalize, list_images, load_image, output_size, overlay, preprocess, resize_map

DATA = Path(__file__).parent / "data"
SPEC = models.spec("efficientnet_lite0")
JPEGS = sorted(DATA.glob("*.JPEG"))


@pytest.mark.parametrize(
    "file_name, size",
    [("gray.png", (128, 96)), ("rgba.png", (100, 80)), ("gray16.png", (128, 96)), ("tiny.png", (8, 8))],
)
def test_edge_case_images_load_as_rgb(file_name, size):
    image = load_image(DATA / file_name)
    assert image.mode == "RGB" and image.size == size


def test_gray_keeps_its_values():
    with Image.open(DATA / "gray.png") as raw:
        expected = np.asarray(raw)
    pixels = np.asarray(load_image(DATA / "gray.png"))
    assert all(np.array_equal(pixels[..., channel], expected) for channel in range(3))


def test_sixteen_bit_is_scaled_to_eight_bit():
    with Image.open(DATA / "gray16.png") as raw:
        assert raw.mode == "I;16"
        expected = np.rint(np.asarray(raw, dtype=np.float64) / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(DATA / "gray16.png"))[..., 0], expected)


def test_transparent_pixels_become_black():
    pixels = np.asarray(load_image(DATA / "rgba.png"))
    assert (pixels[:, 50:] == 0).all()
    assert (pixels[:, :50, 0] == 200).all()


def test_palette_with_transparency_converts(tmp_path):
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "palette.png"))
    assert pixels.shape == (40, 40, 3) and (pixels[..., 0] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored 60x40 picture is shown as 40x60
    Image.new("RGB", (60, 40), (10, 20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (40, 60)


def test_not_an_image_is_refused_naming_the_file():
    with pytest.raises(ImageError, match="not an image file.*not_an_image.jpg"):
        load_image(DATA / "not_an_image.jpg")


def test_missing_file_is_refused_naming_the_file(tmp_path):
    with pytest.raises(ImageError, match="image file not found: .*missing.png"):
        load_image(tmp_path / "missing.png")


def test_truncated_file_is_refused(tmp_path):
    data = (JPEGS[0]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(tmp_path / "truncated.jpg")


def test_tiny_image_is_refused_by_preprocess():
    with pytest.raises(ImageError, match=r"^image is 8x8 px; the model needs at least 32x32$"):
        preprocess(load_image(DATA / "tiny.png"), SPEC)
    with pytest.raises(ImageError, match=r"image is 10x40 px"):
        preprocess(Image.new("RGB", (10, 40)), SPEC)
    assert preprocess(load_image(DATA / "tiny.png"), SPEC, min_size=8).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("file_name", [JPEGS[0].name, "both.png", "gray.png", "gray16.png"])
def test_preprocess_matches_torchvision(file_name):
    image = load_image(DATA / file_name)
    reference = transforms.Compose(
        [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(SPEC.mean, SPEC.std)]
    )(image)
    x = preprocess(image, SPEC)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], reference, rtol=0, atol=1e-6)


def test_preprocess_converts_non_rgb_images():
    with Image.open(DATA / "gray.png") as gray:
        gray.load()
    torch.testing.assert_close(preprocess(gray, SPEC), preprocess(gray.convert("RGB"), SPEC))


def test_denormalize_undoes_the_normalisation():
    image = load_image(JPEGS[0])
    x = preprocess(image, SPEC)
    unnormalised = transforms.ToTensor()(image.resize((224, 224), Image.Resampling.BILINEAR))
    torch.testing.assert_close(denormalize(x, SPEC)[0], unnormalised, rtol=0, atol=1e-6)
    torch.testing.assert_close(denormalize(x[0], SPEC), unnormalised, rtol=0, atol=1e-6)


def test_overlay_is_a_same_size_rgb_image_coloured_by_saliency():
    image = Image.new("L", (60, 40), 128)
    saliency = torch.zeros(40, 60)
    saliency[:, 30:] = 1.0
    blended = overlay(image, saliency)
    assert blended.mode == "RGB" and blended.size == (60, 40)
    pixels = np.asarray(blended).astype(int)
    red, blue = pixels[..., 0], pixels[..., 2]
    assert (red[:, 30:] > blue[:, 30:] + 50).all()  # high saliency: red end of JET
    assert (blue[:, :30] > red[:, :30] + 50).all()  # low saliency: blue end of JET
    assert not np.array_equal(pixels[:, 30:], np.full((40, 30, 3), 128))


def test_overlay_accepts_numpy_and_other_sizes_and_alpha_zero():
    image = load_image(DATA / "both.png")
    saliency = np.random.default_rng(0).random((7, 7))
    assert overlay(image, saliency).size == image.size
    assert np.array_equal(np.asarray(overlay(image, saliency, alpha=0.0)), np.asarray(image))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, saliency, alpha=1.5)


def test_resize_map_shape_and_range():
    saliency = torch.tensor([[-1.0, 0.5], [0.25, 2.0]])
    resized = resize_map(saliency, (30, 50))
    assert resized.shape == (30, 50)
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert resized[0, 0] == 0.0 and resized[-1, -1] == 1.0
    constant = resize_map(torch.full((7, 7), 0.3), (224, 224))
    torch.testing.assert_close(constant, torch.full((224, 224), 0.3))
    with pytest.raises(ValueError, match="2-D"):
        resize_map(torch.zeros(1, 7, 7), (10, 10))


def test_list_images_sorted_and_case_insensitive(tmp_path):
    for name in ["b.JPG", "a.png", "c.Jpeg", "d.webp", "e.TIF", "notes.txt", "labels.csv", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    assert [path.name for path in list_images(tmp_path)] == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "e.TIF"]
    with pytest.raises(ImageError, match="not a directory"):
        list_images(tmp_path / "nope")


def test_list_images_on_the_test_data():
    names = [path.name for path in list_images(DATA)]
    assert len(JPEGS) == 4 and all(path.name in names for path in JPEGS)
    assert "labels.csv" not in names and "boxes.json" not in names


# ---------------------------------------------------------------------------------------------
# hostile and huge files


def test_decompression_bombs_are_refused_in_one_line(bomb, tmp_path):
    with pytest.raises(ImageError, match="decompression bomb") as raised:
        load_image(bomb)
    assert "\n" not in str(raised.value)
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200)).save(small)
    with pytest.raises(ImageError, match="300x200 px .* more than"):
        load_image(small, max_pixels=50_000)
    assert load_image(small).size == (300, 200)


def test_outputs_of_large_images_are_bounded_and_overlays_computed_in_float32(tmp_path):
    assert output_size((8000, 6000), 4096) == (4096, 3072)
    assert output_size((300, 200), 4096) == (300, 200)
    path = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 600, 3), dtype=np.uint8)).save(path)
    assert (
        main(["explain", str(path), "--method", "gradcam", "--class", "1", "--max-size", "128", "--out", str(tmp_path)])
        == 0
    )
    assert np.load(tmp_path / "wide_gradcam_1.npy").shape == (64, 128)
    assert Image.open(tmp_path / "wide_gradcam_1.png").size == (128, 64)
    # The float32 banded overlay equals a float64 one-shot blend to within one grey level.
    from fdcam.images import _jet

    image = Image.fromarray(rng.integers(0, 255, (600, 70, 3), dtype=np.uint8))
    saliency = torch.rand(600, 70, generator=torch.Generator().manual_seed(0))
    reference = 0.5 * np.asarray(image, dtype=np.float64) + 0.5 * _jet(saliency.double().numpy()) * 255.0
    got = np.asarray(overlay(image, saliency), dtype=np.float64)
    assert np.abs(got - np.clip(np.rint(reference), 0, 255)).max() <= 1
