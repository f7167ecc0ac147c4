"""The forward pass of a split model: activations, logits and class gradients against autograd on the whole model."""

import pytest
import torch
import torchvision

from fdcam.forward import ForwardPass
from fdcam.split import split_model
from reference import assert_same_up_to_rounding


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(1)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    return model, x, split_model(model, "layer4", x)


def _whole_model_gradients(model, x, targets):
    """∂f_c/∂A [N,T,K,h,w] at layer4 by autograd through the unsplit model, one image and class at a time."""
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        rows = []
        for i in range(x.shape[0]):
            row = []
            for c in targets[i]:
                logits = model(x[i : i + 1])
                row.append(torch.autograd.grad(logits[0, c], store["a"])[0][0])
            rows.append(torch.stack(row))
    finally:
        handle.remove()
    return torch.stack(rows)


def test_forward_pass_equals_the_whole_model(resnet):
    model, x, split = resnet
    forward = ForwardPass.run(split, x)
    with torch.no_grad():
        assert_same_up_to_rounding(forward.logits, model(x))
    assert forward.activations.shape == (2, 512, 2, 2) and not forward.logits.requires_grad


def test_gradients_equal_autograd_through_the_whole_model(resnet):
    model, x, split = resnet
    targets = torch.tensor([[3, 5], [7, 3]])
    grads = ForwardPass.run(split, x).gradients(targets)
    assert grads.shape == (2, 2, 512, 2, 2)
    assert_same_up_to_rounding(grads, _whole_model_gradients(model, x, targets))


def test_every_call_gives_the_gradients_of_its_own_targets(resnet):
    # The first one-class call uses the forward's graph, later calls run the tail again: same answers.
    model, x, split = resnet
    forward = ForwardPass.run(split, x)
    first, second = torch.tensor([[3], [7]]), torch.tensor([[5], [1]])
    expected = _whole_model_gradients(model, x, torch.cat([first, second], 1))
    assert_same_up_to_rounding(forward.gradients(first), expected[:, :1])
    assert_same_up_to_rounding(forward.gradients(second), expected[:, 1:])
    assert_same_up_to_rounding(forward.gradients(first), expected[:, :1])
    assert_same_up_to_rounding(forward.gradients(torch.cat([second, first], 1)), expected.flip(1))


def test_a_pass_built_from_tensors_runs_the_tail_for_its_gradients(resnet):
    model, x, split = resnet
    run = ForwardPass.run(split, x)
    built = ForwardPass(split, run.activations[1:], tuple(e[1:] for e in run.extras), run.logits[1:])
    targets = torch.tensor([[4]])
    assert_same_up_to_rounding(built.gradients(targets), _whole_model_gradients(model, x[1:], targets))


def test_non_4d_layer_is_refused():
    model = torchvision.models.resnet18().eval()
    split = split_model(model, "avgpool", torch.randn(1, 3, 64, 64))
    assert ForwardPass.run(split, torch.randn(1, 3, 64, 64)).activations.shape == (1, 512, 1, 1)  # 4-D: allowed
    split = split_model(model, "fc", torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="2-D tensor"):
        ForwardPass.run(split, torch.randn(1, 3, 64, 64))
