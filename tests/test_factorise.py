"""Tests for fdcam.factorise: the factorised first Linear of a tail equals the masked tail."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdcam import FDCAM, models
from fdcam.factorise import FactorisedMaskedTail, factorised_masked_tail
from fdcam.split import split_model
from fdcam.tail import MaskedTail, TorchTail


def _split(model, layer, x):
    split = split_model(model, layer, x)
    with torch.no_grad():
        activations, *extras = split.head(x)
    return split, activations, tuple(extras)


def _relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def _masks(k, n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    binary = (torch.rand(n, k, generator=generator) > 0.5).float()
    weights = torch.rand(4, k, generator=generator)
    return torch.cat([torch.ones(1, k), torch.zeros(1, k), binary, weights])


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    model = models.load("vgg16", weights=None)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x, *_split(model, "features.30", x)


def test_vgg16_features30_factorised_equals_masked_tail(vgg16):
    _, _, split, activations, extras = vgg16
    factorised = factorised_masked_tail(split.tail, activations, extras)
    assert isinstance(factorised, FactorisedMaskedTail)
    assert (factorised.num_channels, factorised.block, factorised.out_features) == (512, 49, 4096)
    masks = _masks(512)
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, masks)
        got = factorised(activations, masks)
    assert got.shape == expected.shape == (masks.shape[0], 1000)
    assert _relative_error(got, expected) < 1e-5


def test_factorised_tail_shares_the_model_weights(vgg16):
    model, _, split, activations, extras = vgg16
    factorised = factorised_masked_tail(split.tail, activations, extras)
    assert factorised.linear.weight is model.classifier[0].weight
    parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in parameters for p in factorised.parameters())


def test_resnet50_layer4_is_factorised_too():
    # layer4 is followed by AdaptiveAvgPool2d → flatten → fc: the pattern applies (block of 1 per channel).
    torch.manual_seed(0)
    model = models.load("resnet50", weights=None)
    split, activations, extras = _split(model, "layer4", torch.randn(1, 3, 224, 224))
    factorised = factorised_masked_tail(split.tail, activations, extras)
    assert factorised is not None and factorised.block == 1
    masks = _masks(2048, n=16)
    with torch.no_grad():
        assert _relative_error(factorised(activations, masks), MaskedTail(split.tail)(activations, masks)) < 1e-5


def test_a_tail_starting_with_a_convolution_is_not_factorised_and_falls_back():
    model = models.load("efficientnet_lite0")
    split, activations, extras = _split(model, "_blocks.15", torch.randn(1, 3, 224, 224))
    assert factorised_masked_tail(split.tail, activations, extras) is None
    tail = TorchTail(split.tail)
    masks = _masks(activations.shape[1], n=8)
    assert tail.factorised_for(activations, extras) is None
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, masks, *extras)
    torch.testing.assert_close(tail.run(activations, masks, extras), expected)


class _Functional(nn.Module):
    """view(size, -1), F.dropout (eval), F.linear on a parameter, and a batch-size use after the Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(5, 6 * 4 * 4) * 0.1)
        self.bias = nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        a = F.avg_pool2d(F.relu(self.conv(x)), 2)
        a = a.view(a.size(0), -1)
        a = F.dropout(a, 0.5, training=False)
        z = F.relu(F.linear(a, self.weight, self.bias))
        return self.out(z.reshape(z.shape[0], -1))


def test_a_relu_between_the_target_and_the_linear_stops_the_pattern():
    torch.manual_seed(0)
    model = _Functional().eval()
    split, activations, extras = _split(model, "conv", torch.randn(1, 3, 8, 8))
    # The target is the conv; the relu after it is not linear, so nothing is factorised.
    assert factorised_masked_tail(split.tail, activations, extras) is None


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(5, 6 * 4 * 4) * 0.1)
        self.bias = nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        a = F.avg_pool2d(self.conv(x), 2)
        a = a.view(a.size(0), -1)
        a = F.dropout(a, 0.5, training=False)
        z = F.relu(F.linear(a, self.weight, self.bias))
        return self.out(z.reshape(z.shape[0], -1))


def test_functional_linear_view_and_batch_size_in_the_rest():
    torch.manual_seed(0)
    model = _Pooled().eval()
    split, activations, extras = _split(model, "conv", torch.randn(1, 3, 8, 8))
    factorised = factorised_masked_tail(split.tail, activations, extras)
    assert factorised is not None and factorised.block == 16
    masks = _masks(6, n=10)
    with torch.no_grad():
        assert _relative_error(factorised(activations, masks), MaskedTail(split.tail)(activations, masks)) < 1e-5


@pytest.mark.parametrize(
    ("prefix", "matches"),
    [
        (lambda a: a.mean((2, 3)), True),
        (lambda a: torch.mean(a, dim=(-1, -2)), True),
        (lambda a: F.adaptive_avg_pool2d(a, 1).squeeze(-1).squeeze(-1), True),
        (lambda a: F.adaptive_avg_pool2d(a, 1).flatten(1), True),
        (lambda a: a.mean(1).flatten(1)[:, :6], False),  # mixes channels
        (lambda a: F.avg_pool2d(a, 2).reshape(a.shape[0], -1)[:, :6], False),  # slicing is not recognised
    ],
    ids=["mean", "torch.mean", "squeeze", "flatten", "channel-mean", "slice"],
)
def test_global_pooling_prefixes(prefix, matches):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(prefix(self.conv(x)))

    torch.manual_seed(0)
    model = Net().eval()
    split, activations, extras = _split(model, "conv", torch.randn(1, 3, 8, 8))
    factorised = factorised_masked_tail(split.tail, activations, extras)
    assert (factorised is not None) == matches
    if matches:
        masks = _masks(6, n=10)
        with torch.no_grad():
            assert _relative_error(factorised(activations, masks), MaskedTail(split.tail)(activations, masks)) < 1e-5


def test_nonlinear_or_channel_mixing_prefixes_are_not_factorised():
    class MaxPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(torch.flatten(F.max_pool2d(self.conv(x), 2), 1))

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x).permute(0, 2, 3, 1), 1))

    for model in (MaxPooled().eval(), Permuted().eval()):
        split, activations, extras = _split(model, "conv", torch.randn(1, 3, 8, 8))
        assert factorised_masked_tail(split.tail, activations, extras) is None


def test_chunked_runs_equal_one_batch(vgg16):
    _, _, split, activations, extras = vgg16
    masks = _masks(512, n=40)
    one = TorchTail(split.tail)
    chunked = TorchTail(split.tail, batch_size=7)
    assert one.factorised_for(activations, extras) is not None
    whole = one.run(activations, masks, extras)
    pieces = chunked.run(activations, masks, extras)
    assert one.calls == 1 and chunked.calls == -(-masks.shape[0] // 7)
    assert _relative_error(pieces, whole) < 1e-5
    with torch.no_grad():
        assert _relative_error(whole, MaskedTail(split.tail)(activations, masks)) < 1e-5


def test_torch_tail_factorise_off_runs_the_masked_tail(vgg16):
    _, _, split, activations, extras = vgg16
    tail = TorchTail(split.tail, factorise=False)
    assert tail.factorised_for(activations, extras) is None
    masks = _masks(512, n=4)
    on = TorchTail(split.tail).run(activations, masks, extras)
    assert _relative_error(tail.run(activations, masks, extras), on) < 1e-5


def test_fdcam_maps_equal_with_factorise_on_and_off(vgg16, monkeypatch):
    model, x, *_ = vgg16
    on = FDCAM(model, "features.30")
    maps_on = on(x)
    assert any(t.factorised_for(on.split_for(x).head(x)[0]) is not None for t in on._tails.values())
    monkeypatch.setattr("fdcam.methods.base.TorchTail", functools.partial(TorchTail, factorise=False))
    off = FDCAM(model, "features.30")
    maps_off = off(x)
    assert all(not t.factorise for t in off._tails.values())
    torch.testing.assert_close(maps_on, maps_off, atol=1e-4, rtol=0)


def test_factorised_tail_leaves_the_shared_dropout_in_eval_after_export(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Dropout(),
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5),
    ).eval()
    split, activations, extras = _split(model, "1", torch.randn(1, 3, 8, 8))
    factorised = factorised_masked_tail(split.tail, activations, extras)
    assert factorised is not None and not factorised.training
    masks = _masks(8, n=6)
    path = tmp_path / "factorised.onnx"
    torch.onnx.export(
        factorised, (activations, masks), str(path), input_names=["features", "masks"], output_names=["logits"],
        dynamic_axes={"masks": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )
    assert not model[4].training  # the exporter's train-mode "restore" did not reach the user's dropout
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    more = torch.cat([masks, masks[:3]])
    (got,) = session.run(None, {"features": activations.numpy(), "masks": more.numpy()})
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, more).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_factorised_tail_exports_with_the_dynamo_exporter(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5),
    ).eval()
    split, activations, extras = _split(model, "1", torch.randn(1, 3, 8, 8))
    factorised = factorised_masked_tail(split.tail, activations, extras)
    masks = _masks(8, n=6)
    path = tmp_path / "factorised.onnx"
    torch.onnx.export(
        factorised, (activations, masks), str(path), input_names=["features", "masks"], output_names=["logits"],
        dynamic_shapes=({}, {0: torch.export.Dim("batch")}), dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    more = torch.cat([masks, masks[:3]])
    (got,) = session.run(None, {"features": activations.numpy(), "masks": more.numpy()})
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, more).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
