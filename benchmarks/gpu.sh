#!/usr/bin/env bash
# The GPU checks, in one go on a CUDA machine: the CUDA test module, the bf16 training-step benchmarks of both
# native models against transformers, and the default job trained on the GPU. Each part has a time limit, so
# one that hangs does not take the rest with it; logs and results go to $OUT (default benchmarks/results/gpu).
#
#     bash benchmarks/gpu.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.log"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grouped_mm', hasattr(torch.nn.functional, 'grouped_mm'))" | tee -a "$OUT/gpu.log"

timeout "${TEST_LIMIT:-170}" $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -40 | tee -a "$OUT/gpu.log"
for model in mimo_v2_flash minimax_m3; do
  timeout "${BENCH_LIMIT:-120}" $PY benchmarks/train_step.py --model "$model" --device cuda --steps 10 \
    --out "$OUT" ${BENCH_ARGS:-} 2>&1 | grep -v "Loading weights" | tee -a "$OUT/gpu.log"
done
# the default job on the GPU (bf16 autocast, the trainer's default there); its metrics come back, not its checkpoint
RUN=$(mktemp -d)
timeout "${TRAIN_LIMIT:-120}" $PY -m plait train configs/default.yaml train.device=cuda "output_dir=$RUN" \
  ${TRAIN_ARGS:-} 2>&1 | tail -15 | tee -a "$OUT/gpu.log"
cp "$RUN/metrics.jsonl" "$OUT/default-cuda-metrics.jsonl" 2>/dev/null
exit 0
