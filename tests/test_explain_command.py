"""fdcam explain: one forward of the model per explanation (the top-k classes come from the explainer's own logits),
with the same classes, probabilities and maps as a separate top-k forward gave."""

import numpy as np
import pytest
import torch
from torch import nn

import fdcam
from fdcam.cli import main
from fdcam.images import MAX_OUTPUT_SIDE, load_image, output_size, preprocess, resize_map
from fdcam.methods import METHODS

METHOD_NAMES = ("gradcam", "fdcam")
TOPK = 2


class ForwardCounter:
    """Counts the model's forwards of one image: calls of its leaf modules that take the image as their input
    (the first layer, whichever it is), by forward hooks that are removed on exit."""

    def __init__(self, model: nn.Module, image: torch.Tensor):
        self.leaves = [module for module in model.modules() if not any(module.children())]
        self.image, self.count, self.handles = image, 0, []

    def __enter__(self) -> "ForwardCounter":
        def hook(module, inputs, output):
            first = inputs[0] if inputs else None
            if isinstance(first, torch.Tensor) and first.shape[1:] == self.image.shape[1:]:
                self.count += sum(torch.equal(row, self.image[0]) for row in first)

        self.handles = [leaf.register_forward_hook(hook) for leaf in self.leaves]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def lite0_command(lite0, monkeypatch):
    """`fdcam explain` runs on the session's EfficientNet-Lite0: no second copy is loaded."""
    monkeypatch.setattr(fdcam.models, "load", lambda name, weights=None, device="cpu": lite0)
    return lite0


def test_explain_runs_the_model_once_per_explanation_with_todays_results(lite0_command, data_dir, tmp_path, capsys):
    model = lite0_command
    first, second = data_dir / "n02391049_zebra.JPEG", data_dir / "n02077923_sea_lion.JPEG"
    spec = fdcam.models.spec_of(model)
    x = preprocess(load_image(second), spec)
    arguments = [
        "explain",
        str(first),
        str(second),
        "--method",
        ",".join(METHOD_NAMES),
        "--topk",
        str(TOPK),
        "--out",
        str(tmp_path),
    ]
    with ForwardCounter(model, x) as counter:  # the second image: the first one's forwards also build the splits
        assert main(arguments) == 0
    assert counter.count == len(METHOD_NAMES)  # one forward per method, no separate forward for the top-k
    assert not any(leaf._forward_hooks for leaf in counter.leaves)  # the model is left as it was
    table = capsys.readouterr().out

    # What the command did before: the model's own forward for the top-k, then each method on those classes.
    with torch.no_grad():
        probabilities = torch.softmax(model(x), dim=1)[0]
    classes = probabilities.topk(TOPK).indices.tolist()
    image = load_image(second)
    width, height = output_size(image.size, MAX_OUTPUT_SIDE)
    for name in METHOD_NAMES:
        maps = METHODS[name](model)(x, targets=[classes])[0]
        for class_index, saliency in zip(classes, maps):
            written = np.load(tmp_path / f"{second.stem}_{name}_{class_index}.npy")
            np.testing.assert_array_equal(written, resize_map(saliency, (height, width)).numpy())
            assert f"{class_index}  " in table and f"{float(probabilities[class_index]):.3f}" in table
