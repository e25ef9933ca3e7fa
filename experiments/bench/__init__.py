"""Benchmark suites: ``python -m experiments.bench <suite|all> [--quick]``."""
