"""examples/explain.js from a fresh copy of examples/: `npm install` as docs/onnx-export.md says, then photos explained
in Node.js (decoded, resized and normalised there) against fdcam's own preprocessing, graph and overlays in Python."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import fdcam
from fdcam import models
from fdcam.cli import main
from fdcam.export import export_explainer, run_explainer
from fdcam.export.agreement import agreement
from fdcam.images import load_image, preprocess
from nets import TinySegmentation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLASSES = [340, 243]  # zebra, bull mastiff: the same two for every photo

# A PNG is decoded bit for bit by pngjs and Pillow, and explain.js resizes with Pillow's fixed-point bilinear filter
# and normalises in float32 as torch does, so its input equals Python's and its maps are the graph's own maps.
# The graph is validated to 1e-4 of the library; the overlays then differ only where float32 (torch) and float64
# (JavaScript) rounding of the map's bilinear resize, the JET colormap and the blend land on opposite sides of
# a half level: at most 1 level, in a few pixels. (JET's steepest slope is 4.5/unit, blended at 0.5: a 1e-4
# map difference moves a channel by 0.06 level.)
SALIENCY_ATOL = 1e-4
OVERLAY_MAX_LEVELS = 1
OVERLAY_DIFFERENT_FRACTION = 0.01
# A JPEG is decoded by jpeg-js, not libjpeg-turbo: other IDCT rounding and chroma upsampling move pixels by a few
# levels, so the inputs differ and only the explanation's shape can be compared (measured on the zebra: top-class
# map correlation 0.9998, overlay mean |Δ| 1.5 levels).
JPEG_MAP_CORRELATION = 0.999
JPEG_OVERLAY_MEAN_LEVELS = 3.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> tuple[str, object]:
    """A copy of examples/'s tracked files in a fresh folder, installed with a plain `npm install` (the docs' words)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the JavaScript example test"
    folder = tmp_path_factory.mktemp("examples")
    for name in ("package.json", "package-lock.json", ".npmrc", "explain.js"):
        shutil.copy2(EXAMPLES / name, folder / name)
    switches = ("onnxruntime_node", "npm_config_onnxruntime")  # the switch must come from the files, not from here
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(switches)}
    result = subprocess.run([npm, "install"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (folder / "node_modules" / "onnxruntime-node").is_dir() and "nuget" not in result.stderr.lower()
    return node, folder


@pytest.fixture(scope="module")
def photos(data_dir, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("photos")
    zebra = Image.open(data_dir / "n02391049_zebra.JPEG").convert("RGB")
    zebra.resize((700, 525), Image.Resampling.BICUBIC).save(folder / "zebra_large.png")  # shrunk 3.1× by the example
    return {
        "large": str(folder / "zebra_large.png"),
        "rgba": str(data_dir / "rgba.png"),  # enlarged, transparent pixels on black
        "jpeg": str(data_dir / "n02391049_zebra.JPEG"),
    }


def run_node(installed_example, graph_path, inputs, out_prefix) -> None:
    node, folder = installed_example
    classes = ",".join(map(str, CLASSES))
    command = [node, str(folder / "explain.js"), str(graph_path), *inputs, str(out_prefix), "--classes", classes]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def node_run(installed_example, lite0_fdcam_classes, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("node") / "not" / "yet" / "there" / "maps"  # the example creates the folders
    run_node(installed_example, lite0_fdcam_classes, list(photos.values()), out)
    return out


@pytest.fixture(scope="module")
def python_overlays(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("python")
    status = main(["explain", *photos.values(), "--method", "fdcam", "--class", *map(str, CLASSES), "--out", str(out)])
    assert status == 0
    return out


def levels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_npm_install_as_readme_says_skips_the_download_and_ships_the_cpu_binding(installed_example):
    node, folder = installed_example
    loads = "require('onnxruntime-node'); require('jpeg-js'); require('pngjs')"
    result = subprocess.run([node, "-e", loads], cwd=folder, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    readme = (EXAMPLES.parent / "docs" / "onnx-export.md").read_text(encoding="utf-8")
    assert "cd examples && npm install`" in readme and "--ignore-scripts" not in readme


def test_photos_decoded_in_node_give_the_graphs_maps(node_run, lite0_fdcam_classes, photos):
    spec = models.spec("efficientnet_lite0")
    lossless = [photos["large"], photos["rgba"]]
    x = torch.cat([preprocess(load_image(path), spec) for path in lossless]).numpy()
    classes = np.array([CLASSES] * len(lossless), dtype=np.int64)
    _, targets, expected = ort.InferenceSession(str(lite0_fdcam_classes)).run(None, {"image": x, "classes": classes})
    from_node = np.fromfile(f"{node_run}.saliency.f32", dtype="<f4").reshape(3, len(CLASSES), 224, 224)
    assert np.abs(from_node[:2] - expected).max() <= SALIENCY_ATOL
    summary = json.loads(node_run.with_suffix(".json").read_text())
    assert [image["targets"] for image in summary["images"]] == [CLASSES] * 3
    assert summary["images"][0]["top1"] == 340


@pytest.mark.parametrize("index, name", [(0, "large"), (1, "rgba")])
def test_png_overlays_equal_pythons_within_a_level(node_run, python_overlays, photos, index, name):
    stem = os.path.splitext(os.path.basename(photos[name]))[0]
    for j, class_index in enumerate(CLASSES):
        from_python = levels(python_overlays / f"{stem}_fdcam_{class_index}.png")
        from_node = levels(f"{node_run}.{index}.{j}.png")
        assert from_node.shape == from_python.shape == (*Image.open(photos[name]).size[::-1], 3)
        difference = np.abs(from_node - from_python)
        assert difference.max() <= OVERLAY_MAX_LEVELS
        assert (difference > 0).mean() <= OVERLAY_DIFFERENT_FRACTION


def test_a_jpeg_decoded_by_jpeg_js_explains_like_pillows(node_run, python_overlays, lite0_fdcam_classes, photos):
    from_node = np.fromfile(f"{node_run}.saliency.f32", dtype="<f4").reshape(3, len(CLASSES), 224, 224)[2, 0]
    x = preprocess(load_image(photos["jpeg"]), models.spec("efficientnet_lite0")).numpy()
    _, _, expected = ort.InferenceSession(str(lite0_fdcam_classes)).run(
        None, {"image": x, "classes": np.array([CLASSES[:1]])}
    )
    assert np.corrcoef(from_node.ravel(), expected[0, 0].ravel())[0, 1] >= JPEG_MAP_CORRELATION
    stem = os.path.splitext(os.path.basename(photos["jpeg"]))[0]
    from_python = levels(python_overlays / f"{stem}_fdcam_{CLASSES[0]}.png")
    overlay = levels(f"{node_run}.2.0.png")
    assert overlay.shape == from_python.shape
    assert np.abs(overlay - from_python).mean() <= JPEG_OVERLAY_MEAN_LEVELS


def test_typed_explainer_json_is_read_too(installed_example, lite0_fdcam_classes, photos, node_run, tmp_path):
    typed = tmp_path / "explainer.onnx"
    shutil.copy2(lite0_fdcam_classes, typed)
    description = json.loads(lite0_fdcam_classes.with_suffix(".json").read_text())
    description.update(classes_input=True, num_classes=1000, input_size=[224, 224])  # booleans and numbers, not text
    typed.with_suffix(".json").write_text(json.dumps(description))
    run_node(installed_example, typed, [photos["rgba"]], tmp_path / "typed")
    again = np.fromfile(tmp_path / "typed.saliency.f32", dtype="<f4")
    first = np.fromfile(f"{node_run}.saliency.f32", dtype="<f4").reshape(3, -1)[1]
    assert np.array_equal(again, first)


def test_a_refused_image_is_reported_in_one_line_and_the_others_are_written(
    installed_example, lite0_fdcam_classes, tmp_path
):
    """The graph answers a NaN image with NaN maps (as the library refuses it): Node names it, writes the rest,
    exits 1."""
    node, folder = installed_example
    images = torch.randn(2, 3, 224, 224)
    images[1, 0, 10, 10] = float("nan")
    inputs = tmp_path / "images.f32"
    images.numpy().astype("<f4").tofile(inputs)
    out = tmp_path / "out" / "maps"
    command = [node, str(folder / "explain.js"), str(lite0_fdcam_classes), str(inputs), str(out), "--classes", "340"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("explain.js: refused: ")]
    assert refusals == ["explain.js: refused: image 1, class 340: non-finite input or class out of range"]
    assert (tmp_path / "out" / "maps.0.0.pgm").is_file() and not (tmp_path / "out" / "maps.1.0.pgm").exists()
    assert json.loads((tmp_path / "out" / "maps.json").read_text())["images"][1]["refused"] == [0]


# --- a region graph (a segmentation model explained for a class over a region) -----------------------------------


REGION_SIZE = 32


@pytest.fixture(scope="module")
def region_graph(tmp_path_factory):
    torch.manual_seed(3)
    model = TinySegmentation().eval()
    path = tmp_path_factory.mktemp("region") / "explainer.onnx"
    export_explainer(model, path, "features.1", "fdcam", target="region", input_size=(REGION_SIZE, REGION_SIZE))
    return model, path


def test_a_region_graph_runs_in_node_like_python(installed_example, region_graph, tmp_path):
    node, folder = installed_example
    model, graph_path = region_graph
    images = torch.randn(2, 3, REGION_SIZE, REGION_SIZE, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[1, 3], [1, 3]])  # --classes gives every image the same classes
    regions = torch.zeros(2, 2, REGION_SIZE, REGION_SIZE)
    regions[0, 0, 4:20, 8:24] = 1.0
    regions[0, 1] = torch.linspace(0, 1, REGION_SIZE)[None, :]  # a float mask weighs each pixel
    regions[1, 0, 16:, :] = 1.0
    regions[1, 1, 10:12, 10:30] = 1.0
    (tmp_path / "images.f32").write_bytes(images.numpy().astype("<f4").tobytes())

    def run(regions: torch.Tensor, out: str) -> subprocess.CompletedProcess:
        (tmp_path / f"{out}.f32").write_bytes(regions.numpy().astype("<f4").tobytes())
        command = [
            node,
            str(folder / "explain.js"),
            str(graph_path),
            str(tmp_path / "images.f32"),
            str(tmp_path / out),
            "--classes",
            "1,3",
            "--region",
            str(tmp_path / f"{out}.f32"),
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    result = run(regions, "maps")
    assert result.returncode == 0, result.stderr
    from_node = np.fromfile(tmp_path / "maps.saliency.f32", dtype="<f4").reshape(2, 2, REGION_SIZE, REGION_SIZE)
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    _, _, from_python = run_explainer(session, images.numpy(), classes.numpy(), regions.numpy())
    assert np.abs(from_node - from_python).max() <= SALIENCY_ATOL
    targets = [
        [fdcam.targets.RegionLogit(int(c), mask) for c, mask in zip(row, masks)]
        for row, masks in zip(classes.tolist(), regions)
    ]
    expected = fdcam.FDCAM(model, "features.1")(images, targets)
    assert agreement(model, "features.1", "fdcam", {}, images, targets, from_node, expected).passed
    summary = json.loads((tmp_path / "maps.json").read_text())
    assert [image["targets"] for image in summary["images"]] == [[1, 3], [1, 3]]
    with torch.no_grad():  # a region graph's logits: the output map's pixel means
        assert [image["top1"] for image in summary["images"]] == model(images)["out"].mean((-2, -1)).argmax(1).tolist()

    regions[1, 0, 0, 0] = float("nan")  # refused in one line; the other maps are written
    result = run(regions, "refused")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "refused: image 1, class 1" in result.stderr
    assert [image.get("refused") for image in json.loads((tmp_path / "refused.json").read_text())["images"]] == [
        None,
        [0],
    ]
    assert (tmp_path / "refused.1.1.pgm").is_file() and not (tmp_path / "refused.1.0.pgm").exists()
