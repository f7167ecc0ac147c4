"""The pass planner: which form a set of masked tail passes takes, and how many rows a call runs.

Every engine asks `plan_passes` (the torch tail, the ONNX Runtime tail, the traced graph tail) and
executes the `PassPlan` it gets; every threshold lives here, with the reason beside it. The forms,
all exact (tested against the plain masked tail, tests/test_plan.py):

- "plain": the tail as it is on masked copies of the features (no shortcut, fdcam.factorise).
- "shortcut-dense": the tail's shortcut with its first op as one dense product of the masks.
- "gathered": the first op's pre-activations as gathered sums over `bound` channels of each 0/1 row.
- "sets": gathered sums, one per distinct channel set, serving its switch-on and switch-off rows.
- "group-sums": the passes of boolean channel groups summed from per-channel contributions directly,
  no mask rows built (`group_passes`).

`classes` says whether only the requested classes' rows of a last Linear are computed, `rows` how
many mask rows a tail call runs (images' rows in one call for "plain", "shortcut-dense" and
"gathered"; one image's rows for "sets"; groups for "group-sums").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fdcam.factorise import TailShortcut

__all__ = [
    "CONV_SPARSE_SHARE",
    "CPU_CHUNK_BYTES",
    "CPU_CONV_SET_CHUNK_BYTES",
    "CPU_SET_CHUNK_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_TAIL_BYTES",
    "ENGINES",
    "FORMS",
    "GATHER_CHUNK_BYTES",
    "LINEAR_SETS_SHARE",
    "LINEAR_SPARSE_SHARE",
    "PassPlan",
    "chunk_size",
    "plan_passes",
    "sparse_side",
]

#: The engines that execute plans: TorchTail ("torch"), fdcam.runtime's OrtTail ("ort"), the explainer
#: graph's GraphTail ("graph").
ENGINES = ("torch", "ort", "graph")
FORMS = ("plain", "shortcut-dense", "gathered", "sets", "group-sums")

# Bytes the torch and ONNX Runtime tails' passes of one call may hold, unless memory_budget says otherwise.
DEFAULT_MEMORY_BUDGET = 1024**3
# The traced graph holds one image's chunk of rows at a time, whatever N; a smaller default suits servers.
DEFAULT_TAIL_BYTES = 256 * 1024**2
# On CPUs, a convolution's chunks whose rows fit the allocator's reused blocks beat one huge fresh buffer.
CPU_CHUNK_BYTES = 16 * 1024**2
# Rows of a chunk of the groups' products (a first Linear's group sums): about what the CPU's caches hold.
CPU_SET_CHUNK_BYTES = 2 * 1024**2
# Channel sets of a convolution per chunk: each set's batched product is small (Lite0: [1280,17]×[17,49]), and
# fewer, larger products beat keeping the chunk's element-wise passes in a core's cache. Lite0's switch stage
# (2 cores, 2026-12-07, separate processes, median of 25): 57–66 ms at 2 MB a chunk, 34–42 at 8 MB, 38–40 at 16 MB;
# with the sets taken from the groups and channels-last rows (fdcam/set_passes.py; one process, 40 interleaved calls,
# four runs), 12 MB took 0.94–0.98 of 8 MB's time, 10 MB 0.95–0.96, 16 MB 0.93–1.12, 6 MB 1.05–1.09.
CPU_CONV_SET_CHUNK_BYTES = 12 * 1024**2
# The graph's gathered convolution sums per chunk: ONNX Runtime's batched products and element-wise passes
# are several times faster on a few MB than on one large tensor.
GATHER_CHUNK_BYTES = 4 * 1024**2
# A gathered sum over g of K channels replaces a dense product when g is at most this share of K.
CONV_SPARSE_SHARE = 0.25
# For a first Linear the dense product is one efficient GEMM, so gathering pays only when very sparse.
LINEAR_SPARSE_SHARE = 0.05
# Per channel set on CPUs, a first Linear's rows take one sum per set whatever its size (a row is never
# more than half on its sparse side), and the sums of the denser sets one product (`gathered_sums`).
LINEAR_SETS_SHARE = 0.5


@dataclass(frozen=True)
class PassPlan:
    """How an engine runs a set of masked tail passes (see the module docstring for the forms).

    `bound`: channels per row of the gathered sums ("gathered", "sets"; None otherwise); `classes`: only the
    requested classes' rows of a last Linear; `rows`: rows per tail call; `engine`: who asked.
    """

    form: str
    classes: bool = False
    bound: int | None = None
    rows: int = 1
    engine: str = "torch"

    @property
    def shortcut(self) -> bool:
        """Whether the tail's shortcut (fdcam.factorise) runs the passes."""
        return self.form != "plain"

    @property
    def gathers(self) -> bool:
        """Whether the first op's pre-activations are gathered sums under `bound`."""
        return self.form in ("gathered", "sets")


def sparse_side(masks: torch.Tensor) -> int | None:
    """The most entries any row of `masks` has on its sparse side (ones or zeros), or None when a row is not
    0/1 or there are none (one host sync)."""
    if masks.numel() == 0:
        return None
    k = masks.shape[-1]
    ones = masks.sum(-1)
    largest = torch.minimum(ones, k - ones).max()
    binary = ((masks == 0) | (masks == 1)).all()
    is_binary, largest = torch.stack([binary.to(largest.dtype), largest]).tolist()
    return int(largest) if is_binary else None


def chunk_size(
    features: torch.Tensor, memory_budget: int | None, batch_size: int | None, total: int, output_numel: int = 0
) -> int:
    """How many mask rows to run per tail call: `batch_size` if given, else what fits `memory_budget` bytes.

    The budget is split over the masked copies of the features, with a factor of 4 for the tail's
    own intermediate activations; passes whose whole outputs are scored (`output_numel` elements a
    row, a segmentation map) also hold the output and its scoring's temporaries, counted twice.
    """
    if batch_size is not None:
        return max(1, min(int(batch_size), total))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    per_mask = (4 * features[0].numel() + 2 * output_numel) * features.element_size()
    return max(1, min(total, budget // max(per_mask, 1)))


def plan_passes(
    shortcut: TailShortcut | None,
    features: torch.Tensor,
    *,
    num_rows: int,
    classes: bool = False,
    masks: torch.Tensor | None = None,
    sparsity: int | None = None,
    groups: bool = False,
    precision: str = "fp32",
    batch_size: int | None = None,
    memory_budget: int | None = None,
    output_numel: int = 0,
    row_bytes: int | None = None,
    cache_bytes: int | None = None,
    engine: str = "torch",
) -> PassPlan:
    """The plan of `num_rows` masked passes per image of `features` [N,K,h,w] on a tail with `shortcut`.

    `classes`: the caller asks for some classes' logits only; `masks` [N,M,K]: the mask rows, measured
    (one host sync) by the torch and ONNX Runtime engines when gathering could apply (the graph engine
    cannot measure traced masks and trusts `sparsity`, the promised most ones or zeros per 0/1 row);
    `groups`: the passes are FD-CAM's switch rows of boolean channel groups (`group_passes`), which a
    "group-sums" or graph "sets" plan computes from the groups themselves; other plans build the mask
    rows. `batch_size` mask rows per tail call at most (every engine: the torch tail's chunks span images, the
    ONNX Runtime tail's runs hold whole images when they fit, the graph runs one image's rows at a time),
    else what `memory_budget` bytes hold (`row_bytes` a row on ONNX
    Runtime, measured once per tail; `cache_bytes` the graph's gathered chunks); `output_numel`: elements of
    each pass's output scored whole (a segmentation map). `precision` "fp32" on a CPU runs channel sets.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    k = features.shape[1]
    n = features.shape[0]
    selects = classes and shortcut is not None and shortcut.selects_rows
    budget = {"batch_size": batch_size, "memory_budget": memory_budget, "output_numel": output_numel}
    budget.update(row_bytes=row_bytes, cache_bytes=cache_bytes)
    if shortcut is None:
        return PassPlan("plain", selects, None, _rows(None, "plain", features, n * num_rows, engine, **budget), engine)
    per_set = engine == "torch" and features.device.type == "cpu" and precision == "fp32"
    if groups:
        form = _group_form(shortcut, k, classes, sparsity, batch_size, engine, per_set)
        if form is not None:
            bound = sparsity if form == "sets" else None
            return PassPlan(form, selects, bound, _rows(shortcut, form, features, k, engine, **budget), engine)
    bound = _bound(shortcut, k, masks, sparsity, per_set, engine)
    form = "shortcut-dense" if bound is None else "sets" if per_set else "gathered"
    total = num_rows if form == "sets" else n * num_rows
    return PassPlan(form, selects, bound, _rows(shortcut, form, features, total, engine, **budget), engine)


def _group_form(
    shortcut: TailShortcut, k: int, classes: bool, sparsity: int | None, batch_size, engine: str, per_set: bool
):
    """ "group-sums" or "sets" when the groups are summed without mask rows, else None (mask rows)."""
    from fdcam.factorise.shortcut import _is_pointwise

    if engine == "torch":
        # A tail whose first op is its last Linear scores a group as a sum of class contributions (one product
        # of the groups with them); where channel sets run (`per_set`), a 1×1 convolution's group is one gathered
        # sum serving both its rows, `sparsity` the largest group measured by the caller. A batch_size given asks
        # for mask rows in chunks of that size, so they run.
        if not classes or batch_size is not None:
            return None
        if shortcut.kind == "linear" and shortcut.first_is_final:
            return "group-sums"
        pointwise = shortcut.kind == "conv" and _is_pointwise(shortcut.conv)
        return "sets" if per_set and pointwise and _trusted_bound(shortcut, k, sparsity) is not None else None
    if engine == "graph":
        # In the graph a first Linear's group sums are one batched product; a 1×1 convolution's one gathered
        # sum per group (the group bound is static) serves both of its rows.
        if shortcut.kind == "linear":
            return "group-sums"
        pointwise = shortcut.kind == "conv" and _is_pointwise(shortcut.conv)
        if pointwise and _trusted_bound(shortcut, k, sparsity) is not None:
            return "sets"
    return None


def _trusted_bound(shortcut: TailShortcut, k: int, sparsity: int | None) -> int | None:
    """The exported graphs gather a first convolution's channels under a stated bound only (a first Linear's
    dense product is one GEMM there); the bound names a graph (TailForm), so it is never a measured one."""
    if shortcut.kind == "conv" and sparsity is not None and 1 <= sparsity <= CONV_SPARSE_SHARE * k:
        return sparsity
    return None


def _bound(
    shortcut: TailShortcut, k: int, masks: torch.Tensor | None, sparsity: int | None, per_set: bool, engine: str
) -> int | None:
    """How many entries per row the gathered sums take, or None for the dense product."""
    if engine == "graph":
        return _trusted_bound(shortcut, k, sparsity)
    if engine == "ort":
        bound = _trusted_bound(shortcut, k, sparsity)
        if bound is None or masks is None:  # no masks: the graph form for the stated bound
            return bound
        side = sparse_side(masks)  # checked, not trusted: a wrong bound costs speed, never exactness
        return bound if side is not None and side <= bound else None
    if not shortcut.sparse_capable or masks is None:
        return None
    side = sparse_side(masks)
    if side is None:
        return None
    bound = sparsity if sparsity is not None and side <= sparsity else side
    # Per channel set (CPU, fp32) a first Linear takes 0/1 rows of any density (`LINEAR_SETS_SHARE`).
    share = CONV_SPARSE_SHARE if shortcut.kind == "conv" else LINEAR_SETS_SHARE if per_set else LINEAR_SPARSE_SHARE
    return max(1, bound) if bound <= share * k else None


def _rows(
    shortcut: TailShortcut | None,
    form: str,
    features: torch.Tensor,
    total: int,
    engine: str,
    *,
    batch_size: int | None,
    memory_budget: int | None,
    output_numel: int,
    row_bytes: int | None,
    cache_bytes: int | None,
) -> int:
    """Rows per tail call of a plan's form, for `total` rows."""
    size = features.element_size()
    k = features.shape[1]
    if engine == "ort":
        # ONNX Runtime: what the budget holds at the measured bytes of one row's pass (4× its features unmeasured).
        if batch_size is not None or row_bytes is None:
            return chunk_size(features, memory_budget, batch_size, total)
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        return max(1, min(total, budget // max(1, row_bytes)))
    if engine == "graph":
        if batch_size is not None:  # one image's rows per chunk: batch_size is never more than that
            return max(1, int(batch_size))
        budget = DEFAULT_TAIL_BYTES if memory_budget is None else int(memory_budget)
        row = features[0].numel()
        if shortcut is not None and shortcut.kind == "linear":
            # A row costs the first Linear's output (and the masks' row), not a masked copy of the features.
            row = shortcut.out_features + k
        elif shortcut is not None:
            row = max(row, shortcut.row_numel)
            if form in ("gathered", "sets"):
                chunk = GATHER_CHUNK_BYTES if cache_bytes is None else int(cache_bytes)
                return max(1, chunk // max(shortcut.row_numel * size, 1))
        return max(1, budget // max((4 * row + 2 * output_numel) * size, 1))
    if form == "group-sums":
        # The groups as floats, a cache-sized chunk of rows of the [K,K] groups at a time.
        return max(1, CPU_SET_CHUNK_BYTES // (k * size))
    if shortcut is not None and shortcut.kind == "linear" and batch_size is None:
        # A row costs the first Linear's output, not a masked copy; one chunk makes the next Linear one GEMM.
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        per_row = (4 * shortcut.out_features + 2 * output_numel) * size
        return max(1, min(total, budget // per_row))
    step = chunk_size(features, memory_budget, batch_size, total, output_numel)
    if batch_size is None and not features.is_cuda:
        # On CPUs, chunks of masked copies (and of whole outputs scored, segmentation maps) that the allocator reuses,
        # not one buffer of up to the whole budget faulted in anew at every call (glibc maps blocks over 32 MB afresh
        # each time). ResNet-50 at layer4.2.conv3, 2048 plain passes: Ablation-CAM 1.2–1.3 s → 0.25 s, FD-CAM
        # 2.6–2.7 → 0.50–0.55 s; LR-ASPP's 3840 region passes at 32 px: 1.4–1.7 s → 0.36–0.42 s.
        step = min(step, chunk_size(features, CPU_CHUNK_BYTES, None, total, output_numel))
    if shortcut is None or shortcut.kind != "conv":
        return step
    if form == "sets":
        # A convolution's sets run in chunks of a few rows that stay in the CPU's caches through the body.
        sets = batch_size or max(1, CPU_CONV_SET_CHUNK_BYTES // (shortcut.row_numel * size))
        return min(sets, step) if output_numel else sets
    if batch_size is None and not features.is_cuda:
        step = min(step, max(1, CPU_CHUNK_BYTES // (shortcut.row_numel * size)))
    return step
