"""Smoke test of benchmarks.latency on the tiny model: table, JSON fields, row selection, baseline."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed; it lives at the root
from benchmarks import latency  # noqa: E402
from fdcam import FDCAM  # noqa: E402
from reference import assert_same_up_to_rounding  # noqa: E402

RESULT_FIELDS = {
    "model",
    "method",
    "library",
    "label",
    "backend",
    "precision",
    "device",
    "status",
    "reason",
    "median_ms",
    "min_ms",
    "repeats",
    "warmup",
    "ratio_to_pgc_gradcam",
    "batch",
    "throughput_ips",
    "peak_mem_mb",
    "peak_delta_mb",
    "memory_kind",
}
PHASES = {"head", "backward", "grouping", "switch", "weights", "map"}  # fdcam.timing.STAGES


@pytest.mark.slow
def test_benchmark_on_the_tiny_model_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        latency.main(["--models", "tiny", "--repeat", "1", "--batch", "2", "--quick", "--profile", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "CPU:" in printed and "torch " in printed
    assert "median ms" in printed and "x pgc GradCAM" in printed
    assert "FD-CAM stages on tiny" in printed

    payload = json.loads(out.read_text())
    assert {"cpu", "logical_cpus", "torch_threads", "torch", "onnxruntime"} <= set(payload["machine"])
    assert payload["config"]["batch"] == 2 and payload["config"]["models"] == ["tiny"]
    results = payload["results"]
    assert [r["method"] for r in results] == latency.ROW_KEYS
    for r in results:
        assert RESULT_FIELDS <= set(r)
        if r["status"] == "ok":
            assert 0 < r["min_ms"] <= r["median_ms"]
            assert r["ratio_to_pgc_gradcam"] > 0 and r["peak_mem_mb"] > 0 and r["peak_delta_mb"] >= 0
            slow = r["method"] in ("scorecam", "pgc-scorecam", "pgc-ablationcam")
            assert (r["throughput_ips"] is None) if slow else (r["throughput_ips"] > 0)  # --quick: no batch run
        else:
            assert r["reason"]  # every skipped row says why
    by_key = {r["method"]: r for r in results}
    for key in ("fdcam", "gradcam", "ablationcam", "groupcam", "scorecam", "authors-fdcam"):
        assert by_key[key]["status"] == "ok", by_key[key]["reason"]
    if by_key["pgc-gradcam"]["status"] == "ok":
        assert by_key["pgc-gradcam"]["ratio_to_pgc_gradcam"] == pytest.approx(1.0)
    assert by_key["fdcam-ort-fp16"]["status"] == "skipped"  # CUDA only
    assert by_key["scorecam"]["repeats"] == 1 and by_key["scorecam"]["warmup"] == 0  # --quick
    ratios = {r["engine"]: r for r in payload["ratios"]}  # FD-CAM / Grad-CAM in the same engine
    assert "FD-CAM / Grad-CAM in the same engine" in printed
    pairs = (("torch", "fdcam", "gradcam"), ("graph", "explainer-fdcam", "explainer-gradcam"))
    for engine, fdcam_key, gradcam_key in pairs:
        if by_key[fdcam_key]["status"] != "ok" or by_key[gradcam_key]["status"] != "ok":
            assert engine not in ratios
            continue
        ratio = ratios[engine]
        assert ratio["model"] == "tiny" and ratio["fdcam_ms"] == by_key[fdcam_key]["median_ms"]
        assert ratio["ratio"] == pytest.approx(by_key[fdcam_key]["median_ms"] / by_key[gradcam_key]["median_ms"])
        assert f"{ratio['ratio']:.2f}x" in printed
    assert "torch" in ratios  # both torch rows always run
    profile = payload["profile"]["tiny"]
    assert PHASES <= set(profile)  # recorded by the library's own FD-CAM (fdcam.timing)
    assert 0 < profile["total (sum of stages)"] <= profile["wall (whole call)"]


@pytest.mark.slow
def test_methods_selects_rows_and_keeps_the_reference(tmp_path):
    out = tmp_path / "bench.json"
    latency.main(
        ["--models", "tiny", "--methods", "fdcam,authors", "--repeat", "1", "--warmup", "0", "--json", str(out)]
    )
    methods = [r["method"] for r in json.loads(out.read_text())["results"]]
    assert methods == ["pgc-gradcam", "fdcam", "authors-fdcam"]


def test_row_selection():
    assert [r.key for r in latency.select_rows("pgc")] == ["pgc-gradcam", "pgc-ablationcam", "pgc-scorecam"]
    assert [r.key for r in latency.select_rows("fdcam-ort")] == ["fdcam-ort-fp32", "fdcam-ort-tf32", "fdcam-ort-fp16"]
    assert [r.key for r in latency.select_rows("fdcam")] == ["fdcam"]
    with pytest.raises(SystemExit):
        latency.select_rows("nope")


def test_authors_loop_computes_fdcam():
    torch.manual_seed(0)
    model = latency.TinyNet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = FDCAM(model, "features.5")(x)
    got = latency.AuthorsFDCAM(model, "features.5")(x)
    assert_same_up_to_rounding(got, expected)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x, drop_connect_rate=None):
        return torch.relu(self.conv(x))


class _KeywordCallingNet(torch.nn.Module):
    """Calls its block with a keyword argument, as EfficientNet-Lite0 calls its blocks."""

    def __init__(self, keyword: bool):
        super().__init__()
        self.keyword = keyword
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Block()
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.block(x, drop_connect_rate=0.2) if self.keyword else self.block(x)
        return self.fc(x.mean((2, 3)))


def test_pgc_ablation_row_runs_on_blocks_called_with_keywords():
    import pytorch_grad_cam  # in the test extras: a missing install fails here

    from benchmarks.latency.models import BenchModel
    from benchmarks.latency.rows import ROWS

    row = next(r for r in ROWS if r.key == "pgc-ablationcam")
    assert latency.rows.unavailable(row, torch.device("cpu")) is None

    torch.manual_seed(0)
    plain = _KeywordCallingNet(keyword=False).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match="drop_connect_rate"):  # pgc's own layer: the reason for the row's adapter
        broken = _KeywordCallingNet(keyword=True).eval()
        pytorch_grad_cam.AblationCAM(broken, [broken.block])(input_tensor=x, targets=None)
    keyword = _KeywordCallingNet(keyword=True).eval()
    keyword.load_state_dict(plain.state_dict())

    expected = pytorch_grad_cam.AblationCAM(plain, [plain.block])(input_tensor=x, targets=None)
    runner = row.build(BenchModel("keyword-net", keyword, "block", x, "random"))
    runner.before()
    got = runner.explain(x)
    runner.after()
    assert isinstance(keyword.block, _Block)
    assert np.ptp(expected) > 0.1
    np.testing.assert_array_equal(got, expected)
