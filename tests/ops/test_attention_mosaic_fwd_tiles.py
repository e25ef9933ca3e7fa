"""Head_dim-128 forward tilings that need the log-sum-exp stored from registers
(``Config.fwd_lse_direct``): a third K/V stage of 128 keys (``s3``) and 192-key tiles
(``kv192``), :data:`kernels_pallas.attention.mosaic_gpu.FWD_TILE_VARIANTS`.

Staging the 64 lse values of a warpgroup in shared memory costs 512 bytes plus alignment;
without them both tilings fit the H100's 227 KB (without segment ids), which the CUDA
cross-lowering here checks (it raises past the limit). Interpret mode checks the output and
the lse (``-inf`` exactly on rows with nothing to attend) against the reference; the
``gpu`` test runs the same at real sizes. None of these tilings is a default yet.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.attention import mosaic_gpu
from tests.ops.test_attention_mosaic_fwd_pipeline import _check_against_reference, _inputs

VARIANTS = mosaic_gpu.FWD_TILE_VARIANTS


def _forward(q, k, v, ids, cfg, *, is_causal, interpret, window=None):
  qs, ks = ids if ids is not None else (None, None)
  return mosaic_gpu.forward(q, k, v, qs, ks, is_causal=is_causal, window=window,
                            scale=q.shape[-1] ** -0.5, config=cfg, interpret=interpret)


def test_tile_variants_are_not_defaults():
  for d in (64, 128, 256):
    for causal in (False, True):
      assert not mosaic_gpu.default_config(d, causal).fwd_lse_direct
  assert all(cfg.fwd_lse_direct for cfg in VARIANTS.values())
  assert VARIANTS["s3"].num_stages == 3 and VARIANTS["kv192"].block_kv == 192


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("case", [
    # (causal, q_len, kv_len, heads, kv_heads, segments, window): several key blocks with a
    # padded tail, GQA 2; causal with q_len < kv_len (end-aligned); segment ids with rows
    # that see nothing (lse -inf, output 0)
    (False, 200, 450, 4, 2, False, None),
    (True, 150, 500, 2, 1, False, None),
    (False, 130, 400, 2, 2, True, (60, 0)),
], ids=["full_gqa", "causal_cross", "segments_window"])
def test_tile_variant_interpret(name, case, key):
  causal, t, s, n, kh, seg, window = case
  q, k, v, ids = _inputs(key, 1, t, s, n, kh, 128, seg)
  out, lse = _forward(q, k, v, ids, VARIANTS[name], is_causal=causal, interpret=True,
                      window=window)
  _check_against_reference(q, k, v, ids, out, lse, is_causal=causal, window=window)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tile_variant_fits_shared_memory_on_h100(name):
  sds = jax.ShapeDtypeStruct
  q, k = sds((4, 4096, 16, 128), jnp.bfloat16), sds((4, 4096, 8, 128), jnp.bfloat16)
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  for causal in (False, True):
    fn = lambda q, k, v, c=causal: _forward(q, k, v, None, VARIANTS[name], is_causal=c,
                                            interpret=False)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=device)):
      text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
  if name != "lse_direct":  # the same tiling with the lse staged does not fit
    staged = dataclasses.replace(VARIANTS[name], fwd_lse_direct=False)
    fn = lambda q, k, v: _forward(q, k, v, None, staged, is_causal=False, interpret=False)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
      with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                    abstract_device=device)):
        jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
def test_tile_variant_gpu(name, causal, key):
  q, k, v, _ = _inputs(key, 2, 1500, 2100, 8, 2, 128)
  out, lse = jax.jit(lambda q, k, v: _forward(q, k, v, None, VARIANTS[name], is_causal=causal,
                                              interpret=False))(q, k, v)
  _check_against_reference(q, k, v, None, out, lse, is_causal=causal)
