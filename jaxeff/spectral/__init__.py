"""Spectral algorithms that are not kernels: Monarch FFT plans, rfft/irfft."""
