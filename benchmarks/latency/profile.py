"""FD-CAM's stage profile, from the timings the library records (fdcam.timing): no re-implementation here."""

from __future__ import annotations

import statistics

import torch

import fdcam
from fdcam.tail import TorchTail
from fdcam.timing import STAGES, record_stages

from .models import BenchModel
from .timing import batch_of, clock

__all__ = ["STAGE_LABELS", "format_profile", "profile_fdcam"]

STAGE_LABELS = {
    "head": "head forward",
    "backward": "gradients (tail backward)",
    "grouping": "grouping",
    "switch": "switch passes + scores",
    "weights": "weights (α, combination)",
    "map": "map + upsampling",
}
TOTAL = "total (sum of stages)"
WALL = "wall (whole call)"


def profile_fdcam(
    bm: BenchModel, device: torch.device, repeat: int, batch: int = 1, precision: str = "fp32"
) -> dict[str, float]:
    """Median ms of FD-CAM's stages (fdcam.timing.STAGES) on a batch of images, and of the whole call.

    Each repeat is one ordinary `FDCAM.__call__` under `record_stages`, so the stages are FD-CAM's
    own code; the CUDA device is synchronised at stage edges.
    """
    cam = fdcam.FDCAM(bm.model, bm.layer, precision=precision)
    x = batch_of(bm.x, batch) if batch > 1 else bm.x
    cam(x)  # warm-up: split, tail, factorised contributions
    stages: dict[str, list[float]] = {}
    walls: list[float] = []
    for _ in range(max(1, repeat)):
        with record_stages(device) as times:
            _, seconds = clock(lambda: cam(x), device)
        walls.append(seconds * 1e3)
        for name, values in times.seconds.items():
            stages.setdefault(name, []).append(sum(values) * 1e3)
    profile = {name: statistics.median(stages[name]) for name in STAGES if name in stages}
    profile[TOTAL] = sum(profile.values())
    profile[WALL] = statistics.median(walls)
    split = cam.split_for(x)
    with torch.no_grad():
        features, *extras = split.head(x[:1])
    profile["factorised tail"] = float(TorchTail(split.tail).shortcut_for(features, extras) is not None)
    return profile


def format_profile(name: str, profile: dict[str, float], batch: int = 1, precision: str = "fp32") -> str:
    """The profile as lines of stage, ms and share of the sum of stages."""
    total = profile[TOTAL]
    lines = [
        f"FD-CAM stages on {name}, batch {batch} (torch backend {precision}, factorised tail: "
        f"{'yes' if profile['factorised tail'] else 'no'}):"
    ]
    for stage, ms in profile.items():
        if stage == "factorised tail":
            continue
        share = f"  {100 * ms / total:5.1f}%" if stage in STAGES and total > 0 else ""
        lines.append(f"  {STAGE_LABELS.get(stage, stage):<30} {ms:9.1f} ms{share}")
    return "\n".join(lines)
