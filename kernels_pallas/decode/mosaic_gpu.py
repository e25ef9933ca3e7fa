"""Placeholder (filled below)."""
from kernels_pallas.decode import common

def contiguous_page_size(capacity):
  return common.contiguous_page_size(capacity)

def supports(**kw):
  return "not yet"

def decode_attention(*a, **k):
  raise NotImplementedError
