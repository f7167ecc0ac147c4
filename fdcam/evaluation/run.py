"""The set-up both evaluations share: rows, explainers, scorer, configuration, result store, kept maps, clock."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import models
from ..tail import tail_precision
from .items import Item
from .scorer import Scoring
from .specs import MethodSpec, as_specs
from .store import ResultStore

__all__ = ["EvaluationRun", "Run", "exact_fp32", "resolve_model_spec", "start_run"]


@dataclass
class EvaluationRun:
    """The JSON-able `summary` of a run and, for plots, the in-memory maps of the first few items."""

    summary: dict[str, Any]
    specs: list[MethodSpec]
    items: list[Item]
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # item id -> label -> [T,H,W]
    model_spec: models.ModelSpec | None = None  # the model's input format the run used


def exact_fp32(function):
    """Run an evaluation with TF32 off: torch's cuDNN default would compute maps and curves in TF32 on a GPU,
    and rank-based metrics move with the map's last bits. torch's flags are restored afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with tail_precision("fp32", torch.device("cpu")):
            return function(*args, **kwargs)

    return wrapper


def resolve_model_spec(model: torch.nn.Module, given: models.ModelSpec | str | None) -> models.ModelSpec:
    """The model's input format: `given` (a ModelSpec, or the name of a known model), else the spec
    fdcam.models.load attached to the models it makes; ValueError when there is neither."""
    if isinstance(given, models.ModelSpec):
        return given
    if given is not None:
        return models.spec(given)
    spec = models.spec_of(model)
    if spec is None:
        raise ValueError(
            "give model_spec (a fdcam.models.ModelSpec or a known model name) for a model not made by"
            " fdcam.models.load: evaluation needs its input size, normalisation and number of classes"
        )
    return spec


@dataclass
class Run:
    """One evaluation in progress: what `start_run` set up, the maps kept for plots, the skipped inputs."""

    specs: list[MethodSpec]
    spec: models.ModelSpec
    device: torch.device
    scoring: Scoring
    explainers: dict[str, Any]
    config: dict[str, Any]
    store: ResultStore
    keep_maps: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    maps_kept: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def prepare(self, x: torch.Tensor) -> Any:
        """Before explaining a chunk: the scorer (chosen on the first chunk), and every split built untimed."""
        scorer = self.scoring.ready(self.explainers, self.specs, x)
        for explainer in self.explainers.values():
            explainer.split_for(x[:1])  # traced once per input shape, so not timed as explaining
        return scorer

    def keep(self, item_id: str, label: str, saliency: torch.Tensor) -> None:
        """Keep an item's map for plots if it is one of the first `keep_maps` items."""
        if len(self.maps_kept) < self.keep_maps or item_id in self.maps_kept:
            self.maps_kept.setdefault(item_id, {})[label] = saliency.cpu().numpy()

    def finish(self, summary: dict[str, Any], items: list[Item], computed: int, resumed: int) -> EvaluationRun:
        """The run's result: `summary` with the counts, the scorer used and the wall time added."""
        summary["computed"], summary["resumed"] = computed, resumed
        summary["scorer"] = self.scoring.resolved
        summary["seconds"] = round(time.perf_counter() - self.started, 3)
        return EvaluationRun(summary, self.specs, items, self.maps_kept, self.spec)


def start_run(
    model: torch.nn.Module,
    spec: models.ModelSpec,
    methods: Sequence[MethodSpec] | str,
    metric: str,
    *,
    layer: str | None,
    batch_size: int | None,
    scorer: str,
    model_name: str | None,
    weights: str | None,
    partial_path: str | os.PathLike | None,
    resume: bool,
    keep_maps: int,
    skipped: list[dict[str, str]] | None = None,
    **config: Any,
) -> Run:
    """Rows, one explainer per row, the scorer, and the result store of the run's configuration.

    `spec` is the model's input format (see resolve_model_spec); its default layer is explained when
    `layer` is None. The configuration (which keys the stored records) is metric, model, weights, the
    resolved layer and the metric's own entries in `config`. Score-CAM and Group-CAM explain on the
    scorer's channels-last copy.
    """
    specs = as_specs(methods)
    layer = layer if layer is not None else spec.default_layer
    scoring = Scoring(model, scorer)
    explainers = {
        s.label: s.build(scoring.reference if s.method.uses_forward_scorer else model, layer, batch_size) for s in specs
    }
    config = {
        "metric": metric,
        "model": model_name or spec.name,
        "weights": weights,
        "layer": next(iter(explainers.values())).target_layer,
        **config,
    }
    store = ResultStore(partial_path, config, resume)
    device = next(model.parameters()).device
    return Run(
        specs, spec, device, scoring, explainers, config, store, keep_maps, skipped if skipped is not None else []
    )
