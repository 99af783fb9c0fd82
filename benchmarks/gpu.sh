#!/usr/bin/env bash
# The benchmark on one CUDA GPU, headline sections first, each section in its own process under its own
# `timeout`, so one slow section cannot hide the others and the whole script ends within 8 minutes (the limits
# below add up to 460 s, start-up included). A section cut short keeps the rows it printed in its log.
#
#   bash benchmarks/gpu.sh          # reports to $OUT if set, else benchmarks/results/
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh   # a dry run of the same commands on the CPU (bench.py --smoke: a tiny
#                                            # model, a handful of inputs, figures meaningless; limits ×4)
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
SLACK=1
if [[ -n "${GPU_SH_SMOKE:-}" ]]; then
  # Process start-up (torch, Lightning; fresh processes for memory) dominates a dry run on a small, busy CPU.
  DEVICE=(--device cpu --smoke) SLACK=4
elif "$PYTHON" -c "import benchmarks.bench, anovl.data, lightning, torch; assert torch.cuda.is_available()"; then
  DEVICE=(--device cuda)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DEST/gpu.txt"
else
  echo "gpu.sh: $PYTHON cannot import anovl and its dependencies, or sees no GPU (see benchmarks/README.md)" >&2
  exit 2
fi

status=0
# run NAME SECONDS ARGS...: one section's process, time-boxed, report NAME.md and log NAME.log under $DEST.
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most $((limit * SLACK)) s)"
  timeout -k 5 "$((limit * SLACK))" "$PYTHON" -m benchmarks.bench "${DEVICE[@]}" --output "$DEST/$name.md" "$@" 2>&1 \
    | tee "$DEST/$name.log" || status=1
}
# Headline: a whole `anovl test` (1,725 generated 1024 px PNGs) against the model alone, bf16, batch 64;
# the data path against Pillow's decoding, loader scaling over the machine's cores, the decoded-image cache.
run pipeline-bf16 160 --precision bf16 --batch-sizes 64 --sections pipeline
# Images/s and the stage split (incl. the metrics update, with the loader's region sizes) per batch size.
run throughput-bf16 50 --precision bf16 --batch-sizes 1 64 --sections throughput
run throughput-fp32 35 --precision fp32 --batch-sizes 1 16 --sections throughput
# Side by side with the authors' one-image-at-a-time loop.
run reference-bf16 30 --precision bf16 --batch-sizes 16 --sections reference
# Encoder overhead over plain encode_image, and which attention kernels run (fused SDPA expected).
run encoder-bf16 25 --precision bf16 --batch-sizes 1 16 --sections encoder
# What bf16 and TF32 change in the maps, and what they gain, against fp32.
run precision-bf16 30 --precision bf16 --batch-sizes 16 --sections precision
run precision-tf32 30 --precision tf32 --batch-sizes 16 --sections precision
# Exact metrics against the threshold baseline (on the CPU; the baseline on 345 of 1,725 maps, extrapolated).
run metrics 20 --baseline-maps 345 --sections metrics
# Memory of a Lightning test run (256 px images, 1,725 of them).
run testrun-bf16 25 --precision bf16 --batch-sizes 64 --sections testrun
# Trained methods (APRIL-GAN, AnomalyCLIP, published settings): one training step against the test forward.
run fit-bf16 25 --precision bf16 --batch-sizes 8 --sections fit
# TTA's adapter steps through torch.compile at batch 1, against TFA at batch 1 in the same run (target: TTA ≤ 1.3×
# TFA); the eager TTA row at batch 1 is in throughput-bf16. The warm-up pays the compilation.
run tta-compile-bf16 30 --precision bf16 --batch-sizes 1 --tta-compile --sections throughput
exit $status
