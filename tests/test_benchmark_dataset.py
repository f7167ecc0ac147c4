"""`python -m benchmarks.dataset` runs its three rows over real Ray and prints the table and the prediction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import dataset  # noqa: E402


@pytest.mark.slow
def test_the_benchmark_prints_every_row_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        dataset.main(["--images", "2", "--batch-size", "2", "--method", "gradcam", "--repeat", "1", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    for row in ("| in-process loop |", "| explain_dataset, 1 actor |", "| explain_dataset, 2 actors |"):
        assert row in printed
    assert "scaling 1 → 2 actors" in printed and "prediction (not measured)" in printed
    result = json.loads(out.read_text())
    assert result["images"] == 2 and all(len(seconds) == 1 and seconds[0] > 0 for seconds in result["rounds"].values())
