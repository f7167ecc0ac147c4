"""Evaluation runs: RISE insertion/deletion over a folder of images and the pointing game on composites.

The library side of `fdcam evaluate` and of benchmarks/reproduce_tables.py. Runs are resumable:
every finished (image, method) pair is appended as one JSON line to a partial file, tagged with a
hash of the run's configuration; a later run with the same configuration skips the pairs it finds
there. Results are plain JSON-able dicts; `format_table` / `markdown_table` print them.

Modules: `specs` (table rows), `store` (results on disk), `items` (inputs), `scorer` (what runs
the forwards), `run` (the set-up both evaluations share), `insertion_deletion`, `pointing`,
`tables`, `plots`.
"""

from .insertion_deletion import DEFAULT_STEP, evaluate_insertion_deletion
from .plots import require_matplotlib, write_plots
from .pointing import evaluate_pointing_game, read_boxes
from .run import EvaluationRun
from .specs import FDCAM_OPTIONS, FDCAM_VARIANTS, MethodSpec, fdcam_defaults, method_specs
from .store import ResultStore, write_json_atomic
from .tables import format_table, markdown_table

__all__ = [
    "DEFAULT_STEP",
    "FDCAM_OPTIONS",
    "FDCAM_VARIANTS",
    "EvaluationRun",
    "MethodSpec",
    "ResultStore",
    "evaluate_insertion_deletion",
    "evaluate_pointing_game",
    "fdcam_defaults",
    "format_table",
    "markdown_table",
    "method_specs",
    "read_boxes",
    "require_matplotlib",
    "write_json_atomic",
    "write_plots",
]
