"""Tests for fdcam.evaluation and `fdcam evaluate`: results, resume, pointing game, plots, errors."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from fdcam import cli
from fdcam.cli import main
from fdcam.composites import LabelsError, read_labels
from fdcam.evaluation import ResultStore, insertion_deletion, method_specs, write_json_atomic

DATA = Path(__file__).parent / "data"
JPEGS = sorted(p.name for p in DATA.glob("*.JPEG"))
FAST_STEP = str(224 * 56)  # 4 insertion/deletion steps instead of 28: same code paths, 7x fewer forwards
REAL_INSERTION_DELETION = insertion_deletion.insertion_deletion_batch


@pytest.fixture()
def image_dir(tmp_path):
    """The JPEGs of tests/data with their labels.csv, alone in a folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in [*JPEGS, "labels.csv"]:
        shutil.copy(DATA / name, folder / name)
    return folder


def _evaluate(*argv):
    return cli.main(["evaluate", "--quiet", *map(str, argv)])


def _counting(monkeypatch):
    """Count the images that go through insertion_deletion_batch."""
    seen = []

    def counting(model, x, *args, **kwargs):
        seen.append(x.shape[0])
        return REAL_INSERTION_DELETION(model, x, *args, **kwargs)

    monkeypatch.setattr(insertion_deletion, "insertion_deletion_batch", counting)
    return seen


# ---------------------------------------------------------------------------------------- library


def test_method_specs_labels_options_and_variants():
    specs = method_specs("gradcam, fdcam", {"bias": None}, ["no-group-off", "full", "exp-nobias"])
    assert [s.label for s in specs] == ["gradcam", "fdcam", "fdcam[switch=off,grouping=False]", "fdcam[bias=0.0]"]
    assert dict(specs[2].options)["switch"] == "off" and dict(specs[2].options)["grouping"] is False
    assert specs[2].variant == "no-group-off"
    assert [s.label for s in method_specs("fdcam", {"bias": 0.25, "switch": "off"})] == ["fdcam[bias=0.25,switch=off]"]
    assert len(method_specs("all")) == 8
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_specs("gradcam,nope")
    with pytest.raises(ValueError, match="unknown FD-CAM variant"):
        method_specs("gradcam", variants=["sideways"])


def test_result_store_skips_torn_lines_and_other_configs(tmp_path):
    path = tmp_path / "r.partial.jsonl"
    store = ResultStore(path, {"a": 1})
    store.add([{"item": "x.jpg", "method": "gradcam", "insertion": 0.5}])
    ResultStore(path, {"a": 2}).add([{"item": "y.jpg", "method": "gradcam", "insertion": 0.1}])
    with open(path, "a") as handle:
        handle.write('{"config": "' + store.key + '", "item": "z.jp')  # an interrupted write
    reopened = ResultStore(path, {"a": 1})
    assert set(reopened.records) == {("x.jpg", "gradcam")}
    reopened.add([{"item": "w.jpg", "method": "gradcam", "insertion": 0.2}])
    assert set(ResultStore(path, {"a": 1}).records) == {("x.jpg", "gradcam"), ("w.jpg", "gradcam")}
    assert ResultStore(path, {"a": 1}, resume=False).records == {}


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"v": 1})
    write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


# ---------------------------------------------------------------------------------------- CLI


def test_cli_insertion_deletion_json_table_and_plots(image_dir, tmp_path, capsys):
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    code = _evaluate(
        "--images",
        image_dir,
        "--methods",
        "gradcam,fdcam",
        "--limit",
        2,
        "--step",
        FAST_STEP,
        "--out",
        out,
        "--plots",
        plots,
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"] == "efficientnet_lite0" and result["layer"] == "_blocks.15"
    assert result["metric"] == "insertion-deletion" and result["target"] == "predicted"
    assert result["n_images"] == 2 and set(result["methods"]) == {"gradcam", "fdcam"}
    for method in result["methods"].values():
        assert 0 <= method["insertion"] <= 1 and 0 <= method["deletion"] <= 1
        assert method["overall"] == pytest.approx(method["insertion"] - method["deletion"])
    assert [entry["file"] for entry in result["per_image"]] == JPEGS[:2]
    for entry in result["per_image"]:
        assert entry["class"] == entry["label"]  # EfficientNet-Lite0 gets these test images right
        for values in entry["methods"].values():
            assert 0 <= values["insertion"] <= 1 and 0 <= values["deletion"] <= 1
    curves = result["mean_curves"]["fdcam"]
    assert len(curves["insertion"]) == len(curves["deletion"]) == len(result["curve_fraction"]) == 5
    printed = capsys.readouterr().out
    assert "Insertion" in printed and "fdcam" in printed and "gradcam" in printed
    for name in ("deletion_curves.png", "insertion_curves.png", "overlays.png"):
        with Image.open(plots / name) as png:
            assert png.format == "PNG" and png.size[0] > 200


@pytest.mark.slow  # an evaluation sweep
def test_resume_computes_only_new_images_and_survives_an_interrupt(image_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    args = ["--images", image_dir, "--methods", "gradcam", "--step", FAST_STEP, "--images-per-call", 1, "--out", out]
    seen = _counting(monkeypatch)
    assert _evaluate(*args, "--limit", 2) == 0
    assert sum(seen) == 2
    first = json.loads(out.read_text())

    seen.clear()
    assert _evaluate(*args, "--limit", 3) == 0
    assert sum(seen) == 1  # images 1 and 2 come from r.json.partial.jsonl
    second = json.loads(out.read_text())
    assert (second["n_images"], second["computed"], second["resumed"]) == (3, 1, 2)
    assert second["per_image"][:2] == first["per_image"]

    # Interrupted on the 4th image: the 3 finished ones are kept, the final file is untouched.
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(insertion_deletion, "insertion_deletion_batch", interrupted)
    assert _evaluate(*args) == 130
    assert json.loads(out.read_text()) == second
    seen = _counting(monkeypatch)
    assert _evaluate(*args) == 0
    assert sum(seen) == 1 and json.loads(out.read_text())["n_images"] == 4


@pytest.mark.slow  # an evaluation sweep
def test_onnxruntime_scorer_gives_the_torch_results(image_dir, tmp_path, monkeypatch):
    results, seen = {}, _counting(monkeypatch)
    for scorer in ("torch", "auto"):
        out = tmp_path / f"{scorer}.json"
        args = ["--images", image_dir, "--methods", "gradcam,groupcam", "--limit", 1, "--step", FAST_STEP]
        assert _evaluate(*args, "--scorer", scorer, "--out", out) == 0
        results[scorer] = json.loads(out.read_text())
    assert (results["torch"]["scorer"], results["auto"]["scorer"], sum(seen)) == ("torch", "onnxruntime", 2)
    reference, entry = results["torch"]["per_image"][0], results["auto"]["per_image"][0]
    assert entry["class"] == reference["class"]
    for method, values in reference["methods"].items():
        # Grad-CAM's map does not depend on the scorer: only the curves' logits differ, by float32
        # rounding (the auto scorer is accepted only within 1e-4 of torch). Group-CAM's map is made
        # by the scorer: its last bits differ, so pixels that nearly tie may swap places in the
        # ranking, and a swap moves the area by up to (swapped pixels / all pixels) of a probability.
        allowed = 1e-4 if method == "gradcam" else 2e-2
        for key in ("insertion", "deletion"):
            assert entry["methods"][method][key] == pytest.approx(values[key], abs=allowed), (method, key)


@pytest.mark.slow  # an evaluation sweep
def test_fdcam_variant_rows_and_label_target(image_dir, tmp_path):
    out = tmp_path / "v.json"
    code = _evaluate(
        "--images",
        image_dir,
        "--methods",
        "fdcam",
        "--fdcam-variant",
        "no-group-off",
        "--target",
        "label",
        "--step",
        FAST_STEP,
        "--limit",
        1,
        "--out",
        out,
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["methods"]) == ["fdcam", "fdcam[switch=off,grouping=False]"]
    assert result["methods"]["fdcam[switch=off,grouping=False]"]["variant"] == "no-group-off"
    assert result["target"] == "label" and result["per_image"][0]["class"] == 150


def test_unreadable_images_are_skipped(image_dir, tmp_path):
    shutil.copy(DATA / "not_an_image.jpg", image_dir / "not_an_image.jpg")
    for name in JPEGS[1:]:
        (image_dir / name).unlink()
    out = tmp_path / "s.json"
    assert _evaluate("--images", image_dir, "--methods", "gradcam", "--step", FAST_STEP, "--out", out) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 1 and [s["item"] for s in result["skipped"]] == ["not_an_image.jpg"]


@pytest.mark.slow  # an evaluation sweep
def test_cli_pointing_game_on_composites_and_multi_object(image_dir, tmp_path, capsys):
    out, plots = tmp_path / "p.json", tmp_path / "plots"
    code = _evaluate(
        "--images",
        image_dir,
        "--metric",
        "pointing-game",
        "--pairs",
        2,
        "--methods",
        "gradcam,fdcam",
        "--multi-object",
        DATA,
        "--out",
        out,
        "--plots",
        plots,
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "pointing-game" and result["n_images"] == 2
    for method in result["methods"].values():
        assert method["hits"] + method["misses"] == 4  # two classes per composite
        assert method["accuracy"] == pytest.approx(method["hits"] / 4)
    assert all(len(entry["classes"]) == 2 for entry in result["per_image"])
    multi = result["multi_object"]
    assert multi["images"][0]["file"] == "both.png"
    classes = [obj["class"] for obj in multi["images"][0]["objects"]]
    assert classes[0] in (242, 243, 245) and classes[1] in (281, 282, 285)
    assert all(m["hits"] + m["misses"] == 2 for m in multi["methods"].values())
    assert "Pointing game" in capsys.readouterr().out
    with Image.open(plots / "pointing_overlays.png") as png:
        assert png.format == "PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--images", "/nonexistent/folder"], "not a directory"),
        (["--images", str(DATA), "--methods", "gradcam,nosuchcam"], "unknown method 'nosuchcam'"),
        (["--images", str(DATA), "--fdcam-variant", "sideways"], "unknown FD-CAM variant"),
        (["--images", str(DATA), "--multi-object", str(DATA)], "only used with --metric pointing-game"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    code = _evaluate(*argv, "--out", tmp_path / "x.json")
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fdcam: error:") and message in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_plots_without_matplotlib_is_one_line_error_before_any_work(image_dir, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, even after earlier imports
    argv = ["--images", image_dir, "--methods", "gradcam", "--limit", 1, "--step", FAST_STEP]
    code = _evaluate(*argv, "--plots", tmp_path / "plots", "--out", tmp_path / "x.json")
    assert code == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.json.partial.jsonl").exists()


def test_label_target_without_labels_file_is_an_error(image_dir, tmp_path, capsys):
    (image_dir / "labels.csv").unlink()
    assert _evaluate("--images", image_dir, "--target", "label", "--out", tmp_path / "x.json") == 2
    assert "labels file not found" in capsys.readouterr().err


@pytest.mark.slow  # an evaluation sweep
def test_reproduce_tables_script_writes_tables_iii_and_iv(image_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repository root
    from benchmarks import reproduce_tables

    out = tmp_path / "tables"
    argv = [
        "--images",
        str(image_dir),
        "--tables",
        "3,4",
        "--limit",
        "1",
        "--step",
        FAST_STEP,
        "--out",
        str(out),
        "--quiet",
    ]
    assert reproduce_tables.main(argv) == 0
    markdown = (out / "tables.md").read_text()
    assert "Table III" in markdown and "Table IV" in markdown and "Table I:" not in markdown
    assert "fdcam[switch=off,grouping=False]" in markdown and "fdcam[combine=linear]" in markdown
    result = json.loads((out / "insertion-deletion.json").read_text())
    assert set(result["methods"]) == {
        "fdcam",
        "fdcam[switch=off,grouping=False]",
        "fdcam[switch=off]",
        "fdcam[combine=linear]",
        "fdcam[bias=0.0]",
    }
    assert json.loads((out / "timings.json").read_text())["insertion-deletion"]["computed_images"] == 1


def test_evaluation_runs_with_tf32_off_and_restores_the_flags(image_dir, tmp_path, monkeypatch):
    import torch

    seen = []

    def recording(model, x, *args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return REAL_INSERTION_DELETION(model, x, *args, **kwargs)

    monkeypatch.setattr(insertion_deletion, "insertion_deletion_batch", recording)
    # torch's backend flags are properties of module-like objects: pytest 9's monkeypatch cannot undo
    # a setattr on them, so the test sets and restores them itself.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        assert (
            _evaluate(
                "--images",
                image_dir,
                "--methods",
                "gradcam",
                "--limit",
                "1",
                "--step",
                FAST_STEP,
                "--scorer",
                "torch",
                "--out",
                tmp_path / "r.json",
            )
            == 0
        )
        assert seen and all(flags == (False, False) for flags in seen)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _untagged_net():
    """A small random CNN fdcam.models.load did not make (so it carries no spec)."""
    import torch
    from torch import nn

    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_any_model_is_evaluated_given_its_spec(image_dir):

    from fdcam import GradCAM, models
    from fdcam.evaluation import evaluate_insertion_deletion
    from fdcam.images import load_image, preprocess
    from fdcam.metrics import insertion_deletion_batch

    model = _untagged_net()
    spec = models.ModelSpec("tiny", "3", (32, 32), models.IMAGENET_MEAN, models.IMAGENET_STD, 10)
    options = dict(methods="gradcam", limit=1, step=128, scorer="torch", progress=False, weights=None)
    with pytest.raises(ValueError, match="give model_spec"):
        evaluate_insertion_deletion(model, image_dir, **options)
    run = evaluate_insertion_deletion(model, image_dir, model_spec=spec, **options)
    entry = run.summary["per_image"][0]
    assert run.summary["model"] == "tiny" and run.summary["layer"] == "3" and entry["file"] == JPEGS[0]
    # The same numbers by hand: the spec's preprocessing, Grad-CAM at its default layer, the curves.
    x = preprocess(load_image(image_dir / JPEGS[0]), spec)
    cls = int(model(x).argmax())
    saliency = GradCAM(model, "3")(x, targets=[cls])
    expected = insertion_deletion_batch(model, x, saliency, [cls], step=128)
    assert entry["class"] == cls
    for key in ("insertion", "deletion"):
        assert entry["methods"]["gradcam"][key] == pytest.approx(float(expected[key][0, 0]), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# a hostile file and a bad labels file are skipped


def test_evaluate_skips_a_bomb_and_goes_on(bomb, tmp_path, data_dir):
    import json
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(data_dir / "n02391049_zebra.JPEG", folder)
    shutil.copy(bomb, folder / "bomb.png")
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(folder),
                "--methods",
                "gradcam",
                "--step",
                "12544",
                "--quiet",
                "--scorer",
                "torch",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n_images"] == 1 and "decompression bomb" in result["skipped"][0]["reason"]


def test_labels_csv_bom_duplicates_and_out_of_range(tmp_path, data_dir):
    import json
    import shutil

    rows = "file,class_index,wnid,name\r\nn02391049_zebra.JPEG,340,n02391049,zebra\r\n"
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + rows.encode())
    assert read_labels(bom) == [("n02391049_zebra.JPEG", 340)]
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text(rows + "n02391049_zebra.JPEG,340,n02391049,zebra\r\n")
    with pytest.raises(LabelsError, match="twice .*rows 2 and 3"):
        read_labels(duplicated)

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("n02391049_zebra.JPEG", "n02077923_sea_lion.JPEG"):
        shutil.copy(data_dir / name, folder)
    (folder / "labels.csv").write_text(rows + "n02077923_sea_lion.JPEG,5000,n02077923,sea lion\n")
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(folder),
                "--methods",
                "gradcam",
                "--target",
                "label",
                "--quiet",
                "--step",
                "12544",
                "--scorer",
                "torch",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n_images"] == 1
    reason = result["skipped"][0]["reason"]
    assert "n02077923_sea_lion.JPEG" in reason and "out of range" in reason
