"""Flash attention for GPU (Pallas, Triton lowering): forward and backward, GQA, `Mask` semantics.

The same algorithm as `flash_attention_tpu` (FlashAttention-2, Dao 2023), shaped for Triton:
one program per (query block, batch, head) keeps its q tile and the online-softmax state in
registers and loops over key blocks with `lax.fori_loop`. Masks skip work through the loop
bounds (causal, sliding window, kv_lengths, q_offset: only the visible key blocks are visited, so
masked blocks are neither loaded nor computed); segment ids mask inside a block. Backward:
  dq kernel   grid (q blocks, batch, heads), loop over key blocks
  dk/dv kernel grid (kv blocks, batch, kv heads), loop over the group's query heads x q blocks,
so GQA never repeats K/V (or dK/dV) in HBM. GPUs have no TPU tiling constraints, so the kernels
read the entry point's [batch, length, heads, head_dim] layout directly (no transpose).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels._util import (MaskSpec, kv_block_range, out_struct, platform_call,
                                  q_block_range, round_up)
from llmjax.kernels.mask import Mask
from llmjax.kernels.reference import reference_attention

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (powers of two, as Triton requires). 128x64 in the forward and smaller tiles in the
  backward (which holds more tiles in registers at once) are the sizes of JAX's own Triton
  attention and of the Triton tutorial, tuned on A100/H100."""
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 32
  block_q_dkv: int = 32
  block_k_dkv: int = 64
  num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8
  num_stages: int = 2


def _mask(spec, q_first, k_first, block_q, block_k, kv_len, q_seg, kv_seg):
  row = q_first + jnp.arange(block_q)[:, None]  # absolute query positions
  col = k_first + jnp.arange(block_k)[None, :]  # absolute key positions
  mask = col < kv_len
  if spec.causal:
    mask = jnp.logical_and(mask, col <= row)
  if spec.window:
    mask = jnp.logical_and(mask, row - col < spec.window)
  if spec.segments:
    mask = jnp.logical_and(mask, q_seg[:, None] == kv_seg[None, :])
  return mask  # [block_q, block_k]


def _fwd_kernel(q_ref, k_ref, v_ref, q_off_ref, kv_len_ref, q_seg_ref, kv_seg_ref,
                o_ref, lse_ref, *, spec, scale, block_q, block_k):
  qi = pl.program_id(0)
  num_kv_blocks = k_ref.shape[0] // block_k
  q_first = q_off_ref[...] + qi * block_q
  kv_len = kv_len_ref[...]
  q = q_ref[...]  # [block_q, H]
  q_seg = q_seg_ref[...] if spec.segments else None
  lo, hi = kv_block_range(spec, q_first, q_first + block_q - 1, kv_len, block_k, num_kv_blocks)

  def body(j, carry):
    acc, m, l = carry
    k_first = j * block_k
    k = k_ref[pl.ds(k_first, block_k), :]
    s = plgpu.dot(q, k.T).astype(jnp.float32) * scale  # [block_q, block_k]
    kv_seg = kv_seg_ref[pl.ds(k_first, block_k)] if spec.segments else None
    mask = _mask(spec, q_first, k_first, block_q, block_k, kv_len, q_seg, kv_seg)
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)  # 0, not exp(0), for unseen rows
    alpha = jnp.exp(m - m_next)
    v = v_ref[pl.ds(k_first, block_k), :]
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_next, alpha * l + jnp.sum(p, axis=1)

  acc = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  m = jnp.full((block_q,), MASK_VALUE, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(lo, hi + 1, body, (acc, m, l))
  empty = l == 0.0  # sees no key: zero output; lse = +inf makes P = 0 in the backward
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(safe_l))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_off_ref, kv_len_ref, q_seg_ref,
               kv_seg_ref, dq_ref, *, spec, scale, block_q, block_k):
  qi = pl.program_id(0)
  num_kv_blocks = k_ref.shape[0] // block_k
  q_first = q_off_ref[...] + qi * block_q
  kv_len = kv_len_ref[...]
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...], di_ref[...]  # [block_q]
  q_seg = q_seg_ref[...] if spec.segments else None
  lo, hi = kv_block_range(spec, q_first, q_first + block_q - 1, kv_len, block_k, num_kv_blocks)

  def body(j, dq):
    k_first = j * block_k
    k = k_ref[pl.ds(k_first, block_k), :]
    v = v_ref[pl.ds(k_first, block_k), :]
    s = plgpu.dot(q, k.T).astype(jnp.float32) * scale
    kv_seg = kv_seg_ref[pl.ds(k_first, block_k)] if spec.segments else None
    mask = _mask(spec, q_first, k_first, block_q, block_k, kv_len, q_seg, kv_seg)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v.T).astype(jnp.float32)
    ds = p * (dp - di[:, None])  # softmax backward: P * (dP - rowsum(dO * O))
    return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_off_ref, kv_len_ref, q_seg_ref,
                kv_seg_ref, dk_ref, dv_ref, *, spec, scale, block_q, block_k, group):
  ki = pl.program_id(0)
  num_q_blocks = q_ref.shape[0] // block_q
  k_first = ki * block_k
  q_off, kv_len = q_off_ref[...], kv_len_ref[...]
  k, v = k_ref[...], v_ref[...]  # [block_k, H]
  kv_seg = kv_seg_ref[...] if spec.segments else None
  lo, hi = q_block_range(spec, k_first, k_first + block_k - 1, q_off, block_q, num_q_blocks)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(group):  # the query heads of this kv head: their dK/dV sum here, not in HBM
    def body(i, carry, g=g):
      dk, dv = carry
      q_first_row = i * block_q
      rows = pl.ds(q_first_row, block_q)
      q = q_ref[rows, g, :]
      do = do_ref[rows, g, :]
      lse, di = lse_ref[g, rows], di_ref[g, rows]
      q_seg = q_seg_ref[rows] if spec.segments else None
      s = plgpu.dot(q, k.T).astype(jnp.float32) * scale
      mask = _mask(spec, q_off + q_first_row, k_first, block_q, block_k, kv_len, q_seg, kv_seg)
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [block_q, block_k]
      dv = dv + plgpu.dot(p.astype(do.dtype).T, do).astype(jnp.float32)
      dp = plgpu.dot(do, v.T).astype(jnp.float32)
      ds = p * (dp - di[:, None])
      dk = dk + plgpu.dot(ds.astype(q.dtype).T, q).astype(jnp.float32)
      return dk, dv
    dk, dv = lax.fori_loop(lo, hi + 1, body, (dk, dv))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(bs, head_dim, num_warps=None, num_stages=None):
  warps = num_warps or bs.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=num_stages or bs.num_stages)


def _scalar_specs(spec, t, s, batch_of, q_block_of=None, bq=None):
  """Specs of (q_offset, kv_len, q_seg, kv_seg); `batch_of` maps the grid to the batch index."""
  q_seg = kv_seg = None
  if spec.segments:
    if q_block_of is None:
      q_seg = pl.BlockSpec((None, t), lambda *g: (batch_of(*g), 0))
    else:
      q_seg = pl.BlockSpec((None, bq), lambda *g: (batch_of(*g), q_block_of(*g)))
    kv_seg = pl.BlockSpec((None, s), lambda *g: (batch_of(*g), 0))
  scalar = pl.BlockSpec((None,), lambda *g: (batch_of(*g),))
  return [scalar, scalar, q_seg, kv_seg]


def _fwd_call(interpret, q, k, v, q_off, kv_len, q_seg, kv_seg, *, spec, scale, bs):
  batch, t, heads, head_dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = bs.block_q, bs.block_k
  kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk)
  return pl.pallas_call(
      kernel,
      grid=(t // bq, batch, heads),
      in_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((None, s, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
                pl.BlockSpec((None, s, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
                *_scalar_specs(spec, t, s, lambda i, b, h: b, lambda i, b, h: i, bq)],
      out_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[out_struct(q.shape, q.dtype, q),
                 out_struct((batch, heads, t), jnp.float32, q)],
      compiler_params=_params(bs, head_dim),
      interpret=interpret,
  )(q, k, v, q_off, kv_len, q_seg, kv_seg)


def _dq_call(interpret, q, k, v, do, lse, di, q_off, kv_len, q_seg, kv_seg, *, spec, scale, bs):
  batch, t, heads, head_dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = bs.block_q_dq, bs.block_k_dq
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, s, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  kernel = functools.partial(_dq_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk)
  return pl.pallas_call(
      kernel,
      grid=(t // bq, batch, heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *_scalar_specs(spec, t, s, lambda i, b, h: b, lambda i, b, h: i, bq)],
      out_specs=q_spec,
      out_shape=out_struct(q.shape, q.dtype, q),
      compiler_params=_params(bs, head_dim),
      interpret=interpret,
  )(q, k, v, do, lse, di, q_off, kv_len, q_seg, kv_seg)


def _dkv_call(interpret, q, k, v, do, lse, di, q_off, kv_len, q_seg, kv_seg, *, spec, scale,
              bs):
  batch, t, heads, head_dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = bs.block_q_dkv, bs.block_k_dkv
  # Query-side arrays grouped by kv head (free reshapes): [B, T, K, G, H] and [B, K, G, T].
  q5 = q.reshape(batch, t, kv_heads, group, head_dim)
  do5 = do.reshape(batch, t, kv_heads, group, head_dim)
  lse4 = lse.reshape(batch, kv_heads, group, t)
  di4 = di.reshape(batch, kv_heads, group, t)
  q_spec = pl.BlockSpec((None, t, None, group, head_dim), lambda j, b, h: (b, 0, h, 0, 0))
  kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
  row_spec = pl.BlockSpec((None, None, group, t), lambda j, b, h: (b, h, 0, 0))
  kernel = functools.partial(_dkv_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk,
                             group=group)
  seg_specs = _scalar_specs(spec, t, s, lambda j, b, h: b)
  if spec.segments:  # kv ids per key block
    seg_specs[3] = pl.BlockSpec((None, bk), lambda j, b, h: (b, j))
  return pl.pallas_call(
      kernel,
      grid=(s // bk, batch, kv_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
      out_specs=[kv_spec, kv_spec],
      out_shape=[out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
      compiler_params=_params(bs, head_dim),
      interpret=interpret,
  )(q5, k, v, do5, lse4, di4, q_off, kv_len, q_seg, kv_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_off, kv_len, q_seg, kv_seg, spec, scale, bs, interpret):
  return _flash_fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, spec, scale, bs, interpret)[0]


def _flash_fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, spec, scale, bs, interpret):
  call = functools.partial(_fwd_call, spec=spec, scale=scale, bs=bs)
  o, lse = platform_call(call, interpret, q, k, v, q_off, kv_len, q_seg, kv_seg, gpu=True)
  return o, (q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse)


def _flash_bwd(spec, scale, bs, interpret, res, do):
  q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse = res
  # D_i = rowsum(dO * O) (FlashAttention-2, Alg. 2 line 4): [B, N, T] like lse.
  di = jnp.einsum('btnh,btnh->bnt', do.astype(jnp.float32), o.astype(jnp.float32))
  args = (q, k, v, do, lse, di, q_off, kv_len, q_seg, kv_seg)
  kw = dict(spec=spec, scale=scale, bs=bs)
  dq = platform_call(functools.partial(_dq_call, **kw), interpret, *args, gpu=True)
  dk, dv = platform_call(functools.partial(_dkv_call, **kw), interpret, *args, gpu=True)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def head_dim_unsupported(head_dim: int) -> str | None:
  """Why the kernel can't take this head_dim, or None: Triton blocks (here [block, head_dim]
  tiles) must have power-of-two sizes. `llmjax.kernels.dispatch.check_config` reports this
  before compiling."""
  if head_dim & (head_dim - 1) == 0:
    return None
  return f'head_dim={head_dim} (the Triton kernel needs a power of two)'


def flash_attention(q, k, v, mask: Mask, *, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret=None) -> jax.Array:
  """Flash attention on GPU (Triton) with the entry point's signature.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    mask: causal / sliding_window / segment ids / q_offset / kv_lengths, all supported.
    interpret: None: Pallas' interpreter on CPU, Triton on GPU (decided at lowering).
  Returns: [batch, q_len, heads, head_dim] in q's dtype.
  """
  batch, t, heads, head_dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'{heads=} must be a multiple of {kv_heads=}')
  if (why := head_dim_unsupported(head_dim)) is not None:
    raise ValueError(f'flash_attention_gpu cannot take {why}')
  scale = head_dim ** -0.5 if scale is None else scale
  bs = block_sizes or BlockSizes()
  # Short sequences: shrink tiles (to powers of two >= 16, Triton's smallest dot).
  fit = lambda b, n: min(b, max(16, pl.next_power_of_2(n)))
  bs = dataclasses.replace(
      bs, block_q=fit(bs.block_q, t), block_k=fit(bs.block_k, s),
      block_q_dq=fit(bs.block_q_dq, t), block_k_dq=fit(bs.block_k_dq, s),
      block_q_dkv=fit(bs.block_q_dkv, t), block_k_dkv=fit(bs.block_k_dkv, s))
  t_pad = round_up(t, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
  s_pad = round_up(s, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
  q_off = (jnp.zeros((batch,), jnp.int32) if mask.q_offset is None
           else mask.q_offset.astype(jnp.int32))
  kv_len = (jnp.full((batch,), s, jnp.int32) if mask.kv_lengths is None
            else jnp.minimum(mask.kv_lengths.astype(jnp.int32), s))  # masks the padded keys
  segments = mask.q_segment_ids is not None
  q_seg = kv_seg = None
  if segments:
    q_seg = jnp.pad(mask.q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
    kv_seg = jnp.pad(mask.kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s)))
  spec = MaskSpec(causal=mask.causal, window=mask.sliding_window, segments=segments)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  out = _flash(pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), q_off, kv_len, q_seg, kv_seg, spec,
               float(scale), bs, interpret)
  return out[:, :t]


def flash_attention_reference(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """The plain-jnp oracle (float32 softmax, repeated K/V): `reference_attention`."""
  return reference_attention(q, k, v, mask, scale=scale)
