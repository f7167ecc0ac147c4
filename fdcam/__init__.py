"""fdcam: FD-CAM and the CAM methods it is compared with, on any CNN layer, fast."""

from . import models, targets
from ._version import __version__
from .errors import (
    BoundsError,
    ClosedError,
    ExportError,
    FDCAMError,
    ImageError,
    LabelsError,
    ModelError,
    NonFiniteError,
    ProviderError,
    RequestError,
    ServerError,
    SplitError,
)
from .methods import (
    FDCAM,
    METHODS,
    AblationCAM,
    BaseCAM,
    GradCAM,
    GradCAMPlusPlus,
    GroupCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from .nodes import LayerInfo, layers
from .options import EngineOptions
from .split import SplitModel, split_model

__all__ = [
    "__version__",
    "models",
    "targets",
    "FDCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "ScoreCAM",
    "AblationCAM",
    "GroupCAM",
    "BaseCAM",
    "EngineOptions",
    "METHODS",
    "SplitModel",
    "split_model",
    "layers",
    "LayerInfo",
    "FDCAMError",
    "BoundsError",
    "ClosedError",
    "ExportError",
    "ImageError",
    "LabelsError",
    "ModelError",
    "NonFiniteError",
    "ProviderError",
    "RequestError",
    "ServerError",
    "SplitError",
]
