"""Results on disk: atomic JSON files and the resumable JSON-lines store of finished (item, method) records."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "config_key", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as JSON to a temporary file next to `path`, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a run configuration."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    """Append-only JSON-lines store of finished (item, method) records for one configuration.

    Lines of other configurations are kept but ignored; a torn last line (an interrupted write)
    is skipped. With path None nothing is stored.
    """

    def __init__(self, path: str | os.PathLike | None, config: Mapping[str, Any], resume: bool = True):
        self.path = Path(path) if path is not None else None
        self.key = config_key(config)
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path is not None and resume and self.path.is_file():
            with open(self.path) as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and record.get("config") == self.key:
                        self.records[(record["item"], record["method"])] = record

    def get(self, item: str, method: str) -> dict[str, Any] | None:
        return self.records.get((item, method))

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        records = [{"config": self.key, **record} for record in records]
        for record in records:
            self.records[(record["item"], record["method"])] = record
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")  # finish a torn line so the new records parse
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
