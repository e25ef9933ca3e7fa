"""Flash attention forward and backward for NVIDIA Hopper in Pallas Mosaic GPU.

Algorithm: FlashAttention-2 (Dao, 2023): tiled exact attention with an online softmax in
the log2 domain, a per-row log-sum-exp residual, parallel over query tiles forward and
over key tiles backward. Hopper techniques from FlashAttention-3 (Shah et al., 2024):

* warp specialisation: every CTA runs two *compute* warpgroups and one *memory*
  warpgroup; the memory warpgroup streams K/V tiles (forward) or Q/dO/lse/delta tiles
  (backward) with TMA into a ``num_stages``-deep shared-memory ring guarded by
  "loaded"/"consumed" mbarriers, and gives its registers to the compute warpgroups
  (``setmaxnreg``);
* every matmul is a ``wgmma``; the softmax probabilities feed the second matmul straight
  from registers;
* ping-pong (round-robin) scheduling: per-warpgroup barriers make the compute
  warpgroups take turns issuing their matmuls, so one warpgroup's softmax overlaps the
  others' tensor-core work (two warpgroups; three for head_dim 64, as FlashAttention-3);
* optionally (``Config.fwd_pipeline_softmax``, forward) intra-warpgroup pipelining
  (FlashAttention-3, Algorithm 2): a warpgroup issues the next block's ``Q K^T`` together
  with the current ``P V`` and runs the next softmax while ``P V`` is on the tensor cores;
* block sparsity (``common.BlockSparsity``): each CTA visits only the key (query) blocks
  that hold an allowed entry, unmasked ("full") blocks first with no elementwise mask,
  then the partial ones with the mask computed from positions and segment ids.

Backward: one kernel per key tile computes dK and dV in registers and the dQ
contribution ``dS K`` of every visited query block; the two warpgroups share ``dS`` via
shared memory, each computes half of dQ's columns, and adds it into a float32 dQ
accumulator in HBM with a TMA reduce-add (``cp.reduce.async.bulk``), so the backward does
the five matmuls of the algorithm and no more. ``Config.bwd_dq_deferred`` leaves each
step's dQ matmul in flight into the next step (its result is staged and reduce-added
there), so the tensor cores do not drain between steps. ``Config.bwd_dq_writer`` hands the
reduce-adds to the memory warpgroup (FlashAttention-3's dQ writer): the compute warpgroups
only stage their dQ half in shared memory. ``deterministic=True`` instead computes dQ
in a second kernel parallel over query tiles (two more matmuls, bitwise reproducible);
interpret mode always uses that path because TMA reductions cannot be interpreted.

GQA: forward CTAs of the query heads of one key/value head read the same K/V tiles (L2
reuse); the backward CTA of a key tile loops over every query head of its group, so
dK/dV are summed in registers and K/V are never repeated in memory.

Inputs are padded by the callers in this module to whole tiles; the padded key tail is
masked and padded query rows are dropped. Layout: ``[batch, seq, heads, head_dim]``.
Interpret mode (``interpret=True``, CPU) routes the probabilities through shared memory
and keeps the accumulators in scoped refs, the only forms Mosaic GPU's interpreter runs;
everything else (pipelines, barriers, block lists, masks) is the code that runs on GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.attention import common

_SWIZZLE = 128  # bytes; the rows of every 16-bit tile are >= 64 elements wide


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes. Forward: a CTA owns ``compute_wgs * block_q`` query rows (one ``block_q``
  slab per compute warpgroup) and streams ``block_kv`` keys per step. Backward: a CTA owns
  ``2 * bwd_block_kv`` keys and streams ``bwd_block_q`` queries per step.
  ``bwd_kv_in_registers`` keeps each backward warpgroup's K and V rows in registers, so
  ``S^T = K Q^T`` and ``dP^T = V dO^T`` read only one operand from shared memory (fits the
  register budget at head_dim 64 only). ``bwd_dq_alternate``: the two backward warpgroups
  take turns computing a step's whole ``dQ = dS K`` (N = head_dim) instead of half of
  its columns each (N = head_dim / 2), and only the one whose turn it is waits for the
  other's half of ``dS``. ``bwd_dq_deferred`` (split dQ only; ignored with
  ``bwd_dq_alternate``): a step's ``dQ = dS K`` stays in flight on the tensor cores while
  the warpgroup starts the next step's ``S^T``/``dP^T``; it is read out of registers,
  staged and reduce-added into HBM under the next step's scores, so no step ends by
  draining the tensor cores. ``bwd_dq_store_before_dp`` (deferred only): issue ``S^T``,
  stage the previous dQ, then issue ``dP^T`` (dQ, S^T and dP^T accumulators are never
  live together: 192 instead of 224 accumulator registers a thread at head_dim 128);
  False issues both and stages dQ under ``dP^T``. ``bwd_dq_writer`` (split dQ only;
  ignored with ``bwd_dq_alternate``; with or without ``bwd_dq_deferred``): the compute
  warpgroups stage their dQ half in shared memory and signal it on an mbarrier; the memory
  warpgroup issues the TMA reduce-adds into HBM and releases the staging buffers once the
  copies have read them (FlashAttention-3's dQ writer), so a compute warpgroup never
  issues or waits on a bulk copy inside the loop. ``fwd_pipeline_softmax`` (forward): each
  compute warpgroup also pipelines inside itself (FlashAttention-3, Algorithm 2): it issues
  ``S_{i} = Q K_i^T`` and ``O += P_{i-1} V_{i-1}`` together, waits only for ``S_i`` and
  runs its softmax while ``P_{i-1} V_{i-1}`` is on the tensor cores; one more score block
  and the previous ``P`` stay live, so ``block_kv`` must fit the register budget
  (:func:`fwd_pipeline_registers`). ``fwd_lse_direct`` (forward): each warpgroup stores
  its 64 log-sum-exp values from registers straight into HBM instead of staging them in
  shared memory for a TMA copy; the 512 bytes (and their alignment) it frees let a third
  K/V stage or 192-key tiles fit the 227 KB at head_dim 128 (:data:`FWD_TILE_VARIANTS`)."""

  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  compute_wgs: int = 2
  bwd_block_q: int = 64
  bwd_block_kv: int = 64
  bwd_num_stages: int = 2
  compute_registers: int = 232
  memory_registers: int = 40
  bwd_compute_registers: int = 240
  bwd_memory_registers: int = 24
  bwd_kv_in_registers: bool = False
  bwd_dq_alternate: bool = False
  bwd_dq_deferred: bool = False
  bwd_dq_store_before_dp: bool = True
  bwd_dq_writer: bool = False
  fwd_pipeline_softmax: bool = False
  fwd_lse_direct: bool = False

  @property
  def fwd_q_tile(self) -> int:
    return self.compute_wgs * self.block_q

  @property
  def bwd_kv_tile(self) -> int:
    return 2 * self.bwd_block_kv


def default_config(head_dim: int, is_causal: bool = False) -> Config:
  """Tile sizes by head_dim (shared memory: Q 2 x 64 x d, K/V 2 stages x block_kv x d).

  head_dim 64 without a causal mask streams 256 keys per step (measured on H100 at seq
  4096: 436 vs 413 TFLOP/s with 128; with a causal mask 128 is as fast and masks less).
  Backward: 240/24 registers a thread (compute/memory warpgroups; fwd+bwd +6% at
  head_dim 128 on H100, seq 4096) and, at head_dim 64, K/V kept in registers (+4%) and
  the two warpgroups taking turns on a whole-width dQ (``bwd_dq_alternate``: fwd+bwd 450
  vs 399 TFLOP/s at seq 4096, non-causal; at head_dim 128 it lost 2-8%, so off there;
  notes/attention.md).
  """
  if head_dim > 128:
    return Config(block_kv=64)
  if head_dim <= 64:
    return Config(block_kv=128 if is_causal else 256, bwd_kv_in_registers=True,
                  bwd_dq_alternate=True)
  return Config()


def fwd_pipeline_registers(head_dim: int, block_kv: int) -> int:
  """Registers a thread that the pipelined forward step (``fwd_pipeline_softmax``) keeps
  live at its peak, the softmax of ``S_i`` while ``P_{i-1} V_{i-1}`` runs: the output
  accumulator (64 x head_dim float32 over 128 threads), ``S_i`` (64 x block_kv float32),
  ``P_{i-1}`` and ``P_i`` (bf16), plus 32 for row statistics, indices and addresses."""
  return head_dim // 2 + block_kv // 2 + 2 * (block_kv // 4) + 32


def fwd_pipeline_config(head_dim: int, is_causal: bool = False) -> Config:
  """:func:`default_config` with the intra-warpgroup pipelined forward; key tiles of at
  most 128 (two 256-key score blocks do not fit the registers at head_dim 64)."""
  cfg = default_config(head_dim, is_causal)
  return dataclasses.replace(cfg, fwd_pipeline_softmax=True, block_kv=min(cfg.block_kv, 128))


def _check_fwd_pipeline(cfg: Config, head_dim: int) -> None:
  need = fwd_pipeline_registers(head_dim, cfg.block_kv)
  if need > cfg.compute_registers:
    raise ValueError(
        f"fwd_pipeline_softmax: head_dim {head_dim} with block_kv {cfg.block_kv} keeps about "
        f"{need} registers a thread live (two score blocks, the output accumulator, two "
        f"probability blocks), more than compute_registers={cfg.compute_registers} (with "
        f"compute_wgs={cfg.compute_wgs}); use a smaller block_kv (e.g. 128, or 64 with three "
        f"compute warpgroups) or leave fwd_pipeline_softmax off")


# Candidate head_dim-128 forward tilings (not defaults; experiments/attention_fwd_dev.py
# times them): with the log-sum-exp stored from registers, a third K/V stage of 128 keys
# (smem 232576 -> ~232064 bytes of 232448) or 192-key tiles (FlashAttention-3 uses 176
# at head_dim 128; 176 does not tile for interpret mode) fit shared memory.
FWD_TILE_VARIANTS = {
    "lse_direct": Config(fwd_lse_direct=True),
    "s3": Config(num_stages=3, fwd_lse_direct=True),
    "kv192": Config(block_kv=192, fwd_lse_direct=True),
    # 64 x 192 float32 scores (96 registers a thread) + bf16 P (48) + the output (64):
    # at the edge of 232; 240/24 for the compute/memory warpgroups leaves a little more.
    "kv192_r240": Config(block_kv=192, fwd_lse_direct=True, compute_registers=240,
                         memory_registers=24),
}


# Three compute warpgroups (192 query rows a CTA) for head_dim 64, as FlashAttention-3;
# 3 x 160 + 24 registers a thread fill the register file.
THREE_WG = Config(compute_wgs=3, block_kv=128, compute_registers=160, memory_registers=24)


SUPPORTED_HEAD_DIMS = (64, 128, 256)
BWD_HEAD_DIMS = (64, 128)


def _tiled(shape, dtype, swizzle: int = _SWIZZLE):
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(swizzle)))


def _when(pred, fn):
  """``pl.when`` that also takes a static Python bool (dense layouts have static counts)."""
  if isinstance(pred, (bool, np.bool_)):
    if pred:
      fn()
    return
  pl.when(pred)(fn)


def _max(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return max(a, b)
  return jnp.maximum(a, b)


def _schedule(barrier):
  """A rendezvous of the two backward compute warpgroups."""
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


# ----------------------------------------------------------------------------- forward


def _fwd_call(q, k, v, q_seg, kv_seg, sparsity: common.BlockSparsity, *,
              mask: common.MaskSpec, scale: float, soft_cap: float | None, cfg: Config,
              interpret: bool):
  """Padded forward: q [b, tp, n, d], k/v [b, sp, kh, d] -> (o [b, tp, n, d], lse [b, n, tp])."""
  b_sz, tp, n_heads, d = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq, bkv, stages, cw = cfg.block_q, cfg.block_kv, cfg.num_stages, cfg.compute_wgs
  n_qt, n_kv = tp // cfg.fwd_q_tile, sp // bkv
  dtype = q.dtype
  has_seg = q_seg is not None
  dense = sparsity.dense
  batched_lists = (not dense) and sparsity.indices.shape[0] != 1
  reverse_tiles = mask.is_causal  # heaviest query tiles first
  pipeline = cfg.fwd_pipeline_softmax
  if pipeline:
    _check_fwd_pipeline(cfg, d)
  layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  if soft_cap is None:
    c_exp = scale * common.LOG2E  # logits in log2 units are qk * c_exp (an FMA below)
  inputs = [q, k, v]
  if has_seg:
    inputs += [q_seg, kv_seg]
  if not dense:
    inputs += [jnp.asarray(sparsity.indices), jnp.asarray(sparsity.counts)]

  def kernel(*refs):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
    idx_ref, cnt_ref = (next(it), next(it)) if not dense else (None, None)
    out_ref, lse_ref, s = next(it), next(it), next(it)

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    qt = lax.axis_index("q_tiles")
    if reverse_tiles:
      qt = n_qt - 1 - qt
    lb = b if batched_lists else 0
    if dense:
      n_full = n_total = n_kv
    else:
      n_full = cnt_ref[lb, qt, 0]
      n_total = cnt_ref[lb, qt, 1]

    def kv_block(i):
      return i if dense else idx_ref[lb, qt, i]

    @pl.when(wg < cw)
    def _compute():
      plgpu.set_max_registers(cfg.compute_registers, action="increase")
      row0 = qt * cfg.fwd_q_tile + wg * bq
      # Round-robin tensor-core schedule (ping-pong for two warpgroups): warpgroup ``w``
      # issues its next ``P V`` and ``Q K^T`` only after warpgroup ``w - 1`` issued
      # theirs, so each warpgroup's softmax runs while the others' matmuls do.
      my_turn = s["sched"].at[wg]
      next_turn = s["sched"].at[lax.rem(wg + 1, cw)]
      q_smem = s["qo"].at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, s["q_bar"].at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(row0, bq)], s["qseg"].at[wg],
                                s["qseg_bar"].at[wg])
        plgpu.barrier_wait(s["qseg_bar"].at[wg])
        q_seg_row = plgpu.load(s["qseg"].at[wg], layout=row_layout)
      plgpu.barrier_wait(s["q_bar"].at[wg])

      m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
      l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), layout)

      _when(n_total > 0, lambda: plgpu.barrier_wait(s["k_bar"].at[0]))

      pl.when(wg == 0)(lambda: plgpu.barrier_arrive(s["sched"].at[0]))
      plgpu.barrier_wait(my_turn)

      def probs(qk, i, slot, m_i, *, masked: bool):
        """Online softmax of one score block in the log2 domain: ``(p, m_new, alpha)``
        with ``p = exp2(logits - m_new)`` (float32) and ``alpha = exp2(m_i - m_new)``, the
        factor that rescales what was accumulated with the old maximum."""
        if soft_cap is None:
          logits = qk  # log2-domain logits are logits * c_exp
        else:
          logits = jnp.tanh(qk * (scale / soft_cap)) * (soft_cap * common.LOG2E)
        if masked:
          q_pos = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=layout) + row0
          kv_pos = (plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=layout)
                    + kv_block(i) * bkv)
          qs = ks = None
          if has_seg:
            ks = lax.broadcast_in_dim(
                plgpu.load(s["kvseg"].at[slot], layout=col_layout), (bq, bkv), [1])
            qs = lax.broadcast_in_dim(q_seg_row, (bq, bkv), [0])
          ok = common.allowed(mask, q_pos, kv_pos, qs, ks)
          logits = jnp.where(ok, logits, -jnp.inf)
        if soft_cap is None:
          m_new = jnp.maximum(m_i, logits.max(axis=1) * c_exp)
        else:
          m_new = jnp.maximum(m_i, logits.max(axis=1))
        # Rows with nothing allowed so far keep m = -inf; exponentiate against 0 then.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m_i - m_use)
        m_b = lax.broadcast_in_dim(m_use, (bq, bkv), [0])
        if soft_cap is None:
          p = jnp.exp2(logits * c_exp - m_b)
        else:
          p = jnp.exp2(logits - m_b)
        return p, m_new, alpha

      def finish(acc, m_i, l_i):
        """out = acc / l and lse (natural log) through shared memory into HBM."""
        empty = l_i == 0.0
        l_safe = jnp.where(empty, 1.0, l_i)
        out = acc * lax.broadcast_in_dim(1.0 / l_safe, (bq, d), [0])
        q_smem[...] = out.astype(dtype)
        lse = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * common.LN2)
        if cfg.fwd_lse_direct:
          lse_ref.at[b, h, pl.ds(row0, bq)][...] = lse  # registers -> HBM, no staging
        else:
          s["lse"].at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(row0, bq), h],
                                commit_group=False)
        if not cfg.fwd_lse_direct:
          plgpu.copy_smem_to_gmem(s["lse"].at[wg], lse_ref.at[b, h, pl.ds(row0, bq)],
                                  commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

      def step(i, carry, *, masked: bool):
        acc, m_i, l_i = carry
        slot = lax.rem(i, stages)
        if has_seg:
          plgpu.barrier_wait(s["seg_bar"].at[slot])

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, s["k"].at[slot].transpose((1, 0)))
          plgpu.barrier_arrive(next_turn)
          return acc_ref[...]

        qk = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(s["k_cons"].at[slot])
        p, m_new, alpha = probs(qk, i, slot, m_i, masked=masked)
        acc = acc * lax.broadcast_in_dim(alpha, (bq, d), [0])
        l_i = l_i * alpha
        p16 = p.astype(dtype)
        l_i = l_i + p.sum(axis=1)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_wait(s["v_bar"].at[slot])
        plgpu.barrier_wait(my_turn)  # the other warpgroups' matmuls are issued

        def wait_next_k():
          nxt = i + 1

          @pl.when(nxt < n_total)
          def _():
            plgpu.barrier_wait(s["k_bar"].at[lax.rem(nxt, stages)])

        if interpret:
          s["p"].at[wg][...] = p16
          plgpu.commit_smem()

          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, s["p"].at[wg], s["v"].at[slot])
            wait_next_k()
            return acc_ref[...]

          acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((bq, d), jnp.float32))
        else:
          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, s["v"].at[slot])
            wait_next_k()

          acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(s["v_cons"].at[slot])
        return acc, m_new, l_i

      if pipeline:
        # Intra-warpgroup pipeline (FlashAttention-3, Algorithm 2). Invariant at the end of
        # iteration i: ``o`` holds sum_{j < i} P_j V_j at the scale of m_i (the running
        # maximum including block i), ``p_prev`` holds P_i (bf16, not yet multiplied by
        # V_i), K_i is released and V_i is not. In its turn iteration i issues
        # S_i = Q K_i^T and then O += P_{i-1} V_{i-1}, waits only for S_i, runs the
        # softmax of S_i while P_{i-1} V_{i-1} is on the tensor cores, then waits for it
        # and rescales O.
        def scores(slot, issue_pv=None):
          """Issue S_i (and, through ``issue_pv``, the previous block's P V) in this
          warpgroup's turn; hand the turn on; return S_i once it is done."""
          def body(s_ref):
            plgpu.wgmma(s_ref, q_smem, s["k"].at[slot].transpose((1, 0)))
            if issue_pv is not None:
              issue_pv()
            plgpu.barrier_arrive(next_turn)
            if interpret or issue_pv is None:
              return s_ref[...]
            # Groups complete in order: one left in flight means S_i is done, P V may run.
            return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)

          return pl.run_scoped(body, plgpu.ACC((bq, bkv), jnp.float32))

        def pv_interpret(o, p16, slot):
          s["p"].at[wg][...] = p16
          plgpu.commit_smem()
          return o + pl.run_scoped(
              lambda r: (plgpu.wgmma(r, s["p"].at[wg], s["v"].at[slot]), r[...])[1],
              plgpu.ACC((bq, d), jnp.float32))

        def pipe_step(i, carry, *, masked: bool, o_ref):
          if interpret:
            p_prev, m_i, l_i, o = carry
          else:
            p_prev, m_i, l_i = carry
          slot, prev = lax.rem(i, stages), lax.rem(i - 1, stages)
          if has_seg:
            plgpu.barrier_wait(s["seg_bar"].at[slot])
          plgpu.barrier_wait(s["k_bar"].at[slot])
          plgpu.barrier_wait(s["v_bar"].at[prev])
          plgpu.barrier_wait(my_turn)  # the other warpgroups' matmuls are issued
          if interpret:  # same order: S_i, then P_{i-1} V_{i-1} (synchronous here)
            qk = scores(slot)
            o = pv_interpret(o, p_prev, prev)
          else:
            qk = scores(slot, lambda: plgpu.wgmma(o_ref, p_prev, s["v"].at[prev]))
          plgpu.barrier_arrive(s["k_cons"].at[slot])
          p, m_new, alpha = probs(qk, i, slot, m_i, masked=masked)
          l_i = l_i * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          if not interpret:
            l_i, m_new, p16 = lax.optimization_barrier((l_i, m_new, p16))
            o = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)  # P_{i-1} V_{i-1} done
          plgpu.barrier_arrive(s["v_cons"].at[prev])
          o = o * lax.broadcast_in_dim(alpha, (bq, d), [0])
          if interpret:
            return p16, m_new, l_i, o
          o_ref[...] = o
          return p16, m_new, l_i

        def pipelined(o_ref=None):
          # Prologue: S_0 (K_0 was waited above, the turn is held), masked whatever its
          # class (a full block only costs the mask arithmetic). O is still zero.
          if has_seg:
            plgpu.barrier_wait(s["seg_bar"].at[0])
          qk = scores(0)
          plgpu.barrier_arrive(s["k_cons"].at[0])
          p, m0, alpha = probs(qk, 0, 0, m_i, masked=True)
          carry = (p.astype(dtype), m0, l_i * alpha + p.sum(axis=1))
          if interpret:
            carry += (acc,)
          body = functools.partial(pipe_step, o_ref=o_ref)
          first_masked = _max(n_full, 1)
          carry = lax.fori_loop(1, first_masked, functools.partial(body, masked=False), carry)
          carry = lax.fori_loop(first_masked, n_total, functools.partial(body, masked=True),
                                carry)
          # Epilogue: P_{n-1} V_{n-1}.
          p_last, m_last, l_last = carry[:3]
          last = ((n_total - 1) % stages if isinstance(n_total, int)
                  else lax.rem(n_total - 1, stages))
          plgpu.barrier_wait(s["v_bar"].at[last])
          plgpu.barrier_wait(my_turn)
          if interpret:
            o = pv_interpret(carry[3], p_last, last)
            plgpu.barrier_arrive(next_turn)
          else:
            plgpu.wgmma(o_ref, p_last, s["v"].at[last])
            plgpu.barrier_arrive(next_turn)
            o = o_ref[...]
          plgpu.barrier_arrive(s["v_cons"].at[last])
          finish(o, m_last, l_last)

        if interpret:
          _when(n_total > 0, pipelined)
        else:
          _when(n_total > 0,
                lambda: (pl.run_state(pipelined)(plgpu.ACC.init(acc)), None)[1])

        def no_blocks():
          plgpu.barrier_arrive(next_turn)
          finish(acc, m_i, l_i)

        _when(n_total == 0, no_blocks)
        pl.when(wg == 0)(lambda: plgpu.barrier_wait(s["sched"].at[0]))  # balance the phases
        return

      carry = (acc, m_i, l_i)
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
      carry = lax.fori_loop(n_full, n_total, functools.partial(step, masked=True), carry)
      acc, m_i, l_i = carry
      plgpu.barrier_arrive(next_turn)
      pl.when(wg == 0)(lambda: plgpu.barrier_wait(s["sched"].at[0]))  # balance the phases
      finish(acc, m_i, l_i)

    @pl.when(wg == cw)
    def _memory():
      plgpu.set_max_registers(cfg.memory_registers, action="decrease")
      kv_head = lax.div(h, group)

      def issue(i, slot, wait):
        j = kv_block(i)
        rows = (b, pl.ds(j * bkv, bkv), kv_head)
        if wait:
          plgpu.barrier_wait(s["k_cons"].at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[rows], s["k"].at[slot], s["k_bar"].at[slot])
        if wait:
          plgpu.barrier_wait(s["v_cons"].at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], s["v"].at[slot], s["v_bar"].at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(j * bkv, bkv)], s["kvseg"].at[slot],
                                  s["seg_bar"].at[slot])

      for i in range(min(stages, n_kv)):
        _when(i < n_total, functools.partial(issue, i, i, False))

      @pl.loop(stages, _max(n_total, stages))
      def _(i):
        issue(i, lax.rem(i, stages), True)

      # Observe the last consumptions too, so every barrier phase is waited on.
      @pl.loop(_max(n_total - stages, 0), n_total)
      def _(i):
        plgpu.barrier_wait(s["k_cons"].at[lax.rem(i, stages)])
        plgpu.barrier_wait(s["v_cons"].at[lax.rem(i, stages)])

  scratch = {
      "qo": _tiled((cw, bq, d), dtype),
      "k": _tiled((stages, bkv, d), dtype),
      "v": _tiled((stages, bkv, d), dtype),
  }
  if not cfg.fwd_lse_direct:
    scratch["lse"] = plgpu.SMEM((cw, bq), jnp.float32)
  scratch.update({
      "q_bar": plgpu.Barrier(num_barriers=cw),
      "k_bar": plgpu.Barrier(num_barriers=stages),
      "v_bar": plgpu.Barrier(num_barriers=stages),
      "k_cons": plgpu.Barrier(num_arrivals=cw, num_barriers=stages),
      "v_cons": plgpu.Barrier(num_arrivals=cw, num_barriers=stages),
      "sched": plgpu.Barrier(num_barriers=cw),
  })
  if has_seg:
    scratch.update(
        qseg=plgpu.SMEM((cw, bq), jnp.int32), kvseg=plgpu.SMEM((stages, bkv), jnp.int32),
        qseg_bar=plgpu.Barrier(num_barriers=cw), seg_bar=plgpu.Barrier(num_barriers=stages))
  if interpret:
    scratch["p"] = _tiled((cw, bq, bkv), dtype)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b_sz, n_heads, tp), jnp.float32)),
      scratch_types=(scratch,),
      grid=(n_heads, n_qt, b_sz),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=cw + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*inputs)
  return out, lse



# ---------------------------------------------------------------------------- backward


def _bwd_call(q, k, v, do, lse2, delta, q_seg, kv_seg, sparsity: common.BlockSparsity, *,
              mask: common.MaskSpec, scale: float, soft_cap: float | None, cfg: Config,
              dq_partials: bool, interpret: bool):
  """Padded backward. ``lse2 = lse * log2(e)`` and ``delta = rowsum(o * do)``, both
  ``[b, n, tp]`` float32. Returns ``(dq_acc, dk, dv)`` where ``dq_acc`` is the float32
  sum of ``dS K`` (unscaled) ``[b, tp, n, d]``, or ``[kv_tiles, b, tp, n, d]`` partial
  sums when ``dq_partials``."""
  b_sz, tp, n_heads, d = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq, bkv, stages = cfg.bwd_block_q, cfg.bwd_block_kv, cfg.bwd_num_stages
  tile = cfg.bwd_kv_tile
  n_kt = sp // tile
  has_seg = q_seg is not None
  if has_seg and d > 64 and stages > 2:
    stages = 2  # segment-id buffers beside a 3-stage Q/dO ring exceed shared memory at d128
  # Alternating needs a whole-width float32 dQ buffer per warpgroup; with segment ids
  # at head_dim 128 that is 1 KB over the shared memory.
  alternate = cfg.bwd_dq_alternate and not (has_seg and d > 64)
  half = d if alternate else d // 2  # dQ columns one warpgroup computes in one step
  deferred = cfg.bwd_dq_deferred and not alternate
  writer = cfg.bwd_dq_writer and not alternate
  dtype = q.dtype
  has_seg = q_seg is not None
  dense = sparsity.dense
  batched_lists = (not dense) and sparsity.indices.shape[0] != 1
  n_qb_all = tp // bq
  layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # indexed by key (rows of S^T)
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # indexed by query (columns of S^T)
  c_exp = scale * common.LOG2E
  inputs = [q, k, v, do, lse2, delta]
  if has_seg:
    inputs += [q_seg, kv_seg]
  if not dense:
    inputs += [jnp.asarray(sparsity.indices), jnp.asarray(sparsity.counts)]
  dq_shape = ((n_kt,) if dq_partials else ()) + (b_sz, tp, n_heads, d)
  dq_ref_in = jax.new_ref(jnp.zeros(dq_shape, jnp.float32))

  def kernel(*refs):
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
    qseg_ref, kvseg_ref = (next(it), next(it)) if has_seg else (None, None)
    idx_ref, cnt_ref = (next(it), next(it)) if not dense else (None, None)
    dq_ref = next(it)
    dk_ref, dv_ref, s = next(it), next(it), next(it)

    b = lax.axis_index("batch")
    kvh = lax.axis_index("kv_heads")
    wg = lax.axis_index("wg")
    kt = lax.axis_index("kv_tiles")
    lb = b if batched_lists else 0
    if dense:
      n_full = n_total = n_qb_all
    else:
      n_full = cnt_ref[lb, kt, 0]
      n_total = cnt_ref[lb, kt, 1]
    n_steps = n_total * group

    def q_block(i):
      return i if dense else idx_ref[lb, kt, i]

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(cfg.bwd_compute_registers, action="increase")
      kv0 = kt * tile + wg * bkv

      @pl.when(wg == 0)
      def _():
        rows = (b, pl.ds(kt * tile, tile), kvh)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], s["k"], s["kv_bar"])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], s["v"], s["kv_bar2"])

      if has_seg:
        plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(kv0, bkv)], s["kvseg"].at[wg],
                                s["kvseg_bar"].at[wg])
        plgpu.barrier_wait(s["kvseg_bar"].at[wg])
        kv_seg_row = plgpu.load(s["kvseg"].at[wg], layout=row_layout)
      plgpu.barrier_wait(s["kv_bar"])
      plgpu.barrier_wait(s["kv_bar2"])
      k_rows = s["k"].at[pl.ds(wg * bkv, bkv)]
      v_rows = s["v"].at[pl.ds(wg * bkv, bkv)]
      if cfg.bwd_kv_in_registers and not interpret:
        k_rows, v_rows = k_rows[...], v_rows[...]  # register A operands from here on
      k_cols = s["k"] if alternate else s["k"].at[:, pl.ds(wg * half, half)]
      acc_refs = {}  # deferred dQ on GPU: the accumulators live across the whole loop

      def issue_dq_copy(t_):
        """Reduce-add (or, for partial sums, copy) the staged dQ of step ``t_`` into HBM."""
        hg_ = lax.div(t_, n_total)
        qb_ = q_block(lax.rem(t_, n_total))
        rows = pl.ds(qb_ * bq, bq)
        cols = pl.ds(wg * half, half)
        head_ = kvh * group + hg_
        if dq_partials:
          plgpu.copy_smem_to_gmem(s["dq"].at[wg], dq_ref.at[kt, b, rows, head_, cols])
        else:
          plgpu.copy_smem_to_gmem(s["dq"].at[wg], dq_ref.at[b, rows, head_, cols],
                                  reduction_op="add")

      def stage_dq(dq, u):
        """dQ writer: put step ``u``'s dQ half into this warpgroup's staging buffer (once
        the memory warpgroup has released it from step ``u - 1``) and signal it."""
        _when(u > 0, lambda: plgpu.barrier_wait(s["dq_empty"].at[wg]))
        s["dq"].at[wg][...] = dq
        plgpu.commit_smem()
        plgpu.barrier_arrive(s["dq_full"].at[wg])

      def store_previous_dq(t, wait_n):
        """Deferred dQ: stage step ``t - 1``'s dQ (in flight behind this step's ``S^T``
        until ``wait_n`` wgmma groups are left; they complete in order) and issue its
        reduce-add while this step's scores are on the tensor cores. (Interpret mode staged
        it at the end of step ``t - 1``.)"""
        if not interpret:
          dq_prev = plgpu.wgmma_accumulator_load(acc_refs["dq"], wait_n=wait_n)
          if writer:
            _when(t > 0, lambda: stage_dq(dq_prev, t - 1))
            return
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          s["dq"].at[wg][...] = dq_prev
          plgpu.commit_smem()
        if writer:
          return  # interpret mode staged and signalled it at the end of step t - 1
        _when(t > 0, lambda: issue_dq_copy(t - 1))

      def step(i, carry, *, hg, masked: bool):
        dk_acc, dv_acc = carry if carry else (None, None)
        t = hg * n_total + i
        slot = lax.rem(t, stages)
        parity = lax.rem(t, 2)
        qb = q_block(i)
        head = kvh * group + hg
        q_smem, do_smem = s["q"].at[slot], s["do"].at[slot]
        plgpu.barrier_wait(s["q_bar"].at[slot])
        plgpu.barrier_wait(s["lse_bar"].at[slot])
        plgpu.barrier_wait(s["do_bar"].at[slot])
        if has_seg:
          plgpu.barrier_wait(s["qseg_bar"].at[slot])

        # S^T = K Q^T and dP^T = V dO^T are issued together; P^T = exp2(S^T - lse) is
        # computed while dP^T is still on the tensor cores.
        def scores(st_ref, dpt_ref):
          plgpu.wgmma(st_ref, k_rows, q_smem.transpose((1, 0)))
          if deferred and cfg.bwd_dq_store_before_dp:
            store_previous_dq(t, wait_n=1)  # only S^T may still be in flight
          plgpu.wgmma(dpt_ref, v_rows, do_smem.transpose((1, 0)))
          st = plgpu.wgmma_accumulator_load(st_ref, wait_n=1)
          if deferred and not cfg.bwd_dq_store_before_dp:
            store_previous_dq(t, wait_n=None)  # done: it was issued before S^T
          lse_col = lax.broadcast_in_dim(
              plgpu.load(s["lse"].at[slot], layout=col_layout), (bkv, bq), [1])
          if soft_cap is None:
            tanh = None
            pt = jnp.exp2(st * c_exp - lse_col)
          else:
            tanh = jnp.tanh(st * (scale / soft_cap))
            pt = jnp.exp2(tanh * (soft_cap * common.LOG2E) - lse_col)
          if masked:
            kv_pos = plgpu.broadcasted_iota(jnp.int32, (bkv, bq), 0, layout=layout) + kv0
            q_pos = plgpu.broadcasted_iota(jnp.int32, (bkv, bq), 1, layout=layout) + qb * bq
            qs = ks = None
            if has_seg:
              qs = lax.broadcast_in_dim(
                  plgpu.load(s["qseg"].at[slot], layout=col_layout), (bkv, bq), [1])
              ks = lax.broadcast_in_dim(kv_seg_row, (bkv, bq), [0])
            ok = common.allowed(mask, q_pos, kv_pos, qs, ks)
            pt = jnp.where(ok, pt, 0.0)
          return pt, tanh, dpt_ref[...]

        pt, tanh, dpt = pl.run_scoped(scores, plgpu.ACC((bkv, bq), jnp.float32),
                                      plgpu.ACC((bkv, bq), jnp.float32))
        pt16 = pt.astype(dtype)
        ds_rows = s["ds"].at[parity, pl.ds(wg * bkv, bkv)]

        def d_scores():
          """dS^T = P^T (dP^T - delta) (times the soft-cap derivative), into shared memory."""
          delta_col = lax.broadcast_in_dim(
              plgpu.load(s["delta"].at[slot], layout=col_layout), (bkv, bq), [1])
          dst = pt * (dpt - delta_col)
          if tanh is not None:
            dst = dst * (1.0 - tanh * tanh)
          dst16 = dst.astype(dtype)
          ds_rows[...] = dst16
          return dst16

        def compute_dq(acc_ref):
          plgpu.wgmma(acc_ref, s["ds"].at[parity].transpose((1, 0)), k_cols)
          dq = acc_ref[...]  # also waits for this step's dV and dK matmuls
          if writer:
            stage_dq(dq, t)
            return
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          s["dq"].at[wg][...] = dq
          plgpu.commit_smem()
          cols = pl.ds(0 if alternate else wg * half, half)
          if dq_partials:
            plgpu.copy_smem_to_gmem(s["dq"].at[wg],
                                    dq_ref.at[kt, b, pl.ds(qb * bq, bq), head, cols])
          else:
            plgpu.copy_smem_to_gmem(s["dq"].at[wg],
                                    dq_ref.at[b, pl.ds(qb * bq, bq), head, cols],
                                    reduction_op="add")

        def d_query():
          """Once both halves of dS^T are in shared memory: dQ[:, half] = dS K[:, half],
          added into the float32 dQ accumulator in HBM by a TMA reduction. Alternating:
          the warpgroup whose turn it is computes all of dQ = dS K; the other one only
          signals that its half of dS^T is written and goes on to the next step."""
          plgpu.commit_smem()
          if not alternate:
            _schedule(s["ds_bar"])
            pl.run_scoped(compute_dq, plgpu.ACC((bq, half), jnp.float32))
            return
          plgpu.barrier_arrive(s["ds_bar"].at[parity])

          @pl.when(wg == parity)
          def _():
            plgpu.barrier_wait(s["ds_bar"].at[parity])
            pl.run_scoped(compute_dq, plgpu.ACC((bq, half), jnp.float32))

        def deferred_dq_interpret():
          """Deferred dQ in interpret mode: dQ of this step is computed now and staged; its
          copy into HBM is issued in the next step (or after the loop)."""
          plgpu.commit_smem()
          _schedule(s["ds_bar"])
          dq = pl.run_scoped(
              lambda r: (plgpu.wgmma(r, s["ds"].at[parity].transpose((1, 0)), k_cols),
                         r[...])[1],
              plgpu.ACC((bq, half), jnp.float32))
          if writer:
            stage_dq(dq, t)
            return
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          s["dq"].at[wg][...] = dq
          plgpu.commit_smem()

        if interpret:
          s["pt"].at[wg][...] = pt16
          plgpu.commit_smem()
          dv_acc = dv_acc + pl.run_scoped(
              lambda r: (plgpu.wgmma(r, s["pt"].at[wg], do_smem), r[...])[1],
              plgpu.ACC((bkv, d), jnp.float32))
          d_scores()
          plgpu.commit_smem()
          dk_acc = dk_acc + pl.run_scoped(
              lambda r: (plgpu.wgmma(r, ds_rows, q_smem), r[...])[1],
              plgpu.ACC((bkv, d), jnp.float32))
          if deferred:
            deferred_dq_interpret()
          else:
            d_query()
        elif deferred:
          # dV += P^T dO and dK += dS^T Q as below; dQ = dS K is issued last and left in
          # flight: only dV and dK are waited for (their register operands and this slot's
          # Q/dO are then free), and the next step's S^T/dP^T queue behind dQ.
          dv_r, dk_r, dq_r = acc_refs["dv"], acc_refs["dk"], acc_refs["dq"]
          plgpu.wgmma(dv_r, pt16, do_smem)
          dst16 = d_scores()
          plgpu.wgmma(dk_r, dst16, q_smem)
          plgpu.commit_smem()
          _schedule(s["ds_bar"])  # both halves of dS^T are in shared memory
          dq_r[...] = plgpu.layout_cast(jnp.full((bq, half), 0.0, jnp.float32), layout)
          plgpu.wgmma(dq_r, s["ds"].at[parity].transpose((1, 0)), k_cols)
          plgpu.wgmma_accumulator_load(dk_r, wait_n=1)
          plgpu.barrier_arrive(s["q_cons"].at[slot])
          return carry
        else:
          # dV += P^T dO runs while dS^T is computed; dK += dS^T Q and dQ = dS K are
          # issued behind it, and the one wait at the end covers all three.
          def grads(refs):
            dv_ref, dk_ref = refs
            plgpu.wgmma(dv_ref, pt16, do_smem)
            dst16 = d_scores()
            plgpu.wgmma(dk_ref, dst16, q_smem)
            d_query()

          dv_acc, dk_acc = pl.run_state(grads)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(dk_acc)))
        plgpu.barrier_arrive(s["q_cons"].at[slot])
        return dk_acc, dv_acc

      def head_loop(hg, carry):
        carry = lax.fori_loop(0, n_full, functools.partial(step, hg=hg, masked=False), carry)
        return lax.fori_loop(n_full, n_total, functools.partial(step, hg=hg, masked=True),
                             carry)

      def flush_last_dq(dq_last):
        """Deferred dQ: the last step's dQ (staged here on GPU, already in interpret mode)."""
        if writer:
          if dq_last is not None:
            _when(n_steps > 0, lambda: stage_dq(dq_last, n_steps - 1))
          return
        if dq_last is not None:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          s["dq"].at[wg][...] = dq_last
          plgpu.commit_smem()
        _when(n_steps > 0, lambda: issue_dq_copy(n_steps - 1))

      acc0 = plgpu.layout_cast(jnp.full((bkv, d), 0.0, jnp.float32), layout)
      if deferred and not interpret:
        def deferred_loop(refs):
          acc_refs.update(dv=refs[0], dk=refs[1], dq=refs[2])
          lax.fori_loop(0, group, head_loop, ())
          flush_last_dq(refs[2][...])

        dq0 = plgpu.layout_cast(jnp.full((bq, half), 0.0, jnp.float32), layout)
        dv_acc, dk_acc, _ = pl.run_state(deferred_loop)(
            (plgpu.ACC.init(acc0), plgpu.ACC.init(acc0), plgpu.ACC.init(dq0)))
      else:
        dk_acc, dv_acc = lax.fori_loop(0, group, head_loop, (acc0, acc0))
        if deferred:
          flush_last_dq(None)
      _schedule(s["end_bar"])  # the other warpgroup is done reading K
      s["k"].at[pl.ds(wg * bkv, bkv)][...] = (dk_acc * scale).astype(dtype)
      s["v"].at[pl.ds(wg * bkv, bkv)][...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      rows = (b, pl.ds(kv0, bkv), kvh)
      plgpu.copy_smem_to_gmem(s["k"].at[pl.ds(wg * bkv, bkv)], dk_ref.at[rows],
                              commit_group=False)
      plgpu.copy_smem_to_gmem(s["v"].at[pl.ds(wg * bkv, bkv)], dv_ref.at[rows],
                              commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(cfg.bwd_memory_registers, action="decrease")

      def issue(t, slot, wait):
        hg = lax.div(t, n_total)
        qb = q_block(lax.rem(t, n_total))
        head = kvh * group + hg
        rows = (b, pl.ds(qb * bq, bq), head)
        if wait:
          plgpu.barrier_wait(s["q_cons"].at[slot])
        plgpu.copy_gmem_to_smem(q_ref.at[rows], s["q"].at[slot], s["q_bar"].at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, head, pl.ds(qb * bq, bq)], s["lse"].at[slot],
                                s["lse_bar"].at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(qb * bq, bq)], s["qseg"].at[slot],
                                  s["qseg_bar"].at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], s["do"].at[slot], s["do_bar"].at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(qb * bq, bq)],
                                s["delta"].at[slot], s["do_bar"].at[slot])

      def write_dq(u):
        """dQ writer: once both warpgroups staged step ``u``'s dQ halves, reduce-add them
        into HBM; release the staging buffers when the copies have read them (the last
        step's release would have no taker)."""
        hg = lax.div(u, n_total)
        rows = pl.ds(q_block(lax.rem(u, n_total)) * bq, bq)
        head = kvh * group + hg
        for w in range(2):
          plgpu.barrier_wait(s["dq_full"].at[w])
          cols = pl.ds(w * half, half)
          if dq_partials:
            plgpu.copy_smem_to_gmem(s["dq"].at[w], dq_ref.at[kt, b, rows, head, cols])
          else:
            plgpu.copy_smem_to_gmem(s["dq"].at[w], dq_ref.at[b, rows, head, cols],
                                    reduction_op="add")
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(u + 1 < n_steps)
        def _():
          for w in range(2):
            plgpu.barrier_arrive(s["dq_empty"].at[w])

      for t in range(min(stages, n_qb_all * group)):
        _when(t < n_steps, functools.partial(issue, t, t, False))

      # Step u's dQ is handled after its q_cons (it is staged before q_cons, or during
      # step u + 1 with deferred dQ); the loads of steps up to u + stages are issued first.
      @pl.loop(stages, _max(n_steps, stages))
      def _(t):
        issue(t, lax.rem(t, stages), True)
        if writer:
          write_dq(t - stages)

      @pl.loop(_max(n_steps - stages, 0), n_steps)
      def _(t):
        plgpu.barrier_wait(s["q_cons"].at[lax.rem(t, stages)])
        if writer:
          write_dq(t)

      if writer:
        plgpu.wait_smem_to_gmem(0)

  # dQ reads column halves of K; a wgmma's operands share one swizzle, so every 16-bit
  # buffer uses the swizzle of a half row of K.
  swz = min(_SWIZZLE, half * jnp.dtype(dtype).itemsize)
  scratch = {
      "k": _tiled((tile, d), dtype, swizzle=swz),
      "v": _tiled((tile, d), dtype, swizzle=swz),
      "q": _tiled((stages, bq, d), dtype, swizzle=swz),
      "do": _tiled((stages, bq, d), dtype, swizzle=swz),
      "lse": plgpu.SMEM((stages, bq), jnp.float32),
      "delta": plgpu.SMEM((stages, bq), jnp.float32),
      "ds": _tiled((2, tile, bq), dtype, swizzle=swz),
      "dq": _tiled((2, bq, half), jnp.float32, swizzle=min(_SWIZZLE, half * 4)),
      "kv_bar": plgpu.Barrier(),
      "kv_bar2": plgpu.Barrier(),
      "q_bar": plgpu.Barrier(num_barriers=stages),
      "lse_bar": plgpu.Barrier(num_barriers=stages),
      "do_bar": plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      "q_cons": plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      "ds_bar": plgpu.Barrier(num_arrivals=2, num_barriers=2 if alternate else ()),
      "end_bar": plgpu.Barrier(num_arrivals=2),
  }
  if has_seg:
    scratch.update(
        kvseg=plgpu.SMEM((2, bkv), jnp.int32), qseg=plgpu.SMEM((stages, bq), jnp.int32),
        kvseg_bar=plgpu.Barrier(num_barriers=2), qseg_bar=plgpu.Barrier(num_barriers=stages))
  if writer:
    scratch.update(dq_full=plgpu.Barrier(num_barriers=2), dq_empty=plgpu.Barrier(num_barriers=2))
  if interpret:
    scratch["pt"] = _tiled((2, bkv, bq), dtype, swizzle=swz)
  kv_struct = jax.ShapeDtypeStruct(k.shape, dtype)
  dk, dv = plgpu.kernel(
      kernel,
      out_type=(kv_struct, kv_struct),
      scratch_types=(scratch,),
      grid=(kv_heads, n_kt, b_sz),
      grid_names=("kv_heads", "kv_tiles", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*inputs, dq_ref_in)
  return dq_ref_in[...], dk, dv


def _check_block_classes(block_classes, batch: int, rows: int, cols: int, fn: str):
  shape = getattr(block_classes, "shape", None)
  if shape is None or len(shape) != 3 or shape[0] not in (1, batch) or shape[1:] != (rows, cols):
    raise ValueError(f"{fn}: block_classes must have shape [batch or 1, {rows}, {cols}] (the "
                     f"kernel's tiling of the padded problem), got {shape}")


def forward(q, k, v, q_seg=None, kv_seg=None, *, is_causal: bool = False,
            window: tuple[int, int] | None = None, scale: float, soft_cap: float | None = None,
            config: Config | None = None, block_classes=None, interpret: bool = False):
  """Flash attention forward.

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    q_seg, kv_seg: ``[batch, q_len]`` / ``[batch, kv_len]`` int32 segment ids or None.
    block_classes: optional extra block-sparse mask ``[batch or 1, q_tiles, kv_blocks]``
      of ``common.EMPTY/PARTIAL/FULL`` at this config's forward tiling (combined with the
      causal/window/segment layout by taking the minimum class).

  Returns:
    ``(out [batch, q_len, q_heads, head_dim], lse [batch, q_heads, q_len] float32)``.
  """
  cfg = config or default_config(q.shape[-1], is_causal)
  t, s_len = q.shape[1], k.shape[1]
  mask = common.MaskSpec(q_len=t, kv_len=s_len, is_causal=is_causal, window=window,
                         has_segment_ids=q_seg is not None)
  tp = common.round_up(t, cfg.fwd_q_tile)
  sp = common.round_up(s_len, max(cfg.block_kv, cfg.bwd_kv_tile))
  qp, kp, vp = common.pad_axis(q, 1, tp), common.pad_axis(k, 1, sp), common.pad_axis(v, 1, sp)
  qs = common.pad_axis(q_seg, 1, tp)
  ks = common.pad_axis(kv_seg, 1, sp)
  classes = common.block_classes(mask, tp, sp, cfg.fwd_q_tile, cfg.block_kv, qs, ks)
  if block_classes is not None:
    _check_block_classes(block_classes, q.shape[0], tp // cfg.fwd_q_tile, sp // cfg.block_kv,
                         "forward")
    classes = jnp.minimum(jnp.asarray(classes), block_classes)
  sparsity = common.sparsity_from_classes(classes)
  out, lse = _fwd_call(qp, kp, vp, qs, ks, sparsity, mask=mask, scale=scale,
                       soft_cap=soft_cap, cfg=cfg, interpret=interpret)
  return out[:, :t], lse[:, :, :t]


def backward(q, k, v, out, lse, d_out, q_seg=None, kv_seg=None, d_lse=None, *, is_causal: bool = False,
             window: tuple[int, int] | None = None, scale: float,
             soft_cap: float | None = None, config: Config | None = None,
             block_classes=None, deterministic: bool = False, interpret: bool = False):
  """Flash attention backward from the forward's residuals.

  Args:
    q, k, v, q_seg, kv_seg: as in :func:`forward`.
    out: ``[batch, q_len, q_heads, head_dim]`` forward output; ``lse``:
      ``[batch, q_heads, q_len]`` float32 forward log-sum-exp; ``d_out``: cotangent of out;
      ``d_lse``: cotangent of lse or None (``d lse / d logits = P``, so it enters as
      ``delta - d_lse``).
    block_classes: optional block-sparse mask ``[batch or 1, kv_tiles, q_blocks]`` at the
      backward tiling (the transpose of the forward layout).
    deterministic: write per-key-tile dQ partial sums and add them in a fixed order
      instead of TMA reduce-adds (bitwise reproducible; needs ``kv_tiles`` times the
      float32 size of dQ in scratch memory). Interpret mode always does this.

  Returns:
    ``(dq, dk, dv)`` shaped and typed like ``q, k, v``.
  """
  cfg = config or default_config(q.shape[-1], is_causal)
  t, s_len = q.shape[1], k.shape[1]
  mask = common.MaskSpec(q_len=t, kv_len=s_len, is_causal=is_causal, window=window,
                         has_segment_ids=q_seg is not None)
  tp = common.round_up(t, cfg.fwd_q_tile)
  sp = common.round_up(s_len, max(cfg.block_kv, cfg.bwd_kv_tile))
  qp, kp, vp = common.pad_axis(q, 1, tp), common.pad_axis(k, 1, sp), common.pad_axis(v, 1, sp)
  dop = common.pad_axis(d_out, 1, tp)
  qs, ks = common.pad_axis(q_seg, 1, tp), common.pad_axis(kv_seg, 1, sp)
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse
  delta = common.pad_axis(delta, 2, tp)
  lse2 = common.pad_axis(lse * common.LOG2E, 2, tp)
  classes = common.block_classes(mask, tp, sp, cfg.bwd_block_q, cfg.bwd_kv_tile, qs, ks)
  classes = common.transpose_classes(classes)
  if block_classes is not None:
    _check_block_classes(block_classes, q.shape[0], sp // cfg.bwd_kv_tile, tp // cfg.bwd_block_q,
                         "backward")
    classes = jnp.minimum(jnp.asarray(classes), block_classes)
  sparsity = common.sparsity_from_classes(classes)
  partials = deterministic or interpret
  dq_acc, dk, dv = _bwd_call(qp, kp, vp, dop, lse2, delta, qs, ks, sparsity, mask=mask,
                             scale=scale, soft_cap=soft_cap, cfg=cfg, dq_partials=partials,
                             interpret=interpret)
  if partials:
    dq_acc = dq_acc.sum(axis=0)
  dq = (dq_acc[:, :t] * scale).astype(q.dtype)
  return dq, dk[:, :s_len], dv[:, :s_len]
