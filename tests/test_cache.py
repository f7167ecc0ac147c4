"""runtime/cache.py: the tail graphs on disk follow the model's weights, damaged or foreign graphs are exported
again, and an unwritable or full cache falls back to a temporary directory."""

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import fdcam
from fdcam import runtime
from fdcam.runtime import ort_tail
from fdcam.tail import TorchTail
from nets import small_images, small_net
from reference import assert_same_up_to_rounding


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDCAM_CACHE", str(tmp_path / "cache"))
    runtime.clear_sessions()
    yield tmp_path / "cache"
    runtime.clear_sessions()


def test_onnxruntime_tail_follows_in_place_weight_changes(cache):
    model, x = small_net(), small_images(1)
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
            model(small_images(4, seed=9) * 3)  # batch-norm statistics move
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
    model, x = small_net(), small_images(1)
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
    model, x = small_net(), small_images(1)
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
    model, x = small_net(), small_images(1)
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
    model, x = small_net(), small_images(1)
    split = fdcam.split_model(model, "conv3", x)
    with torch.no_grad():
        features, *extras = split.head(x)
    cache = tmp_path / "new" / "cache"
    runtime.clear_sessions()
    _ = ort_tail(model, split, features, extras, provider="cpu", cache_dir=cache).session  # exports the graph
    assert list((cache / "tails").glob("*.onnx"))
    assert (cache.stat().st_mode & 0o777) == 0o700 and ((cache / "tails").stat().st_mode & 0o777) == 0o700
    runtime.clear_sessions()
