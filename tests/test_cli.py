"""`fdcam explain` end to end on real images, and every kind of bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fdcam.cli import main


def test_explain_writes_overlays_and_maps_at_original_size(tmp_path, data_dir, capsys):
    image = data_dir / "n02391049_zebra.JPEG"
    status = main(["explain", str(image), "--method", "gradcam,fdcam", "--topk", "2", "--out", str(tmp_path)])
    assert status == 0
    width, height = Image.open(image).size
    table = capsys.readouterr().out
    assert "zebra" in table and "340" in table
    for method in ("gradcam", "fdcam"):
        saliency = np.load(tmp_path / f"n02391049_zebra_{method}_340.npy")
        assert saliency.shape == (height, width) and saliency.dtype == np.float32
        assert 0 <= saliency.min() and saliency.max() <= 1 and saliency.max() > 0.99
        overlay = Image.open(tmp_path / f"n02391049_zebra_{method}_340.png")
        assert overlay.size == (width, height) and overlay.mode == "RGB"
    assert len(list(tmp_path.glob("*.png"))) == 4  # 2 methods × 2 classes


def test_converted_image_modes_are_explained(tmp_path, data_dir):
    images = [str(data_dir / name) for name in ("gray.png", "rgba.png", "gray16.png")]
    assert main(["explain", *images, "--method", "gradcam", "--class", "1", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*_gradcam_1.npy"))) == 3


def test_one_bad_image_does_not_stop_the_others(tmp_path, data_dir, capsys):
    images = [str(data_dir / "not_an_image.jpg"), str(data_dir / "missing.jpg"), str(data_dir / "tiny.png"), str(data_dir / "n02077923_sea_lion.JPEG")]
    status = main(["explain", *images, "--method", "gradcam", "--out", str(tmp_path)])
    assert status == 1
    err = capsys.readouterr().err
    assert "not an image" in err and "not found" in err and "8x8" in err
    assert list(tmp_path.glob("n02077923_sea_lion_gradcam_*.npy"))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "alexnet"], "unknown model"),
        (["--layer", "_blocks.99"], "no layer named '_blocks.99'"),
        (["--layer", "_fc"], "2-D tensor"),
        (["--class", "1000"], "out of range"),
        (["--method", "magiccam"], "unknown method"),
        (["--model", "vgg16", "--weights", "WEIGHTS"], "does not fit"),
        (["--device", "cuda"], "cuda"),
        (["--method", "gradcam,scorecam", "--backend", "onnxruntime"], "--backend applies to methods that run masked tail passes"),
        (["--method", "gradcam", "--precision", "fp16", "--cuda-graph"], "--precision, --cuda-graph applies"),
        (["--provider", "cpu"], "provider='cpu' applies to the onnxruntime backend"),
        (["--backend", "onnxruntime", "--precision", "bf16"], "precision must be one of fp32, tf32, fp16 for the onnxruntime backend"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tmp_path, data_dir, capsys, arguments, message):
    if "WEIGHTS" in arguments:
        bad = tmp_path / "lite.pth"
        torch.save({"weight": torch.zeros(3)}, bad)
        arguments = [str(bad) if a == "WEIGHTS" else a for a in arguments]
    if "cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status = main(["explain", str(data_dir / "n02077923_sea_lion.JPEG"), *arguments, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert message.lower() in err.lower()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fdcam.cli", "explain", str(tmp_path / "nope.jpg"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "not found" in result.stderr


def test_layers_lists_targets_with_shapes_and_marks_the_default(capsys):
    assert main(["layers", "--model", "efficientnet_lite0"]) == 0
    rows = {line[2:].split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:2] in ("  ", "* ")}
    assert rows["_blocks.15"].startswith("* ") and "320x7x7" in rows["_blocks.15"]
    assert rows["_swish_1"].split()[1:] == ["1280x7x7", "call_module", "ReLU6"]
    assert rows["_swish"].split()[1] == "32x112x112"


def test_layers_of_an_unknown_model_is_one_line(capsys):
    assert main(["layers", "--model", "alexnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model" in err and len(err.splitlines()) == 1
