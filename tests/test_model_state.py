"""The user's model is never changed: modes, requires_grad, hooks, weights, grads — after success and errors."""

import gc
import resource

import pytest
import torch
import torchvision

import fdcam


def snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
            for m in model.modules()
        ],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same(before, after):
    for key in ("training", "requires_grad", "hooks"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grads"])
    assert before["state"].keys() == after["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(value, after["state"][name]), name


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()  # the user's mode: must come back as it was
    model.layer1.eval()
    for parameter in model.layer2.parameters():
        parameter.requires_grad_(False)
    return model


@pytest.mark.parametrize(  # Score-CAM's 512 whole-model forwards: in the slow tier
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "scorecam" else name for name in fdcam.METHODS]
)
def test_success_leaves_model_unchanged(model, name):
    before = snapshot(model)
    maps = fdcam.METHODS[name](model, "layer4")(torch.randn(1, 3, 64, 64), targets=[[1, 2]])
    assert maps.shape == (1, 2, 64, 64)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "layer, x, targets, error",
    [
        ("layer4", torch.randn(1, 3, 64, 64), 5000, "out of range"),
        ("layer4", torch.full((1, 3, 64, 64), float("nan")), None, "NaN"),
        ("layer4", torch.randn(3, 64, 64), None, "float tensor"),
        ("fc", torch.randn(1, 3, 64, 64), None, "2-D tensor"),
        ("layer4.1.relu_9", torch.randn(1, 3, 64, 64), None, "no layer named"),
        ("layer4", torch.randn(2, 3, 64, 64), [1, 2, 3], "3 targets for 2 images"),
    ],
)
def test_errors_leave_model_unchanged(model, layer, x, targets, error):
    before = snapshot(model)
    with pytest.raises(ValueError, match=error):
        fdcam.FDCAM(model, layer)(x, targets=targets)
    assert_same(before, snapshot(model))


def test_bad_layer_name_is_a_value_error(model):
    with pytest.raises(ValueError, match="no layer named"):
        fdcam.GradCAM(model, "layer9")


def test_memory_does_not_grow_over_200_calls():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()
    cam = fdcam.FDCAM(model, "3")
    x = torch.randn(2, 3, 32, 32)
    for _ in range(20):
        cam(x, targets=[[1, 2], [3, 4]])
    split, tails = cam.split_for(x), cam.tails
    gc.collect()
    tensors_before, rss_before = _live_tensors(), _rss_bytes()
    for _ in range(200):
        cam(x, targets=[[1, 2], [3, 4]])
    gc.collect()
    # Nothing is kept per call (exact), and the process does not grow by more than allocator noise.
    assert _live_tensors() <= tensors_before
    grown = _rss_bytes() - rss_before
    assert grown < 64 * 1024**2, f"resident memory grew by {grown / 1024**2:.1f} MiB over 200 calls"
    assert cam.split_for(x) is split and len(tails) == 1 and cam.tails == tails  # built once, reused


def _live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _rss_bytes() -> int:
    """Current (not peak) resident set size: peak RSS also moves with allocator and other tests' history."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
