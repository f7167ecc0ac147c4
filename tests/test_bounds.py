"""fdcam.bounds: one policy for pixels, encoded bytes, output side and classes, in the loaders and the server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fdcam.bounds import MAX_CLASSES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_OUTPUT_SIDE, PILLOW_LIMIT, ImageBounds
from fdcam.images import ImageError, decode_image, load_image, output_size, preprocess
from fdcam.serving.engine import ServingConfig, TorchExplainer, handle_image_requests


def _png(size, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_defaults_are_the_command_lines():
    from fdcam.cli import build_parser

    bounds = ImageBounds()
    assert (bounds.max_pixels, bounds.max_bytes, bounds.max_output_side, bounds.max_classes) == (
        MAX_IMAGE_PIXELS,
        MAX_IMAGE_BYTES,
        MAX_OUTPUT_SIDE,
        MAX_CLASSES,
    )
    assert MAX_IMAGE_PIXELS == 89_478_485 and MAX_OUTPUT_SIDE == 4096
    parser = build_parser()
    explain = parser.parse_args(["explain", "x.jpg"])
    serve = parser.parse_args(["serve"])
    assert explain.max_size == serve.max_output_side == MAX_OUTPUT_SIDE
    served = (serve.max_image_pixels, serve.max_request_bytes, serve.max_classes)
    assert served == (MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES, MAX_CLASSES)
    assert ServingConfig().bounds == bounds


def test_each_bound_refuses_in_one_line_naming_the_limit():
    bounds = ImageBounds(max_pixels=1000, max_bytes=2048, max_output_side=64, max_classes=3)
    bounds.check_pixels(40, 25)
    with pytest.raises(ValueError, match=r"^refused a\.png: 50x21 px \(1050 px\) is more than the 1000 px allowed"):
        bounds.check_pixels(50, 21, "a.png")
    bounds.check_bytes(2048)
    with pytest.raises(ValueError, match=r"MiB is more than the 0\.0 MiB allowed for an encoded image"):
        bounds.check_bytes(2049)
    bounds.check_classes(3)
    with pytest.raises(ValueError, match="^4 classes in one request is more than the 3 allowed$"):
        bounds.check_classes(4)
    assert bounds.output_size((640, 480)) == (64, 48) and bounds.output_size((30, 60)) == (30, 60)
    assert output_size((6000, 4500), 512) == (512, 384) and output_size((6000, 4500), None) == (6000, 4500)
    with pytest.raises(ValueError, match="max_pixels may be at most"):
        ImageBounds(max_pixels=PILLOW_LIMIT + 1)
    with pytest.raises(ValueError, match="positive integer"):
        ImageBounds(max_classes=0)


def test_files_and_bytes_go_through_the_same_checks(tmp_path):
    data = _png((300, 200))
    path = tmp_path / "small.png"
    path.write_bytes(data)
    assert load_image(path).size == decode_image(data).size == (300, 200)
    for load in (lambda **kw: load_image(path, **kw), lambda **kw: decode_image(data, **kw)):
        with pytest.raises(ImageError, match=r"300x200 px \(60000 px\) is more than the 50000 px allowed"):
            load(max_pixels=50_000)
        with pytest.raises(ImageError, match="allowed for an encoded image"):
            load(max_bytes=len(data) - 1)
    with pytest.raises(ImageError, match="^image_bytes is empty$"):
        decode_image(b"", name="image_bytes")
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"GIF89a-not-really", name="image_bytes")


def test_a_limit_above_pillows_warning_threshold_is_the_one_that_decides():
    """100 Mpx is over Pillow's warning (89 Mpx): refused by default, but a larger --max-image-pixels lets it through
    the header check (checked here on the header alone: the pixels of a mode-1 PNG are not decoded by `Image.open`)."""
    data = _png((10_000, 10_000), mode="1")
    with pytest.raises(ImageError, match=r"10000x10000 px \(100 Mpx\) is more than the 89 Mpx allowed"):
        decode_image(data)
    with pytest.raises(ImageError, match=r"\(100 Mpx\) is more than the 99 Mpx allowed"):
        decode_image(data, max_pixels=99_000_000)


@pytest.fixture(scope="module")
def explainer():
    return TorchExplainer(ServingConfig(model="efficientnet_lite0", method="gradcam", backend="torch"))


def test_the_server_applies_the_bounds_per_request_and_never_fails_the_batchmates(explainer, lite0, data_dir):
    from fdcam.models import spec_of

    spec = spec_of(lite0)
    good = (data_dir / "n02391049_zebra.JPEG").read_bytes()
    bounds = ImageBounds(max_pixels=300_000, max_bytes=len(good) + 10, max_output_side=128, max_classes=2)

    def request(data, classes=None):
        out = {"image_bytes": np.array([[data]], dtype=object)}
        if classes is not None:
            out["classes"] = np.array([classes], dtype=np.int64)
        return out

    bomb = _png((15_000, 15_000), mode="1")  # 225 Mpx, beyond Pillow's own refusal
    requests = [
        request(good),
        request(bomb),
        request(_png((600, 600))),  # 360000 px
        request(good + b"x" * 20),
        request(good, [1, 2, 3]),
        request(good, [340, 7]),
        {"image_bytes": np.array([[object()]], dtype=object)},  # not bytes at all: an unexpected error, one line
    ]
    results = handle_image_requests(explainer, requests, spec, bounds)
    # beyond Pillow's own refusal, which fires before the header is read: the pixel count comes from Pillow
    bomb_line = "is more than the 300000 px allowed (a possible decompression bomb)"
    assert results[1] == f"refused image_bytes: the image (225 Mpx) {bomb_line}"
    assert results[2] == f"refused image_bytes: 600x600 px (360000 px) {bomb_line}"
    assert "allowed for an encoded image" in results[3]
    assert results[4] == "3 classes in one request is more than the 2 allowed"
    assert isinstance(results[6], str) and "\n" not in results[6]
    image = load_image(data_dir / "n02391049_zebra.JPEG")
    for index in (0, 5):  # a top-1 request and one with classes
        assert isinstance(results[index], dict), results[index]
        # the outputs of fdcam explain: the longer side at max_output_side
        assert results[index]["saliency_original"].shape[2:] == bounds.output_size(image.size)[::-1]
    np.testing.assert_array_equal(results[5]["targets"], [[340, 7]])
    x = preprocess(image, spec)
    expected = explainer.explain(x.numpy(), np.array([[340, 7]], dtype=np.int64))
    assert np.abs(results[5]["saliency"] - expected[2]).max() <= 1e-4  # batched with the other good one: rounding only
