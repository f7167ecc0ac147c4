"""Tests for fdcam.tail: the Tail protocol, MaskedTail, chunk_size and the torch backend TorchTail."""

import pytest
import torch
from torch import nn

from fdcam.split import split_model
from fdcam.tail import MaskedTail, Tail, TorchTail, chunk_size


class Residual(nn.Module):
    """A residual block, so a split inside it has an extra (the skip tensor) crossing the cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        skip = torch.relu(self.stem(x))
        y = torch.relu(self.conv1(skip))
        y = self.conv2(y) + skip
        return self.fc(torch.flatten(self.pool(torch.relu(y)), 1))


class Mlp(nn.Module):
    """Conv features then adaptive pool, flatten and an MLP: the factorisable pattern."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _masks(k, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=generator) > 0.5).float()


def _head(model, layer, x):
    split = split_model(model, layer, x)
    with torch.no_grad():
        activations, *extras = split.head(x)
    return split, activations, tuple(extras)


def test_masked_tail_equals_the_tail_on_masked_copies_with_extras_broadcast():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    split, activations, extras = _head(model, "conv1", x)
    assert len(extras) == 1
    masks = _masks(8, 5)
    with torch.no_grad():
        got = MaskedTail(split.tail)(activations, masks, *extras)
        expected = torch.cat([split.tail(activations * m[None, :, None, None], *extras) for m in masks])
    torch.testing.assert_close(got, expected)


def test_masked_tail_wrapper_is_in_eval_mode_without_touching_the_model():
    model = Mlp().train()
    wrapper = MaskedTail(model)
    assert not wrapper.training
    assert model.training and model.classifier[2].training


@pytest.mark.parametrize("model_class, layer", [(Residual, "conv1"), (Mlp, "features.1")])
@pytest.mark.parametrize("factorise", [True, False])
def test_torch_tail_is_a_tail_and_equals_masked_tail_in_any_chunking(model_class, layer, factorise):
    torch.manual_seed(0)
    model = model_class().eval()
    split, activations, extras = _head(model, layer, torch.randn(1, 3, 8, 8))
    k = activations.shape[1]
    masks = _masks(k, 11)
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, masks, *extras)
    for batch_size in (None, 1, 4, 11, 50):
        tail = TorchTail(split.tail, batch_size=batch_size, factorise=factorise)
        assert isinstance(tail, Tail)
        got = tail.run(activations, masks, extras)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert tail.calls == -(-11 // min(batch_size or 11, 11))
        assert not got.requires_grad


def test_torch_tail_factorises_the_mlp_pattern_only():
    torch.manual_seed(0)
    mlp_split, mlp_features, _ = _head(Mlp().eval(), "features.1", torch.randn(1, 3, 8, 8))
    residual_split, residual_features, residual_extras = _head(Residual().eval(), "conv1", torch.randn(1, 3, 8, 8))
    assert TorchTail(mlp_split.tail).factorised_for(mlp_features) is not None
    assert TorchTail(mlp_split.tail, factorise=False).factorised_for(mlp_features) is None
    assert TorchTail(residual_split.tail).factorised_for(residual_features, residual_extras) is None


def test_torch_tail_builds_the_factorised_module_once_per_feature_shape():
    torch.manual_seed(0)
    model = Mlp().eval()
    split, activations, _ = _head(model, "features.1", torch.randn(1, 3, 8, 8))
    tail = TorchTail(split.tail)
    first = tail.factorised_for(activations)
    assert tail.factorised_for(activations * 2) is first
    _, larger, _ = _head(model, "features.1", torch.randn(1, 3, 12, 12))
    second = tail.factorised_for(larger)
    assert second is not None and second is not first
    masks = _masks(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(tail.run(larger, masks), MaskedTail(split.tail)(larger, masks), rtol=1e-5, atol=1e-6)


def test_memory_budget_sets_the_chunks():
    torch.manual_seed(0)
    split, activations, extras = _head(Mlp().eval(), "features.1", torch.randn(1, 3, 8, 8))
    per_mask = 4 * activations[0].numel() * activations.element_size()
    tail = TorchTail(split.tail, memory_budget=3 * per_mask)
    tail.run(activations, _masks(6, 10), extras)
    assert tail.calls == 4


def test_chunk_size():
    features = torch.zeros(1, 4, 2, 2)
    per_mask = 4 * 16 * 4
    assert chunk_size(features, None, 7, 100) == 7
    assert chunk_size(features, None, 500, 100) == 100
    assert chunk_size(features, None, 0, 100) == 1
    assert chunk_size(features, 10 * per_mask, None, 100) == 10
    assert chunk_size(features, 1, None, 100) == 1
    assert chunk_size(features, None, None, 100) == 100
