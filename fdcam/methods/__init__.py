"""CAM methods as small classes over `BaseCAM`."""

from .ablation import AblationCAM
from .base import BaseCAM
from .fdcam import FDCAM
from .gradient import GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from .score import GroupCAM, ScoreCAM

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "groupcam": GroupCAM,
    "fdcam": FDCAM,
}

__all__ = [
    "BaseCAM",
    "FDCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "ScoreCAM",
    "AblationCAM",
    "GroupCAM",
    "METHODS",
]
