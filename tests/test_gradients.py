"""fdcam.gradients: ∂f/∂A of a batch's targets from one backward through the tail, against a plain loop per image and
target differentiating the model's own modules (no fdcam split, no hooks)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fdcam.export.region import RegionTargets
from fdcam.forward import ForwardPass
from fdcam.gradients import TailGraph, image_major
from fdcam.split import split_model
from fdcam.targets import BatchTargets, RegionLogit, resolve_targets
from reference import assert_same_up_to_rounding


class SkipNet(nn.Module):
    """A small CNN whose split at `block` has a skip tensor (the stem's output) crossing it, with class logits [N,C]
    or a segmentation output [N,C,H,W]."""

    def __init__(self, classes: int = 6, segmentation: bool = False):
        super().__init__()
        self.segmentation = segmentation
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.after = nn.Conv2d(8, 8, 3, padding=1)
        self.classify = nn.Conv2d(8, classes, 1) if segmentation else nn.Linear(8, classes)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.stem(x))

    def rest(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.after(F.relu(b)) + a)
        return self.classify(c) if self.segmentation else self.classify(c.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.start(x)
        return self.rest(self.block(a), a)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(3)
    model = SkipNet().eval()
    x = torch.randn(3, 3, 12, 12)
    return model, x, split_model(model, "block", x)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(4)
    model = SkipNet(classes=4, segmentation=True).eval()
    x = torch.randn(2, 3, 10, 10)
    return model, x, split_model(model, "block", x)


def reference_gradients(model: SkipNet, x: torch.Tensor, scores) -> torch.Tensor:
    """[N,T,K,h,w]: for each image i and each score function f of scores[i] (output [1,...] → scalar),
    torch.autograd.grad(f(model.rest(A, a)), A) at A = model.block(a), one image and target at a time."""
    rows = []
    for i, row in enumerate(scores):
        grads = []
        for score in row:
            a = model.start(x[i : i + 1])
            activations = model.block(a).detach().requires_grad_(True)
            grads.append(torch.autograd.grad(score(model.rest(activations, a)), activations)[0][0])
        rows.append(torch.stack(grads))
    return torch.stack(rows)


def class_scores(classes: torch.Tensor) -> list:
    return [[lambda out, c=int(c): out[0, c] for c in row] for row in classes]


def test_one_class_per_image_uses_the_forwards_own_graph(classifier, monkeypatch):
    model, x, split = classifier
    classes = torch.tensor([[2], [5], [0]])
    forward = ForwardPass.run(split, x)
    calls = []
    original = split.tail.forward
    monkeypatch.setattr(split.tail, "forward", lambda *args: calls.append(1) or original(*args))
    got = forward.gradients(classes)
    assert calls == []  # the forward's graph, no second tail pass (and never the head)
    assert_same_up_to_rounding(got, reference_gradients(model, x, class_scores(classes)))
    again = forward.gradients(classes)  # the graph is spent: the tail runs again, same answer
    assert calls == [1]
    assert_same_up_to_rounding(again, got)


def test_several_classes_per_image_from_one_tail_pass(classifier, monkeypatch):
    model, x, split = classifier
    classes = torch.tensor([[3, 1, 0], [2, 2, 4], [5, 0, 1]])  # a class twice in a row too
    forward = ForwardPass.run(split, x)
    calls = []
    original = split.tail.forward
    monkeypatch.setattr(split.tail, "forward", lambda *args: calls.append(args[0].shape[0]) or original(*args))
    got = forward.gradients(classes)
    assert calls == [9]  # one tail pass on T image-major copies
    assert got.shape == (3, 3, 8, 12, 12)
    assert_same_up_to_rounding(got, reference_gradients(model, x, class_scores(classes)))


def test_image_major_copies_each_image_consecutively():
    tensor = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(image_major(tensor, 2), tensor.repeat_interleave(2, dim=0))
    assert image_major(tensor, 1) is tensor


def test_region_logit_targets(segmenter):
    model, x, split = segmenter
    masks = [torch.rand(10, 10, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    forward = ForwardPass.run(split, x)
    targets = resolve_targets(
        [[RegionLogit(1, masks[0]), RegionLogit(3, masks[1])], [RegionLogit(0, masks[2] > 0.5)] * 2], forward.logits
    )
    scores = [
        [lambda out: (out[0, 1] * masks[0]).sum(), lambda out: (out[0, 3] * masks[1]).sum()],
        [lambda out: (out[0, 0] * (masks[2] > 0.5).float()).sum()] * 2,
    ]
    expected = reference_gradients(model, x, scores)
    assert_same_up_to_rounding(forward.gradients(targets), expected)
    # The explainer graph's batch form of the same targets (export/region.py), through the same TailGraph.
    regions = torch.stack([torch.stack([masks[0], masks[1]]), (masks[2] > 0.5).float().expand(2, 10, 10)])
    batch = RegionTargets(torch.tensor([[1, 3], [0, 0]]), regions, forward.logits.shape[1:])
    graph = TailGraph(split.tail, forward.activations, forward.extras, copies=2)
    assert_same_up_to_rounding(graph.gradients(batch), expected)


def test_inputs_made_under_inference_mode(classifier, segmenter):
    model, x, split = classifier
    classes = [[4], [1], [2]]
    with torch.inference_mode():
        forward = ForwardPass.run(split, x.clone())
        one = forward.gradients(torch.tensor(classes))
        several = forward.gradients(torch.tensor([[0, 5]] * 3))
        resolved = forward.gradients(resolve_targets(torch.tensor([1, 2, 3]), forward.logits))
    assert_same_up_to_rounding(one, reference_gradients(model, x, class_scores(torch.tensor(classes))))
    assert_same_up_to_rounding(several, reference_gradients(model, x, class_scores(torch.tensor([[0, 5]] * 3))))
    assert_same_up_to_rounding(resolved, reference_gradients(model, x, class_scores(torch.tensor([[1], [2], [3]]))))

    model, x, split = segmenter
    with torch.inference_mode():
        mask = torch.rand(10, 10, generator=torch.Generator().manual_seed(9))
        forward = ForwardPass.run(split, x)
        got = forward.gradients(resolve_targets(RegionLogit(2, mask), forward.logits))
    expected = reference_gradients(model, x, [[lambda out: (out[0, 2] * mask.clone()).sum()]] * 2)
    assert_same_up_to_rounding(got, expected)


def test_traced_with_a_symbolic_batch_and_class_count(classifier):
    # What the explainer graph does (export/explainer.py): make_fx, symbolic N and T, then other N and T. (T = 4
    # in the trace: make_fx sizes a 3 like the 3×3 kernels, which the convolutions make static.)
    from torch.fx.experimental.proxy_tensor import make_fx

    model, x, split = classifier

    names = [name for name, _ in split.tail.named_parameters()]

    def gradients(weights, activations, skip, classes):
        # The weights are inputs, as export/tracing.py traces them (fake tensors throughout).
        tail = lambda *args: torch.func.functional_call(split.tail, dict(zip(names, weights)), args)  # noqa: E731
        graph = TailGraph(tail, activations, (skip,), copies=classes.shape[1])
        return graph.gradients(BatchTargets.from_classes(classes, graph.outputs.shape[1:]))

    weights = [parameter.detach() for parameter in split.tail.parameters()]
    forward = ForwardPass.run(split, x)
    (skip,) = forward.extras
    traced = make_fx(gradients, tracing_mode="symbolic")(
        weights, forward.activations[:2], skip[:2], torch.tensor([[1, 2, 3, 4]] * 2)
    )
    classes = torch.tensor([[4, 0], [1, 1], [5, 2]])
    got = traced(weights, forward.activations, skip, classes)
    assert_same_up_to_rounding(got, reference_gradients(model, x, class_scores(classes)))
