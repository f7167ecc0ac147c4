"""`ort_tail`: the ONNX Runtime tail BaseCAM asks for, with exported graphs and sessions cached.

Graphs live in a cache directory (`cache_dir`, else $FDCAM_CACHE, else $XDG_CACHE_HOME/fdcam or
~/.cache/fdcam) under a name that hashes the tail's code, weights, layer and shapes, so a changed
model never gets a stale graph. Sessions are kept in memory per (model, layer, shapes, provider,
precision, device, graph form) while the model lives, or until every explainer that used one has closed
(`release_sessions(owner)`: each session records its owners; explainers that share one keep it open until
the last of them closes); each form (`TailForm`: a classes input, a
sparse bound) is exported and opened on its first use; an in-place change of the tail's weights is noticed
(tensor version counters) and rebuilds. Each graph has its sha256 recorded next to it
(`<name>.onnx.sha256`); a cached graph that does not match (altered on disk, truncated, zero-length,
or written without a record) is exported again. A cache directory that cannot be written (read-only,
or a write failing later, e.g. a full disk) falls back to a temporary one for the process, with a warning.
The cache is trusted like the model file: it is created owner-only (0o700), and a graph replaced there
together with its record is used as it is.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import threading
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from torch import nn

from fdcam._version import __version__
from fdcam.concurrency import running, tracing
from fdcam.engine import TailForm, input_names
from fdcam.errors import first_line
from fdcam.export.graph import DEFAULT_OPSET, ExportError, export_split, model_metadata
from fdcam.export.model import model_name
from fdcam.factorise import tail_shortcut
from fdcam.memory import row_bytes
from fdcam.split import SplitModel

from .graph_files import default_cache_dir, fallback_dir, record_hash, remove_graph, verified, writable_dir
from .providers import check_precision, create_session, resolve_provider, session_options
from .session import OrtTail

__all__ = [
    "RuntimeStats",
    "clear_sessions",
    "default_cache_dir",
    "open_sessions",
    "ort_tail",
    "release_sessions",
    "stats",
]

log = logging.getLogger("fdcam.runtime")

# What ONNX Runtime raises for a file that is not a loadable graph.
_LOAD_ERRORS = (
    ort_errors.InvalidProtobuf,
    ort_errors.InvalidGraph,
    ort_errors.NoSuchFile,
    ort_errors.Fail,
)


@dataclass
class RuntimeStats:
    """Counters for tests and benchmarks: graphs exported or found on disk, sessions built or reused."""

    exports: int = 0
    graph_reuses: int = 0
    sessions: int = 0
    session_reuses: int = 0


stats = RuntimeStats()


@dataclass
class _Entry:
    session: ort.InferenceSession
    provider: str
    stream: int | None
    fingerprint: tuple
    # Who uses it: explainers' tokens, and None for callers of ort_tail without one (never released by an owner).
    owners: set = field(default_factory=set)


# model → {(layer, shapes, provider, precision, device, form): entry}; entries go with the model, or when released.
_sessions: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Entry]] = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def clear_sessions() -> None:
    """Drop every cached session (graphs on disk stay)."""
    with _sessions_lock:
        _sessions.clear()


def release_sessions(owner: Hashable) -> int:
    """`owner` no longer uses its sessions (its explainer closed): drop those no other owner uses; returns how many."""
    dropped = 0
    with _sessions_lock:
        for per_model in list(_sessions.values()):
            for key, entry in list(per_model.items()):
                entry.owners.discard(owner)
                if not entry.owners:
                    del per_model[key]
                    dropped += 1
    return dropped


def open_sessions(model: nn.Module | None = None) -> int:
    """How many ONNX Runtime sessions the cache holds open for `model` (None: over every model still alive)."""
    with _sessions_lock:
        if model is not None:
            return len(_sessions.get(model, {}))
        return sum(len(per_model) for per_model in list(_sessions.values()))


def ort_tail(
    model: nn.Module,
    split: SplitModel,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor],
    provider: str | None = None,
    precision: str = "fp32",
    memory_budget: int | None = None,
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    owner: Hashable | None = None,
) -> OrtTail:
    """An OrtTail for `split` of `model` on features shaped like `features` [N,K,h,w] (and `extras`).

    provider: None/"auto", "cpu", "cuda" or "tensorrt"; precision: "fp32" (no TF32), "tf32" or
    "fp16" (see fdcam.runtime.providers). The masks of a call go in as few session runs as
    `memory_budget` (bytes; default fdcam.engine.DEFAULT_MEMORY_BUDGET) allows, or `batch_size` rows a run.
    Each graph form the calls need (all classes or a classes input; dense or gathered sums under a bound)
    is exported once per model state and its session built once per key, on first use; later calls reuse
    both. `owner` (an explainer's token) is recorded on each session it uses, for `release_sessions(owner)`;
    without one, sessions stay while the model lives.
    """
    precision = check_precision(precision)
    resolved = resolve_provider(provider, features.device)
    key = (
        split.layer,
        tuple(features.shape[1:]),
        tuple(tuple(extra.shape[1:]) for extra in extras),
        resolved,
        precision,
        str(features.device),
    )
    fingerprint = tail_fingerprint(split.tail)
    example = features[:1].detach()
    example_extras = [extra[:1].detach() for extra in extras]
    directory = writable_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    # TensorRT engines are built for the plain form's inputs only; other providers get the shortcut forms.
    shortcut = None if resolved == "tensorrt" else tail_shortcut(split.tail, example, example_extras)
    with running():
        bytes_per_row = row_bytes(split.tail, example, example_extras)

    def sessions(form: TailForm) -> tuple[ort.InferenceSession, str, int | None]:
        with _sessions_lock:
            entry = _sessions.setdefault(model, {}).get((*key, form))
            if entry is not None and entry.fingerprint == fingerprint:
                stats.session_reuses += 1
                entry.owners.add(owner)
                return entry.session, entry.provider, entry.stream
        with tracing():  # an export traces the tail: no other thread runs modules meanwhile
            entry = _build(model, split, example, example_extras, resolved, precision, directory, fingerprint, form)
        with _sessions_lock:
            per_model = _sessions.setdefault(model, {})
            replaced = per_model.get((*key, form))  # a session of the tail's old weights: its owners use this one now
            entry.owners = (replaced.owners if replaced is not None else set()) | {owner}
            per_model[(*key, form)] = entry
        return entry.session, entry.provider, entry.stream

    return OrtTail(
        sessions,
        resolved,
        num_extras=len(extras),
        shortcut=shortcut,
        batch_size=batch_size,
        memory_budget=memory_budget,
        row_bytes=bytes_per_row,
    )


def _build(
    model: nn.Module,
    split: SplitModel,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor],
    provider: str,
    precision: str,
    directory: Path,
    fingerprint: tuple,
    form: TailForm = TailForm(),
) -> _Entry:
    digest = _content_hash(split, features, extras) + form.suffix
    validated: dict[Path, ort.InferenceSession] = {}
    reused: list[Path] = []

    def graph(fp16: bool, where: Path = directory) -> Path:
        path = where / "tails" / f"{digest}{'-fp16' if fp16 else ''}.onnx"
        if path.is_file():
            if verified(path):
                stats.graph_reuses += 1
                reused.append(path)
                return path
            log.warning(
                "cached tail graph %s does not match its recorded sha256 (altered or incomplete); exporting it again",
                path,
            )
            remove_graph(path)
        try:
            exported = export_split(
                split,
                features,
                extras,
                path,
                fp16=fp16,
                metadata=_metadata(model),
                session_options=session_options(),
                form=form,
            )
            record_hash(path)
        except OSError as error:
            remove_graph(path)
            if where != directory:
                raise ExportError(
                    f"cannot write the tail graph in {where} either ({error}); set FDCAM_CACHE to a writable directory"
                ) from error
            # A cache that fills up (ENOSPC) or turns read-only after the check falls back as an unwritable one does.
            return graph(fp16, fallback_dir(directory, error))
        stats.exports += 1
        validated[path] = exported.session
        return path

    num_channels = features.shape[1]
    shapes = [tuple(features.shape[1:]), (num_channels,), *(tuple(extra.shape[1:]) for extra in extras)]
    input_shapes = dict(zip(input_names(len(extras)), shapes))  # one image's inputs, without the batch axes

    def open_session() -> tuple[ort.InferenceSession, str]:
        if provider != "cpu":
            return create_session(
                graph,
                provider,
                precision,
                features.device,
                engine_dir=directory / "tensorrt",
                mask_batch=2 * num_channels,
                input_shapes=input_shapes,
            )
        path = graph(precision == "fp16")
        if path in validated:  # the export already built a CPU session for its check
            return validated[path], "cpu"
        return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"]), "cpu"

    try:
        session, used = open_session()
    except _LOAD_ERRORS as error:
        if not reused:
            raise ExportError(f"onnxruntime cannot load the tail graph ({first_line(error, 200)})") from error
        # A damaged cached graph (interrupted copy, disk error): export it again, once.
        log.warning("cached tail graph %s is unreadable (%s); exporting it again", reused[0], first_line(error, 200))
        for path in reused:
            remove_graph(path)
        session, used = open_session()
    stats.sessions += 1
    stream = torch.cuda.current_stream(features.device).cuda_stream if used != "cpu" and features.is_cuda else None
    return _Entry(session, used, stream, fingerprint)


def _metadata(model: nn.Module) -> dict[str, str]:
    from fdcam.models import spec_of

    spec = spec_of(model)
    return model_metadata(model_name(model), None, spec.mean if spec else None, spec.std if spec else None)


def _tail_tensors(tail: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters, buffers and plain tensor constants (fx get_attr) of the tail, by name."""
    named = dict(tail.named_parameters())
    named.update(tail.named_buffers())
    graph = getattr(tail, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "get_attr" and node.target not in named:
            value = operator.attrgetter(node.target)(tail)
            if isinstance(value, torch.Tensor):
                named[node.target] = value
    return sorted(named.items())


def tail_fingerprint(tail: nn.Module) -> tuple:
    """Cheap identity of the tail's weights: tensor identities, storage pointers and in-place version counters."""
    return tuple((name, id(tensor), tensor.data_ptr(), tensor._version) for name, tensor in _tail_tensors(tail))


def _content_hash(split: SplitModel, features: torch.Tensor, extras: Sequence[torch.Tensor]) -> str:
    """sha256 of the tail's code and weights, the layer, the input shapes and the tool versions."""
    digest = hashlib.sha256()
    header = [
        "fdcam-tail/3",  # bump when the export changes for the same tail
        __version__,
        torch.__version__,
        str(DEFAULT_OPSET),
        split.layer,
        split.tail.code,
        str(tuple(features.shape[1:])),
        str([tuple(extra.shape[1:]) for extra in extras]),
    ]
    digest.update("\n".join(header).encode())
    for name, tensor in _tail_tensors(split.tail):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\n{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()[:32]
