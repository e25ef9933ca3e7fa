"""sparse_matmul and cats_mlp: kernels (interpret mode) vs the dense masked reference,
gradients of the block-sparse product, dispatch and bad inputs. GPU tests at real sizes
are marked ``gpu``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops.sparse_matmul import cats_mlp, cats_mlp_reference, sparse_matmul
from jaxeff.sparse import formats as F
from jaxeff.sparse.activation import calibrate_cats_threshold
from jaxeff.sparse.pruning import magnitude_prune, nm_mask
from tests.helpers import assert_close, lower_for_cuda

INTERPRET = "triton:interpret"


def _pruned(key, k, n, sparsity, dtype=jnp.float32):
  w = jax.random.normal(key, (k, n), jnp.float32)
  return magnitude_prune(w, sparsity).astype(dtype)


def _x(key, m, k, dtype=jnp.float32):
  return jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.float32).astype(dtype)


def _dense_ref(x, w):
  return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("m,k,n,sparsity,tile", [(1, 160, 80, 0.9, (32, 64)),
                                                 (40, 64, 33, 0.7, (64, 32)),
                                                 (2, 300, 40, 0.8, (256, 32))])
def test_tiled_kernel_matches_masked_dense(m, k, n, sparsity, tile, key):
  w = _pruned(key, k, n, sparsity)
  ws = F.compress(w, tile=tile)
  x = _x(key, m, k)
  out = sparse_matmul(x, ws, implementation=INTERPRET)
  assert_close(out, _dense_ref(x, w))


@pytest.mark.parametrize("m,k,n,sparsity", [(1, 300, 70, 0.8), (3, 97, 40, 0.5)])
def test_ell_kernel_matches_masked_dense(m, k, n, sparsity, key):
  w = _pruned(key, k, n, sparsity, jnp.bfloat16)
  ws = F.compress_ell(w, block_n=32)
  x = _x(key, m, k)
  out = sparse_matmul(x, ws, implementation=INTERPRET)
  assert_close(out, _dense_ref(x, w))
  assert_close(sparse_matmul(x, ws, implementation="xla"), _dense_ref(x, w))


@pytest.mark.parametrize("pattern,m,k,n,pack", [("2:4", 3, 136, 48, None),
                                                ("1:4", 1, 64, 128, False),
                                                ("2:8", 20, 128, 40, None)])
def test_nm_kernel_matches_masked_dense(pattern, m, k, n, pack, key):
  w = jax.random.normal(key, (k, n))
  w = jnp.where(nm_mask(jnp.abs(w), pattern), w, 0)
  x = _x(key, m, k)
  ws = F.compress_nm(w, pattern, pack_meta=pack, meta_block=16)
  out = sparse_matmul(x, ws, implementation=INTERPRET)
  assert_close(out, _dense_ref(x, w))


@pytest.mark.parametrize("m,k,n", [(1, 136, 48), (3, 256, 100)])  # FMA / tensor cores
def test_nm_words_kernel_matches_masked_dense(m, k, n, key):
  w = jax.random.normal(key, (k, n))
  w = jnp.where(nm_mask(jnp.abs(w), "2:4"), w, 0).astype(jnp.bfloat16)
  x = _x(key, m, k)
  out = sparse_matmul(x, F.compress_nm(w, "2:4", words=True), implementation=INTERPRET)
  assert_close(out, _dense_ref(x, w))


def test_bf16_inputs(key):
  w = _pruned(key, 64, 64, 0.8, jnp.bfloat16)
  x = _x(key, 2, 64, jnp.bfloat16)
  out = sparse_matmul(x, F.compress(w, tile=(32, 32)), implementation=INTERPRET)
  assert out.dtype == jnp.bfloat16
  assert_close(out, _dense_ref(x, w).astype(jnp.bfloat16))
  out = sparse_matmul(x, F.compress_ell(w, block_n=32), implementation=INTERPRET)
  assert_close(out, _dense_ref(x, w).astype(jnp.bfloat16))


def _bsr(key, k, n, block, density=0.5):
  kw, km = jax.random.split(key)
  keep = np.array(jax.random.uniform(km, (k // block[0], n // block[1])) < density)
  keep[0, 0], keep[:, -1] = True, False  # one empty block column
  w = jax.random.normal(kw, (k, n)) * np.kron(keep, np.ones(block))
  return w, F.compress_bsr(w, block=block)


@pytest.mark.parametrize("impl", ["xla", INTERPRET])
def test_bsr_forward_and_grads(impl, key):
  w, b = _bsr(key, 64, 96, (16, 32))
  x = _x(key, 9, 64)
  dy = jax.random.normal(jax.random.fold_in(key, 3), (9, 96))

  def loss(x, blocks):
    wb = F.BlockSparse(blocks, *[getattr(b, f) for f in ("block_rows", "counts", "t_cols",
                                                         "t_slots", "t_counts")],
                       b.shape, b.block, b.num_blocks)
    return jnp.sum(sparse_matmul(x, wb, implementation=impl) * dy)

  out = sparse_matmul(x, b, implementation=impl)
  assert_close(out, _dense_ref(x, w))
  dx, dblocks = jax.grad(loss, argnums=(0, 1))(x, b.blocks)
  mask = np.kron(np.asarray(F.decompress(F.compress_bsr(jnp.asarray(np.abs(w) > 0, jnp.float32),
                                                        block=(16, 32)))) > 0, 1)
  assert_close(dx, _dense_ref(dy, w.T))
  dw = F.bsr_dense(dblocks, b)
  assert_close(dw, _dense_ref(x.T, dy) * mask)
  # padded ELL slots get no gradient
  valid = np.arange(b.blocks.shape[1])[None, :] < np.asarray(b.counts)[:, None]
  assert np.all(np.asarray(dblocks)[~valid] == 0)


@pytest.mark.parametrize("m", [1, 3])
def test_cats_kernel_matches_reference(m, key):
  d, h = 64, 512
  ks = jax.random.split(key, 4)
  wg, wu = (jax.random.normal(k, (d, h)) / 8 for k in ks[:2])
  wd = jax.random.normal(ks[2], (h, d)) / 16
  x = _x(ks[3], m, d)
  t = calibrate_cats_threshold(x @ wg, 0.5)
  out = cats_mlp(x, wg.T, wu.T, wd, threshold=t, up_transposed=True, gate_transposed=True,
                 implementation=INTERPRET)
  ref = cats_mlp_reference(x, wg, wu, wd, threshold=t, up_transposed=False,
                           out_dtype=jnp.float32)
  assert_close(out, ref)
  dense = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd  # CATS at threshold 0 is the plain MLP
  assert_close(cats_mlp(x, wg, wu, wd, threshold=0.0), dense, rtol=1e-4)
  assert float(jnp.max(jnp.abs(out - dense))) > 0  # the threshold dropped something


def test_cats_kernel_skips_inactive_rows(key):
  # NaN rows of up^T / down for inactive neurons would poison the output if they were read
  from kernels_pallas.sparse import triton as T

  d, h = 64, 512
  ks = jax.random.split(key, 3)
  gate_t = jax.random.normal(ks[0], (h, d)) / 8
  x = _x(ks[1], 1, d)
  t = calibrate_cats_threshold(x @ gate_t.T, 0.5)
  a = jnp.abs(jax.nn.silu(x @ gate_t.T)[0])
  inactive = a < 0.9 * t  # clearly under the threshold (float rounding cannot flip them)
  up_t = jnp.where(inactive[:, None], jnp.nan, jax.random.normal(ks[2], (h, d)))
  down = jnp.where(inactive[:, None], jnp.nan, jnp.ones((h, d)))
  y, active = T.cats_mlp(x, gate_t, up_t, down, jnp.reshape(t, (1,)).astype(jnp.float32),
                         interpret=True)
  assert bool(jnp.all(jnp.isfinite(y)))
  sure = (a < 0.9 * t) | (a > 1.1 * t)
  np.testing.assert_array_equal(np.asarray(active)[sure], np.asarray(a > t)[sure])


def test_dispatch_and_fallbacks(key):
  w = _pruned(key, 64, 64, 0.3)
  ws = F.compress(w, tile=(32, 32))
  x = _x(key, 2, 64)
  with pytest.raises(NotImplementedError, match="below the break-even"):
    sparse_matmul(x, ws, implementation=INTERPRET)
  out = sparse_matmul(x, ws, min_sparsity=0.2, implementation=INTERPRET)
  assert_close(out, _dense_ref(x, w))
  assert_close(sparse_matmul(x, w), _dense_ref(x, w))  # dense weight: plain dot
  assert_close(sparse_matmul(x[None], ws), _dense_ref(x, w)[None])  # leading dims, default
  with pytest.raises(NotImplementedError, match="skinny"):
    sparse_matmul(_x(key, 65, 64), F.compress(_pruned(key, 64, 64, 0.8), tile=(32, 32)),
                  implementation=INTERPRET)


def test_bad_inputs(key):
  w = F.compress(_pruned(key, 64, 32, 0.8), tile=(32, 32))
  with pytest.raises(ValueError, match=r"x.shape\[-1\] = 48 must equal K = 64"):
    sparse_matmul(jnp.ones((2, 48)), w)
  with pytest.raises(TypeError, match="x.dtype must be bfloat16, float16 or float32"):
    sparse_matmul(jnp.ones((2, 64), jnp.int32), w)
  with pytest.raises(TypeError, match="w must be a TiledSparse, NMSparse, BlockSparse or a dense"):
    sparse_matmul(jnp.ones((2, 64)), jnp.ones((64, 32, 2)))
  with pytest.raises(ValueError, match=r"min_sparsity must be in \[0, 1\], got 1.5"):
    sparse_matmul(jnp.ones((2, 64)), w, min_sparsity=1.5)
  with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
    sparse_matmul(jnp.ones((2, 64)), w, implementation="cuda")
  with pytest.raises(ValueError, match=r"expected w_up \(8, 16\) and w_down \(16, 8\)"):
    cats_mlp(jnp.ones((1, 8)), jnp.ones((8, 16)), jnp.ones((16, 8)), jnp.ones((16, 8)),
             threshold=0.1)
  with pytest.raises(ValueError, match="threshold must be >= 0"):
    cats_mlp(jnp.ones((1, 8)), jnp.ones((8, 16)), jnp.ones((8, 16)), jnp.ones((16, 8)),
             threshold=-1.0)


# --- GPU: the kernels compiled by Triton, real sizes ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_tiled_gpu_real_sizes(sparsity, key):
  k = n = 4096
  w = _pruned(key, k, n, sparsity, jnp.bfloat16)
  ws = F.compress(w)
  f = jax.jit(lambda x, w: sparse_matmul(x, w, implementation="triton"))
  for m in (1, 16, 64):
    x = _x(key, m, k, jnp.bfloat16)
    assert_close(f(x, ws), _dense_ref(x, w).astype(jnp.bfloat16), name=f"m={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_ell_gpu_real_sizes(sparsity, key):
  k, n = 4096, 3000
  w = _pruned(key, k, n, sparsity, jnp.bfloat16)
  ws = F.compress_ell(w)
  f = jax.jit(lambda x, w: sparse_matmul(x, w, implementation="triton"))
  for m in (1, 4, 16):
    x = _x(key, m, k, jnp.bfloat16)
    assert_close(f(x, ws), _dense_ref(x, w).astype(jnp.bfloat16), name=f"m={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "2:4 words"])
def test_nm_gpu_real_sizes(pattern, key):
  words = pattern.endswith("words")
  pattern = pattern.split()[0]
  k, n = 4096, 11008
  w = jax.random.normal(key, (k, n)).astype(jnp.bfloat16)
  w = jnp.where(nm_mask(jnp.abs(w), pattern), w, 0)
  ws = F.compress_nm(w, pattern, words=words)
  f = jax.jit(lambda x, w: sparse_matmul(x, w, implementation="triton"))
  for m in (1, 4, 16, 64) if words else (1, 16, 64):
    x = _x(key, m, k, jnp.bfloat16)
    assert_close(f(x, ws), _dense_ref(x, w).astype(jnp.bfloat16), name=f"m={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("block", [(16, 16), (64, 64), (128, 128)])
def test_bsr_gpu_fwd_bwd(block, key):
  w, b = _bsr(key, 2048, 2048, block, density=0.3)
  w = w.astype(jnp.bfloat16)
  b = F.compress_bsr(w, block=block)
  x = _x(key, 256, 2048, jnp.bfloat16)
  f = jax.jit(lambda x, bl: sparse_matmul(x, F.BlockSparse(bl, *[getattr(b, f) for f in (
      "block_rows", "counts", "t_cols", "t_slots", "t_counts")], b.shape, b.block,
      b.num_blocks), implementation="triton"))
  out, vjp = jax.vjp(f, x, b.blocks)
  assert_close(out, _dense_ref(x, w).astype(jnp.bfloat16))
  dy = jax.random.normal(key, out.shape).astype(jnp.bfloat16)
  dx, _ = vjp(dy)
  assert_close(dx, _dense_ref(dy, w.T).astype(jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8])
def test_cats_gpu_real_sizes(m, key):
  d, h = 4096, 14336
  ks = jax.random.split(key, 4)
  wg, wu = ((jax.random.normal(k, (d, h)) / 64).astype(jnp.bfloat16) for k in ks[:2])
  wd = (jax.random.normal(ks[2], (h, d)) / 128).astype(jnp.bfloat16)
  x = _x(ks[3], m, d, jnp.bfloat16)
  t = calibrate_cats_threshold((x @ wg).astype(jnp.float32), 0.5)
  out = jax.jit(lambda *a: cats_mlp(*a, threshold=t, up_transposed=True, gate_transposed=True,
                                    implementation="triton"))(x, wg.T, wu.T, wd)
  ref = cats_mlp_reference(x, wg, wu, wd, threshold=t, up_transposed=False,
                           out_dtype=jnp.bfloat16)
  assert_close(out, ref)


# --- cross-lowering: the Triton kernels lower for CUDA on a CPU-only machine -------------


def test_kernels_lower_for_cuda():
  # Interpret mode never builds Triton IR; this does (scan, gathers, masked loads, dynamic
  # loop bounds). The H100 is an abstract device.
  from kernels_pallas.sparse import triton as T

  sds, bf, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
  k, n = 512, 256
  cases = [
      (lambda x, v, b, c: T.tiled_sparse_matmul(x, v, b, c, tile=(64, 128)),
       sds((16, k), bf), sds((k * n // 4,), bf), sds((k // 32, n), jnp.uint32),
       sds((k // 64, n), i32)),
      (lambda x, d, b, p: T.ell_sparse_matmul(x, d, b, p, chunks_per_block=8),
       sds((3, k), bf), sds((16, 3, 8, 128), jnp.uint32), sds((16, 128), i32), sds((3,), i32)),
      (lambda x, v, m: T.nm_sparse_matmul(x, v, m, n=2, m=4), sds((4, 16, k // 4), bf),
       sds((2, k // 4, n), bf), sds((k // 4, n), jnp.uint8)),
      (lambda x, v, m: T.nm_sparse_matmul(x, v, m, n=2, m=4, meta_block=32),
       sds((4, 16, k // 4), bf), sds((2, k // 4, n), bf), sds((k // 8, n), jnp.uint8)),
      (lambda x, v, m: T.nm_words_matmul(x, v, m), sds((2, k), bf),
       sds((k // 32, 8, n), jnp.uint32), sds((k // 32, n), jnp.uint32)),
      (lambda x, v, m: T.nm_words_dot_matmul(x, v, m), sds((16, k), bf),
       sds((k // 32, 8, n), jnp.uint32), sds((k // 32, n), jnp.uint32)),
      (lambda x, b, r, c: T.bsr_matmul(x, b, r, c), sds((32, k), bf),
       sds((n // 32, 4, 32, 32), bf), sds((n // 32, 4), i32), sds((n // 32,), i32)),
      (lambda d, b, c, s, t: T.bsr_matmul_t(d, b, c, s, t, k=k), sds((32, n), bf),
       sds((n // 32, 4, 32, 32), bf), sds((k // 32, 4), i32), sds((k // 32, 4), i32),
       sds((k // 32,), i32)),
      (lambda x, d, r, c: T.bsr_weight_grad(x, d, r, c, block=(32, 32)), sds((32, k), bf),
       sds((32, n), bf), sds((n // 32, 4), i32), sds((n // 32,), i32)),
      (T.cats_mlp, sds((2, 256), bf), sds((1024, 256), bf), sds((1024, 256), bf),
       sds((1024, 256), bf), sds((1,), jnp.float32)),
  ]
  for fn, *args in cases:
    text = lower_for_cuda(fn, *args)
    assert "xla.gpu.triton" in text
