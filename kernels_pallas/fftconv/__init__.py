"""Fused FFT convolution kernels (FlashFFTConv-style Monarch decomposition)."""
