"""fdcam.export.region: the explainer graph of a segmentation model explaining a class over a region (target="region"),
checked against the library's RegionLogit targets through plain ONNX Runtime."""

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fdcam
from fdcam.export import ExportError, export_explainer, read_metadata, run_explainer
from fdcam.export.agreement import agreement
from fdcam.export.explainer import describe_explainer
from fdcam.targets import ClassLogit, RegionLogit

# Small, to keep the exports and the float64 references quick (32 px: a 2×2 map at backbone.16, 4×4 at the skip); the
# graph's H,W (and the region's) are fixed at export. Every region below is a fraction of SIZE.
SIZE = 32
LAYER = "backbone.16"
LOGITS_RTOL = 1e-4


def calibrated_lraspp() -> nn.Module:
    """The zoo's LR-ASPP (21 classes) with random weights and batch-norm statistics of random images: with
    torchvision's initial statistics MobileNetV3's last stage outputs ~1e-9, where every score is rounding noise."""
    torch.manual_seed(5)
    model = fdcam.models.load("lraspp_mobilenet_v3_large", weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # one pass sets the statistics of its batch
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)))
    return model.eval()


@pytest.fixture(scope="module")
def lraspp() -> nn.Module:
    return calibrated_lraspp()


@pytest.fixture(scope="module")
def lraspp_cli_export(lraspp, tmp_path_factory) -> SimpleNamespace:
    """`fdcam export --explainer --target region` of `lraspp`'s weights (FD-CAM, the default layer) with a Triton
    repository, run once for the module: its exit code, what it printed, the output folder and the repository."""
    from fdcam.cli import main

    folder = tmp_path_factory.mktemp("region")
    weights, out, repo = folder / "lraspp.pt", folder / "out", folder / "repo"
    torch.save(lraspp.state_dict(), weights)
    arguments = ["export", "--explainer", "--target", "region", "--model", "lraspp_mobilenet_v3_large"]
    arguments += ["--weights", str(weights), "--method", "fdcam", "--input-size", f"{SIZE}x{SIZE}"]
    arguments += ["--out", str(out), "--triton", str(repo), "--max-batch", "4"]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(arguments)
    return SimpleNamespace(code=code, printed=printed.getvalue(), errors=errors.getvalue(), out=out, repo=repo)


@pytest.fixture(scope="module")
def lraspp_fdcam(lraspp_cli_export) -> Path:
    """The region graph the command line exported (the same export_explainer call the library makes)."""
    assert lraspp_cli_export.code == 0, lraspp_cli_export.errors
    return lraspp_cli_export.out / "explainer.onnx"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Unseen by the export's validation: noise with a smooth bright patch."""
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(21))
    x[1, :, 5:20, 10:30] += 2.0
    return x


def rectangle(top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE)
    mask[top : top + height, left : left + width] = 1.0
    return mask


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def assert_like_library(model, method, images, classes, regions, got, library_targets=None, **options):
    """The graph's maps are the library's for RegionLogit(classes[n,t], regions[n,t]) under the export's rule
    (1e-4, or the conditioning rule of export/agreement.py)."""
    targets = library_targets or [
        [RegionLogit(int(c), m) for c, m in zip(row, masks)] for row, masks in zip(classes.tolist(), regions)
    ]
    expected = fdcam.METHODS[method](model, LAYER, **options)(images, targets)
    assert got.shape == tuple(expected.shape)
    judged = agreement(model, LAYER, method, options, images, targets, got, expected)
    assert judged.passed, judged


@pytest.mark.slow
def test_region_graph_io_metadata_and_json(lraspp_fdcam):
    proto = onnx.load(str(lraspp_fdcam))
    inputs = {value.name: value for value in proto.graph.input}
    assert list(inputs) == ["image", "classes", "region"]
    n, t = dims(inputs["classes"])
    assert dims(inputs["image"]) == [n, 3, SIZE, SIZE] and dims(inputs["region"]) == [n, t, SIZE, SIZE]
    assert inputs["region"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    outputs = {value.name: value for value in proto.graph.output}
    assert list(outputs) == ["logits", "targets", "saliency"]
    assert dims(outputs["logits"]) == [n, 21] and dims(outputs["saliency"]) == [n, t, SIZE, SIZE]
    meta = read_metadata(lraspp_fdcam)
    assert meta["target"] == "region" and meta["region_size"] == f"{SIZE}x{SIZE}" and meta["output"] == "out"
    assert meta["inputs"] == "image,classes,region" and meta["classes_input"] == "true"
    assert meta["model"] == "lraspp_mobilenet_v3_large" and meta["num_classes"] == "21"
    described = json.loads(lraspp_fdcam.with_suffix(".json").read_text())
    assert described == describe_explainer(meta) | {
        "validation": described["validation"]
    }  # measured after the graph was written
    assert described["inputs"][2] == {"name": "region", "dtype": "float32", "shape": ["N", "T", SIZE, SIZE]}
    assert described["outputs"][0]["shape"] == ["N", 21] and described["target"] == "region"
    assert (
        described["validation"]["saliency_max_abs_diff"] <= 1e-4
        or described["validation"]["graph_vs_float64_library"] is not None
    )


@pytest.mark.slow
def test_region_graph_equals_the_library_on_unseen_images_and_regions(lraspp, lraspp_fdcam, images):
    soft = torch.linspace(0, 1, SIZE)[:, None] * torch.linspace(1, 0, SIZE)[None, :]  # a float mask weighs each pixel
    classes = torch.tensor([[3, 15], [0, 7], [20, 3]])
    regions = torch.stack(
        [
            torch.stack([rectangle(2, 2, 10, 15), soft]),
            torch.stack([rectangle(5, 10, 12, 15), rectangle(0, 0, SIZE, SIZE)]),
            torch.stack([soft, rectangle(20, 15, 1, 1)]),  # one pixel
        ]
    )
    logits, targets, saliency = run_explainer(session(lraspp_fdcam), images.numpy(), classes.numpy(), regions.numpy())
    np.testing.assert_array_equal(targets, classes.numpy())
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    with torch.no_grad():
        pooled = lraspp(images)["out"].mean((-2, -1))  # what `logits` means for a region graph
    assert np.abs(logits - pooled.numpy()).max() <= LOGITS_RTOL * float(pooled.abs().max())
    assert_like_library(lraspp, "fdcam", images, classes, regions, saliency)


@pytest.mark.slow
def test_a_mixed_batch_equals_the_images_explained_one_by_one(lraspp, lraspp_fdcam, images):
    # Image 0: class 3 over the whole map (ClassLogit of a segmentation output), image 1: a region of class 5.
    images = images[:2]
    classes = torch.tensor([[3], [5]])
    regions = torch.stack([torch.ones(1, SIZE, SIZE), rectangle(7, 5, 10, 12)[None]])
    _, _, saliency = run_explainer(session(lraspp_fdcam), images.numpy(), classes.numpy(), regions.numpy())
    _, _, first = run_explainer(session(lraspp_fdcam), images[:1].numpy(), classes[:1].numpy(), regions[:1].numpy())
    _, _, second = run_explainer(session(lraspp_fdcam), images[1:].numpy(), classes[1:].numpy(), regions[1:].numpy())
    assert np.abs(saliency - np.concatenate([first, second])).max() <= 1e-4
    mixed = [[ClassLogit(3)], [RegionLogit(5, regions[1, 0])]]
    assert_like_library(lraspp, "fdcam", images, classes, regions, saliency, library_targets=mixed)


@pytest.mark.slow
def test_bad_rows_get_nan_maps_and_a_region_of_another_size_is_refused(lraspp_fdcam, images):
    explainer = session(lraspp_fdcam)
    classes = np.array([[3, 5], [3, 21], [3, 5]])  # 21: outside the model's 21 classes
    regions = np.stack([np.stack([rectangle(2, 2, 10, 10).numpy()] * 2)] * 3)
    regions[0, 1, 5, 5] = np.nan
    bad_images = images.numpy().copy()
    bad_images[2, 0, 0, 0] = np.inf
    logits, _, saliency = run_explainer(explainer, bad_images, classes, regions)
    refused = np.isnan(saliency).reshape(3, 2, -1).all(-1)
    assert refused.tolist() == [[False, True], [False, True], [True, True]]
    assert np.isnan(logits[2]).all() and np.isfinite(logits[:2]).all()
    # The good rows are explained as if alone.
    _, _, alone = run_explainer(explainer, images[:1].numpy(), classes[:1, :1], regions[:1, :1])
    assert np.abs(saliency[0, 0] - alone[0, 0]).max() <= 1e-4
    with pytest.raises(Exception, match="region"):  # h,w are fixed in the graph: ONNX Runtime names the input
        run_explainer(explainer, images[:1].numpy(), classes[:1], regions[:1, :, : SIZE // 2])


def test_a_classifier_with_target_region_is_refused_in_one_line(tmp_path):
    from nets import Residual

    with pytest.raises(ExportError, match="segmentation output") as caught:
        export_explainer(
            Residual().eval(), tmp_path / "e.onnx", "conv1", "gradcam", target="region", input_size=(16, 16)
        )
    assert "\n" not in str(caught.value)
    with pytest.raises(ExportError, match="unknown target"):
        export_explainer(
            Residual().eval(), tmp_path / "e.onnx", "conv1", "gradcam", target="pixels", input_size=(16, 16)
        )
    assert not (tmp_path / "e.onnx").exists()


def test_a_segmentation_model_needs_target_region(tmp_path):
    model = fdcam.models.load("lraspp_mobilenet_v3_large", weights=None)
    with pytest.raises(ExportError, match="target='region'"):
        export_explainer(model, tmp_path / "e.onnx", method="gradcam", input_size=(64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "ablationcam"])
def test_every_other_exportable_method_honours_the_region(method, tmp_path):
    from nets import TinySegmentation

    torch.manual_seed(3)
    model = TinySegmentation().eval()
    path = export_explainer(model, tmp_path / "e.onnx", "features.1", method, target="region", input_size=(32, 32))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    classes = torch.tensor([[0, 2], [3, 1]])
    regions = torch.zeros(2, 2, 32, 32)
    regions[0, 0, 4:20, 8:24] = regions[1, 1, 16:, :] = 1.0
    regions[0, 1] = regions[1, 0] = torch.linspace(0, 1, 32)[:, None]
    _, _, saliency = run_explainer(session(path), images.numpy(), classes.numpy(), regions.numpy())
    targets = [[RegionLogit(int(c), m) for c, m in zip(row, masks)] for row, masks in zip(classes.tolist(), regions)]
    expected = fdcam.METHODS[method](model, "features.1")(images, targets)
    assert agreement(model, "features.1", method, {}, images, targets, saliency, expected).passed


# --- the command line and Triton --------------------------------------------------------------------


@pytest.mark.slow
def test_cli_exports_a_region_graph_and_a_triton_repository_listing_the_region_input(
    lraspp, lraspp_cli_export, lraspp_fdcam, images
):
    from tritonclient.grpc import model_config_pb2

    from test_explainer import parse_triton_config

    out, repo = lraspp_cli_export.out, lraspp_cli_export.repo
    assert "explainer.onnx" in lraspp_cli_export.printed
    assert json.loads((out / "explainer.json").read_text())["target"] == "region"
    config = parse_triton_config((repo / "fdcam_lraspp_mobilenet_v3_large_fdcam" / "config.pbtxt").read_text())
    listed = [(i.name, i.data_type, list(i.dims)) for i in config.input]
    assert listed == [
        ("image", model_config_pb2.TYPE_FP32, [3, SIZE, SIZE]),
        ("classes", model_config_pb2.TYPE_INT64, [-1]),
        ("region", model_config_pb2.TYPE_FP32, [-1, SIZE, SIZE]),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("logits", [21]),
        ("targets", [-1]),
        ("saliency", [-1, SIZE, SIZE]),
    ]
    assert config.parameters["fdcam_target"].string_value == "region"
    classes = torch.tensor([[3, 9], [12, 0]])
    regions = torch.stack([torch.stack([rectangle(0, 0, 16, 16), rectangle(8, 8, 16, 16)])] * 2)
    _, _, saliency = run_explainer(session(lraspp_fdcam), images[:2].numpy(), classes.numpy(), regions.numpy())
    assert_like_library(lraspp, "fdcam", images[:2], classes, regions, saliency)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--explainer", "--model", "efficientnet_lite0", "--target", "region"],
            "--target region explains a segmentation model",
        ),
        (
            ["--explainer", "--model", "lraspp_mobilenet_v3_large", "--weights", "random"],
            "export it with --target region",
        ),
        (["--model", "lraspp_mobilenet_v3_large", "--target", "region"], "--target applies to --explainer"),
    ],
)
def test_cli_refuses_misuse_of_target_in_one_line(tmp_path, capsys, arguments, message):
    from fdcam.cli import main

    code = main(["export", *arguments, "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
    assert not (tmp_path / "o" / "explainer.onnx").exists()
