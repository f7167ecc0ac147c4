"""`OrtTail`: the `Tail` protocol over an ONNX Runtime session of an exported masked tail."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch

from fdcam.engine import PassPlan, TailForm, input_names, plan_passes
from fdcam.factorise import TailShortcut
from fdcam.mask_rows import expand_masks

__all__ = ["OrtTail"]


class OrtTail:
    """The `Tail` protocol over sessions of a tail's graph forms: N images' masked passes in as few
    `session.run`s as the memory budget allows (`row_bytes` per mask row; default budget
    `fdcam.engine.DEFAULT_MEMORY_BUDGET`), in chunks of (nearly) equal size, so ONNX Runtime reuses its memory plans.

    Torch tensors in, float32 logits out on the features' device. Each call's graph form is its pass
    plan's (fdcam.engine.plan_passes with the tail's `shortcut`, `TailForm.of`): like the torch tail, a
    call with classes runs the graph that computes only those rows of a last Linear (`selects_rows`), and
    a call whose `sparsity` bound fits every mask row runs the graph of gathered sums under that bound;
    every other call runs the dense all-classes graph (so a wrong bound costs speed, never exactness).
    `batch_size` (tail_batch_size) is at most that many mask rows per session run, as in the torch tail; a run
    holds whole images when they fit.
    `sessions(form)` gives (session, provider, stream) of a `TailForm`, exported on first use. On a
    CUDA session with CUDA tensors, inputs and the preallocated output are bound by pointer
    (IOBinding): nothing goes through the host. `runs` counts session runs; `bound_runs` the ones
    that went through IOBinding.
    """

    def __init__(
        self,
        sessions: Callable[[TailForm], tuple[ort.InferenceSession, str, int | None]],
        provider: str,
        *,
        num_extras: int = 0,
        shortcut: TailShortcut | None = None,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        row_bytes: int | None = None,
    ):
        self._sessions = sessions
        self._opened: dict[TailForm, tuple[ort.InferenceSession, str, int | None]] = {}
        self._provider = provider  # the requested one, until a session says which one it runs on
        self.num_extras = num_extras
        self.shortcut = shortcut  # the tail's shortcut the graphs may take (None: the plain graph only)
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.row_bytes = row_bytes  # memory one mask row's pass holds (fdcam.memory.row_bytes); None: 4× its features
        self.runs = 0
        self.bound_runs = 0
        self.forms_run: dict[TailForm, int] = {}  # session runs per graph form

    def opened(self, form: TailForm = TailForm()) -> tuple[ort.InferenceSession, str, int | None]:
        """(session, provider, CUDA stream or None) of a graph form, exported and opened on first use."""
        if form not in self._opened:
            self._opened[form] = self._sessions(form)
            self._provider = self._opened[form][1]
        return self._opened[form]

    def close(self) -> None:
        """Let go of the sessions this tail opened; the cache closes those no explainer uses (release_sessions)."""
        self._opened.clear()

    @property
    def session(self) -> ort.InferenceSession:
        """The session of the plain form (all classes, dense)."""
        return self.opened()[0]

    @property
    def provider(self) -> str:
        """The provider the sessions run on (building the plain form's session if none is open yet)."""
        if not self._opened:
            self.opened()
        return self._provider

    @property
    def on_gpu(self) -> bool:
        return self.provider in ("cuda", "tensorrt")

    @property
    def selects_rows(self) -> bool:
        """Whether a call with classes runs a graph that computes only those rows of a last Linear."""
        return self.shortcut is not None and self.shortcut.selects_rows

    def plan(
        self, features: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor | None, sparsity: int | None
    ) -> PassPlan:
        """The pass plan (fdcam.engine) of masks [N,M,K] on these features: its graph form is `TailForm.of(plan)`,
        its rows per session run `plan.rows` (the sparsity bound is checked on the masks: one host sync)."""
        return plan_passes(
            self.shortcut,
            features,
            num_rows=masks.shape[1],
            classes=classes is not None,
            masks=masks,
            sparsity=sparsity,
            batch_size=self.batch_size,
            memory_budget=self.memory_budget,
            row_bytes=self.row_bytes,
            engine="ort",
        )

    def form_for(
        self, features: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor | None, sparsity: int | None
    ) -> TailForm:
        """The graph form for masks [N,M,K]: a classes input when the graph can use it, the sparsity bound when
        every row is 0/1 with at most that many ones or zeros."""
        return TailForm.of(self.plan(features, masks, classes, sparsity))

    @torch.no_grad()
    def run(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        *,
        sparsity: int | None = None,
        score: object = None,
    ) -> torch.Tensor:
        """Float32 logits [N,M,C] of the tail on features [N,K,h,w] masked by masks [N,M,K] (or [M,K] shared),
        or [N,M,T] of `classes` [N,T]: all N images in as few session runs as the memory budget allows.

        `sparsity` promises at most that many ones or zeros per 0/1 row; it is checked, not trusted.
        Targets other than class logits of [N,C] logits (`score`) are refused in one line: the exported
        graphs return class logits only.
        """
        if score is not None:
            raise ValueError(
                "backend='onnxruntime' explains class-logit targets of [N,C] logits only; use backend='torch' for"
                f" other targets ({score!r})"
            )
        if len(extras) != self.num_extras:
            raise ValueError(f"this tail graph takes {self.num_extras} extra tensors, got {len(extras)}")
        masks = expand_masks(features, masks)
        n, m, _ = masks.shape
        plan = self.plan(features, masks, classes, sparsity)
        form = TailForm.of(plan)
        chosen_classes = classes.to(features.device, torch.long) if form.classes else None

        def once(images: slice, rows: slice) -> torch.Tensor:
            return self._run_once(
                form,
                features[images],
                masks[images, rows],
                [e[images] for e in extras],
                None if chosen_classes is None else chosen_classes[images],
            )

        rows = plan.rows
        outputs = []
        if rows >= m:  # whole images per run
            for images in _even_slices(n, rows // m):
                outputs.append(once(images, slice(None)))
        else:  # slices of one image's masks per run
            for i in range(n):
                outputs.append(torch.cat([once(slice(i, i + 1), part) for part in _even_slices(m, rows)], 1))
        logits = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if classes is not None and not form.classes:
            logits = logits.gather(2, classes.to(logits.device)[:, None, :].expand(-1, m, -1))
        return logits

    def rows_per_run(self, features: torch.Tensor, total: int) -> int:
        """Mask rows per session run: `batch_size` if set, else what the memory budget holds at `row_bytes`."""
        return plan_passes(
            None,
            features[:1],
            num_rows=total,
            batch_size=self.batch_size,
            memory_budget=self.memory_budget,
            row_bytes=self.row_bytes,
            engine="ort",
        ).rows

    def _run_once(
        self,
        form: TailForm,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor],
        classes: torch.Tensor | None,
    ) -> torch.Tensor:
        session, provider, stream = self.opened(form)
        self.runs += 1
        self.forms_run[form] = self.forms_run.get(form, 0) + 1
        try:
            if provider in ("cuda", "tensorrt") and features.is_cuda:
                self.bound_runs += 1
                width = _num_classes(session) if classes is None else classes.shape[1]
                return self._run_bound(session, stream, features, masks, extras, classes, width)
            return self._run_host(session, features, masks, extras, classes)
        except Exception as error:
            if not type(error).__module__.startswith("onnxruntime"):
                raise
            # ORT's errors are not RuntimeErrors; one line, with the usual remedy (out of memory).
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise RuntimeError(
                f"onnxruntime failed on {masks.shape[0]}×{masks.shape[1]} masks ({first_line}); "
                "if memory ran out, set memory_budget or batch_size to run them in chunks"
            ) from error

    @property
    def num_classes(self) -> int:
        """C, the tail's number of classes."""
        return _num_classes(self.session)

    @staticmethod
    def _run_host(
        session: ort.InferenceSession,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor],
        classes: torch.Tensor | None,
    ) -> torch.Tensor:
        """Numpy feeds: zero-copy views of contiguous CPU tensors (CUDA tensors are copied, for a CPU session)."""
        tensors = [_as_input(t).cpu() for t in (features, masks)]
        tensors += [] if classes is None else [classes.contiguous().cpu()]
        tensors += [_as_input(t).cpu() for t in extras]
        names = input_names(len(extras), classes is not None)
        feed = {name: tensor.numpy() for name, tensor in zip(names, tensors)}
        (logits,) = session.run(["logits"], feed)
        return torch.from_numpy(logits).to(features.device)

    @staticmethod
    def _run_bound(
        session: ort.InferenceSession,
        stream: int | None,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor],
        classes: torch.Tensor | None,
        width: int,
    ) -> torch.Tensor:
        """IOBinding on device pointers; the output is a torch tensor ORT writes into."""
        device = features.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        tensors = [(_as_input(t.to(device)), np.float32) for t in (features, masks)]
        tensors += [] if classes is None else [(classes.to(device).contiguous(), np.int64)]
        tensors += [(_as_input(t.to(device)), np.float32) for t in extras]
        logits = torch.empty((*masks.shape[:2], width), device=device, dtype=torch.float32)
        binding = session.io_binding()
        for name, (tensor, dtype) in zip(input_names(len(extras), classes is not None), tensors):
            binding.bind_input(name, "cuda", index, dtype, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("logits", "cuda", index, np.float32, tuple(logits.shape), logits.data_ptr())
        with _on_session_stream(stream, device):
            session.run_with_iobinding(binding)
        return logits


def _even_slices(total: int, most: int) -> list[slice]:
    """`total` items in the fewest slices of at most `most` each, their sizes differing by one at most."""
    count = -(-total // max(1, most))
    size, longer = divmod(total, count)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size + (index < longer))
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def _num_classes(session: ort.InferenceSession) -> int:
    """The static class axis of `logits`, else the num_classes our exporter writes in the metadata."""
    size = session.get_outputs()[0].shape[-1]
    if isinstance(size, int):
        return size
    return int(session.get_modelmeta().custom_metadata_map["num_classes"])


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


@contextlib.contextmanager
def _on_session_stream(stream: int | None, device: torch.device) -> Iterator[None]:
    """Order the session's stream after torch's current one and back, when they differ.

    The session was built on the then-current torch stream; if the caller has switched streams
    since, ORT's kernels must wait for the inputs written there and torch must wait for the logits.
    (ORT also synchronises its stream at the end of each run, so the logits are ready on return.)
    """
    current = torch.cuda.current_stream(device)
    if stream is None:  # ORT's own stream, unknown to torch: finish the inputs first
        current.synchronize()
        yield
        return
    if stream == current.cuda_stream:
        yield
        return
    session_stream = torch.cuda.ExternalStream(stream, device=device)
    session_stream.wait_stream(current)
    yield
    current.wait_stream(session_stream)
