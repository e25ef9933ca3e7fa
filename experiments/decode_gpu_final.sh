#!/usr/bin/env bash
# One device call (H100, ~280 s): decode correctness, then the committed decode suite and
# the end-to-end generation numbers. Run from the repository root with $OUT set:
#   PYTHONUNBUFFERED=1 PYTHONPATH=. bash experiments/decode_gpu_final.sh
# Logs and JSON land in $OUT; copy them to notes/device_logs/ and experiments/results/.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. DECODE_MOSAIC_CANARY_FILE=/tmp/decode_canary.json
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 100 python3 -m pytest -q -m gpu tests/ops/test_decode_attention.py \
  -k "canary or real_sizes or lower" 2>&1 | grep -v "Warning\|warnings.warn\|return rule" \
  | tail -20 | tee "$OUT/decode_tests.log"
timeout 110 python3 -m experiments.bench decode 2>&1 | grep -v "Warning\|warnings.warn\|return rule" \
  | tee "$OUT/decode_bench.log"
cp experiments/results/*/decode.json "$OUT/" 2>/dev/null
timeout 70 python3 -m experiments.generate_bench --out-dir "$OUT" 2>&1 \
  | grep -v "Warning\|warnings.warn\|return rule" | tee "$OUT/decode_generate.log"
