"""Decode attention: the reference against a naive loop, every kernel against the reference.

One shared body (``_check``) builds a random cache (contiguous or paged with a shuffled
page table; bf16 or quantized with ``common.quantize``), runs an implementation and the
pure-jnp reference on it and compares output and log-sum-exp. On CPU the kernels run in
Pallas interpret mode, where unwritten outputs are NaN-poisoned (caught by the finiteness
check); under the ``gpu`` marker they run for real, also at LLM sizes. The Mosaic GPU
kernel's interpret runs cover its partition, ring, barriers, page copies and in-kernel
dequantization; its register-operand wgmma path runs only on a Hopper GPU (``gpu`` tests).

Each CPU kernel case mixes several features (interpret mode compiles slowly): ragged
lengths including 0, 1 and the capacity, GQA ratios 1/4/8, page sizes 16 and 64, windows,
soft cap, several query tokens, every cache format. Quantized caches are compared with the
reference *on the same quantized cache* (bf16 tolerance); the quantization error itself
is bounded against the unquantized result in ``test_quantized_cache_error_bounds``.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import ops
from kernels_pallas.decode import common
from kernels_pallas.decode import mosaic_gpu as mgpu_kernels
from kernels_pallas.decode import triton as triton_kernels
from tests.helpers import assert_close, lower_for_cuda, primitive_names, rel_err

da = importlib.import_module("jaxeff.ops.decode_attention")  # the module (ops exports the fn)

# Relative-norm error of the attention output with a quantized cache against the exact
# (float32) result, Gaussian K/V, head_dim 64-128 (measured: int8 ~7e-3, fp8 ~2.5e-2,
# int4 ~0.10-0.13 with one scale per token and head).
QUANT_ERROR_BOUND = {"int8": 2e-2, "fp8": 5e-2, "int4": 2e-1}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int
  q_len: int
  q_heads: int
  kv_heads: int
  head_dim: int
  capacity: int
  lengths: tuple[int, ...]
  page_size: int | None = None  # None: contiguous cache
  fmt: str = "none"
  int4_groups: int = 1
  window: tuple[int, int] | None = None
  soft_cap: float | None = None
  dtype: str = "bfloat16"

  def __str__(self):
    return (f"b{self.batch}t{self.q_len}h{self.q_heads}/{self.kv_heads}d{self.head_dim}"
            f"c{self.capacity}{'p' + str(self.page_size) if self.page_size else ''}"
            f"-{self.fmt}")


def make_inputs(case: Case, key):
  """Random query and cache for ``case``: ``(query, key_cache, value_cache, kwargs)``."""
  kq, kk, kv, kp = jax.random.split(key, 4)
  dtype = jnp.dtype(case.dtype)
  b, cap, kh, d = case.batch, case.capacity, case.kv_heads, case.head_dim
  query = jax.random.normal(kq, (b, case.q_len, case.q_heads, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, cap, kh, d), jnp.float32)
  v = jax.random.normal(kv, (b, cap, kh, d), jnp.float32)
  kw = {"lengths": jnp.asarray(case.lengths, jnp.int32)}
  if case.fmt == "none":
    k, v = k.astype(dtype), v.astype(dtype)
  else:
    gs = d // case.int4_groups if case.fmt == "int4" else None
    k, kw["k_scale"] = common.quantize(k, case.fmt, group_size=gs)
    v, kw["v_scale"] = common.quantize(v, case.fmt, group_size=gs)
  if case.page_size:
    ps = case.page_size
    per_seq = cap // ps
    num_pages = b * per_seq + 3  # spare pages that no sequence uses
    table = jax.random.permutation(kp, num_pages)[: b * per_seq].reshape(b, per_seq)

    def to_pages(x):
      pages = jnp.zeros((num_pages, ps) + x.shape[2:], x.dtype)
      return pages.at[table.reshape(-1)].set(x.reshape(b * per_seq, ps, *x.shape[2:]))

    k, v = to_pages(k), to_pages(v)
    kw = {n: to_pages(x) if n.endswith("scale") else x for n, x in kw.items()}
    kw["page_table"] = table.astype(jnp.int32)
  return query, k, v, kw


def _run(implementation, case: Case, query, k, v, kw):
  fn = jax.jit(lambda q, k, v, kw: ops.decode_attention_with_lse(
      q, k, v, local_window_size=case.window, logits_soft_cap=case.soft_cap,
      implementation=implementation, **kw))
  return fn(query, k, v, kw)


def _check(implementation: str, case: Case, key):
  query, k, v, kw = make_inputs(case, key)
  out, lse = _run(implementation, case, query, k, v, kw)
  ref_out, ref_lse = _run("xla", case, query, k, v, kw)
  assert out.shape == query.shape and out.dtype == query.dtype
  assert_close(out, ref_out, name="out")
  # lse: -inf exactly where the reference has no allowed key, close elsewhere.
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=2e-3, atol=2e-3)


# --- the reference ----------------------------------------------------------------------


def _naive(query, k, v, lengths, *, scale, window=None, soft_cap=None):
  """Per sequence, head and query token: softmax over the allowed cached keys (numpy)."""
  q, k, v = (np.asarray(x, np.float64) for x in (query, k, v))
  b, t, n, d = q.shape
  g = n // k.shape[2]
  out = np.zeros(q.shape)
  for bi in range(b):
    length = int(lengths[bi])
    for ti in range(t):
      pos = length - t + ti
      keys = [j for j in range(length) if j <= pos and (
          window is None or pos - window[0] <= j <= pos + window[1])]
      for ni in range(n):
        if not keys:
          continue
        logits = np.array([q[bi, ti, ni] @ k[bi, j, ni // g] for j in keys]) * scale
        if soft_cap is not None:
          logits = soft_cap * np.tanh(logits / soft_cap)
        p = np.exp(logits - logits.max())
        out[bi, ti, ni] = (p / p.sum()) @ v[bi, keys, ni // g]
  return out


def test_reference_matches_naive_loop(key):
  # GQA 3, two query tokens, lengths 0 / 1 / capacity / odd, window and soft cap.
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (4, 2, 6, 16), jnp.float32)
  k = jax.random.normal(kk, (4, 23, 2, 16), jnp.float32)
  v = jax.random.normal(kv, (4, 23, 2, 16), jnp.float32)
  lengths = jnp.array([0, 1, 23, 11], jnp.int32)
  for window, cap in ((None, None), ((4, 0), 2.5)):
    out = jax.jit(lambda q, k, v, l: ops.decode_attention(
        q, k, v, lengths=l, local_window_size=window, logits_soft_cap=cap, scale=0.3,
        implementation="xla"))(q, k, v, lengths)
    expected = _naive(q, k, v, lengths, scale=0.3, window=window, soft_cap=cap)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_reference_lse_merges_disjoint_caches(key):
  # Attention over [0, 20) equals the lse-merge of attention over [0, 12) and [12, 20)
  # (the second part as its own cache of length 8): the lse output is exact.
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (2, 1, 4, 32), jnp.float32)
  k = jax.random.normal(kk, (2, 20, 2, 32), jnp.float32)
  v = jax.random.normal(kv, (2, 20, 2, 32), jnp.float32)
  attend = jax.jit(lambda q, k, v, l: ops.decode_attention_with_lse(q, k, v, lengths=l))
  full, _ = attend(q, k, v, jnp.array([20, 20]))
  o1, l1 = attend(q, k[:, :12], v[:, :12], jnp.array([12, 12]))
  o2, l2 = attend(q, k[:, 12:], v[:, 12:], jnp.array([8, 8]))
  m = jnp.maximum(l1, l2)
  w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)  # [b, n, t]
  w1, w2 = (jnp.transpose(w, (0, 2, 1))[..., None] for w in (w1, w2))
  assert_close((w1 * o1 + w2 * o2) / (w1 + w2), full)


def test_reference_paged_equals_contiguous(key):
  case = Case(3, 2, 8, 2, 32, 64, (64, 5, 33), page_size=16, window=(9, 9), soft_cap=4.0,
              dtype="float32")
  query, k, v, kw = make_inputs(case, key)
  out = _run("xla", case, query, k, v, kw)[0]
  # The same cache, read back in logical order.
  kc, vc = (da.logical_cache(x, kw["page_table"]) for x in (k, v))
  contiguous = _run("xla", case, query, kc, vc, {"lengths": kw["lengths"]})[0]
  assert_close(out, contiguous, rtol=1e-6)


@pytest.mark.parametrize("fmt,groups", [("int8", 1), ("fp8", 1), ("int4", 1), ("int4", 4)])
def test_quantized_cache_error_bounds(fmt, groups, key):
  kq, kk, kv = jax.random.split(key, 3)
  b, cap, kh, d = 3, 96, 2, 64
  q = jax.random.normal(kq, (b, 1, 8, d), jnp.float32)
  k = jax.random.normal(kk, (b, cap, kh, d), jnp.float32)
  v = jax.random.normal(kv, (b, cap, kh, d), jnp.float32)
  lengths = jnp.array([96, 40, 7], jnp.int32)
  attend = jax.jit(lambda q, k, v, l, kw: ops.decode_attention(q, k, v, lengths=l, **kw))
  exact = attend(q, k, v, lengths, {})
  gs = d // groups if fmt == "int4" else None
  kq_, ks = common.quantize(k, fmt, group_size=gs)
  vq_, vs = common.quantize(v, fmt, group_size=gs)
  # Dequantization is within half a step (int) or 2^-4 relative (fp8) of the input.
  step = ks[..., None] if fmt != "int4" else jnp.repeat(ks, d // groups, axis=-1)
  err = jnp.abs(common.dequantize(kq_, ks, fmt) - k)
  if fmt == "fp8":
    assert bool(jnp.all(err <= 2.0 ** -4 * jnp.abs(k) + 2.0 ** -9 * step * common.FP8_MAX))
  else:
    assert bool(jnp.all(err <= 0.5 * step * (1 + 1e-5)))
  out = attend(q, kq_, vq_, lengths, dict(k_scale=ks, v_scale=vs))
  assert rel_err(out, exact) <= QUANT_ERROR_BOUND[fmt]


def test_int4_packing_round_trip(key):
  nib = jax.random.randint(key, (5, 3, 32), 0, 16)
  lo, hi = common.unpack_int4(common.pack_int4(nib))
  np.testing.assert_array_equal(np.concatenate([lo, hi], -1), np.asarray(nib) - 8)
  # int8 storage of the same bits unpacks identically.
  packed = common.pack_int4(nib).view(jnp.int8)
  lo8, hi8 = common.unpack_int4(packed)
  np.testing.assert_array_equal(lo8, lo)
  np.testing.assert_array_equal(hi8, hi)


def test_default_on_cpu_is_the_reference(key):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU default picks a kernel")
  query, k, v, kw = make_inputs(Case(2, 1, 4, 2, 32, 32, (32, 3)), key)
  jaxpr = jax.make_jaxpr(lambda q: ops.decode_attention(q, k, v, **kw))(query).jaxpr
  assert "pallas_call" not in primitive_names(jaxpr)


# --- the partition ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 5, 40])
def test_plan_covers_every_block_once(workers):
  lengths = jnp.array([0, 1, 300, 64, 65, 0, 129], jnp.int32)
  kv_heads, bk = 3, 64
  plan = common.make_plan(lengths, kv_heads=kv_heads, q_len=2, block_kv=bk, capacity=320,
                          window=None, num_workers=workers)
  n_blocks = -(-np.asarray(lengths) // bk)
  seen = {}
  k, total = int(plan.blocks_per_worker), int(plan.total)
  assert total == n_blocks.sum() * kv_heads
  for w in range(workers):
    lo, hi = w * k, min((w + 1) * k, total)
    for i in range(int(plan.worker_item[w]), int(plan.worker_last[w]) + 1):
      start, end = int(plan.item_start[i]), int(plan.item_start[i + 1])
      for p in range(max(lo, start), min(hi, end)):
        item = (int(plan.item_seq[i]), int(plan.item_head[i]), int(plan.item_block[i]) + p - start)
        assert item not in seen
        seen[item] = i + w  # the slot
  expected = {(b, h, j) for b in range(len(lengths)) for h in range(kv_heads)
              for j in range(n_blocks[b])}
  assert set(seen) == expected
  # Slots map back to their items.
  items = np.asarray(common.slot_items(plan))
  for (b, h, _), slot in seen.items():
    i = int(items[slot])
    assert (int(plan.item_seq[i]), int(plan.item_head[i])) == (b, h)


# --- kernels: CPU interpret mode (small shapes, several features per case) --------------

CASES = {
    # Contiguous bf16, GQA 4, lengths 1 / capacity / odd; capacity 200 = pages of 8.
    "contiguous_gqa4": Case(3, 1, 8, 2, 64, 200, (1, 200, 77)),
    # Paged (16), GQA 8, three query tokens (speculative), window, soft cap; length 2 < q_len
    # (the first query token sees nothing: zero row, lse -inf), length 0 (empty slot).
    "paged16_gqa8_window_softcap": Case(3, 3, 16, 2, 64, 128, (128, 2, 0), page_size=16,
                                        window=(40, 0), soft_cap=20.0),
    # Paged (64), MHA (ratio 1), int8.
    "paged64_mha_int8": Case(2, 1, 4, 4, 64, 192, (192, 65), page_size=64, fmt="int8"),
    # Contiguous fp8, GQA 4, a window longer than the cache.
    "contiguous_fp8_window": Case(2, 2, 8, 2, 64, 128, (128, 50), fmt="fp8", window=(500, 3)),
    # Paged (32: the smallest page Mosaic GPU takes for quantized caches) int4 with two
    # scale groups (one per half of head_dim).
    "paged32_int4": Case(2, 1, 8, 2, 64, 128, (100, 128), page_size=32, fmt="int4",
                         int4_groups=2),
}
TRITON_ONLY_CASES = {
    # Quantized pages of 16 tokens (Mosaic GPU needs >= 32 for quantized caches).
    "paged16_int8_gqa4": Case(2, 1, 8, 2, 64, 64, (64, 33), page_size=16, fmt="int8"),
    # float32 queries and int4 with 4 scale groups (Mosaic GPU serves neither).
    "float32_int4_groups4": Case(2, 1, 8, 2, 64, 64, (64, 9), page_size=16, fmt="int4",
                                 int4_groups=4, dtype="float32"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("implementation", ["triton:interpret", "mosaic_gpu:interpret"])
def test_kernel_interpret(implementation, name, key):
  _check(implementation, CASES[name], key)


@pytest.mark.parametrize("name", sorted(TRITON_ONLY_CASES))
def test_triton_interpret_extra(name, key):
  _check("triton:interpret", TRITON_ONLY_CASES[name], key)


def test_triton_many_workers(key):
  # More workers than blocks: most workers are empty, pieces of one block each.
  case = Case(3, 1, 8, 2, 32, 128, (128, 3, 70), page_size=16, dtype="float32")
  query, k, v, kw = make_inputs(case, key)
  cfg = triton_kernels.Config(num_workers=23)
  out = jax.jit(lambda q, k, v, t, l: triton_kernels.decode_attention(
      q, k, v, t, l, fmt="none", window=None, scale=0.125, soft_cap=None, config=cfg,
      interpret=True))(query, k, v, kw["page_table"], kw["lengths"])[0]
  ref = jax.jit(lambda q, k, v, kw: ops.decode_attention(
      q, k, v, scale=0.125, implementation="xla", **kw))(query, k, v, kw)
  assert_close(out, ref)


def test_unsupported_calls_name_the_reason(key):
  query, k, v, kw = make_inputs(Case(2, 1, 4, 2, 32, 32, (32, 3), dtype="float32"), key)
  with pytest.raises(NotImplementedError, match="mosaic_gpu needs bfloat16/float16"):
    ops.decode_attention(query, k, v, implementation="mosaic_gpu:interpret", **kw)
  query, k, v, kw = make_inputs(Case(2, 1, 4, 2, 48, 32, (32, 3)), key)
  with pytest.raises(NotImplementedError, match="power-of-two head_dim"):
    ops.decode_attention(query, k, v, implementation="triton:interpret", **kw)
  # Quantized pages of 16 tokens: each page's scale row would land off a 128-byte TMA
  # boundary in shared memory (the cause of the misaligned-address fault seen on H100).
  query, k, v, kw = make_inputs(Case(2, 1, 8, 2, 64, 64, (64, 3), page_size=16, fmt="int8"),
                                key)
  with pytest.raises(NotImplementedError, match="need pages of >= 32 tokens"):
    ops.decode_attention(query, k, v, implementation="mosaic_gpu:interpret", **kw)


# --- Mosaic GPU keys-major form for quantized caches (Config.keys_major) ------------------
#
# S^T = K Q^T with the converted K tile as the register A operand (on CPU: through shared
# memory, the interpreter's form), O^T = V^T P^T. Called through the kernel module with an
# explicit config, so these run whichever form the registry's default picks.

KEYS_MAJOR_CASES = {
    # Contiguous int8, GQA 4, lengths 1 / capacity / odd, several workers per item.
    "int8_gqa4_contiguous": Case(3, 1, 8, 2, 64, 192, (1, 192, 77), fmt="int8"),
    # Paged (64) fp8, GQA 8 with two query tokens (16 query columns), window and soft cap;
    # length 0 (an empty slot) and 1 (the first query token sees nothing).
    "fp8_gqa8_paged64_window": Case(3, 2, 16, 2, 64, 128, (128, 1, 0), page_size=64,
                                    fmt="fp8", window=(70, 0), soft_cap=10.0),
    # int4, head_dim 128, one scale group: both halves accumulate into one logits tile.
    "int4_d128_contiguous": Case(2, 1, 8, 2, 128, 128, (128, 50), fmt="int4"),
    # int4 with two scale groups (one per half), paged (32), three query tokens, MHA.
    "int4_groups2_paged32_mha": Case(2, 3, 4, 4, 128, 128, (3, 128), page_size=32,
                                     fmt="int4", int4_groups=2),
}


def _kernel_direct(case: Case, key, config, interpret: bool = True):
  """The Mosaic GPU kernel (interpret mode by default) with ``config`` and the reference,
  on one input."""
  query, k, v, kw = make_inputs(case, key)
  spec = da.validate(query, k, v, kw["lengths"], kw.get("page_table"), kw.get("k_scale"),
                     kw.get("v_scale"), logits_soft_cap=case.soft_cap,
                     local_window_size=case.window, scale=None)
  ps = spec.page_size if spec.paged else mgpu_kernels.contiguous_page_size(spec.capacity)
  kp, vp, table, ks, vs = da._paged_view(k, v, kw.get("page_table"), kw.get("k_scale"),
                                         kw.get("v_scale"), spec, ps)
  out, lse = jax.jit(lambda *a: mgpu_kernels.decode_attention(
      *a, fmt=case.fmt, window=case.window, scale=spec.scale, soft_cap=case.soft_cap,
      config=config, interpret=interpret))(query, kp, vp, table, kw["lengths"], ks, vs)
  return (out, lse), _run("xla", case, query, k, v, kw)


def _check_keys_major(case: Case, key, interpret: bool, wide: bool = False):
  cfg = (mgpu_kernels.keys_major_wide_config(case.fmt, num_workers=4) if wide
         else mgpu_kernels.keys_major_config(num_workers=4))
  (out, lse), (ref_out, ref_lse) = _kernel_direct(case, key, cfg, interpret)
  assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
  assert_close(out, ref_out, name="out")
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", sorted(KEYS_MAJOR_CASES))
def test_mosaic_gpu_keys_major_interpret(name, key):
  _check_keys_major(KEYS_MAJOR_CASES[name], key, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(KEYS_MAJOR_CASES))
def test_mosaic_gpu_keys_major_gpu(name, key):
  # The register-operand wgmma and the transposed probability store run only here.
  from jaxeff.ops import _registry
  if not any(k in jax.devices()[0].device_kind for k in _registry.HOPPER_KINDS):
    pytest.skip("the Mosaic GPU kernel needs a Hopper GPU")
  _check_keys_major(KEYS_MAJOR_CASES[name], key, interpret=False)


# 128-key blocks (two wgmma M tiles per block, one cross-warp reduction per 128 keys):
# int8 GQA 4 contiguous with lengths 1 / capacity / odd; fp8 GQA 8 paged (64: two pages per
# block) with lengths 0 and 1, window and soft cap; int4 with 2 groups on pages of 32 (four
# page copies per block), q_len 3.
WIDE_CASES = ("int8_gqa4_contiguous", "fp8_gqa8_paged64_window", "int4_groups2_paged32_mha")


@pytest.mark.parametrize("name", WIDE_CASES)
def test_mosaic_gpu_keys_major_wide_interpret(name, key):
  _check_keys_major(KEYS_MAJOR_CASES[name], key, interpret=True, wide=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(KEYS_MAJOR_CASES))
def test_mosaic_gpu_keys_major_wide_gpu(name, key):
  from jaxeff.ops import _registry
  if not any(k in jax.devices()[0].device_kind for k in _registry.HOPPER_KINDS):
    pytest.skip("the Mosaic GPU kernel needs a Hopper GPU")
  _check_keys_major(KEYS_MAJOR_CASES[name], key, interpret=False, wide=True)


def test_mosaic_gpu_keys_major_wide_by_default_switch(monkeypatch):
  assert mgpu_kernels.default_config(128, "int8").block_kv == 64
  monkeypatch.setattr(mgpu_kernels, "KEYS_MAJOR_WIDE_BY_DEFAULT", True)
  cfg = mgpu_kernels.default_config(128, "int8")
  assert (cfg.keys_major, cfg.block_kv, cfg.num_stages, cfg.ctas_per_sm) == (True, 128, 2, 2)
  assert mgpu_kernels.default_config(128, "int4").num_stages == 3
  assert not mgpu_kernels.default_config(128, "none").keys_major


def test_mosaic_gpu_int4_halves_are_exact(key):
  # The bitwise int4 unpacking (no 8-bit arithmetic on the GPU) gives the nibble values.
  nib = jax.random.randint(key, (8, 64), 0, 16)
  lo, hi = mgpu_kernels._int4_halves(common.pack_int4(nib), jnp.bfloat16)
  np.testing.assert_array_equal(np.concatenate([lo, hi], -1).astype(np.int32),
                                np.asarray(nib) - common.INT4_OFFSET)
  # int8 storage of the same bits too.
  lo8, hi8 = mgpu_kernels._int4_halves(common.pack_int4(nib).view(jnp.int8), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(lo8), np.asarray(lo))
  np.testing.assert_array_equal(np.asarray(hi8), np.asarray(hi))


def test_mosaic_gpu_keys_major_rejects_what_it_cannot_serve(key):
  case = Case(2, 1, 8, 2, 64, 128, (128, 5), fmt="int4")
  with pytest.raises(ValueError, match="keys-major form serves int8/fp8 .* got fmt 'int4', "
                                       "head_dim 64, block_kv 64"):
    _kernel_direct(case, key, mgpu_kernels.keys_major_config(num_workers=2))
  case = Case(2, 1, 8, 2, 64, 128, (128, 5), fmt="int8")
  with pytest.raises(ValueError, match=r"block_kv in \(64, 128\); got fmt 'int8', head_dim 64, "
                                       "block_kv 256"):
    _kernel_direct(case, key, mgpu_kernels.keys_major_config(block_kv=256))


def test_mosaic_gpu_keys_major_by_default_through_the_op(key):
  # KEYS_MAJOR_BY_DEFAULT (on since the H100 timing): the op's registry runs the keys-major
  # form for int8/fp8 (and int4 at head_dim 128), the query-major one else.
  assert mgpu_kernels.default_config(64, "fp8").keys_major
  assert mgpu_kernels.default_config(128, "int4").keys_major
  assert not mgpu_kernels.default_config(64, "int4").keys_major
  assert not mgpu_kernels.default_config(128, "none").keys_major
  _check("mosaic_gpu:interpret", CASES["contiguous_fp8_window"], key)


def test_mosaic_gpu_query_major_still_serves_through_the_op(monkeypatch, key):
  # With the switch off the op falls back to the query-major form (64 padded query rows).
  monkeypatch.setattr(mgpu_kernels, "KEYS_MAJOR_BY_DEFAULT", False)
  assert not mgpu_kernels.default_config(64, "fp8").keys_major
  _check("mosaic_gpu:interpret", CASES["contiguous_fp8_window"], key)


@pytest.mark.parametrize("fmt,groups,q_heads,wide", [
    ("int8", 1, 8, False), ("fp8", 1, 16, False), ("int4", 2, 8, False),
    ("int8", 1, 8, True), ("fp8", 1, 16, True), ("int4", 1, 8, True)])
def test_mosaic_gpu_keys_major_lowers_for_cuda(fmt, groups, q_heads, wide):
  # The register-operand wgmma, the cross-warp softmax reductions, the transposed
  # probability store and the bitwise int4 unpacking exist only in the GPU lowering.
  b, s, kh, d, ps = 2, 512, 2, 128, 256
  dc = d // 2 if fmt == "int4" else d
  cdtype = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "int4": jnp.uint8}[fmt]
  sds = jax.ShapeDtypeStruct
  kv = sds((b * s // ps, ps, kh, dc), cdtype)
  scale = sds((b * s // ps, ps, kh) + ((groups,) if fmt == "int4" else ()), jnp.float32)
  cfg = (mgpu_kernels.keys_major_wide_config(fmt, num_workers=4) if wide
         else mgpu_kernels.keys_major_config(num_workers=4))
  fn = lambda q, k, v, t, l, ks, vs: mgpu_kernels.decode_attention(
      q, k, v, t, l, ks, vs, fmt=fmt, window=None, scale=0.1, soft_cap=None, config=cfg)
  text = lower_for_cuda(fn, sds((b, 1, q_heads, d), jnp.bfloat16), kv, kv,
                        sds((b, s // ps), jnp.int32), sds((b,), jnp.int32), scale, scale)
  assert "mosaic_gpu" in text


# --- bad inputs ---------------------------------------------------------------------------


def _good(key, **over):
  case = Case(2, 1, 4, 2, 32, 32, (32, 3), page_size=8, fmt="int8")
  query, k, v, kw = make_inputs(case, key)
  args = dict(query=query, key_cache=k, value_cache=v, **kw)
  args.update(over)
  return args


def _call(args):
  args = dict(args)
  return ops.decode_attention(args.pop("query"), args.pop("key_cache"), args.pop("value_cache"),
                              **args)


BAD = [
    ("lengths_beyond_capacity", lambda a: dict(lengths=jnp.array([33, 1], jnp.int32)),
     ValueError, r"lengths must be in \[0, capacity = 32\], got min 1 max 33"),
    ("negative_length", lambda a: dict(lengths=jnp.array([-1, 1], jnp.int32)),
     ValueError, r"lengths must be in \[0, capacity"),
    ("lengths_shape", lambda a: dict(lengths=jnp.array([3], jnp.int32)),
     ValueError, r"lengths must have shape \[batch\] = \(2,\), got \(1,\)"),
    ("lengths_float", lambda a: dict(lengths=jnp.array([3.0, 1.0])),
     TypeError, "lengths must be int32"),
    ("page_out_of_range", lambda a: dict(page_table=a["page_table"].at[1, 0].set(99)),
     ValueError, r"page_table\[1, 0\] = 99 is out of range \[0, num_pages = 11\)"),
    ("page_table_batch", lambda a: dict(page_table=a["page_table"][:1]),
     ValueError, r"page_table must be 2-D \[batch, pages_per_seq\] with batch 2"),
    ("page_table_float", lambda a: dict(page_table=a["page_table"].astype(jnp.float32)),
     TypeError, "page_table must be int32"),
    ("scale_shape", lambda a: dict(k_scale=a["k_scale"][..., :1]),
     ValueError, r"k_scale must have shape \(11, 8, 2\), got \(11, 8, 1\)"),
    ("scale_dtype", lambda a: dict(v_scale=a["v_scale"].astype(jnp.bfloat16)),
     TypeError, "v_scale must be float32, got bfloat16"),
    ("scale_missing", lambda a: dict(v_scale=None),
     ValueError, "v_scale is required for a quantized cache"),
    ("heads_not_divisible", lambda a: dict(key_cache=a["key_cache"][:, :, :1].repeat(3, 2),
                                           value_cache=a["value_cache"][:, :, :1].repeat(3, 2),
                                           k_scale=a["k_scale"][:, :, :1].repeat(3, 2),
                                           v_scale=a["v_scale"][:, :, :1].repeat(3, 2)),
     ValueError, r"query heads \(4\) must be a multiple of the number of KV heads \(3\)"),
    ("kv_mismatch", lambda a: dict(value_cache=a["value_cache"][:, :4]),
     ValueError, "key_cache and value_cache must have the same shape"),
    ("query_rank", lambda a: dict(query=a["query"][:, 0]),
     ValueError, r"query must be 4-D \[batch, q_len, q_heads, head_dim\]"),
    ("cache_format", lambda a: dict(key_cache=a["key_cache"][..., :8],
                                    value_cache=a["value_cache"][..., :8]),
     TypeError, "matches no cache format for query head_dim 32"),
    ("window", lambda a: dict(local_window_size=(3, -1)),
     ValueError, "local_window_size entries must be >= 0"),
    ("soft_cap", lambda a: dict(logits_soft_cap=0.0),
     ValueError, "logits_soft_cap must be a positive number"),
]


@pytest.mark.parametrize("name,update,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, update, exc, match, key):
  args = _good(key)
  args.update(update(args))
  with pytest.raises(exc, match=match):
    _call(args)


def test_bad_unquantized_inputs(key):
  query, k, v, kw = make_inputs(Case(2, 1, 4, 2, 32, 32, (32, 3)), key)
  with pytest.raises(ValueError, match="k_scale given for an unquantized bfloat16 cache"):
    ops.decode_attention(query, k, v, k_scale=jnp.ones((2, 32, 2)), **kw)
  with pytest.raises(TypeError, match="an unquantized cache must have the query dtype"):
    ops.decode_attention(query, k.astype(jnp.float32), v.astype(jnp.float32), **kw)
  with pytest.raises(ValueError, match="contiguous key_cache batch 1 != query batch 2"):
    ops.decode_attention(query, k[:1], v[:1], **kw)


def test_traced_lengths_are_clamped_not_checked(key):
  # Under jit a length past the capacity cannot be reported; it reads the whole cache.
  query, k, v, kw = make_inputs(Case(2, 1, 4, 2, 32, 32, (32, 3), dtype="float32"), key)
  f = jax.jit(lambda l: ops.decode_attention(query, k, v, lengths=l))
  assert_close(f(jnp.array([99, 3], jnp.int32)), f(jnp.array([32, 3], jnp.int32)))


# --- GPU: the kernels for real, small and at LLM sizes -----------------------------------
#
# The Mosaic GPU kernel first runs once in a subprocess with a timeout
# (``mosaic_gpu.canary``): if it fails or hangs there, test_mosaic_gpu_canary fails with
# the reason and the other Mosaic GPU tests are skipped instead of hanging this process.

GPU_KERNELS = ["mosaic_gpu", "triton"]


def _gpu_check(implementation: str, case: Case, key):
  if implementation == "mosaic_gpu":
    why = mgpu_kernels.canary()[case.fmt]
    if why is not None:
      pytest.skip(f"Mosaic GPU canary failed (see test_mosaic_gpu_canary): {why[:200]}")
  _check(implementation, case, key)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", mgpu_kernels.CHECK_FORMATS)
def test_mosaic_gpu_canary(fmt):
  why = mgpu_kernels.canary()[fmt]
  assert why is None, why


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("implementation", GPU_KERNELS)
def test_kernel_gpu(implementation, name, key):
  _gpu_check(implementation, CASES[name], key)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TRITON_ONLY_CASES))
def test_triton_gpu_extra(name, key):
  _check("triton", TRITON_ONLY_CASES[name], key)


REAL_CASES = {
    "gqa_contiguous_bf16": Case(8, 1, 32, 8, 128, 4096, (4096, 1, 4000, 2500, 17, 3333, 64, 999)),
    "gqa_paged32_int8": Case(8, 1, 32, 8, 128, 4096, (4096, 1, 4000, 2500, 17, 3333, 64, 999),
                             page_size=32, fmt="int8"),
    "gqa_paged64_fp8": Case(8, 1, 32, 8, 128, 4096, (4096, 1, 4000, 2500, 17, 3333, 64, 999),
                            page_size=64, fmt="fp8"),
    "gqa_contiguous_int4": Case(8, 1, 32, 8, 128, 4096,
                                (4096, 1, 4000, 2500, 17, 3333, 64, 999), fmt="int4"),
    "mha_spec4_window": Case(4, 4, 16, 16, 128, 2048, (2048, 1500, 4, 700), page_size=32,
                             window=(1023, 0), soft_cap=30.0),
    "ragged_long_short": Case(8, 1, 32, 8, 64, 32768, (32768, 128, 128, 256, 128, 512, 128, 1),
                              page_size=64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(REAL_CASES))
@pytest.mark.parametrize("implementation", GPU_KERNELS)
def test_kernel_gpu_real_sizes(implementation, name, key):
  _gpu_check(implementation, REAL_CASES[name], key)


# --- cross-lowering: the kernels lower for CUDA on a CPU-only machine --------------------


@pytest.mark.parametrize("backend,fmt", [("triton", "none"), ("triton", "int8"),
                                         ("triton", "int4"), ("mosaic_gpu", "none")])
def test_kernels_lower_for_cuda(backend, fmt):
  # Interpret mode never builds Triton IR or a Mosaic GPU module; this does (it caught a
  # Triton loop whose carry was a literal, which interprets fine and fails to lower). The
  # H100 is an abstract device. (What only the hardware checks, e.g. TMA alignment, it
  # cannot see: see mosaic_gpu.supports and the gpu-marked tests.)
  b, s, kh, d, n, ps = 2, 512, 2, 128, 8, 256
  dc = d // 2 if fmt == "int4" else d
  cdtype = {"none": jnp.bfloat16, "int8": jnp.int8, "int4": jnp.uint8}[fmt]
  sds = jax.ShapeDtypeStruct
  kv = sds((b * s // ps, ps, kh, dc), cdtype)
  scale = None if fmt == "none" else sds((b * s // ps, ps, kh) + ((1,) if fmt == "int4" else ()),
                                         jnp.float32)
  mod = triton_kernels if backend == "triton" else mgpu_kernels
  cfg = dataclasses.replace(mod.Config(), num_workers=4)
  fn = lambda q, k, v, t, l, ks, vs: mod.decode_attention(
      q, k, v, t, l, ks, vs, fmt=fmt, window=None, scale=0.1, soft_cap=None, config=cfg)
  text = lower_for_cuda(fn, sds((b, 1, n, d), jnp.bfloat16), kv, kv,
                        sds((b, s // ps), jnp.int32), sds((b,), jnp.int32), scale, scale)
  assert ("xla.gpu.triton" in text) if backend == "triton" else ("mosaic_gpu" in text)
