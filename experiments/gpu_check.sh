#!/usr/bin/env bash
# One device call: every `gpu` test, then every benchmark suite, then a summary.
# Usage (repo root, on the GPU machine):  bash experiments/gpu_check.sh [--quick] [suite ...]
# --quick runs every suite on its smaller shape set so that tests + suites fit one 10-minute
# device call; the full suites (attention alone takes ~4 minutes on an H100) can be given
# by name in separate calls.
# Results land in experiments/results/<device>/; when $OUT is set (the device tool), the
# logs and a tarball of the results are copied there too.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
quick=()
suites=()
for a in "$@"; do
  case "$a" in
    --quick) quick=(--quick) ;;
    *) suites+=("$a") ;;
  esac
done
[ ${#suites[@]} -eq 0 ] && suites=(all)
out="${OUT:-/tmp/jaxeff-gpu-check}"
mkdir -p "$out"

"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$out/env.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null | tee -a "$out/env.log"

start=$(date +%s)
# Tests assert no timings, so they run 4 at a time (compilation is the bottleneck); each
# process allocates GPU memory on demand instead of taking 75% up front.
XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q -n 4 -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "gpu tests: rc=$test_rc in $(( $(date +%s) - start )) s"

start=$(date +%s)
"$PY" -m experiments.bench "${suites[@]}" "${quick[@]}" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench: rc=$bench_rc in $(( $(date +%s) - start )) s"

tar -czf "$out/results.tar.gz" experiments/results 2>/dev/null
echo "== summary =="
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 3
grep -E "^== |x$|wrote" "$out/bench.log" | tail -n 60
exit $(( test_rc != 0 || bench_rc != 0 ))
