#!/usr/bin/env bash
# Every GPU figure the project claims, in one call (under 8 minutes on one H100/H200-class GPU):
#   1. the CUDA-only tests (no sync in the forward, one per calibration batch, reduce-overhead, bfloat16)
#   2. the targets of benchmarks/perf.py on the GPU (calibration, compiled efficientnet_b0, eager)
#   3. inference sparsified / original, eager and compiled, float32 and bfloat16, batch 1 and 64, 224x224
#   4. calibration cost (one pass, statistics only, exact two passes)
#   5. a 2-process NCCL evaluation (torchrun, one GPU per process; skipped, and said so, with one GPU)
# Row 2 is issue 23's table (benchmarks/perf.py --parts targets: on CUDA it adds the compiled bfloat16 b32 224x224
# rows); record its figures, with the card's name, in a dated section of benchmarks/RESULTS.md.
# Output: benchmarks/out/gpu.md (copy the tables into benchmarks/RESULTS.md). Usage:
#   bash benchmarks/gpu.sh [python]        # default python: .venv/bin/python if present, else python
set -u
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=benchmarks/out/gpu.md
mkdir -p benchmarks/out
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
{
  echo "# GPU figures, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "command: bash benchmarks/gpu.sh"
  echo
  echo "## CUDA tests"
  echo '```'
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
  echo '```'
} > "$OUT"
run() {  # a perf.py call under a time limit; its tables go to the file
  timeout "$1" "$PY" benchmarks/perf.py "${@:2}" 2>&1 | grep -v "^W[0-9]" >> "$OUT" || echo "(timed out or failed: perf.py ${*:2})" >> "$OUT"
}
run 150 --device cuda --parts targets --target-rounds 11
run 120 --device cuda --parts infer --models resnet50 efficientnet_b0 convnext_tiny --batches 1 64 --rounds 5
run 90 --device cuda --dtype bfloat16 --parts infer --models resnet50 convnext_tiny --batches 64 --rounds 5
run 60 --device cuda --parts calib --rounds 5
{
  echo
  echo "## 2-process NCCL evaluation (digits, torchrun --nproc-per-node=2)"
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$gpus" -ge 2 ]; then
    echo '```'
    t0=$(date +%s)
    timeout 240 "$PY" -m torch.distributed.run --standalone --nproc-per-node=2 -m fxsparse evaluate digits \
      --device cuda --attacks clean pgd --max-examples 512 2>&1 | grep -v "^W[0-9]" | tail -20 \
      || echo "(timed out or failed)"
    echo '```'
    echo "wall $(( $(date +%s) - t0 )) s"
  else
    echo "skipped: $gpus GPU(s) visible; NCCL needs one GPU per process"
  fi
} >> "$OUT"
echo >> "$OUT"
echo "total $(( $(date +%s) - start )) s" >> "$OUT"
cat "$OUT"
