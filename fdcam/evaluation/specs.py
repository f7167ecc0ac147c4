"""The rows of a results table: methods with options, FD-CAM's ablation variants, their labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..methods import METHODS
from ..options import FDCAM_DEFAULTS, FDCAM_OPTIONS, EngineOptions, check_fdcam_options

__all__ = ["FDCAM_OPTIONS", "FDCAM_VARIANTS", "MethodSpec", "fdcam_defaults", "fdcam_spec", "method_specs"]

# The FD-CAM ablations of the paper's Table III (grouping / switch) and Table IV (combination).
# Each is a set of overrides on the FD-CAM options (the defaults, or the ones given by the user).
FDCAM_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "group-off": {"switch": "off"},  # grouping, switch-off scores only
    "no-group-off": {"switch": "off", "grouping": False},  # single channels, switch-off only
    "no-group": {"grouping": False},  # single channels, switch on and off
    "linear": {"combine": "linear"},  # w = a*s - b
    "linear-nobias": {"combine": "linear", "bias": 0.0},
    "exp-nobias": {"bias": 0.0},  # w = a*exp(s)
}


def fdcam_defaults() -> dict[str, Any]:
    """FDCAM's default options (theta, bias, combine, switch, grouping)."""
    return dict(FDCAM_DEFAULTS)


@dataclass(frozen=True)
class MethodSpec:
    """One row of a results table: a method of METHODS with options, under a unique label."""

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    variant: str | None = None

    @property
    def method(self) -> type:
        """The method's class in METHODS (its `uses_tail_engine` / `uses_forward_scorer` say what it runs)."""
        return METHODS[self.name]

    def build(self, model: torch.nn.Module, layer: str | None = None, batch_size: int | None = None):
        """The explainer.

        `batch_size` is the rows of its batched passes (mask rows or perturbed inputs), if it runs any.
        """
        method = self.method
        engine = EngineOptions(tail_batch_size=batch_size) if method.uses_tail_engine else None
        forward_batch_size = batch_size if method.uses_forward_scorer else None
        return method(
            model, target_layer=layer, engine=engine, forward_batch_size=forward_batch_size, **dict(self.options)
        )

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"method": self.name, "options": dict(self.options)}
        if self.variant:
            described["variant"] = self.variant
        return described


def fdcam_spec(options: Mapping[str, Any], variant: str | None = None) -> MethodSpec:
    """The FD-CAM row for `options` (None = default), labelled by the options that differ from the defaults."""
    full = check_fdcam_options(**options)
    changed = [f"{key}={full[key]}" for key in FDCAM_OPTIONS if full[key] != FDCAM_DEFAULTS[key]]
    label = f"fdcam[{','.join(changed)}]" if changed else "fdcam"
    return MethodSpec(label, "fdcam", tuple(full.items()), variant)


def method_specs(
    methods: str | Sequence[str] = "all",
    fdcam_options: Mapping[str, Any] | None = None,
    variants: Sequence[str] = (),
) -> list[MethodSpec]:
    """Table rows for method names (a list or a comma-separated string, 'all' = every method).

    `fdcam_options` (theta, bias, combine, switch, grouping; None = default) configure 'fdcam';
    each FD-CAM variant (names of FDCAM_VARIANTS) adds a row with its overrides on top of them,
    labelled by the options that differ from the defaults, e.g. 'fdcam[switch=off,grouping=False]'.
    Duplicate rows are dropped.
    """
    if isinstance(methods, str):
        methods = [part for part in methods.split(",")]
    names: list[str] = []
    for name in (str(part).strip().lower() for part in methods):
        if not name:
            continue
        if name == "all":
            names.extend(METHODS)
        elif name in METHODS:
            names.append(name)
        else:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    fdcam_options = dict(fdcam_options or {})
    specs = [fdcam_spec(fdcam_options) if name == "fdcam" else MethodSpec(name, name) for name in names]
    for variant in variants:
        variant = variant.strip().lower()
        if not variant:
            continue
        if variant not in FDCAM_VARIANTS:
            raise ValueError(f"unknown FD-CAM variant {variant!r}; known variants: {', '.join(FDCAM_VARIANTS)}")
        specs.append(fdcam_spec({**fdcam_options, **FDCAM_VARIANTS[variant]}, variant))
    unique: dict[str, MethodSpec] = {}
    for spec in specs:
        unique.setdefault(spec.label, spec)
    if not unique:
        raise ValueError("no methods to evaluate")
    return list(unique.values())


def as_specs(methods: Sequence[MethodSpec] | str) -> list[MethodSpec]:
    """Rows from a comma-separated string of names, or the rows given."""
    return method_specs(methods) if isinstance(methods, str) else list(methods)
