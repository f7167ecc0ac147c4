"""Whole datasets on Ray Data: explain_dataset and evaluate_dataset write Parquet rows and run.json.

Modules: `sources` (images and the model spec that travels to workers), `workers` (decode tasks and actors),
`output` (staged Parquet files, resume), `pipeline` (the Ray Data pipeline), `cluster` (the Ray session, the
actor pool's size), `command` (`fdcam explain-dataset`, `fdcam evaluate --ray`). Ray and pyarrow (the `[ray]`
extra) are imported on first use of these names, so the CLI and the rest of fdcam work without them.
"""

from importlib import import_module

__all__ = [
    "DatasetInterrupted",
    "DatasetRun",
    "ModelRef",
    "PoolPlan",
    "evaluate_dataset",
    "explain_dataset",
    "plan_pool",
]

_HOMES = {name: ".sources" if name == "ModelRef" else ".pipeline" for name in __all__}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(_HOMES[name], __name__)
    except ModuleNotFoundError as error:
        if error.name not in ("ray", "pyarrow", "pandas"):
            raise
        raise ImportError(f'fdcam.datasets needs {error.name}: pip install "fdcam[ray]"') from None
    return getattr(module, name)
