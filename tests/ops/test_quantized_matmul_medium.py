"""Medium-m weight-only kernel (kernels_pallas.matmul.mosaic_gpu_medium) vs dequantize-then-dot.

Interpret mode on CPU (small K / N, odd m, int4 group 128 and int8 per channel and per
group, every config knob), lowering for an abstract H100 (builds the Mosaic GPU module,
register wgmma operands included), bad inputs, and real sizes under the ``gpu`` marker.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.matmul import mosaic_gpu_medium as mm
from tests.helpers import assert_close


def _operands(key, m, k, n, bits, group):
  kx, kw, ks = jax.random.split(key, 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  lim = 8 if bits == 4 else 128
  q = jax.random.randint(kw, (n, k), -lim, lim).astype(jnp.int4 if bits == 4 else jnp.int8)
  groups = 1 if group is None else k // group
  s = jax.random.uniform(ks, (n, groups), jnp.float32, 0.5, 2.0) / lim
  return x, q, s


def _expected(x, q, s):
  """float32 product of x and the dequantized weight (scales repeated over their groups)."""
  k = q.shape[1]
  w = q.astype(jnp.float32) * jnp.repeat(s, k // s.shape[1], axis=1)
  return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)


CASES = [
    # (m, k, n, bits, group, config)
    (33, 256, 128, 4, 128, mm.MediumConfig(block_m=40, split_k=1, num_stages=2)),
    (100, 512, 128, 4, 128, mm.MediumConfig(block_m=104, split_k=2, num_stages=1,
                                            pipeline_upcast=False)),
    (128, 384, 256, 4, 128, mm.MediumConfig(block_m=128, split_k=1, num_stages=2,
                                            wg_rows=128)),
    (200, 256, 256, 8, None, mm.MediumConfig(block_m=104, split_k=2, num_stages=2,
                                             wg_rows=128, pipeline_upcast=False)),
    (65, 256, 128, 8, 128, mm.MediumConfig(block_m=72, split_k=1, num_stages=2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c[:5]) + ("pipe" if c[5].pipeline_upcast
                                                                     else "serial"))
def test_medium_kernel_interpret(case, key):
  m, k, n, bits, group, cfg = case
  x, q, s = _operands(key, m, k, n, bits, group)
  out = mm.weight_only_matmul_medium(x, q, s, group_size=group, config=cfg, interpret=True)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert_close(out, _expected(x, q, s), rtol=1.5e-2)


def test_medium_config_heuristic():
  # K = N = 8192, m = 128: 64 tiles of 128 weight rows, split 2 -> 128 CTAs on 132 SMs.
  cfg = mm.medium_config(128, 8192, 8192, bits=4, group_size=128)
  assert (cfg.block_m, cfg.split_k, cfg.wg_rows) == (128, 2, 64)
  assert mm.smem_bytes(cfg, 4) <= mm.SMEM_BUDGET_BYTES
  cfg = mm.medium_config(256, 8192, 8192, bits=8, wg_rows=128)  # 2 x 32 tiles -> split 2
  assert (cfg.block_m, cfg.split_k) == (128, 2) and mm.smem_bytes(cfg, 8) <= mm.SMEM_BUDGET_BYTES
  assert mm.medium_config(200, 4096, 4096, bits=4).block_m == 104  # two x tiles of 104
  assert mm.medium_config(64, 14336, 4096, bits=4).split_k == 1  # 112 tiles fill the GPU
  cfg = mm.medium_config(128, 8192, 8192, bits=4, cluster_n=2)  # 32 pairs of CTAs, split 2
  assert cfg.split_k == 2 and mm.tile_multiples(cfg, 128) == (256, 256)


def test_medium_bad_inputs(key):
  x, q, s = _operands(key, 40, 256, 128, 4, 128)
  with pytest.raises(ValueError, match="not a multiple of"):
    mm.weight_only_matmul_medium(x, q[:100], s[:100], group_size=128,
                                 config=mm.MediumConfig(split_k=1), interpret=True)
  with pytest.raises(ValueError, match="scales must be"):
    mm.weight_only_matmul_medium(x, q, s[:, :1], group_size=128,
                                 config=mm.MediumConfig(split_k=1), interpret=True)
  with pytest.raises(ValueError, match="m=300 > 256"):
    mm.weight_only_matmul_medium(jnp.ones((300, 256), jnp.bfloat16), q, s, group_size=128,
                                 interpret=True)
  with pytest.raises(ValueError, match="group_size=64 is not a multiple"):
    mm.weight_only_matmul_medium(x, q, jnp.ones((128, 4)), group_size=64,
                                 config=mm.MediumConfig(split_k=1), interpret=True)
  with pytest.raises(TypeError, match="x must be bfloat16"):
    mm.weight_only_matmul_medium(x.astype(jnp.float32), q, s, group_size=128, interpret=True)
  with pytest.raises(TypeError, match="w_t must be int8 or int4"):
    mm.weight_only_matmul_medium(x, q.astype(jnp.int32), s, group_size=128, interpret=True)
  with pytest.raises(ValueError, match="wg_rows must be 64 or 128"):
    mm.MediumConfig(wg_rows=96)
  with pytest.raises(ValueError, match="block_m must be a multiple of 8"):
    mm.MediumConfig(block_m=132)
  with pytest.raises(ValueError, match="cluster_n must be 1 or 2"):
    mm.MediumConfig(cluster_n=4)
  with pytest.raises(ValueError, match="block_m must be a multiple of 16 with cluster_n=2"):
    mm.MediumConfig(block_m=40, cluster_n=2)
  assert mm.medium_config(33, 4096, 4096, bits=4, cluster_n=2).block_m == 48


@pytest.mark.parametrize("variant", ["int4_pipe_wg64", "int4_serial_wg128", "int8_pipe_wg128",
                                     "int8_channel", "int4_pipe_wg64_cluster2",
                                     "int4_pipe_wg64_cluster2_m33", "int8_channel_cluster2_m40",
                                     "int4_serial_wg64_cluster2_m200"])
def test_medium_lowers_for_cuda(variant):
  # Interpret mode never builds the Mosaic GPU module (and takes the A operand from shared
  # memory); lowering for an abstract H100 does: register wgmma operands, upcast layouts,
  # TMA boxes, shared-memory budget.
  # The cluster-2 cases with x rows that are not a multiple of 16 (m = 33, 40, 200) failed
  # here as on the H100 before block_m and the x pad followed the multicast's 16 rows.
  sds = jax.ShapeDtypeStruct
  k, n = 8192, 8192
  m = int(variant.rsplit("_m", 1)[1]) if "_m" in variant else 128
  bits = 4 if variant.startswith("int4") else 8
  group = None if "channel" in variant else 128
  cfg = mm.medium_config(m, n, k, bits=bits, group_size=group,
                         wg_rows=128 if "wg128" in variant else 64,
                         pipeline_upcast="serial" not in variant,
                         cluster_n=2 if "cluster2" in variant else 1)
  fn = lambda x, v, s: mm.weight_only_matmul_medium(x, v, s, group_size=group, config=cfg)
  args = (sds((m, k), jnp.bfloat16), sds((n, k), jnp.int4 if bits == 4 else jnp.int8),
          sds((n, 1 if group is None else k // group), jnp.float32))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=device)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [33, 128, 256])
@pytest.mark.parametrize("bits,group", [(4, 128), (8, None)])
@pytest.mark.parametrize("wg_rows,cluster_n", [(64, 1), (128, 1), (64, 2)])
def test_medium_kernel_gpu(m, bits, group, wg_rows, cluster_n, key):
  k, n = 4096, 2048
  x, q, s = _operands(key, m, k, n, bits, group)
  cfg = mm.medium_config(m, n, k, bits=bits, group_size=group, wg_rows=wg_rows,
                         cluster_n=cluster_n)
  out = jax.jit(lambda x, q, s: mm.weight_only_matmul_medium(x, q, s, group_size=group,
                                                             config=cfg))(x, q, s)
  assert_close(out, _expected(x, q, s), rtol=1.5e-2)
