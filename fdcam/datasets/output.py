"""The output folder of a dataset run: Parquet files under OUT/rows that readers see only once complete,
OUT/run.json, resume.

Ray's writers write each file in place, so a run writes into `OUT/rows/_staging/<run id>/` (pyarrow and pandas
skip folders starting with '_' when reading OUT/rows). A staged file is moved into OUT with os.replace once its
Parquet footer reads back (the footer is written last, so a file cut off by Ctrl-C or a killed worker has
none); this happens when the run ends or is interrupted, and for a run that died, when the next run starts.
Images already in OUT's files are not given to Ray again; a file whose rows are all of images already in
OUT (a block written twice) is dropped, and one with some of them is rewritten without those rows.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..evaluation.store import write_json_atomic

__all__ = ["OutputFolder", "ROWS", "STAGING"]

ROWS = "rows"
STAGING = "_staging"
# What must match between a run and the results already in its folder for those to be resumed.
_RESUME_KEYS = (
    "kind",
    "model",
    "weights",
    "weights_sha256",
    "layer",
    "method",
    "methods",
    "options",
    "targets",
    "map_size",
    "step",
    "scorer",
)


class OutputFolder:
    """OUT: finished Parquet files in OUT/rows, run.json, and the staging folder of the run in progress."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file; give a folder")
        self.rows = self.path / ROWS
        self.run_id = uuid.uuid4().hex[:12]

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def staging(self) -> Path:
        """Where this run's Ray writers write."""
        return self.rows / STAGING / self.run_id

    def open(self, config: dict[str, Any]) -> set[str]:
        """Prepare the folder for a run of `config`: recover what an earlier run staged, refuse results of another
        configuration, and return the paths of the images already in the output."""
        self.rows.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"--out {self.path} is not writable")
        if self.run_json.is_file():
            previous = json.loads(self.run_json.read_text())
            changed = [key for key in _RESUME_KEYS if previous.get("config", {}).get(key) != config.get(key)]
            if changed:
                raise ValueError(
                    f"{self.path} holds results of another configuration ({', '.join(changed)} differ);"
                    " give another --out"
                )
        for staged in sorted((self.rows / STAGING).glob("*")) if (self.rows / STAGING).is_dir() else []:
            self._promote(staged)
        return self.done_paths()

    def finished_files(self) -> list[Path]:
        """The complete Parquet files in OUT/rows."""
        return sorted(self.rows.glob("*.parquet"))

    def done_paths(self, files: list[Path] | None = None) -> set[str]:
        """The images that have rows in `files` (default: every finished file)."""
        done: set[str] = set()
        for file in self.finished_files() if files is None else files:
            done.update(pq.read_table(file, columns=["path"]).column("path").to_pylist())
        return done

    def promote(self) -> list[Path]:
        """Move this run's complete staged files into OUT/rows; returns the files moved."""
        return self._promote(self.staging)

    def _promote(self, staged: Path) -> list[Path]:
        moved: list[Path] = []
        done = self.done_paths()
        for file in sorted(staged.glob("*.parquet")) if staged.is_dir() else []:
            try:
                table = pq.read_table(file)
            except (pa.ArrowException, OSError):
                continue  # cut off mid-write: no footer; removed with the folder below
            paths = table.column("path").to_pylist()
            fresh = [path not in done for path in paths]
            if not any(fresh):
                continue
            target = self.rows / f"{staged.name}-{file.name}"
            if not all(fresh):
                pq.write_table(table.filter(pa.array(fresh)), file)
            os.replace(file, target)
            done.update(paths)
            moved.append(target)
        shutil.rmtree(staged, ignore_errors=True)
        root = self.rows / STAGING
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        return moved

    def counts(self, files: list[Path] | None = None) -> dict[str, int]:
        """Images, rows and error rows' images in `files` (default: every finished file)."""
        files = self.finished_files() if files is None else files
        if not files:
            return {"images": 0, "rows": 0, "errors": 0}
        table = pa.concat_tables([pq.read_table(file, columns=["path", "error"]) for file in files])
        paths = table.column("path").to_pylist()
        errors = {path for path, error in zip(paths, table.column("error").to_pylist()) if error is not None}
        return {"images": len(set(paths)), "rows": len(paths), "errors": len(errors)}

    def write_run_json(self, data: dict[str, Any]) -> Path:
        return write_json_atomic(self.run_json, data)
