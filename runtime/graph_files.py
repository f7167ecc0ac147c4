"""The tail graphs on disk: the cache directory, its temporary stand-in when unwritable, and each graph's sha256."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["default_cache_dir", "fallback_dir", "record_hash", "remove_graph", "verified", "writable_dir"]


def default_cache_dir() -> Path:
    """$FDCAM_CACHE, else $XDG_CACHE_HOME/fdcam, else ~/.cache/fdcam."""
    if os.environ.get("FDCAM_CACHE"):
        return Path(os.environ["FDCAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fdcam"


_fallback_lock = threading.Lock()
_fallback: dict[Path, Path] = {}


def writable_dir(directory: Path) -> Path:
    """`directory` if graphs can be written there, else (with a warning, once) a temporary directory for this process.

    The cache directory and its `tails` folder are created owner-only (0o700): a cached graph is run as
    trusted code, like the model file itself (a graph replaced together with its .sha256 record is used).
    """
    with _fallback_lock:
        if directory in _fallback:  # found unwritable (read-only, full) earlier in this process
            return _fallback[directory]
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / "tails").mkdir(mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory / "tails", prefix=".fdcam-write-check-"):
            pass
        return directory
    except OSError as error:
        return fallback_dir(directory, error)


def fallback_dir(directory: Path, error: OSError) -> Path:
    """The temporary directory (owner-only, removed at exit) that stands in for an unwritable cache `directory`."""
    with _fallback_lock:
        if directory not in _fallback:
            _fallback[directory] = Path(tempfile.mkdtemp(prefix="fdcam-cache-"))
            atexit.register(shutil.rmtree, _fallback[directory], True)
            warnings.warn(
                f"cannot write the tail graph cache in {directory} ({error.strerror or error}); using the temporary "
                f"directory {_fallback[directory]} for this process "
                "(set FDCAM_CACHE to a writable directory to keep graphs)",
                RuntimeWarning,
                stacklevel=4,
            )
        return _fallback[directory]


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _file_hash(path: Path) -> str:
    """sha256 of a graph file and its external data file, if any."""
    digest = hashlib.sha256()
    for part in (path, path.with_name(path.name + ".data")):
        if part == path or part.is_file():
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def record_hash(path: Path) -> None:
    """Write the graph's sha256 next to it, atomically."""
    record = _hash_path(path)
    staged = record.with_name(f".{record.name}.{os.getpid()}.{threading.get_ident()}")
    staged.write_text(_file_hash(path) + "\n")
    os.replace(staged, record)


def verified(path: Path) -> bool:
    """Whether the graph file matches the sha256 recorded when it was exported."""
    try:
        recorded = _hash_path(path).read_text().strip()
        return bool(recorded) and path.stat().st_size > 0 and _file_hash(path) == recorded
    except OSError:
        return False


def remove_graph(path: Path) -> None:
    for part in (path, path.with_name(path.name + ".data"), _hash_path(path)):
        try:
            part.unlink(missing_ok=True)
        except OSError:
            pass
