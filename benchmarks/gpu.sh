#!/usr/bin/env bash
# The full AnoVL benchmark on one CUDA GPU: fp32, then bf16 autocast. About 5 minutes on an H100 (estimated);
# each run is cut off by `timeout` (300 s + 180 s), so the script ends within 8 minutes whatever happens, and a
# run cut short keeps the sections it finished in its report.
#
#   bash benchmarks/gpu.sh          # reports to $OUT if set, else benchmarks/results/
#
# Installs nothing from anywhere. Python: $PYTHON if set, else the repository's .venv if it imports anovl here,
# else python3 with the repository on PYTHONPATH. If that interpreter lacks open_clip or albumentations and
# the folder .whl/ holds wheels for them (benchmarks/README.md lists them), those are unpacked offline into
# a temporary folder that goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"

if [[ -z "${PYTHON:-}" ]]; then
  if .venv/bin/python -c "import anovl" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import open_clip, albumentations" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if ! "$PYTHON" -c "import benchmarks.bench, anovl.data, lightning, torch; assert torch.cuda.is_available()"; then
  echo "gpu.sh: $PYTHON cannot import anovl and its dependencies, or sees no GPU (see benchmarks/README.md)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DEST/gpu.txt"

status=0
# fp32 (TF32 off, PyTorch's default): every section; the slow threshold PRO baseline on 345 of the 1725 maps,
# its time extrapolated (the table says so).
timeout -k 10 300 "$PYTHON" -m benchmarks.bench --device cuda --precision fp32 --baseline-maps 345 \
  --output "$DEST/bench-gpu-fp32.md" 2>&1 | tee "$DEST/bench-gpu-fp32.log" || status=1
# bf16: the sections autocast changes (not the metrics or the text cache), and its Δ vs fp32.
timeout -k 10 180 "$PYTHON" -m benchmarks.bench --device cuda --precision bf16 \
  --sections encoder throughput reference testrun precision \
  --output "$DEST/bench-gpu-bf16.md" 2>&1 | tee "$DEST/bench-gpu-bf16.log" || status=1
exit $status
