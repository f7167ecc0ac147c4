import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def lite0():
    import fdcam

    return fdcam.models.load("efficientnet_lite0")


@pytest.fixture(scope="session")
def vgg16_random():
    import fdcam

    torch.manual_seed(0)
    return fdcam.models.load("vgg16", weights=None)


@pytest.fixture(scope="session")
def zebra_input(lite0):
    from fdcam.images import load_image, preprocess
    from fdcam.models import spec_of

    return preprocess(load_image(DATA / "n02391049_zebra.JPEG"), spec_of(lite0))
