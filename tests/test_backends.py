"""fdcam.backends: tail engines register themselves; the core finds them by name without importing them."""

import pytest
import torch
from torch import nn

from fdcam import FDCAM, backends
from fdcam.backends import BACKENDS, tail_backend
from reference import assert_same_up_to_rounding


def test_onnxruntime_is_provided_by_fdcam_runtime():
    from fdcam import runtime

    backend = tail_backend("onnxruntime")
    assert backend.build is runtime.ort_tail and backend.fingerprint is runtime.tail_fingerprint
    assert BACKENDS == ("torch", "onnxruntime")
    assert backends._PROVIDED_BY == {"onnxruntime": "fdcam.runtime"}  # every name but the built-in torch has a module
    assert backend.release is runtime.release_sessions


def test_an_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime"):
        tail_backend("tensorflow")
    with pytest.raises(ValueError, match="backend must be 'torch' or 'onnxruntime', not 'tensorflow'"):
        FDCAM(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), "0", backend="tensorflow")


def test_fdcam_through_the_registered_backend_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)).eval()
    x = torch.randn(2, 3, 10, 10)
    assert_same_up_to_rounding(FDCAM(model, "1", backend="onnxruntime")(x), FDCAM(model, "1")(x))
