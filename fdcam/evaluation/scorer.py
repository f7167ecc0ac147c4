"""What runs the forwards of the curves and of Score-CAM / Group-CAM: torch, or ONNX Runtime once it matched torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..scoring import SCORERS, make_scorer, torch_scorer
from .items import log
from .specs import MethodSpec

__all__ = ["Scoring"]


class Scoring:
    """The forward-bound work's scorer, chosen on the first images that need it (see fdcam.scoring.make_scorer).

    `reference` (the channels-last torch copy) picks the predicted classes and is the scorer until
    then; Score-CAM and Group-CAM explainers get the chosen scorer for their masked forwards.
    """

    def __init__(self, model: torch.nn.Module, kind: str):
        if kind not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, not {kind!r}")
        self.kind = kind
        self.reference = torch_scorer(model)
        self.scorer: Any = None
        self.resolved: str | None = None

    def ready(self, explainers: Mapping[str, Any], specs: Sequence[MethodSpec], x: torch.Tensor) -> Any:
        """The scorer, made and checked against torch on x the first time, and handed to forward-bound explainers."""
        if self.scorer is None:
            self.scorer, self.resolved, note = make_scorer(self.reference, self.kind, x, reference=self.reference)
            if note:
                log(f"fdcam: note: scoring with torch: {note}")
            for s in specs:
                if s.method.uses_forward_scorer:
                    explainers[s.label].scorer = self.scorer
        return self.scorer
