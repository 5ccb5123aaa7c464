"""The plain-jnp attention implementations: `reference_attention` (the oracle every kernel is
tested against) and `xla_attention` (what XLA runs, and 'auto''s fallback).

Both have the entry point's signature `(q, k, v, mask, *, scale=None)`. They live in the kernel
layer so that the kernels' `*_reference` oracles and the dispatcher need nothing from
`llmjax.models`; `llmjax.models.attention` re-exports them.
"""

import jax
import jax.numpy as jnp

from llmjax.kernels.mask import Mask


def reference_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """Plain-jnp attention, the oracle for every other implementation.

  Repeats K/V to all query heads and computes everything in float32.
  Args: q [B, T, N, H], k/v [B, S, K, H]. Returns [B, T, N, H] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  groups = q.shape[2] // k.shape[2]
  k32 = jnp.repeat(k.astype(jnp.float32), groups, axis=2)  # [B, S, N, H]
  v32 = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32), k32) * scale
  m = mask.dense(q.shape[1], k.shape[1])[:, None]  # [B, 1, T, S]
  logits = jnp.where(m, logits, -jnp.inf)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.where(m, probs, 0.0)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom == 0, 1.0, denom)
  return jnp.einsum('bnts,bsnh->btnh', probs, v32).astype(q.dtype)


# Query rows per block of `_causal_blocks`: its work is (n + 1) / 2n of the dense form's for n
# blocks, and blocks of fewer rows make matmuls too small to run at speed.
CAUSAL_BLOCK = 128


def xla_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """Einsum attention for XLA: GQA by grouping query heads (K/V are never repeated in memory),
  matmuls in the input dtype with float32 accumulation, softmax in float32.
  Causal self-attention (training, a prefill without a cache) skips the keys after each block
  of queries (`_causal_blocks`).
  Args: q [B, T, N, H], k/v [B, S, K, H]. Returns [B, T, N, H].
  """
  b, t, n, h = q.shape
  scale = h ** -0.5 if scale is None else scale
  if t == 1 and b > 1:
    return _one_query(q, k, v, mask, scale)
  if (mask.causal and mask.q_offset is None and t == k.shape[1] and t % CAUSAL_BLOCK == 0
      and t > CAUSAL_BLOCK):
    return _causal_blocks(q, k, v, mask, scale)
  return _dense(q, k, v, mask, scale)


def _causal_blocks(q, k, v, mask: Mask, scale: float) -> jax.Array:
  """Causal attention by blocks of CAUSAL_BLOCK queries, block i over keys [0, (i + 1) x
  CAUSAL_BLOCK) only: every later key is masked for all of its rows (a masked key adds
  exp(-huge) = 0 to the softmax), so each row's output is the dense form's up to float32
  summation order, at (n + 1) / 2n of its work and memory for n blocks (5/8 at 512 tokens), as
  a flash kernel skips the blocks above the diagonal. On XLA:CPU that is +23% (bf16) and +16%
  (float32) on the `small` training step (`benchmarks/train.py`); TPU and GPU train with their
  kernels ('auto') and get the same saving where they fall back to XLA. Shapes as
  `xla_attention`."""
  b, t = q.shape[:2]
  outs = []
  for start in range(0, t, CAUSAL_BLOCK):
    end = start + CAUSAL_BLOCK
    block = Mask(causal=True, sliding_window=mask.sliding_window,
                 q_segment_ids=None if mask.q_segment_ids is None
                 else mask.q_segment_ids[:, start:end],
                 kv_segment_ids=None if mask.kv_segment_ids is None
                 else mask.kv_segment_ids[:, :end],
                 q_offset=jnp.full((b,), start, jnp.int32), kv_lengths=mask.kv_lengths)
    outs.append(_dense(q[:, start:end], k[:, :end], v[:, :end], block, scale))
  return jnp.concatenate(outs, axis=1)  # [B, T, N, H]


def _dense(q, k, v, mask: Mask, scale: float) -> jax.Array:
  """`xla_attention` over every (query, key) pair at once; shapes as there."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
  # [B, K, G, T, S]
  logits = jnp.einsum('btkgh,bskh->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  m = mask.dense(t, k.shape[1])[:, None, None]  # [B, 1, 1, T, S]
  # A large finite negative instead of -inf keeps fully masked rows finite in the backward pass.
  logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(m, probs, 0.0).astype(v.dtype)  # fully masked rows -> zero output
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def _one_query(q, k, v, mask: Mask, scale: float) -> jax.Array:
  """`xla_attention` for one query per row (a decode step), as multiply-reduces over the cache
  in its own [B, S, K, H] layout.

  A decode step's attention is a batched matrix-vector product (G = N / K query heads per KV
  head), bound by reading K and V, not by FLOPs. As einsums its dots batch over (B, K), which
  are not the cache's leading dims, so XLA first copies the keys and values into a
  [B, K, ...] layout (on CPU the keys transposed to [B, K, H, S]): more than half a 32-row
  serving step went to those copies. Reduced elementwise, with the slicing (`kv_span`) fused
  in, each entry is read once where it lies. float32 accumulation and softmax as above.
  One row keeps the einsums: its copy is small, and the reductions' fixed cost made a 1-row
  step slower (`benchmarks/decode_step.py` on CPU, quickstart model, 256 positions: 32 rows
  19.1 -> 14.2 ms, 8 rows 4.0 -> 3.6, 4 rows 2.4 -> 2.2, but 1 row 1.2 -> 2.1).
  Args: q [B, 1, N, H], k/v [B, S, K, H]. Returns [B, 1, N, H] in q's dtype.
  """
  b, _, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  q32 = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)  # [B, 1, K, G, H]
  # [B, S, K, G]: a row's keys along S, as the cache holds them.
  logits = jnp.sum(q32 * k.astype(jnp.float32)[:, :, :, None, :], axis=-1) * scale
  m = mask.dense(1, s)[:, 0, :, None, None]  # [B or 1, S, 1, 1]
  logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=1)
  probs = jnp.where(m, probs, 0.0)  # a fully masked row -> zero output
  out = jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B, K, G, H]
  return out.reshape(b, 1, n, h).astype(q.dtype)
