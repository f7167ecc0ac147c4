"""Names, defaults and checks of options shared by the methods, evaluation, export and the command line."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = [
    "COMBINES",
    "ENGINE_DEFAULTS",
    "FDCAM_DEFAULTS",
    "FDCAM_OPTIONS",
    "ORT_PRECISIONS",
    "SWITCHES",
    "TORCH_PRECISIONS",
    "check_fdcam_options",
    "invalid_choice",
]

#: Switch-pass math of the torch backend; ONNX Runtime has no bf16 graph.
TORCH_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
ORT_PRECISIONS = ("fp32", "tf32", "fp16")

COMBINES = ("exp", "linear")  # w = α̂·exp(ŝ) − b, or α̂·ŝ − b
SWITCHES = ("on_off", "off")  # switch-on and switch-off scores, or switch-off only

#: Options of the engine that runs masked tail passes (methods with `uses_tail_engine`) and their defaults.
ENGINE_DEFAULTS: dict[str, Any] = {
    "tail_batch_size": None, "memory_budget": None, "backend": "torch", "provider": None, "precision": "fp32", "cuda_graph": False,
}

#: FD-CAM's options and the paper's values: θ, the row quantile of the cosine matrix; b, the bias.
FDCAM_DEFAULTS: dict[str, Any] = {"theta": 0.95, "bias": 0.5, "combine": "exp", "switch": "on_off", "grouping": True}
FDCAM_OPTIONS = tuple(FDCAM_DEFAULTS)


def invalid_choice(name: str, value: object, choices: tuple[str, ...]) -> ValueError:
    """The one-line error for an option that is not one of `choices`."""
    listed = " or ".join(repr(choice) for choice in choices) if len(choices) == 2 else ", ".join(map(repr, choices))
    return ValueError(f"{name} must be {listed}, not {value!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"FD-CAM {name} must be a number, not {value!r}")
    return float(value)


def check_fdcam_options(**options: Any) -> dict[str, Any]:
    """All FD-CAM options, checked: the given ones (None = default) over FDCAM_DEFAULTS, in FDCAM_OPTIONS order.

    theta and bias become floats, grouping a bool; an unknown name or a bad value is a one-line ValueError.
    """
    unknown = set(options) - set(FDCAM_OPTIONS)
    if unknown:
        raise ValueError(f"unknown FD-CAM option(s): {', '.join(sorted(unknown))}")
    full = {**FDCAM_DEFAULTS, **{key: value for key, value in options.items() if value is not None}}
    if full["combine"] not in COMBINES:
        raise invalid_choice("FD-CAM combine", full["combine"], COMBINES)
    if full["switch"] not in SWITCHES:
        raise invalid_choice("FD-CAM switch", full["switch"], SWITCHES)
    full["theta"], full["bias"] = _number("theta", full["theta"]), _number("bias", full["bias"])
    if not 0.0 <= full["theta"] <= 1.0:
        raise ValueError(f"FD-CAM theta must lie in [0, 1], not {full['theta']}")
    full["grouping"] = bool(full["grouping"])
    return {key: full[key] for key in FDCAM_OPTIONS}
