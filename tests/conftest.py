"""Session-wide test setup: a temporary graph cache, the model zoo (each big model loaded once) and shared inputs.

The zoo's models are shared by every test that asks for them, so no test may change them (fdcam never mutates a
user's model, and the tests hold it to that): each zoo fixture checks at the end of the session that the weights,
train/eval modes, requires_grad flags and hooks are as they were loaded. A test that changes a model on purpose
(weights, device, mode) works on `copy.deepcopy` of it or loads its own.
"""

import ctypes
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

# Under pytest-xdist (pyproject's `-n 2`) the workers share the machine's cores: one thread each, not two
# contending pairs.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep what the test process frees, for its next allocations, instead of giving it back.

    On this project's VM (firecracker, free page reporting) memory the process takes anew costs a host fault per
    page: a 256 MB buffer touched for the first time took 2.3 s, the same buffer again 0.04 s. The suite allocates
    and frees gigabytes (exports, sessions, VGG16's weights); kept, they are reused: tests/test_runtime.py went
    from 93 s (26 s in the kernel) to 74–85 s (9–15 s). The process's peak stays resident until it exits. The tests that
    measure memory measure it in a child process of their own, which this does not touch.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    mallopt(m_mmap_max, 0)  # large blocks from the heap too (mmapped blocks go back to the system when freed)
    mallopt(m_trim_threshold, 2**31 - 1)  # never shrink the heap


_keep_freed_memory()

DATA = Path(__file__).parent / "data"


# Under pytest-xdist (pyproject's `-n 2 --dist loadfile`) a file is one unit of work, so that a module's fixtures (a
# server, an export) are built once; the files that start Ray (in process or through the CLI) are one unit, run one
# after another, since two Rays side by side on a 2-core machine fight over its CPUs and see each other's actors.
RAY_FILES = {"test_datasets.py", "test_datasets_cluster.py", "test_datasets_command.py", "test_benchmark_dataset.py"}
# The longest units first (per-file times of the serial suite, 2026-12-07), so that the last unit to finish is short.
LONGEST_FIRST = ["ray", "test_explainer.py", "test_serve.py", "test_runtime.py", "test_explainer_region.py"]


def _unit(nodeid: str) -> str:
    """The unit of work of a test: its file's name, or "ray"."""
    name = Path(nodeid.split("::", 1)[0]).name
    return "ray" if name in RAY_FILES else name


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: no error where it is not installed
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the Ray files as one unit. (pytest-xdist's own `loadgroup` marks a group in the test's
    node id, which pytest 9 no longer takes: it would send every test alone.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return FileUnits(config, log)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip, in one place, on a machine without CUDA; an xdist worker lists the longest units
    first (the scheduler hands out units in the workers' order: `--no-loadscope-reorder`)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: files keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def fdcam_cache(tmp_path_factory) -> Path:
    """Every test, and every process it starts, writes exported tail graphs into a temporary folder, never into
    the user's cache. One folder for the session: graphs are content-hashed, so tests may share them (as a user's
    runs do); the tests of the cache itself make their own."""
    path = tmp_path_factory.mktemp("fdcam-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FDCAM_CACHE", str(path))
        yield path


def fingerprint(model: torch.nn.Module) -> tuple:
    """What a test must not change in a shared model: a float64 sum of every tensor, the modes, the
    requires_grad flags, the devices and the hooks."""
    with torch.no_grad():
        tensors = tuple((name, float(t.double().sum()), t.device.type) for name, t in model.state_dict().items())
    modules = tuple(
        (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
    )
    return tensors, modules, tuple(p.requires_grad for p in model.parameters())


def _unchanged(model: torch.nn.Module, name: str):
    before = fingerprint(model)
    yield model
    assert fingerprint(model) == before, f"a test changed the shared {name} model (use copy.deepcopy to change it)"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its ImageNet weights (the package's own), in eval mode."""
    import fdcam

    yield from _unchanged(fdcam.models.load("efficientnet_lite0"), "lite0")


@pytest.fixture(scope="session")
def vgg16_random():
    """VGG16 with random weights (seed 0), in eval mode."""
    import fdcam

    torch.manual_seed(0)
    yield from _unchanged(fdcam.models.load("vgg16", weights=None), "vgg16_random")


@pytest.fixture(scope="session")
def resnet50_random():
    """ResNet-50 with random weights (seed 0), in eval mode."""
    import fdcam

    torch.manual_seed(0)
    yield from _unchanged(fdcam.models.load("resnet50", weights=None), "resnet50_random")


@pytest.fixture(scope="session")
def lite0_fdcam(lite0, tmp_path_factory) -> Path:
    """Lite0's FD-CAM explainer graph with the default options (224×224, top-1), exported once: the explainer
    tests and the photo sweep read it, and none may write it."""
    from fdcam.export import export_explainer

    return export_explainer(lite0, tmp_path_factory.mktemp("lite0-fdcam") / "explainer.onnx")


@pytest.fixture(scope="session")
def lite0_fdcam_classes(lite0, tmp_path_factory) -> Path:
    """The same graph with the `classes` input, exported once for the explainer and the Node.js example's tests."""
    from fdcam.export import export_explainer

    path = tmp_path_factory.mktemp("lite0-fdcam-classes") / "explainer.onnx"
    return export_explainer(lite0, path, classes_input=True)


@pytest.fixture(scope="session")
def bomb(tmp_path_factory) -> Path:
    """A decompression bomb: a 14000×14000 PNG of a few kB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)  # 196 Mpx in a few kB
    return path


@pytest.fixture(scope="session")
def zebra_input():
    """The zebra photograph preprocessed for Lite0: [1,3,224,224]."""
    from fdcam.images import load_image, preprocess
    from fdcam.models import spec

    return preprocess(load_image(DATA / "n02391049_zebra.JPEG"), spec("efficientnet_lite0"))
