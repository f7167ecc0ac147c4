"""`fdcam explain-dataset` and `fdcam evaluate --ray` as a user runs them: exit codes, Ctrl-C and resume, and
the Ray evaluation's per-image values against `fdcam evaluate`'s. Each run starts (and stops) its own local Ray."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_helpers import image_folder  # noqa: E402
from fdcam.cli import main  # noqa: E402


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    image_folder(tmp_path / "images", 1)
    out = str(tmp_path / "out")
    assert main(["explain-dataset", str(tmp_path / "images"), "--out", out, "--method", "groupcam"]) == 2
    assert main(["explain-dataset", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert main(["explain-dataset", str(tmp_path / "images"), "--out", out, "--class", "1000"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("fdcam: error: ") for line in errors)
    assert "map_size='input'" in errors[0] and "nowhere" in errors[1] and "out of range" in errors[2]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(out: Path) -> dict[str, str]:
    return {file.name: _digest(file) for file in sorted((out / "rows").glob("*.parquet"))}


def _paths(out: Path, names) -> list[str]:
    tables = [pq.read_table(out / "rows" / name, columns=["path"]) for name in names]
    return [path for table in tables for path in table.column("path").to_pylist()]


@pytest.mark.slow
def test_ctrl_c_leaves_only_complete_files_and_the_same_command_resumes(tmp_path):
    photos = image_folder(tmp_path / "images", 8, start=40, bad=False)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "fdcam",
        "explain-dataset",
        str(tmp_path / "images"),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--actors",
        "1",
        "--rows-per-file",
        "1",
        "--quiet",
    ]
    # Ctrl-C must reach the run as it reaches a terminal's: a pytest started in the background by a shell without
    # job control inherits SIGINT ignored, and so would the command (it then finished with exit 1).
    first = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while len(list((out / "rows").glob("_staging/*/*.parquet"))) < 2 and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the run
    stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 130, stderr[-2000:]
    assert "the same command resumes" in stderr and stdout.startswith("interrupted: ")
    assert not list((out / "rows").glob("_staging/*/*"))  # nothing half-written left behind
    before = _files(out)
    done = _paths(out, before)
    assert 2 <= len(set(done)) < 9 and len(done) == len(set(done))
    assert pq.read_table(out / "rows").num_rows == len(done)  # every file a reader sees is complete
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-2000:]  # broken.jpg is an error row
    after = _files(out)
    assert {name: after[name] for name in before} == before  # finished files left as they were
    added = _paths(out, [name for name in after if name not in before])
    assert not set(added) & set(done)  # nothing computed twice
    rows = pq.read_table(out / "rows").to_pylist()
    expected = sorted([str(p.resolve()) for p in photos] + [str((tmp_path / "images" / "broken.jpg").resolve())])
    assert sorted(r["path"] for r in rows) == expected  # every image exactly once
    assert [Path(r["path"]).name for r in rows if r["error"]] == ["broken.jpg"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["counts"]["resumed"] == len(set(done)) and run["counts"]["computed"] == 9 - len(set(done))
    assert "9 images, 9 rows, 1 errors" in second.stdout


@pytest.mark.slow
def test_evaluate_ray_gives_fdcam_evaluate_per_image_values(tmp_path, capsys):
    image_folder(tmp_path / "images", 2, start=60)
    common = [
        "evaluate",
        "--images",
        str(tmp_path / "images"),
        "--methods",
        "gradcam",
        "--scorer",
        "torch",
        "--images-per-call",
        "2",
        "--quiet",
    ]
    assert main(common + ["--out", str(tmp_path / "plain.json")]) == 0
    assert main(common + ["--ray", "--actors", "1", "--out", str(tmp_path / "ray")]) == 0
    assert "2 images, 2 rows, 0 errors" in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain.json").read_text())["per_image"]
    rows = {Path(r["path"]).name: r for r in pq.read_table(tmp_path / "ray" / "rows").to_pylist()}
    assert len(rows) == len(plain) == 2
    for entry in plain:
        row = rows[entry["file"]]
        assert row["class"] == entry["class"] and row["method"] == "gradcam"
        for key in ("insertion", "deletion", "overall"):
            assert row[key] == pytest.approx(entry["methods"]["gradcam"][key], abs=1e-6)


def test_overlays_are_drawn_from_the_parquet_map(tmp_path):
    import numpy as np
    import pyarrow as pa

    from fdcam.datasets.command import write_overlays
    from fdcam.datasets.workers import EXPLAIN_SCHEMA
    from fdcam.images import load_image, overlay

    photo = image_folder(tmp_path / "images", 1, start=80)[0]
    saliency = np.linspace(0, 1, 49, dtype=np.float16)
    rows = [
        {"path": str(tmp_path / "gone.jpg"), "method": "fdcam", "layer": "l", "error": "not an image"},
        {
            "path": str(photo),
            "class": 7,
            "label": None,
            "logit": 1.0,
            "probability": 0.5,
            "method": "fdcam",
            "layer": "l",
            "rank": 0,
            "map_height": 7,
            "map_width": 7,
            "saliency": saliency,
            "error": None,
        },
    ]
    (tmp_path / "out" / "rows").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=EXPLAIN_SCHEMA), tmp_path / "out" / "rows" / "a.parquet")
    [written] = write_overlays(tmp_path / "out", 5)  # the error row has no map: one overlay
    assert written.name.endswith("_class7.png")
    expected = overlay(load_image(photo), saliency.astype(np.float32).reshape(7, 7))
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(expected))
