"""Decode attention (one query token per sequence): effective KV-read bandwidth, TB/s.

Shapes (TARGETS.md, issue 4): batch 32, 32 query / 8 KV heads (GQA) or 32 / 32 (MHA),
head_dim 128, 8192 cached tokens per sequence; a ragged batch with the same total tokens
(lengths 128 .. 32768); contiguous and paged (page 16 / 64) caches; bf16, int8, fp8
(e4m3) and int4 (one scale per token and head) K/V.

Throughput is *effective KV bandwidth*: the bytes of K and V the call must read (each
sequence's ``lengths[b]`` tokens, every KV head, scales included) over the median time.
The query, the output and the page table are < 0.1% of it and are not counted.

Implementations: ``jaxeff`` (the op's default: the Mosaic GPU kernel on Hopper where it
serves the case, else the Triton kernel), ``jaxeff:triton`` (the portable kernel), ``xla`` (the op's pure-jnp reference,
jitted), ``cudnn`` (``jax.nn.dot_product_attention(implementation="cudnn")`` on the
contiguous bf16 cache, ``key_value_seq_lengths`` for ragged lengths) and ``pallas.ops``
(the deprecated ``jax.experimental.pallas.ops.gpu.decode_attention.gqa``, contiguous bf16)
when they run. Rows of one case share the ``case`` string.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from jaxeff import ops
from kernels_pallas.decode import common, mosaic_gpu

PLOT_X = "seq"
ROUNDS = 20
QUICK_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int
  seq: int  # capacity per sequence (uniform lengths = seq)
  heads: int
  kv_heads: int
  head_dim: int = 128
  fmt: str = "none"  # "none" (bf16), "int8", "fp8", "int4"
  page_size: int | None = None  # None: contiguous
  ragged: bool = False

  @property
  def name(self) -> str:
    kind = "gqa" if self.heads != self.kv_heads else "mha"
    layout = f"paged{self.page_size}" if self.page_size else "contiguous"
    fmt = "bf16" if self.fmt == "none" else self.fmt
    shape = "ragged" if self.ragged else f"s{self.seq}"
    return (f"decode {kind}{self.heads}/{self.kv_heads} b{self.batch} {shape} "
            f"d{self.head_dim} {fmt} {layout}")


def ragged_lengths(batch: int, total: int, lo: int = 128, hi: int = 32768, seed: int = 0):
  """``batch`` log-uniform lengths in ``[lo, hi]`` summing to ``total`` (one of them ``hi``)."""
  rng = np.random.default_rng(seed)
  x = np.exp(rng.uniform(np.log(lo), np.log(hi), batch))
  x[0] = hi
  x = np.clip(np.round(x * (total - hi) / x[1:].sum()), lo, hi)
  x[0] = hi
  x[-1] += total - x.sum()
  return np.clip(x, lo, hi).astype(np.int32)


def _hopper() -> bool:
  kind = jax.devices()[0].device_kind
  return jax.default_backend() == "gpu" and any(k in kind for k in ("H100", "H200", "H800", "H20"))


@functools.cache
def _mosaic_ok(fmt: str) -> bool:
  """Whether the Mosaic GPU kernel passed its self-check for ``fmt`` in a subprocess (a
  broken build then cannot hang or crash the suite)."""
  if not _hopper():
    return False
  why = mosaic_gpu.canary()[fmt]
  if why is not None:
    print(f"  ! Mosaic GPU ({fmt} KV) is left out: {why}")
  return why is None


def _bytes(case: Case, lengths: np.ndarray) -> float:
  per_tok = common.kv_bytes_per_token(case.head_dim, case.fmt, jnp.bfloat16)
  return 2.0 * float(lengths.sum()) * case.kv_heads * per_tok


@functools.partial(jax.jit, static_argnames=("case",))
def _make(key, case: Case):
  """Query, contiguous bf16 K/V, and the cache in the case's format and layout."""
  kq, kk, kv = jax.random.split(key, 3)
  b, s, kh, d = case.batch, case.seq, case.kv_heads, case.head_dim
  q = jax.random.normal(kq, (b, 1, case.heads, d), jnp.bfloat16)
  k = jax.random.normal(kk, (b, s, kh, d), jnp.bfloat16)
  v = jax.random.normal(kv, (b, s, kh, d), jnp.bfloat16)
  kw = {}
  kc, vc = k, v
  if case.fmt != "none":
    kc, kw["k_scale"] = common.quantize(k, case.fmt)
    vc, kw["v_scale"] = common.quantize(v, case.fmt)
  if case.page_size:
    ps = case.page_size
    kc, table = common.contiguous_as_paged(kc, ps)
    vc, _ = common.contiguous_as_paged(vc, ps)
    # Shuffle the physical pages so a sequence's pages are scattered as in a real pool.
    perm = jax.random.permutation(jax.random.fold_in(key, 7), kc.shape[0])
    inv = jnp.argsort(perm)
    kc, vc = kc[perm], vc[perm]
    kw = {n: common.contiguous_as_paged(x, ps)[0][perm] for n, x in kw.items()}
    kw["page_table"] = inv[table].astype(jnp.int32)
  return q, k, v, kc, vc, kw


def _implementations(case: Case, lengths: jax.Array):
  """``jaxeff``: what ``implementation=None`` picks (the Mosaic GPU kernel on Hopper where
  it serves the case, else Triton); ``jaxeff:triton`` / ``jaxeff:mosaic_gpu``: each kernel
  by name where it serves the case and is not already the ``jaxeff`` row."""
  impls = {}

  def ours(name):
    def fn(q, k, v, kc, vc, kw):
      return ops.decode_attention(q, kc, vc, lengths=lengths, implementation=name, **kw)
    return fn

  page = case.page_size or mosaic_gpu.contiguous_page_size(case.seq)
  mosaic_serves = _mosaic_ok(case.fmt) and mosaic_gpu.supports(
      head_dim=case.head_dim, dtype=jnp.bfloat16, fmt=case.fmt, int4_groups=1,
      page_size=page, rows=case.heads // case.kv_heads) is None
  if mosaic_serves:
    impls["jaxeff"] = ours(None)
    impls["jaxeff:triton"] = ours("triton")
  else:  # the default would try Mosaic GPU first where the self-check failed
    impls["jaxeff"] = ours("triton")
  impls["xla"] = ours("xla")
  if case.fmt == "none" and not case.page_size:
    lens = lengths if case.ragged else None

    def cudnn(q, k, v, kc, vc, kw):
      return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens,
                                          implementation="cudnn")
    impls["cudnn"] = cudnn
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

      def pallas_ops(q, k, v, kc, vc, kw):
        return pallas_decode.gqa(q[:, 0], k, v, kv_seq_len=lengths)
      impls["pallas.ops"] = pallas_ops
    except Exception as e:  # pragma: no cover - not in every jax
      print(f"  ! pallas.ops decode attention unavailable: {e}")
  return impls


def _cases(quick: bool) -> list[Case]:
  gqa = functools.partial(Case, batch=32, heads=32, kv_heads=8)
  if quick:
    return [gqa(seq=8192), gqa(seq=8192, fmt="int8"), gqa(seq=8192, fmt="int4"),
            gqa(seq=8192, page_size=64), gqa(seq=32768, ragged=True, page_size=64)]
  return [
      gqa(seq=2048), gqa(seq=8192), gqa(seq=16384),
      gqa(seq=8192, page_size=16), gqa(seq=8192, page_size=64),
      gqa(seq=8192, fmt="int8"), gqa(seq=8192, fmt="fp8"), gqa(seq=8192, fmt="int4"),
      gqa(seq=8192, fmt="int8", page_size=64), gqa(seq=8192, fmt="int8", page_size=16),
      Case(batch=32, seq=8192, heads=32, kv_heads=32),
      # Same total tokens as the uniform s8192 paged64 case, lengths 128 .. 32768.
      gqa(seq=32768, ragged=True, page_size=64),
  ]


def run(quick: bool) -> list[harness.Row]:
  rows = []
  rounds = QUICK_ROUNDS if quick else ROUNDS
  for case in _cases(quick):
    if case.ragged:
      lengths_np = ragged_lengths(case.batch, case.batch * 8192)
    else:
      lengths_np = np.full((case.batch,), case.seq, np.int32)
    lengths = jnp.asarray(lengths_np)
    args = _make(jax.random.key(case.seq + case.batch), case)
    jax.block_until_ready(args)
    nbytes = _bytes(case, lengths_np)
    params = {"batch": case.batch, "seq": case.seq, "heads": case.heads,
              "kv_heads": case.kv_heads, "head_dim": case.head_dim,
              "kv_format": "bf16" if case.fmt == "none" else case.fmt,
              "layout": f"paged{case.page_size}" if case.page_size else "contiguous",
              "ragged": case.ragged, "tokens": int(lengths_np.sum()), "kv_bytes": nbytes}
    for impl, fn in _implementations(case, lengths).items():
      if impl == "xla" and case.ragged:
        continue  # the reference materialises every sequence at the 32k capacity
      t = harness.safe_time(jax.jit(fn), lambda i: args, rounds=rounds)
      rows.append(harness.Row(case.name, params, impl, t, nbytes / t / 1e12, "TB/s"))
    del args
  return rows
