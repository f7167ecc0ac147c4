"""`fdcam explain` end to end on real images, and every kind of bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fdcam
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
    images = [
        str(data_dir / "not_an_image.jpg"),
        str(data_dir / "missing.jpg"),
        str(data_dir / "tiny.png"),
        str(data_dir / "n02077923_sea_lion.JPEG"),
    ]
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
        (
            ["--method", "gradcam,scorecam", "--backend", "onnxruntime"],
            "--backend applies to methods that run masked tail passes",
        ),
        (["--method", "gradcam", "--precision", "fp16", "--cuda-graph"], "--precision, --cuda-graph applies"),
        (["--provider", "cpu"], "provider='cpu' applies to the onnxruntime backend"),
        (
            ["--backend", "onnxruntime", "--precision", "bf16"],
            "precision must be one of fp32, tf32, fp16 for the onnxruntime backend",
        ),
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
        capture_output=True,
        text=True,
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


# --- what a person sees: warnings, bad options, skips, progress (issue 19, items 7-12) ----------------------

_ONE_PROCESS = """
import sys, torch
from fdcam.cli import main
status = main(sys.argv[1:])
print(f"EXIT {status}", file=sys.stderr, flush=True)
torch.fx._symbolic_trace.is_fx_tracing()  # a user's own call after fdcam's run: torch still warns this user, once
"""


@pytest.fixture(scope="module")
def fresh_process_run(data_dir, tmp_path_factory):
    """stderr of `fdcam explain` at a 1x1 layer (fdcam warns) in a fresh Python, then a user's is_fx_tracing() call."""
    out = tmp_path_factory.mktemp("warnings")
    image = data_dir / "n02391049_zebra.JPEG"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _ONE_PROCESS,
            "explain",
            str(image),
            "--method",
            "gradcam,fdcam",
            "--layer",
            "_avg_pooling",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "EXIT 0" in result.stderr, result.stderr
    return result.stderr


def test_torch_fx_deprecation_warning_is_not_triggered_by_fdcam(fresh_process_run):
    fx_warning = "is_fx_tracing will return true"
    before, after = fresh_process_run.split("EXIT 0")
    assert fx_warning not in before  # fdcam's run, every method's map check included
    assert after.count(fx_warning) == 1  # not swallowed: the user's own first call still gets torch's warning


def test_fdcam_warnings_are_one_line_without_file_or_source(fresh_process_run):
    before = fresh_process_run.split("EXIT 0")[0]
    warned = [line for line in before.splitlines() if line.startswith("fdcam: warning: ")]
    assert len(warned) == 2  # once per explainer (gradcam, fdcam)
    assert all("'_avg_pooling' is 1x1" in line and "maps are blank" in line for line in warned)
    assert ".py:" not in before and "UserWarning" not in before and "self.explain(" not in before


def test_the_library_still_raises_python_warnings(lite0, zebra_input):
    import fdcam

    with pytest.warns(UserWarning, match="is 1x1"):
        fdcam.GradCAM(lite0, target_layer="_avg_pooling")(zebra_input, [[340]])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["explain", "x.jpg", "--max-size", "abc"], "argument --max-size: invalid int value: 'abc'"),
        (["explain", "x.jpg", "--class", "1", "--topk", "2"], "argument --topk: not allowed with argument --class"),
        (["explain"], "the following arguments are required: images"),
        (["explian"], "invalid choice: 'explian'"),
    ],
)
def test_a_bad_option_is_one_line_as_readme_says(capsys, arguments, message):
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and message in err and "usage:" not in err and "--help" in err


def test_docs_describe_bad_options_as_one_line():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8").split())
    assert "a bad option exits with status 2 and one line, never a traceback (argparse's own mistakes too" in readme
    assert "without the usage block" in readme


def test_only_bad_images_print_no_table_and_say_nothing_was_written(tmp_path, data_dir, capsys):
    tiny, not_image = data_dir / "tiny.png", data_dir / "not_an_image.jpg"
    assert main(["explain", str(tiny), str(not_image), "--method", "gradcam", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no table header without rows
    skipped = [line for line in captured.err.splitlines() if line.startswith("fdcam: skipped: ")]
    assert len(skipped) == 2
    assert str(tiny) in skipped[0] and "8x8" in skipped[0]  # preprocess's message alone does not name the file
    assert skipped[1].count(str(not_image)) == 1  # load_image's names it already: not twice
    assert "nothing written: 2 problem(s) with 2 image(s)" in captured.err
    assert "the others were written" not in captured.err


def test_the_progress_bar_counts_an_image_once_its_files_are_written(tmp_path, data_dir, monkeypatch):
    from fdcam import explain_command

    seen = []

    class Bar:
        write = staticmethod(lambda text, file=None: None)

        def __init__(self, total, **_):
            self.count = 0

        def update(self, n):
            self.count += n
            seen.append((self.count, len(list(tmp_path.glob("*.npy")))))

        def close(self):
            self.closed = True

    monkeypatch.setattr(explain_command, "tqdm", Bar)
    images = [str(data_dir / name) for name in ("n02391049_zebra.JPEG", "tiny.png", "n02077923_sea_lion.JPEG")]
    assert main(["explain", *images, "--method", "gradcam", "--topk", "2", "--out", str(tmp_path)]) == 1
    assert seen == [(1, 2), (2, 2), (3, 4)]  # each count after that image's 2 maps (or its skip)


def test_missing_imagenet_weights_name_the_weights_flag(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    status = main(["explain", str(data_dir / "tiny.png"), "--model", "vgg16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "no ImageNet weights for vgg16" in err and "--weights PATH" in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--out", "FILE"], "is a file, not a directory"),
        (["--out", "DIR", "--input-size", "16x16"], "--input-size 16x16 is too small for efficientnet_lite0"),
        (["--out", "DIR", "--input-size", "0x224"], "--input-size must be two positive numbers"),
    ],
)
def test_export_refuses_a_file_as_out_and_a_too_small_input_size_in_one_line(tmp_path, capsys, arguments, message):
    (tmp_path / "FILE").write_text("not a directory")
    arguments = [str(tmp_path / a) if a in ("FILE", "DIR") else a for a in arguments]
    status = main(["export", "--explainer", "--model", "efficientnet_lite0", "--method", "gradcam", *arguments])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("explainer.onnx"))


# ---------------------------------------------------------------------------------------------
# hostile files, NaN weights, clashing names, output locations, version and imports


def test_explain_skips_a_bomb_and_a_directory_and_writes_the_good_image(bomb, tmp_path, data_dir, capsys):
    good = data_dir / "gray.png"
    status = main(
        ["explain", str(bomb), str(tmp_path), str(good), "--method", "gradcam", "--out", str(tmp_path / "out")]
    )
    assert status == 1
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipped:" in line]
    assert len(skipped) == 2 and all(line.startswith("fdcam: skipped:") for line in skipped)
    assert "decompression bomb" in skipped[0] and "is a directory" in skipped[1]
    assert "Traceback" not in err
    assert len(list((tmp_path / "out").glob("gray_gradcam_*.npy"))) == 1


def test_nan_weights_are_an_error_in_the_cli(tmp_path, data_dir, capsys):
    model = fdcam.models.load("efficientnet_lite0")
    state = model.state_dict()
    state["_fc.weight"] = torch.full_like(state["_fc.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    status = main(
        ["explain", str(data_dir / "gray.png"), "--weights", str(tmp_path / "nan.pth"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert status == 1 and "NaN or infinite" in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.npy"))


def test_explain_writes_one_file_per_input_for_clashing_names(tmp_path, data_dir, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes((data_dir / "gray.png").read_bytes())
    Image.open(data_dir / "gray.png").save(tmp_path / "a" / "x.webp")
    inputs = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "x.webp"]
    out = tmp_path / "out"
    assert main(["explain", *map(str, inputs), "--method", "gradcam", "--class", "1", "--out", str(out)]) == 0
    assert len(list(out.glob("*.npy"))) == 3 and len(list(out.glob("*.png"))) == 3
    table = capsys.readouterr().out.splitlines()[1:]
    assert len({line.split()[-1] for line in table}) == 3


def test_unusable_output_locations_are_found_before_computing(tmp_path, data_dir, capsys, monkeypatch):
    from fdcam import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    image = str(data_dir / "gray.png")
    cases = [
        (["explain", image, "--out", str(a_file)], "is a file, not a directory"),
        (["explain", image, "--out", str(a_file / "sub")], "not writable"),
        (["evaluate", "--images", str(data_dir), "--out", str(a_file / "r.json")], "is a file, not a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_version_and_python_dash_m():
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    result = subprocess.run([sys.executable, "-m", "fdcam", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"fdcam {fdcam.__version__}"


def test_an_import_error_in_a_subcommand_is_not_swallowed(monkeypatch):
    monkeypatch.delattr(fdcam, "evaluate_command", raising=False)
    monkeypatch.setitem(sys.modules, "fdcam.evaluate_command", None)  # importing it raises ImportError
    with pytest.raises(ImportError):
        main(["explain", "--help"])
