"""explain_dataset on a 2-node Ray cluster on this machine (ray.cluster_utils.Cluster, 1 CPU per node),
reached by its address as a real cluster is; the maps and logits equal the in-process library's."""

from __future__ import annotations

import json

import pytest
import ray  # noqa: E402
import torch

import fdcam  # noqa: E402
from datasets_helpers import MAP_TOLERANCE, image_folder, read_rows, saliency_of  # noqa: E402
from fdcam.datasets import explain_dataset  # noqa: E402
from fdcam.images import load_image, preprocess  # noqa: E402
from fdcam.maps import to_input_size  # noqa: E402
from fdcam.models import spec_of  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_node_cluster_by_address(tmp_path, cluster, lite0):
    photos = image_folder(tmp_path / "images", 4, start=70)
    out = tmp_path / "out"
    result = explain_dataset(
        tmp_path / "images", out=out, actors=2, batch_size=1, ray_address=cluster.address, progress=False
    )
    assert not ray.is_initialized()  # disconnected from the cluster, which runs on
    assert (result.images, result.errors) == (4, 0)
    run = json.loads((out / "run.json").read_text())
    assert run["pool"] == {"actors": 2, "cpus_per_actor": 0.5, "gpus_per_actor": 0, "decode_tasks": 2}
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p.resolve()) for p in photos)
    cam = fdcam.FDCAM(lite0)
    for row in rows:
        x = preprocess(load_image(row["path"]), spec_of(lite0))
        with torch.no_grad():
            logits = lite0(x)[0]
        assert row["class"] == int(logits.argmax())
        assert abs(row["logit"] - float(logits[row["class"]])) <= 1e-5 * float(logits.abs().max())
        upsampled = to_input_size(saliency_of(row)[None, None], (224, 224))[0, 0]
        assert (upsampled - cam(x, row["class"])[0, 0]).abs().max() <= 4 * MAP_TOLERANCE


@pytest.mark.slow
def test_without_an_address_a_run_starts_its_own_ray_beside_a_running_one(cluster, monkeypatch):
    # ray.init() alone would join the cluster running on this machine (Ray's rule); a run without an address
    # gets a one-node Ray of its own, and $RAY_ADDRESS (what `ray job submit` sets) counts as an address given.
    from fdcam.datasets.cluster import ray_session

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session(None, quiet=True) as session:
        assert len(session.nodes()) == 1
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    with ray_session(None, quiet=True) as session:
        assert len([node for node in session.nodes() if node["Alive"]]) == 2
    assert not ray.is_initialized()
