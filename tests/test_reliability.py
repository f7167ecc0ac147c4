"""Issue 9: threads, stale ONNX Runtime engines, hostile files, NaNs, output names and one-line errors."""

import logging
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import fdcam
from fdcam import runtime
from fdcam.cli import main
from fdcam.composites import LabelsError, read_labels
from fdcam.explain_output import output_stems
from fdcam.images import ImageError, load_image, output_size, overlay
from fdcam.methods.base import NonFiniteError
from fdcam.runtime import ort_tail
from fdcam.tail import TorchTail
from reference import assert_same_up_to_rounding


class SmallNet(nn.Module):
    """A small CNN with batch norm (its running statistics must never move) and a non-linear tail."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_net(seed=0):
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def state_of(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_state_equal(model, state):
    tensors, modes, grads = state
    now = model.state_dict()
    assert set(now) == set(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items()), "weights or batch-norm statistics changed"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not [name for name in dir(model) if name.startswith("_tensor_constant")]


def run_threads(function, count):
    errors, results = [], [None] * count
    barrier = threading.Barrier(count)

    def worker(index):
        try:
            barrier.wait()
            results[index] = function(index)
        except BaseException as error:  # noqa: BLE001 — reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


# ---------------------------------------------------------------------------------------------
# 2. Threads


def test_threads_making_the_first_call_on_a_new_explainer_all_succeed():
    model, x = small_net(), images()
    expected = fdcam.FDCAM(small_net(), "conv3")(x, targets=[1, 2])
    state = state_of(model)
    for _ in range(3):  # a new explainer each round: every round races on the first trace
        cam = fdcam.FDCAM(model, "conv3")
        results = run_threads(lambda i: cam(x, targets=[1, 2]), 4)
        for maps in results:
            assert_same_up_to_rounding(maps, expected)
    assert_state_equal(model, state)
    assert isinstance(model(x), torch.Tensor)  # not an fx Proxy


def test_threads_on_a_model_in_train_mode_never_change_it_or_the_global_flags():
    model, x = small_net(), images()
    expected = {name: fdcam.METHODS[name](small_net(), "conv3")(x, targets=[3, 4]) for name in ("fdcam", "gradcam")}
    model.train()
    model.bn1.eval()  # a mix of flags that must come back exactly
    model.conv3.weight.requires_grad_(False)
    state = state_of(model)
    cams = {name: fdcam.METHODS[name](model, "conv3") for name in expected}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        def work(index):
            name = "fdcam" if index % 2 else "gradcam"
            return name, [cams[name](x, targets=[3, 4]) for _ in range(3)]

        for name, maps in run_threads(work, 6):
            for m in maps:
                assert_same_up_to_rounding(m, expected[name])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert_state_equal(model, state)


def test_tf32_flags_are_shared_by_threads_with_one_setting_and_restored():
    from fdcam.tail import tail_precision

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    seen = []

    def work(index):
        precision = "tf32" if index % 2 else "fp32"
        for _ in range(20):
            with tail_precision(precision, torch.device("cpu")):
                seen.append((precision, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    run_threads(work, 4)
    assert all((matmul, cudnn) == (p == "tf32", p == "tf32") for p, matmul, cudnn in seen)
    assert len(seen) == 80
    with tail_precision("fp32", torch.device("cpu")):  # nested, the other setting, in one thread
        with tail_precision("tf32", torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


# ---------------------------------------------------------------------------------------------
# 3. Stale ONNX Runtime engine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDCAM_CACHE", str(tmp_path / "cache"))
    runtime.clear_sessions()
    yield tmp_path / "cache"
    runtime.clear_sessions()


def test_onnxruntime_tail_follows_in_place_weight_changes(cache):
    model, x = small_net(), images(1)
    ort = fdcam.FDCAM(model, "conv3", backend="onnxruntime", provider="cpu")
    torch_cam = fdcam.FDCAM(model, "conv3")
    assert_same_up_to_rounding(ort(x, targets=2), torch_cam(x, targets=2))

    def changes():
        with torch.no_grad():
            model.fc.weight.mul_(-1)
        yield "in-place"
        model.load_state_dict(small_net(seed=5).state_dict())
        yield "load_state_dict"
        model.train()
        with torch.no_grad():
            model(images(4, seed=9) * 3)  # batch-norm statistics move
        model.eval()
        yield "batch-norm statistics"

    for what in changes():
        expected = torch_cam(x, targets=2)
        assert_same_up_to_rounding(ort(x, targets=2), expected), what
        logits = model(x)
        (tail,) = ort.tails  # one input shape: one split, its tail rebuilt in place on each change
        split = ort.split_for(x)
        with torch.no_grad():
            a, *extras = split.head(x)
            assert_same_up_to_rounding(tail.run(a, torch.ones(1, a.shape[1]), extras)[:, 0], logits)


def _cached_graph(cache):
    (graph,) = (cache / "tails").glob("*.onnx")
    return graph


def test_a_cached_graph_that_does_not_match_its_hash_is_exported_again(cache, caplog):
    model, x = small_net(), images(1)
    expected = fdcam.FDCAM(model, "conv3")(x, targets=1)
    fdcam.FDCAM(model, "conv3", backend="onnxruntime", provider="cpu")(x, targets=1)
    graph = _cached_graph(cache)
    assert graph.with_name(graph.name + ".sha256").is_file()

    proto = onnx.load(str(graph))  # a weight altered on disk: still a valid graph, but not this model's
    initializer = max(proto.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    array = onnx.numpy_helper.to_array(initializer) * -3.0
    initializer.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), initializer.name))
    onnx.save(proto, str(graph))
    for damage in ("altered", "empty"):
        if damage == "empty":
            graph.write_bytes(b"")
        runtime.clear_sessions()
        before = runtime.stats.exports
        with caplog.at_level(logging.WARNING, logger="fdcam.runtime"):
            got = fdcam.FDCAM(model, "conv3", backend="onnxruntime", provider="cpu")(x, targets=1)
        assert runtime.stats.exports == before + 1, damage
        assert "does not match its recorded sha256" in caplog.text
        assert_same_up_to_rounding(got, expected)
        caplog.clear()


def test_an_unwritable_cache_directory_falls_back_to_a_temporary_one(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    model, x = small_net(), images(1)
    split = fdcam.split_model(model, "conv3", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    runtime.clear_sessions()
    with pytest.warns(RuntimeWarning, match="using the temporary directory .*set FDCAM_CACHE") as caught:
        tail = ort_tail(model, split, features, extras, provider="cpu", cache_dir=blocker / "cache")
    assert "pass cache_dir" not in str(caught[0].message)  # an option FDCAM does not have
    masks = torch.ones(2, features.shape[1])
    assert_same_up_to_rounding(tail.run(features, masks, extras), TorchTail(split.tail).run(features, masks, extras))
    runtime.clear_sessions()


def test_a_cache_whose_write_fails_with_enospc_falls_back_like_an_unwritable_one(tmp_path, monkeypatch):
    import errno

    from fdcam.export import graph as graph_module

    cache = tmp_path / "full-disk" / "cache"
    real_save = graph_module._save

    def full_disk(proto, path, external):  # the disk fills up while the graph is written into the cache
        if Path(path).is_relative_to(cache):
            Path(path).write_bytes(b"half a graph")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(proto, path, external)

    monkeypatch.setattr(graph_module, "_save", full_disk)
    model, x = small_net(), images(1)
    split = fdcam.split_model(model, "conv3", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    runtime.clear_sessions()
    warning = r"cache in .*full-disk.*No space left on device.*using the temporary directory"
    with pytest.warns(RuntimeWarning, match=warning):
        tail = ort_tail(model, split, features, extras, provider="cpu", cache_dir=cache)
        masks = torch.ones(2, features.shape[1])
        got = tail.run(features, masks, extras)
    assert_same_up_to_rounding(got, TorchTail(split.tail).run(features, masks, extras))
    assert not list((cache / "tails").iterdir())  # no partial graph left in the full cache
    runtime.clear_sessions()


def test_the_cache_directory_is_created_owner_only(tmp_path):
    model, x = small_net(), images(1)
    split = fdcam.split_model(model, "conv3", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    cache = tmp_path / "new" / "cache"
    runtime.clear_sessions()
    ort_tail(model, split, features, extras, provider="cpu", cache_dir=cache).session
    assert list((cache / "tails").glob("*.onnx"))
    assert (cache.stat().st_mode & 0o777) == 0o700 and ((cache / "tails").stat().st_mode & 0o777) == 0o700
    runtime.clear_sessions()


# ---------------------------------------------------------------------------------------------
# 4. Hostile and huge files


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)  # 196 Mpx in a few kB
    return path


def test_decompression_bombs_are_refused_in_one_line(bomb, tmp_path):
    with pytest.raises(ImageError, match="decompression bomb") as raised:
        load_image(bomb)
    assert "\n" not in str(raised.value)
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200)).save(small)
    with pytest.raises(ImageError, match="300x200 px .* more than"):
        load_image(small, max_pixels=50_000)
    assert load_image(small).size == (300, 200)


def test_explain_skips_a_bomb_and_a_directory_and_writes_the_good_image(bomb, tmp_path, data_dir, capsys):
    good = data_dir / "gray.png"
    status = main(["explain", str(bomb), str(tmp_path), str(good), "--method", "gradcam", "--out", str(tmp_path / "out")])
    assert status == 1
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipped:" in line]
    assert len(skipped) == 2 and all(line.startswith("fdcam: skipped:") for line in skipped)
    assert "decompression bomb" in skipped[0] and "is a directory" in skipped[1]
    assert "Traceback" not in err
    assert len(list((tmp_path / "out").glob("gray_gradcam_*.npy"))) == 1


def test_evaluate_skips_a_bomb_and_goes_on(bomb, tmp_path, data_dir):
    import json
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(data_dir / "n02391049_zebra.JPEG", folder)
    shutil.copy(bomb, folder / "bomb.png")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--images", str(folder), "--methods", "gradcam", "--step", "12544", "--quiet",
                 "--scorer", "torch", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 1 and "decompression bomb" in result["skipped"][0]["reason"]


def test_outputs_of_large_images_are_bounded_and_overlays_computed_in_float32(tmp_path):
    assert output_size((8000, 6000), 4096) == (4096, 3072)
    assert output_size((300, 200), 4096) == (300, 200)
    path = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 600, 3), dtype=np.uint8)).save(path)
    assert main(["explain", str(path), "--method", "gradcam", "--class", "1", "--max-size", "128", "--out", str(tmp_path)]) == 0
    assert np.load(tmp_path / "wide_gradcam_1.npy").shape == (64, 128)
    assert Image.open(tmp_path / "wide_gradcam_1.png").size == (128, 64)
    # The float32 banded overlay equals a float64 one-shot blend to within one grey level.
    from fdcam.images import _jet

    image = Image.fromarray(rng.integers(0, 255, (600, 70, 3), dtype=np.uint8))
    saliency = torch.rand(600, 70, generator=torch.Generator().manual_seed(0))
    reference = 0.5 * np.asarray(image, dtype=np.float64) + 0.5 * _jet(saliency.double().numpy()) * 255.0
    got = np.asarray(overlay(image, saliency), dtype=np.float64)
    assert np.abs(got - np.clip(np.rint(reference), 0, 255)).max() <= 1


# ---------------------------------------------------------------------------------------------
# 5. NaN and infinite values


def test_nan_weights_are_an_error_in_the_api():
    model, x = small_net(), images(1)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    for name in ("fdcam", "gradcam", "ablationcam", "scorecam"):
        with pytest.raises(NonFiniteError, match="NaN or infinite") as raised:
            fdcam.METHODS[name](model, "conv3")(x, targets=1)
        assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


def test_nan_maps_are_an_error_even_with_finite_logits():
    model, x = small_net(), images(1)
    cam = fdcam.GradCAM(model, "conv3")
    cam.channel_weights = lambda explanation: torch.full(explanation.activations.shape[:1] + (1, 16), float("inf"))
    with pytest.raises(NonFiniteError):
        cam(x, targets=1)


def test_nan_weights_are_an_error_in_the_cli(tmp_path, data_dir, capsys):
    model = fdcam.models.load("efficientnet_lite0")
    state = model.state_dict()
    state["_fc.weight"] = torch.full_like(state["_fc.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    status = main(["explain", str(data_dir / "gray.png"), "--weights", str(tmp_path / "nan.pth"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 1 and "NaN or infinite" in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.npy"))


# ---------------------------------------------------------------------------------------------
# 6. Unique output names


def test_output_stems_are_unique():
    assert output_stems(["a/x.jpg", "b/y.jpg"]) == ["x", "y"]
    stems = output_stems(["a/x.jpg", "b/x.jpg", "x.jpg", "x.webp", "x.webp"])
    assert len(set(stems)) == 5
    assert output_stems(["x.jpg", "x.webp"]) == ["x_jpg", "x_webp"]


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


# ---------------------------------------------------------------------------------------------
# Also: one-line errors and warnings


@pytest.mark.parametrize(
    "x, targets, message",
    [
        (images(1).double(), None, "float64"),
        (images(1).half(), None, "float16"),
        (torch.randn(1, 1, 32, 32), None, "1 channels"),
        (images(1), [[]], "no class"),
        (torch.randn(0, 3, 32, 32), None, "empty"),
        (images(1), torch.tensor([1.0]), "integer"),
        (images(1), "3", "string"),
        (images(1), [1.5], "integer"),
    ],
)
def test_bad_input_and_targets_are_one_line_value_errors(x, targets, message, capfd):
    model = small_net()
    state = state_of(model)
    with pytest.raises(ValueError, match=message) as raised:
        fdcam.FDCAM(model, "conv3")(x, targets=targets)
    assert "\n" not in str(raised.value)
    assert capfd.readouterr().err == ""  # no fx traceback on stderr
    assert_state_equal(model, state)


def test_numpy_integer_targets_are_accepted():
    model, x = small_net(), images(2)
    cam = fdcam.GradCAM(model, "conv3")
    expected = cam(x, targets=[3, 4])
    assert torch.equal(cam(x, targets=[np.int64(3), np.int64(4)]), expected)
    assert torch.equal(cam(x, targets=np.array([3, 4])), expected)
    assert torch.equal(cam(x[:1], targets=np.int64(3)), cam(x[:1], targets=3))


def test_an_input_too_small_for_the_model_is_a_one_line_value_error(capfd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    cam = fdcam.GradCAM(model, "2")
    assert cam(torch.randn(1, 3, 16, 16), targets=1).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="cannot run on an input of shape") as raised:
        cam(torch.randn(1, 3, 4, 4), targets=1)
    assert "\n" not in str(raised.value) and capfd.readouterr().err == ""


def test_bad_engine_options_are_refused():
    model = small_net()
    for bad in ({"tail_batch_size": 0}, {"tail_batch_size": -1}, {"memory_budget": 0}, {"memory_budget": -5}, {"tail_batch_size": 2.5}):
        with pytest.raises(ValueError, match="positive integer"):
            fdcam.FDCAM(model, "conv3", **bad)
    with pytest.raises(ValueError, match="GradCAM runs no masked tail passes: backend='onnxruntime', precision='fp16'"):
        fdcam.GradCAM(model, "conv3", backend="onnxruntime", precision="fp16")
    cam = fdcam.FDCAM(model, "conv3", cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam(images(1))
        cam(images(1))
    assert [str(w.message) for w in caught if "cuda_graph" in str(w.message)] == [
        "cuda_graph applies to CUDA inputs only; these switch passes run eagerly"
    ]


def test_a_1x1_target_layer_warns_that_its_map_is_blank():
    model = small_net()
    with pytest.warns(UserWarning, match="1x1 .* blank"):
        maps = fdcam.GradCAM(model, "conv3")(torch.randn(1, 3, 2, 2), targets=1)
    assert torch.equal(maps, torch.zeros_like(maps))


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
    assert main(["evaluate", "--images", str(folder), "--methods", "gradcam", "--target", "label", "--quiet",
                 "--step", "12544", "--scorer", "torch", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 1
    assert "n02077923_sea_lion.JPEG" in result["skipped"][0]["reason"] and "out of range" in result["skipped"][0]["reason"]


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
