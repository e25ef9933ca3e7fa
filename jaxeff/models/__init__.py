"""Whole models built from :mod:`jaxeff.nn`."""

from jaxeff.models.gpt import GPT, PRESETS, GPTConfig, flops_per_token, get_config, num_params

__all__ = ["GPT", "GPTConfig", "PRESETS", "flops_per_token", "get_config", "num_params"]
