#!/usr/bin/env bash
# The GPU checks of one device session, in one command (see ../shared/tools/gpu/README.md):
#   bash .dev/small/install.sh && bash benchmarks/gpu_session.sh
# Installs fdcam (and pytorch-grad-cam wheels from .dev/pgc, if carried) into /tmp/site, then runs
# the GPU tests, benchmarks/gpu_check.py (ORT CUDA, TensorRT fallback) and the latency benchmark.
# Each step has its own time limit (about 14 minutes in all, the ratio steps last); logs and JSON go to $OUT
# (default /tmp/fdcam-gpu).
set -u
OUT=${OUT:-/tmp/fdcam-gpu}
mkdir -p "$OUT"
REPO=$PWD
# fdcam.export and fdcam.runtime exist only in the installed package (they live in export/ and runtime/
# in the tree), so the steps run from /tmp: the repo root first on sys.path would shadow /tmp/site.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 FDCAM_CACHE=/tmp/fdcam-cache PYTHONPATH=/tmp/site:$REPO
LOG="$OUT/session.log"
step() { echo; echo "=== $* ($(date +%T))"; }
{
  step "install"
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v WARNING
  if ls .dev/pgc/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/site .dev/pgc/*.whl 2>&1 | grep -v WARNING
  fi
  cd /tmp
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, onnxruntime as o, fdcam; print('torch', torch.__version__, torch.cuda.get_device_name(), '| ort', o.__version__, o.get_available_providers(), '| fdcam', fdcam.__file__)"

  step "GPU tests (CUDA graph vs eager)"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/test_tail.py" "$REPO/tests/test_fdcam.py" \
    -k "cuda or run_images or precision or batched or one_tail_call" 2>&1 | grep -v '^0\.' | tail -60

  step "gpu_check cuda fp32"
  timeout 100 python3 "$REPO/benchmarks/gpu_check.py" --provider cuda --precision fp32 --repeats 5
  cp -f "$OUT/gpu_check.json" "$OUT/gpu_check_cuda_fp32.json" 2>/dev/null
  step "gpu_check tensorrt (no TensorRT libraries there: the fallback)"
  timeout 60 python3 "$REPO/benchmarks/gpu_check.py" --provider tensorrt --precision fp32 --repeats 2 --models efficientnet_lite0
  mv -f "$OUT/gpu_check.json" "$OUT/gpu_check_tensorrt.json" 2>/dev/null

  for spec in vgg16:180 efficientnet_lite0:100 resnet50:100; do
    model=${spec%%:*}; limit=${spec##*:}
    step "latency $model, batch 32 (limit ${limit}s)"
    timeout $limit python3 -m benchmarks.latency --device cuda --models $model --batch 32 --repeat 7 --warmup 1 \
      --quick --profile --profile-precision tf32 --json "$OUT/latency-gpu-$model.json"
  done
  # FD-CAM / Grad-CAM in the same engine (torch and the one-file graph), batch 1 medians, with
  # explanations/s at batch 32: the ratio table after the main table, and "ratios" in the JSON.
  for spec in resnet50:120 efficientnet_lite0:100 vgg16:150; do
    model=${spec%%:*}; limit=${spec##*:}
    step "ratios $model: fdcam/gradcam, explainer-fdcam/explainer-gradcam, batch 32 (limit ${limit}s)"
    timeout $limit python3 -m benchmarks.latency --device cuda --models $model \
      --methods fdcam,gradcam,explainer-fdcam,explainer-gradcam --batch 32 --repeat 5 --warmup 1 \
      --json "$OUT/ratios-gpu-$model.json"
  done
  step "done"
} 2>&1 | tee "$LOG"
