"""Names, defaults and checks of options shared by the methods, evaluation, export and the command line."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BACKENDS",
    "COMBINES",
    "EngineOptions",
    "FDCAM_DEFAULTS",
    "FDCAM_OPTIONS",
    "ORT_PRECISIONS",
    "ORT_PROVIDERS",
    "SWITCHES",
    "TORCH_PRECISIONS",
    "check_fdcam_options",
    "check_precision",
    "check_positive_int",
    "engine_changes",
    "invalid_choice",
]

#: Engines of the masked tail passes: torch, built in, and the ones fdcam.backends loads by name.
BACKENDS = ("torch", "onnxruntime")
#: Switch-pass math of the torch backend; ONNX Runtime has no bf16 graph.
TORCH_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
ORT_PRECISIONS = ("fp32", "tf32", "fp16")
#: ONNX Runtime execution providers of the onnxruntime backend ("auto": CUDA for GPU features when ORT has it).
ORT_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")

COMBINES = ("exp", "linear")  # w = α̂·exp(ŝ) − b, or α̂·ŝ − b
SWITCHES = ("on_off", "off")  # switch-on and switch-off scores, or switch-off only


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Options of the engine that runs masked tail passes (methods with `uses_tail_engine`), checked when made.

    `backend` "torch" or "onnxruntime"; `provider` (onnxruntime only) None/"auto", "cpu", "cuda" or
    "tensorrt"; `precision` of the passes, "fp32", "tf32", "fp16", or "bf16" on torch; `cuda_graph`
    (torch only) replays the passes as a CUDA graph on CUDA inputs; `tail_batch_size`: at most this
    many mask rows per tail call in every engine (torch chunks span images, ONNX Runtime runs whole
    images when they fit, the exported explainer graph one image's rows per chunk), else as many as
    `memory_budget` bytes hold (None: the engine's default). A bad value is a one-line ValueError.
    Checked here once; the engines take the checked values (fdcam.engine.plan_passes).
    """

    tail_batch_size: int | None = None
    memory_budget: int | None = None
    backend: str = "torch"
    provider: str | None = None
    precision: str = "fp32"
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise invalid_choice("backend", self.backend, BACKENDS)
        check_precision(self.backend, self.precision)
        if self.cuda_graph and self.backend != "torch":
            raise ValueError("cuda_graph applies to the torch backend; ONNX Runtime sessions run without it")
        if self.provider is not None:
            if self.backend == "torch":
                raise ValueError(
                    f"provider={self.provider!r} applies to the onnxruntime backend; "
                    "the torch backend runs on the input's device"
                )
            if str(self.provider).strip().lower() not in ORT_PROVIDERS:
                raise ValueError(f"provider must be one of {', '.join(ORT_PROVIDERS)}, not {self.provider!r}")
        for name in ("tail_batch_size", "memory_budget"):
            check_positive_int(name, getattr(self, name))

    def changed(self) -> dict[str, Any]:
        """The options not at their default, in field order."""
        return engine_changes(dataclasses.asdict(self))


def engine_changes(values: Mapping[str, Any]) -> dict[str, Any]:
    """The engine options in `values` (name -> value, unchecked) that differ from EngineOptions' defaults."""
    defaults = {field.name: field.default for field in dataclasses.fields(EngineOptions)}
    return {name: value for name, value in values.items() if value != defaults[name]}


#: FD-CAM's options and the paper's values: θ, the row quantile of the cosine matrix; b, the bias.
FDCAM_DEFAULTS: dict[str, Any] = {"theta": 0.95, "bias": 0.5, "combine": "exp", "switch": "on_off", "grouping": True}
FDCAM_OPTIONS = tuple(FDCAM_DEFAULTS)


def invalid_choice(name: str, value: object, choices: tuple[str, ...]) -> ValueError:
    """The one-line error for an option that is not one of `choices`."""
    listed = " or ".join(repr(choice) for choice in choices) if len(choices) == 2 else ", ".join(map(repr, choices))
    return ValueError(f"{name} must be {listed}, not {value!r}")


def check_precision(backend: str, precision: str) -> str:
    """The precision if `backend` ("torch" or "onnxruntime") has it, else a one-line ValueError."""
    precisions = TORCH_PRECISIONS if backend == "torch" else ORT_PRECISIONS
    if precision not in precisions:
        raise ValueError(
            f"precision must be one of {', '.join(precisions)} for the {backend} backend, not {precision!r}"
        )
    return precision


def check_positive_int(name: str, value: object) -> None:
    """ValueError (one line) unless `value` is None or a positive integer (bools are not integers here)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None, not {value!r}")


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
