"""Whole models built from :mod:`jaxeff.nn`."""

from jaxeff.models import hyena
from jaxeff.models.gpt import GPT, PRESETS, GPTConfig, flops_per_token, get_config, num_params
from jaxeff.models.hyena import HyenaConfig, HyenaLM

__all__ = ["GPT", "GPTConfig", "HyenaConfig", "HyenaLM", "PRESETS", "flops_per_token",
           "get_config", "hyena", "num_params"]
