#!/usr/bin/env bash
# Runs named steps in one device call, each under its own time limit, and keeps every log.
# Usage (repo root):  bash experiments/device_steps.sh TOTAL_S "name|limit_s|command" ...
# (quote \$OUT in a step so that it names the work folder: 'name|60|cmd --out $OUT'; a step
# sees its own limit, possibly cut to what is left, as $STEP_LIMIT)
# Each step's output goes to <name>.log as it runs, its exit status to steps.txt; a step gets
# at most what is left of TOTAL_S (minus 10 s for packing), so a slow step never costs the
# logs of the others. Steps see OUT as a work folder; after every step that folder, the
# logs and experiments/results are packed into $OUT/bundle.tar.gz (the device tool brings
# back only a few files per call, so everything travels in one).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
final="${OUT:-/tmp/jaxeff-device-steps}"
out="$(mktemp -d)/out"
mkdir -p "$out" "$final"
export OUT="$out"
total="$1"; shift
t0=$(date +%s)
# Baseline libraries carried as wheels (tools/baseline_wheels.sh; the call carries .whl):
# installed beside the image's packages, so the suites' tokamax / qwix rows run.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$out/wheels.log" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "wheel install failed" >>"$out/wheels.log"
fi
{ python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
  python3 -c 'import tokamax, qwix; print("baselines: tokamax", tokamax.__version__, "qwix", qwix.__version__)' 2>&1 | tail -1
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv; } \
  >"$out/env.log" 2>&1
for step in "$@"; do
  name="${step%%|*}"; rest="${step#*|}"; limit="${rest%%|*}"; cmd="${rest#*|}"
  left=$(( total - ( $(date +%s) - t0 ) - 10 ))
  if (( left < 20 )); then echo "$name skipped (no time left)" >>"$out/steps.txt"; continue; fi
  (( limit > left )) && limit=$left
  s=$(date +%s)
  STEP_LIMIT=$limit timeout -k 5 "$limit" bash -c "$cmd" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s (limit $limit)" >>"$out/steps.txt"
  tar -czf "$final/bundle.tar.gz" experiments/results -C "$out" . 2>/dev/null
  cp "$out/steps.txt" "$final/steps.txt"
done
cat "$out/steps.txt"
