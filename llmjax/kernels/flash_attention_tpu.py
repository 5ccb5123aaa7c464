"""Flash attention for TPU (Pallas/Mosaic): forward and backward, GQA, and `Mask` semantics.

Online softmax (Dao et al., FlashAttention, 2022, Alg. 1; FlashAttention-2, 2023, Sec. 3.1):
for each block of queries, loop over key blocks keeping the running row max `m`, the running
denominator `l` and the unnormalised output `acc` in float32 VMEM scratch. The forward pass also
returns the row logsumexp `lse = m + log(l)`, the only residual besides q, k, v and o; the
backward pass recomputes the probabilities from it (FlashAttention-2, Alg. 2) in two kernels:
  dq kernel    grid (batch, heads, q blocks, kv blocks): dq = scale * dS K
  dk/dv kernel grid (batch, kv heads, kv blocks, group, q blocks): dv = P^T dO, dk = scale dS^T Q
The dk/dv kernel reduces over the query heads of a kv head (the GQA group) inside the kernel,
so neither K/V nor dK/dV are ever repeated to all query heads in HBM: index_maps send query
head h to kv head h // group.

Masks come from `Mask`: causal, sliding window and kv_lengths/q_offset are index arithmetic on
scalars (q_offset and kv_lengths are scalar-prefetched into SMEM), so blocks that are fully
masked by them are skipped (`pl.when`) and, because the index_maps clamp the block index into the
visible range, their K/V (or Q/dO) blocks are not even DMA'd: the pipeline does not re-fetch a
block whose index did not change (the trick of JAX's splash attention). Segment ids mask inside a
block only. A query that sees no key gets a zero output and zero gradients.

Layout: the kernels work on [batch, heads, length, head_dim]; the wrapper transposes from the
entry point's [batch, length, heads, head_dim] (XLA usually fuses the transpose into the
projection) and pads lengths to whole blocks, masking the padded keys via kv_lengths.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llmjax.kernels._util import MaskSpec as _MaskSpec
from llmjax.kernels._util import block_visible as _block_visible
from llmjax.kernels._util import kv_block_range as _kv_block_range
from llmjax.kernels._util import out_struct as _out
from llmjax.kernels._util import platform_call as _platform
from llmjax.kernels._util import q_block_range as _q_block_range
from llmjax.kernels._util import round_up as _round_up
from llmjax.kernels.mask import Mask
from llmjax.kernels.reference import reference_attention

NUM_LANES = 128
NUM_SUBLANES = 8
# A large finite negative, not -inf: exp(mask - m) must stay 0 (not NaN) while a row has seen no
# visible key yet and m is still the initial value.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TRANS_B = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T without a transpose


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (queries x keys) of the three kernels.

  block_q must be a multiple of 8 (sublanes) and block_k of 128 (lanes). Bigger tiles amortise
  the per-grid-step overhead (~0.35 us) and feed the MXU better but need more VMEM: the forward
  keeps q, k, v (double buffered), acc [block_q, head_dim] f32 and s/p [block_q, block_k] f32.
  """
  block_q: int = 512
  block_k: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512

  @classmethod
  def for_device(cls, device_kind: str | None = None) -> 'BlockSizes':
    """Defaults per TPU generation, from `jax.devices()[0].device_kind`."""
    if device_kind is None:
      device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    if 'v6' in kind:
      # Trillium: 256x256 MXU and 2x the VMEM of v5e; wide key blocks keep the MXU busy.
      return cls(block_q=512, block_k=1024, block_q_dq=512, block_k_dq=1024,
                 block_q_dkv=512, block_k_dkv=1024)
    if 'v5 lite' in kind or 'v5e' in kind:
      # v5e: 16 MiB scoped VMEM by default and 4 128x128 MXUs; 512x512 tiles fit with headroom.
      return cls()
    if 'v5' in kind or 'v4' in kind:
      # v5p/v4: more VMEM; 512 query rows, 1024 keys in the forward (no dS tile there).
      return cls(block_q=512, block_k=1024)
    # CPU (interpret mode) and unknown kinds: small tiles, so tests use few, cheap grid steps.
    return cls(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128,
               block_q_dkv=128, block_k_dkv=128)


# ----------------------------------------------------------------------------------------------
# Masking inside a block (which blocks are visible at all: `llmjax.kernels._util`).


def _element_mask(spec, q_first, k_first, shape, kv_len, q_seg_ref, kv_seg_ref):
  """[block_q, block_k] bool: which (query, key) pairs of this block pair are visible."""
  row = q_first + lax.broadcasted_iota(jnp.int32, shape, 0)  # absolute query position
  col = k_first + lax.broadcasted_iota(jnp.int32, shape, 1)  # absolute key position
  mask = col < kv_len
  if spec.causal:
    mask = jnp.logical_and(mask, col <= row)
  if spec.window:
    mask = jnp.logical_and(mask, row - col < spec.window)
  if spec.segments:
    # q ids arrive lane-replicated [block_q, 128], kv ids sublane-replicated [8, block_k]: the
    # layouts Mosaic can broadcast to [block_q, block_k] without relayouts.
    q_seg = jnp.tile(q_seg_ref[...], (1, shape[1] // NUM_LANES))
    kv_seg = kv_seg_ref[:1, :]
    mask = jnp.logical_and(mask, q_seg == kv_seg)
  return mask


def _lanes(x, n):
  """A lane-replicated [rows, 128] statistic broadcast to [rows, n]."""
  if n % NUM_LANES == 0:
    return jnp.tile(x, (1, n // NUM_LANES))
  if n < NUM_LANES:
    return x[:, :n]
  raise NotImplementedError(f'{n=} must be < 128 or a multiple of 128')


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_offset_ref, kv_len_ref,  # scalar prefetch (SMEM) [batch]
                q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref,  # inputs (VMEM blocks)
                o_ref, lse_ref,  # outputs
                m_scr, l_scr, acc_scr,  # scratch
                *, spec, scale, block_q, block_k, num_kv_blocks):
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_first = q_offset_ref[b] + qi * block_q
  k_first = ki * block_k
  kv_len = kv_len_ref[b]

  @pl.when(ki == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(_block_visible(spec, q_first, q_first + block_q - 1, k_first, k_first + block_k - 1,
                          kv_len))
  def _compute():
    q = q_ref[...]  # [block_q, head_dim]
    k = k_ref[...]  # [block_k, head_dim]
    s = lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
    mask = _element_mask(spec, q_first, k_first, s.shape, kv_len, q_seg_ref, kv_seg_ref)
    s = jnp.where(mask, s, MASK_VALUE)  # [block_q, block_k]
    m_prev, l_prev = m_scr[...], l_scr[...]  # [block_q, 128], lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # where(): a row with no visible key yet has m == MASK_VALUE and would get exp(0) = 1.
    p = jnp.where(mask, jnp.exp(s - _lanes(m_next, block_k)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    head_dim = acc_scr.shape[-1]
    pv = lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + pv

  @pl.when(ki == num_kv_blocks - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0  # the query saw no key: zero output, and lse = +inf so that P = 0 in bwd
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_scr[...] * _lanes(inv, acc_scr.shape[-1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _seg_specs(spec, q_map, kv_map, block_q, block_k):
  if not spec.segments:
    return [None, None]
  return [pl.BlockSpec((None, block_q, NUM_LANES), q_map),
          pl.BlockSpec((None, NUM_SUBLANES, block_k), kv_map)]


def _fwd_call(interpret, q, k, v, q_offset, kv_len, q_seg, kv_seg, *, spec, scale, bs):
  batch, heads, t, head_dim = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = bs.block_q, bs.block_k
  nq, nk = t // bq, s // bk

  def kv_block(b, qi, ki, q_offset_ref, kv_len_ref):
    q_first = q_offset_ref[b] + qi * bq
    lo, hi = _kv_block_range(spec, q_first, q_first + bq - 1, kv_len_ref[b], bk, nk)
    return jnp.clip(ki, lo, hi)  # skipped steps repeat a fetched block index: no DMA

  q_map = lambda b, h, qi, ki, *_: (b, h, qi, 0)
  kv_map = lambda b, h, qi, ki, *refs: (b, h // group, kv_block(b, qi, ki, *refs), 0)
  in_specs = [
      pl.BlockSpec((None, None, bq, head_dim), q_map),
      pl.BlockSpec((None, None, bk, head_dim), kv_map),
      pl.BlockSpec((None, None, bk, head_dim), kv_map),
      *_seg_specs(spec, lambda b, h, qi, ki, *_: (b, qi, 0),
                  lambda b, h, qi, ki, *refs: (b, 0, kv_block(b, qi, ki, *refs)), bq, bk),
  ]
  out_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
               pl.BlockSpec((None, None, bq, NUM_LANES), q_map)]
  out_shape = [_out(q.shape, q.dtype, q), _out((batch, heads, t, NUM_LANES), jnp.float32, q)]
  kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk,
                             num_kv_blocks=nk)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads, nq, nk), in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      cost_estimate=pl.CostEstimate(
          flops=4 * batch * heads * t * s * head_dim, transcendentals=batch * heads * t * s,
          bytes_accessed=(2 * q.size + nq * (k.size + v.size)) * q.dtype.itemsize),
      interpret=interpret,
  )(q_offset, kv_len, q, k, v, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(q_offset_ref, kv_len_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, kv_seg_ref,
               dq_ref, dq_scr, *, spec, scale, block_q, block_k, num_kv_blocks):
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_first = q_offset_ref[b] + qi * block_q
  k_first = ki * block_k
  kv_len = kv_len_ref[b]

  @pl.when(ki == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(_block_visible(spec, q_first, q_first + block_q - 1, k_first, k_first + block_k - 1,
                          kv_len))
  def _compute():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
    mask = _element_mask(spec, q_first, k_first, s.shape, kv_len, q_seg_ref, kv_seg_ref)
    p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], block_k)), 0.0)  # [block_q, block_k]
    dp = lax.dot_general(do, v, TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], block_k))  # softmax backward: P * (dP - rowsum(dO*O))
    dq_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(ki == num_kv_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_offset_ref, kv_len_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, kv_seg_ref,
                dk_ref, dv_ref, dk_scr, dv_scr,
                *, spec, scale, block_q, block_k, group, num_q_blocks):
  b, ki, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_first = q_offset_ref[b] + qi * block_q
  k_first = ki * block_k
  kv_len = kv_len_ref[b]

  @pl.when(jnp.logical_and(g == 0, qi == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(_block_visible(spec, q_first, q_first + block_q - 1, k_first, k_first + block_k - 1,
                          kv_len))
  def _compute():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
    mask = _element_mask(spec, q_first, k_first, s.shape, kv_len, q_seg_ref, kv_seg_ref)
    p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], block_k)), 0.0)  # [block_q, block_k]
    dv_scr[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], block_k))
    dk_scr[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(jnp.logical_and(g == group - 1, qi == num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_call(interpret, q, k, v, do, lse, di, q_offset, kv_len, q_seg, kv_seg, *, spec, scale,
             bs):
  batch, heads, t, head_dim = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = bs.block_q_dq, bs.block_k_dq
  nq, nk = t // bq, s // bk

  def kv_block(b, qi, ki, q_offset_ref, kv_len_ref):
    q_first = q_offset_ref[b] + qi * bq
    lo, hi = _kv_block_range(spec, q_first, q_first + bq - 1, kv_len_ref[b], bk, nk)
    return jnp.clip(ki, lo, hi)

  q_map = lambda b, h, qi, ki, *_: (b, h, qi, 0)
  kv_map = lambda b, h, qi, ki, *refs: (b, h // group, kv_block(b, qi, ki, *refs), 0)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, NUM_LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
              *_seg_specs(spec, lambda b, h, qi, ki, *_: (b, qi, 0),
                          lambda b, h, qi, ki, *refs: (b, 0, kv_block(b, qi, ki, *refs)), bq, bk)]
  kernel = functools.partial(_dq_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk,
                             num_kv_blocks=nk)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads, nq, nk), in_specs=in_specs,
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=_out(q.shape, q.dtype, q),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      cost_estimate=pl.CostEstimate(
          flops=6 * batch * heads * t * s * head_dim, transcendentals=batch * heads * t * s,
          bytes_accessed=(3 * q.size + nq * (k.size + v.size)) * q.dtype.itemsize),
      interpret=interpret,
  )(q_offset, kv_len, q, k, v, do, lse, di, q_seg, kv_seg)


def _dkv_call(interpret, q, k, v, do, lse, di, q_offset, kv_len, q_seg, kv_seg, *, spec, scale,
              bs):
  batch, heads, t, head_dim = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = bs.block_q_dkv, bs.block_k_dkv
  nq, nk = t // bq, s // bk

  def q_block(b, ki, qi, q_offset_ref):
    lo, hi = _q_block_range(spec, ki * bk, ki * bk + bk - 1, q_offset_ref[b], bq, nq)
    return jnp.clip(qi, lo, hi)

  # Grid (batch, kv head, kv block, head within the group, q block): the last two reduce.
  q_map = lambda b, kh, ki, g, qi, q_offset_ref, _: (b, kh * group + g,
                                                    q_block(b, ki, qi, q_offset_ref), 0)
  kv_map = lambda b, kh, ki, g, qi, *_: (b, kh, ki, 0)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, NUM_LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
              *_seg_specs(spec,
                          lambda b, kh, ki, g, qi, q_offset_ref, _: (
                              b, q_block(b, ki, qi, q_offset_ref), 0),
                          lambda b, kh, ki, g, qi, *_: (b, 0, ki), bq, bk)]
  kernel = functools.partial(_dkv_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk,
                             group=group, num_q_blocks=nq)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, kv_heads, nk, group, nq), in_specs=in_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                          pltpu.VMEM((bk, head_dim), jnp.float32)]),
      out_shape=[_out(k.shape, k.dtype, q), _out(v.shape, v.dtype, q)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary')),
      cost_estimate=pl.CostEstimate(
          flops=8 * batch * heads * t * s * head_dim, transcendentals=batch * heads * t * s,
          bytes_accessed=(nk * 2 * q.size + 4 * k.size) * q.dtype.itemsize),
      interpret=interpret,
  )(q_offset, kv_len, q, k, v, do, lse, di, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------
# custom_vjp on the padded [batch, heads, length, head_dim] arrays.


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_offset, kv_len, q_seg, kv_seg, spec, scale, bs, interpret):
  return _flash_fwd(q, k, v, q_offset, kv_len, q_seg, kv_seg, spec, scale, bs, interpret)[0]


def _flash_fwd(q, k, v, q_offset, kv_len, q_seg, kv_seg, spec, scale, bs, interpret):
  call = functools.partial(_fwd_call, spec=spec, scale=scale, bs=bs)
  o, lse = _platform(call, interpret, q, k, v, q_offset, kv_len, q_seg, kv_seg)
  return o, (q, k, v, q_offset, kv_len, q_seg, kv_seg, o, lse)


def _flash_bwd(spec, scale, bs, interpret, res, do):
  q, k, v, q_offset, kv_len, q_seg, kv_seg, o, lse = res
  # D_i = rowsum(dO * O) (FlashAttention-2, Alg. 2 line 4), lane-replicated like lse.
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  di = jnp.broadcast_to(di[..., None], (*di.shape, NUM_LANES))
  args = (q, k, v, do, lse, di, q_offset, kv_len, q_seg, kv_seg)
  dq = _platform(functools.partial(_dq_call, spec=spec, scale=scale, bs=bs), interpret, *args)
  dk, dv = _platform(functools.partial(_dkv_call, spec=spec, scale=scale, bs=bs), interpret,
                     *args)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _fit(blocks: tuple[int, ...], length: int, multiple: int) -> tuple[int, ...]:
  """Tiles for a sequence shorter than all of them: one tile of the (rounded-up) length.

  Otherwise the tiles stay (they divide each other) and the length is padded to the largest.
  """
  short = _round_up(length, multiple)
  return (short,) * len(blocks) if short <= min(blocks) else blocks


def head_dim_unsupported(head_dim: int) -> str | None:
  """Why the kernels can't take this head_dim, or None. The softmax statistics are kept
  lane-replicated [rows, 128] and broadcast to [rows, head_dim] (`_lanes`): a slice for
  head_dim < 128, a tile for multiples of 128, nothing in between. `llmjax.kernels.dispatch.
  check_config` reports this before compiling."""
  if head_dim < NUM_LANES or head_dim % NUM_LANES == 0:
    return None
  return f'head_dim={head_dim} (the Mosaic kernels need < 128 or a multiple of 128)'


def flash_attention(q, k, v, mask: Mask, *, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret=None) -> jax.Array:
  """Flash attention on TPU with the entry point's signature.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    mask: causal / sliding_window / segment ids / q_offset / kv_lengths, all supported.
    block_sizes: tiles; default `BlockSizes.for_device()`.
    interpret: None: Pallas' interpreter on CPU, Mosaic on TPU (decided at lowering); True: the
      TPU interpreter (`pltpu.InterpretParams()`, which simulates VMEM/DMA); False: always
      Mosaic; or a `pltpu.InterpretParams`.
  Returns: [batch, q_len, heads, head_dim] in q's dtype.
  """
  batch, t, heads, head_dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'{heads=} must be a multiple of {kv_heads=}')
  if (why := head_dim_unsupported(head_dim)) is not None:
    raise ValueError(f'flash_attention_tpu cannot take {why}')
  scale = head_dim ** -0.5 if scale is None else scale
  bs = block_sizes or BlockSizes.for_device()
  # Shrink tiles for short sequences; pad lengths to whole tiles.
  bq, bq_dq, bq_dkv = _fit((bs.block_q, bs.block_q_dq, bs.block_q_dkv), t, NUM_SUBLANES)
  bk, bk_dq, bk_dkv = _fit((bs.block_k, bs.block_k_dq, bs.block_k_dkv), s, NUM_LANES)
  bs = BlockSizes(bq, bk, bq_dq, bk_dq, bq_dkv, bk_dkv)
  t_pad = _round_up(t, max(bq, bq_dq, bq_dkv))
  s_pad = _round_up(s, max(bk, bk_dq, bk_dkv))
  if any(t_pad % b for b in (bq, bq_dq, bq_dkv)) or any(s_pad % b for b in (bk, bk_dq, bk_dkv)):
    raise ValueError(f'the query tiles and the key tiles of {bs} must divide each other')

  q_offset = (jnp.zeros((batch,), jnp.int32) if mask.q_offset is None
              else mask.q_offset.astype(jnp.int32))
  # Padded keys are invisible because kv_len never exceeds the real kv length.
  kv_len = (jnp.full((batch,), s, jnp.int32) if mask.kv_lengths is None
            else jnp.minimum(mask.kv_lengths.astype(jnp.int32), s))
  segments = mask.q_segment_ids is not None
  q_seg = kv_seg = None
  if segments:
    q_seg = jnp.pad(mask.q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
    kv_seg = jnp.pad(mask.kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s)))
    q_seg = jnp.broadcast_to(q_seg[:, :, None], (batch, t_pad, NUM_LANES))
    kv_seg = jnp.broadcast_to(kv_seg[:, None, :], (batch, NUM_SUBLANES, s_pad))
  spec = _MaskSpec(causal=mask.causal, window=mask.sliding_window, segments=segments)

  def to_kernel(x, length):  # [B, L, N, H] -> [B, N, L_pad, H]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

  out = _flash(to_kernel(q, t_pad), to_kernel(k, s_pad), to_kernel(v, s_pad), q_offset, kv_len,
               q_seg, kv_seg, spec, float(scale), bs, interpret)
  return jnp.swapaxes(out[:, :, :t], 1, 2)


def flash_attention_reference(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """The plain-jnp oracle (float32 softmax, repeated K/V): `reference_attention`."""
  return reference_attention(q, k, v, mask, scale=scale)
