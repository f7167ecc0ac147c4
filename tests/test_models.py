"""Tests for fdcam.models: offline loading, specs, weights handling and errors."""

import csv
from pathlib import Path

import pytest
import torch
import torchvision

from fdcam import models
from fdcam.images import load_image, preprocess

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def random_models(vgg16_random, resnet50_random):
    return {"vgg16": vgg16_random, "resnet50": resnet50_random}


def test_lite0_predicts_the_labelled_class_offline(lite0):
    with open(DATA / "labels.csv", newline="") as labels:
        rows = list(csv.DictReader(labels))
    assert len(rows) == 4
    spec = models.spec_of(lite0)
    batch = torch.cat([preprocess(load_image(DATA / row["file"]), spec) for row in rows])
    with torch.no_grad():
        predicted = lite0(batch).argmax(dim=1).tolist()
    assert predicted == [int(row["class_index"]) for row in rows]


def test_loaded_model_is_in_eval_mode_on_the_device_with_its_spec(lite0):
    assert not lite0.training
    assert all(parameter.device.type == "cpu" for parameter in lite0.parameters())
    assert models.spec_of(lite0) == models.spec("efficientnet_lite0")


@pytest.mark.parametrize(
    "name, layer", [("efficientnet_lite0", "_blocks.15"), ("vgg16", "features.30"), ("resnet50", "layer4")]
)
def test_spec_fields(name, layer):
    spec = models.spec(name)
    assert (spec.name, spec.default_layer, spec.input_size, spec.num_classes) == (name, layer, (224, 224), 1000)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)


def test_default_layers_are_modules_of_the_models(lite0, random_models):
    for model in (lite0, *random_models.values()):
        spec = models.spec_of(model)
        assert spec.default_layer in dict(model.named_modules())


def test_default_layer_outputs_a_spatial_map(lite0):
    layer = dict(lite0.named_modules())[models.spec_of(lite0).default_layer]
    seen = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        lite0(torch.zeros(1, 3, 224, 224))
    handle.remove()
    assert seen == [torch.Size([1, 320, 7, 7])]


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_random_models_give_1000_logits(random_models, name):
    model = random_models[name]
    assert not model.training and models.spec_of(model).name == name
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_names_are_forgiving_about_case_and_dashes():
    assert models.spec("EfficientNet-Lite0") is models.spec("efficientnet_lite0")
    assert set(models.NAMES) == {"efficientnet_lite0", "vgg16", "resnet50"}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(models.ModelError, match="efficientnet_lite0, vgg16, resnet50"):
        models.load("alexnet")
    with pytest.raises(models.ModelError, match="unknown model"):
        models.spec("resnet18")


def test_spec_of_foreign_model_is_none():
    assert models.spec_of(torch.nn.Linear(2, 2)) is None


def test_class_names_are_imagenet_and_a_copy():
    names = models.class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[243] == "bull mastiff"
    names.clear()
    assert len(models.class_names()) == 1000


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_imagenet_weights_missing_from_cache_say_how_to_supply_them(monkeypatch, tmp_path, name):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(models.ModelError) as raised:
        models.load(name)
    message = str(raised.value)
    assert "\n" not in message
    assert str(tmp_path / "checkpoints") in message
    assert "https://download.pytorch.org/models/" in message and "weights=PATH" in message


def test_imagenet_weights_found_in_the_hub_cache(monkeypatch, tmp_path, random_models):
    resnet = random_models["resnet50"]
    (tmp_path / "checkpoints").mkdir()
    v2_name = Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url).name
    torch.save(resnet.state_dict(), tmp_path / "checkpoints" / v2_name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loaded = models.load("resnet50")
    assert torch.equal(loaded.fc.weight, resnet.fc.weight)


def test_weights_path_accepts_a_wrapped_state_dict(tmp_path, random_models):
    resnet = random_models["resnet50"]
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": resnet.state_dict(), "epoch": 3}, path)
    loaded = models.load("resnet50", weights=path)
    assert torch.equal(loaded.conv1.weight, resnet.conv1.weight)
    assert models.spec_of(loaded).name == "resnet50"


def test_weights_of_another_model_are_refused(tmp_path, lite0):
    path = tmp_path / "lite0.pth"
    torch.save(lite0.state_dict(), path)
    with pytest.raises(models.ModelError, match=r"does not fit resnet50: \d+ missing keys .*unexpected keys"):
        models.load("resnet50", weights=path)


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "resnet50_10_classes.pth"
    torch.save(torchvision.models.resnet50(num_classes=10).state_dict(), path)
    with pytest.raises(models.ModelError, match=r"shape mismatches \(e\.g\. 'fc\.weight'"):
        models.load("resnet50", weights=path)


def test_garbage_weights_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(models.ModelError, match="cannot read weights file .*garbage.pth") as raised:
        models.load("efficientnet_lite0", weights=path)
    assert "\n" not in str(raised.value)


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(models.ModelError, match="weights file not found"):
        models.load("vgg16", weights=tmp_path / "nope.pth")


def test_tensor_instead_of_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(models.ModelError, match="does not hold a state_dict"):
        models.load("efficientnet_lite0", weights=path)
