"""Experiment scripts (training, generation, benchmarks) built on jaxeff."""
