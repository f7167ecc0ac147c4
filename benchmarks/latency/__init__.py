"""Latency, throughput and peak memory of fdcam's CAM methods against pytorch-grad-cam and the FD-CAM authors' loop.

    python -m benchmarks.latency [--device cpu|cuda] [--models vgg16,efficientnet_lite0,resnet50]
                                 [--methods ROWS] [--batch N] [--repeat R] [--warmup W] [--quick]
                                 [--profile] [--json out.json]

Rows (select with --methods, comma-separated; a prefix such as `pgc` or `fdcam-ort` selects a family):
  fdcam                FD-CAM, torch backend (factorised tail where the pattern applies), fp32
  fdcam-tf32|bf16      the same with TF32 / bf16-autocast switch passes (CUDA only)
  fdcam-graph[-tf32]   the same with the switch passes replayed as a CUDA graph (CUDA only)
  fdcam-ort-fp32|tf32|fp16   FD-CAM, onnxruntime backend (fp32 on CPU; fp32/tf32/fp16 on CUDA)
  gradcam ablationcam scorecam groupcam   fdcam's other methods
  pgc-gradcam pgc-ablationcam pgc-scorecam   pytorch-grad-cam 1.5.7 with its defaults
  explainer-fdcam explainer-gradcam   the whole explanation as one ONNX graph (fdcam.export.export_explainer)
                       run by ONNX Runtime (CPU; CUDA provider on a GPU); the export is untimed
  authors-fdcam        the FD-CAM authors' loop: per class, 2K switch passes through the full,
                       unfactorised torch tail in chunks of 128 masks
pgc-gradcam is always measured: every row's ratio is to it, from the same run. A second table gives,
per model, FD-CAM's time over fdcam's own Grad-CAM's in the same engine (torch: fdcam / gradcam;
graph: explainer-fdcam / explainer-gradcam), for the pairs that ran (also "ratios" in --json). VGG16 and ResNet50
use random weights (seeded), EfficientNet-Lite0 its real ImageNet weights; `tiny` is a small conv net
for smoke tests. Rows that cannot run (no fdcam.runtime, no pytorch-grad-cam, no CUDA, an error)
are printed as skipped with the reason. `--quick` runs the slow rows (Score-CAMs, pgc Ablation-CAM:
one full-model forward per channel) once, without warm-up.

Modules: `models` (the benchmarked nets), `rows` (what each row runs), `authors` (the FD-CAM
authors' loop), `timing` (clocks and the interleaved timed rounds), `memory` (peak memory),
`profile` (FD-CAM's stages from fdcam.timing), `report` (machine and table), `command` (main).
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars; read when tqdm is imported

from .authors import AUTHORS_CHUNK, AuthorsFDCAM  # noqa: E402
from .command import build_parser, main  # noqa: E402
from .memory import PeakMemory  # noqa: E402
from .models import DEFAULT_MODELS, MODEL_NAMES, BenchModel, TinyNet, load_model  # noqa: E402
from .profile import format_profile, profile_fdcam  # noqa: E402
from .report import engine_ratios, format_machine, format_ratios, format_table, machine_info  # noqa: E402
from .rows import REFERENCE, ROW_KEYS, ROWS, Row, Runner, select_rows  # noqa: E402
from .timing import Result, run_model  # noqa: E402

__all__ = [
    "engine_ratios",
    "format_ratios",
    "AUTHORS_CHUNK",
    "DEFAULT_MODELS",
    "MODEL_NAMES",
    "REFERENCE",
    "ROWS",
    "ROW_KEYS",
    "AuthorsFDCAM",
    "BenchModel",
    "PeakMemory",
    "Result",
    "Row",
    "Runner",
    "TinyNet",
    "build_parser",
    "format_machine",
    "format_profile",
    "format_table",
    "load_model",
    "machine_info",
    "main",
    "profile_fdcam",
    "run_model",
    "select_rows",
]
