"""Target objects: resolution (ints, lists, pytorch-grad-cam targets, one-line errors), output selection, and every
method explaining a ClassLogit / ClassProbability / Output target as the int form or a hand computation."""

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, SemanticSegmentationTarget
from torch import nn

import fdcam
import nets
from fdcam.targets import (
    BatchTargets,
    ClassLogit,
    ClassProbability,
    Output,
    RegionLogit,
    TopK,
    resolve_targets,
    select_output,
)
from reference import assert_same_up_to_rounding


@pytest.fixture(scope="module")
def small_cnn():
    """A classifier with 16 channels at "features.3": the perturbation methods run 16 forwards, not 512."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(3)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))


def _scores(targets, output):
    return resolve_targets(targets, output).score(output)


def test_ints_lists_and_lists_of_lists_resolve_to_class_logits():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    assert resolve_targets(None, logits).classes.tolist() == logits.argmax(1, keepdim=True).tolist()
    assert resolve_targets(3, logits).classes.tolist() == [[3], [3]]
    assert resolve_targets([3, 5], logits).classes.tolist() == [[3], [5]]
    assert resolve_targets([[3, 4], [5, 6]], logits).classes.tolist() == [[3, 4], [5, 6]]
    assert resolve_targets(torch.tensor([[1], [2]]), logits).classes.tolist() == [[1], [2]]
    assert resolve_targets(np.int64(7), logits).classes.tolist() == [[7], [7]]
    assert resolve_targets([ClassLogit(3), 5], logits).classes.tolist() == [[3], [5]]
    assert torch.equal(_scores([[3, 4], [5, 6]], logits), logits.gather(1, torch.tensor([[3, 4], [5, 6]])))


def test_pytorch_grad_cam_targets_give_the_same_numbers_as_the_fdcam_ones():
    generator = torch.Generator().manual_seed(1)
    logits, segmentation = torch.randn(2, 10, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    mask = (torch.rand(8, 8, generator=generator) > 0.5).numpy().astype(np.float32)
    ours = _scores([ClassLogit(2), ClassLogit(7)], logits)
    theirs = _scores([ClassifierOutputTarget(2), ClassifierOutputTarget(7)], logits)
    assert torch.equal(ours, theirs) and torch.equal(ours[:, 0], torch.stack([logits[0, 2], logits[1, 7]]))
    pgc = SemanticSegmentationTarget(3, mask)
    expected = torch.stack([pgc(row) for row in segmentation])  # pytorch-grad-cam's own call, row by row
    assert torch.allclose(_scores(pgc, segmentation)[:, 0], expected)
    assert torch.allclose(_scores(RegionLogit(3, mask), segmentation)[:, 0], expected)
    # Any other callable is applied to each row, as pytorch-grad-cam does.
    assert torch.allclose(_scores(lambda row: row.max(), logits)[:, 0], logits.max(1).values)


def test_class_probability_and_output_targets_score_the_output():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_scores(ClassProbability(4), logits)[:, 0], logits.softmax(1)[:, 4])
    assert torch.allclose(_scores(Output(lambda out: out[:, :3].sum(1)), logits)[:, 0], logits[:, :3].sum(1))
    segmentation = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_scores(ClassLogit(1), segmentation)[:, 0], segmentation[:, 1].sum((1, 2)))
    assert torch.allclose(
        _scores(RegionLogit(1, torch.ones(5, 5, dtype=torch.bool)), segmentation), _scores(ClassLogit(1), segmentation)
    )


@pytest.mark.parametrize(
    "targets, output, message",
    [
        ([1, 2, 3], torch.zeros(2, 10), r"^got 3 targets for 2 images; give one entry \(or one list\) per image$"),
        ([1], torch.zeros(2, 10), r"^got 1 targets for 2 images"),
        ([[1, 2], [3]], torch.zeros(2, 10), r"^every image needs the same number of targets$"),
        (10, torch.zeros(2, 10), r"^class index 10 is out of range for a model with 10 classes$"),
        ([ClassLogit(-1)], torch.zeros(1, 10), r"^class index -1 is out of range"),
        (1.5, torch.zeros(1, 10), r"^targets must be None, a class index or target, or one per image, not float$"),
        ([1.5], torch.zeros(1, 10), r"^a target must be an integer class index"),
        ("cat", torch.zeros(1, 10), r"^targets must be class indices or target objects"),
        (
            RegionLogit(1, torch.ones(4, 4)),
            torch.zeros(1, 3, 5, 5),
            r"^the region mask is \(4, 4\) but the model's output map is \(5, 5\)$",
        ),
        (RegionLogit(1, torch.ones(4, 4)), torch.zeros(1, 3), r"^RegionLogit needs a segmentation output"),
        (None, torch.zeros(1, 3, 5, 5), r"^give targets: the model's output is \(1, 3, 5, 5\)"),
        (torch.tensor([0.5]), torch.zeros(1, 3), r"^targets must be integer class indices"),
        (TopK(4), torch.zeros(1, 3), r"^TopK\(4\) asks for more classes than the model's 3$"),
        (TopK(1), torch.zeros(1, 3, 5, 5), r"^TopK takes \[N,C\] logits; the model's output is \(1, 3, 5, 5\)$"),
    ],
)
def test_targets_that_do_not_fit_are_one_line_errors(targets, output, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_targets(targets, output)
    assert "\n" not in str(error.value)


def test_topk_takes_each_images_k_largest_logits_most_likely_first():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, -2.0, 0.0, 4.0]])
    resolved = resolve_targets(TopK(3), logits)
    assert resolved.classes.tolist() == [[1, 3, 0], [3, 0, 2]]
    assert resolve_targets(TopK(1), logits).classes.tolist() == resolve_targets(None, logits).classes.tolist()
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="TopK needs a positive integer number of classes"):
            TopK(k)


def test_too_few_targets_for_the_batch_is_an_error_not_a_blank_map(resnet18, images):
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        fdcam.GradCAM(resnet18, "layer4")(images, targets=[ClassifierOutputTarget(3)])


def test_select_output_defaults_to_out_and_takes_a_key_or_an_index():
    a, b = torch.zeros(1), torch.ones(1)
    assert select_output({"out": a, "aux": b}) is a
    assert select_output({"out": a, "aux": b}, "aux") is b
    assert select_output((a, b), 1) is b
    assert select_output(a) is a
    for output, selector, message in [
        ({"logits": a}, None, r"^the model returns a dict with keys \['logits'\]: give output= to choose one$"),
        ({"out": a}, "x", r"no entry 'x'"),
        ((a, b), None, r"^the model returns a tuple of 2: give output= \(an index\) to choose one$"),
        (a, "out", r"selects from a dict or tuple, but the model returns a single tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            select_output(output, selector)


class TwoHeads(nn.Module):
    """A classifier returning (auxiliary logits, logits): explained at output=1 it is its second head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.aux = nn.Linear(3, 5)

    def forward(self, x):
        return self.aux(x.mean((2, 3))), self.model(x)


@pytest.mark.parametrize("name", ["gradcam", "fdcam", "scorecam"])
def test_a_tuple_output_is_explained_at_the_selected_entry(small_cnn, images, name):
    expected = fdcam.METHODS[name](small_cnn, "0.3")(images, targets=[1, 2])
    wrapped = TwoHeads(small_cnn).eval()
    got = fdcam.METHODS[name](wrapped, "model.0.3", output=1)(images, targets=[1, 2])
    assert_same_up_to_rounding(got, expected)
    with pytest.raises(ValueError, match="give output="):
        fdcam.METHODS[name](wrapped, "model.0.3")(images, targets=[1, 2])


@pytest.mark.parametrize("name", list(fdcam.METHODS))
def test_every_method_explains_class_logit_targets_as_the_int_form(small_cnn, images, name):
    explainer = fdcam.METHODS[name](small_cnn, "0.3")
    expected = explainer(images, targets=[[3, 1], [5, 2]])
    got = explainer(images, targets=[[ClassLogit(3), ClassifierOutputTarget(1)], [ClassLogit(5), ClassLogit(2)]])
    assert torch.equal(got, expected)


def test_gradcam_of_a_class_probability_is_the_gradient_of_the_softmax(resnet18, images):
    store = {}
    handle = resnet18.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        probabilities = resnet18(images[:1]).softmax(1)
        (gradient,) = torch.autograd.grad(probabilities[0, 4], store["a"])
    finally:
        handle.remove()
    activations = store["a"].detach()[0]
    cam = torch.relu((gradient[0].mean((1, 2))[:, None, None] * activations).sum(0))
    cam = torch.nn.functional.interpolate(cam[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    expected = (cam - cam.min()) / (cam.max() - cam.min())
    got = fdcam.GradCAM(resnet18, "layer4")(images[:1], targets=ClassProbability(4))[0, 0]
    assert_same_up_to_rounding(got, expected)


def test_batch_targets_from_class_indices_keep_the_tensor():
    classes = torch.tensor([[1, 2]])
    targets = BatchTargets.from_classes(classes, (10,))
    assert targets.classes is classes and targets.shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# numpy integers


def test_numpy_integer_targets_are_accepted():
    model, x = nets.small_net(), nets.small_images(2)
    cam = fdcam.GradCAM(model, "conv3")
    expected = cam(x, targets=[3, 4])
    assert torch.equal(cam(x, targets=[np.int64(3), np.int64(4)]), expected)
    assert torch.equal(cam(x, targets=np.array([3, 4])), expected)
    assert torch.equal(cam(x[:1], targets=np.int64(3)), cam(x[:1], targets=3))
