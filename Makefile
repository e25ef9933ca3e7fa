# The two commands (see README): `make run` trains the default small LM on the embedded
# data and `make test` runs the CPU test suite. Each sets up .venv itself first.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-all gpu-check bench clean

setup:
	@bash tools/setup_env.sh

run: setup
	$(PY) -m experiments.train_lm --preset cpu-small $(ARGS)

# pytest's exit code 5 (no tests collected) is a failure too.
test: setup
	@$(PY) -m pytest -q -n 2 -m "not gpu" $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

gpu-check:
	bash experiments/gpu_check.sh

clean:
	rm -rf .venv runs .pytest_cache
