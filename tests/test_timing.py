"""fdcam.timing: FD-CAM's stages are recorded when asked, exclusive, per thread, and change nothing."""

import threading
import time

import torch
from torch import nn

from fdcam import FDCAM, GradCAM, timing
from fdcam.timing import STAGES, record_stages, stage


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 5),
    ).eval()


def test_fdcam_records_every_stage_once_and_they_fit_in_the_call():
    model, x = _net(), torch.randn(2, 3, 12, 12)
    cam = FDCAM(model, "3")
    expected = cam(x)  # also builds the split, so the recorded call is an ordinary one
    with record_stages() as times:
        start = time.perf_counter()
        got = cam(x)
        wall = time.perf_counter() - start
    assert set(times.seconds) == set(STAGES)
    assert all(len(values) == 1 and values[0] >= 0 for values in times.seconds.values())
    assert times.total() <= wall
    assert torch.equal(got, expected)  # recording changes no number


def test_other_methods_record_the_stages_they_have():
    model, x = _net(), torch.randn(1, 3, 12, 12)
    with record_stages() as times:
        GradCAM(model, "3")(x)
    assert set(times.seconds) == {"head", "backward", "weights", "map"}


def test_nothing_is_recorded_outside_a_recorder_or_in_another_thread():
    assert stage("head") is stage("map")  # the shared no-op
    with record_stages() as times:
        worker = threading.Thread(target=lambda: FDCAM(_net(), "3")(torch.randn(1, 3, 12, 12)))
        worker.start()
        worker.join()
    assert times.seconds == {}
    with record_stages():
        assert stage("head") is not stage("map")  # a recorder gives each stage its own timer
    assert stage("head") is stage("map")  # the recorder is gone after its block


def test_a_stage_inside_another_is_taken_out_of_it(monkeypatch):
    ticks = iter([0.0, 1.0, 3.0, 6.0, 10.0, 11.0])  # outer in, inner in, inner out, outer out, other in/out
    monkeypatch.setattr(timing, "perf_counter", lambda: next(ticks))
    with record_stages() as times:
        with stage("weights"):
            with stage("switch"):
                assert times.seconds == {}  # a stage is recorded when it ends
        with stage("map"):
            assert "map" not in times.seconds
    assert times.seconds == {"switch": [2.0], "weights": [4.0], "map": [1.0]}
    assert times.total() == 7.0  # = the outer stages' 6 + 1: nothing counted twice
