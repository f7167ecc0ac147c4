"""fdcam.errors: one base class for every error class, importable from `fdcam`, old bases and old homes kept."""

import ast
import importlib

import pytest
import torch
from torch import nn

import fdcam
from fdcam import errors
from test_imports import package_modules

ERROR_NAMES = [name for name in errors.__all__ if name != "first_line"]

# The built-in base each error had before FDCAMError: `except ValueError` / `except RuntimeError` still catch them.
BUILT_IN_BASE = {
    "SplitError": ValueError,
    "ImageError": ValueError,
    "BoundsError": ValueError,
    "ModelError": ValueError,
    "LabelsError": ValueError,
    "NonFiniteError": ValueError,
    "RequestError": ValueError,
    "ExportError": RuntimeError,
    "ProviderError": RuntimeError,
    "ServerError": RuntimeError,
    "ClosedError": RuntimeError,
}

# Where each error was importable from before it moved to fdcam.errors: the same class object there.
OLD_HOMES = {
    "SplitError": "fdcam.split",
    "ImageError": "fdcam.images",
    "BoundsError": "fdcam.bounds",
    "ModelError": "fdcam.models",
    "LabelsError": "fdcam.composites",
    "NonFiniteError": "fdcam.methods.base",
    "RequestError": "fdcam.serving.engine",
    "ExportError": "fdcam.export",
    "ProviderError": "fdcam.runtime",
    "ServerError": "fdcam.serving.client",
}


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_error_is_importable_from_fdcam_and_derives_from_the_base(name):
    error = getattr(fdcam, name)
    assert name in fdcam.__all__
    assert error is getattr(errors, name)
    assert issubclass(error, fdcam.FDCAMError)
    if name != "FDCAMError":
        assert issubclass(error, BUILT_IN_BASE[name])


def test_every_error_keeps_its_old_home():
    for name, module in OLD_HOMES.items():
        assert getattr(importlib.import_module(module), name) is getattr(fdcam, name), (name, module)


def test_no_module_defines_a_public_error_outside_fdcam_errors():
    """A new public error class (in its module's __all__) belongs in fdcam.errors, so that fdcam exports it."""
    found = []
    for module, file in package_modules().items():
        tree = ast.parse(file.read_text())
        public = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                elements = getattr(node.value, "elts", [])
                public = {element.value for element in elements if isinstance(element, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in public and module != "fdcam.errors":
                bases = [ast.unparse(base) for base in node.bases]
                if any(base.endswith(("Error", "Exception")) for base in bases):
                    found.append(f"{module}.{node.name}")
    assert found == []


def test_an_error_raised_by_fdcam_is_caught_by_the_base_and_by_its_old_base():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(fdcam.FDCAMError, match="no layer named"):
        fdcam.split_model(model, "missing", torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        fdcam.split_model(model, "missing", torch.zeros(1, 3, 8, 8))
