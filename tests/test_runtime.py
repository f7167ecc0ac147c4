"""fdcam.runtime: ONNX Runtime tails equal torch tails, one run per explanation, cached sessions, provider errors."""

import copy
import gc
import json
import logging
import runpy
import weakref
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fdcam
from fdcam import runtime
from fdcam.runtime import OrtTail, ProviderError, ort_tail
from fdcam.tail import Tail, TorchTail
from nets import ConvStart

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def fresh_sessions():
    """The module starts and ends with no open sessions (graphs go to the session's temporary FDCAM_CACHE)."""
    runtime.clear_sessions()
    yield
    runtime.clear_sessions()


@pytest.fixture(scope="module")
def lite0_split(lite0, zebra_input):
    split = fdcam.split_model(lite0, "_blocks.15", zebra_input)
    with torch.no_grad():
        features, *extras = split.head(zebra_input)
    return split, features, extras


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double().flatten(), b.double().flatten()
    da, db = a - a.mean(), b - b.mean()
    return float(da @ db / (da.norm() * db.norm())), float((a - b).abs().max())


def the_tail(cam) -> OrtTail:
    (tail,) = cam.tails
    return tail


def assert_same_maps(torch_maps, ort_maps):
    correlation, max_abs = agreement(torch_maps, ort_maps)
    assert correlation >= 0.9999 and max_abs <= 1e-3, (correlation, max_abs)


@pytest.mark.slow  # exports VGG16's 120M-parameter tail
def test_fdcam_vgg16_onnxruntime_equals_torch_in_one_run(vgg16_random):
    model = vgg16_random
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = fdcam.FDCAM(model, "features.30")(x, targets=7)
    cam = fdcam.FDCAM(model, "features.30", backend="onnxruntime", provider="cpu")
    assert_same_maps(expected, cam(x, targets=7))
    tail = the_tail(cam)
    assert isinstance(tail, OrtTail) and isinstance(tail, Tail)
    assert tail.runs == 1 and tail.provider == "cpu"
    # pooling + Linear after features.30: the graph is the factorised tail (fdcam.factorise), with the target
    # class input
    (form,) = tail.forms_run
    assert form.classes and tail.opened(form)[0].get_modelmeta().custom_metadata_map["tail_form"] == "factorised"


def test_fdcam_efficientnet_lite0_onnxruntime_equals_torch(lite0, zebra_input):
    expected = fdcam.FDCAM(lite0, "_blocks.15")(zebra_input, targets=[[340, 0]])
    cam = fdcam.FDCAM(lite0, "_blocks.15", backend="onnxruntime", provider="cpu")
    maps = cam(zebra_input, targets=[[340, 0]])
    for t in range(2):
        assert_same_maps(expected[0, t], maps[0, t])
    assert the_tail(cam).runs == 1  # both classes share the 2K switch passes


def test_fdcam_resnet_split_inside_a_block_onnxruntime_equals_torch():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = fdcam.FDCAM(model, "layer4.1.conv2")(x)
    cam = fdcam.FDCAM(model, "layer4.1.conv2", backend="onnxruntime", provider="cpu")
    maps = cam(x)
    for i in range(2):
        assert_same_maps(expected[i], maps[i])
    assert the_tail(cam).runs == 1  # both images' switch passes in one session run


def test_ablationcam_onnxruntime_equals_torch(lite0, zebra_input):
    expected = fdcam.AblationCAM(lite0, "_blocks.15")(zebra_input)
    cam = fdcam.AblationCAM(lite0, "_blocks.15", backend="onnxruntime", provider="cpu")
    assert_same_maps(expected, cam(zebra_input))
    assert the_tail(cam).runs == 1


def test_a_second_explainer_reuses_the_session_and_builds_nothing(lite0, zebra_input):
    # built here unless an earlier test did
    fdcam.FDCAM(lite0, "_blocks.15", backend="onnxruntime", provider="cpu")(zebra_input)
    before = copy.copy(runtime.stats)
    cam = fdcam.FDCAM(lite0, "_blocks.15", backend="onnxruntime", provider="cpu")
    cam(zebra_input)
    after = runtime.stats
    assert (after.exports, after.sessions, after.graph_reuses) == (before.exports, before.sessions, before.graph_reuses)
    assert after.session_reuses == before.session_reuses + 1
    assert the_tail(cam).runs == 1


def test_graphs_are_reused_from_disk_and_changed_weights_export_again(lite0, zebra_input):
    model = copy.deepcopy(lite0)  # a copy: this test changes its weights
    split = fdcam.split_model(model, "_blocks.15", zebra_input)
    with torch.no_grad():
        features, *extras = split.head(zebra_input)
    _ = ort_tail(model, split, features, extras, provider="cpu").session  # forms are exported on first use
    runtime.clear_sessions()
    before = copy.copy(runtime.stats)
    _ = ort_tail(model, split, features, extras, provider="cpu").session
    assert runtime.stats.exports == before.exports and runtime.stats.graph_reuses == before.graph_reuses + 1
    assert runtime.stats.sessions == before.sessions + 1

    with torch.no_grad():
        model._fc.bias.add_(1.0)  # an in-place change of a tail weight
    tail = ort_tail(model, split, features, extras, provider="cpu")
    _ = tail.session
    assert runtime.stats.exports == before.exports + 1
    masks = torch.ones(2, 320)
    torch.testing.assert_close(
        tail.run(features, masks, extras), TorchTail(split.tail).run(features, masks, extras), atol=1e-4, rtol=1e-4
    )


def test_a_damaged_cached_graph_is_exported_again(tmp_path, caplog):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    split = fdcam.split_model(model, "layer4.1.conv2", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    _ = ort_tail(model, split, features, extras, provider="cpu", cache_dir=tmp_path).session
    (cached,) = (tmp_path / "tails").glob("*.onnx")
    cached.write_bytes(b"not an onnx graph")
    runtime.clear_sessions()
    with caplog.at_level(logging.WARNING, logger="fdcam.runtime"):
        tail = ort_tail(model, split, features, extras, provider="cpu", cache_dir=tmp_path)
        _ = tail.session
    assert "does not match its recorded sha256" in caplog.text  # verified before ONNX Runtime reads it
    masks = torch.ones(3, 512)
    expected = TorchTail(split.tail).run(features, masks, extras)
    torch.testing.assert_close(tail.run(features, masks, extras), expected, atol=1e-4, rtol=1e-4)


def test_memory_budget_or_batch_size_split_the_masks_into_chunks(lite0, lite0_split):
    split, features, extras = lite0_split
    masks = (torch.rand(100, 320, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    whole = ort_tail(lite0, split, features, extras, provider="cpu")
    chunked = ort_tail(lite0, split, features, extras, provider="cpu", batch_size=30)
    expected = TorchTail(split.tail).run(features, masks, extras)
    torch.testing.assert_close(whole.run(features, masks, extras), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked.run(features, masks, extras), expected, atol=1e-4, rtol=1e-4)
    assert (whole.runs, chunked.runs) == (1, 4)
    assert whole.session is chunked.session


@pytest.mark.skipif("cuda" in runtime.available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_is_a_clear_one_line_error(lite0, lite0_split):
    split, features, extras = lite0_split
    with pytest.raises(ProviderError, match="onnxruntime-gpu") as raised:
        ort_tail(lite0, split, features, extras, provider="cuda")
    assert "\n" not in str(raised.value)


@pytest.mark.skipif("tensorrt" in runtime.available_providers(), reason="this onnxruntime has TensorRT")
def test_tensorrt_without_tensorrt_falls_back_with_one_warning(lite0, lite0_split, caplog):
    split, features, extras = lite0_split
    with caplog.at_level(logging.WARNING, logger="fdcam.runtime"):
        tail = ort_tail(lite0, split, features, extras, provider="tensorrt")
        _ = tail.session
        _ = ort_tail(lite0, split, features, extras, provider="tensorrt").session  # cached: no second warning
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "TensorRT cannot be used" in warnings[0].getMessage()
    assert tail.provider in ("cuda", "cpu")
    masks = (torch.rand(7, 320, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    expected = TorchTail(split.tail).run(features, masks, extras)
    torch.testing.assert_close(tail.run(features, masks, extras), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "options, message", [({"provider": "npu"}, "provider must be"), ({"precision": "int8"}, "precision must be")]
)
def test_unknown_provider_or_precision_is_a_value_error(lite0, lite0_split, options, message):
    split, features, extras = lite0_split
    with pytest.raises(ValueError, match=message):
        ort_tail(lite0, split, features, extras, **options)


def test_gpu_check_skips_cleanly_without_cuda_and_runs_its_checks_on_cpu(tmp_path, monkeypatch, capsys):
    script = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"))
    monkeypatch.setenv("OUT", str(tmp_path))
    if not torch.cuda.is_available():
        assert script["main"](["--provider", "cuda"]) == 0
        assert "skipped" in capsys.readouterr().out
        assert "skipped" in json.loads((tmp_path / "gpu_check.json").read_text())
    assert script["main"](["--provider", "cpu", "--models", "efficientnet_lite0", "--repeats", "0"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (result,) = report["results"]
    assert report["passed"] and result["runs_per_explanation"] == 1 and result["correlation"] >= 0.9999


def test_a_batch_of_images_is_one_session_run_and_equals_per_image_runs(tmp_path):
    from reference import assert_same_up_to_rounding

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    split = fdcam.split_model(model, "layer4.1.conv2", x[:1])
    with torch.no_grad():
        features, *extras = split.head(x)  # the skip tensor crosses the split: one per image
    tail = ort_tail(model, split, features[:1], [e[:1] for e in extras], provider="cpu", cache_dir=tmp_path)
    masks = (torch.rand(3, 7, 512, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    together = tail.run(features, masks, extras)
    assert tail.runs == 1 and together.shape == (3, 7, 1000) and together.dtype == torch.float32
    singles = torch.cat(
        [tail.run(features[i : i + 1], masks[i : i + 1], [e[i : i + 1] for e in extras]) for i in range(3)]
    )
    assert_same_up_to_rounding(together, singles)
    assert_same_up_to_rounding(together, TorchTail(split.tail, factorise=False).run(features, masks, extras))
    classes = torch.tensor([[5, 1], [0, 999], [3, 3]])
    torch.testing.assert_close(
        tail.run(features, masks, extras, classes), together.gather(2, classes[:, None].expand(-1, 7, -1))
    )
    for rows, runs in ((14, 2), (3, 9)):  # two images per run (2 + 1); slices of 3, 2, 2 masks of one image
        chunked = ort_tail(
            model,
            split,
            features[:1],
            [e[:1] for e in extras],
            provider="cpu",
            cache_dir=tmp_path,
            memory_budget=rows * tail.row_bytes,
        )
        assert_same_up_to_rounding(chunked.run(features, masks, extras), together)
        assert chunked.runs == runs


# --- graph forms: a classes input, gathered sums under a static bound ---------------------------------


def _conv_start_tail(tmp_path, seed=0, kernel=1, plain=False):
    torch.manual_seed(seed)
    # The tail after `stem` starts with a k×k convolution + batch norm; 32 channels to mask, 8×8 maps.
    model = ConvStart(
        kernel,
        padding=kernel // 2,
        channels=(32, 48),
        stem_stride=4,
        hidden=None,
        classes=10,
        activation=torch.nn.functional.relu6,
        plain=plain,
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    split = fdcam.split_model(model, "stem", x[:1])
    with torch.no_grad():
        features, *extras = split.head(x)
    tail = ort_tail(model, split, features[:1], [e[:1] for e in extras], provider="cpu", cache_dir=tmp_path)
    return model, split, features, extras, tail


def _switch_masks(n, k, bound, seed):
    """FD-CAM's switch-on and switch-off rows [n,2K,K] of random groups of 1…bound channels."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, bound + 1, (n, k, 1), generator=generator)
    groups = (torch.rand(n, k, k, generator=generator).argsort(-1) < sizes).float()
    return torch.cat([groups, 1 - groups], 1)


def _plain(split, features, masks, extras, classes=None):
    """The plain torch masked tail (no shortcut), gathered to `classes`."""
    logits = TorchTail(split.tail, factorise=False).run(features, masks, extras)
    return logits if classes is None else logits.gather(2, classes[:, None].expand(-1, masks.shape[1], -1))


@pytest.mark.parametrize("kernel", [1, 3])
def test_classes_and_gathered_sums_equal_the_plain_masked_tail(tmp_path, kernel):
    from fdcam.export.graph import TailForm
    from reference import assert_same_up_to_rounding

    model, split, features, extras, tail = _conv_start_tail(tmp_path, kernel=kernel)
    masks = _switch_masks(2, 32, 4, seed=kernel)
    classes = torch.tensor([[7, 0], [3, 3]])
    sparse = tail.run(features, masks, extras, classes, sparsity=4)
    assert tail.forms_run == {TailForm(classes=True, bound=4): 1} and tail.runs == 1
    assert sparse.shape == (2, 64, 2)
    assert_same_up_to_rounding(sparse, _plain(split, features, masks, extras, classes))
    dense = tail.run(features, masks, extras, classes)  # no bound: the dense rows of the same classes
    assert tail.forms_run[TailForm(classes=True)] == 1
    assert_same_up_to_rounding(sparse, dense)
    everything = tail.run(features, masks, extras)
    assert_same_up_to_rounding(everything, _plain(split, features, masks, extras))
    assert tail.forms_run[TailForm()] == 1
    chunked = ort_tail(
        model, split, features[:1], [e[:1] for e in extras], provider="cpu", cache_dir=tmp_path, batch_size=20
    )
    # each chunk gets its classes
    assert_same_up_to_rounding(chunked.run(features, masks, extras, classes, sparsity=4), sparse)
    assert chunked.forms_run == {TailForm(classes=True, bound=4): 8}  # slices of 20 of each image's 64 masks


def test_rows_over_the_bound_run_densely_and_stay_exact(tmp_path):
    from fdcam.export.graph import TailForm
    from reference import assert_same_up_to_rounding

    _, split, features, extras, tail = _conv_start_tail(tmp_path, seed=3)
    masks = _switch_masks(2, 32, 4, seed=5)
    masks[1, 3, :9] = 1.0  # one row with 9 or more ones and more than 4 zeros: the bound 4 is wrong
    weighted = torch.rand(2, 3, 32, generator=torch.Generator().manual_seed(6))  # not 0/1 at all
    classes = torch.tensor([[1, 2], [9, 0]])
    for rows in (masks, weighted):
        got = tail.run(features, rows, extras, classes, sparsity=4)
        assert_same_up_to_rounding(got, _plain(split, features, rows, extras, classes))
    assert set(tail.forms_run) == {TailForm(classes=True)}  # the gathered graph was never used
    too_large = tail.run(features, masks[:, :2], extras, classes, sparsity=20)  # 20 > a quarter of K: dense
    assert_same_up_to_rounding(too_large, _plain(split, features, masks[:, :2], extras, classes))
    assert set(tail.forms_run) == {TailForm(classes=True)}


def test_each_graph_form_has_its_own_file_and_session(tmp_path):
    from fdcam.export.graph import TailForm, read_metadata

    model, _, features, extras, tail = _conv_start_tail(tmp_path, seed=7)
    forms = [TailForm(), TailForm(classes=True), TailForm(bound=4), TailForm(classes=True, bound=4)]
    sessions = [tail.opened(form)[0] for form in forms]
    assert len({id(session) for session in sessions}) == 4
    files = sorted((tmp_path / "tails").glob("*.onnx"))
    digest = files[0].name[:32]  # one content hash, one file per form
    assert sorted(path.name for path in files) == sorted(f"{digest}{form.suffix}.onnx" for form in forms)
    by_suffix = {path.name[32:]: read_metadata(path) for path in files}
    sparse = by_suffix["-classes-sparse4.onnx"]
    assert sparse["classes_input"] == "true" and sparse["sparse_bound"] == "4"
    assert sparse["tail_form"] == "shortcut" and by_suffix[".onnx"]["classes_input"] == "false"
    assert [tail.opened(form)[0] for form in forms] == sessions  # each form's session is kept, none rebuilt
    before = copy.copy(runtime.stats)
    again = ort_tail(
        model, tail_split(model, features), features[:1], [e[:1] for e in extras], provider="cpu", cache_dir=tmp_path
    )
    assert again.opened(TailForm(classes=True, bound=4))[0] is sessions[3]
    assert runtime.stats.exports == before.exports


def tail_split(model, features):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return fdcam.split_model(model, "stem", x)


def test_a_tail_without_shortcuts_exports_the_plain_graph_for_every_call(tmp_path):
    from fdcam.export.graph import TailForm
    from reference import assert_same_up_to_rounding

    _, split, features, extras, tail = _conv_start_tail(tmp_path, plain=True)
    masks = _switch_masks(2, 32, 4, seed=8)
    assert not tail.selects_rows and tail.plan(features, masks, None, 4).form == "plain"
    classes = torch.tensor([[5, 1], [0, 47]])
    got = tail.run(features, masks, extras, classes, sparsity=4)
    assert_same_up_to_rounding(got, _plain(split, features, masks, extras, classes))
    assert set(tail.forms_run) == {TailForm()}
    assert tail.session.get_modelmeta().custom_metadata_map["tail_form"] == "masked"


def test_runs_split_a_batch_evenly_within_the_memory_budget(lite0, lite0_split):
    from fdcam.runtime.session import _even_slices

    assert [s.stop - s.start for s in _even_slices(10, 4)] == [4, 3, 3]
    assert [s.stop - s.start for s in _even_slices(64, 1)] == [1] * 64
    split, features, extras = lite0_split
    batch = features.expand(5, -1, -1, -1) + 0.01 * torch.arange(5.0)[:, None, None, None]
    masks = (torch.rand(5, 9, 320, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    tail = ort_tail(lite0, split, features, extras, provider="cpu", memory_budget=None)
    budget_for_two_images = 2 * 9 * tail.row_bytes
    chunked = ort_tail(lite0, split, features, extras, provider="cpu", memory_budget=budget_for_two_images)
    assert not extras  # Lite0's tail takes only the features
    expected = TorchTail(split.tail).run(batch, masks)
    got = chunked.run(batch, masks)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert chunked.runs == 3  # images 2 + 2 + 1
    assert tail.rows_per_run(batch, 45) == 45  # the default budget holds these 45 rows in one run


# --- lifecycle: close() and `with` release an explainer's sessions; a shared one stays until its last user closes ---


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)).eval()


def _sessions_of(cam) -> list:
    """Weak references to the ONNX Runtime sessions the explainer's tail ran (one per graph form)."""
    tail = the_tail(cam)
    return [weakref.ref(tail.opened(form)[0]) for form in tail.forms_run]


def test_close_releases_sessions_and_a_shared_session_stays_until_its_last_user_closes():
    model, x = _small_model(), torch.randn(2, 3, 10, 10)
    before = runtime.open_sessions(model)
    assert before == 0  # a new model: no session of it yet (the count is per model: other tests' models come and go)
    first = fdcam.FDCAM(model, "1", backend="onnxruntime", provider="cpu")
    second = fdcam.FDCAM(model, "1", backend="onnxruntime", provider="cpu")
    first(x)
    opened = runtime.open_sessions(model) - before
    reuses = runtime.stats.session_reuses
    expected = second(x)
    assert opened >= 1 and runtime.open_sessions(model) == before + opened  # the second explainer shares them
    assert runtime.stats.session_reuses > reuses
    sessions = _sessions_of(second)

    first.close()
    assert runtime.open_sessions(model) == before + opened  # still used by the second
    torch.testing.assert_close(second(x), expected, rtol=0, atol=0)
    second.close()
    assert runtime.open_sessions(model) == before
    gc.collect()
    assert sessions and all(session() is None for session in sessions)  # gone, not only out of the cache

    for closed in (first, second):
        with pytest.raises(fdcam.ClosedError, match="was closed; make a new one"):
            closed(x)
        closed.close()  # a second close does nothing


def test_with_block_releases_the_sessions_of_every_tail_method():
    model, x = _small_model(), torch.randn(1, 3, 10, 10)
    before = runtime.open_sessions(model)
    for method in (fdcam.FDCAM, fdcam.AblationCAM):
        with method(model, "1", backend="onnxruntime", provider="cpu") as cam:
            cam(x)
            assert runtime.open_sessions(model) > before
        assert cam.closed and runtime.open_sessions(model) == before
        with pytest.raises(fdcam.ClosedError):
            cam.explanation(x)


def test_closing_an_explainer_leaves_the_sessions_of_ort_tail_callers_without_one():
    """ort_tail called without an owner: its sessions stay while the model lives (or until clear_sessions)."""
    model, x = _small_model(), torch.randn(1, 3, 10, 10)
    split = fdcam.split_model(model, "1", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    before = runtime.open_sessions(model)
    direct = ort_tail(model, split, features, extras, provider="cpu")
    plain = weakref.ref(direct.session)  # the plain form, opened for no explainer
    direct.close()
    del direct
    with fdcam.FDCAM(model, "1", backend="onnxruntime", provider="cpu") as cam:
        cam(x)
    gc.collect()
    assert runtime.open_sessions(model) == before + 1 and plain() is not None


@pytest.mark.slow
def test_a_batch_of_64_lite0_images_through_the_onnxruntime_tail_stays_under_2_gb():
    """Default settings: the process grows by less than 2 GB for 64 images (head, gradients and switch passes)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import torch, fdcam
        from fdcam.images import load_image, preprocess
        from fdcam.models import spec_of
        model = fdcam.models.load("efficientnet_lite0")
        x = preprocess(load_image({str(ROOT / "tests" / "data" / "n02391049_zebra.JPEG")!r}), spec_of(model))
        cam = fdcam.FDCAM(model, "_blocks.15", backend="onnxruntime", provider="cpu")
        cam(x)  # the session is built
        status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts here
        maps = cam(x.repeat(64, 1, 1, 1) + 0.01 * torch.randn(64, 1, 1, 1))
        assert maps.shape[:2] == (64, 1) and torch.isfinite(maps).all()
        print(status("VmHWM") - before)
        """
    )
    # The child inherits the session's FDCAM_CACHE (conftest): Lite0's tail graph, exported by the tests above, is read
    # from it, and the session is built before the measured call either way.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.strip().splitlines()[-1])
    assert growth < 2 * 1024**3, f"the process grew by {growth / 1024**3:.2f} GB"
