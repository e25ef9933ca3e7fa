#!/usr/bin/env bash
# The waiting device work as numbered calls, highest value first (notes/next_device_runs.md
# says why each step is there and what to do with its result). One device call each:
#   bash experiments/gpu_plan.sh 1        # then 2, 3, ... while device time lasts
#   bash experiments/gpu_plan.sh 1 420    # the same with a shorter total (device time left)
# Calls with suites (1, 3-5) time the tokamax / qwix baselines when the call carries .whl
# (run `bash tools/baseline_wheels.sh` here first; the device tool's carry=[".whl"]).
#   bash experiments/gpu_plan.sh list     # print the steps of every call
# Every call stays within the device tool's 600 s command limit (TOTAL 570 s); the steps
# run through experiments/device_steps.sh, which packs every log and JSON into
# $OUT/bundle.tar.gz after each step.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEM='XLA_PYTHON_CLIENT_MEM_FRACTION=0.2'
PYT='python3 -m pytest -q -p no:cacheprovider -m gpu'

call_1=(  # the medium-m cluster-2 fix (session 7); attention d128 backward variants and
          # forward tilings (the headline op's two open gaps)
  "medium_gpu|110|$PYT -vv --tb=line tests/ops/test_quantized_matmul_medium.py"
  "attn_bwd128|200|python3 experiments/attention_bwd128_dev.py --budget-s \$((STEP_LIMIT - 15)) --out \$OUT/attn_bwd128"
  "attn_fwd_tiles|220|python3 experiments/attention_fwd_dev.py --set tiles --budget-s \$((STEP_LIMIT - 15)) --out \$OUT/attn_fwd_tiles"
)
call_2=(  # attention variants' GPU tests; weight-only candidates; quant suite with qwix rows
  "attn_variant_gpu_tests|140|$PYT -x tests/ops/test_attention_mosaic_bwd128.py tests/ops/test_attention_mosaic_fwd_tiles.py"
  "quant_dev|200|python3 experiments/quant_dev.py --budget 165 --out \$OUT"
  "quant_suite|140|python3 -m experiments.bench quant_matmul --quick"
)
call_2b=(  # FFT conv seq 8K-16K candidate and its tests
  "fftconv_mosaic_long|240|python3 experiments/fftconv_mosaic_dev.py --long --budget 190 --check-timeout 100 --out \$OUT"
  "fftconv_long_gpu_tests|100|$PYT -x tests/spectral/test_fft_conv_mosaic_long.py"
)
call_3=(  # decode and FFT-conv GPU tests, decode 128-key blocks
  "gpu_decode_fft|170|$MEM $PYT -n 4 -vv --tb=line tests/ops/test_decode_attention.py tests/spectral/test_fft_conv_mosaic.py"
  "decode_quant6|220|python3 -m experiments.decode_quant_step --deadline 170 --check-timeout 100 2>&1 | grep -v Warning | tee \$OUT/decode_quant6.log"
  "bench_fftconv|150|python3 -m experiments.bench fftconv --quick"
)
call_4=(  # FFT conv backward candidates (Mosaic du and dk, fused) and their tests
  "fftconv_mosaic_bwd|200|python3 experiments/fftconv_mosaic_dev.py --backward --budget 170 --check-timeout 100 --out \$OUT"
  "fftconv_bwd_gpu_tests|140|$PYT -x tests/spectral/test_fft_conv_mosaic_dk.py tests/spectral/test_fft_conv_mosaic_bwd.py"
  "bench_moe|200|python3 -m experiments.bench moe --quick"
)
call_5=(  # the attention suite at seq >= 2048 with the tokamax rows (carry .whl)
  "attn_d128|280|JAXEFF_ATTN_BENCH_HEAD_DIM=128 JAXEFF_ATTN_BENCH_MIN_SEQ=2048 JAXEFF_ATTN_BENCH_SKIP=xla,packed python3 -m experiments.bench attention"
  "attn_d64|280|JAXEFF_ATTN_BENCH_HEAD_DIM=64 JAXEFF_ATTN_BENCH_MIN_SEQ=2048 JAXEFF_ATTN_BENCH_SKIP=xla,packed python3 -m experiments.bench attention"
)
call_6=(  # end to end: generation tokens/s, bf16 vs quantized KV (issue 4) and weights (issue 5)
  "decode_generate|280|bash experiments/decode_gpu_final.sh generate"
  "quant_generate|280|python3 -m experiments.generate_bench --preset gpt-1b --layers 24 --batches 1,8 --combos bf16/bf16,int4/int8,int4/bf16 --prompt 256 --new 64 --out-dir \$OUT/quant_generate"
)
call_7=(  # end to end: int4 weights, perplexity and tokens/s vs bf16
  "quantize_lm_gpu|420|python3 -m experiments.quantize_lm --quick --preset gpt-125m --train-steps 300 --batch 1"
)
call_8=(  # end to end Hyena vs GPT at seq 8192
  "hyena_vs_gpt|280|python3 -m experiments.hyena_vs_gpt --steps 200 --out \$OUT/hvg"
)
call_9=(  # sparse: launch sweep of the 2:4 words and ELL decode kernels, the suite, GPU tests
  "sparse_tune|200|python3 experiments/sparse_tune.py --budget 180 --out \$OUT"
  "sparse_suite|160|python3 -m experiments.bench sparse --quick"
  "sparse_gpu_tests|200|$MEM $PYT -n 4 tests/sparse"
)
# Only where a multi-GPU kind is lent (kind nvidia-h100-x2 or larger):
call_parallel=(
  "parallel|500|NCCL_NVLS_ENABLE=0 python3 -m experiments.bench parallel"
)

which="${1:-list}"
if [[ "$which" == list ]]; then
  for c in 1 2 2b 3 4 5 6 7 8 9 parallel; do
    declare -n steps="call_$c"
    echo "call $c:"; printf '  %s\n' "${steps[@]}"
  done
  exit 0
fi
if ! declare -p "call_$which" >/dev/null 2>&1; then
  echo "gpu_plan.sh: no call '$which' (1, 2, 2b, 3..9, parallel or list)" >&2; exit 2
fi
declare -n steps="call_$which"
exec bash experiments/device_steps.sh "${2:-570}" "${steps[@]}"
