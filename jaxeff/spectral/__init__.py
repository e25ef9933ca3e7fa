"""Spectral algorithms that are not kernels: Monarch FFT plans and bf16-capable rfft/irfft."""

from jaxeff.spectral import monarch
from jaxeff.spectral.fft import irfft, rfft

__all__ = ["irfft", "monarch", "rfft"]
