#!/usr/bin/env bash
# Downloads the baseline libraries the benchmark suites compare against when importable
# (tokamax: attention and grouped matmul; qwix: quantized matmul) and their pure-Python
# needs into .whl/ (git-ignored), as wheels for Python 3.12 on x86-64 Linux, for a GPU
# machine without network access. experiments/device_steps.sh installs whatever .whl/
# holds into /tmp/site before its steps (the device call carries .whl).
# Usage (repo root, needs network): bash tools/baseline_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
WHEELS=(tokamax==0.0.17 qwix==0.1.8 xprof==2.24.2 immutabledict==4.3.1 pydantic==2.14.4
        pydantic_core==2.50.5 typing_inspection==0.4.5 annotated_types==0.8.0
        einshape==1.0 fire==0.7.1 termcolor==3.3.0 six==1.17.0 jaxtyping==0.3.11
        tqdm==4.70.1)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
