"""The baselines against pytorch-grad-cam 1.5.7 (post-ReLU layer) and Group-CAM against a plain reference."""

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import fdcam
from reference import agreement, assert_same_up_to_rounding


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(10)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(11))


PAIRS = [
    (fdcam.GradCAM, pgc.GradCAM),
    (fdcam.GradCAMPlusPlus, pgc.GradCAMPlusPlus),
    (fdcam.XGradCAM, pgc.XGradCAM),
    (fdcam.LayerCAM, pgc.LayerCAM),
    (fdcam.ScoreCAM, pgc.ScoreCAM),
    (fdcam.AblationCAM, pgc.AblationCAM),
]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_baseline_matches_pytorch_grad_cam(resnet18, image, ours, theirs):
    cls = 17
    mine = ours(resnet18, "layer4")(image, targets=cls)[0, 0].numpy()
    with theirs(resnet18, [resnet18.layer4]) as reference:
        if hasattr(reference, "batch_size"):
            reference.batch_size = 64
        expected = reference(image, targets=[ClassifierOutputTarget(cls)])[0]
    corr, diff = agreement(mine, expected)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


def test_methods_registry_names_every_class():
    assert set(fdcam.METHODS) == {"gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "ablationcam", "groupcam", "fdcam"}
    for cls in fdcam.METHODS.values():
        assert issubclass(cls, fdcam.BaseCAM)


def _blur_reference(x):
    # torchvision's own Gaussian blur (reflect padding), independent of fdcam's separable conv.
    return torchvision.transforms.functional.gaussian_blur(x, kernel_size=[51, 51], sigma=[50.0, 50.0])


def groupcam_reference(model, layer, x, cls, groups=32):
    """Group-CAM as its authors' loop: one masked forward per group, numpy percentile threshold."""
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = layer.register_forward_hook(keep)
    logits = model(x)
    handle.remove()
    logits[0, cls].backward()
    model.zero_grad(set_to_none=True)
    activations, gradients = store["a"].detach(), store["a"].grad
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    weighted = alpha * activations
    h, w = x.shape[-2:]
    saliency = torch.zeros(1, 1, h, w)
    with torch.no_grad():
        blurred = _blur_reference(x)
        baseline = F.softmax(model(blurred), -1)[0, cls]
        for chunk in weighted.chunk(groups, 1):
            group_map = F.relu(chunk.sum(1, keepdim=True))
            threshold = np.percentile(group_map.numpy(), 70)
            group_map = torch.where(group_map > threshold, group_map, torch.zeros_like(group_map))
            group_map = F.interpolate(group_map, size=(h, w), mode="bilinear", align_corners=False)
            if group_map.max() == group_map.min():
                continue
            norm = (group_map - group_map.min()) / (group_map.max() - group_map.min())
            score = F.softmax(model(x * norm + blurred * (1 - norm)), -1)[0, cls] - baseline
            saliency += score * norm
    saliency = F.relu(saliency)[0, 0]
    return (saliency - saliency.min()) / (saliency.max() - saliency.min())


def test_groupcam_matches_plain_reference(resnet18, image):
    mine = fdcam.GroupCAM(resnet18, "layer4")(image, targets=17)[0, 0]
    expected = groupcam_reference(resnet18, resnet18.layer4, image, 17)
    corr, diff = agreement(mine, expected)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "ablationcam", "groupcam", "fdcam"])
def test_every_method_handles_batches_and_several_classes(resnet18, name):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    cam = fdcam.METHODS[name](resnet18, "layer4")
    both = cam(x, targets=[[1, 2], [3, 1]])
    assert both.shape == (2, 2, 64, 64) and both.dtype == torch.float32
    assert torch.isfinite(both).all() and both.min() >= 0 and both.max() <= 1
    assert_same_up_to_rounding(both[1, 0], cam(x[1:], targets=3)[0, 0])


@pytest.mark.parametrize("name, forwards", [("scorecam", 512), ("groupcam", 1 + 32)])
def test_perturbation_cams_run_their_forwards_on_a_scorer_with_the_same_maps(resnet18, image, name, forwards):
    from fdcam.scoring import OrtScorer

    ort_scorer, scored = OrtScorer(resnet18), []

    def counting(inputs):
        scored.append(inputs.shape[0])
        return ort_scorer(inputs)

    expected = fdcam.METHODS[name](resnet18, "layer4")(image, targets=17)
    on_ort = fdcam.METHODS[name](resnet18, "layer4", scorer=counting, batch_size=50)(image, targets=17)
    assert sum(scored) == forwards and max(scored) == min(forwards, 50)
    assert_same_up_to_rounding(on_ort, expected)
    small_batches = fdcam.METHODS[name](resnet18, "layer4", batch_size=7)(image, targets=17)
    assert_same_up_to_rounding(small_batches, expected)
