"""The shared machinery of every CAM method: split, forward pass, targets, gradients, maps, and close()."""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
from torch import nn

from ..backends import tail_backend
from ..concurrency import running, tracing
from ..errors import ClosedError, NonFiniteError
from ..forward import ForwardPass
from ..fxgraph import is_traced
from ..maps import to_input_size, weighted_sum
from ..model_state import preserved_model_state
from ..options import EngineOptions, check_positive_int, engine_changes
from ..split import SplitModel, resolve_layer_name, split_model
from ..tail import Tail, TorchTail
from ..targets import OutputSelector, Targets, resolve_targets
from ..timing import stage
from .context import BatchContext, Explanation
from .inputs import check_input, one_line_errors
from .layer import default_layer

__all__ = [
    "BaseCAM",
    "BatchContext",
    "Explanation",
    "NON_FINITE_LOGITS",
    "NonFiniteError",
    "Targets",
    "resolve_targets",
    "preserved_model_state",
]

#: The message of the NonFiniteError for a model whose logits are NaN or infinite (the command skips the image).
NON_FINITE_LOGITS = "the model's logits are NaN or infinite (are its weights finite?)"


class BaseCAM:
    """A CAM method over a model split at `target_layer`; call it on a batch to get maps [N,T,H,W] in [0,1].

    Subclasses implement `channel_weights` (weights [N,T,K] or per-pixel [N,T,K,h,w]); the base
    class does the split, the forward pass, target resolution and the map. Methods declare what
    they run, and take only the options of that: with `uses_tail_engine` (FD-CAM, Ablation-CAM) the
    options of the masked tail passes, as `engine=` (a fdcam.EngineOptions) or as its fields given as
    keywords, `backend`, `provider`, `precision` ("fp32", "tf32", "fp16"; "bf16" on torch),
    `tail_batch_size` (mask rows per pass) / `memory_budget`, and `cuda_graph` (torch on CUDA); they
    are kept in `self.engine`. With `uses_forward_scorer` (Score-CAM, Group-CAM)
    `forward_batch_size`, the perturbed inputs per forward. Any other method given one of these
    raises a ValueError. `batch_size` is the deprecated name of whichever of the two applies.
    `output` picks the entry of a dict or tuple output to explain (a key or an index; default "out"
    for dicts that have it, as torchvision's segmentation models return); `targets` may be any of
    fdcam.targets' (see `explain`).

    An explainer may be shared between threads: splits and ONNX tails are built under a process-wide
    tracing lock, the model stays in eval mode while any thread explains, and global flags are set
    under a lock and restored (see fdcam.concurrency).

    `close()`, or the end of a `with` block, releases what the explainer holds besides the model: its
    ONNX Runtime sessions (a session another explainer of the same model still uses stays open until
    that one closes too) and its CUDA graphs. Using it afterwards raises fdcam.ClosedError.
    """

    #: Whether the method runs masked tail passes: the engine options (fdcam.EngineOptions) apply.
    uses_tail_engine = False
    #: Whether the method's cost is full-model forwards of perturbed inputs: `forward_batch_size` (and a scorer) apply.
    uses_forward_scorer = False
    #: Attributes that hold constructor options under another name (for __repr__).
    _option_attributes: dict[str, str] = {}

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        tail_batch_size: int | None = None,
        memory_budget: int | None = None,
        forward_batch_size: int | None = None,
        progress: bool = False,
        backend: str = "torch",
        provider: str | None = None,
        precision: str = "fp32",
        cuda_graph: bool = False,
        engine: EngineOptions | None = None,
        tracer_kwargs: dict | None = None,
        batch_size: int | None = None,
        output: OutputSelector = None,
    ):
        if batch_size is not None:
            tail_batch_size, forward_batch_size = self._deprecated_batch_size(
                batch_size, tail_batch_size, forward_batch_size
            )
        keywords = {
            "tail_batch_size": tail_batch_size,
            "memory_budget": memory_budget,
            "backend": backend,
            "provider": provider,
            "precision": precision,
            "cuda_graph": cuda_graph,
        }
        self.engine = self._engine_options(engine, keywords)
        if forward_batch_size is not None and not self.uses_forward_scorer:
            raise ValueError(
                f"{type(self).__name__} runs no forwards of perturbed inputs: "
                "forward_batch_size applies only to Score-CAM and Group-CAM"
            )
        check_positive_int("forward_batch_size", forward_batch_size)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.tracer_kwargs = tracer_kwargs
        self.output = output
        layer = target_layer if target_layer is not None else default_layer(model, tracer_kwargs)
        self.target_layer = resolve_layer_name(model, layer, tracer_kwargs)
        self.forward_batch_size = forward_batch_size
        self.progress = progress
        self._splits: dict[tuple, SplitModel] = {}
        self._tails: weakref.WeakKeyDictionary[SplitModel, Tail] = weakref.WeakKeyDictionary()
        self._tail_fingerprints: weakref.WeakKeyDictionary[SplitModel, tuple] = weakref.WeakKeyDictionary()
        self._structure = _structure_of(model)
        self._warned: set[str] = set()
        self._owner = object()  # this explainer, to the backend caches that share sessions between explainers
        self._backend_tails = False  # whether a backend other than torch built tails for it (close releases them)
        self._closed = False

    def _engine_options(self, engine: EngineOptions | None, keywords: dict) -> EngineOptions:
        """The engine options from `engine=` or the keywords (not both); refused unless the method runs tail passes."""
        given = engine_changes(keywords)
        if engine is not None:
            if not isinstance(engine, EngineOptions):
                raise ValueError(f"engine must be a fdcam.EngineOptions, not {type(engine).__name__}")
            clashes = [name for name, value in given.items() if value != getattr(engine, name)]
            if clashes:
                listed = ", ".join(
                    f"{name}={getattr(engine, name)!r} in engine= but {given[name]!r} as a keyword" for name in clashes
                )
                raise ValueError(f"give each engine option once, in engine= or as a keyword: {listed}")
            given = engine.changed()
        if given and not self.uses_tail_engine:
            listed = ", ".join(f"{name}={value!r}" for name, value in given.items())
            raise ValueError(
                f"{type(self).__name__} runs no masked tail passes: {listed} "
                "applies only to methods that do (FD-CAM, Ablation-CAM)"
            )
        return engine if engine is not None else EngineOptions(**keywords)

    tail_batch_size = property(
        lambda self: self.engine.tail_batch_size,
        doc="Mask rows per tail call at most, any engine (None: from memory_budget).",
    )
    memory_budget = property(
        lambda self: self.engine.memory_budget, doc="Bytes a tail pass may use when tail_batch_size is None."
    )
    backend = property(lambda self: self.engine.backend, doc="The engine of the tail passes: torch or onnxruntime.")
    provider = property(lambda self: self.engine.provider, doc="The onnxruntime provider (None: auto).")
    precision = property(lambda self: self.engine.precision, doc="The math of the tail passes.")
    cuda_graph = property(lambda self: self.engine.cuda_graph, doc="Whether torch tail passes replay as a CUDA graph.")

    def _deprecated_batch_size(
        self, batch_size: int, tail_batch_size: int | None, forward_batch_size: int | None
    ) -> tuple:
        """(tail_batch_size, forward_batch_size) with the old `batch_size` given to whichever the method uses."""
        if self.uses_tail_engine == self.uses_forward_scorer:
            raise ValueError(f"{type(self).__name__} runs no batched passes: batch_size does not apply")
        new = "tail_batch_size" if self.uses_tail_engine else "forward_batch_size"
        if (tail_batch_size if self.uses_tail_engine else forward_batch_size) is not None:
            raise ValueError(f"give {new} only; batch_size is its deprecated name")
        warnings.warn(f"batch_size is deprecated: give {new}", DeprecationWarning, stacklevel=3)
        return (batch_size, forward_batch_size) if self.uses_tail_engine else (tail_batch_size, batch_size)

    def __repr__(self) -> str:
        """The class and its options, as torchcam prints its methods.

        The method's own options, then engine options not at their default.
        """
        options: dict[str, object] = {"target_layer": self.target_layer}
        for cls in type(self).__mro__[::-1]:
            if "__init__" not in cls.__dict__ or not issubclass(cls, BaseCAM):
                continue
            for parameter in inspect.signature(cls.__dict__["__init__"]).parameters.values():
                if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in ("batch_size", "engine"):
                    # shown as the options they stand for: batch_size is deprecated, engine's fields are keywords
                    continue
                value = getattr(self, self._option_attributes.get(parameter.name, parameter.name))
                if cls is not BaseCAM or value != parameter.default:
                    options[parameter.name] = value
        base = [
            name
            for name in inspect.signature(BaseCAM.__init__).parameters
            if name in options and name != "target_layer"
        ]
        ordered = [name for name in options if name not in base] + base
        return f"{type(self).__name__}({', '.join(f'{name}={_short_repr(options[name])}' for name in ordered)})"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        return self.explain(x, targets)

    def explain(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        """Saliency maps [N,T,H,W], float32 in [0,1], on x's device, for the requested targets.

        `targets`: None (top-1 class), a class index or target object for every image, or one (or a list
        of T) per image: ints, fdcam.targets' ClassLogit, ClassProbability, RegionLogit, Output, and
        pytorch-grad-cam's target objects, or `TopK(k)`, each image's k most likely classes (see
        fdcam.targets.resolve_targets).
        Raises ValueError (one line) for bad input or targets, and NonFiniteError (a ValueError)
        when the model's logits or the map are NaN or infinite.
        """
        return self.explanation(x, targets).maps

    def explanation(self, x: torch.Tensor, targets: Targets = None) -> Explanation:
        """The maps of `explain` with the model's output of the same forward pass and the targets it resolved to:
        with `targets=TopK(k)` (or None, top-1), the classes come from the explainer's own logits, so a caller
        that needs the logits and the classes runs the model once."""
        self._check_open()
        check_input(x, self.model)
        if self.cuda_graph and not x.is_cuda:
            self._warn_once("cuda_graph", "cuda_graph applies to CUDA inputs only; these switch passes run eagerly")
        with preserved_model_state(self.model):
            split = self.split_for(x)
            with running():
                with stage("head"):
                    forward = one_line_errors(lambda: ForwardPass.run(split, x), x)
                if not torch.isfinite(forward.logits).all():
                    raise NonFiniteError(NON_FINITE_LOGITS)
                if min(forward.activations.shape[-2:]) == 1 and max(forward.activations.shape[-2:]) == 1:
                    self._warn_once(
                        "blank",
                        f"layer {self.target_layer!r} is 1x1 for inputs of {tuple(x.shape[-2:])}: "
                        "its maps are blank (all zero);"
                        " choose an earlier layer or a larger input",
                    )
                context = BatchContext(x, forward, resolve_targets(targets, forward.logits))
                with stage("weights"):
                    weights = self.channel_weights(context)
                if not torch.isfinite(weights).all():
                    raise NonFiniteError(f"{type(self).__name__}'s channel weights are NaN or infinite")
                with stage("map"):
                    maps = self.saliency(context, weights)
                if not torch.isfinite(maps).all():
                    raise NonFiniteError(f"{type(self).__name__}'s saliency map is NaN or infinite")
        return Explanation(maps.float(), forward.logits.detach(), context.targets)

    def close(self) -> None:
        """Release the explainer's ONNX Runtime sessions (kept while another explainer uses them) and CUDA graphs.

        The model is not touched. Calling it again does nothing; any other use afterwards raises ClosedError.
        Close it when no call of it is running.
        """
        if self._closed:
            return
        self._closed = True
        for tail in self.tails:
            close = getattr(tail, "close", None)  # a plugin backend's tail may hold nothing to close
            if close is not None:
                close()
        self._splits = {}
        self._tails, self._tail_fingerprints = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
        if self._backend_tails:
            tail_backend(self.backend).release(self._owner)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def __enter__(self) -> BaseCAM:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"this {type(self).__name__} was closed; make a new one to explain again")

    def saliency(self, context: BatchContext, weights: torch.Tensor) -> torch.Tensor:
        """ReLU of the weighted sum of activations, upsampled to the input and min-max normalised."""
        cams = weighted_sum(context.activations, weights.to(context.activations.dtype))
        # min-max normalisation would turn NaN into zeros; not while tracing to a graph (no data to look at)
        if not is_traced(cams) and not torch.isfinite(cams).all():
            raise NonFiniteError(f"{type(self).__name__}'s map is NaN or infinite before normalisation")
        return to_input_size(cams, tuple(context.x.shape[-2:]))

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        """Channel weights [N,T,K], or per-pixel weights [N,T,K,h,w], for the batch's target classes."""
        raise NotImplementedError

    def split_for(self, x: torch.Tensor) -> SplitModel:
        """The model split at the target layer for inputs shaped like x (built once, then cached).

        Built under the process-wide tracing lock; if the model's modules were replaced since, the
        splits and tails are built again.
        """
        self._check_open()
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        structure = _structure_of(self.model)
        if structure != self._structure:
            self._splits = {}
            self._tails, self._tail_fingerprints = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
            self._structure = structure
        split = self._splits.get(key)
        if split is None:
            with tracing():
                split = self._splits.get(key)  # another thread may have built it meanwhile
                if split is None:
                    example = x[:1].detach()
                    split = one_line_errors(
                        lambda: split_model(self.model, self.target_layer, example, self.tracer_kwargs, self.output), x
                    )
                    self._splits[key] = split
        return split

    def tail_for(self, context: BatchContext) -> Tail:
        """The engine that runs masked tail passes for the context's split.

        Torch, or an ONNX Runtime session (fdcam.runtime).

        Tails are kept per split object (weakly: a split that is gone takes its tail with it), so a
        new split never gets the tail of an earlier one. An ONNX Runtime tail is checked against a
        cheap fingerprint of the tail's weights on every call (tensor identities, storage pointers,
        in-place version counters): weights changed in place, by load_state_dict or by batch-norm
        statistics give a new graph.
        """
        self._check_open()
        split = context.split
        if self.backend != "torch":
            if context.targets.classes is None:  # checked before the tail is exported: the graphs return class logits
                raise ValueError(
                    f"backend={self.backend!r} explains class-logit targets of [N,C] logits only; use backend='torch'"
                    f" for other targets ({context.targets!r})"
                )
            backend = tail_backend(self.backend)
            fingerprint = backend.fingerprint(split.tail)
            if split in self._tails and self._tail_fingerprints.get(split) == fingerprint:
                return self._tails[split]
            with tracing():
                tail = backend.build(
                    self.model,
                    split,
                    context.activations[:1],
                    [extra[:1] for extra in context.extras],
                    provider=self.provider,
                    precision=self.precision,
                    memory_budget=self.memory_budget,
                    batch_size=self.tail_batch_size,
                    owner=self._owner,
                )
            self._tails[split], self._tail_fingerprints[split] = tail, fingerprint
            self._backend_tails = True
            return tail
        if split not in self._tails:
            self._tails[split] = TorchTail(
                split.tail,
                batch_size=self.tail_batch_size,
                memory_budget=self.memory_budget,
                precision=self.precision,
                cuda_graph=self.cuda_graph,
            )
        return self._tails[split]

    @property
    def tails(self) -> list[Tail]:
        """The tail engines built so far, one per live split (their counters show the passes they ran)."""
        return list(self._tails.values())


def _short_repr(value: object) -> str:
    """repr of an option; a model or other object by its type, so that a repr stays one short line."""
    if value is None or isinstance(value, (bool, int, float, str, dict, list, tuple)):
        return repr(value)
    return f"<{type(value).__name__}>"


def _structure_of(model: nn.Module) -> tuple:
    """Which module objects make up the model: a split built before a submodule was replaced is stale."""
    return tuple(id(module) for module in model.modules())
