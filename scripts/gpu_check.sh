#!/usr/bin/env bash
# The TensorRT GPU check, one script: engines for the demo model and the GPT-2 124M shape, logits
# and greedy parity against PyTorch, ITL and tokens/s at batch 1 and 16, a JSON report
# (OUT/gpu_check.json). For a GPU machine with the usual CUDA + PyTorch image and no network but
# the package registries; about 5-8 minutes.
#
#   scripts/gpu_check.sh [OUT]          (default OUT: gpu_check_out)
#
# Exit status: 0 all checks passed; 1 a check failed (see the report); 3 no GPU / TensorRT
# could not be had (the report says why).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
T0=$(date +%s)

unavailable() {
  echo "gpu_check: $1" >&2
  "$PY" - "$OUT" "$1" <<'PY'
import json, sys
out, why = sys.argv[1], sys.argv[2]
json.dump({"ok": False, "status": "unavailable", "why": why}, open(f"{out}/gpu_check.json", "w"), indent=2)
PY
  exit 3
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || unavailable "no CUDA GPU visible to PyTorch (or torch is not installed)"

# What gptpipe's export and runtime import, if the image lacks it (never torch: the image's own).
missing=()
for pair in numpy:numpy onnx:onnx onnxscript:onnxscript onnxruntime:onnxruntime typer:typer rich:rich \
            psutil:psutil tokenizers:tokenizers google.protobuf:protobuf; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check: installing ${missing[*]}"
  "$PY" -m pip install --quiet "${missing[@]}" || unavailable "could not pip install ${missing[*]}"
fi

# TensorRT 10.6 (the pinned version) and cuda-python. The tensorrt-cu12 sdist's own install step
# asks pypi.nvidia.com; NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 skips it: the wheels come from PyPI.
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
  echo "gpu_check: installing TensorRT 10.6 from PyPI"
  NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 timeout 300 "$PY" -m pip install --quiet \
      tensorrt-cu12==10.6.0 tensorrt-cu12-libs==10.6.0 tensorrt-cu12-bindings==10.6.0 \
    || unavailable "pip install tensorrt-cu12==10.6.0 failed (no route to PyPI, or no wheel for this Python)"
fi
"$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" \
  || unavailable "tensorrt is installed but does not import (CUDA runtime / driver mismatch?)"
if ! "$PY" -c "from serving.engine.gpu_libs import import_cudart; import_cudart()" 2>/dev/null; then
  "$PY" -m pip install --quiet "cuda-python>=12.3,<13" || unavailable "pip install cuda-python failed"
fi

# The rest of the 8 minutes, less what the installs took and a margin for the report.
LEFT=$(( 450 - ($(date +%s) - T0) ))
[ "$LEFT" -gt 120 ] || LEFT=120
"$PY" scripts/gpu_check.py --out "$OUT" --deadline-s "$LEFT"
