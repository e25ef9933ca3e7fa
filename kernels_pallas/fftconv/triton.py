"""Fused FFT convolution (FFT -> pointwise filter multiply -> inverse FFT, with gating) and
the filter-gradient spectrum, as Pallas kernels lowered through Triton.

FlashFFTConv (Fu et al., 2023) with the Monarch (Cooley-Tukey four-step) decomposition.
A packed signal ``z`` (two batch rows of one channel as real and imaginary parts; the
filter is real so the two convolutions stay apart) of transform size ``n`` is viewed as

* two levels, ``n = n_1 * n_2`` (``n <= inner``): the matrix ``[n_1, n_2]`` whose first
  ``in_rows`` rows hold the input (causal zero padding skipped);
* three levels, ``n = n_a * n_1 * n_2``: ``[n_a, n_1, n_2]`` whose first ``in_a`` outer rows
  hold the input. Program ``k_a`` forms the outer DFT row
  ``X = w_n^(k_a m) * sum_{t_a < in_a} w_{n_a}^(k_a t_a) z[t_a]`` (``m`` the inner index; a
  few elementwise multiply-adds over rows read from L2), runs the two-level convolution of
  ``X`` with the spectrum row ``K[k_a]`` and writes ``conj(w_n^(k_a m)) * B`` in the compute
  dtype; the outer inverse DFT (``n_a``-term sums) and the gates run in XLA.

The two-level convolution of one signal, for chunks of ``chunk`` rows ``c`` of ``k_1``:

    A_c = F1[c, :in_rows] @ X         forward DFT along the rows (zero rows skipped)
    A_c = A_c * T[c]                  twiddles w^(k_1 t_2)
    Y_c = A_c @ F2                    forward DFT along the columns (Monarch order)
    Y_c = Y_c * K[c]                  the filter's spectrum (already / n)
    B_c = (Y_c @ conj(F2)) * conj(T[c])
    out += conj(F1)[:out_rows, c] @ B_c   inverse DFT along the rows, only the rows kept

so only one chunk of the spectrum and the ``[out_rows, n_2]`` accumulator are live at a
time (register pressure bounded for ``n`` up to 8192 and more). One program handles
``pairs`` packed signals of one channel in a loop: the filter spectrum, DFT matrices and
twiddles are fetched by the program once per chunk and pair from L1/L2 instead of once per
signal from L2 by separate programs.

Each complex matrix product is four real ``dot`` calls on bfloat16/float16 operands with
float32 accumulation, the two of each output part chained on one MMA accumulator
(``chain``, the default: ``Re = Mr Xr + Mi (-Xi)`` with the sign in a constant plane or the
loop-invariant input, no float32 adds), or four independent dots and adds, or three dots
(``gauss=True``: ``(a + ib)(c + id)`` as ``c(a + b) - b(c + d)`` / ``c(a + b) + a(d - c)``,
with the constant matrix's sums precomputed); twiddles, the filter multiply and the gates
are float32.

The input gradient of the convolution (a correlation) is the same kernel with
``conj(K)``. The filter gradient's spectrum ``sum_b conj(FFT(w_b)) FFT(d_b)`` is
:func:`filter_grad_spectrum`: one program per (outer row, chunk, channel, group) loops over
the group's packed pairs and accumulates the product of the two chunk spectra.

Limits: ``n_1, n_2`` powers of two in ``[16, 256]``, the outer factor a power of two up to
``MAX_OUTER``; bfloat16/float16 operands.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_FACTOR = 16  # smallest dot dimension Triton accepts
MAX_FACTOR = 256
MAX_OUTER = 64
MIN_N = MIN_FACTOR * MIN_FACTOR
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _pow2(v: int) -> bool:
  return v >= 1 and not v & (v - 1)


@dataclasses.dataclass(frozen=True)
class FFTConvConfig:
  """Launch parameters of the fused convolution.

  Attributes:
    num_warps: warps per program.
    chunk: rows of ``k_1`` per step of the chunk loop (clipped to ``n_1``).
    pairs: packed signals (pairs of batch rows) per program (clipped to a divisor of the
      number of pairs).
    inner: largest two-level transform; larger ``n`` use three levels with inner size
      ``inner``.
    gauss: three real dots per complex matrix product instead of four.
    chain: the two real dots of each part of a complex product accumulate in one MMA
      accumulator (no float32 adds, one accumulator tile per part; the inverse row DFT
      accumulates into the chunk loop's accumulator); False: four independent dots and
      float32 adds (the session-3 form). Ignored with ``gauss``.
    num_stages: Triton pipelining depth. With 2 or more Triton copies the chunk loop's
      constants (DFT matrix rows, twiddles, filter spectrum) into shared memory with
      cp.async (3: one chunk ahead), so no load latency and fewer barriers a chunk (Triton
      3.9 offline, 4K chunk 32: 27 -> 10 barriers; more shared memory: 196 KB at 3).
    unroll: unroll the chunk loop (static slices; the compiler may schedule the next
      chunk's loads early).
    stack: signals processed together as one tile (side by side for the row DFTs, one
      above the other for the column DFTs; clipped to ``pairs``): larger dots, and the
      constants are fetched once per stack.
    lowp_consts: twiddles and the filter spectrum in the compute dtype (half the bytes
      fetched per signal; one more rounding of 2^-9 relative).
  """

  num_warps: int = 4
  chunk: int = 32
  pairs: int = 4
  inner: int = 8192
  gauss: bool = False
  num_stages: int = 1
  unroll: bool = False
  stack: int = 1
  lowp_consts: bool = False
  chain: bool = True

  def __post_init__(self):
    for name in ("num_warps", "chunk", "pairs", "inner", "stack"):
      v = getattr(self, name)
      if not isinstance(v, int) or not _pow2(v):
        raise ValueError(f"FFTConvConfig.{name} must be a power of two, got {v!r}")
    if self.chunk < MIN_FACTOR:
      raise ValueError(f"FFTConvConfig.chunk must be >= {MIN_FACTOR}, got {self.chunk}")
    if not MIN_N <= self.inner <= MAX_FACTOR * MAX_FACTOR:
      raise ValueError(f"FFTConvConfig.inner must be in [{MIN_N}, {MAX_FACTOR ** 2}], got "
                       f"{self.inner}")


@dataclasses.dataclass(frozen=True)
class DkConfig:
  """Launch parameters of :func:`filter_grad_spectrum`.

  Attributes:
    num_warps: warps per program.
    chunk: rows of ``k_1`` per program (clipped to ``n_1``).
    groups: programs per (channel, chunk) over the batch; partial sums are added in XLA.
    gauss: three real dots per complex matrix product.
    chain: chained MMAs per complex product part (:class:`FFTConvConfig`).
    stack: signals per tile (:class:`FFTConvConfig`).
    inner: largest two-level transform (:class:`FFTConvConfig`; the filter gradient has
      its own layout, independent of the convolution's).
    lowp_consts: twiddles in the compute dtype (:class:`FFTConvConfig`).
  """

  num_warps: int = 4
  chunk: int = 32
  groups: int = 1
  gauss: bool = False
  num_stages: int = 1
  stack: int = 1
  inner: int = 4096
  lowp_consts: bool = False
  chain: bool = True

  def __post_init__(self):
    for name in ("num_warps", "chunk", "groups", "stack", "inner"):
      v = getattr(self, name)
      if not isinstance(v, int) or not _pow2(v):
        raise ValueError(f"DkConfig.{name} must be a power of two, got {v!r}")
    if self.chunk < MIN_FACTOR:
      raise ValueError(f"DkConfig.chunk must be >= {MIN_FACTOR}, got {self.chunk}")


DEFAULT_CONFIG = FFTConvConfig()
DEFAULT_DK_CONFIG = DkConfig()

# Per transform size (n = 2 seq for causal convolutions), from the H100 sweep of session 3
# (notes/spectral.md, notes/device_logs/s3_call4): n <= 2048 the fastest measured
# configuration (seq 1K: 407 us, 4.60x jnp.fft); n <= 8192 the session-2 kernel's
# configuration (whole [n_1, n_2] tile, one packed signal per program, 8 warps), which
# measured 3.18 ms at seq 4K including 2.4 GB of layout glue the current wrappers no longer
# have, against 3.35 ms for the chunked (chunk 32, 2 pairs) kernel; larger n the measured
# three-level default (20.4 ms at seq 16K). ``chain`` (on unless noted) was added after the
# sweep: the same products with fewer registers and barriers (Triton 3.9 offline compile:
# 4K chunked 172 -> 134 registers, 34 -> 27 barriers a chunk); at n <= 2048 it would cost
# the measured configuration one program per SM (168 -> 174 registers), so it stays off.
def config_for(n: int) -> FFTConvConfig:
  """The launch parameters used for a transform of size ``n``."""
  if n <= 2048:
    return FFTConvConfig(num_warps=4, chunk=32, pairs=4, stack=2, chain=False)
  if n <= 8192:
    return FFTConvConfig(num_warps=8, chunk=128, pairs=1)
  return FFTConvConfig(num_warps=8, chunk=32, pairs=2, inner=4096)


def dk_config_for(n: int) -> DkConfig:
  """The filter-gradient launch parameters used for a transform of size ``n``."""
  if n <= 2048:
    return DkConfig(num_warps=4, chunk=16)
  if n <= 8192:
    return DkConfig(num_warps=8, chunk=16, inner=8192)
  return DkConfig(num_warps=8, chunk=32, inner=4096)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a transform of size ``n`` is laid out for the kernels.

  Attributes:
    n: transform size.
    n_a: outer factor (1: two levels).
    n_1, n_2: the inner two-level factors (rows, columns).
    in_a, out_a: outer rows holding the input / the kept output (1 when ``n_a == 1``).
    in_rows, out_rows: inner rows holding the input / the kept output (``n_1`` when
      ``n_a > 1``).
  """

  n: int
  n_a: int
  n_1: int
  n_2: int
  in_a: int
  out_a: int
  in_rows: int
  out_rows: int

  @property
  def factors(self) -> tuple[int, ...]:
    """The Monarch plan's factors (outermost first)."""
    return (self.n_1, self.n_2) if self.n_a == 1 else (self.n_a, self.n_1, self.n_2)

  @property
  def in_len(self) -> int:
    """Time steps of the input view ``[in_a, in_rows, n_2]``."""
    return self.in_a * self.in_rows * self.n_2

  @property
  def out_len(self) -> int:
    return self.out_a * self.out_rows * self.n_2


def split_two(n: int) -> tuple[int, int]:
  """``n = n_1 * n_2`` with ``n_1 = 2^ceil(log2(n) / 2) >= n_2`` (minimises the dot work
  ``n (n_1 + 2 n_2)`` of a causal convolution, whose first and last levels are halved)."""
  log = n.bit_length() - 1
  n_1 = 1 << (-(-log // 2))
  return n_1, n // n_1


def geometry(n: int, seq: int, *, inner: int = DEFAULT_CONFIG.inner) -> Geometry:
  """The layout of a size-``n`` transform whose input and kept output are ``seq`` long."""
  if n <= inner:
    n_1, n_2 = split_two(n)
    rows = lambda length: min(n_1, max(MIN_FACTOR, 1 << (-(-length // n_2) - 1).bit_length()))
    return Geometry(n, 1, n_1, n_2, 1, 1, rows(seq), rows(seq))
  n_1, n_2 = split_two(inner)
  n_a = n // inner
  a = -(-seq // inner)
  return Geometry(n, n_a, n_1, n_2, a, a, n_1, n_1)


def unsupported(n: int, dtype, *, frequency_sparse: bool = False,
                config: FFTConvConfig | None = None) -> str | None:
  """None when the kernels serve a transform of size ``n`` and this dtype, else why not."""
  cfg = config or DEFAULT_CONFIG
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return (f"the fused Triton kernel takes bfloat16/float16 inputs (tensor-core matmuls), "
            f"got {jnp.dtype(dtype).name}")
  if frequency_sparse:
    return "frequency-sparse plans run on 'monarch_xla' (the fused kernel keeps all columns)"
  if not _pow2(n) or n < MIN_N:
    return f"the fused kernel needs a power-of-two transform size >= {MIN_N}, got {n}"
  if n > cfg.inner * MAX_OUTER:
    return (f"transform size {n} > {cfg.inner * MAX_OUTER} (outer factor > {MAX_OUTER}); "
            f"'monarch_xla' serves it")
  return None


# --------------------------------------------------------------------------- constants


def _dft(n: int) -> np.ndarray:
  k = np.arange(n)
  return np.exp(-2j * np.pi * (np.outer(k, k) % n) / n)


def _planes(m: np.ndarray, mode: str, dtype) -> jax.Array:
  """Real planes of a complex constant for the product ``mode`` (:func:`_mode`):
  ``(re, im)`` ("split"), ``(re, im, -im)`` ("chain": the ``-im`` plane lets both real
  products of each output part accumulate in one MMA accumulator, :func:`_lmul`) or
  ``(re, im - re, re + im)`` ("gauss")."""
  if mode == "gauss":
    p = np.stack([m.real, m.imag - m.real, m.real + m.imag])
  elif mode == "chain":
    p = np.stack([m.real, m.imag, -m.imag])
  else:
    p = np.stack([m.real, m.imag])
  return jnp.asarray(p, dtype)


def _mode(cfg) -> str:
  """How a complex matrix product is computed: "gauss", "chain" or "split"."""
  return "gauss" if cfg.gauss else ("chain" if cfg.chain else "split")


def _cplanes(m: np.ndarray, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.stack([m.real, m.imag]), dtype)


@functools.lru_cache(maxsize=64)
def _constants_np(geo: Geometry):
  f1 = _dft(geo.n_1)
  f2 = _dft(geo.n_2)
  m = geo.n_1 * geo.n_2
  tw = np.exp(-2j * np.pi * np.outer(np.arange(geo.n_1), np.arange(geo.n_2)) / m)
  outer = None
  if geo.n_a > 1:
    fo = _dft(geo.n_a)[:, :geo.in_a]  # [n_a, in_a]
    to = np.exp(-2j * np.pi * np.outer(np.arange(geo.n_a), np.arange(m)) / geo.n)
    outer = (fo, to.reshape(geo.n_a, geo.n_1, geo.n_2))
  return f1, f2, tw, outer


def _constants(geo: Geometry, mode: str, cdt, lowp: bool = False):
  f1, f2, tw, outer = _constants_np(geo)
  tdt = cdt if lowp else jnp.float32
  # chain: the forward row DFT negates X instead (loop-invariant), no -Im plane
  mats = dict(f1=_planes(f1[:, :geo.in_rows], "split" if mode == "chain" else mode, cdt),
              tw=_cplanes(tw, tdt),
              f2=_planes(f2, mode, cdt), h2=_planes(np.conj(f2), mode, cdt),
              g1=_planes(np.conj(f1)[:geo.out_rows], mode, cdt))
  if outer is not None:
    mats["fo"] = _cplanes(outer[0])
    mats["to"] = _cplanes(outer[1], tdt)
  return mats


# --------------------------------------------------------------------------- kernel math


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _lmul(m, xr, xi, cdt, mode: str, acc=None):
  """``acc + M @ X``: ``m`` the constant's planes (loaded; :func:`_planes`), ``X = xr + i xi``
  (any float dtype), ``acc`` a float32 ``(re, im)`` pair or None.

  ``mode``:

  * "chain": four real products. Without ``acc``, ``re = Mr Xr + Mi (-Xi)`` and
    ``im = Mr Xi + Mi Xr`` are written as sums of dots, which Triton folds into two chained
    MMAs on one accumulator per part (``dot(a, b, c)``): no float32 adds, no separate
    product tiles. With ``acc`` (the last, inverse row DFT of a chunk) the accumulator is
    folded into the first dot of each part and the second is subtracted: a dot whose
    result feeds another dot gets a different warp layout from Triton (its chained-dot
    heuristic), which would cost an accumulator layout conversion through shared memory
    on every chunk.
  * "split": four independent products and float32 adds/subtracts.
  * "gauss": three products (``k1 - k3``, ``k1 + k2``).
  """
  if mode == "gauss":
    k1 = _dot(m[0], (xr.astype(jnp.float32) + xi.astype(jnp.float32)).astype(cdt))
    k2 = _dot(m[1], xr.astype(cdt))
    k3 = _dot(m[2], xi.astype(cdt))
    re, im = k1 - k3, k1 + k2
  else:
    xr, xi = xr.astype(cdt), xi.astype(cdt)
    if mode == "chain" and acc is None:  # -X_i: loop-invariant for the forward row DFT
      return _dot(m[0], xr) + _dot(m[1], -xi), _dot(m[0], xi) + _dot(m[1], xr)
    if mode == "chain":
      return (acc[0] + _dot(m[0], xr) - _dot(m[1], xi),
              acc[1] + _dot(m[0], xi) - _dot(m[2], xr))
    re, im = _dot(m[0], xr) - _dot(m[1], xi), _dot(m[0], xi) + _dot(m[1], xr)
  return (re, im) if acc is None else (acc[0] + re, acc[1] + im)


def _rmul(xr, xi, m, cdt, mode: str):
  """``X @ M`` (see :func:`_lmul`)."""
  if mode == "gauss":
    k1 = _dot((xr.astype(jnp.float32) + xi.astype(jnp.float32)).astype(cdt), m[0])
    k2 = _dot(xr.astype(cdt), m[1])
    k3 = _dot(xi.astype(cdt), m[2])
    return k1 - k3, k1 + k2
  xr, xi = xr.astype(cdt), xi.astype(cdt)
  if mode == "chain":
    return _dot(xr, m[0]) + _dot(xi, m[2]), _dot(xr, m[1]) + _dot(xi, m[0])
  return _dot(xr, m[0]) - _dot(xi, m[1]), _dot(xr, m[1]) + _dot(xi, m[0])


def _cmul(ar, ai, br, bi):
  return ar * br - ai * bi, ar * bi + ai * br


def _cmul_conj(ar, ai, br, bi):
  """``a * conj(b)``."""
  return ar * br + ai * bi, ai * br - ar * bi


def _wide(a, s: int):
  """``[s, rows, n_2]`` -> ``[rows, s * n_2]`` (the stacked signals side by side)."""
  if s == 1:
    return a[0]
  _, rows, n_2 = a.shape
  return a.transpose(1, 0, 2).reshape(rows, s * n_2)


def _unwide(a, s: int):
  """``[rows, s * n_2]`` -> ``[s, rows, n_2]``."""
  rows = a.shape[0]
  n_2 = a.shape[1] // s
  if s == 1:
    return a.reshape(1, rows, n_2)
  return a.reshape(rows, s, n_2).transpose(1, 0, 2)


def _wide_to_tall(a, s: int):
  """``[c, s * n_2]`` -> ``[s * c, n_2]`` (the stacked signals one above the other)."""
  if s == 1:
    return a
  c = a.shape[0]
  n_2 = a.shape[1] // s
  return a.reshape(c, s, n_2).transpose(1, 0, 2).reshape(s * c, n_2)


def _tall_to_wide(a, s: int):
  if s == 1:
    return a
  c = a.shape[0] // s
  n_2 = a.shape[1]
  return a.reshape(s, c, n_2).transpose(1, 0, 2).reshape(c, s * n_2)


def _bcast_wide(t, s: int):
  """``[c, n_2]`` repeated for ``s`` signals side by side: ``[c, s * n_2]``."""
  if s == 1:
    return t
  c, n_2 = t.shape
  return jnp.broadcast_to(t[:, None, :], (c, s, n_2)).reshape(c, s * n_2)


def _bcast_tall(t, s: int):
  if s == 1:
    return t
  c, n_2 = t.shape
  return jnp.broadcast_to(t[None], (s, c, n_2)).reshape(s * c, n_2)


def _stack_rows(j, s: int):
  """The pair indices of stack ``j`` (a static or traced index)."""
  if isinstance(j, int) or s == 1:
    return pl.ds(j * s, s)
  return pl.ds(pl.multiple_of(j * s, s), s)


def _load_signals(z_ref, pre_ref, j, s: int, geo: Geometry, fo_ref, to_ref, cdt):
  """Stack ``j``'s ``s`` signals (outer DFT row for three levels), gated, as the wide
  ``[in_rows, s * n_2]`` tile in the compute dtype."""
  idx = _stack_rows(j, s)

  def row(a, t):
    x = z_ref[idx, a, t]
    if pre_ref is not None:
      x = x.astype(jnp.float32) * pre_ref[idx, a, t].astype(jnp.float32)
    return x

  if geo.n_a == 1:
    xr, xi = row(0, 0), row(1, 0)
  else:
    xr = xi = None
    for t in range(geo.in_a):
      zr, zi = row(0, t).astype(jnp.float32), row(1, t).astype(jnp.float32)
      if t:  # w^(k_a * 0) = 1
        zr, zi = _cmul(zr, zi, fo_ref[0, t], fo_ref[1, t])
      xr, xi = (zr, zi) if xr is None else (xr + zr, xi + zi)
    xr, xi = _cmul(xr, xi, to_ref[0][None], to_ref[1][None])
  return _wide(xr.astype(cdt), s), _wide(xi.astype(cdt), s)


def _forward_chunk(xr, xi, rows, s: int, f1_ref, tw_ref, f2, cdt, mode: str):
  """Spectrum rows ``rows`` of the ``s`` stacked signals (wide ``X``): the tall
  ``[s * chunk, n_2]`` float32 tile in Monarch order."""
  f1 = [f1_ref[p, rows, :] for p in range(f1_ref.shape[0])]
  ar, ai = _lmul(f1, xr, xi, cdt, mode)
  ar, ai = _cmul(ar, ai, _bcast_wide(tw_ref[0, rows, :], s), _bcast_wide(tw_ref[1, rows, :], s))
  ar, ai = _wide_to_tall(ar.astype(cdt), s), _wide_to_tall(ai.astype(cdt), s)
  return _rmul(ar, ai, f2, cdt, mode)


def _rows(ch, chunk, n_chunks):
  if n_chunks == 1:
    return slice(None)
  return pl.ds(pl.multiple_of(ch * chunk, chunk), chunk)


def _conv_kernel(*refs, geo: Geometry, chunk: int, pairs: int, stack: int, has_pre: bool,
                 n_posts: int, cdt, unroll: bool, mode: str):
  it = iter(refs)
  z_ref = next(it)  # [pairs, 2, in_a, in_rows, n_2]
  pre_ref = next(it) if has_pre else None
  kf_ref, f1_ref, tw_ref, f2_ref, h2_ref, g1_ref = (next(it) for _ in range(6))
  fo_ref = to_ref = None
  if geo.n_a > 1:
    fo_ref, to_ref = next(it), next(it)
  post_refs = [next(it) for _ in range(n_posts if geo.n_a == 1 else 0)]
  out_refs = list(it)
  n_chunks = geo.n_1 // chunk
  nplanes = f2_ref.shape[0]
  s = stack

  def one_stack(j, carry):
    xr, xi = _load_signals(z_ref, pre_ref, j, s, geo, fo_ref, to_ref, cdt)
    f2 = [f2_ref[p] for p in range(nplanes)]
    h2 = [h2_ref[p] for p in range(nplanes)]

    def one_chunk(ch, acc):
      rows = slice(ch * chunk, (ch + 1) * chunk) if unroll else _rows(ch, chunk, n_chunks)
      yr, yi = _forward_chunk(xr, xi, rows, s, f1_ref, tw_ref, f2, cdt, mode)
      yr, yi = _cmul(yr, yi, _bcast_tall(kf_ref[0, rows, :], s),
                     _bcast_tall(kf_ref[1, rows, :], s))
      br, bi = _rmul(yr, yi, h2, cdt, mode)
      tr, ti = _bcast_tall(tw_ref[0, rows, :], s), _bcast_tall(tw_ref[1, rows, :], s)
      br, bi = _cmul_conj(br, bi, tr, ti)
      br, bi = _tall_to_wide(br.astype(cdt), s), _tall_to_wide(bi.astype(cdt), s)
      g1 = [g1_ref[p, :, rows] for p in range(nplanes)]
      return _lmul(g1, br, bi, cdt, mode, acc)

    zero = jnp.zeros((geo.out_rows, s * geo.n_2), jnp.float32)
    if n_chunks == 1:
      accr, acci = one_chunk(0, (zero, zero))
    elif unroll:
      accr, acci = zero, zero
      for ch in range(n_chunks):
        accr, acci = one_chunk(ch, (accr, acci))
    else:
      accr, acci = jax.lax.fori_loop(0, n_chunks, one_chunk, (zero, zero))
    accr, acci = _unwide(accr, s), _unwide(acci, s)  # [s, out_rows, n_2]
    idx = _stack_rows(j, s)
    if geo.n_a > 1:
      accr, acci = _cmul_conj(accr, acci, to_ref[0][None], to_ref[1][None])
    if not post_refs:
      out_refs[0][idx, 0] = accr.astype(out_refs[0].dtype)
      out_refs[0][idx, 1] = acci.astype(out_refs[0].dtype)
    for post_ref, out_ref in zip(post_refs, out_refs):
      out_ref[idx, 0] = (accr * post_ref[idx, 0].astype(jnp.float32)).astype(out_ref.dtype)
      out_ref[idx, 1] = (acci * post_ref[idx, 1].astype(jnp.float32)).astype(out_ref.dtype)
    return carry

  if pairs == s:
    one_stack(0, None)
  else:
    jax.lax.fori_loop(0, pairs // s, one_stack, None)


def _dk_kernel(*refs, geo: Geometry, chunk: int, pairs: int, stack: int, has_pre_w: bool,
               has_pre_d: bool, cdt, mode: str):
  it = iter(refs)
  w_ref = next(it)
  pw_ref = next(it) if has_pre_w else None
  d_ref = next(it)
  pd_ref = next(it) if has_pre_d else None
  f1_ref, tw_ref, f2_ref = (next(it) for _ in range(3))
  fo_ref = to_ref = None
  if geo.n_a > 1:
    fo_ref, to_ref = next(it), next(it)
  (out_ref,) = it  # [2, chunk, n_2]
  n_chunks = geo.n_1 // chunk
  ch = pl.program_id(0) % n_chunks
  rows = _rows(ch, chunk, n_chunks)
  nplanes = f2_ref.shape[0]
  s = stack

  def one_stack(j, acc):
    f2 = [f2_ref[p] for p in range(nplanes)]
    wr, wi = _forward_chunk(*_load_signals(w_ref, pw_ref, j, s, geo, fo_ref, to_ref, cdt),
                            rows, s, f1_ref, tw_ref, f2, cdt, mode)
    dr, di = _forward_chunk(*_load_signals(d_ref, pd_ref, j, s, geo, fo_ref, to_ref, cdt),
                            rows, s, f1_ref, tw_ref, f2, cdt, mode)
    gr, gi = _cmul_conj(dr, di, wr, wi)  # conj(W) D, [s * chunk, n_2]
    if s > 1:
      gr = gr.reshape(s, chunk, geo.n_2).sum(0)
      gi = gi.reshape(s, chunk, geo.n_2).sum(0)
    return acc[0] + gr, acc[1] + gi

  zero = jnp.zeros((chunk, geo.n_2), jnp.float32)
  if pairs == s:
    accr, acci = one_stack(0, (zero, zero))
  else:
    accr, acci = jax.lax.fori_loop(0, pairs // s, one_stack, (zero, zero))
  out_ref[0] = accr
  out_ref[1] = acci


# --------------------------------------------------------------------------- wrappers


def _largest_pow2_divisor(v: int, cap: int) -> int:
  d = 1
  while d * 2 <= cap and v % (d * 2) == 0:
    d *= 2
  return d


def _signal_spec(geo: Geometry, pairs: int, outer_axis: int):
  """BlockSpec of a ``[num_pairs, 2, channels, in_a, in_rows, n_2]`` signal view."""
  del outer_axis
  return pl.BlockSpec((pairs, 2, None, geo.in_a, geo.in_rows, geo.n_2),
                      lambda a, g, c: (g, 0, c, 0, 0, 0))


def _full(a):
  return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _outer_specs(geo: Geometry, mats):
  return [pl.BlockSpec((2, None, geo.in_a), lambda a, *_: (0, a, 0)),
          pl.BlockSpec((2, None, geo.n_1, geo.n_2), lambda a, *_: (0, a, 0, 0))]


def fft_conv_fused(z: jax.Array, kf: jax.Array, geo: Geometry, *, pre: jax.Array | None = None,
                   posts: tuple[jax.Array, ...] = (), out_dtype=None,
                   config: FFTConvConfig | None = None,
                   interpret: bool = False) -> tuple[jax.Array, ...]:
  """Fused circular convolution of packed signals with per-channel spectra.

  Args:
    z: ``[num_pairs, 2, channels, in_a, in_rows, n_2]`` the packed signals (real/imag
      planes; pair ``p`` holds batch rows ``2p`` and ``2p + 1``), zero rows omitted;
      bfloat16/float16 (its dtype is the matmul operand dtype).
    kf: ``[2, channels, n_a, n_1, n_2]`` float32 filter spectra in Monarch order, / n.
    geo: the layout (:func:`geometry`).
    pre: like ``z``, a multiplier applied to ``z`` before the FFT, or None.
    posts: multipliers ``[num_pairs, 2, channels, out_rows, n_2]`` (two levels only); one
      output per multiplier (none: one plain output).
    out_dtype: output dtype (default ``z.dtype``).
    config: launch parameters (default :data:`DEFAULT_CONFIG`).
    interpret: run in Pallas interpret mode (any platform).

  Returns:
    two levels: one ``[num_pairs, 2, channels, out_rows, n_2]`` per post (or one);
    three levels: ``[num_pairs, 2, channels, n_a, n_1, n_2]``, the inner inverse
    transforms times the conjugate outer twiddles (:func:`outer_inverse` finishes).
  """
  cfg = config or DEFAULT_CONFIG
  num_pairs, _, channels = z.shape[:3]
  cdt = z.dtype
  out_dtype = jnp.dtype(out_dtype or cdt)
  if geo.n_a > 1 and posts:
    raise ValueError("fft_conv_fused: posts apply to two-level geometries only")
  chunk = min(cfg.chunk, geo.n_1)
  pairs = _largest_pow2_divisor(num_pairs, cfg.pairs)
  mats = _constants(geo, _mode(cfg), cdt, cfg.lowp_consts)
  if cfg.lowp_consts:
    kf = kf.astype(cdt)
  sig = _signal_spec(geo, pairs, 0)
  inputs, specs = [z], [sig]
  if pre is not None:
    inputs.append(pre)
    specs.append(sig)
  inputs.append(kf)
  specs.append(pl.BlockSpec((2, None, None, geo.n_1, geo.n_2), lambda a, g, c: (0, c, a, 0, 0)))
  for name in ("f1", "tw", "f2", "h2", "g1"):
    inputs.append(mats[name])
    specs.append(_full(mats[name]))
  if geo.n_a > 1:
    inputs += [mats["fo"], mats["to"]]
    specs += _outer_specs(geo, mats)
    out_shape = [jax.ShapeDtypeStruct((num_pairs, 2, channels, geo.n_a, geo.n_1, geo.n_2),
                                      out_dtype)]
    out_specs = [pl.BlockSpec((pairs, 2, None, None, geo.n_1, geo.n_2),
                              lambda a, g, c: (g, 0, c, a, 0, 0))]
  else:
    ospec = pl.BlockSpec((pairs, 2, None, geo.out_rows, geo.n_2),
                         lambda a, g, c: (g, 0, c, 0, 0))
    for p in posts:
      inputs.append(p)
      specs.append(ospec)
    n_out = max(1, len(posts))
    out_shape = [jax.ShapeDtypeStruct((num_pairs, 2, channels, geo.out_rows, geo.n_2),
                                      out_dtype)] * n_out
    out_specs = [ospec] * n_out
  kernel = functools.partial(_conv_kernel, geo=geo, chunk=chunk, pairs=pairs,
                             stack=min(cfg.stack, pairs), has_pre=pre is not None,
                             n_posts=len(posts), cdt=cdt, unroll=cfg.unroll, mode=_mode(cfg))
  return tuple(pl.pallas_call(
      kernel, out_shape=out_shape, grid=(geo.n_a, num_pairs // pairs, channels),
      in_specs=specs, out_specs=out_specs,
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret, name="fft_conv_fused",
  )(*inputs))


def filter_grad_spectrum(w: jax.Array, d: jax.Array, geo: Geometry, *,
                         pre_w: jax.Array | None = None, pre_d: jax.Array | None = None,
                         config: DkConfig | None = None, interpret: bool = False) -> jax.Array:
  """``sum_pairs conj(FFT(w * pre_w)) FFT(d * pre_d)`` per channel, Monarch order.

  Args:
    w, d: ``[num_pairs, 2, channels, in_a, in_rows, n_2]`` packed signals (same dtype).
    geo: the layout (:func:`geometry`).
    pre_w, pre_d: multipliers like ``w`` / ``d``, or None.
    config: launch parameters (default :data:`DEFAULT_DK_CONFIG`).

  Returns:
    ``[2, channels, n_a, n_1, n_2]`` float32. With packed pairs its inverse transform's
    real part is ``sum_b corr(w_b, d_b)``.
  """
  cfg = config or DEFAULT_DK_CONFIG
  num_pairs, _, channels = w.shape[:3]
  cdt = w.dtype
  chunk = min(cfg.chunk, geo.n_1)
  n_chunks = geo.n_1 // chunk
  groups = min(cfg.groups, _largest_pow2_divisor(num_pairs, num_pairs))
  pairs = num_pairs // groups
  mats = _constants(geo, _mode(cfg), cdt, cfg.lowp_consts)
  sig = pl.BlockSpec((pairs, 2, None, geo.in_a, geo.in_rows, geo.n_2),
                     lambda q, g, c: (g, 0, c, 0, 0, 0))
  inputs, specs = [w], [sig]
  if pre_w is not None:
    inputs.append(pre_w)
    specs.append(sig)
  inputs.append(d)
  specs.append(sig)
  if pre_d is not None:
    inputs.append(pre_d)
    specs.append(sig)
  for name in ("f1", "tw", "f2"):
    inputs.append(mats[name])
    specs.append(_full(mats[name]))
  if geo.n_a > 1:
    inputs += [mats["fo"], mats["to"]]
    specs += [pl.BlockSpec((2, None, geo.in_a), lambda q, *_: (0, q // n_chunks, 0)),
              pl.BlockSpec((2, None, geo.n_1, geo.n_2), lambda q, *_: (0, q // n_chunks, 0, 0))]
  kernel = functools.partial(_dk_kernel, geo=geo, chunk=chunk, pairs=pairs,
                             stack=_largest_pow2_divisor(pairs, cfg.stack),
                             has_pre_w=pre_w is not None, has_pre_d=pre_d is not None, cdt=cdt,
                             mode=_mode(cfg))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((groups, 2, channels, geo.n_a, geo.n_1, geo.n_2),
                                     jnp.float32),
      grid=(geo.n_a * n_chunks, groups, channels), in_specs=specs,
      out_specs=pl.BlockSpec((None, 2, None, None, chunk, geo.n_2),
                             lambda q, g, c: (g, 0, c, q // n_chunks, q % n_chunks, 0)),
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret, name="fft_conv_filter_grad",
  )(*inputs)
  return out.sum(0) if groups > 1 else out[0]


def outer_inverse(b: jax.Array, geo: Geometry) -> jax.Array:
  """Finishes a three-level convolution: the outer inverse DFT of the kept rows.

  Args:
    b: ``[num_pairs, 2, channels, n_a, n_1, n_2]`` from :func:`fft_conv_fused`.

  Returns:
    ``[num_pairs, 2, channels, out_a * n_1 * n_2]`` float32 (time order).
  """
  num_pairs, _, channels = b.shape[:3]
  m = geo.n_1 * geo.n_2
  b = b.reshape(num_pairs, 2, channels, geo.n_a, m).astype(jnp.float32)
  br, bi = b[:, 0], b[:, 1]
  outs = []
  for t in range(geo.out_a):
    yr = yi = None
    for k in range(geo.n_a):
      ang = 2 * math.pi * ((t * k) % geo.n_a) / geo.n_a
      c, s = float(np.cos(ang)), float(np.sin(ang))  # conj(F)[t, k] = c + i s
      tr = br[:, :, k] * c - bi[:, :, k] * s
      ti = br[:, :, k] * s + bi[:, :, k] * c
      yr, yi = (tr, ti) if yr is None else (yr + tr, yi + ti)
    outs.append(jnp.stack([yr, yi], 1))
  return jnp.stack(outs, 3).reshape(num_pairs, 2, channels, geo.out_a * m)


__all__ = ["DEFAULT_CONFIG", "DEFAULT_DK_CONFIG", "DkConfig", "FFTConvConfig", "Geometry",
           "config_for", "dk_config_for", "fft_conv_fused", "filter_grad_spectrum", "geometry", "outer_inverse", "split_two",
           "unsupported"]
