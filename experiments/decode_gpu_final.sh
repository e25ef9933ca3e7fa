#!/usr/bin/env bash
# Decode work on one H100, one device call per part (each ~280 s), correctness first:
#   PYTHONUNBUFFERED=1 PYTHONPATH=. bash experiments/decode_gpu_final.sh bench     # GPU tests + decode suite
#   PYTHONUNBUFFERED=1 PYTHONPATH=. bash experiments/decode_gpu_final.sh generate  # real-size tests + e2e tokens/s
#   PYTHONUNBUFFERED=1 PYTHONPATH=. bash experiments/decode_gpu_final.sh sweep     # canary + kernel config sweep
# Logs and JSON land in $OUT; copy them to notes/device_logs/ and experiments/results/.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. DECODE_MOSAIC_CANARY_FILE=/tmp/decode_canary.json
part=${1:-bench}
filter() { grep -v "Warning\|warnings.warn\|return rule"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
case "$part" in
  bench)
    timeout 100 python3 -m pytest -q -m gpu tests/ops/test_decode_attention.py 2>&1 | filter \
      | tail -20 | tee "$OUT/decode_tests.log"
    timeout 170 python3 -m experiments.bench decode 2>&1 | filter | tee "$OUT/decode_bench.log"
    cp experiments/results/*/decode.json experiments/results/*/decode.png "$OUT/" 2>/dev/null ;;
  generate)
    timeout 60 python3 -m pytest -q -m gpu tests/ops/test_decode_attention.py \
      -k "canary or gqa_contiguous_bf16 or gqa_paged32_int8" 2>&1 | filter | tail -8 \
      | tee "$OUT/decode_tests.log"
    timeout 210 python3 -m experiments.generate_bench --out-dir "$OUT" 2>&1 | filter \
      | tee "$OUT/decode_generate.log" ;;
  sweep)
    timeout 90 python3 -m pytest -q -m gpu tests/ops/test_decode_attention.py -k canary 2>&1 \
      | filter | tail -6 | tee "$OUT/decode_tests.log"
    timeout 180 python3 -m experiments.decode_sweep --deadline 150 2>&1 | filter \
      | tee "$OUT/decode_sweep.log" ;;
  *) echo "usage: $0 bench|generate|sweep"; exit 2 ;;
esac
