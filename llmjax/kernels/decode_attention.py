"""Decode attention for TPU (Pallas/Mosaic): one new query token per sequence against a KV cache.

Decoding is memory bound: each step reads the whole valid part of the cache once and does
2 flops per byte, so the kernel's job is to read no more than that. It
  * reads the cache in its own layout [batch, max_len, kv_heads, head_dim] (no transpose, which
    would cost another full read and write of the cache every step),
  * handles all query heads of a kv head together (GQA: the group's [group, head_dim] queries
    make one matmul with the kv head's keys, so each key is read once, not once per query head),
  * skips the key blocks past `kv_lengths` (the unfilled cache) and before the sliding window,
    and clamps the index_map into the valid range so those blocks are not DMA'd either.
Forward only: the sampler never differentiates through the cache.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llmjax.kernels._util import out_struct, platform_call, round_up
from llmjax.kernels.mask import Mask
from llmjax.kernels.reference import reference_attention

NUM_LANES = 128
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TRANS_B = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: cache positions per grid step (a multiple of 8). 512 keys x kv_heads x head_dim
  bf16 is 128 KiB per kv head, double buffered for k and v: large DMAs amortise the ~0.35 us per
  grid step, which dominates at decode's low arithmetic intensity."""
  block_k: int = 512


def _decode_kernel(q_pos_ref, kv_len_ref,  # scalar prefetch [batch]
                   q_ref, k_ref, v_ref,  # [kv_heads, group, H], [block_k, kv_heads, H] x2
                   o_ref,  # [kv_heads, group, H]
                   *rest,  # (lse_ref [kv_heads, group, 128],) if return_lse; the scratch
                   causal, window, scale, block_k, num_kv_blocks, return_lse):
  lse_ref = rest[0] if return_lse else None
  m_scr, l_scr, acc_scr = rest[-3:]  # [kv_heads, group, 128] x2, [kv_heads, group, H]
  b, ki = pl.program_id(0), pl.program_id(1)
  q_pos, kv_len = q_pos_ref[b], kv_len_ref[b]
  k_first = ki * block_k
  kv_heads, group, head_dim = q_ref.shape

  @pl.when(ki == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  visible = k_first < kv_len
  if causal:
    visible = jnp.logical_and(visible, k_first <= q_pos)
  if window:
    visible = jnp.logical_and(visible, q_pos - (k_first + block_k - 1) < window)

  @pl.when(visible)
  def _compute():
    col = k_first + lax.broadcasted_iota(jnp.int32, (group, block_k), 1)
    mask = col < kv_len
    if causal:
      mask = jnp.logical_and(mask, col <= q_pos)
    if window:
      mask = jnp.logical_and(mask, q_pos - col < window)
    for h in range(kv_heads):  # static: kv_heads is small (GQA), each one a [group, H] matmul
      k = k_ref[:, h, :]  # [block_k, H] (a strided load out of the cache layout)
      s = lax.dot_general(q_ref[h], k, TRANS_B, preferred_element_type=jnp.float32) * scale
      s = jnp.where(mask, s, MASK_VALUE)  # [group, block_k]
      m_prev, l_prev = m_scr[h], l_scr[h]  # [group, 128] lane-replicated
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)
      alpha = jnp.exp(m_prev - m_next)
      l_scr[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
      m_scr[h] = m_next
      pv = lax.dot(p.astype(v_ref.dtype), v_ref[:, h, :], preferred_element_type=jnp.float32)
      acc_scr[h] = acc_scr[h] * alpha[:, :1] + pv

  @pl.when(ki == num_kv_blocks - 1)
  def _finish():
    l = l_scr[...][..., :1]
    inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))  # no visible key: zeros
    o_ref[...] = (acc_scr[...] * inv).astype(o_ref.dtype)
    if return_lse:  # log sum_j exp(s_j): MASK_VALUE + log 0 = -inf where no key is visible
      lse_ref[...] = m_scr[...] + jnp.log(l_scr[...])


def _decode_call(interpret, q, k, v, q_pos, kv_len, *, causal, window, scale, block_k,
                 return_lse=False):
  batch, kv_heads, group, head_dim = q.shape
  nk = k.shape[1] // block_k

  def kv_map(b, ki, q_pos_ref, kv_len_ref):
    hi = (kv_len_ref[b] - 1) // block_k
    if causal:
      hi = jnp.minimum(hi, q_pos_ref[b] // block_k)
    lo = jnp.int32(0)
    if window:
      lo = jnp.maximum(0, (q_pos_ref[b] - window + 1) // block_k)
    hi = jnp.clip(hi, 0, nk - 1)
    lo = jnp.minimum(lo, hi)
    return b, jnp.clip(ki, lo, hi), 0, 0  # skipped steps repeat a block index: no DMA

  q_spec = pl.BlockSpec((None, kv_heads, group, head_dim), lambda b, ki, *_: (b, 0, 0, 0))
  kv_spec = pl.BlockSpec((None, block_k, kv_heads, head_dim), kv_map)
  kernel = functools.partial(_decode_kernel, causal=causal, window=window, scale=scale,
                             block_k=block_k, num_kv_blocks=nk, return_lse=return_lse)
  out_specs, out_shape = q_spec, out_struct(q.shape, q.dtype, q)
  if return_lse:  # lane-replicated, as the m and l scratch (a [.., 1] block would not tile)
    lse_spec = pl.BlockSpec((None, kv_heads, group, NUM_LANES), lambda b, ki, *_: (b, 0, 0, 0))
    out_specs = [q_spec, lse_spec]
    out_shape = [out_shape, out_struct((batch, kv_heads, group, NUM_LANES), jnp.float32, q)]
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, nk), in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((kv_heads, group, NUM_LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, group, NUM_LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, group, head_dim), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
      cost_estimate=pl.CostEstimate(
          flops=4 * q.size * k.shape[1], transcendentals=q.size // head_dim * k.shape[1],
          bytes_accessed=(2 * q.size + k.size + v.size) * k.dtype.itemsize),
      interpret=interpret,
  )(q_pos, kv_len, q, k, v)


def _block_k(cache_len: int, block_sizes: BlockSizes | None) -> int:
  """The key block for a cache of `cache_len` slots: the configured one, or a single block of the
  (8-rounded) whole cache when that is shorter."""
  return min((block_sizes or BlockSizes()).block_k, round_up(cache_len, 8))


def cache_length(n: int, block_sizes: BlockSizes | None = None) -> int:
  """The smallest cache length >= n that is whole key blocks, so `decode_attention` reads it in
  place. Any other length is padded to whole blocks on every decode step, and that `jnp.pad` is a
  copy of the entire cache: as much HBM traffic again as the attention itself. The sampler sizes
  its cache with this (via `llmjax.kernels.dispatch.cache_length`); slots past `kv_lengths` cost
  memory only, never reads (the index_map skips their blocks)."""
  return round_up(n, _block_k(n, block_sizes))


def supports(q, mask: Mask) -> bool:
  """Whether `decode_attention` can take this call: one query token, no segment ids."""
  return q.shape[1] == 1 and mask.q_segment_ids is None


def decode_attention(q, k, v, mask: Mask, *, scale: float | None = None,
                     block_sizes: BlockSizes | None = None, interpret=None,
                     return_lse: bool = False):
  """Attention of one query token per sequence to a KV cache.

  Args:
    q: [batch, 1, heads, head_dim]; k, v: the cache, [batch, max_len, kv_heads, head_dim].
    mask: kv_lengths (valid cache slots; default all), q_offset (the query's position; default
      0), causal, sliding_window. Segment ids are not supported (see `supports`).
    interpret: as in `flash_attention`: None interprets on CPU, compiles for TPU.
    return_lse: also return each head's log-sum-exp of its scaled scores [batch, 1, heads]
      float32 (-inf where no key is visible), so that attention over pieces of a cache can be
      combined exactly (`sharded.shard_decode_attention`, a cache split over devices).
  Returns: [batch, 1, heads, head_dim] (and the log-sum-exp).
  """
  if not supports(q, mask):
    raise ValueError('decode_attention takes q_len == 1 and no segment ids; use flash_attention')
  batch, _, heads, head_dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  scale = head_dim ** -0.5 if scale is None else scale
  block_k = _block_k(s, block_sizes)
  s_pad = round_up(s, block_k)
  if s_pad != s:  # a copy of the cache: `cache_length` avoids it; the padding is masked by kv_len
    k = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
  q_pos = (jnp.zeros((batch,), jnp.int32) if mask.q_offset is None
           else mask.q_offset.astype(jnp.int32))
  kv_len = (jnp.full((batch,), s, jnp.int32) if mask.kv_lengths is None
            else jnp.minimum(mask.kv_lengths.astype(jnp.int32), s))
  q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # query head h -> kv head h // G
  call = functools.partial(_decode_call, causal=mask.causal, window=mask.sliding_window,
                           scale=float(scale), block_k=block_k, return_lse=return_lse)
  out = platform_call(call, interpret, q, k, v, q_pos, kv_len)
  if not return_lse:
    return out.reshape(batch, 1, heads, head_dim)
  out, lse = out
  return out.reshape(batch, 1, heads, head_dim), lse[..., 0].reshape(batch, 1, heads)


def decode_attention_reference(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """The plain-jnp oracle: `reference_attention` over the whole cache with the same mask."""
  return reference_attention(q, k, v, mask, scale=scale)
