"""fdcam.serving.engine's TorchExplainer: one forward of the model per batch, the logits and the top-1 class taken
from the explanation itself, with the answers a separate forward gave; close() releases the explainer."""

import numpy as np
import pytest
import torch

import fdcam
from fdcam.images import load_image, preprocess
from fdcam.methods import METHODS
from fdcam.serving.engine import ServingConfig, TorchExplainer
from reference import assert_same_up_to_rounding
from test_explain_command import ForwardCounter


@pytest.fixture
def served(lite0, monkeypatch):
    """A TorchExplainer of the session's EfficientNet-Lite0 (no second copy is loaded); closed afterwards."""
    monkeypatch.setattr(fdcam.models, "load", lambda name, weights=None, device="cpu": lite0)
    explainers = []

    def make(method: str) -> TorchExplainer:
        explainers.append(TorchExplainer(ServingConfig(model="efficientnet_lite0", method=method, backend="torch")))
        return explainers[-1]

    yield make
    for explainer in explainers:
        explainer.close()


@pytest.mark.parametrize("method", ["gradcam", "fdcam"])
@pytest.mark.parametrize("classes", [None, np.array([[340, 1]], dtype=np.int64)], ids=["top1", "classes"])
def test_one_forward_per_batch_and_the_answers_of_a_separate_forward(served, lite0, data_dir, method, classes):
    explainer = served(method)
    spec = fdcam.models.spec_of(lite0)
    warm = preprocess(load_image(data_dir / "n02077923_sea_lion.JPEG"), spec)
    x = preprocess(load_image(data_dir / "n02391049_zebra.JPEG"), spec)
    explainer.explain(warm.numpy(), classes)  # builds the split (which runs the model once on its example)
    with ForwardCounter(lite0, x) as counter:
        logits, targets, saliency = explainer.explain(x.numpy(), classes)
    assert counter.count == 1

    # What the engine did before: the model's own forward for the logits and the top-1 class, then the method.
    with torch.no_grad():
        expected_logits = lite0(x)
    expected_targets = expected_logits.argmax(1, keepdim=True) if classes is None else torch.from_numpy(classes)
    np.testing.assert_array_equal(targets, expected_targets.numpy())
    assert targets.dtype == np.int64 and logits.dtype == np.float32
    assert_same_up_to_rounding(torch.from_numpy(logits), expected_logits)
    np.testing.assert_array_equal(saliency, METHODS[method](lite0)(x, expected_targets).numpy())


def test_close_closes_the_method(served, lite0):
    explainer = served("gradcam")
    explainer.close()
    assert explainer.cam.closed
    with pytest.raises(fdcam.ClosedError):
        explainer.explain(np.zeros((1, 3, *explainer.input_size), dtype=np.float32), None)
