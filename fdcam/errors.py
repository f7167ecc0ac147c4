"""fdcam's error classes, all under one base class `FDCAMError`, and one line of an exception's message for people.

`except fdcam.FDCAMError` catches every error of these classes. Each also keeps the built-in base it always
had (ValueError for bad input, RuntimeError for what cannot run here), so code written against those still
works; plain ValueErrors for a bad argument stay plain. The classes are defined here, in a module that imports
nothing, so that `import fdcam` makes each importable without loading ONNX, ONNX Runtime or the serving client;
the modules that raise them re-export them under their old names (`fdcam.split.SplitError`, ...).
"""

from __future__ import annotations

__all__ = [
    "FDCAMError",
    "BoundsError",
    "ClosedError",
    "ExportError",
    "ImageError",
    "LabelsError",
    "ModelError",
    "NonFiniteError",
    "ProviderError",
    "RequestError",
    "ServerError",
    "SplitError",
    "first_line",
]


class FDCAMError(Exception):
    """The base class of fdcam's error classes; its message is one line for people."""


class SplitError(FDCAMError, ValueError):
    """The model cannot be split at the requested layer (the message says why, in one line)."""


class ImageError(FDCAMError, ValueError):
    """An image cannot be used: missing, unreadable, or too small."""


class BoundsError(FDCAMError, ValueError):
    """An input over one of the bounds; the message is one line that names the limit and its option."""


class ModelError(FDCAMError, ValueError):
    """A model cannot be made: unknown name, missing or unfit weights."""


class LabelsError(FDCAMError, ValueError):
    """A labels CSV that cannot be used as it is (one line naming the file and the row)."""


class NonFiniteError(FDCAMError, ValueError):
    """The model's logits or a saliency map contain NaN or infinite values."""


class RequestError(FDCAMError, ValueError):
    """A request that cannot be explained; its message is the one line the client gets back."""


class ExportError(FDCAMError, RuntimeError):
    """The tail cannot be exported, or the exported graph does not reproduce the torch tail (one-line message)."""


class ProviderError(FDCAMError, RuntimeError):
    """The requested execution provider cannot run here (one-line message saying what to do)."""


class ServerError(FDCAMError, RuntimeError):
    """The server refused or failed a request; the message is its one line."""


class ClosedError(FDCAMError, RuntimeError):
    """An explainer was used after `close()` (or after its `with` block): make a new one."""


def first_line(error: BaseException, limit: int | None = 300) -> str:
    """The first line of the error's message (at most `limit` characters), or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
