"""fdcam.export: validated masked-tail graphs, metadata, fp16, refusal on mismatch, the CLI and the wheel layout."""

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import fdcam
from fdcam.cli import main
from fdcam.export import FP16_TOLERANCE, ExportError, export_split, export_tail, read_metadata
from fdcam.export.graph import TailForm
from fdcam.split import split_model
from fdcam.tail import MaskedTail

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite0_export(lite0, tmp_path_factory):
    path = tmp_path_factory.mktemp("lite0") / "lite0.onnx"
    return export_tail(lite0, "_blocks.15", path)


@pytest.fixture(scope="module")
def resnet18_split():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    split = split_model(model, "layer4.1.conv2", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    return split, features, extras


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def torch_logits(split, features, masks, extras):
    with torch.no_grad():
        return MaskedTail(split.tail)(features, masks, *extras)  # features [N,...], masks [N,M,K]


def test_graph_has_symbolic_image_and_mask_batches_and_runs_at_several_sizes(lite0, lite0_export):
    proto = onnx.load(str(lite0_export.path))
    inputs = {value.name: dims(value) for value in proto.graph.input}
    images, *shape = inputs["features"]
    assert isinstance(images, str) and shape == [320, 7, 7]
    mask_images, mask_batch, mask_channels = inputs["masks"]
    assert mask_images == images and isinstance(mask_batch, str) and mask_channels == 320
    assert dims(proto.graph.output[0])[:2] == [images, mask_batch] and dims(proto.graph.output[0])[2] == 1000

    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    split = split_model(lite0, "_blocks.15", x[:1])
    with torch.no_grad():
        features, *extras = split.head(x)
    session = ort.InferenceSession(str(lite0_export.path), providers=["CPUExecutionProvider"])
    for n, batch in ((1, 1), (3, 5), (1, 640)):
        masks = (torch.rand(n, batch, 320, generator=torch.Generator().manual_seed(batch)) > 0.3).float()
        (logits,) = session.run(["logits"], {"features": features[:n].numpy(), "masks": masks.numpy()})
        expected = torch_logits(split, features[:n], masks, extras)
        assert logits.shape == (n, batch, 1000)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_metadata_describes_model_layer_shapes_and_versions(lite0_export):
    meta = read_metadata(lite0_export.path)
    assert meta["model"] == "efficientnet_lite0"
    assert meta["target_layer"] == "_blocks.15"
    assert (meta["channels"], meta["height"], meta["width"], meta["num_classes"]) == ("320", "7", "7", "1000")
    assert meta["input_size"] == "224x224"
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert meta["opset"] == "18" and meta["precision"] == "fp32"
    assert meta["torch_version"] == torch.__version__ and meta["onnx_version"] == onnx.__version__
    assert meta["fdcam_version"] == fdcam.__version__
    assert meta["exporter"] in ("dynamo", "torchscript")
    assert meta["tail_form"] == "masked"  # a 1×1 conv follows _blocks.15: nothing to factorise


def test_export_is_one_self_contained_file_and_leaves_no_staging_files(lite0_export):
    assert lite0_export.max_error < 1e-4
    assert sorted(p.name for p in lite0_export.path.parent.iterdir()) == ["lite0.onnx"]


def test_a_tensor_crossing_the_split_becomes_an_extra_input(resnet18_split, tmp_path):
    split, features, extras = resnet18_split
    exported = export_split(split, features, extras, tmp_path / "r18.onnx", check_batches=(3, 17))
    proto = onnx.load(str(exported.path))
    assert [value.name for value in proto.graph.input] == ["features", "masks", "extra_0"]
    assert dims(proto.graph.input[2])[1:] == [512, 7, 7] and isinstance(dims(proto.graph.input[2])[0], str)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    masks = (torch.rand(1, 6, 512, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    (logits,) = session.run(None, {"features": features.numpy(), "masks": masks.numpy(), "extra_0": extras[0].numpy()})
    np.testing.assert_allclose(logits, torch_logits(split, features, masks, extras).numpy(), atol=1e-4, rtol=1e-4)


def test_export_refuses_a_graph_that_does_not_match_and_saves_nothing(resnet18_split, tmp_path, monkeypatch):
    split, features, extras = resnet18_split
    run = ort.InferenceSession.run  # every exported graph's check run comes out 0.5 off the torch tail
    monkeypatch.setattr(
        ort.InferenceSession, "run", lambda self, *args, **kwargs: [out + 0.5 for out in run(self, *args, **kwargs)]
    )
    target = tmp_path / "out" / "bad.onnx"
    with pytest.raises(ExportError, match=r"differs from the torch tail by 0\.5.*nothing was saved") as raised:
        export_split(split, features, extras, target, check_batches=(3, 5))
    assert "\n" not in str(raised.value)
    assert list(target.parent.iterdir()) == []


def test_a_failing_dynamo_export_falls_back_to_torchscript(resnet18_split, tmp_path, monkeypatch):
    split, features, extras = resnet18_split

    def broken(*args):
        raise RuntimeError("simulated torch.export failure")

    export = torch.onnx.export
    monkeypatch.setattr(
        torch.onnx, "export", lambda *args, **kwargs: broken() if kwargs.get("dynamo") else export(*args, **kwargs)
    )
    exported = export_split(split, features, extras, tmp_path / "ts.onnx", check_batches=(3, 9))
    assert exported.exporter == "torchscript"
    assert read_metadata(exported.path)["exporter"] == "torchscript"
    assert all(isinstance(d, str) for d in dims(onnx.load(str(exported.path)).graph.input[1])[:2])


def test_fp16_graph_keeps_fp32_inputs_and_outputs_within_the_documented_tolerance(lite0, tmp_path):
    exported = export_tail(lite0, "_blocks.15", tmp_path / "lite0_fp16.onnx", fp16=True)
    proto = onnx.load(str(exported.path))
    float32 = onnx.TensorProto.FLOAT
    assert all(value.type.tensor_type.elem_type == float32 for value in [*proto.graph.input, *proto.graph.output])
    weights = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > 0.9 * len(weights)
    assert read_metadata(exported.path)["precision"] == "fp16"
    assert 0 < exported.max_error <= FP16_TOLERANCE.allowed(100.0)
    fp32_bytes = sum(4 * math.prod(t.dims) for t in weights)  # the same weights stored as float32
    assert exported.path.stat().st_size < 0.6 * fp32_bytes  # about half the fp32 file


def test_cli_export_writes_the_graph_and_its_json(tmp_path, capsys):
    assert main(["export", "--model", "efficientnet_lite0", "--out", str(tmp_path)]) == 0
    graph_path = tmp_path / "efficientnet_lite0__blocks.15.onnx"
    described = json.loads((tmp_path / "efficientnet_lite0__blocks.15.json").read_text())
    assert graph_path.is_file() and str(graph_path) in capsys.readouterr().out
    assert described["graph"] == graph_path.name and described["target_layer"] == "_blocks.15"
    assert [(t["name"], t["shape"]) for t in described["inputs"]] == [
        ("features", ["images", 320, 7, 7]),
        ("masks", ["images", "masks", 320]),
    ]
    assert described["outputs"][0]["shape"] == ["images", "masks", 1000]
    assert described["masks"]["theta"] == 0.95 and described["masks"]["batch"] == 640
    assert "1 − 1_G(k)" in described["masks"]["rows"]
    assert "exp" in described["weights"]["formula"] and described["weights"]["bias"] == 0.5
    assert described["input_image"]["size_hw"] == [224, 224]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "alexnet"], "unknown model"),
        (["--model", "efficientnet_lite0", "--layer", "_blocks.99"], "no layer named"),
        (["--model", "efficientnet_lite0", "--weights", "/nonexistent/w.pth"], "not found"),
    ],
)
def test_cli_export_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["export", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fdcam: error:") and message in err and "\n" not in err
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.slow
def test_wheel_installs_export_and_runtime_inside_fdcam(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("fdcam", "export", "runtime"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.onnx"))
    wheels = tmp_path / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(source),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("fdcam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fdcam/export/__init__.py" in names and "fdcam/export/command.py" in names
    assert "fdcam/runtime/__init__.py" in names and "fdcam/runtime/session.py" in names
    assert "fdcam/evaluation/__init__.py" in names and "fdcam/evaluation/run.py" in names
    assert "fdcam/factorise/__init__.py" in names and "fdcam/factorise/shortcut.py" in names
    assert not [n for n in names if n.startswith(("export/", "runtime/"))]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_classes_form_takes_int64_classes_and_returns_their_logits(resnet18_split, tmp_path, monkeypatch, exporter):
    from reference import assert_same_up_to_rounding

    split, features, extras = resnet18_split
    if exporter == "torchscript":  # dynamo fails, as in the fallback test above
        export = torch.onnx.export

        def dynamo_fails(*args, **kwargs):
            if kwargs.get("dynamo"):
                raise RuntimeError("simulated torch.export failure")
            return export(*args, **kwargs)

        monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    form = TailForm(classes=True)
    exported = export_split(split, features, extras, tmp_path / "classes.onnx", check_batches=(3, 9), form=form)
    assert exported.exporter == exporter and exported.num_classes == 1000
    meta = read_metadata(exported.path)
    assert (meta["classes_input"], meta["tail_form"]) == ("true", "shortcut")  # the rows of fc only
    proto = onnx.load(str(exported.path))
    inputs = {value.name: value for value in proto.graph.input}
    assert list(inputs) == ["features", "masks", "classes", "extra_0"]
    assert inputs["classes"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    masks = (torch.rand(1, 5, 512, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    classes = torch.tensor([[999, 0, 17]])
    (logits,) = session.run(
        ["logits"],
        {
            "features": features.numpy(),
            "masks": masks.numpy(),
            "classes": classes.numpy(),
            "extra_0": extras[0].numpy(),
        },
    )
    assert logits.shape == (1, 5, 3)
    expected = torch_logits(split, features, masks, extras).gather(2, classes[:, None].expand(-1, 5, -1))
    assert_same_up_to_rounding(logits, expected)
