"""explain_dataset / evaluate_dataset on a real local Ray (one instance for the module, shut down after it).

Every map and logit is compared with the in-process library on the same image and class; a bad image is one
error row; an actor killed mid-run leaves every image exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray  # noqa: E402
import torch

import fdcam  # noqa: E402
from datasets_helpers import MAP_TOLERANCE, image_folder, read_rows, saliency_of  # noqa: E402
from fdcam.datasets import evaluate_dataset, explain_dataset, plan_pool  # noqa: E402
from fdcam.evaluation import evaluate_insertion_deletion  # noqa: E402
from fdcam.images import load_image, preprocess  # noqa: E402
from fdcam.maps import to_input_size  # noqa: E402
from fdcam.models import spec_of  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # A Ray started by the user: a model factory's module must be importable on its workers (here, tests/).
    tests = str(Path(__file__).resolve().parent)
    ray.init(
        address="local",  # a Ray of its own, never one already running on the machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}},
    )
    yield
    ray.shutdown()


def _input(path: str, model) -> torch.Tensor:
    return preprocess(load_image(path), spec_of(model))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def _assert_logit_matches(row: dict, logits: torch.Tensor) -> None:
    # the same float32 model on a batch of another size: conv sums in another order, ~1e-6 of the largest logit
    tolerance = 1e-5 * float(logits.abs().max())
    assert abs(row["logit"] - float(logits[row["class"]])) <= tolerance
    assert abs(row["probability"] - float(torch.softmax(logits, 0)[row["class"]])) <= 1e-5


def test_plan_pool_leaves_cpu_for_decoding():
    assert plan_pool({"CPU": 2.0}) == fdcam.datasets.PoolPlan(1, 0.5, 0, decode_tasks=1)
    assert plan_pool({"CPU": 2.0}, actors=3).actors == 3  # 1.5 CPUs for actors, 0.5 for decoding
    with pytest.raises(ValueError, match="no CPU for decoding"):
        plan_pool({"CPU": 2.0}, actors=4)
    assert plan_pool({"CPU": 16.0}) == fdcam.datasets.PoolPlan(12, 1.0, 0, decode_tasks=12)  # one per actor
    assert plan_pool({"CPU": 16.0, "GPU": 2.0}, gpus_per_actor=0.5) == fdcam.datasets.PoolPlan(4, 1.0, 0.5, None)
    with pytest.raises(ValueError, match="0 GPU"):
        plan_pool({"CPU": 4.0}, gpus_per_actor=1)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_explain_dataset_equals_library_and_bad_images_are_error_rows(tmp_path, lite0):
    photos = image_folder(tmp_path / "images", 5, bad=True)
    out = tmp_path / "out"
    result = explain_dataset(
        tmp_path / "images", out=out, targets=2, map_size="input", batch_size=3, actors=1, progress=False
    )
    rows = read_rows(out)
    assert (result.images, result.errors, result.computed, result.resumed) == (7, 2, 7, 0)
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == {"broken.jpg", "tiny.png"} and "16x16" in errors["tiny.png"]
    assert len(rows) == 2 * len(photos) + 2  # top-2: two rows per photo, one per bad file
    cam = fdcam.FDCAM(lite0)
    for photo in photos:
        mine = sorted((r for r in rows if r["path"] == str(photo.resolve())), key=lambda r: r["rank"])
        x = _input(photo, lite0)
        logits = _logits(lite0, x)
        assert [r["class"] for r in mine] == logits.topk(2).indices.tolist()
        expected = cam(x, [[r["class"] for r in mine]])[0]
        for r in mine:
            _assert_logit_matches(r, logits)
            assert (r["map_height"], r["map_width"]) == (224, 224) and r["method"] == "fdcam"
            assert (saliency_of(r) - expected[r["rank"]]).abs().max() <= MAP_TOLERANCE
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["layer"] == "_blocks.15"
    assert run["counts"] == {"images": 7, "rows": 12, "errors": 2, "computed": 7, "resumed": 0, "listed": 7}
    assert len(run["config"]["weights_sha256"]) == 64


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_feature_size_maps_upsample_to_the_library_map(tmp_path, lite0):
    photos = image_folder(tmp_path / "images", 3, start=10)
    out = tmp_path / "out"
    # the model travels as an importable factory; its input format as a zoo name
    explain_dataset(
        [str(p) for p in photos],
        out=out,
        model="datasets_helpers:plain_lite0",
        model_spec="efficientnet_lite0",
        method="gradcam",
        targets=[281],
        batch_size=2,
        actors=1,
        progress=False,
    )
    rows = read_rows(out)
    assert json.loads((out / "run.json").read_text())["config"]["model"] == "datasets_helpers:plain_lite0"
    assert len(rows) == 3 and all(r["class"] == 281 and r["error"] is None for r in rows)
    cam = fdcam.GradCAM(lite0)
    for row in rows:
        x = _input(row["path"], lite0)
        feature = saliency_of(row)
        assert feature.shape == (7, 7)  # Lite0's _blocks.15 at 224x224: 49 values
        # min-max at 7x7 then upsampled and min-maxed again is the library's map (min-max is affine);
        # float16 storage of the 7x7 map moves it by at most the rounding, which interpolation does not grow.
        upsampled = to_input_size(feature[None, None], (224, 224))[0, 0]
        assert (upsampled - cam(x, 281)[0, 0]).abs().max() <= 4 * MAP_TOLERANCE
        _assert_logit_matches(row, _logits(lite0, x))


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_evaluate_dataset_equals_the_in_process_evaluation(tmp_path, lite0):
    image_folder(tmp_path / "images", 2, start=20)
    out = tmp_path / "out"
    evaluate_dataset(tmp_path / "images", out=out, methods="gradcam,fdcam", batch_size=2, actors=1, progress=False)
    rows = read_rows(out)
    reference = evaluate_insertion_deletion(
        lite0, tmp_path / "images", methods="gradcam,fdcam", images_per_call=2, scorer="torch", progress=False
    )
    expected = {
        (entry["file"], method): values
        for entry in reference.summary["per_image"]
        for method, values in entry["methods"].items()
    }
    assert len(rows) == len(expected) == 4
    for row in rows:
        values = expected[(Path(row["path"]).name, row["method"])]
        assert row["error"] is None
        for key in ("insertion", "deletion", "overall"):
            assert row[key] == pytest.approx(values[key], abs=1e-6)


def _actor_pids(name: str) -> list[int]:
    """Processes whose title Ray set to the actor (ray::MapWorker(MapBatches(ExplainActor)))."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if command.startswith("ray::") and name in command.split("\0")[0]:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_an_actor_killed_mid_run_leaves_every_image_exactly_once(tmp_path, lite0):
    photos = image_folder(tmp_path / "images", 10, start=30)
    out = tmp_path / "out"
    finished: dict = {}
    weights = tmp_path / "lite0.pt"  # the model travels as a zoo name and a weights file the workers read
    torch.save(lite0.state_dict(), weights)
    thread = threading.Thread(
        target=lambda: finished.setdefault(
            "run",
            explain_dataset(
                tmp_path / "images",
                out=out,
                weights=str(weights),
                batch_size=1,
                actors=1,
                rows_per_file=1,
                progress=False,
            ),
        )
    )
    thread.start()
    staging = out / "rows" / "_staging"
    deadline = time.monotonic() + 300
    while not list(staging.glob("*/*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the first block is written: the actor is busy with the next ones
    victims = _actor_pids("ExplainActor")
    assert len(victims) == 1 and thread.is_alive()
    os.kill(victims[0], signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive()
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p.resolve()) for p in photos)  # each image once, none lost
    assert all(r["error"] is None for r in rows)
    assert finished["run"].images == 10
    cam = fdcam.FDCAM(lite0)
    for row in rows[:2]:
        x = _input(row["path"], lite0)
        upsampled = to_input_size(saliency_of(row)[None, None], (224, 224))[0, 0]
        assert (upsampled - cam(x, row["class"])[0, 0]).abs().max() <= 4 * MAP_TOLERANCE


def test_label_targets_in_the_actor_itself(tmp_path, lite0):
    """The decode task and the actor as plain Python (what Ray runs): labels explained, a missing label and an
    undecodable file each one error row, the rest of the batch unaffected."""
    import numpy as np

    from fdcam.datasets.sources import ModelRef
    from fdcam.datasets.workers import NO_LABEL, ExplainActor, decode_batch

    photos = image_folder(tmp_path / "images", 2, start=90, bad=True)
    paths = [str(photos[0]), str(photos[1]), str(tmp_path / "images" / "broken.jpg")]
    batch = decode_batch({"path": np.array(paths, dtype=object), "label": np.array([281, NO_LABEL, 3])}, spec_of(lite0))
    actor = ExplainActor(ModelRef.of("efficientnet_lite0"), "gradcam", "_blocks.15", {}, "label", "input")
    rows = {row["path"]: row for row in actor(batch).to_pylist()}
    assert rows[paths[0]]["class"] == 281 and rows[paths[0]]["label"] == 281 and rows[paths[0]]["error"] is None
    expected = fdcam.GradCAM(lite0)(_input(paths[0], lite0), 281)[0, 0]
    assert (saliency_of(rows[paths[0]]) - expected).abs().max() <= MAP_TOLERANCE
    assert rows[paths[1]]["error"] == "no label for this image (targets='label')" and rows[paths[1]]["class"] is None
    assert "not an image" in rows[paths[2]]["error"]


def test_topk_targets_in_the_actor_run_the_model_once_with_the_classes_of_a_separate_forward(tmp_path, lite0):
    """targets=K: each batch's classes come from its explanation's own forward, not from a forward of their own."""
    import numpy as np

    from fdcam.datasets.sources import ModelRef
    from fdcam.datasets.workers import NO_LABEL, ExplainActor, decode_batch
    from test_explain_command import ForwardCounter

    paths = [str(photo) for photo in image_folder(tmp_path / "images", 2, start=90)]
    batch = decode_batch(
        {"path": np.array(paths, dtype=object), "label": np.array([NO_LABEL, NO_LABEL])}, spec_of(lite0)
    )
    actor = ExplainActor(ModelRef.of("efficientnet_lite0"), "gradcam", "_blocks.15", {}, 2, "input")
    actor(batch)  # builds the split (which runs the model once on its example)
    with ForwardCounter(actor.model, torch.from_numpy(np.asarray(batch["x"][:1]))) as counter:
        rows = actor(batch).to_pylist()
    assert counter.count == 1
    cam = fdcam.GradCAM(lite0)
    for path in paths:
        mine = sorted((r for r in rows if r["path"] == path), key=lambda r: r["rank"])
        x = _input(path, lite0)
        logits = _logits(lite0, x)
        assert [r["class"] for r in mine] == logits.topk(2).indices.tolist()
        expected = cam(x, [[r["class"] for r in mine]])[0]
        for r in mine:
            _assert_logit_matches(r, logits)
            assert (saliency_of(r) - expected[r["rank"]]).abs().max() <= MAP_TOLERANCE
