#!/usr/bin/env bash
# Runs named steps in one device call, each under its own time limit, and keeps every log.
# Usage (repo root):  bash experiments/device_steps.sh TOTAL_S "name|limit_s|command" ...
# Each step's output goes to $OUT/<name>.log as it runs, its exit status to $OUT/steps.txt;
# a step gets at most what is left of TOTAL_S (minus 10 s for packing), so a slow step
# never costs the logs of the others. experiments/results is packed into
# $OUT/results.tar.gz after every step.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-/tmp/jaxeff-device-steps}"
mkdir -p "$out"
total="$1"; shift
t0=$(date +%s)
{ python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv; } \
  >"$out/env.log" 2>&1
for step in "$@"; do
  name="${step%%|*}"; rest="${step#*|}"; limit="${rest%%|*}"; cmd="${rest#*|}"
  left=$(( total - ( $(date +%s) - t0 ) - 10 ))
  if (( left < 20 )); then echo "$name skipped (no time left)" >>"$out/steps.txt"; continue; fi
  (( limit > left )) && limit=$left
  s=$(date +%s)
  timeout -k 5 "$limit" bash -c "$cmd" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s (limit $limit)" >>"$out/steps.txt"
  tar -czf "$out/results.tar.gz" experiments/results notes/device_runs 2>/dev/null
done
cat "$out/steps.txt"
