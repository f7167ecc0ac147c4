"""The engine of the masked tail passes: the pass planner (`plan`) every engine asks, and the torch engine.

The torch engine lives in fdcam.tail (with fdcam.precision, fdcam.cuda_graphs and fdcam.mask_rows), the
ONNX Runtime one in fdcam.runtime and the traced graph one in fdcam.export.graph_tail; each executes the
`PassPlan` that `plan_passes` makes.
"""

from .forms import TailForm, input_names
from .plan import DEFAULT_MEMORY_BUDGET, ENGINES, FORMS, PassPlan, chunk_size, plan_passes, sparse_side

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ENGINES",
    "FORMS",
    "PassPlan",
    "TailForm",
    "chunk_size",
    "input_names",
    "plan_passes",
    "sparse_side",
]
