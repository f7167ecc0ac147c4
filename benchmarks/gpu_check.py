"""GPU check: FD-CAM through ONNX Runtime against FD-CAM in torch, on the same device.

    python benchmarks/gpu_check.py [--provider cuda|tensorrt|cpu] [--precision fp32|tf32|fp16]
                                   [--models vgg16,efficientnet_lite0] [--repeats 5]

For each model (VGG16 with random weights at features.30, EfficientNet-Lite0 with its weights at
_blocks.15) it checks that the ORT maps equal the torch maps (fp32: correlation ≥ 0.9999 and
max |Δ| ≤ 1e-3), that one explanation of one image is one session run, and on CUDA that the runs
went through IOBinding with no large host↔device copies (CUPTI memcpy records while the tail runs).
It prints timings and writes $OUT/gpu_check.json when OUT is set. Without CUDA, a GPU provider
prints why and exits 0; `--provider cpu` runs the same checks on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/gpu_check.py): the repository root holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fdcam  # noqa: E402
from benchmarks.latency.timing import median, synchronise, timed  # noqa: E402
from fdcam.runtime import available_providers  # noqa: E402
from fdcam.tail import TorchTail  # noqa: E402

LAYERS = {"vgg16": "features.30", "efficientnet_lite0": "_blocks.15"}
# Host↔device copies below this many bytes are ORT's shape bookkeeping, not data.
SMALL_COPY_BYTES = 16 * 1024
THRESHOLDS = {"fp32": (0.9999, 1e-3), "tf32": (0.999, 2e-2), "fp16": (0.99, 5e-2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cuda", choices=["cuda", "tensorrt", "cpu"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "fp16"])
    parser.add_argument(
        "--models", default="vgg16,efficientnet_lite0", help="comma-separated: vgg16, efficientnet_lite0"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed explanations per backend (0: checks only)")
    return parser.parse_args(argv)


def cuda_unavailable_reason(provider: str) -> str | None:
    """Why a GPU provider cannot be checked here, or None."""
    if provider == "cpu":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if "cuda" not in available_providers():
        return f"this onnxruntime offers {', '.join(available_providers())} only (install onnxruntime-gpu)"
    return None


def full_fp32_in_torch() -> None:
    """Switch torch's TF32 off so the torch reference is true fp32, like ORT with use_tf32=0."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def example_input(name: str, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A real photo for models with trained weights, seeded noise for random ones."""
    if name == "efficientnet_lite0":
        from fdcam.images import load_image, preprocess

        image = load_image(Path(fdcam.__file__).parent / "data" / "afghan_hound.jpg")
        return preprocess(image, fdcam.models.spec_of(model)).to(device)
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)


def load_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return fdcam.models.load(name, weights="imagenet" if name == "efficientnet_lite0" else None, device=device)


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(Pearson correlation, max |a − b|) of two maps."""
    a, b = a.double().flatten(), b.double().flatten()
    da, db = a - a.mean(), b - b.mean()
    denominator = float(da.norm() * db.norm())
    correlation = float(da @ db) / denominator if denominator > 0 else float(torch.equal(a, b))
    return correlation, float((a - b).abs().max())


def host_copies(run, device: torch.device) -> dict:
    """Host↔device memcpy records (count, bytes, largest) while `run()` executes, from the CUDA profiler.

    CUPTI records every copy in the process, ORT's included; the sizes come from the trace's args.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        run()
        synchronise(device)
    with tempfile.TemporaryDirectory() as directory:
        trace = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    copies = [
        event
        for event in events
        if event.get("cat") == "gpu_memcpy" and any(kind in event.get("name", "") for kind in ("HtoD", "DtoH"))
    ]
    sizes = [int(event.get("args", {}).get("bytes", 0)) for event in copies]
    return {
        "count": len(copies),
        "bytes": sum(sizes),
        "largest": max(sizes, default=0),
        "names": sorted({e["name"] for e in copies}),
    }


def stream_checks(tail, features: torch.Tensor, masks: torch.Tensor, extras: list, device: torch.device) -> dict:
    """Logits stay on the GPU, and a run from another torch stream (ordered by events) gives the same logits."""
    expected = tail.run(features, masks, extras)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        doubled = features * 2  # written on the side stream just before the run reads it
        on_side = tail.run(doubled, masks, extras)
    torch.cuda.current_stream(device).wait_stream(side)
    reference = tail.run(features * 2, masks, extras)
    return {
        "output_on_device": expected.device == features.device,
        "other_stream_agrees": bool(torch.allclose(on_side, reference, atol=1e-4, rtol=1e-4)),
    }


def check_model(name: str, device: torch.device, provider: str, precision: str, repeats: int) -> dict:
    """Agreement, runs per explanation, host copies and timings of ORT vs torch FD-CAM for one model."""
    model = load_model(name, device)
    layer = LAYERS[name]
    x = example_input(name, model, device)
    torch_cam = fdcam.FDCAM(model, layer)
    ort_cam = fdcam.FDCAM(model, layer, backend="onnxruntime", provider=provider, precision=precision)

    (torch_maps, torch_first) = timed(lambda: torch_cam(x), device, 1)
    (ort_maps, ort_first) = timed(lambda: ort_cam(x), device, 1)  # exports and builds the session
    tail = ort_cam.tails[0]
    correlation, max_abs = agreement(torch_maps, ort_maps)
    explanations = 1 + repeats
    _, torch_times = timed(lambda: torch_cam(x), device, repeats)
    _, ort_times = timed(lambda: ort_cam(x), device, repeats)
    runs_per_explanation = tail.runs / explanations

    split = ort_cam.split_for(x)
    with torch.no_grad():
        features, *extras = (t[:1] for t in split.head(x))
    masks = torch.cat([torch.eye(features.shape[1]), 1 - torch.eye(features.shape[1])]).to(device)
    torch_tail = TorchTail(split.tail)
    _, torch_tail_times = timed(lambda: torch_tail.run(features, masks, extras), device, repeats)
    _, ort_tail_times = timed(lambda: tail.run(features, masks, extras), device, repeats)

    min_correlation, max_difference = THRESHOLDS[precision]
    result = {
        "model": name,
        "layer": layer,
        "provider": tail.provider,
        "precision": precision,
        "correlation": correlation,
        "max_abs_difference": max_abs,
        "runs_per_explanation": runs_per_explanation,
        "first_call_s": {"torch": torch_first[0], "onnxruntime": ort_first[0]},
        "explanation_s": {"torch": median(torch_times), "onnxruntime": median(ort_times)},
        "switch_passes_s": {
            "torch": median(torch_tail_times),
            "onnxruntime": median(ort_tail_times),
            "masks": masks.shape[0],
        },
        "checks": {
            "maps_agree": correlation >= min_correlation and max_abs <= max_difference,
            "one_run_per_explanation": runs_per_explanation == 1,
        },
    }
    if device.type == "cuda":
        result["bound_runs"] = tail.bound_runs
        result["checks"]["iobinding_used"] = tail.bound_runs == tail.runs
        result["checks"].update(stream_checks(tail, features, masks, extras, device))
        try:
            copies = host_copies(lambda: tail.run(features, masks, extras), device)
            result["host_copies"] = copies
            result["checks"]["no_host_copies"] = copies["largest"] <= SMALL_COPY_BYTES
        except Exception as error:  # the profiler needs CUPTI; report rather than fail
            result["host_copies"] = f"unavailable ({type(error).__name__}: {error})"
    return result


def milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def report(result: dict) -> None:
    times, passes = result["explanation_s"], result["switch_passes_s"]
    verdict = (
        "ok"
        if all(result["checks"].values())
        else "FAILED " + ", ".join(k for k, v in result["checks"].items() if not v)
    )
    print(
        f"{result['model']:<18} {result['provider']:<8} corr {result['correlation']:.6f}  "
        f"max|Δ| {result['max_abs_difference']:.2e}  "
        f"runs/explanation {result['runs_per_explanation']:g}  "
        f"explanation torch {milliseconds(times['torch'])} / ORT {milliseconds(times['onnxruntime'])}  "
        f"{passes['masks']} switch passes torch {milliseconds(passes['torch'])} / "
        f"ORT {milliseconds(passes['onnxruntime'])}  {verdict}"
    )
    if isinstance(result.get("host_copies"), dict):
        copies = result["host_copies"]
        print(
            f"{'':<18} host<->device copies during one tail run: {copies['count']} "
            f"({copies['bytes']} bytes, largest {copies['largest']})"
        )


def write_json(payload: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 when all pass (or when there is no CUDA for a GPU provider), 1 otherwise."""
    args = parse_args(argv)
    reason = cuda_unavailable_reason(args.provider)
    if reason:
        print(f"gpu_check: skipped, provider {args.provider!r} needs CUDA: {reason}")
        write_json({"skipped": reason, "provider": args.provider})
        return 0
    device = torch.device("cpu" if args.provider == "cpu" else "cuda")
    if device.type == "cuda" and args.precision == "fp32":
        full_fp32_in_torch()
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "provider": args.provider,
        "precision": args.precision,
    }
    print(f"gpu_check on {header['device']} (torch {header['torch']}, onnxruntime {header['onnxruntime']})")
    results = []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        if name not in LAYERS:
            print(f"gpu_check: unknown model {name!r}; choose from {', '.join(LAYERS)}", file=sys.stderr)
            return 2
        results.append(check_model(name, device, args.provider, args.precision, max(0, args.repeats)))
        report(results[-1])
    passed = all(all(result["checks"].values()) for result in results)
    write_json({**header, "passed": passed, "results": results})
    print("gpu_check: all checks passed" if passed else "gpu_check: some checks FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
