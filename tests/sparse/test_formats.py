"""Sparse formats: exact round trips, storage invariants, validation errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.sparse import formats as F
from jaxeff.sparse.pruning import nm_mask


def _sparse(key, shape, sparsity, dtype=jnp.float32):
  kw, km = jax.random.split(key)
  w = jax.random.normal(kw, shape, jnp.float32)
  return jnp.where(jax.random.uniform(km, shape) < sparsity, 0.0, w).astype(dtype)


@pytest.mark.parametrize("shape,tile,sparsity", [((100, 70), (32, 32), 0.8),
                                                 ((17, 33), (32, 64), 0.95),
                                                 ((130, 40), (64, 32), 0.5)])
def test_tiled_round_trip_exact(shape, tile, sparsity, key):
  w = _sparse(key, shape, sparsity)
  ts = F.compress(w, tile=tile)
  np.testing.assert_array_equal(np.asarray(F.decompress(ts)), np.asarray(w))
  assert ts.nnz == int(jnp.sum(w != 0))
  assert ts.sparsity == pytest.approx(1 - ts.nnz / w.size)
  kp, np_ = ts.padded_shape
  assert kp % tile[0] == 0 and np_ % tile[1] == 0 and kp >= shape[0] and np_ >= shape[1]
  assert ts.bitmap.shape == (kp // 32, np_) and ts.col_ptr.shape == (kp // tile[0], np_)
  assert float(ts.values[0]) == 0.0 and ts.values.shape[0] > ts.nnz  # the leading zero
  # bit k % 32 of word [k // 32, c] marks w[k, c]; col_ptr counts the values stored before
  bits = np.asarray(F.unpack_bitmap(ts.bitmap))[:shape[0], :shape[1]]
  np.testing.assert_array_equal(bits, np.asarray(w) != 0)
  counts = np.asarray(F.unpack_bitmap(ts.bitmap)).reshape(kp // tile[0], tile[0], np_).sum(1)
  tiles = counts.reshape(kp // tile[0], np_ // tile[1], tile[1]).transpose(1, 0, 2).reshape(-1)
  expect = np.concatenate([[0], np.cumsum(tiles)[:-1]]).reshape(np_ // tile[1], kp // tile[0],
                                                                  tile[1])
  np.testing.assert_array_equal(np.asarray(ts.col_ptr),
                                expect.transpose(1, 0, 2).reshape(kp // tile[0], np_))


def test_tiled_bf16_and_pytree(key):
  w = _sparse(key, (64, 64), 0.7, jnp.bfloat16)
  ts = F.compress(w, tile=(32, 32))
  assert ts.values.dtype == jnp.bfloat16
  leaves, tree = jax.tree.flatten(ts)
  assert len(leaves) == 3
  back = jax.tree.unflatten(tree, leaves)
  np.testing.assert_array_equal(np.asarray(jax.jit(F.decompress)(back), np.float32),
                                np.asarray(w, np.float32))


@pytest.mark.parametrize("shape,sparsity,chunk", [((300, 70), 0.8, None), ((40, 33), 0.5, 16),
                                                  ((2000, 40), 0.97, 16)])
def test_ell_round_trip_exact(shape, sparsity, chunk, key):
  w = _sparse(key, shape, sparsity, jnp.bfloat16)
  e = F.compress_ell(w, block_n=32, chunk=chunk)
  np.testing.assert_array_equal(np.asarray(F.decompress(e), np.float32),
                                np.asarray(w, np.float32))
  assert e.nnz == int(jnp.sum(w != 0)) and e.dtype == jnp.bfloat16
  assert e.chunk == (chunk or F.ell_chunk(e.nnz / w.size))
  nb = -(-shape[1] // 32)
  assert e.block_ptr.shape == (nb + 1,) and int(e.block_ptr[-1]) == e.data.shape[0]
  # columns sorted by non-zero count: the inverse permutation is one
  assert sorted(np.asarray(e.inv_perm).tolist()) == list(range(shape[1]))
  counts = np.asarray(jnp.sum(w != 0, axis=0))
  by_position = np.empty_like(counts)
  by_position[np.asarray(e.inv_perm)] = counts
  assert np.all(np.diff(by_position) <= 0)
  # every row offset fits its byte (0.97: sparse rows force chunks to close early)
  rows = np.asarray(e.base)[:, None, :] + ((np.asarray(e.data[:, 0]) >> 24) & 0xFF)
  assert rows.max() < shape[0]


def test_ell_chunk_sizes():
  assert [F.ell_chunk(d) for d in (0.5, 0.3, 0.2, 0.1, 0.02)] == [64, 32, 32, 16, 16]


@pytest.mark.parametrize("pattern,pack", [("2:4", None), ("2:4", False), ("1:4", None),
                                          ("2:8", None)])
def test_nm_round_trip_exact(pattern, pack, key):
  w = jax.random.normal(key, (96, 40), jnp.float32)
  w = jnp.where(nm_mask(jnp.abs(w), pattern), w, 0)
  c = F.compress_nm(w, pattern, pack_meta=pack, meta_block=16)
  n, m = F.parse_nm(pattern)
  g = 96 // m
  packed = pattern != "2:8" and pack is None  # 2:8 needs 6 bits: one byte a group
  assert c.meta_block == (16 if packed else 0) and c.meta.dtype == jnp.uint8
  if packed:  # groups padded to whole runs of 2 * 16, half a byte each
    gp = -(-g // 32) * 32
    assert c.values.shape == (n, gp, 40) and c.meta.shape == (gp // 2, 40)
  else:
    assert c.values.shape == (n, g, 40) and c.meta.shape == (g, 40)
  np.testing.assert_array_equal(np.asarray(F.decompress(c)), np.asarray(w))


def test_nm_words_layout_round_trip(key):
  w = jax.random.normal(key, (100, 40), jnp.float32)
  w = jnp.where(nm_mask(jnp.abs(w), "2:4"), w, 0).at[:4, 0].set(0.0).astype(jnp.bfloat16)
  c = F.compress_nm(w, "2:4", words=True)
  assert c.words and c.dtype == jnp.bfloat16 and c.meta.dtype == jnp.uint32
  assert c.values.shape == (4, 8, 40) and c.meta.shape == (4, 40)  # 25 groups -> 32
  np.testing.assert_array_equal(np.asarray(F.decompress(c), np.float32),
                                np.asarray(w, np.float32))
  # group 8 r + p: slot offsets in bits 4p..4p+3 of meta[r], values halves of values[r, p]
  planes = F.compress_nm(w, "2:4", pack_meta=False)
  np.testing.assert_array_equal(np.asarray(c.group_meta())[:25], np.asarray(planes.meta))
  with pytest.raises(ValueError, match="words=True is the 2:4 layout, got 1:4"):
    F.compress_nm(jnp.zeros((32, 8)), "1:4", words=True)


def test_nm_group_with_fewer_nonzeros(key):
  w = jax.random.normal(key, (8, 4), jnp.float32)
  w = jnp.where(nm_mask(jnp.abs(w), "2:4"), w, 0).at[:4, 0].set(0.0)  # an all-zero group
  np.testing.assert_array_equal(np.asarray(F.decompress(F.compress_nm(w, "2:4"))), np.asarray(w))


@pytest.mark.parametrize("block", [(16, 16), (32, 64)])
def test_bsr_round_trip_exact(block, key):
  bk, bn = block
  kb, nb = 4, 3
  kw, km = jax.random.split(key)
  keep = np.array(jax.random.uniform(km, (kb, nb)) < 0.5)
  keep[:, 0] = False  # an empty block column
  w = jax.random.normal(kw, (kb * bk, nb * bn)) * np.kron(keep, np.ones(block))
  b = F.compress_bsr(w, block=block)
  assert b.num_blocks == keep.sum()
  np.testing.assert_array_equal(np.asarray(F.decompress(b)), np.asarray(w))
  assert int(b.t_counts.sum()) == b.num_blocks


def test_bsr_from_block_mask_keeps_zero_blocks(key):
  w = jax.random.normal(key, (32, 32))
  mask = np.array([[True, False], [True, True]])
  b = F.bsr_from_block_mask(w, mask, block=(16, 16))
  assert b.num_blocks == 3
  np.testing.assert_array_equal(np.asarray(F.decompress(b)),
                                np.asarray(w) * np.kron(mask, np.ones((16, 16))))


def test_sparsify_dense_fallback(key):
  w = _sparse(key, (64, 64), 0.3)
  assert F.sparsify(w, fmt="tiled", min_sparsity=0.5) is w
  assert F.sparsify(w, fmt="tiled") is w  # 0.5 is the named formats' default break-even
  assert isinstance(F.sparsify(_sparse(key, (64, 64), 0.8), fmt="tiled", min_sparsity=0.5),
                    F.TiledSparse)
  assert isinstance(F.sparsify(_sparse(key, (64, 64), 0.8), fmt="ell"), F.EllSparse)


@pytest.mark.parametrize("sparsity,rows,expect", [
    (0.8, 1, "ell"), (0.6, 1, "ell"), (0.5, 1, "dense"), (0.6, 2, "ell"),
    (0.8, 3, "dense"), (0.9, 4, "ell"), (0.9, 5, "dense"), (0.95, 16, "dense")])
def test_sparsify_auto_follows_the_measured_break_even(key, sparsity, rows, expect):
  w = _sparse(key, (128, 96), sparsity)
  actual = 1.0 - np.count_nonzero(np.asarray(w)) / w.size
  assert F.auto_format(actual, rows) == expect
  out = F.sparsify(w, rows=rows)  # fmt="auto" is the default
  if expect == "dense":
    assert out is w
  else:
    assert isinstance(out, F.EllSparse)
    np.testing.assert_array_equal(np.asarray(F.decompress(out), np.float32),
                                  np.asarray(w.astype(jnp.bfloat16), np.float32))


def test_sparsify_auto_min_sparsity_overrides_the_table(key):
  w = _sparse(key, (64, 64), 0.8)
  assert F.sparsify(w, rows=16) is w  # dense wins at m = 16
  assert isinstance(F.sparsify(w, rows=16, min_sparsity=0.7), F.EllSparse)
  assert F.sparsify(w, min_sparsity=0.9) is w


def test_format_errors(key):
  w = jax.random.normal(key, (30, 32))
  with pytest.raises(ValueError, match="must be divisible by M = 4"):
    F.compress_nm(w[:, :], "2:4")
  with pytest.raises(ValueError, match="not 2:4 sparse along K"):
    F.compress_nm(jax.random.normal(key, (32, 8)), "2:4")
  with pytest.raises(ValueError, match="N:M pattern must be one of"):
    F.compress_nm(jax.random.normal(key, (32, 8)), "3:4")
  with pytest.raises(ValueError, match="2:8 needs 6 metadata bits a group"):
    F.compress_nm(jnp.zeros((32, 8)), "2:8", pack_meta=True)
  with pytest.raises(ValueError, match="must look like '2:4'"):
    F.parse_nm("two:four")
  with pytest.raises(ValueError, match="tile_k must be a power of two >= 32, got 16"):
    F.compress(w, tile=(16, 32))
  with pytest.raises(ValueError, match="tile_n must be a power of two >= 32, got 48"):
    F.compress(w, tile=(32, 48))
  with pytest.raises(ValueError, match="block_n must be a multiple of 32, got 48"):
    F.compress_ell(w, block_n=48)
  with pytest.raises(ValueError, match="chunk must be 16, 32 or 64, got 8"):
    F.compress_ell(w, chunk=8)
  with pytest.raises(ValueError, match="stored as bfloat16, got dtype=float32"):
    F.sparsify(w, fmt="ell", min_sparsity=0.0, dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"w must be 2-D \[K, N\], got shape \(2, 3, 4\)"):
    F.compress(jnp.ones((2, 3, 4)))
  with pytest.raises(TypeError, match="w must be a float array"):
    F.compress(jnp.ones((32, 32), jnp.int32))
  with pytest.raises(TypeError, match="outside jit"):
    jax.jit(F.compress)(w)
  with pytest.raises(ValueError, match="block_k must be one of"):
    F.compress_bsr(jnp.ones((24, 32)), block=(24, 32))
  with pytest.raises(ValueError, match="must be divisible by the block"):
    F.compress_bsr(jnp.ones((40, 32)), block=(32, 32))
  with pytest.raises(TypeError, match="decompress: w must be TiledSparse, EllSparse"):
    F.decompress(w)
  with pytest.raises(ValueError, match="sparsify: fmt must be 'auto' or one of"):
    F.sparsify(w, fmt="csr")
  with pytest.raises(ValueError, match="sparsify: rows must be a positive int, got 0"):
    F.sparsify(w, rows=0)
  with pytest.raises(ValueError, match=r"sparsify: min_sparsity must be in \[0, 1\], got 1.5"):
    F.sparsify(w, min_sparsity=1.5)
  with pytest.raises(ValueError, match=r"auto_format: sparsity must be in \[0, 1\]"):
    F.auto_format(-0.1, 1)
